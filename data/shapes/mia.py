"""MIA-Bench in ShapesWorld: layered instructions whose every component is checked exactly against the scene
graph, a rule judge in IFEval's style (strict and loose) that writes the official score sentence, and gold
responses for instruction-following SFT.

    item = mia_item("test", 0, seed=0, side="bench")  # the official file's fields (+ id, checks, scene)
    scene = item_scene(item)                           # its scene graph (make_scene of item["scene"])
    gold = gold_response(item, scene)                  # a response that follows every component, or None
    judge(item, scene, response, loose=False)          # ([points per component], official score sentence)

Items have the official fields (instruction, type, num_of_component, components, component_weight,
component_type) and an image path in place of the URL. Component types are the official eight; each rule
below is one checkable reading of its type (`checks` holds the rule and its argument per component):
describe (the image / the largest shape: no hallucinated shape, the subject named), mention (the background
colour / no colour words / only shapes of one colour / a given word), length_limit (exactly n sentences / at
most n words), linguistics (bulleted / all lowercase / first word / ends with a question), grammar (no
pronouns / no articles / no past-tense verbs), textual (the label quoted exactly), math (a count or a sum:
the only number stated), perspective (first person as one of the objects). Weights follow the official
patterns: [6, 4], [4, 3, 3], [4, 2, 2, 2].

Held-out combinations: the set of rules of an item (its combination) is hashed to a side, "bench" or "sft";
benchmark items and SFT items never share a combination, while every single rule appears on both sides.
An item is kept only when gold_response finds a response that passes all its components (so no item asks
the impossible, e.g. "quote the label" in "all lowercase").

Each component is checked on its own, as IFEval does: a constraint can be met vacuously (a two-word answer
has no pronouns and fits "at most 12 words"); mia_bench.py prints a constant answer's score beside the
models' so that this floor is visible.
"""
from __future__ import annotations

import hashlib
import re

from ..metrics import sentences
from ..mia import score_sentence
from .text import (
    NUMBER_WORDS,
    a,
    area,
    at_position,
    hallucinations,
    object_mentions,
    plural,
    position,
    reference,
    shapes_of,
)
from .world import COLORS, make_scene, rng_for

WEIGHTS = {2: [6, 4], 3: [4, 3, 3], 4: [4, 2, 2, 2]}  # the official patterns (x190, x140, x27 of 400)
N_COMPONENTS = {2: 245, 3: 130, 4: 18}  # near the official 204 / 155 / 40 (+1 of 5) after the rejections
HEADS = {"describe": 281, "textual": 35, "math": 27, "perspective": 10}  # the official first components
# the later components (mention 216, length_limit 198, linguistics 115, grammar 70 in the official file;
# reweighted so that the counts after the rejection of unsatisfiable items come near the official ones)
TAILS = {"mention": 280, "length_limit": 190, "linguistics": 100, "grammar": 55}
RULES = {"describe": ("image", "largest"), "textual": ("quote",), "math": ("count", "color_count", "sum"),
         "perspective": ("object",), "mention": ("background", "no_color", "only_color", "word"),
         "length_limit": ("sentences", "max_words"), "linguistics": ("bullets", "lowercase", "start_word",
                                                                     "question"),
         "grammar": ("no_pronouns", "no_articles", "present")}
PRONOUNS = {"i", "me", "my", "mine", "you", "your", "he", "him", "his", "she", "her", "it", "its", "we", "us",
            "our", "they", "them", "their", "this", "that", "these", "those", "myself", "itself"}
PAST = {"was", "were", "had", "did", "sat", "appeared", "showed", "looked", "stood", "lay", "seemed",
        "became", "read", "said", "saw", "found"}  # "read" counts as past: the gold writes "reads"
COLOR_WORDS = set(COLORS) | {"gray", "grey", "white", "beige", "lavender"}
START_WORDS, MENTION_WORDS = ("Look", "Here", "Today"), ("picture", "scene", "image")


def words(text: str) -> list[str]:  # apostrophes kept ("it's" is a pronoun), unlike data.metrics.words
    return re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower())


