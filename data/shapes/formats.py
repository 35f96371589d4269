"""Formats users already have, read and written the way their own ecosystems do it:

- LLaVA conversation JSON (LLaVA-1.5 mixes, LLaVA-OneVision multi-image items): `read_llava_json`.
- open_clip image-text CSV/TSV (`CsvDataset`: tab-separated, `filepath` and `title` columns) and
  image-text JSONL: `read_image_text`.
- TRL preference JSONL (`prompt`, `chosen`, `rejected`, `images`), standard or conversational:
  `read_preference_jsonl`.
- `export` writes ShapesWorld into each of them (and PNGs with their scene graphs).

Every reader error is a `data.InputError` whose message starts with `file:line:` (or `file:`)."""

from __future__ import annotations

import csv
import dataclasses
import json
import re
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from .. import InputError
from ..jsonl import existing_file, iter_jsonl, read_text, text_lines
from .render import render
from .tasks import preference_pair
from .text import NUMBER_WORDS, caption, grounding, parse_box, referring, vqa
from .world import KINDS, Obj, Scene, TextItem, make_scene

IMAGE_TOKEN = "<image>"  # LLaVA's placeholder, also the one for TRL prompts written as plain strings


# ----------------------------------------------------------------------------- scene graphs as JSON
def scene_to_dict(scene: Scene) -> dict:
    return dataclasses.asdict(scene)


def scene_from_dict(d: dict) -> Scene:
    d = dict(d)
    d["objects"] = [Obj(**{**o, "box": tuple(o["box"])}) for o in d["objects"]]
    d["texts"] = [TextItem(**{**t, "box": tuple(t["box"])}) for t in d["texts"]]
    return Scene(**d)


# ----------------------------------------------------------------------------- shared reader parts
def load_image(path) -> Image.Image:
    """RGB image at `path`; a missing, non-file or undecodable file -> InputError naming it."""
    path = existing_file(path)
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:  # PIL's errors for broken files
        raise InputError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None


def _image_path(data_file: Path, where: str, value, image_folder) -> str:
    """An image path of a data file, absolute. Relative paths are relative to `image_folder` when one is
    given (LLaVA's --image_folder), else to the data file's folder. A missing image -> InputError."""
    if not isinstance(value, str) or not value:
        raise InputError(f"{data_file}:{where}: an image path must be a non-empty string, got {value!r}")
    p = Path(value)
    if not p.is_absolute():
        p = (Path(image_folder).resolve() if image_folder is not None else data_file.resolve().parent) / p
    if not p.is_file():
        base = f"image folder {image_folder}" if image_folder is not None else "the data file's folder"
        raise InputError(f"{data_file}:{where}: image {value!r} not found (looked for {p}, relative to "
                         f"{base})")
    return str(p)


def _check_folder(image_folder) -> None:
    if image_folder is not None and not Path(image_folder).is_dir():
        raise InputError(f"{image_folder}: image folder not found")


def _need_str(path, where, obj: dict, key: str):
    if key not in obj:
        raise InputError(f"{path}:{where}: missing key {key!r}")
    if not isinstance(obj[key], str) or not obj[key]:
        raise InputError(f"{path}:{where}: key {key!r} must be a non-empty string, got {obj[key]!r}"[:300])
    return obj[key]


# ----------------------------------------------------------------------------- LLaVA JSON
_JSON_SPACE = re.compile(r"[ \t\n\r]*")


def _json_list(path: Path, text: str):
    """(line, element) for each element of the top-level JSON list in `text`, in one pass (raw_decode per
    element), so an item's errors can name the line where it starts."""
    def invalid(e: json.JSONDecodeError):
        return InputError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})")

    pos = _JSON_SPACE.match(text).end()
    if not text.startswith("[", pos):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise invalid(e) from None
        raise InputError(f"{path}:1: expected a JSON list of conversations, got {type(data).__name__}")
    decoder, line, counted = json.JSONDecoder(), 1, 0
    pos = _JSON_SPACE.match(text, pos + 1).end()
    while not text.startswith("]", pos):
        line, counted = line + text.count("\n", counted, pos), pos
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise invalid(e) from None
        yield line, item
        pos = _JSON_SPACE.match(text, pos).end()
        if text.startswith(",", pos):
            pos = _JSON_SPACE.match(text, pos + 1).end()
        elif not text.startswith("]", pos):
            err = json.JSONDecodeError("Expecting ',' or ']' after a list item", text, pos)
            raise invalid(err)
    end = _JSON_SPACE.match(text, pos + 1).end()
    if end != len(text):
        raise invalid(json.JSONDecodeError("Extra data after the list", text, end))


