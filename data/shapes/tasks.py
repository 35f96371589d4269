"""Multi-scene and text-only items: interleaved documents, text passages, multi-image comparisons,
short videos, preference pairs, and `corpus` (mixed text of every kind, for tokenizer training)."""

from __future__ import annotations

import copy
from collections.abc import Iterator

from .text import (
    CAPTION_FORMATS,
    SIDES,
    a,
    area,
    caption,
    emblem_facts,
    grounding,
    plural,
    pope,
    reference,
    shapes_of,
    visual_name,
    vqa,
)
from .world import COLORS, EMBLEMS, KINDS, SHAPES, SPLITS, Obj, Scene, rng_for, scene_from_rng


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def _sub_scene(split: str, tag: str, index: int, seed: int, j: int, kind: str = "natural") -> Scene:
    """The j-th scene of a multi-scene item (its own uid, so its text is seeded apart)."""
    uid = f"{split}/{index}/{seed}/{tag}{j}"
    return scene_from_rng(rng_for("scene", uid), split, kind, uid)


def interleaved_document(split: str, index: int, seed: int = 0) -> list[str | Scene]:
    """A web-page-like article: text segments and 2-4 scenes in reading order; the text around each
    image talks about it (the image-text correspondence MM1 learns from interleaved data)."""
    _check_split(split)
    rng = rng_for("interleaved", split, index, seed)
    topic = rng.choice(EMBLEMS)
    doc: list[str | Scene] = [rng.choice([f"Notes from the {topic} collection.", f"A visit to {topic} hall.",
                                          f"Shapes we found in {topic}."])]
    for j in range(rng.randint(2, 4)):
        scene = _sub_scene(split, "interleaved", index, seed, j)
        doc[-1] += " " + rng.choice([f"Here is picture {j + 1}.", "Look at this one.", "The next photo:",
                                     "We took this picture."])
        doc.append(scene)
        fmt = rng.choice(["ssc", "dsc", "dsc", "afc"])
        text = caption(scene, fmt, seed)
        if rng.random() < 0.5:
            q, ans = rng.choice(vqa(scene, seed))
            text += f" {q} {ans[0].upper() + ans[1:]}."
        doc.append(text)
    doc[-1] += " " + rng.choice(["That is all for today.", "More pictures next week.", "Thanks for reading."])
    return doc


def text_passage(split: str, index: int, seed: int = 0) -> str:
    """Text-only passage about the world: emblem lore, shape geometry, counting arithmetic."""
    _check_split(split)
    rng = rng_for("passage", split, index, seed)
    kind = rng.choice(["lore", "lore", "geometry", "math", "scene"])
    if kind == "lore":
        f = emblem_facts(rng.randrange(len(EMBLEMS)))
        return (f"The {f['name']} emblem is {a(f['color'])} {f['shape']} badge with {a(f['glyph'])} glyph. "
                f"It comes from {f['home']}, where it was first painted in {f['year']}. "
                f"People carry the {f['name']} emblem as a sign of {f['meaning']}.")
    if kind == "geometry":
        parts = []
        for s in rng.sample(sorted(SIDES), 3):
            parts.append(f"{a(s).capitalize()} drawn as a polygon has {SIDES[s]} sides "
                         f"and {SIDES[s]} corners.")
        parts.append("A circle has no corners, and a ring is a circle with a hole in the middle.")
        return " ".join(parts)
    if kind == "math":
        name = rng.choice(["Mila", "Tomas", "Ana", "Jun", "Priya", "Omar"])
        shape, c1, c2 = rng.choice(SHAPES), *rng.sample(COLORS, 2)
        x, y = rng.randint(1, 9), rng.randint(1, 9)
        if rng.random() < 0.5:
            return (f"{name} has {x} {c1} {plural(shape, x)} and {y} {c2} {plural(shape, y)}. "
                    f"How many {plural(shape, 2)} does {name} have? Answer: {x + y}.")
        return (f"{name} has {x + y} {plural(shape, x + y)} and gives away {y}. "
                f"How many {plural(shape, 2)} are left? Answer: {x}.")
    scene = _sub_scene(split, "passage", index, seed, 0)
    return "Imagine a picture. " + caption(scene, "dsc+", seed)


