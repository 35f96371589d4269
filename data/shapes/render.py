"""Renderer: draws a Scene with Pillow directly at the requested size (any size 32..1344+).

Small sizes are drawn 4x (or 2x) larger and box-filtered down, so 64 px shapes keep clean edges
while the inside of every shape keeps its exact colour (tests check boxes by that colour).
"""

from __future__ import annotations

from PIL import Image, ImageDraw

from .geometry import UNIT_POLYGONS, font
from .world import BACKGROUNDS, COLOR_RGB, EMBLEM_BADGE, EMBLEM_GLYPHS, Scene, glyph_color


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box, rgb) -> None:
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    if shape in ("circle",):
        draw.ellipse(box, fill=rgb)
    elif shape == "ring":
        draw.ellipse(box, outline=rgb, width=max(1, round(w * 0.22)))
    elif shape in ("square", "bar"):
        draw.rectangle(box, fill=rgb)
    elif shape == "button":
        draw.rounded_rectangle(box, radius=h * 0.3, fill=rgb)
    elif shape == "checkbox":
        draw.rectangle(box, fill=rgb if rgb != COLOR_RGB["gray"] else (255, 255, 255), outline=rgb,
                       width=max(1, round(w * 0.12)))
        if rgb != COLOR_RGB["gray"]:  # checked: a white tick
            tick = [(x1 + w * 0.2, y1 + h * 0.5), (x1 + w * 0.42, y1 + h * 0.75),
                    (x1 + w * 0.8, y1 + h * 0.25)]
            draw.line(tick, fill=(255, 255, 255), width=max(1, round(w * 0.12)))
    elif shape == "toggle":
        draw.rounded_rectangle(box, radius=h / 2, fill=rgb)
        knob_x = x2 - h if rgb != COLOR_RGB["gray"] else x1  # knob right when on
        pad = h * 0.12
        draw.ellipse((knob_x + pad, y1 + pad, knob_x + h - pad, y2 - pad), fill=(255, 255, 255))
    else:
        draw.polygon([(x1 + u * w, y1 + v * h) for u, v in UNIT_POLYGONS[shape]], fill=rgb)


GLYPH_FRACTION = {"circle": 0.66, "square": 0.74, "hexagon": 0.6, "diamond": 0.52}  # largest square inside


def draw_glyph(draw: ImageDraw.ImageDraw, emblem: int, box, badge_color: str) -> None:
    """The emblem's 5x5 symmetric pattern, as large as the badge shape allows (legible at 64 px)."""
    x1, y1, x2, y2 = box
    side = (x2 - x1) * GLYPH_FRACTION[EMBLEM_BADGE[emblem][0]]
    gx, gy, cell = x1 + (x2 - x1 - side) / 2, y1 + (y2 - y1 - side) / 2, side / 5
    ink = COLOR_RGB[glyph_color(badge_color)]
    for r, row in enumerate(EMBLEM_GLYPHS[emblem]):
        for c, bit in enumerate(row):
            if bit:
                x, y = gx + c * cell, gy + r * cell
                draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=ink)


def draw_text(img: Image.Image, text: str, box, rgb) -> None:
    """`text` whose ink fills `box` (pixels) exactly: drawn at the font size of the box's height, cropped to
    its ink and scaled to the box. Pillow's hinting makes ink at small sizes several % wider or narrower
    than the scaled metrics that made the box, so drawing at a font size alone would not fit it."""
    left, top = round(box[0]), round(box[1])
    width, height = max(1, round(box[2]) - left), max(1, round(box[3]) - top)
    ink_top, ink_bottom = font(100).getbbox(text)[1::2]
    face = font(max(1, round(height * 100 / max(1, ink_bottom - ink_top))))
    x1, y1, x2, y2 = face.getbbox(text)
    mask = Image.new("L", (x2 - x1 + 2, y2 - y1 + 2))
    ImageDraw.Draw(mask).text((1 - x1, 1 - y1), text, fill=255, font=face)
    ink = mask.getbbox()
    if ink is None:  # nothing drawn (whitespace)
        return
    mask = mask.crop(ink).resize((width, height), Image.Resampling.BILINEAR)
    img.paste(rgb, (left, top, left + width, top + height), mask)


def _texture(draw: ImageDraw.ImageDraw, texture: str, rgb, px: int) -> None:
    """Background texture in a slightly darker tint of the background (never an object colour)."""
    tint = tuple(max(0, c - 22) for c in rgb)
    step = max(4, px // 16)
    if texture == "striped":
        for k in range(-px, px, step):
            draw.line([(k, 0), (k + px, px)], fill=tint, width=max(1, step // 4))
    elif texture == "dotted":
        r = max(1, step // 8)
        for x in range(step // 2, px, step):
            for y in range(step // 2, px, step):
                draw.ellipse((x - r, y - r, x + r, y + r), fill=tint)
    elif texture == "checkered":
        for i, x in enumerate(range(0, px, step)):
            for j, y in enumerate(range(0, px, step)):
                if (i + j) % 2:
                    draw.rectangle((x, y, x + step - 1, y + step - 1), fill=tint)


def render(scene: Scene, size: int = 64) -> Image.Image:
    """RGB image of `scene`, size x size pixels."""
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"render size must be an int >= 8, got {size!r}")
    ss = 4 if size < 160 else 2 if size < 320 else 1  # supersampling factor for small sizes
    px = size * ss
    bg = BACKGROUNDS[scene.background]
    img = Image.new("RGB", (px, px), bg)
    draw = ImageDraw.Draw(img)
    k = px / scene.width

    def scale(box):
        return tuple(v * k for v in box)

    _texture(draw, scene.texture, bg, px)
    if scene.kind == "receipt":
        draw.rectangle(scale(scene.meta["paper"]), fill=(255, 255, 255))
    elif scene.kind == "ui":
        draw.rectangle(scale(scene.meta["header"]), fill=(40, 60, 110))
    elif scene.kind == "chart":
        x1, y1, x2, y2 = scene.meta["axis"]
        width = max(1, round(4 * k))
        axis = [scale((x1, y1))[:2], scale((x2, y2))[:2], (930 * k, y2 * k)]
        draw.line(axis, fill=(60, 60, 60), width=width)
    for obj in scene.objects:
        box = scale(obj.box)
        draw_shape(draw, obj.shape, box, COLOR_RGB[obj.color])
        if obj.emblem is not None:
            draw_glyph(draw, obj.emblem, box, obj.color)
    for item in scene.texts:
        draw_text(img, item.text, scale(item.box), COLOR_RGB[item.color])
    if ss > 1:
        img = img.resize((size, size), Image.Resampling.BOX)
    return img
