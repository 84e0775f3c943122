"""The shipped embedded default is a trained world model: plain prompts give pictures in which the
world's evaluator reads the asked background, colour, style and object above chance.

Measured on the shipped weights with these 64 prompts and seed, DDIM 25 steps, guidance 7.5 (README,
"The miniature world"): prompt fidelity 0.608, background 0.906, colour 0.844, object 0.188, worn item
0.158, style 0.714 (float16 and float32 alike). Chance is 1/6 for backgrounds and 1/8 for colours and
objects; a random UNet and text encoder score 0.11, 0.19 and 0.09 on the first three (guidance 4).
Each threshold leaves two to four pictures of margin (objects: 12 of 64 drawn right, the threshold
about 10, chance 8); worn items are at chance and have none.
"""

import pytest

from mlmjax import pretrained as pretrained_lib
from mlmjax import tiny
from mlmjax.world import evaluator as evaluator_lib
from mlmjax.world import quality

THRESHOLDS = {"prompt_fidelity": 0.55, "match/background": 0.85, "match/color": 0.75, "match/style": 0.6,
              "match/object": 0.15}


@pytest.fixture(scope="module")
def scored():
    model = pretrained_lib.load_pretrained(tiny.embedded_assets().model)
    prompts, asked = quality.plain_prompts(64, seed=quality.CHECK_SEED)
    return quality.generate_and_score(model, evaluator_lib.load_evaluator(), prompts, asked, seed=quality.CHECK_SEED)


@pytest.mark.parametrize("name", sorted(THRESHOLDS))
def test_plain_prompts_are_drawn_as_asked(scored, name):
    assert scored.images.shape == (64, 32, 32, 3)
    assert scored.mean(name) >= THRESHOLDS[name]