def multi_image(split: str, index: int, seed: int = 0) -> tuple[list[Scene], str, str]:
    """Two scenes and a question that needs both (counts, comparison, attributes)."""
    _check_split(split)
    rng = rng_for("multi", split, index, seed)
    scenes = [_sub_scene(split, "multi", index, seed, j) for j in range(2)]
    objs = [shapes_of(s) for s in scenes]
    kind = rng.choice(["total", "more", "both", "largest"])
    if kind == "total":
        shape = rng.choice([o.shape for o in objs[0] + objs[1]] or SHAPES)
        n = sum(o.shape == shape for o in objs[0] + objs[1])
        return scenes, f"How many {plural(shape, 2)} are there in the two images together?", str(n)
    if kind == "more":
        n0, n1 = len(objs[0]), len(objs[1])
        ans = "first" if n0 > n1 else "second" if n1 > n0 else "same"
        return scenes, "Which image has more shapes, the first or the second? Answer same if equal.", ans
    if kind == "both":
        shape = rng.choice(SHAPES)
        both = all(any(o.shape == shape for o in os) for os in objs)
        return scenes, f"Is there {a(shape)} in both images?", "yes" if both else "no"
    j = rng.randrange(2)
    big = sorted(objs[j], key=lambda o: -area(o.box))
    if len(big) > 1 and area(big[0].box) == area(big[1].box):  # tie: ask a count instead
        return scenes, f"How many shapes are in the {['first', 'second'][j]} image?", str(len(big))
    return scenes, f"What colour is the largest shape in the {['first', 'second'][j]} image?", big[0].color


def video(split: str, index: int, seed: int = 0, frames: int = 4) -> tuple[list[Scene], str, str]:
    """`frames` scenes in which one object moves in a straight line, without crossing any other."""
    _check_split(split)
    if frames < 2:
        raise ValueError(f"a video needs frames >= 2, got {frames}")
    rng = rng_for("video", split, index, seed)
    scene = _sub_scene(split, "video", index, seed, 0)
    while True:
        objs = shapes_of(scene)
        moves = []
        for i, o in enumerate(objs):
            steps = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
            for direction, (dx, dy) in steps.items():
                room = {"left": o.box[0] - 30, "right": 970 - o.box[2],
                        "up": o.box[1] - 30, "down": 970 - o.box[3]}
                dist = min(room[direction], 150 * (frames - 1))
                x1, y1, x2, y2 = o.box
                swept = (min(x1, x1 + dx * dist), min(y1, y1 + dy * dist), max(x2, x2 + dx * dist),
                         max(y2, y2 + dy * dist))
                clear = all(p is o or not (swept[0] < p.box[2] and p.box[0] < swept[2] and swept[1] < p.box[3]
                                           and p.box[1] < swept[3]) for p in scene.objects + scene.texts)
                if dist >= 200 and clear:
                    moves.append((i, direction, dx, dy, dist))
        if moves or len(scene.objects) + len(scene.texts) <= 1:
            break
        scene.texts = []  # make room: drop the label, then the smallest object, until something can move
        if objs and len(objs) > 1:
            scene.objects.remove(min(objs, key=lambda o: area(o.box)))
    if not moves:  # a single object that fills its axis: shrink it into the middle so it can move
        o = shapes_of(scene)[0]
        o.box, o.size = (430, 430, 570, 570), "small"
        moves = [(0, "right", 1, 0, 300)]
    longest = max(m[4] for m in moves)
    # clearly visible moves only
    i, direction, dx, dy, dist = rng.choice([m for m in moves if m[4] >= longest / 2])
    clips = []
    for f in range(frames):
        frame = copy.deepcopy(scene)
        frame.uid = f"{scene.uid}/frame{f}"
        step = round(dist * f / (frames - 1))
        o = shapes_of(frame)[i]
        x1, y1, x2, y2 = o.box
        o.box = (x1 + dx * step, y1 + dy * step, x2 + dx * step, y2 + dy * step)
        clips.append(frame)
    mover = shapes_of(scene)[i]
    ref = reference(mover, scene)
    if ref and rng.random() < 0.5:
        return clips, f"In which direction does {ref} move?", direction
    return clips, "Which shape moves across the frames?", visual_name(mover)


