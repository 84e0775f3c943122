"""The miniature world's vocabulary, its `Scene` (the ground truth of one picture) and scene sampling.

A scene is a subject (an object of some colour, or the novel concept with its fixed look) in one
background, optionally wearing an item, optionally in a spatial relation with a second object, in one
drawing style. Attribute values are plain English words the CLIP tokenizer knows, so captions of
scenes are ordinary text. A field left as ``None`` means "unspecified": prompts describe partial
scenes ("<new1> wearing a red hat" says nothing of the background), rendered scenes are complete.

Sampling is deterministic given a ``np.random.Generator``; pretraining samplers never draw the concept
unless asked to.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

OBJECTS = ("cat", "dog", "bird", "fish", "teapot", "cup", "ball", "car")
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "white")
BACKGROUNDS = ("beach", "grass", "snow", "night sky", "brick wall", "kitchen table")
WEARINGS = ("hat", "scarf", "crown", "sunglasses")
RELATIONS = ("next to", "on top of", "in front of")
STYLES = ("outline", "stripes", "dots", "pixel")
NONE = "none"  # explicitly absent: nothing worn, no second object, plain drawing

# The novel concept: a tall gooseneck teapot (teal body, yellow band and knob, arched top handle),
# an object kind pretraining never sees. Its class noun "teapot" is an ordinary world object, so
# generic teapots (round, one colour, side handle) serve as prior-preservation class images.
CONCEPT = "concept"
CONCEPT_CLASS = "teapot"
CONCEPT_TOKEN = "<teapot1>"
CONCEPT_PHRASE = f"{CONCEPT_TOKEN} {CONCEPT_CLASS}"
# The one context of the concept's few "photos".
CONCEPT_CONTEXT = {"background": "kitchen table", "wearing": NONE, "relation": NONE, "style": NONE}

# Every attribute the evaluator reads, with its classes. `None`-able companions (colours of the
# worn item and of the second object) only exist when their item/object does.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "object": OBJECTS + (CONCEPT,),
    "color": COLORS,
    "background": BACKGROUNDS,
    "wearing": (NONE,) + WEARINGS,
    "wearing_color": COLORS,
    "relation": (NONE,) + RELATIONS,
    "second_object": OBJECTS,
    "second_color": COLORS,
    "style": (NONE,) + STYLES,
}
# Attributes that describe the context rather than the subject's identity.
CONTEXT_ATTRIBUTES = ("background", "wearing", "wearing_color", "relation", "second_object",
                      "second_color", "style")

SHIFT = 3  # layout jitter: the composition moves by up to SHIFT/32 of the canvas each way
# Probability that an optional attribute is absent ("none") in a sampled scene.
P_NONE = 0.4


@dataclasses.dataclass(frozen=True)
class Scene:
    """One picture's ground truth (``None`` fields: unspecified) plus its layout jitter."""

    object: str | None = None
    color: str | None = None
    background: str | None = None
    wearing: str | None = None
    wearing_color: str | None = None
    relation: str | None = None
    second_object: str | None = None
    second_color: str | None = None
    style: str | None = None
    dx: int = 0
    dy: int = 0
    flip: bool = False

    def __post_init__(self) -> None:
        for name, values in ATTRIBUTES.items():
            value = getattr(self, name)
            if value is not None and value not in values:
                raise ValueError(f"Scene.{name}={value!r} is not one of {values}")
        if self.object == CONCEPT and self.color is not None:
            raise ValueError("the concept has a fixed look; its Scene.color must be None")
        if self.wearing == NONE and self.wearing_color is not None:
            raise ValueError("Scene.wearing_color given but nothing is worn")
        if self.relation == NONE and (self.second_object, self.second_color) != (None, None):
            raise ValueError("Scene.second_object/second_color given without a relation")
        if max(abs(self.dx), abs(self.dy)) > SHIFT:
            raise ValueError(f"Scene.dx, dy must be within [-{SHIFT}, {SHIFT}]")

    @property
    def attributes(self) -> dict[str, str | None]:
        """The attribute fields (no layout), ``None`` where unspecified or not applicable."""
        return {name: getattr(self, name) for name in ATTRIBUTES}

    @property
    def is_concept(self) -> bool:
        return self.object == CONCEPT

    @property
    def complete(self) -> bool:
        """Whether every attribute that applies is given, i.e. the scene can be rendered."""
        return all(getattr(self, name) is not None for name in applicable(self))


