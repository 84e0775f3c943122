"""Captions of scenes, the world's prompt set, and prompts parsed back into scenes.

A caption is the subject ("a red cat", or the concept's placeholder `<new1>`) followed by a phrase
per context attribute; each phrase has a few paraphrase forms ("wearing a blue hat", "in a blue hat"),
and a seeded `rng` picks among them so a text encoder sees variety. The prompt set under `data/`
(`templates/world.txt`, same layout and syntax as `mlmjax/prompts/data`) is exactly the set of
paraphrases of every one-attribute context of the concept, so every prompt maps back to a `Scene`
(`scene_from_prompt`) and a generated image can be scored for the context it was asked for.

Held-out contexts: `split_contexts` deterministically keeps a quarter of each type's contexts (never
the concept photos' own context) for evaluation only; `templates/world_train.txt` holds the rest and
`eval_world.txt` the held-out ones. ``python -m mlmjax.world.captions --write DIR`` regenerates the
derived files (word lists, `world_train.txt`, `eval_world.txt`) from this module.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from mlmjax import files
from mlmjax.prompts.prompt_set import WORLD_DATA_DIR, WORLD_FAMILY, PromptSet, family_data_dir
from mlmjax.prompts.templates import SLOT, read_format_lines, with_article
from mlmjax.world.scene import (BACKGROUNDS, COLORS, CONCEPT, CONCEPT_CONTEXT, CONCEPT_PHRASE,
                                CONCEPT_TOKEN, NONE, OBJECTS, RELATIONS, STYLES, WEARINGS, Scene)

DATA_DIR = WORLD_DATA_DIR  # data/ next to this module
FAMILY = WORLD_FAMILY
TYPES = ("backgrounds", "wearings", "relations", "styles")

# The natural phrase for each background; the other form is "with the {background} in the background".
PLACES = {"beach": "on the beach", "grass": "on the grass", "snow": "in the snow",
          "night sky": "under the night sky", "brick wall": "against a brick wall",
          "kitchen table": "on the kitchen table"}
WEARING_VERBS = ("wearing", "in", "with")
STYLE_VERBS = ("in", "captured in", "depicted in", "rendered in", "drawn in")
PLURAL_WEARINGS = frozenset({"sunglasses"})  # no article: "wearing red sunglasses"
PREFIXES = ("a photo of a {}", "a picture of a {}", "an image of a {}", "a drawing of a {}",
            "a rendering of a {}", "a close-up photo of a {}")

HELDOUT_FRACTION = 0.25
SPLIT_SEED = 7


# --- scene -> text -----------------------------------------------------------------------------------

def _thing(color: str | None, noun: str, plural: bool = False) -> str:
    phrase = noun if color is None else f"{color} {noun}"
    return phrase if plural else with_article(phrase)


def subject_phrase(scene: Scene, concept_phrase: str = SLOT) -> str:
    """ "a red cat", or `concept_phrase` for the concept."""
    if scene.object is None:
        raise ValueError("a caption needs the scene's object")
    return concept_phrase if scene.object == CONCEPT else _thing(scene.color, scene.object)


def context_forms(scene: Scene) -> list[tuple[str, ...]]:
    """For each context attribute the scene specifies (and is not "none"), its paraphrase forms, in
    caption order: wearing, relation, background, style."""
    forms = []
    if scene.wearing not in (None, NONE):
        item = _thing(scene.wearing_color, scene.wearing, scene.wearing in PLURAL_WEARINGS)
        forms.append(tuple(f"{verb} {item}" for verb in WEARING_VERBS))
    if scene.relation not in (None, NONE):
        if scene.second_object is None:
            raise ValueError("a relation caption needs the second object")
        forms.append((f"{scene.relation} {_thing(scene.second_color, scene.second_object)}",))
    if scene.background is not None:
        forms.append((PLACES[scene.background], f"with the {scene.background} in the background"))
    if scene.style not in (None, NONE):
        forms.append(tuple(f"{verb} the {scene.style} style" for verb in STYLE_VERBS))
    return forms


def caption(scene: Scene, rng: np.random.Generator | None = None, concept_phrase: str = SLOT) -> str:
    """An English caption of `scene`: the first form of every phrase, or forms drawn from `rng`.

    The concept is written as `concept_phrase` (default the prompt set's `<new1>`; pass
    `CONCEPT_PHRASE` for "<teapot1> teapot").
    """
    parts = [subject_phrase(scene, concept_phrase)]
    for forms in context_forms(scene):
        parts.append(forms[0] if rng is None else forms[int(rng.integers(len(forms)))])
    return " ".join(parts)


def paraphrases(scene: Scene, concept_phrase: str = SLOT) -> list[str]:
    """Every caption of `scene` (all combinations of its phrases' forms)."""
    captions = [subject_phrase(scene, concept_phrase)]
    for forms in context_forms(scene):
        captions = [f"{c} {f}" for c in captions for f in forms]
    return captions


# --- the prompt set's contexts and their split ---------------------------------------------------

def contexts(kind: str) -> list[Scene]:
    """Every one-attribute context of the concept for caption type `kind` (a Scene with only that
    context specified), in a fixed order."""
    if kind == "backgrounds":
        return [Scene(object=CONCEPT, background=b) for b in BACKGROUNDS]
    if kind == "wearings":
        return [Scene(object=CONCEPT, wearing=w, wearing_color=c) for w in WEARINGS for c in COLORS]
    if kind == "relations":
        return [Scene(object=CONCEPT, relation=r, second_object=o, second_color=c)
                for r in RELATIONS for c in COLORS for o in OBJECTS]
    if kind == "styles":
        return [Scene(object=CONCEPT, style=s) for s in STYLES]
    raise ValueError(f"unknown caption type {kind!r}; expected one of {TYPES}")


def _in_photos(context: Scene) -> bool:
    return all(getattr(context, k) in (None, v) for k, v in CONCEPT_CONTEXT.items())


def split_contexts(kind: str) -> tuple[list[Scene], list[Scene]]:
    """(train, held-out) contexts of `kind`: a fixed random `HELDOUT_FRACTION` (at least one) is
    held out for evaluation; the concept photos' own context is never held out."""
    candidates = [c for c in contexts(kind) if not _in_photos(c)]
    order = np.random.default_rng([SPLIT_SEED, TYPES.index(kind)]).permutation(len(candidates))
    heldout = {candidates[i] for i in order[:max(1, round(HELDOUT_FRACTION * len(candidates)))]}
    return [c for c in contexts(kind) if c not in heldout], [c for c in contexts(kind) if c in heldout]


def world_prompt_set(split: str = "all", data_dir: str | Path | None = None) -> PromptSet:
    """The world's MLM prompt set: "all" contexts, or the "train" split that customization runs use
    (`PromptSet.load("world")`: the held-out contexts left out)."""
    if split not in ("all", "train"):
        raise ValueError(f"unknown split {split!r}; expected 'all' or 'train'")
    if split == "train":
        return PromptSet.load(FAMILY, data_dir)
    return PromptSet.from_folder(FAMILY, family_data_dir(FAMILY, data_dir), FAMILY)


def eval_prompts(concept_phrase: str = CONCEPT_PHRASE, data_dir: str | Path | None = None) -> list[str]:
    """The held-out evaluation prompts, one per held-out context, filled with `concept_phrase`."""
    root = Path(data_dir) if data_dir is not None else DATA_DIR
    return [line.format(concept_phrase) for line in read_format_lines(root / "eval_world.txt")]


# --- text -> scene -------------------------------------------------------------------------------

def _alternatives(words: Sequence[str]) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_COLOR = rf"(?:an? )?(?:({_alternatives(COLORS)}) )?"
_PATTERNS = {
    "wearing": re.compile(rf"\b(?:{_alternatives(WEARING_VERBS)}) {_COLOR}({_alternatives(WEARINGS)})\b"),
    "relation": re.compile(rf"\b({_alternatives(RELATIONS)}) {_COLOR}({_alternatives(OBJECTS)})\b"),
    "place": re.compile(rf"\b({_alternatives(PLACES.values())})\b"),
    "background": re.compile(rf"\bwith the ({_alternatives(BACKGROUNDS)}) in the background\b"),
    "style": re.compile(rf"\b(?:{_alternatives(STYLE_VERBS)}) the ({_alternatives(STYLES)}) style\b"),
    "subject": re.compile(rf"\b{_COLOR}({_alternatives(OBJECTS)})\b"),
}
_BACKGROUND_OF_PLACE = {p: b for b, p in PLACES.items()}


def _take(pattern: str, text: str) -> tuple[tuple[str | None, ...] | None, str]:
    """The groups of the one match of `pattern` and `text` with it blanked out; two matches are an
    error (a caption names each attribute once)."""
    matches = list(_PATTERNS[pattern].finditer(text))
    if len(matches) > 1:
        raise ValueError(f"ambiguous prompt: {len(matches)} {pattern} phrases in {text!r}")
    if not matches:
        return None, text
    m = matches[0]
    return m.groups(), text[:m.start()] + " | " + text[m.end():]


def scene_from_prompt(prompt: str, concept_phrase: str = CONCEPT_PHRASE) -> Scene:
    """The (partial) scene a caption or prompt asks for; attributes it does not mention stay None.

    The concept is recognised as `SLOT`, `concept_phrase` or the bare concept token.
    """
    text = prompt.lower()
    fields: dict[str, str | None] = {}
    for marker in (SLOT, concept_phrase.lower(), CONCEPT_TOKEN):
        if marker in text:
            fields["object"] = CONCEPT
            text = text.replace(marker, " | ")
            break
    found, text = _take("wearing", text)
    if found:
        fields["wearing_color"], fields["wearing"] = found
    found, text = _take("relation", text)
    if found:
        fields["relation"], fields["second_color"], fields["second_object"] = found
    place, text = _take("place", text)
    background, text = _take("background", text)
    if place and background:
        raise ValueError(f"ambiguous prompt: two backgrounds in {prompt!r}")
    if place or background:
        fields["background"] = _BACKGROUND_OF_PLACE[place[0]] if place else background[0]
    found, text = _take("style", text)
    if found:
        fields["style"] = found[0]
    if "object" not in fields:
        found, text = _take("subject", text)
        if not found:
            raise ValueError(f"no subject (an object of the world or the concept) in {prompt!r}")
        fields["color"], fields["object"] = found
    return Scene(**fields)


# --- the derived data files --------------------------------------------------------------------------

WORD_LISTS = {"colors": COLORS, "objects": OBJECTS, "backgrounds": BACKGROUNDS,
              "places": tuple(PLACES[b] for b in BACKGROUNDS),
              "wearings": tuple(w for w in WEARINGS if w not in PLURAL_WEARINGS),
              "relations": RELATIONS, "styles": STYLES}


def _kind_of(context: Scene) -> str:
    return next(k for k in TYPES if context in contexts(k))


def _template_line(context: Scene) -> str:
    """One template line whose inline choices are exactly `context`'s paraphrases."""
    (forms,) = context_forms(context)
    body = forms[0] if len(forms) == 1 else "{" + "|".join(forms) + "}"
    return f"{_kind_of(context)}: {SLOT} {body}"


def derived_files() -> dict[str, str]:
    """Relative path -> contents of every file of `data/` that this module generates."""
    out = {f"words/{name}.txt": "\n".join(words) + "\n" for name, words in WORD_LISTS.items()}
    out["mlm_prefixes.txt"] = "# Framings put around a whole MLM caption.\n" + "\n".join(PREFIXES) + "\n"
    train, heldout = zip(*(split_contexts(k) for k in TYPES))
    out["templates/world_train.txt"] = (
        "# Generated by `python -m mlmjax.world.captions --write`: the world prompt set without the\n"
        "# held-out evaluation contexts (eval_world.txt), one context a line.\n"
        + "\n".join(_template_line(c) for group in train for c in group) + "\n")
    out["eval_world.txt"] = (
        "# Generated by `python -m mlmjax.world.captions --write`: one prompt per held-out context;\n"
        "# {} is the concept phrase (\"<teapot1> teapot\").\n"
        + "\n".join(caption(c, concept_phrase="{}") for group in heldout for c in group) + "\n")
    return out


def write_derived_files(data_dir: str | Path = DATA_DIR) -> None:
    for relative, text in derived_files().items():
        path = os.path.join(data_dir, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        files.write_text_atomic(path, text)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="World captions: print samples or regenerate data/.")
    parser.add_argument("--write", metavar="DIR", help="(re)write the derived data files under DIR")
    parser.add_argument("--n", type=int, default=10, help="sample captions to print")
    args = parser.parse_args(argv)
    if args.write:
        write_derived_files(args.write)
        print(f"wrote {len(derived_files())} files under {args.write}")
        return
    from mlmjax.world.scene import sample_scenes

    rng = np.random.default_rng(0)
    for s in sample_scenes(rng, args.n):
        print(caption(s, rng))


if __name__ == "__main__":
    main()
