"""Draws a `Scene` with PIL: bold glyphs, saturated colours, legible at 32x32.

Everything is drawn on a canvas `SUPERSAMPLE` times larger than the output and box-filtered down, so
a scene looks the same (up to resolution) at 32 px, the tiny model's size, and at 64 px for figures.
Geometry is in canvas units ([0, 1] on both axes, y down). The same scene always gives the same bytes.

``python -m mlmjax.world.render --out grid.png`` writes a labelled grid of sample scenes.
"""

from __future__ import annotations

import argparse
import math
import textwrap
from typing import Callable, NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageDraw

from mlmjax import files
from mlmjax.world import captions
from mlmjax.world import scene as scene_lib
from mlmjax.world.scene import CONCEPT, NONE, Scene

SIZE = 32
SUPERSAMPLE = 4

RGB = tuple[int, int, int]
PALETTE: dict[str, RGB] = {
    "red": (220, 30, 30), "orange": (250, 140, 0), "yellow": (250, 225, 0), "green": (30, 175, 40),
    "blue": (30, 80, 235), "purple": (140, 40, 200), "pink": (250, 120, 200), "white": (250, 250, 250),
}
DARK: RGB = (25, 25, 30)
CONCEPT_BODY: RGB = (0, 160, 160)  # teal: no colour word of the world names it
CONCEPT_ACCENT: RGB = (250, 210, 40)


class Box(NamedTuple):
    """A glyph's square in canvas units: left, top, side."""

    x: float
    y: float
    s: float

    def shifted(self, dx: float, dy: float) -> Box:
        return Box(self.x + dx, self.y + dy, self.s)


class Pen:
    """Draws in a box's own unit square ([0, 1]², y down) onto a square RGBA layer."""

    def __init__(self, layer: Image.Image, box: Box):
        self.draw = ImageDraw.Draw(layer)
        self.scale = layer.width
        self.box = box

    def xy(self, u: float, v: float) -> tuple[float, float]:
        return ((self.box.x + u * self.box.s) * self.scale, (self.box.y + v * self.box.s) * self.scale)

    def width(self, w: float) -> int:
        return max(1, round(w * self.box.s * self.scale))

    def ellipse(self, u0: float, v0: float, u1: float, v1: float, fill: RGB) -> None:
        self.draw.ellipse([*self.xy(u0, v0), *self.xy(u1, v1)], fill=fill)

    def rect(self, u0: float, v0: float, u1: float, v1: float, fill: RGB) -> None:
        self.draw.rectangle([*self.xy(u0, v0), *self.xy(u1, v1)], fill=fill)

    def poly(self, points: Sequence[tuple[float, float]], fill: RGB) -> None:
        self.draw.polygon([self.xy(u, v) for u, v in points], fill=fill)

    def line(self, points: Sequence[tuple[float, float]], fill: RGB, width: float) -> None:
        self.draw.line([self.xy(u, v) for u, v in points], fill=fill, width=self.width(width), joint="curve")

    def arc(self, u0: float, v0: float, u1: float, v1: float, start: float, end: float, fill: RGB,
            width: float) -> None:
        self.draw.arc([*self.xy(u0, v0), *self.xy(u1, v1)], start, end, fill=fill, width=self.width(width))


class Anchor(NamedTuple):
    """Where a worn item sits, in the glyph's unit square: centre x, y and the item's width."""

    u: float
    v: float
    w: float


class Glyph(NamedTuple):
    draw: Callable[[Pen, RGB, RGB], None]  # (pen, body colour, accent colour)
    top: Anchor  # hat, crown
    eyes: Anchor  # sunglasses
    neck: Anchor  # scarf


# --- glyphs: each a distinct silhouette; dark details (eyes, wheels) help at 32 px --------------

def _cat(p: Pen, body: RGB, _: RGB) -> None:
    p.ellipse(0.22, 0.52, 0.78, 1.0, body)  # body
    p.line([(0.72, 0.9), (0.95, 0.75), (0.9, 0.45)], body, 0.09)  # tail
    p.poly([(0.18, 0.32), (0.22, 0.06), (0.42, 0.22)], body)  # ears
    p.poly([(0.82, 0.32), (0.78, 0.06), (0.58, 0.22)], body)
    p.ellipse(0.16, 0.14, 0.84, 0.62, body)  # head
    p.ellipse(0.3, 0.32, 0.4, 0.42, DARK)
    p.ellipse(0.6, 0.32, 0.7, 0.42, DARK)


