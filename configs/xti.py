r"""XTI / P+ (+ MLM): one new token per cross-attention block group (PAPER.md §3).

The authors use 7 tokens, one per block with cross-attention (3 down, mid, 3 up), not the 16 layers
of the P+ paper; ``--config.concept.xti_tokens=layers`` gives 16.

    python -m mlmjax.train --config configs/xti.py --workdir /tmp/xti
"""

from mlmjax import config as config_lib


def get_config():
    c = config_lib.base_config()
    c.method = "xti"
    c.seed = 7777
    c.max_steps = 3001
    c.batch_size = 4
    c.learning_rate = 2e-3
    c.concept.xti_tokens = "blocks"
    c.mlm.weight = 2.5e-4  # the authors' XTI value
    c.mlm.batch_size = 12  # × 7 copies, one per token, each masked independently
    # Quirk (PAPER.md §1.4): the authors' XTI MLM prompts hold the concept token without the class noun.
    c.mlm.class_noun_in_prompts = False
    c.trainable = [(config_lib.CONCEPT, "train"), (r".*", "freeze")]
    return c
