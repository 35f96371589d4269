"""ShapesWorld command line.

    python -m data.shapes preview [--out=out/shapes/preview.png] [--split=train] [--seed=0]
        contact sheet: scenes of every kind with their SSC / DSC / AltText, grounding boxes drawn
    python -m data.shapes export --kind=caption|llava|preference|png --n=N --out=DIR [--split=train]
        [--seed=0] [--size=0]   (size 0: 64 px natural scenes, 448 px text-rich ones)
    python -m data.shapes corpus --n=60000 --out=FILE [--seed=0]
        mixed text of every kind, one text a line (the tokenizer's training corpus: python -m data.tokenizer)
    python -m data.shapes boxes [--n=2000] [--size=1000]
        how tightly the grounding boxes hug the drawn pixels (shape IoU, text ink inside its box)
    python -m data.shapes bench [--n=200]
        make_scene + render throughput (scenes/s) at 64 px and 448 px on one core, and text items/s
"""

from __future__ import annotations

import ast
import dataclasses
import sys
import textwrap
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from . import (
    COLOR_RGB,
    EMBLEM_BADGE,
    EMBLEMS,
    KINDS,
    Obj,
    Scene,
    caption,
    corpus,
    export,
    grounding,
    iou,
    make_scene,
    multi_image,
    parse_box,
    render,
    video,
    vqa,
)
from .geometry import font

DEFAULTS = {
    "preview": {"out": "out/shapes/preview.png", "split": "train", "seed": 0, "size": 320},
    "export": {"kind": "caption", "n": 16, "out": "out/shapes/export", "split": "train", "seed": 0,
               "size": 0},
    "corpus": {"n": 60000, "out": "out/tokenizer/shapes.txt", "seed": 0},
    "boxes": {"n": 2000, "seed": 0, "size": 1000},
    "bench": {"n": 200, "seed": 0},
}


def parse_args(argv: list[str]) -> tuple[str, dict]:
    """`command --key=value ...` with values read by ast.literal_eval and type-checked against DEFAULTS."""
    if not argv or "-h" in argv or "--help" in argv:
        print(__doc__)
        raise SystemExit(0)
    if argv[0] not in DEFAULTS:
        raise SystemExit(f"error: unknown command {argv[0]!r}; expected one of {', '.join(DEFAULTS)}")
    command, args = argv[0], dict(DEFAULTS[argv[0]])
    for arg in argv[1:]:
        key, eq, raw = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not eq or key not in args:
            raise SystemExit(f"error: bad argument {arg!r} for {command}; known: "
                             + ", ".join(f"--{k}={v}" for k, v in args.items()))
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # bare strings: --split=val
        if type(value) is not type(args[key]):
            raise SystemExit(f"error: --{key} must be {type(args[key]).__name__}, got {raw!r}")
        args[key] = value
    return command, args


