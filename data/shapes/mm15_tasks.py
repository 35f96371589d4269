"""MM1.5's data in ShapesWorld: images at their real shapes and the SFT categories, with boxes in pixels.

Scenes live on a square 1000 x 1000 canvas. Here each kind gets the aspect ratio of what it stands for
(documents 3:4 portrait, receipts 9:20 tall, charts 16:9 wide, UI screens 9:19.5 phone-shaped, natural
scenes square) and a size drawn per image around the tile size, so dynamic splitting has something to do.
The canvas is stretched to that shape (text and shapes get thinner or wider, the layout is kept), and every
box is given in the image's own pixels: canvas x -> x * W / 1000, y -> y * H / 1000.

    item = task_item("refer_ground", "train", 0, seed=0, tile=64)
    item["images"]    # [(Scene, W, H)]; render_shaped(scene, W, H) -> PIL image of W x H pixels
    item["question"], item["answer"], item["box"]   # box: gold [x1, y1, x2, y2] in pixels, or None
    item_texts(dict(item, pil=...))  # (question, answer) with "<box>" written as box_to_text does
    pools = ItemPools(seed=0, tile=64, n_cpt=300, n_train=200, n_eval=100)  # pre-rendered (PIL) items

Boxes in text (MM1.5, Ferret): "[x1, y1, x2, y2]" on 0-999 of the ORIGINAL image, floor(x / W * 1000)
clipped to 999 (not round(x / W * 999), the other convention in circulation; data.shapes.box_to_grid).
Code, one of MM1.5's SFT categories, has no counterpart in this world.
"""

from __future__ import annotations

import copy
import math
import random
import re
from collections import Counter

from PIL import Image, ImageDraw

from .. import InputError
from ..metrics import object_scores, words
from .formats import IMAGE_TOKEN, load_image, read_llava_json
from .preferences import PROMPT_DESCRIBE, described, drop_unfinished, normalize, object_sentence
from .render import render
from .tasks import multi_image, text_passage, video
from .text import caption, emblem_facts, iou, parse_box, reference, shapes_of, visual_name, vqa
from .world import EMBLEMS, Scene, make_scene, rng_for

CATEGORIES = ("general", "describe", "text_rich", "refer_ground", "knowledge", "math", "multi_image",
              "text_only", "video", "ui")
SUBTASKS = dict(refer_ground=("grounding", "referring"),  # scored apart
                ui=("ui_list", "ui_ground", "ui_refer"))  # Ferret-UI's listing, Grd-i (tap X -> box), Ref-i
EVAL_TASKS = tuple(task for c in CATEGORIES for task in SUBTASKS.get(c, (c,)))
BOX_TASKS = ("grounding", "ui_ground")  # answers are boxes, scored at IoU >= 0.5
CLIP_STEPS, VIDEO_FRAMES = 12, 4  # a clip's time steps, and the frames sampled from it uniformly
ASPECT = {"natural": 1.0, "document": 3 / 4, "receipt": 9 / 20, "chart": 16 / 9, "ui": 9 / 19.5}  # W / H
LONG_SIDE = {"natural": (0.75, 2.5), "document": (1.5, 3.5), "receipt": (1.5, 3.5), "chart": (1.5, 3.5),
             "ui": (1.5, 3.5)}  # the long side's range in tiles: text-rich pages are large
TEXT_RICH = ("document", "receipt", "chart")


def resolve_mixture(ratios: dict, groups: dict) -> dict:
    """MM1.5's recipe: single-image categories weighted relative to general, the groups (single, and the
    others: multi-image, text-only) given their shares -> {category: share of SFT samples}, summing to 1."""
    single, total = sum(ratios.values()), sum(groups.values())
    if single <= 0 or total <= 0 or "single" not in groups:
        raise InputError(f"mixture {ratios} / {groups}: expected positive ratios and a `single` group")
    shares = {name: groups["single"] / total * value / single for name, value in ratios.items()}
    return shares | {name: value / total for name, value in groups.items() if name != "single"}


