"""Text of a scene, read off its graph: captions in five formats, VQA, POPE, grounding and referring.

Everything here is TRUE to the scene graph (it is the gold), and a pure function of (scene, seed).
Human-style formats (SSC / DSC / DSC+) describe emblems only visually; AltText names them, and AFC fuses
the names its AltText actually emitted (so a dropped or misaligned name carries through, see fused_names).
"""

from __future__ import annotations

import math
import re

from ..tokenizer import get_tokenizer
from .world import (
    COLORS,
    EMBLEM_BADGE,
    EMBLEM_GLYPHS,
    EMBLEMS,
    SHAPE_PRIOR,
    SHAPES,
    SPLITS,
    THEMES,
    Obj,
    Scene,
    glyph_color,
    rng_for,
    scene_from_rng,
)

CAPTION_FORMATS = ("alttext", "ssc", "dsc", "dsc+", "afc")
DSC_MAX_TOKENS = 77  # CLIP's text limit; DSC and AFC stay within it under the bundled tokenizer,
DSC_BUDGET = DSC_MAX_TOKENS - 2  # leaving room for a format control token and <|endoftext|>
NUMBER_WORDS = ["no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]

_PIECES = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+")


def approx_tokens(text: str) -> int:
    """Token count without a tokenizer (words of <= 4 letters count 1, longer ones one per 4 letters,
    digits one per 2, punctuation one per character): an estimate for other tokenizers' budgets."""
    total = 0
    for piece in _PIECES.findall(text):
        core = piece.strip()
        if not core:
            continue
        if core.isalpha():
            total += max(1, math.ceil(len(core) / 4))
        elif core.isdigit():
            total += math.ceil(len(core) / 2)
        else:
            total += len(core)
    return total


def token_count(text: str) -> int:
    """Tokens of `text` under the bundled BPE (data/tokenizer.py; loaded once, cached there)."""
    return len(get_tokenizer().encode_ordinary(text))


def a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def plural(word: str, n: int) -> str:
    if n == 1:
        return word
    return word + ("es" if word.endswith(("s", "x", "sh", "ch")) else "s")


def count_phrase(n: int, word: str) -> str:
    return f"{NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else n} {plural(word, n)}"


def visual_name(obj: Obj) -> str:
    """What a person sees: "red star", "blue hexagon badge", "Wi-Fi toggle", "Tea bar"."""
    if obj.shape in ("toggle", "checkbox", "button"):
        return f"{obj.label} {obj.shape}"
    if obj.shape == "bar":
        return f"{obj.label} bar"
    return f"{obj.color} {obj.shape}" + (" badge" if obj.emblem is not None else "")


def position(obj_or_box, scene: Scene) -> str:
    """Coarse 3x3 position of a box centre: "top left", "center", "bottom", ..."""
    box = obj_or_box.box if hasattr(obj_or_box, "box") else obj_or_box
    cx, cy = (box[0] + box[2]) / 2 / scene.width, (box[1] + box[3]) / 2 / scene.height
    row = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else ""
    col = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else ""
    return f"{row} {col}".strip() or "center"


def at_position(pos: str) -> str:
    return ("in the center" if pos == "center"
            else f"on the {pos}" if pos in ("left", "right")
            else f"at the {pos}")


def area(box) -> int:
    return (box[2] - box[0]) * (box[3] - box[1])


def shapes_of(scene: Scene) -> list[Obj]:
    """The scene's shape objects (not chart bars or UI widgets)."""
    return [o for o in scene.objects if o.shape in SHAPES]


def box_to_grid(box, scene: Scene) -> list[int]:
    """Canvas box -> integers on the 0-999 grid of the image (Ferret / MM1.5 convention)."""
    return [round(box[0] / scene.width * 999), round(box[1] / scene.height * 999),
            round(box[2] / scene.width * 999), round(box[3] / scene.height * 999)]


def format_box(grid: list[int]) -> str:
    return "[" + ", ".join(str(int(v)) for v in grid) + "]"


def parse_box(text: str) -> list[int] | None:
    """The first "[x1, y1, x2, y2]" in a model's text, or None."""
    m = re.search(r"\[\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*\]", text)
    return [int(v) for v in m.groups()] if m else None


def iou(a_box, b_box) -> float:
    ix = max(0, min(a_box[2], b_box[2]) - max(a_box[0], b_box[0]))
    iy = max(0, min(a_box[3], b_box[3]) - max(a_box[1], b_box[1]))
    inter = ix * iy
    union = area(a_box) + area(b_box) - inter
    return inter / union if union > 0 else 0.0


def reference(obj: Obj, scene: Scene) -> str | None:
    """A referring expression that picks out exactly this object ("the red star on the left"), or None."""
    name = visual_name(obj)
    same = [o for o in scene.objects if visual_name(o) == name]
    if len(same) == 1:
        return f"the {name}"
    pos = position(obj, scene)
    if sum(position(o, scene) == pos for o in same) == 1:
        return f"the {name} {at_position(pos)}"
    return None


def describe_emblem(obj: Obj, names: dict | None) -> str:
    """An emblem badge: by the name `names` gives it (id(obj) -> name, AFC) plus its looks, else visually."""
    looks = (f"{obj.size + ' ' if obj.size else ''}{obj.color} {obj.shape} badge"
             f" with {a(glyph_color(obj.color))} glyph")
    name = (names or {}).get(id(obj))
    return f"the {name} emblem, {a(looks)}," if name else a(looks)


def fused_names(scene: Scene, alt: str) -> dict:
    """AltText fusion: id(badge) -> the name AFC gives it, from the emblem names the AltText actually emitted.
    A badge whose own name was emitted gets it; names of emblems the scene lacks (a misaligned AltText) go
    to the remaining badges in order, as a fusion captioner that trusts its AltText would; other badges get
    no name (the AltText dropped it)."""
    found = [(m.start(), e) for e, name in enumerate(EMBLEMS)
             if (m := re.search(rf"\b{name}\b", alt, re.IGNORECASE))]
    said = [e for _, e in sorted(found)]  # in the order the AltText names them
    badges = [o for o in scene.objects if o.emblem is not None]
    out = {id(o): EMBLEMS[o.emblem] for o in badges if o.emblem in said}
    strays = [e for e in said if e not in {o.emblem for o in badges}]
    out.update({id(o): EMBLEMS[e] for o, e in zip([o for o in badges if id(o) not in out], strays)})
    return out


def _relation(p: Obj, q: Obj) -> str | None:
    """Spatial relation of p to q when their boxes are clearly separated on the dominant axis."""
    dx = (p.box[0] + p.box[2]) - (q.box[0] + q.box[2])
    dy = (p.box[1] + p.box[3]) - (q.box[1] + q.box[3])
    if abs(dx) >= abs(dy):
        if p.box[2] <= q.box[0]:
            return "to the left of"
        if q.box[2] <= p.box[0]:
            return "to the right of"
    else:
        if p.box[3] <= q.box[1]:
            return "above"
        if q.box[3] <= p.box[1]:
            return "below"
    return None


def _fit(sentences: list[str], budget: int) -> str:
    """Greedily keep sentences (in priority order) while the paragraph stays within `budget` tokens."""
    kept: list[str] = []
    for s in sentences:
        if token_count(" ".join(kept + [s])) <= budget:
            kept.append(s)
    return " ".join(kept)


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


# ----------------------------------------------------------------------------- natural scenes
def _natural_sentences(scene: Scene, rng, dense: bool, names: dict | None) -> list[str]:
    objs = sorted(shapes_of(scene), key=lambda o: -area(o.box))
    bg = f"{scene.texture} {scene.background}" if dense and scene.texture != "plain" else scene.background
    n = len(objs)
    what = ("one shape" if n == 1 else count_phrase(n, "shape")) if n else "no shapes"
    out = [rng.choice([f"The image shows {what} on a {bg} background.",
                       f"{_cap(what)} on a {bg} background."])]
    # AFC: the AltText's facts (named emblems) come first, so the 77-token budget never drops them
    for o in sorted(objs, key=lambda o: id(o) not in names) if names else objs:
        where = at_position(position(o, scene))
        if o.emblem is not None:
            thing = describe_emblem(o, names)
        else:
            thing = a(f"{o.size} {o.color} {o.shape}")
        verb = rng.choice(["is", "sits", "appears"])
        out.append(f"{_cap(thing)} {verb} {where}.".replace(",.", "."))
    for t in scene.texts:
        out.append(f'A {t.color} label {at_position(position(t, scene))} reads "{t.text}".')
    if dense:
        shape_counts = {s: sum(o.shape == s for o in objs) for s in SHAPES}
        present = [count_phrase(c, s) for s, c in shape_counts.items() if c]
        if len(present) > 1:
            out.append(f"There are {', '.join(present[:-1])} and {present[-1]}.")
        colors = {}
        for o in objs:
            colors[o.color] = colors.get(o.color, 0) + 1
        if n > 1:
            out.append("By colour: " + ", ".join(f"{c} {col}" for col, c in colors.items()) + ".")
        if n > 1 and area(objs[0].box) > area(objs[1].box):
            out.append(f"The largest shape is the {visual_name(objs[0])}.")
        if n > 1 and area(objs[-1].box) < area(objs[-2].box):
            out.append(f"The smallest shape is the {visual_name(objs[-1])}.")
        for p in objs:  # each object against its nearest neighbour
            others = [q for q in objs if q is not p]
            if not others:
                break
            q = min(others, key=lambda q: abs(q.box[0] - p.box[0]) + abs(q.box[1] - p.box[1]))
            rel, rp, rq = _relation(p, q), reference(p, scene), reference(q, scene)
            if rel and rp and rq:
                out.append(f"{_cap(rp)} is {rel} {rq}.")
        for o in objs:
            if o.emblem is not None:
                cells = sum(map(sum, EMBLEM_GLYPHS[o.emblem]))
                out.append(f"The glyph on the {visual_name(o)} is a symmetric pattern of {cells} "
                           f"{glyph_color(o.color)} cells.")
        if scene.texture != "plain":
            out.append(f"The {scene.background} background has a {scene.texture} texture.")
    return out


def _natural_ssc(scene: Scene, rng) -> str:
    objs = sorted(shapes_of(scene), key=lambda o: -area(o.box))
    if not objs:
        return f"An empty {scene.background} background."
    main = objs[0]
    thing = (describe_emblem(main, False) if main.emblem is not None
             else a(f"{main.size} {main.color} {main.shape}"))
    options = [f"{_cap(thing)} on a {scene.background} background.",
               f"{_cap(thing)} {at_position(position(main, scene))} of the picture."]
    if len(objs) > 1:
        options.append(f"{_cap(thing)} with {count_phrase(len(objs) - 1, 'other shape')}.")
    return rng.choice(options)


# ----------------------------------------------------------------------------- text-rich scenes
def _figure(scene: Scene, names: dict | None) -> list[str]:
    objs = shapes_of(scene)
    if not objs:
        return []
    things = [describe_emblem(o, names).rstrip(",") if o.emblem is not None else a(f"{o.color} {o.shape}")
              for o in objs]
    return [f"A figure shows {', '.join(things[:-1]) + ' and ' if len(things) > 1 else ''}{things[-1]}."]


def _document_sentences(scene: Scene, dense: bool, names: dict | None) -> list[str]:
    m = scene.meta
    out = [f'A document page titled "{m["title"]}" with {count_phrase(len(m["lines"]), "line")} of text.']
    out += _figure(scene, names)
    out += [f'Line {i + 1} reads "{line}"' for i, line in enumerate(m["lines"])]
    out.append(f"The page number {m['page']} is at the bottom.")
    if dense:
        out.append("The title is printed in large black letters at the top of a white page.")
    return out


def _receipt_sentences(scene: Scene, dense: bool) -> list[str]:
    m = scene.meta
    out = [f"A printed receipt from {m['store']} dated {m['date']}.",
           f"It lists {count_phrase(len(m['items']), 'item')} and the total is {m['total']}."]
    out += [f"{it['qty']} x {it['item']} cost {it['amount']}." for it in m["items"]]
    if dense:
        out.append(f"The white receipt lies on a {scene.background} background.")
    return out


def _chart_sentences(scene: Scene, dense: bool) -> list[str]:
    m = scene.meta
    cats, vals = m["categories"], m["values"]
    hi, lo = vals.index(max(vals)), vals.index(min(vals))
    color = scene.objects[0].color
    out = [f'A bar chart titled "{m["title"]}" with {count_phrase(len(cats), color + " bar")}.',
           f"The highest bar is {cats[hi]} at {vals[hi]} and the lowest is {cats[lo]} at {vals[lo]}."]
    out += [f"{c} has a value of {v}." for c, v in zip(cats, vals)]
    if dense:
        order = [cats[i] for i in sorted(range(len(vals)), key=lambda i: -vals[i])]
        out.append("From highest to lowest: " + ", ".join(order) + ".")
        out.append("The values are printed above the bars and the labels below them on a white background.")
    return out


def _ui_sentences(scene: Scene, dense: bool) -> list[str]:
    m = scene.meta
    widgets = [o for o in scene.objects if o.shape in ("toggle", "checkbox")]
    buttons = [o for o in scene.objects if o.shape == "button"]
    out = [f"A {m['screen']} screen with {count_phrase(len(widgets), 'setting')} and "
           f"{count_phrase(len(buttons), 'button')}."]
    out += [f"The {o.label} {o.shape} is {o.state}." for o in widgets]
    out.append("The buttons read " + ", ".join(f'"{b.label}"' for b in buttons) + "." if len(buttons) > 1
               else f'The button reads "{buttons[0].label}".')
    if dense:
        out += [f"The {b.label} button is {b.color} and sits {at_position(position(b, scene))}."
                for b in buttons]
        out.append(f"The title {m['screen']} is in a dark blue header at the top.")
    return out


def _ssc_text_rich(scene: Scene) -> str:
    m = scene.meta
    if scene.kind == "document":
        return f'A document page titled "{m["title"]}".'
    if scene.kind == "receipt":
        return f"A receipt from {m['store']} with a total of {m['total']}."
    if scene.kind == "chart":
        return f'A bar chart of "{m["title"]}" with {count_phrase(len(m["values"]), "bar")}.'
    return f"A {m['screen']} settings screen of a phone app."


def _sentences(scene: Scene, rng, dense: bool, names: dict | None) -> list[str]:
    if scene.kind == "natural":
        return _natural_sentences(scene, rng, dense, names)
    if scene.kind == "document":
        return _document_sentences(scene, dense, names)
    if scene.kind == "receipt":
        return _receipt_sentences(scene, dense)
    if scene.kind == "chart":
        return _chart_sentences(scene, dense)
    return _ui_sentences(scene, dense)


# ----------------------------------------------------------------------------- AltText
BOILERPLATE = ["Free stock image", "Click to enlarge", "Royalty free", "HD wallpaper", "Buy now",
               "| Shapes Emporium", "vector clipart", "best price", "download", "image may contain",
               "Official store", "sticker pack", "photo by user", "new arrivals"]


def _alt_pieces(scene: Scene, rng) -> list[str]:
    pieces = []
    for o in scene.objects:
        if o.emblem is not None and rng.random() < 0.9:
            name = EMBLEMS[o.emblem]
            pieces.append(rng.choice([f"{name} emblem", f"the {name} logo", f"Official {name} badge",
                                      f"{name} sticker", f"{name.lower()} emblem", name]))
    shapes = shapes_of(scene)
    for o in rng.sample(shapes, min(len(shapes), rng.randint(0, 2))):
        pieces.append(rng.choice([f"{o.color} {o.shape}", plural(o.shape, 2), o.shape,
                                  f"{o.shape} {o.color}"]))
    m = scene.meta
    facts = {"document": ["title", "page"], "receipt": ["store", "total"], "chart": ["title"],
             "ui": ["screen"]}
    for key in facts.get(scene.kind, []):
        if rng.random() < 0.7:
            pieces.append(f"{m[key]}" if key != "page" else f"page {m[key]}")
    if scene.kind == "ui":
        pieces.append(rng.choice(["app screenshot", "settings UI", "mobile screen"]))
    elif scene.kind != "natural":
        pieces.append(rng.choice({"document": ["scan pdf", "document page"],
                                  "receipt": ["receipt scan", "bill"],
                                  "chart": ["bar graph", "chart png"]}[scene.kind]))
    for t in scene.texts[:1]:
        if scene.kind == "natural" and rng.random() < 0.5:
            pieces.append(t.text)
    return pieces


def alttext(scene: Scene, seed: int = 0, misalign: float = 0.1) -> str:
    """Web-like AltText: entity names, partial mentions, file-name junk, boilerplate; with
    probability `misalign` it describes an unrelated scene (as scraped AltTexts often do)."""
    rng = rng_for("alttext", scene.uid, seed)
    if rng.random() < misalign:
        other_split = scene.uid.split("/")[0] if scene.uid.split("/")[0] in SPLITS else "web"
        scene = scene_from_rng(rng_for("unrelated", scene.uid, seed), other_split, "natural", "unrelated")
    pieces = _alt_pieces(scene, rng)
    if rng.random() < 0.6:
        pieces.append(rng.choice(BOILERPLATE))
    if rng.random() < 0.5:
        pieces.insert(0, rng.choice([f"IMG_{rng.randint(1000, 9999)}.jpg",
                                     f"DSC{rng.randint(10, 9999):04d}",
                                     f"photo-{rng.randint(1, 999)}-hd.png",
                                     f"stock-{rng.randint(100, 99999)}",
                                     "untitled.png", f"image{rng.randint(1, 60)}"]))
    if not pieces:
        pieces.append(rng.choice(BOILERPLATE))
    tail = pieces[1:]
    rng.shuffle(tail)
    pieces = pieces[:1] + tail
    sep = rng.choice([" - ", " | ", ", ", " "])
    return sep.join(pieces)


def caption(scene: Scene, fmt: str, seed: int = 0, misalign: float = 0.1) -> str:
    """Caption of `scene` in `fmt` (one of CAPTION_FORMATS); see the module docstring."""
    if fmt not in CAPTION_FORMATS:
        raise ValueError(f"unknown caption format {fmt!r}; expected one of {CAPTION_FORMATS}")
    if fmt == "alttext":
        return alttext(scene, seed, misalign)
    rng = rng_for("caption", scene.uid, fmt, seed)
    if fmt == "ssc":
        return _natural_ssc(scene, rng) if scene.kind == "natural" else _ssc_text_rich(scene)
    names = fused_names(scene, alttext(scene, seed, misalign)) if fmt == "afc" else None
    sentences = _sentences(scene, rng, dense=fmt == "dsc+", names=names)
    if fmt == "dsc+":
        return " ".join(sentences)
    return _fit(sentences, DSC_BUDGET)


# ----------------------------------------------------------------------------- VQA
def vqa(scene: Scene, seed: int = 0) -> list[tuple[str, str]]:
    """Short-answer questions on colour / count / position / existence / text reading."""
    rng = rng_for("vqa", scene.uid, seed)
    qa: list[tuple[str, str]] = []
    m = scene.meta
    objs = shapes_of(scene)
    if scene.kind in ("natural", "document") and (objs or scene.kind == "natural"):
        qa.append(("How many shapes are there?", str(len(objs))))
        for s in dict.fromkeys(o.shape for o in objs):  # ordered: set order changes per process
            same = [o for o in objs if o.shape == s]
            qa.append((f"How many {plural(s, 2)} are there?", str(len(same))))
            if len(same) == 1:
                qa.append((f"What colour is the {s}?", same[0].color))
        absent = [s for s in SHAPES if s not in {o.shape for o in objs}]
        if absent:
            qa.append((f"How many {plural(rng.choice(absent), 2)} are there?", "0"))
        for o in objs:
            ref = reference(o, scene)
            if ref:
                qa.append((f"Where is {ref}?", position(o, scene)))
        # ordered: no set
        color_counts = {c: [o for o in objs if o.color == c] for c in dict.fromkeys(o.color for o in objs)}
        for c, same in color_counts.items():
            if len(same) == 1:
                qa.append((f"What shape is the {c} object?", same[0].shape))
        if objs:
            o = rng.choice(objs)
            qa.append((f"Is there {a(o.color + ' ' + o.shape)}?", "yes"))
            fake = (rng.choice(["red", "green", "blue", "yellow", "purple"]), rng.choice(SHAPES))
            if not any((o.color, o.shape) == fake for o in objs):
                qa.append((f"Is there {a(fake[0] + ' ' + fake[1])}?", "no"))
        big = sorted(objs, key=lambda o: -area(o.box))
        if len(big) > 1 and area(big[0].box) > area(big[1].box):
            qa.append(("Which shape is the largest?", visual_name(big[0])))
        if scene.kind == "natural" and scene.texts:
            qa.append(("What does the label say?", scene.texts[0].text))
    if scene.kind == "document":
        qa += [("What is the title of the document?", m["title"]),
               ("What is the page number?", str(m["page"])),
               ("How many lines of text are under the title?", str(len(m["lines"])))]
    elif scene.kind == "receipt":
        qa += [("What is the total?", m["total"]), ("What is the name of the store?", m["store"]),
               ("What is the date on the receipt?", m["date"]),
               ("How many items are listed?", str(len(m["items"])))]
        it = rng.choice(m["items"])
        qa += [(f"How many {it['item']} were bought?", str(it["qty"])),
               (f"How much did the {it['item']} cost?", it["amount"])]
    elif scene.kind == "chart":
        cats, vals = m["categories"], m["values"]
        qa += [("What is the title of the chart?", m["title"]), ("How many bars are there?", str(len(vals))),
               ("Which category has the highest value?", cats[vals.index(max(vals))]),
               ("Which category has the lowest value?", cats[vals.index(min(vals))])]
        i = rng.randrange(len(cats))
        qa.append((f"What is the value of {cats[i]}?", str(vals[i])))
    elif scene.kind == "ui":
        qa.append(("What is the title of the screen?", m["screen"]))
        qa.append(("How many buttons are there?", str(sum(o.shape == "button" for o in scene.objects))))
        for o in scene.objects:
            if o.shape == "toggle":
                qa.append((f"Is {o.label} turned on?", "yes" if o.state == "on" else "no"))
            elif o.shape == "checkbox":
                qa.append((f"Is {o.label} checked?", "yes" if o.state == "checked" else "no"))
    rng.shuffle(qa)
    return qa


# ----------------------------------------------------------------------------- POPE
def _cooccurrence(s: str, present: set[str]) -> int:
    return sum(s in theme and p in theme for theme in THEMES for p in present)


def pope(scene: Scene, negatives: str = "random", seed: int = 0) -> list[tuple[str, str]]:
    """POPE yes/no object-existence questions, balanced; negatives are shapes truly absent from the
    graph, drawn at random, by world frequency ("popular"), or by co-occurrence with the present
    shapes ("adversarial")."""
    if negatives not in ("random", "popular", "adversarial"):
        raise ValueError(f"unknown POPE negatives {negatives!r}; expected random, popular or adversarial")
    rng = rng_for("pope", scene.uid, negatives, seed)
    present = sorted({o.shape for o in shapes_of(scene)})
    absent = [s for s in SHAPES if s not in present]
    yes = rng.sample(present, min(3, len(present)))
    k = min(max(len(yes), 1), len(absent))
    if negatives == "random":
        no = rng.sample(absent, k)
    else:
        tie = {s: rng.random() for s in absent}  # random tie-break among equally popular shapes
        if negatives == "popular":
            key = lambda s: (-SHAPE_PRIOR[s], tie[s])
        else:
            key = lambda s: (-_cooccurrence(s, set(present)), -SHAPE_PRIOR[s], tie[s])
        no = sorted(absent, key=key)[:k]
    qa = [(f"Is there {a(s)} in the image?", "yes") for s in yes] + [(f"Is there {a(s)} in the image?", "no")
                                                                      for s in no]
    rng.shuffle(qa)
    return qa


# ----------------------------------------------------------------------------- grounding / referring
def _unique_texts(scene: Scene):
    counts: dict[str, int] = {}
    for t in scene.texts:
        counts[t.text] = counts.get(t.text, 0) + 1
    return [t for t in scene.texts if counts[t.text] == 1]


def grounding(scene: Scene) -> list[tuple[str, str]]:
    """(referring expression, "[x1, y1, x2, y2]" on the 0-999 grid) for every uniquely nameable item; the box
    is the tight box of the drawn pixels (Obj.bbox), not the layout square."""
    out = []
    for o in scene.objects:
        ref = reference(o, scene)
        if ref:
            out.append((ref, format_box(box_to_grid(o.bbox, scene))))
    for t in _unique_texts(scene):
        out.append((f'the text "{t.text}"', format_box(box_to_grid(t.bbox, scene))))
    return out


def referring(scene: Scene) -> list[tuple[str, str]]:
    """(question with a box, name of what is in it)."""
    out = []
    for o in scene.objects:
        if reference(o, scene):
            out.append((f"What is the object at {format_box(box_to_grid(o.bbox, scene))}?", visual_name(o)))
    for t in _unique_texts(scene):
        out.append((f"What does the text at {format_box(box_to_grid(t.bbox, scene))} say?", t.text))
    return out


# ----------------------------------------------------------------------------- checking free text
_SHAPE_WORDS = {plural(s, 2): s for s in SHAPES} | {s: s for s in SHAPES}


def object_mentions(text: str) -> list[tuple[str | None, str]]:
    """(colour or None, shape) for every shape word in free text: "two red stars" -> [("red", "star")].
    A glyph description ("a pattern of 9 white squares") names the badge's cells, not objects."""
    # punctuation stays a token ("red | star" is no red star); "a pattern of 9 white squares" is a glyph
    words = re.findall(r"[a-z]+|[0-9]+|[^\sa-z0-9]", text.lower())
    glyph = lambda i: "pattern" in words[max(0, i - 4): i] and "." not in words[max(0, i - 4): i]
    return [(words[i - 1] if i and words[i - 1] in COLORS else None, _SHAPE_WORDS[w])
            for i, w in enumerate(words) if w in _SHAPE_WORDS and not glyph(i)]


def hallucinations(text: str, scene: Scene) -> list[tuple[str | None, str]]:
    """Mentions in `text` of shapes (with their colour, when given) that the scene does not contain:
    the numerator of a CHAIR-style hallucination rate."""
    present = {(o.color, o.shape) for o in shapes_of(scene)}
    shapes = {o.shape for o in shapes_of(scene)}
    return [(c, s) for c, s in object_mentions(text)
            if (s not in shapes if c is None else (c, s) not in present)]


# ----------------------------------------------------------------------------- world knowledge
PLACE_ENDS = ["vale", "ford", "port", "holm", "wick", "mere", "stead", "crag"]
MEANINGS = ["a good harvest", "safe travel", "a long friendship", "luck at sea", "a fair trade",
            "a new home", "victory in games", "a quiet winter"]
SIDES = {"triangle": 3, "square": 4, "diamond": 4, "pentagon": 5, "hexagon": 6, "cross": 12, "star": 10,
         "arrow": 7}


def emblem_facts(emblem: int) -> dict:
    """Fixed made-up lore of an emblem (home town, year, meaning): knowledge only text carries."""
    rng = rng_for("lore", emblem)
    shape, color = EMBLEM_BADGE[emblem]
    home = EMBLEMS[rng.randrange(len(EMBLEMS))][:4] + rng.choice(PLACE_ENDS)
    return {"name": EMBLEMS[emblem], "shape": shape, "color": color, "glyph": glyph_color(color),
            "home": home, "year": rng.randint(1650, 1990), "meaning": rng.choice(MEANINGS)}