def read_llava_json(path, image_folder=None) -> list[dict]:
    """LLaVA conversation JSON: a list of {id, image, conversations: [{from: human|gpt|system, value}, ...]}.

    `image` is one path, a list of paths (multi-image items, LLaVA-OneVision style) or absent (text-only
    items, e.g. the ShareGPT part of LLaVA-1.5's mix). Paths are relative to `image_folder` when given
    (LLaVA's --image_folder) or else to the JSON file's folder. Each `<image>` in the conversation stands
    for one image, in order, so their counts must agree.

    Each item comes back as given plus: `id` (a string), `images` (absolute paths, [] when text-only),
    `line` (where the item starts in the file); `image` is absolute too (a list for multi-image items).
    `llava_counts(items)` tells how many are text-only / single / multi-image."""
    path = existing_file(path)
    _check_folder(image_folder)
    items = []
    for i, (line, item) in enumerate(_json_list(path, read_text(path))):
        if not isinstance(item, dict):
            raise InputError(f"{path}:{line}: item {i}: expected an object, got {type(item).__name__}")
        where = f"{line}: item {i} (id {item.get('id', '?')})"
        convs = item.get("conversations")
        if not isinstance(convs, list) or not convs:
            raise InputError(f"{path}:{where}: key 'conversations' must be a non-empty list")
        for t, turn in enumerate(convs):
            if not isinstance(turn, dict) or turn.get("from") not in ("human", "gpt", "system") \
                    or not isinstance(turn.get("value"), str):
                raise InputError(f"{path}:{where}: conversations[{t}] needs 'from' in human/gpt/system and a "
                                 f"string 'value', got {turn!r}"[:300])
        image = item.get("image")
        paths = image if isinstance(image, list) else [] if image is None else [image]
        images = [_image_path(path, where, p, image_folder) for p in paths]
        markers = sum(turn["value"].count(IMAGE_TOKEN) for turn in convs)
        if markers != len(images):
            raise InputError(f"{path}:{where}: {len(images)} image(s) but {markers} '{IMAGE_TOKEN}' "
                             f"marker(s) in the conversation; LLaVA needs one marker per image")
        out = dict(item, id=str(item.get("id", i)), images=images, line=line)
        if image is not None:
            out["image"] = images if isinstance(image, list) else images[0]
        items.append(out)
    if not items:
        raise InputError(f"{path}: no conversations in the file")
    return items


def llava_counts(items: list[dict]) -> dict[str, int]:
    """How many items of read_llava_json are text-only, single-image and multi-image."""
    n_images = [len(item["images"]) for item in items]
    return {"items": len(items), "text-only": n_images.count(0), "single-image": n_images.count(1),
            "multi-image": sum(n > 1 for n in n_images)}


# ----------------------------------------------------------------------------- image-text CSV / TSV / JSONL
SEPARATORS = {"\t": "tab", ",": "comma", ";": "semicolon", "|": "pipe"}


def _sniff_separator(path: Path, img_key: str) -> str:
    """The separator that splits the header line into an `img_key` column; tab (open_clip's) first and when
    none does."""
    header = next(text_lines(path), (1, ""))[1]
    return next((s for s in SEPARATORS if img_key in next(csv.reader([header], delimiter=s), [])), "\t")