def native_size(kind: str, rng: random.Random, tile: int) -> tuple[int, int]:
    """(W, H) pixels of an image of this kind: its aspect ratio, the long side drawn in LONG_SIDE tiles."""
    lo, hi = LONG_SIDE[kind]
    long_side = round(rng.uniform(lo, hi) * tile)
    aspect = ASPECT[kind]
    if aspect >= 1:
        return long_side, max(1, round(long_side / aspect))
    return max(1, round(long_side * aspect)), long_side


def render_shaped(scene: Scene, width: int, height: int) -> Image.Image:
    """The scene drawn at its long side, then stretched to width x height (RGB)."""
    return render(scene, size=max(8, width, height)).resize((width, height), Image.Resampling.BILINEAR)


def box_px(canvas_box, scene: Scene, width: int, height: int) -> list[float]:
    """A canvas box (x1, y1, x2, y2) in the pixels of the width x height image."""
    sx, sy = width / scene.width, height / scene.height
    return [canvas_box[0] * sx, canvas_box[1] * sy, canvas_box[2] * sx, canvas_box[3] * sy]


def _shaped(scene: Scene, rng: random.Random, tile: int):
    return (scene, *native_size(scene.kind, rng, tile))


def _is_number(text: str) -> bool:
    return re.fullmatch(r"\d+(\.\d+)?", text) is not None  # counts, values, totals (not dates)