def _dog(p: Pen, body: RGB, _: RGB) -> None:
    p.rect(0.1, 0.45, 0.72, 0.75, body)  # trunk
    for u in (0.12, 0.28, 0.52, 0.64):
        p.rect(u, 0.7, u + 0.1, 0.98, body)  # legs
    p.line([(0.14, 0.5), (0.02, 0.25)], body, 0.08)  # tail
    p.ellipse(0.52, 0.14, 0.92, 0.52, body)  # head
    p.rect(0.8, 0.3, 1.0, 0.48, body)  # snout
    p.ellipse(0.93, 0.3, 1.0, 0.38, DARK)  # nose
    p.poly([(0.55, 0.2), (0.66, 0.18), (0.6, 0.5), (0.5, 0.45)], DARK)  # floppy ear
    p.ellipse(0.74, 0.24, 0.82, 0.32, DARK)


def _bird(p: Pen, body: RGB, _: RGB) -> None:
    p.poly([(0.25, 0.55), (0.0, 0.4), (0.02, 0.72)], body)  # tail
    p.ellipse(0.15, 0.3, 0.82, 0.85, body)
    p.poly([(0.8, 0.45), (1.0, 0.52), (0.8, 0.6)], (250, 150, 0) if body != PALETTE["orange"] else DARK)
    p.ellipse(0.62, 0.42, 0.7, 0.5, DARK)
    p.arc(0.28, 0.45, 0.62, 0.78, 20, 160, DARK, 0.05)  # wing
    p.line([(0.42, 0.84), (0.42, 1.0)], DARK, 0.04)
    p.line([(0.56, 0.84), (0.56, 1.0)], DARK, 0.04)


def _fish(p: Pen, body: RGB, _: RGB) -> None:
    p.poly([(0.68, 0.55), (1.0, 0.25), (1.0, 0.85)], body)  # tail fin
    p.poly([(0.35, 0.35), (0.5, 0.18), (0.6, 0.38)], body)  # dorsal fin
    p.ellipse(0.02, 0.32, 0.78, 0.78, body)
    p.ellipse(0.16, 0.45, 0.26, 0.55, DARK)
    p.arc(0.3, 0.38, 0.5, 0.72, 300, 60, DARK, 0.04)  # gill


def _teapot(p: Pen, body: RGB, _: RGB) -> None:
    p.arc(0.0, 0.45, 0.36, 0.85, 90, 270, body, 0.1)  # side handle
    p.poly([(0.7, 0.6), (0.98, 0.38), (1.0, 0.45), (0.78, 0.8)], body)  # short spout
    p.ellipse(0.12, 0.4, 0.88, 1.0, body)  # round, squat body
    p.ellipse(0.32, 0.3, 0.68, 0.48, body)  # lid
    p.ellipse(0.44, 0.2, 0.56, 0.32, DARK)  # knob
    p.line([(0.2, 0.62), (0.8, 0.62)], DARK, 0.03)


def _cup(p: Pen, body: RGB, _: RGB) -> None:
    p.arc(0.55, 0.42, 0.98, 0.82, 270, 90, body, 0.1)  # handle
    p.poly([(0.08, 0.28), (0.76, 0.28), (0.68, 0.98), (0.16, 0.98)], body)
    p.rect(0.08, 0.28, 0.76, 0.36, DARK)  # rim


def _ball(p: Pen, body: RGB, _: RGB) -> None:
    p.ellipse(0.08, 0.16, 0.92, 1.0, body)
    p.arc(-0.3, 0.16, 0.5, 1.0, 300, 60, DARK, 0.05)  # seams
    p.arc(0.5, 0.16, 1.3, 1.0, 120, 240, DARK, 0.05)


