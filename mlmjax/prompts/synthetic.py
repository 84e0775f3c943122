"""Synthetic captions and the caption mix for contextualizer pretraining (PAPER.md §1.3).

The authors pretrain on 70% COCO captions and 30% template captions of six types (solo_act,
backgrounds, relations, interact, wearings, styles) whose subject is a person, animal or object,
so the contextualizer sees the kinds of context the customization prompt set later asks about.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np

from mlmjax.prompts.templates import DATA_DIR, TemplateSet


@lru_cache(maxsize=4)
def _load(root: Path) -> TemplateSet:
    return TemplateSet.from_file(root / "templates" / "synthetic.txt", root / "words", slots=0)


def synthetic_set(data_dir: str | Path | None = None) -> TemplateSet:
    """The synthetic caption types (validated: no template has a `<new1>` slot)."""
    return _load(Path(data_dir) if data_dir is not None else DATA_DIR)


def synthetic_captions(rng: np.random.Generator, n: int, data_dir: str | Path | None = None) -> list[str]:
    """`n` captions: a uniform type, then a uniform caption of it."""
    return [line for _, line in synthetic_set(data_dir).sample(rng, n)]


def caption_stream(rng: np.random.Generator, user_captions: list[str], synthetic_ratio: float = 0.3,
                   data_dir: str | Path | None = None) -> Iterator[str]:
    """An endless mix: each item is synthetic with probability `synthetic_ratio` (the authors'
    `synth_prob`), else a uniform caption from `user_captions` (e.g. COCO)."""
    if not 0.0 <= synthetic_ratio <= 1.0:
        raise ValueError(f"synthetic_ratio must be in [0, 1], got {synthetic_ratio}")
    if not user_captions and synthetic_ratio < 1.0:
        raise ValueError("user_captions is empty but synthetic_ratio < 1")
    synthetic = synthetic_set(data_dir)
    while True:
        if rng.random() < synthetic_ratio:
            yield synthetic.sample(rng, 1)[0][1]
        else:
            yield user_captions[int(rng.integers(len(user_captions)))]


def read_caption_file(path: str | Path) -> list[str]:
    """Captions, one a line (blank lines skipped), e.g. `coco_caption_raw.txt`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: caption file not found")
    captions = [s.strip() for s in path.read_text(encoding="utf-8").splitlines() if s.strip()]
    if not captions:
        raise ValueError(f"{path}: caption file has no captions")
    return captions