def _csv_rows(path: Path, sep: str):
    """(line where the record starts, fields) of a CSV/TSV file, in csv's strict mode: a stray quote is an
    error, never a field that swallows the lines after it."""
    reader = csv.reader((line for _, line in text_lines(path)), delimiter=sep, strict=True)
    start = 1
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            if "field larger than field limit" in str(e):
                why = (f"a field is longer than {csv.field_size_limit()} characters (csv's limit); usually "
                       f"a quote that never closes")
            elif "unexpected end of data" in str(e):
                why = "a quoted field starting here never closes (it would swallow the rest of the file)"
            else:
                why = (f"malformed {SEPARATORS.get(sep, repr(sep))}-separated line ({e}); a field with a "
                       f"quote must be quoted whole, with quotes inside doubled")
            raise InputError(f"{path}:{start}: {why}") from None
        yield start, fields
        start = reader.line_num + 1


def read_image_text(path, image_folder=None, img_key: str = "filepath", caption_key: str | None = None,
                    sep: str | None = None) -> list[dict]:
    """Image-text pairs, open_clip style: a CSV/TSV (any extension but .jsonl/.json) with a header line, or
    JSONL (one object a line).

    CSV/TSV as open_clip's CsvDataset reads it: separator `sep`, else sniffed from the header (tab, comma,
    semicolon, pipe); image column `img_key` (`filepath`), caption column `caption_key` (default: `title`,
    open_clip's, or else `caption`). UTF-8 with or without a BOM; csv's strict quoting.
    Paths relative to `image_folder` when given, else to the file's folder (open_clip: the working folder).

    Rows come back with every column, `filepath` absolute and `caption` holding the caption column's text."""
    path = existing_file(path)
    _check_folder(image_folder)
    rows = []
    if path.suffix.lower() in (".jsonl", ".json"):
        for lineno, obj in iter_jsonl(path):
            key = caption_key or ("title" if "title" in obj else "caption")
            row = dict(obj, caption=_need_str(path, lineno, obj, key))
            row["filepath"] = _image_path(path, lineno, _need_str(path, lineno, obj, img_key), image_folder)
            rows.append(row)
    else:
        sep = sep or _sniff_separator(path, img_key)
        csv_rows = _csv_rows(path, sep)
        _, header = next(csv_rows, (1, []))
        key = caption_key or ("title" if "title" in header else "caption")
        for column in (img_key, key):
            if column not in header:
                name = repr(column)
                if column != img_key and not caption_key:
                    name = "'title' (open_clip's) or 'caption'"
                raise InputError(f"{path}:1: missing column {name} (header split on "
                                 f"{SEPARATORS.get(sep, repr(sep))}: {header})"[:300])
        for lineno, fields in csv_rows:
            if not fields:
                continue  # a blank line
            if len(fields) != len(header):
                raise InputError(f"{path}:{lineno}: expected {len(header)} "
                                 f"{SEPARATORS.get(sep, repr(sep))}-separated fields like the header, "
                                 f"got {len(fields)}")
            row = dict(zip(header, fields))
            for column in (img_key, key):
                if not row[column]:
                    raise InputError(f"{path}:{lineno}: empty {column!r}")
            row["caption"] = row[key]
            row["filepath"] = _image_path(path, lineno, row[img_key], image_folder)
            rows.append(row)
    if not rows:
        raise InputError(f"{path}: no image-text pairs in the file")
    return rows


# ----------------------------------------------------------------------------- TRL preference JSONL
PREFERENCE_KEYS = ("prompt", "chosen", "rejected", "images")


def _message_text(path, where, key, value) -> tuple[str, list[dict] | None, int]:
    """A TRL field as (text, messages or None, image placeholders). Standard form: a string, images marked
    by "<image>". Conversational form: [{"role", "content"}] with content a string or a list of
    {"type": "text", "text"} / {"type": "image"} parts."""
    if isinstance(value, str) and value:
        return value, None, value.count(IMAGE_TOKEN)
    if not isinstance(value, list) or not value:
        raise InputError(f"{path}:{where}: key {key!r} must be a non-empty string or a list of "
                         f"{{'role', 'content'}} messages, got {value!r}"[:300])
    messages, n_images = [], 0
    for m, msg in enumerate(value):
        if not isinstance(msg, dict) or set(msg) != {"role", "content"} \
                or msg["role"] not in ("system", "user", "assistant"):
            raise InputError(f"{path}:{where}: {key}[{m}] must be {{'role': system|user|assistant, "
                             f"'content': ...}}, got {msg!r}"[:300])
        content = msg["content"]
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            parts = content
        else:
            raise InputError(f"{path}:{where}: {key}[{m}].content must be a string or a list of parts")
        texts = []
        for part in parts:
            if isinstance(part, dict) and part.get("type") == "image" and set(part) <= {"type", "image"}:
                texts.append(IMAGE_TOKEN)
                n_images += 1
            elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                raise InputError(f"{path}:{where}: {key}[{m}].content has a part that is neither "
                                 f"{{'type': 'text', 'text': ...}} nor {{'type': 'image'}}: {part!r}"[:300])
        text = "".join(t + "\n" if t == IMAGE_TOKEN else t for t in texts)  # "<image>\nquestion", LLaVA's way
        if texts[-1] == IMAGE_TOKEN:
            text = text.rstrip("\n")
        messages.append({"role": msg["role"], "content": text})
    return "\n".join(msg["content"] for msg in messages), messages, n_images