def _car(p: Pen, body: RGB, _: RGB) -> None:
    p.poly([(0.22, 0.52), (0.32, 0.28), (0.7, 0.28), (0.82, 0.52)], body)  # cabin
    p.rect(0.0, 0.5, 1.0, 0.82, body)
    p.poly([(0.3, 0.5), (0.37, 0.34), (0.49, 0.34), (0.49, 0.5)], (200, 230, 250))  # windows
    p.poly([(0.54, 0.5), (0.54, 0.34), (0.66, 0.34), (0.74, 0.5)], (200, 230, 250))
    p.ellipse(0.1, 0.7, 0.36, 0.96, DARK)  # wheels
    p.ellipse(0.64, 0.7, 0.9, 0.96, DARK)


def _concept(p: Pen, body: RGB, accent: RGB) -> None:
    """A tall gooseneck teapot: long rising spout, arched top handle, banded pear-shaped body."""
    p.arc(0.2, 0.02, 0.8, 0.62, 180, 360, DARK, 0.07)  # handle over the top
    p.line([(0.62, 0.8), (0.86, 0.62), (0.98, 0.3)], body, 0.09)  # gooseneck spout
    p.ellipse(0.24, 0.46, 0.76, 1.0, body)  # pear body: round base ...
    p.poly([(0.34, 0.3), (0.66, 0.3), (0.74, 0.7), (0.26, 0.7)], body)  # ... tall neck
    p.rect(0.27, 0.56, 0.73, 0.66, accent)  # band
    p.rect(0.44, 0.16, 0.56, 0.3, accent)  # tall knob


GLYPHS: dict[str, Glyph] = {
    "cat": Glyph(_cat, Anchor(0.5, 0.16, 0.7), Anchor(0.5, 0.37, 0.7), Anchor(0.5, 0.62, 0.55)),
    "dog": Glyph(_dog, Anchor(0.72, 0.16, 0.45), Anchor(0.8, 0.28, 0.38), Anchor(0.62, 0.52, 0.32)),
    "bird": Glyph(_bird, Anchor(0.55, 0.32, 0.5), Anchor(0.64, 0.46, 0.38), Anchor(0.6, 0.64, 0.45)),
    "fish": Glyph(_fish, Anchor(0.3, 0.36, 0.4), Anchor(0.22, 0.5, 0.34), Anchor(0.42, 0.55, 0.28)),
    "teapot": Glyph(_teapot, Anchor(0.5, 0.22, 0.55), Anchor(0.5, 0.72, 0.6), Anchor(0.5, 0.46, 0.6)),
    "cup": Glyph(_cup, Anchor(0.42, 0.28, 0.7), Anchor(0.42, 0.55, 0.6), Anchor(0.42, 0.45, 0.65)),
    "ball": Glyph(_ball, Anchor(0.5, 0.18, 0.6), Anchor(0.5, 0.45, 0.65), Anchor(0.5, 0.72, 0.75)),
    "car": Glyph(_car, Anchor(0.5, 0.28, 0.5), Anchor(0.5, 0.42, 0.55), Anchor(0.5, 0.56, 0.8)),
    CONCEPT: Glyph(_concept, Anchor(0.5, 0.16, 0.5), Anchor(0.5, 0.45, 0.45), Anchor(0.5, 0.36, 0.45)),
}


# --- worn items, drawn plain over the styled subject ---------------------------------------------

def _hat(p: Pen, a: Anchor, color: RGB) -> None:
    p.rect(a.u - 0.5 * a.w, a.v - 0.07, a.u + 0.5 * a.w, a.v, color)  # brim
    p.rect(a.u - 0.28 * a.w, a.v - 0.34, a.u + 0.28 * a.w, a.v - 0.04, color)
    p.rect(a.u - 0.28 * a.w, a.v - 0.12, a.u + 0.28 * a.w, a.v - 0.07, DARK)  # band


def _crown(p: Pen, a: Anchor, color: RGB) -> None:
    l, r, v = a.u - 0.42 * a.w, a.u + 0.42 * a.w, a.v
    p.poly([(l, v), (l, v - 0.3), (l + 0.21 * a.w, v - 0.14), (a.u, v - 0.34),
            (r - 0.21 * a.w, v - 0.14), (r, v - 0.3), (r, v)], color)