def numbers(text: str) -> set[int]:
    """The numbers stated, as digits or words ("3", "three"; "no" is not a number here)."""
    return {int(w) if w.isdigit() else NUMBER_WORDS.index(w) for w in words(text)
            if w.isdigit() or (w in NUMBER_WORDS and w != "no")}


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def largest(scene):
    objs = sorted(shapes_of(scene), key=lambda o: -area(o.box))
    return objs[0] if len(objs) == 1 or (len(objs) > 1 and area(objs[0].box) > area(objs[1].box)) else None


# ----------------------------------------------------------------------------- checks
def check(rule: str, arg, text: str, scene) -> bool:
    """Does `text` follow one component (rule "type/name", its argument) for this scene? Exact rules."""
    w, objs = words(text), shapes_of(scene)
    if rule == "describe/image":
        return bool(object_mentions(text)) and not hallucinations(text, scene)
    if rule == "describe/largest":
        main = largest(scene)
        return (main is not None and not hallucinations(text, scene)
                and any(s == main.shape and c in (None, main.color) for c, s in object_mentions(text)))
    if rule == "textual/quote":
        return re.search(rf"[\"“]{re.escape(arg)}[\"”]", text) is not None
    if rule in ("math/count", "math/color_count", "math/sum"):
        return numbers(text) == {arg}
    if rule == "perspective/object":  # arg: [colour, shape] of the object the response speaks as
        return bool({"i", "me", "my"} & set(w)) and any(s == arg[1] for _, s in object_mentions(text))
    if rule == "mention/background":
        return arg in " ".join(w)
    if rule == "mention/no_color":
        return not COLOR_WORDS & set(w)
    if rule == "mention/only_color":
        present = {o.shape for o in objs if o.color == arg}
        return all(c in (None, arg) and s in present for c, s in object_mentions(text))
    if rule == "mention/word":
        return arg in w
    if rule == "length_limit/sentences":
        return len(sentences(text)) == arg
    if rule == "length_limit/max_words":
        return 0 < len(w) <= arg
    if rule == "linguistics/bullets":
        lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
        return bool(lines) and all(re.match(r"[-*•] \S", line) for line in lines)
    if rule == "linguistics/lowercase":
        return text == text.lower() and bool(re.search(r"[a-z]", text))
    if rule == "linguistics/start_word":
        return w[:1] == [arg.lower()]
    if rule == "linguistics/question":
        return text.rstrip().endswith("?")
    if rule == "grammar/no_pronouns":
        return bool(w) and not PRONOUNS & set(w)
    if rule == "grammar/no_articles":
        return bool(w) and not {"a", "an", "the"} & set(w)
    if rule == "grammar/present":
        return bool(w) and not PAST & set(w)
    raise ValueError(f"unknown rule {rule!r}")


