"""Formats users already have: readers (image-text CSV/JSONL, LLaVA conversation JSON, preference
JSONL, images) and exporters of ShapesWorld into them. Every reader error is a ValueError that
names the file and the line (or item and key)."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

from PIL import Image

from ..jsonl import iter_jsonl
from .render import render
from .tasks import preference_pair
from .text import caption, grounding, referring, vqa
from .world import KINDS, Obj, Scene, TextItem, make_scene


# ----------------------------------------------------------------------------- scene graphs as JSON
def scene_to_dict(scene: Scene) -> dict:
    return dataclasses.asdict(scene)


def scene_from_dict(d: dict) -> Scene:
    d = dict(d)
    d["objects"] = [Obj(**{**o, "box": tuple(o["box"])}) for o in d["objects"]]
    d["texts"] = [TextItem(**{**t, "box": tuple(t["box"])}) for t in d["texts"]]
    return Scene(**d)


# ----------------------------------------------------------------------------- readers
def load_image(path) -> Image.Image:
    """RGB image at `path`; a missing or undecodable file -> ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except Exception as e:  # PIL raises several types for broken files
        raise ValueError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None


def _existing(path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    return path


def _resolve(base: Path, filepath: str) -> str:
    """Relative image paths in a data file are relative to that file's folder; returned absolute."""
    p = Path(filepath)
    return str(p if p.is_absolute() else base.resolve().parent / p)


def _need_str(path, where, obj: dict, key: str, optional=False):
    if key not in obj:
        if optional:
            return None
        raise ValueError(f"{path}:{where}: missing key {key!r}")
    if not isinstance(obj[key], str) or not obj[key]:
        raise ValueError(f"{path}:{where}: key {key!r} must be a non-empty string, got {obj[key]!r}")
    return obj[key]


def read_image_text(path) -> list[dict]:
    """open_clip-style image-text pairs from CSV (header row) or JSONL: `filepath`, `caption`,
    optional `alttext`; other columns are kept. `filepath` comes back absolute (resolved against the file)."""
    path = _existing(path)
    rows = []
    if path.suffix.lower() in (".jsonl", ".json"):
        for lineno, obj in iter_jsonl(path):
            row = dict(obj)
            row["filepath"] = _resolve(path, _need_str(path, lineno, obj, "filepath"))
            _need_str(path, lineno, obj, "caption")
            _need_str(path, lineno, obj, "alttext", optional=True)
            rows.append(row)
    elif path.suffix.lower() in (".csv", ".tsv"):
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            header = reader.fieldnames or []
            for key in ("filepath", "caption"):
                if key not in header:
                    raise ValueError(f"{path}:1: missing column {key!r} (columns: {', '.join(header) or 'none'})")
            for row in reader:
                lineno = reader.line_num
                if None in row or any(v is None for v in row.values()):
                    raise ValueError(f"{path}:{lineno}: expected {len(header)} fields like the header")
                for key in ("filepath", "caption"):
                    if not row[key]:
                        raise ValueError(f"{path}:{lineno}: empty {key!r}")
                row["filepath"] = _resolve(path, row["filepath"])
                rows.append(row)
    else:
        raise ValueError(f"{path}: unsupported image-text file type {path.suffix!r} (use .csv, .tsv or .jsonl)")
    return rows


def read_llava_json(path) -> list[dict]:
    """LLaVA conversation JSON: a list of {id, image (optional: text-only items), conversations:
    [{from: human|gpt, value}, ...]}. `image` comes back absolute (resolved against the file's folder)."""
    path = _existing(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of conversations, got {type(data).__name__}")
    items = []
    for i, item in enumerate(data):
        where = f"item {i}"
        if not isinstance(item, dict):
            raise ValueError(f"{path}: {where}: expected an object, got {type(item).__name__}")
        convs = item.get("conversations")
        if not isinstance(convs, list) or not convs:
            raise ValueError(f"{path}: {where} (id {item.get('id', '?')}): key 'conversations' must be a non-empty list")
        for t, turn in enumerate(convs):
            if not isinstance(turn, dict) or turn.get("from") not in ("human", "gpt", "system") \
                    or not isinstance(turn.get("value"), str):
                raise ValueError(f"{path}: {where} (id {item.get('id', '?')}): conversations[{t}] needs "
                                 f"'from' in human/gpt/system and a string 'value', got {turn!r}"[:300])
        out = dict(item)
        out["id"] = str(item.get("id", i))
        if item.get("image") is not None:
            if not isinstance(item["image"], str):
                raise ValueError(f"{path}: {where}: key 'image' must be a string path")
            out["image"] = _resolve(path, item["image"])
        items.append(out)
    return items


def read_preference_jsonl(path) -> list[dict]:
    """Preference JSONL (VLFeedback / POVID style): prompt, chosen, rejected, optional image."""
    path = _existing(path)
    rows = []
    for lineno, obj in iter_jsonl(path):
        row = dict(obj)
        for key in ("prompt", "chosen", "rejected"):
            _need_str(path, lineno, obj, key)
        image = _need_str(path, lineno, obj, "image", optional=True)
        if image:
            row["image"] = _resolve(path, image)
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no preference pairs in the file")
    return rows


# ----------------------------------------------------------------------------- exporters
def _kind_for(i: int) -> str:
    """Mostly natural scenes, every 4th one text-rich (document / receipt / chart / ui in turn)."""
    return KINDS[1 + (i // 4) % 4] if i % 4 == 3 else "natural"


def export(kind: str, n: int, out, split: str = "train", seed: int = 0, size: int = 64, start: int = 0) -> Path:
    """Write `n` items of `split` to folder `out` in a user format; returns the main file written.
    kind: caption (captions.csv + captions.jsonl), llava (llava.json), preference (preference.jsonl),
    png (PNG files + scenes.jsonl with the scene graphs)."""
    if kind not in ("caption", "llava", "preference", "png"):
        raise ValueError(f"unknown export kind {kind!r}; expected caption, llava, preference or png")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"export needs n >= 1 items, got n={n!r}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(start, start + n):
        if kind == "preference":
            pair = preference_pair(split, i, seed)
            scene = pair["scene"]
        else:
            scene = make_scene(split, i, seed, _kind_for(i) if kind != "caption" else "natural")
        rel = f"images/{split}_{seed}_{i:06d}.png"
        render(scene, size).save(out / rel)
        if kind == "caption":
            rows.append({"filepath": rel, "caption": caption(scene, "dsc", seed), "alttext": caption(scene, "alttext", seed),
                         "ssc": caption(scene, "ssc", seed), "dsc_plus": caption(scene, "dsc+", seed),
                         "afc": caption(scene, "afc", seed)})
        elif kind == "llava":
            turns = [("Describe the image.", caption(scene, "dsc", seed))] + vqa(scene, seed)[:3]
            turns += [(f"Where is {ref}? Answer with a box.", box) for ref, box in grounding(scene)[:1]]
            turns += referring(scene)[:1]
            convs = []
            for t, (q, ans) in enumerate(turns):
                convs += [{"from": "human", "value": ("<image>\n" if t == 0 else "") + q}, {"from": "gpt", "value": ans}]
            rows.append({"id": f"{split}-{seed}-{i}", "image": rel, "conversations": convs})
        elif kind == "preference":
            rows.append({"prompt": pair["prompt"], "chosen": pair["chosen"], "rejected": pair["rejected"],
                         "image": rel, "hallucination": pair["hallucination"]})
        else:
            rows.append({"filepath": rel, "scene": scene_to_dict(scene)})
    if kind == "caption":
        with open(out / "captions.csv", "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        main = out / "captions.jsonl"
    elif kind == "llava":
        main = out / "llava.json"
        main.write_text(json.dumps(rows, indent=1), encoding="utf-8")
        return main
    else:
        main = out / ("preference.jsonl" if kind == "preference" else "scenes.jsonl")
    with open(main, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return main