def applicable(scene: Scene) -> tuple[str, ...]:
    """The attributes that exist in `scene`: no colour for the concept, no worn-item colour when
    nothing is worn, no second object without a relation."""
    names = ["object", "background", "wearing", "relation", "style"]
    if scene.object != CONCEPT:
        names.append("color")
    if scene.wearing != NONE:
        names.append("wearing_color")
    if scene.relation != NONE:
        names += ["second_object", "second_color"]
    return tuple(n for n in ATTRIBUTES if n in names)


def _pick(rng: np.random.Generator, values: tuple[str, ...]) -> str:
    return values[int(rng.integers(len(values)))]


def _maybe(rng: np.random.Generator, values: tuple[str, ...]) -> str:
    return NONE if rng.random() < P_NONE else _pick(rng, values)


def complete(scene: Scene, rng: np.random.Generator, *, include_concept: bool = False) -> Scene:
    """`scene` with every unspecified attribute and its layout jitter drawn from `rng`.

    The draw order is fixed, and every field consumes its random numbers whether or not it is
    given, so a field's value never shifts the others' draws.
    """
    objects = OBJECTS + ((CONCEPT,) if include_concept else ())
    drawn = {
        "object": _pick(rng, objects), "color": _pick(rng, COLORS), "background": _pick(rng, BACKGROUNDS),
        "wearing": _maybe(rng, WEARINGS), "wearing_color": _pick(rng, COLORS),
        "relation": _maybe(rng, RELATIONS), "second_object": _pick(rng, OBJECTS),
        "second_color": _pick(rng, COLORS), "style": _maybe(rng, STYLES),
    }
    dx, dy = (int(v) for v in rng.integers(-SHIFT, SHIFT + 1, size=2))
    flip = bool(rng.integers(2))
    values = {k: v if getattr(scene, k) is None else getattr(scene, k) for k, v in drawn.items()}
    if values["object"] == CONCEPT:
        values["color"] = None
    if values["wearing"] == NONE:
        values["wearing_color"] = None
    if values["relation"] == NONE:
        values["second_object"] = values["second_color"] = None
    return Scene(**values, dx=dx, dy=dy, flip=flip)


def sample_scene(rng: np.random.Generator, *, include_concept: bool = False, **given: str) -> Scene:
    """A complete random scene; `given` fixes attributes (e.g. ``background="snow"``).

    Pretraining samplers keep ``include_concept=False``: the concept must stay novel.
    """
    return complete(Scene(**given), rng, include_concept=include_concept)


def sample_scenes(rng: np.random.Generator, n: int, *, include_concept: bool = False,
                  **given: str) -> list[Scene]:
    """`n` independent `sample_scene` draws (never the concept unless `include_concept`)."""
    return [sample_scene(rng, include_concept=include_concept, **given) for _ in range(n)]


def concept_scene(rng: np.random.Generator, context: Mapping[str, str] | None = None) -> Scene:
    """The concept in `context` (attribute -> value; default: its one training context
    `CONCEPT_CONTEXT`), other attributes and the layout jitter drawn from `rng`."""
    context = CONCEPT_CONTEXT if context is None else context
    return sample_scene(rng, object=CONCEPT, **context)


def sample_concept_scenes(rng: np.random.Generator, n: int,
                          context: Mapping[str, str] | None = None) -> list[Scene]:
    """`n` concept "photos": by default all in the one training context, differing only in layout.
    Pass ``context={}`` for the concept in random contexts (evaluator training, ground truth)."""
    return [concept_scene(rng, context) for _ in range(n)]


def sample_class_scenes(rng: np.random.Generator, n: int) -> list[Scene]:
    """Generic members of the concept's class (prior preservation) in random contexts."""
    return sample_scenes(rng, n, object=CONCEPT_CLASS)