def task_item(category: str, split: str, index: int, seed: int = 0, tile: int = 64) -> dict:
    """Item `index` of a category (a pure function of the arguments): images [(scene, W, H)], question,
    answer, box (grounding: the gold box in pixels of the first image, the answer is "<box>")."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
    rng = rng_for("mm15", category, split, index, seed)
    for attempt in range(100):  # scenes without a fitting question are skipped, deterministically
        sub = f"{index}.{attempt}"
        item = _try_item(category, split, sub, seed, tile, rng)
        if item:
            return dict(item, category=category, box=item.get("box"))
    raise RuntimeError(f"no {category} item found for {split}/{index}")


def _try_item(category, split, sub, seed, tile, rng):
    if category == "general":
        scene = make_scene(split, hash_index(sub), seed, "natural")
        qa = [(q, a) for q, a in vqa(scene, seed) if not _is_number(a) and "label" not in q]
        return qa and dict(images=[_shaped(scene, rng, tile)], question=qa[0][0], answer=qa[0][1])
    if category == "describe":  # dpo_bdhs.py's CHAIR prompt, answered as its gold descriptions are written
        scene = make_scene(split, hash_index(sub), seed, "natural")
        answer = " ".join(object_sentence(o, scene) for o in described(scene))
        return answer and dict(images=[_shaped(scene, rng, tile)], question=PROMPT_DESCRIBE, answer=answer)
    if category in ("text_rich", "math"):
        kind = rng.choice(TEXT_RICH + (("natural",) if category == "math" else ()))
        scene = make_scene(split, hash_index(sub), seed, kind)
        qa = [(q, a) for q, a in vqa(scene, seed) if _is_number(a) == (category == "math")]
        return qa and dict(images=[_shaped(scene, rng, tile)], question=qa[0][0], answer=qa[0][1])
    if category == "refer_ground":
        scene = make_scene(split, hash_index(sub), seed, "natural")
        named = [(o, reference(o, scene)) for o in shapes_of(scene)]
        named = [(o, ref) for o, ref in named if ref]
        if not named:
            return None
        obj, ref = rng.choice(named)
        shaped = _shaped(scene, rng, tile)
        box = box_px(obj.bbox, scene, shaped[1], shaped[2])
        if rng.random() < 0.5:  # grounding: text -> box
            return dict(images=[shaped], question=f"Where is {ref}? Give its box.", answer="<box>", box=box,
                        task="grounding")
        return dict(images=[shaped], question="What is the object at <box>?", answer=visual_name(obj),
                    box=box, task="referring")
    if category == "knowledge":
        scene = make_scene(split, hash_index(sub), seed, "natural")
        badges = [o for o in scene.objects if o.emblem is not None]
        if not badges:
            return None
        obj = badges[0]
        return dict(images=[_shaped(scene, rng, tile)], answer=EMBLEMS[obj.emblem],
                    question=f"What is the name of the emblem on the {obj.color} {obj.shape} badge?")
    if category == "multi_image":
        scenes, question, answer = multi_image(split, hash_index(sub), seed)
        return dict(images=[_shaped(s, rng, tile) for s in scenes], question=question, answer=answer)
    if category == "ui":  # a phone-shaped screen: its widgets (toggles, checkboxes, buttons) top to bottom
        scene = make_scene(split, hash_index(sub), seed, "ui")
        shaped, task = _shaped(scene, rng, tile), rng.choice(SUBTASKS["ui"])
        if task == "ui_list":
            return dict(images=[shaped], question="List the widgets.", task=task,
                        answer=", ".join(visual_name(o) for o in scene.objects))
        obj = rng.choice(scene.objects)
        box = box_px(obj.bbox, scene, shaped[1], shaped[2])
        if task == "ui_ground":
            return dict(images=[shaped], question=f"Tap the {visual_name(obj)}. Give its box.", box=box,
                        answer="<box>", task=task)
        return dict(images=[shaped], question="Which widget is at <box>, in which state?", box=box, task=task,
                    answer=visual_name(obj) + (f", {obj.state}" if obj.state else ""))
    if category == "video":
        frames, question, answer = video_clip(split, hash_index(sub), seed)
        width = native_size("natural", rng, tile)[0]  # every frame the same size
        return dict(images=[(frame, width, width) for frame in frames], question=question, answer=answer)
    passage = text_passage(split, hash_index(sub), seed)  # text only: arithmetic passages and emblem lore
    if " Answer: " in passage:
        question, answer = passage.rsplit(" Answer: ", 1)
        return dict(images=[], question=question, answer=answer.rstrip("."))
    if passage.startswith("The ") and " emblem is " in passage:
        name = passage[4:].split(" emblem is ")[0]
        facts = emblem_facts(EMBLEMS.index(name))
        return dict(images=[], question=f"In which year was the {name} emblem first painted?",
                    answer=str(facts["year"]))
    return None


def uniform_frames(n_steps: int, n_frames: int) -> list[int]:
    """The time steps of n_frames frames sampled uniformly from a clip of n_steps, first and last included."""
    return [round(i * (n_steps - 1) / max(n_frames - 1, 1)) for i in range(n_frames)]


def video_clip(split: str, index: int, seed: int = 0) -> tuple[list[Scene], str, str]:
    """VIDEO_FRAMES frames sampled uniformly from a CLIP_STEPS-step ShapesWorld clip, and a question about
    motion or order. Half the clips: one object moves in a straight line (data.shapes.tasks.video): "In
    which direction does the red star move?" -> left / right / up / down, or "Which shape moves across the
    frames?" when no reference is unique. The other half: the objects appear one by one, each at the time
    step of a sampled frame (so the frames show the order): "Which appears first, the X or the Y?" (the two
    named in a random order) -> "X", or "What appears last?"."""
    rng, steps = rng_for("mm15-video", split, index, seed), uniform_frames(CLIP_STEPS, VIDEO_FRAMES)
    if rng.random() < 0.5:
        clip, question, answer = video(split, index, seed, frames=CLIP_STEPS)
        return [clip[t] for t in steps], question, answer
    scene = make_scene(split, 1_000_000 + index, seed, "natural")
    names = Counter(visual_name(o) for o in scene.objects)
    shown = [o for o in shapes_of(scene) if names[visual_name(o)] == 1][:VIDEO_FRAMES]
    rng.shuffle(shown)
    if len(shown) < 2:
        return video_clip(split, index + 7_919_000, seed)  # too few distinct objects: another clip
    scene.texts = []
    frames = []
    for step in steps:  # object k appears at the k-th sampled frame's step and stays
        frame = copy.deepcopy(scene)
        frame.objects = [o for o in frame.objects if visual_name(o) in
                         {visual_name(p) for k, p in enumerate(shown) if steps[k] <= step}]
        frame.uid = f"{scene.uid}/frame{step}"
        frames.append(frame)
    if rng.random() < 0.5:
        return frames, "What appears last?", visual_name(shown[-1])
    first, other = shown[0], rng.choice(shown[1:])
    pair = [visual_name(first), visual_name(other)]
    rng.shuffle(pair)
    return frames, f"Which appears first, the {pair[0]} or the {pair[1]}?", visual_name(first)


def hash_index(sub: str) -> int:
    """A scene index for the string "index.attempt" (scene streams take ints)."""
    index, attempt = sub.split(".")
    return int(index) * 100 + int(attempt)


def text_rich_caption(split: str, index: int, seed: int = 0, tile: int = 64) -> dict:
    """Continual pre-training item: a text-rich scene at its real shape and its dense caption."""
    rng = rng_for("mm15-cpt", split, index, seed)
    scene = make_scene(split, index, seed, rng.choice(TEXT_RICH))
    return dict(images=[_shaped(scene, rng, tile)], text=caption(scene, "dsc", seed=index))


def box_to_text(box, width: int, height: int) -> str:
    """Original-image pixels -> "[x1, y1, x2, y2]" on 0-999: floor(x / W * 1000), clipped to 0..999."""
    sides = (width, height, width, height)
    return "[" + ", ".join(str(min(999, max(0, math.floor(v / s * 1000)))) for v, s in zip(box, sides)) + "]"


def text_to_box(text: str, width: int, height: int):
    """The first "[x1, y1, x2, y2]" in a text -> original-image pixels (bin centres), or None."""
    grid, sides = parse_box(text), (width, height, width, height)
    return None if grid is None else [(v + 0.5) * s / 1000 for v, s in zip(grid, sides)]


def encode_text(enc, text: str) -> list[int]:
    """BPE ids of a text, but a box "[x1, y1, x2, y2]" one token per digit. The BPE splits 0-999 irregularly
    (' 456' is one token, ' 999' is ' 9' + '99'), so each value would be a token of its own to learn from a
    few hundred grounding samples; per digit, the first one already says roughly where (10 classes). Decodes
    to the same text."""
    parts = re.split(r"( ?\[\d+, \d+, \d+, \d+\])", text)  # odd parts are boxes
    pieces = [p for n, part in enumerate(parts)
              for p in (re.findall(r" ?\[| ?\d|\D", part) if n % 2 else [part])]
    return [i for piece in pieces for i in enc.encode_ordinary(piece)]


def item_texts(item: dict) -> tuple[str, str]:
    """(question, answer) of a rendered item with "<box>" written out by box_to_text."""
    box = box_to_text(item["box"], *item["pil"][0].size) if item.get("box") else ""
    return item["question"].replace("<box>", box), item["answer"].replace("<box>", box)


def score(text: str, item: dict, task: str):
    """Is an answer right? Grounding: IoU >= 0.5 of the parsed box with the gold box, both in pixels of the
    original image (None: no box in the text, which Ferret's eval scores as a miss); else the same words."""
    if task in BOX_TASKS:
        box = text_to_box(text, *item["pil"][0].size)
        return None if box is None else iou(box, item["box"]) >= 0.5
    if task == "describe":  # CHAIR-s's complement: it names an object and none that the scene lacks
        found = object_scores(normalize(drop_unfinished(text)), item["images"][0][0])  # unfinished: dropped
        return found["mentions"] > 0 and found["hallucinated"] == 0
    return words(text) == words(item_texts(item)[1])


def rendered(item: dict) -> dict:
    return dict(item, pil=[render_shaped(*shaped) for shaped in item["images"]])


class ItemPools:
    """Pre-rendered items (PIL images at their real sizes): `cpt` (text-rich scenes, dense captions),
    `train` {category: items}, `test` {eval task: n_eval items} (refer & ground and UI split into
    SUBTASKS), and the training answers by question and by task for the majority baseline."""

    def __init__(self, seed: int, tile: int, n_cpt: int, n_train: int, n_eval: int):
        self.cpt = [rendered(text_rich_caption("train", i, seed, tile)) for i in range(n_cpt)]
        self.train = {c: [rendered(task_item(c, "train", i, seed, tile)) for i in range(n_train)]
                      for c in CATEGORIES}
        self.test = {}
        for c in CATEGORIES:
            tasks, i = {name: [] for name in SUBTASKS.get(c, (c,))}, 0
            while min(map(len, tasks.values())) < n_eval:
                item, i = task_item(c, "test", i, seed, tile), i + 1
                bucket = tasks[item.get("task", c)]
                if len(bucket) < n_eval:
                    bucket.append(rendered(item))
            self.test.update(tasks)
        self.answers: dict[str, Counter] = {}
        for c, items in self.train.items():
            for item in items:
                answer = item_texts(item)[1]
                self.answers.setdefault(item["question"], Counter())[answer] += 1
                self.answers.setdefault(item.get("task", c), Counter())[answer] += 1

    def majority(self, item: dict, task: str) -> str:
        """The blind baseline: the most frequent training answer to the same question, else of the task."""
        counts = self.answers.get(item["question"]) or self.answers[task]
        return counts.most_common(1)[0][0]


BOX_TEXT = re.compile(r"\[\s*(-?\d+)\s*,\s*(-?\d+)\s*,\s*(-?\d+)\s*,\s*(-?\d+)\s*\]")


def llava_sft_items(path) -> list[dict]:
    """SFT items from LLaVA conversation JSON (data.shapes.formats.read_llava_json checks the file): each
    human -> gpt pair of turns becomes one item with the conversation's images (read at their own sizes),
    the human text without its `<image>` markers as the question and the gpt text as the answer. Boxes are
    written in the text as "[x1, y1, x2, y2]" on 0-999 of the original image (MM1.5 / Ferret), so they
    need no transform here; one out of range or with x2 < x1 is an InputError naming file:line."""
    items = []
    for item in read_llava_json(path):
        pil = [load_image(p) for p in item["images"]]
        turns = [t for t in item["conversations"] if t["from"] != "system"]
        for human, gpt in zip(turns[::2], turns[1::2]):
            if (human["from"], gpt["from"]) != ("human", "gpt"):
                raise InputError(f"{path}:{item['line']}: item {item['id']}: expected human and gpt turns in "
                                 f"turn, got {human['from']} then {gpt['from']}")
            for text in (human["value"], gpt["value"]):
                for box in BOX_TEXT.findall(text):
                    x1, y1, x2, y2 = map(int, box)
                    if not (0 <= x1 <= x2 <= 999 and 0 <= y1 <= y2 <= 999):
                        raise InputError(f"{path}:{item['line']}: item {item['id']}: box [{', '.join(box)}]: "
                                         "expected 0 <= x1 <= x2 <= 999 and 0 <= y1 <= y2 <= 999")
            question = " ".join(human["value"].replace(IMAGE_TOKEN, " ").split())
            items.append(dict(pil=pil, question=question, answer=gpt["value"].strip(), box=None,
                              category="user"))
    return items


def boxes_png(items: list, predicted: list, path, scale: int = 3) -> None:
    """Held-out grounding items side by side, each enlarged `scale` times, with the gold box (green) and the
    predicted one (red; none when the answer had no box), both in the original image's pixels."""
    images = [item["pil"][0].resize((item["pil"][0].width * scale, item["pil"][0].height * scale),
                                    Image.Resampling.NEAREST) for item in items]
    sheet = Image.new("RGB", (sum(im.width + 4 for im in images), max(im.height for im in images)), "white")
    draw, x = ImageDraw.Draw(sheet), 0
    for im, item, box in zip(images, items, predicted):
        sheet.paste(im, (x, 0))
        for b, color in ((item["box"], (0, 200, 0)), (box, (230, 0, 0))):
            if b is not None and b[0] <= b[2] and b[1] <= b[3]:  # a predicted x2 < x1 is scored, not drawn
                draw.rectangle([x + b[0] * scale, b[1] * scale, x + b[2] * scale, b[3] * scale],
                               outline=color)
        x += im.width + 4
    sheet.save(path)
