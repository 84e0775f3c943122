"""The context-rich MLM prompt set (PAPER.md §2), diffusion-loss prompts and evaluation prompts.

Every list is a plain-text file under `data/` (see its README.md); a user may point `data_dir` at a
copy of that folder with their own words or templates. The "world" family (the miniature world's
concept, that of the embedded default model) reads the same layout from `mlmjax/world/data`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from mlmjax.prompts.templates import DATA_DIR, SLOT, TemplateSet, read_format_lines

FAMILIES = ("pet", "nonliving")  # the paper's families, whose data is `DATA_DIR`
WORLD_FAMILY = "world"
# A path rather than an import: mlmjax.world.captions imports this module.
WORLD_DATA_DIR = Path(__file__).resolve().parent.parent / "world" / "data"
ALL_FAMILIES = FAMILIES + (WORLD_FAMILY,)
# Types whose captions are already full sentences (they start with a person or an article); the
# authors' dataset code prefixes every other type with a random "mlm prefix".
UNPREFIXED_TYPES = frozenset({"human_interactions", "creatives"})
CLASS_PROMPT = "a picture of a {}"


class MlmPrompt(NamedTuple):
    text: str
    type: str


@dataclass(frozen=True)
class PromptSet:
    """One family's caption types, enumerated lazily from templates and word lists."""

    family: str
    templates: TemplateSet
    prefixes: tuple[str, ...]

    @classmethod
    def load(cls, family: str, data_dir: str | Path | None = None, *, types: list[str] | None = None,
             per_type_size: int | None = None, seed: int = 0) -> PromptSet:
        """Loads and validates `family` ("pet", "nonliving" or "world": its training split) from
        `data_dir` (default: the family's own folder, `family_data_dir`).

        `types` keeps a subset of caption types and `per_type_size` keeps that many lines per type,
        drawn with replacement with `seed`: the paper's prompt-type and prompt-set-size ablations.
        """
        if family not in ALL_FAMILIES:
            raise ValueError(f"unknown prompt family {family!r}; expected one of {ALL_FAMILIES}")
        # The world's customization set leaves out its held-out contexts (`world_train.txt`), so that
        # generating them measures generalisation to contexts MLM never named.
        templates_name = "world_train" if family == WORLD_FAMILY else family
        return cls.from_folder(family, family_data_dir(family, data_dir), templates_name, types=types,
                               per_type_size=per_type_size, seed=seed)

    @classmethod
    def from_folder(cls, family: str, root: str | Path, templates_name: str, *, types: list[str] | None = None,
                    per_type_size: int | None = None, seed: int = 0) -> PromptSet:
        """`load` from `root/templates/<templates_name>.txt` with `root`'s words and prefixes, for a
        variant of a family's templates (e.g. the world's held-out split, "world_train")."""
        root = Path(root)
        templates = TemplateSet.from_file(root / "templates" / f"{templates_name}.txt", root / "words", slots=1)
        if types is not None or per_type_size is not None:
            templates = templates.restrict(types, per_type_size, seed)
        return cls(family, templates, read_format_lines(root / "mlm_prefixes.txt"))

    @property
    def types(self) -> list[str]:
        return list(self.templates.types)

    def count(self, kind: str) -> int:
        return self.templates.count(kind)

    @property
    def size(self) -> int:
        return self.templates.size

    def all_prompts(self, kind: str, concept_phrase: str | None = None) -> list[str]:
        """Every line of `kind` (with `<new1>` unless `concept_phrase` is given), without prefixes."""
        lines = self.templates.lines(kind)
        return lines if concept_phrase is None else [s.replace(SLOT, concept_phrase) for s in lines]

    def sample_typed(self, rng: np.random.Generator, n: int, concept_phrase: str) -> list[MlmPrompt]:
        """`n` independent prompts: a uniform type, a uniform line of it, `<new1>` -> phrase, and a
        uniform prefix around the whole caption unless the type is in `UNPREFIXED_TYPES`."""
        drawn = self.templates.sample(rng, n)
        prefix_ids = rng.integers(len(self.prefixes), size=n)
        out = []
        for (kind, line), p in zip(drawn, prefix_ids):
            text = line.replace(SLOT, concept_phrase)
            if kind not in UNPREFIXED_TYPES:
                text = self.prefixes[p].format(text)
            out.append(MlmPrompt(text, kind))
        return out

    def count_distribution(self, concept_phrase: str, count: Callable[[list[str]], np.ndarray]) -> np.ndarray:
        """``P[n]``: the probability that one prompt of `sample_typed` has ``n`` units (e.g. maskable
        tokens), exactly as it draws them: a uniform type, a uniform line, a uniform prefix.

        ``count(texts)`` gives each text's units; a prefixed prompt has its caption's plus its prefix's
        (the prefix formatted with an empty caption), as for BPE tokens, which never cross the space
        between them.
        """
        prefixes = np.bincount(count([p.format("") for p in self.prefixes])) / len(self.prefixes)
        total = np.zeros(1)
        for kind in self.types:
            lines = np.bincount(count(self.all_prompts(kind, concept_phrase))) / self.count(kind)
            if kind not in UNPREFIXED_TYPES:
                lines = np.convolve(lines, prefixes)
            size = max(total.size, lines.size)
            total = np.pad(total, (0, size - total.size)) + np.pad(lines, (0, size - lines.size)) / len(self.types)
        return total

    def sample(self, rng: np.random.Generator, n: int, concept_phrase: str) -> list[str]:
        """The texts of `sample_typed` (same draws for the same `rng` state)."""
        return [p.text for p in self.sample_typed(rng, n, concept_phrase)]


def family_data_dir(family: str, data_dir: str | Path | None = None) -> Path:
    """The folder `family`'s prompt set is read from: `data_dir` if given, else the family's own."""
    if data_dir is not None:
        return Path(data_dir)
    return WORLD_DATA_DIR if family == WORLD_FAMILY else DATA_DIR


@lru_cache(maxsize=8)
def _format_lines(path: Path) -> tuple[str, ...]:
    return read_format_lines(path)


def _root(data_dir: str | Path | None) -> Path:
    return Path(data_dir) if data_dir is not None else DATA_DIR


def ti_templates(data_dir: str | Path | None = None) -> tuple[str, ...]:
    """The 27 Textual Inversion templates every baseline uses for its diffusion loss."""
    return _format_lines(_root(data_dir) / "ti_templates.txt")


def diffusion_prompt(rng: np.random.Generator, concept_phrase: str,
                     data_dir: str | Path | None = None) -> str:
    """A uniform TI template filled with `concept_phrase` (e.g. "<dog6> dog")."""
    templates = ti_templates(data_dir)
    return templates[int(rng.integers(len(templates)))].format(concept_phrase)


def class_prompt(class_noun: str) -> str:
    """The DreamBooth / Custom Diffusion prior prompt, "a picture of a {class}"."""
    return CLASS_PROMPT.format(class_noun)


def eval_prompts(kind: str, concept_phrase: str | None = None,
                 data_dir: str | Path | None = None) -> list[str]:
    """The 25 DreamBench prompts for "living" or "nonliving" subjects, filled with `concept_phrase`
    (or left with `{}`)."""
    if kind not in ("living", "nonliving"):
        raise ValueError(f"unknown eval prompt kind {kind!r}; expected 'living' or 'nonliving'")
    lines = list(_format_lines(_root(data_dir) / f"eval_{kind}.txt"))
    return lines if concept_phrase is None else [s.format(concept_phrase) for s in lines]
