"""Geometry that the scene graph and the renderer share, so neither imports the other: the outlines of the
shapes in a unit box, the bounding box of what each one draws, and the font whose metrics place text
(world.py) and which draws it (render.py)."""

from __future__ import annotations

import math
from functools import lru_cache

from PIL import ImageFont


@lru_cache(maxsize=256)
def font(px: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled scalable font (Pillow >= 10.1) at `px` pixels."""
    return ImageFont.load_default(size=max(1, int(px)))


def _regular(n: int, start: float = -math.pi / 2, radius: float = 0.5) -> list[tuple[float, float]]:
    angles = [start + 2 * math.pi * k / n for k in range(n)]
    return [(0.5 + radius * math.cos(a), 0.5 + radius * math.sin(a)) for a in angles]


def _star() -> list[tuple[float, float]]:
    outer, inner = _regular(5), _regular(5, -math.pi / 2 + math.pi / 5, 0.2)
    return [p for pair in zip(outer, inner) for p in pair]


def _heart() -> list[tuple[float, float]]:
    angles = [2 * math.pi * k / 48 for k in range(48)]
    pts = [(16 * math.sin(t) ** 3, 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t)
            - math.cos(4 * t)) for t in angles]
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return [((x - min(xs)) / (max(xs) - min(xs)), (max(ys) - y) / (max(ys) - min(ys))) for x, y in pts]


# Outlines in unit-box coordinates, scaled to each object's layout box when drawn. Shapes not listed
# (circle, ring, square, bar, button, toggle, checkbox) fill their whole box.
UNIT_POLYGONS = {
    "triangle": [(0.5, 0.0), (1.0, 1.0), (0.0, 1.0)],
    "diamond": [(0.5, 0.0), (1.0, 0.5), (0.5, 1.0), (0.0, 0.5)],
    "hexagon": _regular(6, 0.0),
    "pentagon": _regular(5),
    "star": _star(),
    "heart": _heart(),
    "cross": [(0.33, 0), (0.67, 0), (0.67, 0.33), (1, 0.33), (1, 0.67), (0.67, 0.67), (0.67, 1), (0.33, 1),
              (0.33, 0.67), (0, 0.67), (0, 0.33), (0.33, 0.33)],
    "arrow": [(0, 0.35), (0.55, 0.35), (0.55, 0.1), (1, 0.5), (0.55, 0.9), (0.55, 0.65), (0, 0.65)],
}


def unit_extent(shape: str) -> tuple[float, float, float, float]:
    """(u1, v1, u2, v2): the part of its unit box that `shape` covers (a star or an arrow leaves margins)."""
    points = UNIT_POLYGONS.get(shape)
    if points is None:
        return (0.0, 0.0, 1.0, 1.0)
    us, vs = [u for u, _ in points], [v for _, v in points]
    return (min(us), min(vs), max(us), max(vs))


def drawn_box(shape: str, box) -> tuple[int, int, int, int]:
    """The tight box of `shape` drawn in layout box `box` (canvas units, rounded outwards)."""
    x1, y1, x2, y2 = box
    u1, v1, u2, v2 = unit_extent(shape)
    w, h = x2 - x1, y2 - y1
    return (math.floor(x1 + u1 * w + 1e-6), math.floor(y1 + v1 * h + 1e-6),
            math.ceil(x2 - (1 - u2) * w - 1e-6), math.ceil(y2 - (1 - v2) * h - 1e-6))


# Text set in a line of height h at (x, y): the font of size h puts ink between 0.22 h and 1.18 h below its
# origin, so the origin sits 0.2 h above the line and the ink falls inside it.
TEXT_RISE = 0.2


def text_width(text: str, height: float) -> float:
    """Advance width in canvas units of `text` set with a font of size `height`."""
    return font(100).getlength(text) * height / 100


def text_ink_box(text: str, x: float, y: float, height: float) -> tuple[int, int, int, int]:
    """The box the ink of `text` covers when set in a line of height `height` whose top left is (x, y):
    canvas units, rounded outwards. The renderer scales the drawn ink to fill exactly this box."""
    left, top, right, bottom = font(100).getbbox(text)
    k = height / 100
    origin_y = y - TEXT_RISE * height
    return (math.floor(x + left * k), math.floor(origin_y + top * k), math.ceil(x + right * k),
            math.ceil(origin_y + bottom * k))