def _panel(img: Image.Image, title: str, lines: list[str], boxes=(), width=None) -> Image.Image:
    """An image with grounding boxes drawn, a title above and wrapped text below."""
    width = width or img.width
    text_font, title_font = font(13), font(15)
    wrapped = [w for line in lines for w in textwrap.wrap(line, width=width // 7)]
    panel = Image.new("RGB", (width, img.height + 26 + 16 * len(wrapped) + 8), (255, 255, 255))
    panel.paste(img, ((width - img.width) // 2, 24))
    draw = ImageDraw.Draw(panel)
    draw.text((4, 4), title, fill=(0, 0, 0), font=title_font)
    x0 = (width - img.width) // 2
    for ref, grid in boxes:
        x1, y1, x2, y2 = (v / 999 * img.width for v in parse_box(grid))
        draw.rectangle((x0 + x1, 24 + y1, x0 + x2, 24 + y2), outline=(255, 0, 255), width=2)
        label = ref.removeprefix("the ")[:22]
        draw.text((x0 + x1 + 2, 24 + y1 + 1), label, fill=(255, 0, 255), font=text_font)
    for i, line in enumerate(wrapped):
        draw.text((4, img.height + 28 + 16 * i), line, fill=(30, 30, 30), font=text_font)
    return panel


def preview(out: str, split: str, seed: int, size: int) -> Path:
    panels = []
    for i, kind in enumerate(["natural", "natural", "natural"] + list(KINDS[1:])):
        scene = make_scene(split, i, seed, kind)
        q, ans = vqa(scene, seed)[0]
        panels.append(_panel(render(scene, size), f"{kind} {split}/{i}", [
            "SSC: " + caption(scene, "ssc", seed), "DSC: " + caption(scene, "dsc", seed),
            f"VQA: {q} -> {ans}"],
            grounding(scene)))
    for i in range(2):
        scene = make_scene("web", i, seed)
        panels.append(_panel(render(scene, size), f"natural web/{i}", [
            "AltText: " + caption(scene, "alttext", seed), "AFC: " + caption(scene, "afc", seed)],
            grounding(scene)))
    frames, q, ans = video(split, 0, seed)
    strip = Image.new("RGB", (size, size), (255, 255, 255))
    for f, frame in enumerate(frames[:4]):
        strip.paste(render(frame, size // 2), ((f % 2) * size // 2, (f // 2) * size // 2))
    panels.append(_panel(strip, "video: 4 frames", [f"{q} -> {ans}"]))
    scenes, q, ans = multi_image(split, 0, seed)
    pair = Image.new("RGB", (size, size), (255, 255, 255))
    for j, scene in enumerate(scenes):
        pair.paste(render(scene, size // 2), (j * size // 2, size // 4))
    panels.append(_panel(pair, "multi-image", [f"{q} -> {ans}"]))
    legend = Image.new("RGB", (size, size), (255, 255, 255))
    cell = size // 4
    draw = ImageDraw.Draw(legend)
    for e in range(16):  # the first 16 of the named emblems, each on its own badge
        shape, color = EMBLEM_BADGE[e]
        badge = Scene(1000, 1000, "white", [Obj(shape, color, "large", (150, 60, 850, 760), emblem=e)])
        x, y = (e % 4) * cell, (e // 4) * cell
        legend.paste(render(badge, cell), (x, y))
        draw.text((x + 2, y + cell - 13), EMBLEMS[e], fill=(0, 0, 0), font=font(max(8, cell // 8)))
    panels.append(_panel(legend, f"emblems 0-15 of {len(EMBLEMS)}", [
        "AltText / AFC name them; SSC / DSC / DSC+ describe them only visually."]))
    cols = 4
    rows = [panels[r:r + cols] for r in range(0, len(panels), cols)]
    heights = [max(p.height for p in row) for row in rows]
    sheet = Image.new("RGB", (cols * (size + 10), sum(heights) + 10 * len(rows)), (235, 235, 235))
    y = 0
    for row, h in zip(rows, heights):
        for c, p in enumerate(row):
            sheet.paste(p, (c * (size + 10), y))
        y += h + 10
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def _pixel_box(mask: np.ndarray, x0: int, y0: int):
    """Bounding box (x1, y1, x2, y2), ends exclusive, of the True pixels of `mask` placed at (x0, y0)."""
    cols, rows = np.flatnonzero(mask.any(0)), np.flatnonzero(mask.any(1))
    if not len(cols):
        return None
    return (x0 + cols[0], y0 + rows[0], x0 + cols[-1] + 1, y0 + rows[-1] + 1)


def _packed(img: Image.Image) -> np.ndarray:
    """(H, W) int32 0xRRGGBB: one comparison per pixel instead of three."""
    rgb = np.asarray(img).astype(np.int32)  # (H, W, 3)
    return rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2]


def box_fit(n: int, seed: int = 0, size: int = 1000) -> dict:
    """How the boxes of n scenes (all five kinds in turn) fit the pixels drawn at `size` px.

    Shapes: IoU of Obj.bbox with the bounding box of the object's own colour inside its layout box (every
    kind keeps objects apart, so no other object's pixels are there). Text: the scene rendered with and
    without its text; the pixels that change are the ink. Reports the ink share outside every text box
    and the IoU of each item's ink bounding box with its box."""
    shape_iou, text_iou = defaultdict(list), []
    ink_pixels = ink_outside = 0
    k = size / 1000
    for i in range(n):
        scene = make_scene("train", i, seed, KINDS[i % len(KINDS)])
        assert scene.width == scene.height == 1000
        full = _packed(render(scene, size))  # (size, size)

        def px(box, margin=0):
            pad = (-margin, -margin, margin, margin)
            return [max(0, min(size, round(v * k) + d)) for v, d in zip(box, pad)]

        for obj in scene.objects:
            x1, y1, x2, y2 = px(obj.box, 3)
            r, g, b = COLOR_RGB[obj.color]
            drawn = _pixel_box(full[y1:y2, x1:x2] == (r << 16 | g << 8 | b), x1, y1)
            shape_iou[obj.shape].append(iou(drawn, [v * k for v in obj.bbox]) if drawn else 0.0)
        if scene.texts:
            ink = full != _packed(render(dataclasses.replace(scene, texts=[]), size))  # (size, size) bool
            inside = np.zeros_like(ink)
            for t in scene.texts:
                x1, y1, x2, y2 = px(t.bbox, 1)
                inside[y1:y2, x1:x2] = True
                x1, y1, x2, y2 = px(t.bbox, 4)
                drawn = _pixel_box(ink[y1:y2, x1:x2], x1, y1)
                text_iou.append(iou(drawn, [v * k for v in t.bbox]) if drawn else 0.0)
            ink_pixels += int(ink.sum())
            ink_outside += int((ink & ~inside).sum())
    return {"shape_iou": dict(shape_iou), "text_iou": text_iou, "ink_pixels": ink_pixels,
            "ink_outside": ink_outside}


def boxes(n: int, seed: int, size: int) -> None:
    t0 = time.perf_counter()
    fit = box_fit(n, seed, size)
    print(f"{n} scenes ({', '.join(KINDS)} in turn) rendered at {size} px, {time.perf_counter() - t0:.1f} s")
    print(f"{'item':10s} {'count':>6s} {'min IoU':>8s} {'p1 IoU':>8s} {'mean IoU':>9s}")
    rows = sorted(fit["shape_iou"].items()) + [("text", fit["text_iou"])]
    for name, values in rows:
        v = np.array(values)
        print(f"{name:10s} {len(v):6d} {v.min():8.3f} {np.percentile(v, 1):8.3f} {v.mean():9.3f}")
    print(f"text ink outside every text box (1 px margin): {fit['ink_outside']} of {fit['ink_pixels']} "
          "pixels")


def bench(n: int, seed: int) -> dict:
    results = {}
    for size in (64, 448):
        render(make_scene("train", -1, seed), size)  # warm the font cache
        t0 = time.perf_counter()
        for i in range(n):
            render(make_scene("train", i, seed), size)
        results[f"scenes/s @ {size}px (natural)"] = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for i in range(n):
        render(make_scene("train", i, seed, KINDS[1 + i % 4]), 448)
    results["scenes/s @ 448px (text-rich)"] = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for i in range(n):
        scene = make_scene("train", i, seed)
        for fmt in ("alttext", "ssc", "dsc", "dsc+", "afc"):
            caption(scene, fmt, seed)
    results["scenes/s captioned (5 formats, no render)"] = n / (time.perf_counter() - t0)
    return results


def main(argv: list[str]) -> None:
    command, args = parse_args(argv)
    try:
        if command == "preview":
            print(f"wrote {preview(**args)}")
        elif command == "corpus":
            path = Path(args["out"])
            path.parent.mkdir(parents=True, exist_ok=True)
            texts = corpus(args["n"], args["seed"])
            path.write_text("".join(text + "\n" for text in texts), encoding="utf-8")
            print(f"wrote {args['n']} texts to {path}")
        elif command == "boxes":
            boxes(**args)
        elif command == "export":
            written = export(**{**args, "size": args["size"] or None})
            also = f" and {written.with_suffix('.tsv')} (open_clip)" if args["kind"] == "caption" else ""
            print(f"wrote {written}{also}")
        else:
            for name, value in bench(**args).items():
                print(f"{name:45s} {value:8.1f}")
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
