"""Template files and word lists, enumerated lazily.

A caption type is a few templates whose fields draw from word lists, so its lines are indexed by
mixed-radix arithmetic instead of being stored: 30k relation captions cost four small files, and a
uniform line is one random integer. The file syntax is described in `data/templates/pet.txt`.
"""

from __future__ import annotations

import bisect
import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).parent / "data"
SLOT = "<new1>"

_FIELD = re.compile(r"\{([^{}]*)\}")
_ANGLE = re.compile(r"<[^<>]*>")
_LIST_NAME = re.compile(r"[a-z0-9_]+")
_FORBIDDEN_IN_WORDS = set("<>{}|")


def read_lines(path: Path) -> list[tuple[int, str]]:
    """Non-blank lines that are not `#` comments, stripped, with their 1-based line numbers."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    lines = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        text = raw.strip()
        if text and not text.startswith("#"):
            lines.append((number, text))
    return lines


def read_words(path: Path) -> tuple[str, ...]:
    """A word list; duplicates and template syntax inside words are errors, since either would
    silently skew the uniform line distribution or the `<new1>` count of rendered captions."""
    words: dict[str, int] = {}
    for number, word in read_lines(path):
        if _FORBIDDEN_IN_WORDS & set(word):
            raise ValueError(f"{path}:{number}: word {word!r} contains one of <>{{}}|")
        if word in words:
            raise ValueError(f"{path}:{number}: duplicate word {word!r} (first on line {words[word]})")
        words[word] = number
    if not words:
        raise ValueError(f"{path}: word list is empty")
    return tuple(words)


def read_format_lines(path: Path) -> tuple[str, ...]:
    """A list of `{}` format strings (prefixes, TI templates, eval prompts), each with one `{}`."""
    lines = read_lines(path)
    for number, text in lines:
        if text.count("{}") != 1:
            raise ValueError(f"{path}:{number}: expected exactly one '{{}}' in {text!r}")
    if not lines:
        raise ValueError(f"{path}: no lines")
    return tuple(text for _, text in lines)


def with_article(phrase: str) -> str:
    """`phrase` with "a" or "an" by its sound, for the common English exceptions in our lists."""
    w = phrase.lower()
    vowel_sound = (w[0] in "aeiou" and not w.startswith(("uni", "use", "usu", "eu", "one"))) or (
        w.startswith(("hour", "honest", "heir"))
    )
    return ("an " if vowel_sound else "a ") + phrase


@dataclass(frozen=True)
class Template:
    """One template line: literal parts around fields; line `i` picks field choices by mixed radix
    (last field fastest), so lines are unique when the choices are."""

    source: str
    parts: tuple[str, ...]
    fields: tuple[tuple[str, ...], ...]
    size: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", math.prod(len(c) for c in self.fields))

    def render(self, index: int) -> str:
        picks = []
        for choices in reversed(self.fields):
            index, digit = divmod(index, len(choices))
            picks.append(choices[digit])
        out = [self.parts[0]]
        for pick, part in zip(reversed(picks), self.parts[1:]):
            out += [pick, part]
        return "".join(out)


class TemplateSet:
    """Caption types -> templates; a uniform type, then a uniform line of it, as the paper samples.

    `kept` optionally replaces a type's lines by a fixed list of line indices (the prompt-set-size
    ablation); `count` and sampling then see only those.
    """

    def __init__(self, templates: dict[str, list[Template]], kept: dict[str, np.ndarray] | None = None):
        self._templates = templates
        self._ends = {t: list(itertools.accumulate(x.size for x in ts)) for t, ts in templates.items()}
        self._kept = kept or {}
        self.types: list[str] = list(templates)

    @classmethod
    def from_file(cls, path: Path, words_dir: Path, slots: int) -> TemplateSet:
        """Parses and validates a template file: each template must hold `slots` `<new1>` slots;
        every error names the file and line."""
        path, words_dir = Path(path), Path(words_dir)
        cache: dict[str, tuple[str, ...]] = {}
        templates: dict[str, list[Template]] = {}
        for number, text in read_lines(path):
            where = f"{path}:{number}"
            kind, sep, body = text.partition(":")
            kind, body = kind.strip(), body.strip()
            if not sep or not _LIST_NAME.fullmatch(kind) or not body:
                raise ValueError(f"{where}: expected '<type>: <template>', got {text!r}")
            for tag in _ANGLE.findall(body):
                if tag != SLOT:
                    raise ValueError(f"{where}: unknown slot {tag} (only {SLOT} exists)")
            found = body.count(SLOT)
            if found != slots:
                what = f"has no {SLOT} slot" if found == 0 else f"has {found} {SLOT} slot" + "s" * (found > 1)
                raise ValueError(f"{where}: template {what}, expected {slots}: {body!r}")
            specs = _FIELD.findall(body)
            fields = tuple(_field_choices(s, words_dir, cache, where) for s in specs)
            parts = tuple(_FIELD.split(body)[::2])
            templates.setdefault(kind, []).append(Template(where, parts, fields))
        if not templates:
            raise ValueError(f"{path}: no templates")
        return cls(templates)

    def restrict(self, types: list[str] | None = None, per_type_size: int | None = None,
                 seed: int = 0) -> TemplateSet:
        """A copy with only `types` (kept in file order) and/or `per_type_size` lines per type,
        drawn with replacement (seeded), as in the paper's prompt-type and prompt-set-size ablations."""
        chosen = self.types if types is None else list(types)
        unknown = [t for t in chosen if t not in self._templates]
        if unknown or not chosen:
            raise ValueError(f"unknown or empty caption types {chosen!r}; valid: {self.types}")
        templates = {t: self._templates[t] for t in self.types if t in chosen}
        kept = {t: k for t, k in self._kept.items() if t in templates}
        if per_type_size is not None:
            if per_type_size < 1:
                raise ValueError(f"per_type_size must be >= 1, got {per_type_size}")
            rng = np.random.default_rng(seed)
            kept = {t: rng.integers(0, self.count(t), size=per_type_size) for t in templates}
            kept = {t: np.asarray([self._full_index(t, i) for i in k]) for t, k in kept.items()}
        return TemplateSet(templates, kept)

    def count(self, kind: str) -> int:
        if kind in self._kept:
            return len(self._kept[kind])
        return self._ends[kind][-1]

    @property
    def size(self) -> int:
        return sum(self.count(t) for t in self.types)

    def line(self, kind: str, index: int) -> str:
        if not 0 <= index < self.count(kind):
            raise IndexError(f"{kind} line {index} out of range [0, {self.count(kind)})")
        full = self._full_index(kind, index)
        ends = self._ends[kind]
        t = bisect.bisect_right(ends, full)
        return self._templates[kind][t].render(full - (ends[t - 1] if t else 0))

    def lines(self, kind: str) -> list[str]:
        return [self.line(kind, i) for i in range(self.count(kind))]

    def sample(self, rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
        """`n` independent (type, line) pairs: type uniform, then line uniform within the type."""
        type_ids = rng.integers(len(self.types), size=n)
        counts = np.asarray([self.count(t) for t in self.types], dtype=np.int64)
        indices = rng.integers(0, counts[type_ids])
        return [(self.types[t], self.line(self.types[t], int(i))) for t, i in zip(type_ids, indices)]

    def _full_index(self, kind: str, index: int) -> int:
        kept = self._kept.get(kind)
        return int(kept[index]) if kept is not None else int(index)


def _field_choices(spec: str, words_dir: Path, cache: dict[str, tuple[str, ...]],
                   where: str) -> tuple[str, ...]:
    """The choices of one `{...}` field: inline `x|y`, or word lists `[a:]l1+l2` (union)."""
    if "|" in spec:
        choices = tuple(c.strip() for c in spec.split("|"))
        if not all(choices):
            raise ValueError(f"{where}: empty inline choice in {{{spec}}}")
        return choices
    article = spec.startswith("a:")
    names = (spec[2:] if article else spec).split("+")
    words: list[str] = []
    for name in names:
        if not _LIST_NAME.fullmatch(name):
            raise ValueError(f"{where}: bad word-list name {name!r} in {{{spec}}}")
        if name not in cache:
            cache[name] = read_words(words_dir / f"{name}.txt")
        words += cache[name]
    if len(set(words)) != len(words):
        dup = next(w for w in words if words.count(w) > 1)
        raise ValueError(f"{where}: word {dup!r} appears in more than one list of {{{spec}}}")
    return tuple(with_article(w) for w in words) if article else tuple(words)