def read_preference_jsonl(path, image_folder=None) -> list[dict]:
    """TRL preference JSONL: `prompt`, `chosen`, `rejected` (strings, or conversational message lists) and
    `images` (a list of paths, relative to `image_folder` or the file's folder). Each image has one
    placeholder in the prompt ("<image>" in a string, {"type": "image"} in a message). Any other key is an
    error (TRL's own names only: a misspelt key is never silently dropped).

    Rows come back as {prompt, chosen, rejected: text (an image placeholder is "<image>"), images: absolute
    paths, image: the path when there is exactly one (older callers), prompt_messages: the conversational
    prompt as [{role, content: text}] or None, line}."""
    path = existing_file(path)
    _check_folder(image_folder)
    rows = []
    for lineno, obj in iter_jsonl(path):
        unknown = [k for k in obj if k not in PREFERENCE_KEYS]
        if unknown:
            hint = " (TRL's key is 'images', a list of paths)" if "image" in unknown else ""
            raise InputError(f"{path}:{lineno}: unknown key(s) {', '.join(map(repr, unknown))}{hint}; "
                             f"expected {', '.join(PREFERENCE_KEYS)}")
        for key in ("prompt", "chosen", "rejected"):
            if key not in obj:
                raise InputError(f"{path}:{lineno}: missing key {key!r}")
        prompt, prompt_messages, n_markers = _message_text(path, lineno, "prompt", obj["prompt"])
        chosen = _message_text(path, lineno, "chosen", obj["chosen"])[0]
        rejected = _message_text(path, lineno, "rejected", obj["rejected"])[0]
        paths = obj.get("images", [])
        if not isinstance(paths, list):
            raise InputError(f"{path}:{lineno}: key 'images' must be a list of paths, got {paths!r}"[:300])
        images = [_image_path(path, lineno, p, image_folder) for p in paths]
        if n_markers != len(images):
            raise InputError(f"{path}:{lineno}: {len(images)} image(s) but {n_markers} image placeholder(s) "
                             f"in the prompt; put '{IMAGE_TOKEN}' in a string prompt or {{'type': 'image'}} "
                             f"in a message, one per image")
        row = {"prompt": prompt, "chosen": chosen, "rejected": rejected, "images": images,
               "prompt_messages": prompt_messages, "line": lineno}
        if len(images) == 1:
            row["image"] = images[0]
        rows.append(row)
    if not rows:
        raise InputError(f"{path}: no preference pairs in the file")
    return rows


# ----------------------------------------------------------------------------- LLaVA turns without leaks
def _states(text: str, answer: str) -> bool:
    """Does `text` already give `answer` away? A box or a number (also as its word) if it occurs; a phrase
    if each of its words occurs ("What colour is the star? blue" gives away "blue star"). yes/no never."""
    answer, text = answer.lower(), text.lower()
    if answer in ("yes", "no"):
        return False

    def occurs(word: str) -> bool:
        return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None

    if answer.isdigit():
        n = int(answer)
        return occurs(answer) or (0 < n < len(NUMBER_WORDS) and occurs(NUMBER_WORDS[n]))
    if parse_box(answer):
        return occurs(answer)
    return all(occurs(word) for word in answer.split())