def _scarf(p: Pen, a: Anchor, color: RGB) -> None:
    p.rect(a.u - 0.5 * a.w, a.v - 0.06, a.u + 0.5 * a.w, a.v + 0.06, color)
    p.rect(a.u + 0.05, a.v, a.u + 0.17, a.v + 0.3, color)  # hanging end


def _sunglasses(p: Pen, a: Anchor, color: RGB) -> None:
    r = 0.25 * a.w
    p.line([(a.u - a.w / 2, a.v), (a.u + a.w / 2, a.v)], DARK, 0.05)
    p.ellipse(a.u - a.w / 2, a.v - r, a.u - a.w / 2 + 2 * r, a.v + r, color)
    p.ellipse(a.u + a.w / 2 - 2 * r, a.v - r, a.u + a.w / 2, a.v + r, color)


WEARING_DRAW = {"hat": (_hat, "top"), "crown": (_crown, "top"), "scarf": (_scarf, "neck"),
                "sunglasses": (_sunglasses, "eyes")}


# --- backgrounds ---------------------------------------------------------------------------------

def _sky_and_ground(d: ImageDraw.ImageDraw, n: int, sky: RGB, ground: RGB, horizon: float) -> None:
    d.rectangle([0, 0, n, n], fill=sky)
    d.rectangle([0, round(horizon * n), n, n], fill=ground)


def _beach(d: ImageDraw.ImageDraw, n: int) -> None:
    _sky_and_ground(d, n, (140, 205, 250), (240, 212, 140), 0.6)
    d.rectangle([0, round(0.45 * n), n, round(0.6 * n)], fill=(20, 110, 200))  # sea
    d.ellipse([0.74 * n, 0.06 * n, 0.94 * n, 0.26 * n], fill=(255, 235, 60))  # sun


