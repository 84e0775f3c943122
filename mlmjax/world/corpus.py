"""The pretraining corpus: rendered world scenes and the captions a text-to-image model learns from.

A corpus is a fixed set of scenes (never the concept: it must stay novel) rendered once. Captions are
drawn afresh for every step from a seeded generator, so the same scene is seen with different
paraphrases, framings and levels of detail:

- an attribute is left unsaid with probability `drop_prob` (the model must then fill it in, so a short
  prompt like "a teapot on the beach" still makes a complete picture);
- the caption is empty with probability `empty_prob`, the unconditional input that classifier-free
  guidance needs;
- a caption is framed with probability `frame_prob` by one of the 27 Textual Inversion templates
  ("a photo of the cool {}"), the words every customization run puts around its concept.

``write_caption_file`` writes captions one a line, the format contextualizer pretraining reads.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from typing import Callable, Iterator, Sequence

import numpy as np

from mlmjax import files
from mlmjax.prompts import prompt_set as prompts_lib
from mlmjax.world import captions as captions_lib
from mlmjax.world import scene as scene_lib
from mlmjax.world.render import render_batch
from mlmjax.world.scene import Scene

DROP_PROB = 0.25
EMPTY_PROB = 0.1
FRAME_PROB = 0.5

# Attributes a caption may leave unsaid, each with the fields that go with it.
_DROPPABLE = {"color": ("color",), "background": ("background",),
              "wearing": ("wearing", "wearing_color"),
              "relation": ("relation", "second_object", "second_color"), "style": ("style",)}


def said(scene: Scene, rng: np.random.Generator, drop_prob: float = DROP_PROB) -> Scene:
    """The part of `scene` a caption mentions: each droppable attribute kept with 1 - `drop_prob`.

    Draws one number per droppable attribute whatever the scene holds, so a caption's draws never
    depend on the scene's contents.
    """
    dropped = rng.random(len(_DROPPABLE)) < drop_prob
    unsaid = {field: None for drop, fields in zip(dropped, _DROPPABLE.values()) if drop for field in fields}
    return dataclasses.replace(scene, **unsaid)


def _without_article(text: str) -> str:
    for article in ("a ", "an "):
        if text.startswith(article):
            return text[len(article):]
    return text


def training_caption(scene: Scene, rng: np.random.Generator, *, drop_prob: float = DROP_PROB,
                     empty_prob: float = EMPTY_PROB, frame_prob: float = FRAME_PROB) -> str:
    """One caption of `scene` (see the module docstring); the same `rng` state gives the same text."""
    empty, frame = rng.random(2) < (empty_prob, frame_prob)
    template = prompts_lib.ti_templates()[int(rng.integers(len(prompts_lib.ti_templates())))]
    text = captions_lib.caption(said(scene, rng, drop_prob), rng)
    if empty:
        return ""
    return template.format(_without_article(text)) if frame else text


def to_unit_range(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] -> float32 in [-1, 1], the range the VAE and the image tower read."""
    return images.astype(np.float32) / 127.5 - 1.0


@dataclasses.dataclass(frozen=True)
class Corpus:
    scenes: tuple[Scene, ...]
    images: np.ndarray  # uint8 [N, 32, 32, 3]

    def __len__(self) -> int:
        return len(self.scenes)

    def batch_indices(self, seed: int, step: int, batch_size: int) -> np.ndarray:
        """The examples of step `step`: uniform with replacement, a function of (seed, step) alone."""
        return np.random.default_rng([seed, step]).integers(0, len(self), batch_size)

    def stream(self, seed: int, batch_size: int, make: Callable[[np.ndarray, int], dict]) -> Iterator[dict]:
        """Endless batches ``make(indices, step)`` for steps 0, 1, ... with `batch_indices`' examples."""
        for step in itertools.count():
            yield make(self.batch_indices(seed, step, batch_size), step)

    def captions(self, indices: Sequence[int], seed: int, step: int, **caption_options) -> list[str]:
        """Captions of the scenes at `indices`, drawn from (seed, step) alone (see `training_caption`)."""
        rng = np.random.default_rng([seed, step, 1])
        return [training_caption(self.scenes[i], rng, **caption_options) for i in indices]


def build(size: int, seed: int) -> Corpus:
    """`size` random scenes (never the concept) from `seed`, rendered at 32×32."""
    scenes = tuple(scene_lib.sample_scenes(np.random.default_rng(seed), size))
    return Corpus(scenes, render_batch(scenes))


def write_caption_file(path: str, size: int, seed: int) -> None:
    """`size` training captions (no empty ones) of fresh random scenes, one a line, written atomically."""
    rng = np.random.default_rng(seed)
    lines = [training_caption(s, rng, empty_prob=0.0) for s in scene_lib.sample_scenes(rng, size)]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    files.write_text_atomic(path, "\n".join(lines) + "\n")