def llava_turns(scene: Scene, seed: int = 0, n_vqa: int = 3) -> list[tuple[str, str]]:
    """(question, answer) turns of one LLaVA item, ordered so that no turn gives away a later answer.

    Short questions come first, each kept only if nothing before it states its answer; then a grounding
    turn on one object and a referring turn on another (the same object would put the box the assistant
    just gave into the next question); the description comes last, since it states positions, colours and
    counts that every earlier question asks for."""
    turns: list[tuple[str, str]] = []
    said = ""

    def add(question, answer) -> bool:
        nonlocal said
        if _states(said + " " + question, answer):
            return False
        turns.append((question, answer))
        said += f" {question} {answer}"
        return True

    for q, ans in vqa(scene, seed):
        if len(turns) < n_vqa:
            add(q, ans)
    grounded = None
    for ref, box in grounding(scene):
        if add(f"Where is {ref}? Answer with a box.", box):
            grounded = parse_box(box)
            break
    for q, ans in referring(scene):
        if parse_box(q) != grounded and add(q, ans):
            break
    turns.append(("Describe the image.", caption(scene, "dsc", seed)))
    return turns


# ----------------------------------------------------------------------------- exporters
def _kind_for(i: int) -> str:
    """Mostly natural scenes, every 4th one text-rich (document / receipt / chart / ui in turn)."""
    return KINDS[1 + (i // 4) % 4] if i % 4 == 3 else "natural"


def _message(role: str, *parts: dict) -> list[dict]:
    """A one-message TRL conversation."""
    return [{"role": role, "content": list(parts)}]


def _text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def export_size(kind: str) -> int:
    """Default export size: 64 px for natural scenes; 448 px for text-rich ones, whose fine print
    (26 canvas units) would be under 2 px tall at 64 px."""
    return 64 if kind == "natural" else 448


def export(kind: str, n: int, out, split: str = "train", seed: int = 0, size: int | None = None,
           start: int = 0) -> Path:
    """Write `n` items of `split` to folder `out` in a user format; returns the main file written.

    kind: caption  captions.tsv (open_clip's CsvDataset defaults: tab, `filepath` absolute, `title`) and
                   captions.jsonl (paths relative to the file; `caption` and the other formats);
          llava    llava.json (LLaVA conversations, relative image paths);
          preference  preference.jsonl (TRL: conversational prompt with an image part, `images` list);
          png      PNG files + scenes.jsonl with the scene graphs.
    size: pixels; None = export_size(scene kind)."""
    if kind not in ("caption", "llava", "preference", "png"):
        raise InputError(f"unknown export kind {kind!r}; expected caption, llava, preference or png")
    if not isinstance(n, int) or n < 1:
        raise InputError(f"export needs n >= 1 items, got n={n!r}")
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
        render(scene, size or export_size(scene.kind)).save(out / rel)
        if kind == "caption":
            rows.append({"filepath": rel, "caption": caption(scene, "dsc", seed),
                         "alttext": caption(scene, "alttext", seed), "ssc": caption(scene, "ssc", seed),
                         "dsc_plus": caption(scene, "dsc+", seed), "afc": caption(scene, "afc", seed)})
        elif kind == "llava":
            convs = []
            for t, (q, ans) in enumerate(llava_turns(scene, seed)):
                convs += [{"from": "human", "value": (IMAGE_TOKEN + "\n" if t == 0 else "") + q},
                          {"from": "gpt", "value": ans}]
            rows.append({"id": f"{split}-{seed}-{i}", "image": rel, "conversations": convs})
        elif kind == "preference":
            rows.append({"prompt": _message("user", {"type": "image"}, _text_part(pair["prompt"])),
                         "chosen": _message("assistant", _text_part(pair["chosen"])),
                         "rejected": _message("assistant", _text_part(pair["rejected"])),
                         "images": [rel]})
        else:
            rows.append({"filepath": rel, "scene": scene_to_dict(scene)})
    if kind == "caption":
        with open(out / "captions.tsv", "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, delimiter="\t", lineterminator="\n")  # quotes a field only when it must
            writer.writerow(["filepath", "title"] + list(rows[0])[2:])
            writer.writerows([str((out / r["filepath"]).resolve())] + list(r.values())[1:] for r in rows)
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