def _hallucinate(scene: Scene, rng) -> tuple[Scene, str]:
    """A copy of the scene graph with one injected error: wrong colour, wrong shape or an extra object."""
    fake = copy.deepcopy(scene)
    objs = shapes_of(fake)
    how = rng.choice(["color", "shape", "extra"]) if objs else "extra"
    if how == "extra" or not objs:
        shape = rng.choice([s for s in SHAPES if s not in {o.shape for o in objs}] or SHAPES)
        fake.objects.append(Obj(shape, rng.choice(COLORS), "small", (0, 0, 1, 1)))  # never rendered
        return fake, f"added {shape}"
    o = rng.choice(objs)
    if how == "color":
        o.color = rng.choice([c for c in COLORS if c != o.color])
        return fake, f"colour -> {o.color}"
    o.shape = rng.choice([s for s in SHAPES if s != o.shape])
    o.emblem = None
    return fake, f"shape -> {o.shape}"


def preference_pair(split: str, index: int, seed: int = 0) -> dict:
    """Gold response (chosen) vs the same response read off a scene graph with one injected
    hallucination (rejected), POVID-style; for a description or a short VQA answer."""
    _check_split(split)
    rng = rng_for("preference", split, index, seed)
    scene = _sub_scene(split, "preference", index, seed, 0)
    for _ in range(10):
        fake, what = _hallucinate(scene, rng)
        if rng.random() < 0.6:
            fmt = rng.choice(["dsc", "dsc+"])
            prompt = {"dsc": "Describe the image.", "dsc+": "Describe the image in detail."}[fmt]
            chosen, rejected = caption(scene, fmt, seed), caption(fake, fmt, seed)
        else:
            gold = dict(vqa(scene, seed))
            wrong = dict(vqa(fake, seed))
            diffs = [q for q in gold if q in wrong and wrong[q] != gold[q]]
            if not diffs:
                continue
            prompt = rng.choice(sorted(diffs))
            chosen, rejected = gold[prompt], wrong[prompt]
        if chosen != rejected:
            return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "scene": scene,
                    "hallucination": what}
    raise RuntimeError(f"no preference pair for {split}/{index}/{seed}")  # not reached in practice


def corpus(n: int, seed: int = 0) -> Iterator[str]:
    """`n` texts mixing every kind of text the world produces (captions of all formats and scene
    kinds, VQA, POPE, grounding, interleaved text, passages, preference responses)."""
    rng = rng_for("corpus", seed)
    for i in range(n):
        split = rng.choice(SPLITS)
        task = rng.choice(["caption", "caption", "caption", "vqa", "pope", "ground", "interleaved", "passage",
                           "preference", "multi", "video"])
        if task == "caption":
            scene = _sub_scene(split, "corpus", i, seed, 0, rng.choice(KINDS))
            yield caption(scene, rng.choice(CAPTION_FORMATS), seed)
        elif task in ("vqa", "pope", "ground"):
            scene = _sub_scene(split, "corpus", i, seed, 0, rng.choice(KINDS))
            pairs = {"vqa": vqa, "pope": pope, "ground": grounding}[task](scene)
            yield " ".join(f"{q} {ans}" for q, ans in pairs) or caption(scene, "ssc")
        elif task == "interleaved":
            yield " <image> ".join(x for x in interleaved_document(split, i, seed) if isinstance(x, str))
        elif task == "passage":
            yield text_passage(split, i, seed)
        elif task == "preference":
            p = preference_pair(split, i, seed)
            yield f"{p['prompt']} {p['chosen']}"
        elif task == "multi":
            _, q, ans = multi_image(split, i, seed)
            yield f"{q} {ans}"
        else:
            _, q, ans = video(split, i, seed)
            yield f"{q} {ans}"