def variants(text: str) -> list[str]:
    """IFEval's loose mode: the response, without its first line, without its last line, without both,
    each also with markdown asterisks removed; a component passes loosely when any non-empty variant
    passes (IFEval skips empty variants: a one-line answer minus its line is no answer)."""
    lines = text.split("\n")
    cuts = [text, "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return [v for cut in cuts for v in (cut, cut.replace("*", ""))]


def judge(item: dict, scene, response: str, loose: bool = False) -> tuple[list[int], str]:
    """The rule judge: each component's full weight when it passes, else 0 (an empty response fails all),
    and the official sentence "score of component 1: x/w1, ..., total score: z/10"."""
    points = []
    for c, weight in zip(item["checks"], item["component_weight"]):
        texts = variants(response) if loose else [response]
        points.append(weight if any(t.strip() and check(c["rule"], c["arg"], t, scene) for t in texts) else 0)
    return points, score_sentence(points, item["component_weight"])


# ----------------------------------------------------------------------------- items
def combo_side(rules) -> str:
    """"bench" or "sft" for a combination of rules (order-free), by a stable hash: the hold-out."""
    digest = hashlib.blake2b("+".join(sorted(rules)).encode(), digest_size=8).digest()
    return ("bench", "sft")[digest[0] % 2]


def _component(rule: str, scene, rng, used: dict):
    """(text, argument) of one component drawn for this scene, or None when the scene can't carry it."""
    objs, texts = shapes_of(scene), [t.text for t in scene.texts]
    colors = sorted({o.color for o in objs})
    if rule in ("describe/image", "describe/largest", "math/count"):
        if not objs or (rule == "describe/largest" and largest(scene) is None):
            return None
        return {"describe/image": ("Describe the image", None),
                "describe/largest": ("Describe the largest shape", None),
                "math/count": ("Tell me how many shapes there are", len(objs))}[rule]
    if rule == "textual/quote":
        return ("Quote the text written in the image", texts[0]) if len(texts) == 1 else None
    if rule == "math/color_count" and colors:
        color = rng.choice(colors)
        return f"Count the {color} shapes", sum(o.color == color for o in objs)
    if rule == "math/sum" and objs:
        first = rng.choice(sorted({o.shape for o in objs}))
        second = rng.choice(sorted({o.shape for o in objs} - {first}) or ["circle", "star", "cross"])
        if second == first:
            return None
        return (f"Add the number of {plural(first, 2)} to the number of {plural(second, 2)}",
                sum(o.shape in (first, second) for o in objs))
    if rule == "perspective/object":
        named = [(o, reference(o, scene)) for o in objs]
        named = [(o, ref) for o, ref in named if ref]
        if not named:
            return None
        obj, ref = rng.choice(named)
        return f"Describe the scene as if you were {ref}", [obj.color, obj.shape, objs.index(obj)]
    if rule == "mention/only_color" and colors:
        color = used.get("color") or rng.choice(colors)
        return f"mentioning only the {color} shapes", color
    n = rng.choice([1, 2, 3])
    fixed = {"mention/background": ("mentioning the background colour", scene.background),
             "mention/no_color": ("without mentioning any colour", None),
             "mention/word": None, "length_limit/sentences": (
                 f"in exactly {NUMBER_WORDS[n]} {plural('sentence', n)}", n),
             "length_limit/max_words": None, "linguistics/bullets": ("as a bulleted list", None),
             "linguistics/lowercase": ("in all lowercase letters", None), "linguistics/start_word": None,
             "linguistics/question": ("ending with a question", None),
             "grammar/no_pronouns": ("without using any pronouns", None),
             "grammar/no_articles": ("without the articles 'a', 'an' and 'the'", None),
             "grammar/present": ("using only present-tense verbs", None)}
    if rule == "mention/word":
        word = rng.choice(MENTION_WORDS)
        return f"using the word '{word}'", word
    if rule == "length_limit/max_words":
        limit = rng.choice([10, 12, 15, 20])
        return f"in at most {limit} words", limit
    if rule == "linguistics/start_word":
        word = rng.choice(START_WORDS)
        return f"starting with the word '{word}'", word
    return fixed.get(rule)


def _category(rules: list) -> str:
    """The official `type` field (basic / intermediate / advanced / complex / creative), by our reading."""
    if rules[0].startswith("perspective"):
        return "creative"
    return {2: "basic" if rules[0] == "describe/image" else "intermediate", 3: "advanced"}.get(len(rules),
                                                                                          "complex")


def mia_item(split: str, index: int, seed: int = 0, side: str = "bench") -> dict:
    """Item `index` (a pure function of the arguments): official fields, `id`, `image` (a path), `checks`
    ({rule, arg} per component), `scene` (make_scene's arguments), `combo`. Its combination of rules lies
    on `side` ("bench" or "sft") and a gold response passes every component."""
    rng = rng_for("mia", split, index, seed, side)
    for attempt in range(500):  # a combination of rules on this side, then up to 30 scenes that carry it
        n = rng.choices(list(N_COMPONENTS), weights=list(N_COMPONENTS.values()))[0]
        head = rng.choices(list(HEADS), weights=list(HEADS.values()))[0]
        rules = [f"{head}/{rng.choice(RULES[head])}"]
        while len(rules) < n:
            kind = rng.choices(list(TAILS), weights=list(TAILS.values()))[0]
            free = [r for r in RULES[kind] if f"{kind}/{r}" not in rules]
            repeat_ok = kind == "mention" and rng.random() < 0.15  # official: 11 items repeat `mention`
            if free and (repeat_ok or not any(r.startswith(kind + "/") for r in rules)):
                rules.append(f"{kind}/{rng.choice(free)}")
        if combo_side(rules) != side:
            continue
        for scene_try in range(30):
            scene_args = dict(split=split, index=(index * 500 + attempt) * 30 + scene_try, seed=seed,
                              kind="natural")
            name = f"{side}-{split}-{seed}-{index:05d}"
            item = _build(rules, make_scene(**scene_args), scene_args, rng, name)
            if item is not None:
                return item
    raise RuntimeError(f"no MIA item found for {split}/{index}/{seed}/{side}")


def _build(rules: list, scene, scene_args: dict, rng, name: str) -> dict | None:
    used, parts = {}, []
    for rule in rules:
        part = _component(rule, scene, rng, used)
        if part is None:
            return None
        if rule == "perspective/object":
            used["color"] = part[1][0]
        parts.append(part)
    n, texts = len(rules), [p[0] for p in parts]
    item = dict(id=name, image=f"images/{name}.png", instruction=", ".join(texts) + ".",
                type=_category(rules), num_of_component=n, components=texts, component_weight=WEIGHTS[n],
                component_type=[r.split("/")[0] for r in rules],
                checks=[dict(rule=r, arg=p[1]) for r, p in zip(rules, parts)], scene=scene_args,
                combo="+".join(sorted(rules)))
    return item if gold_response(item, scene) is not None else None


def item_scene(item: dict):
    return make_scene(**item["scene"])


# ----------------------------------------------------------------------------- gold responses
def gold_response(item: dict, scene) -> str | None:
    """A response that follows every component (checked with the strict judge), built from the scene graph:
    the head's sentences (the subject first, then the other shapes as fillers), the sentences the modifiers
    require, the length limit applied, then the surface rules (articles, first word, case, bullets)."""
    args = {c["rule"]: c["arg"] for c in item["checks"]}
    color = args.get("mention/only_color")
    objs = [o for o in sorted(shapes_of(scene), key=lambda o: -area(o.box)) if color in (None, o.color)]
    name = lambda o: o.shape if "mention/no_color" in args else f"{o.color} {o.shape}"
    says = lambda o, lead="": _cap(f"{lead}{a(name(o))} sits {at_position(position(o, scene))}.")
    head, arg = item["checks"][0]["rule"], item["checks"][0]["arg"]
    fillers = [says(o) for o in objs]
    if head == "describe/image":
        if not fillers:
            return None
        first = fillers.pop(0)
    elif head == "describe/largest":
        main = largest(scene)
        first = f"The largest shape is {a(name(main))}."
        fillers = [says(o) for o in objs if o is not main]
    elif head == "textual/quote":
        first = f'The label reads "{arg}".'
    elif head == "math/count":
        first = f"There are {arg} shapes."
    elif head == "math/color_count":
        first = f"There are {arg} {item['components'][0].split()[2]} shapes."
    elif head == "math/sum":
        first = f"The total is {arg}."
    else:  # perspective: the object speaks
        me = shapes_of(scene)[arg[2]]
        first = f"I am {a(name(me))}."
        fillers = [says(o, "Near me, ") for o in objs if o is not me]
    needed = [f"The background is {args['mention/background']}."] if "mention/background" in args else []
    needed += [f"The {args['mention/word']} is simple."] if "mention/word" in args else []
    needed += ["What else is there?"] if "linguistics/question" in args else []
    if "length_limit/sentences" in args:
        room = args["length_limit/sentences"] - 1 - len(needed)
        if room < 0 or room > len(fillers):
            return None
        fillers = fillers[:room]
    elif "length_limit/max_words" in args:
        kept = []
        for s in fillers:
            if len(words(" ".join([first, *kept, s, *needed]))) <= args["length_limit/max_words"]:
                kept.append(s)
        fillers = kept
    else:
        fillers = fillers[:2]
    out = [first, *fillers, *needed]
    if "grammar/no_articles" in args:
        out = [re.sub(r"\b(?:a|an|the)\s+", "", s, flags=re.I) for s in out]
        out = [_cap(s) for s in out]
    if "linguistics/start_word" in args:
        out[0] = f"{args['linguistics/start_word']}, " + (out[0] if out[0].startswith("I ") else
                                                           out[0][0].lower() + out[0][1:])
    if "linguistics/lowercase" in args:
        out = [s.lower() for s in out]
    text = "\n".join("- " + s for s in out) if "linguistics/bullets" in args else " ".join(out)
    ok = all(check(c["rule"], c["arg"], text, scene) for c in item["checks"])
    return text if ok else None