def _grass(d: ImageDraw.ImageDraw, n: int) -> None:
    _sky_and_ground(d, n, (175, 225, 255), (60, 150, 50), 0.5)
    for i in range(16):  # blades
        x = (i + 0.5) / 16 * n
        for v in (0.6, 0.8):
            y = (v + 0.06 * (i % 2)) * n
            d.line([x, y, x + 0.02 * n, y - 0.07 * n], fill=(25, 95, 25), width=max(1, n // 64))


def _snow(d: ImageDraw.ImageDraw, n: int) -> None:
    _sky_and_ground(d, n, (160, 172, 195), (236, 242, 252), 0.55)
    for i in range(12):  # flakes
        x, y = ((i * 0.37) % 1) * n, (0.04 + (i * 0.23) % 0.46) * n
        d.ellipse([x, y, x + 0.035 * n, y + 0.035 * n], fill=(255, 255, 255))


def _night_sky(d: ImageDraw.ImageDraw, n: int) -> None:
    _sky_and_ground(d, n, (12, 18, 60), (40, 40, 55), 0.88)
    for i in range(14):  # stars
        x, y = ((i * 0.41 + 0.05) % 1) * n, (0.03 + (i * 0.29) % 0.8) * n
        d.rectangle([x, y, x + 0.03 * n, y + 0.03 * n], fill=(255, 255, 200))
    d.ellipse([0.06 * n, 0.05 * n, 0.26 * n, 0.25 * n], fill=(245, 240, 180))  # crescent moon
    d.ellipse([0.12 * n, 0.03 * n, 0.3 * n, 0.21 * n], fill=(12, 18, 60))


def _brick_wall(d: ImageDraw.ImageDraw, n: int) -> None:
    _sky_and_ground(d, n, (215, 205, 195), (120, 120, 125), 0.88)
    rows = 8
    for r in range(7):
        y0, y1 = r / rows * n, (r + 1) / rows * n - 0.03 * n
        offset = 0.125 * (r % 2)
        for c in range(-1, 4):
            x0 = (c / 4 + offset) * n
            d.rectangle([x0 + 0.015 * n, y0 + 0.015 * n, x0 + n / 4 - 0.015 * n, y1], fill=(175, 65, 45))


def _kitchen_table(d: ImageDraw.ImageDraw, n: int) -> None:
    _sky_and_ground(d, n, (245, 236, 205), (165, 100, 50), 0.6)
    for v in (0.72, 0.86):  # planks
        d.line([0, v * n, n, v * n], fill=(110, 60, 25), width=max(1, n // 48))
    for u in (0.1, 0.45, 0.8):  # wall tiles
        d.rectangle([u * n, 0.15 * n, (u + 0.14) * n, 0.3 * n], fill=(150, 200, 215))


BACKGROUND_DRAW: dict[str, Callable[[ImageDraw.ImageDraw, int], None]] = {
    "beach": _beach, "grass": _grass, "snow": _snow, "night sky": _night_sky,
    "brick wall": _brick_wall, "kitchen table": _kitchen_table,
}


# --- composition ---------------------------------------------------------------------------------

def layout(relation: str) -> tuple[Box, Box | None]:
    """The subject's box and the second object's (drawn first, so the subject is in front).

    The subject is always the larger glyph: that is how a reader tells "a cat on top of a dog" from
    "a dog on top of a cat" at 32 px.
    """
    if relation == NONE:
        return Box(0.22, 0.3, 0.56), None
    if relation == "next to":
        return Box(0.04, 0.44, 0.46), Box(0.58, 0.56, 0.36)
    if relation == "on top of":
        return Box(0.3, 0.2, 0.4), Box(0.34, 0.62, 0.32)
    if relation == "in front of":
        return Box(0.14, 0.46, 0.46), Box(0.48, 0.14, 0.42)
    raise ValueError(f"unknown relation {relation!r}")


def _ring(alpha: Image.Image, thickness: int) -> Image.Image:
    """The band of `alpha`'s silhouette within `thickness` px of its edge (outside the canvas counts
    as transparent). A separable min filter: PIL's MinFilter costs (2t+1)² per pixel, this 2(2t+1)."""
    a = np.asarray(alpha)
    h, w = a.shape
    padded = np.pad(a, thickness)
    rows = padded[:, :w].copy()
    for k in range(1, 2 * thickness + 1):  # min over 2t+1 pixels of a row ...
        np.minimum(rows, padded[:, k:k + w], out=rows)
    inner = rows[:h].copy()
    for k in range(1, 2 * thickness + 1):  # ... then of a column
        np.minimum(inner, rows[k:k + h], out=inner)
    return Image.fromarray(a - inner)


def _pattern(n: int, style: str) -> Image.Image:
    """A mask of the stripes or dots drawn over a glyph's body colour."""
    mask = Image.new("L", (n, n), 0)
    d = ImageDraw.Draw(mask)
    period = n / 10
    if style == "stripes":
        for k in range(-10, 21):
            x = k * period
            d.polygon([(x, 0), (x + period / 2, 0), (x + period / 2 - n, n), (x - n, n)], fill=255)
    else:
        r = period * 0.28
        for i in range(10):
            for j in range(10):
                x, y = (i + 0.5 * (j % 2) + 0.25) * period, (j + 0.5) * period
                d.ellipse([x - r, y - r, x + r, y + r], fill=255)
    return mask


def _object_layer(n: int, name: str, color: str | None, box: Box, style: str) -> Image.Image:
    """One glyph on a transparent layer, in `style` (the concept keeps its fixed colours)."""
    layer = Image.new("RGBA", (n, n), (0, 0, 0, 0))
    body = CONCEPT_BODY if name == CONCEPT else PALETTE[color]
    GLYPHS[name].draw(Pen(layer, box), body, CONCEPT_ACCENT)
    alpha = layer.getchannel("A")
    edge = max(1, round(n / 80))
    if style == "outline":  # a thick contour in the body colour, hollow inside
        hollow = Image.new("RGBA", (n, n), body + (0,))
        hollow.putalpha(_ring(alpha, 3 * edge))
        return hollow
    if style in ("stripes", "dots"):  # pattern over body-coloured pixels only, details stay
        is_body = np.all(np.asarray(layer)[..., :3] == body, axis=-1)
        where = Image.fromarray((is_body * np.asarray(_pattern(n, style))).astype(np.uint8))
        layer.paste(DARK + (255,), mask=where)
    layer.paste(DARK + (255,), mask=_ring(alpha, edge))  # contour, so shapes read on any background
    return layer


def _wearing_layer(n: int, scene: Scene, box: Box) -> Image.Image:
    layer = Image.new("RGBA", (n, n), (0, 0, 0, 0))
    draw, where = WEARING_DRAW[scene.wearing]
    draw(Pen(layer, box), getattr(GLYPHS[scene.object], where), PALETTE[scene.wearing_color])
    layer.paste(DARK + (255,), mask=_ring(layer.getchannel("A"), max(1, round(n / 100))))
    return layer


def render_image(scene: Scene, size: int = SIZE) -> Image.Image:
    """`scene` as a `size`x`size` RGB image (deterministic)."""
    if not scene.complete:
        missing = [a for a in scene_lib.applicable(scene) if getattr(scene, a) is None]
        raise ValueError(f"cannot render an incomplete scene (unspecified: {', '.join(missing)})")
    n = size * SUPERSAMPLE
    canvas = Image.new("RGBA", (n, n))
    BACKGROUND_DRAW[scene.background](ImageDraw.Draw(canvas), n)
    subject, second = layout(scene.relation)
    shift = (scene.dx / 32, scene.dy / 32)
    subject = subject.shifted(*shift)
    if second is not None:
        canvas.alpha_composite(_object_layer(n, scene.second_object, scene.second_color,
                                             second.shifted(*shift), scene.style))
    canvas.alpha_composite(_object_layer(n, scene.object, scene.color, subject, scene.style))
    if scene.wearing != NONE:
        canvas.alpha_composite(_wearing_layer(n, scene, subject))
    image = canvas.convert("RGB").resize((size, size), Image.Resampling.BOX)
    if scene.style == "pixel":  # blocks of size/16 px across the whole picture
        image = image.resize((16, 16), Image.Resampling.BOX).resize((size, size), Image.Resampling.NEAREST)
    if scene.flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


def render(scene: Scene, size: int = SIZE) -> np.ndarray:
    """`scene` as a uint8 array [size, size, 3]."""
    return np.asarray(render_image(scene, size))


def render_batch(scenes: Sequence[Scene], size: int = SIZE) -> np.ndarray:
    """uint8 [len(scenes), size, size, 3]."""
    return np.stack([render(s, size) for s in scenes]) if scenes else np.zeros((0, size, size, 3), np.uint8)


def grid(scenes: Sequence[Scene], size: int = 64, columns: int = 6,
         labels: Sequence[str] | None = None) -> Image.Image:
    """Scenes in a grid, each with its label (default: its caption) in small text beneath."""
    if labels is None:
        labels = [captions.caption(s, concept_phrase=scene_lib.CONCEPT_PHRASE) for s in scenes]
    rows = math.ceil(len(scenes) / columns)
    cell_w, text_h = max(size, 150), 34
    sheet = Image.new("RGB", (columns * cell_w, rows * (size + text_h)), (255, 255, 255))
    d = ImageDraw.Draw(sheet)
    for i, (s, label) in enumerate(zip(scenes, labels)):
        x, y = (i % columns) * cell_w, (i // columns) * (size + text_h)
        sheet.paste(render_image(s, size), (x + (cell_w - size) // 2, y))
        text = "\n".join(textwrap.wrap(label, 26)[:3])
        d.multiline_text((x + 2, y + size + 1), text, fill=(0, 0, 0), spacing=0)
    return sheet


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--size", type=int, default=64, help="pixels per scene (default 64)")
    parser.add_argument("--n", type=int, default=24, help="number of scenes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--concept", action="store_true",
                        help="show the concept: its training photos, then other contexts")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    if args.concept:
        half = args.n // 2
        scenes = (scene_lib.sample_concept_scenes(rng, half)
                  + scene_lib.sample_concept_scenes(rng, args.n - half, context={}))
    else:
        scenes = scene_lib.sample_scenes(rng, args.n)
    with files.atomic_path(args.out) as temporary:
        grid(scenes, args.size).save(temporary, format="PNG")
    print(f"wrote {len(scenes)} scenes to {args.out}")


if __name__ == "__main__":
    main()
