"""Preference data for multimodal alignment in ShapesWorld (dpo_bdhs.py): every judgement is exact, read off
the scene graph, so no judge model is needed.

    item = pref_item("train", 0, seed=0)   # {id, scene, question, kind: describe | yesno, answer (gold)}
    povid(item, rng)                       # the gold answer with one hallucination injected (POVID-style)
    correct(text, item)                    # a policy answer corrected by the scene graph (RLHF-V-style)
    judge(texts, item)                     # (best, worst) index by the exact judge, or None on a tie
    pope_items("adversarial", 50, seed)    # POPE questions with ids, balanced yes / no
    chair(texts, scenes)                   # CHAIR-s, CHAIR-i, object recall, mean length
    bow_cosine(a, b)                       # the offline text similarity of BDHS's filter

Descriptions are one sentence per object ("A red star is at the top left."), so sentence-wise tools
(BDHS's reference-guided prefixes, RLHF-V's corrections, dropping an unfinished last sentence) have clear
units. Yes/no questions are POPE's ("Is there a star in the image?"), answered "Yes, there is a red star."
or "No, there is no star.": the first word is the verdict (data.metrics.parse_yes_no).
"""
from __future__ import annotations

import json
import math
import os
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .. import InputError
from ..metrics import object_scores, parse_yes_no, sentences, words
from .formats import load_image, read_preference_jsonl
from .text import a, at_position, hallucinations, object_mentions, pope, position, shapes_of, vqa
from .world import COLORS, SHAPES, make_scene, rng_for

PROMPT_DESCRIBE = "Describe the image."
MAX_OBJECTS = 3  # objects a gold description names (the largest first)
# CHAIR's synonym table (Rohrbach et al. map COCO words onto 80 objects; here words onto ShapesWorld shapes)
SYNONYMS = {word: shape for word, shape in dict(
    ball="circle", disc="circle", disk="circle", box="square", block="square", rhombus="diamond",
    lozenge="diamond", plus="cross", pyramid="triangle", hexagram="star", pentagram="star").items()
    if word not in SHAPES}  # never remap a shape the world has


def object_sentence(obj, scene) -> str:
    return sentence_about(obj.color, obj.shape, at_position(position(obj, scene)))


def sentence_about(color: str, shape: str, where: str) -> str:
    text = a(f"{color} {shape}")
    return f"{text[0].upper()}{text[1:]} is {where}."


def described(scene) -> list:
    by_area = sorted(shapes_of(scene), key=lambda o: -(o.box[2] - o.box[0]) * (o.box[3] - o.box[1]))
    return by_area[:MAX_OBJECTS]


def pref_item(split: str, index: int, seed: int = 0, yes_no_share: float = 0.3, long: bool = False) -> dict:
    """A prompt with its scene and gold answer: a description, or (yes_no_share of items) a POPE-style
    existence question, half of them about an absent shape (answered as yes_no_answer(long))."""
    rng = rng_for("preference-item", split, index, seed)
    scene = make_scene(split, index, seed, "natural")
    item = dict(id=f"{split}-{index}", scene=scene, question=PROMPT_DESCRIBE, kind="describe",
                answer=" ".join(object_sentence(o, scene) for o in described(scene)))
    if rng.random() < yes_no_share:
        present = sorted({o.shape for o in shapes_of(scene)})
        absent = [s for s in SHAPES if s not in present]
        shape = rng.choice(present if rng.random() < 0.5 or not absent else absent)
        item.update(kind="yesno", shape=shape, long=long, question=f"Is there {a(shape)} in the image?",
                    answer=yes_no_answer(scene, shape, long=long))
    return item


def yes_no_answer(scene, shape: str, flip: bool = False, rng=None, long: bool = False) -> str:
    """The gold answer to "Is there a <shape>?" (flip: the wrong one): "yes" / "no", the SFT's VQA format,
    or long: "Yes, there is a red star." / "No, there is no star." (flipped: a made-up colour)."""
    objs = [o for o in shapes_of(scene) if o.shape == shape]
    if not long:
        return "yes" if bool(objs) != flip else "no"
    if bool(objs) != flip:
        color = objs[0].color if objs else rng.choice(COLORS)
        return f"Yes, there is {a(color + ' ' + shape)}."
    return f"No, there is no {shape}."


def povid(item: dict, rng) -> str:
    """POVID-style rejected answer: the gold answer with one hallucination injected from the scene graph (a
    sentence's colour or shape changed to one absent from the scene, or a sentence about an absent object
    added); a yes/no answer is flipped."""
    scene = item["scene"]
    if item["kind"] == "yesno":
        return yes_no_answer(scene, item["shape"], flip=True, rng=rng, long=item["long"])
    present = {(o.color, o.shape) for o in shapes_of(scene)}
    fakes = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
    parts, objs = sentences(item["answer"]), described(scene)
    how, i = rng.choice(["color", "shape", "extra"]), rng.randrange(len(objs)) if objs else 0
    if how == "extra" or not objs:
        color, shape = rng.choice(fakes)
        where = at_position(rng.choice(["top left", "top", "bottom right", "left", "center", "right"]))
        return " ".join(parts + [sentence_about(color, shape, where)])
    o = objs[i]
    color, shape = rng.choice([f for f in fakes if (f[1] if how == "color" else f[0]) ==
                               (o.shape if how == "color" else o.color)])
    parts[i] = sentence_about(color, shape, parts[i].split(" is ", 1)[1].rstrip("."))
    return " ".join(parts)


def correct(text: str, item: dict) -> str:
    """RLHF-V-style correction of a policy answer by the scene graph: a wrong yes/no verdict (or none) gets
    the gold answer; each sentence that mentions an absent object is replaced by a true sentence about a
    described object not yet mentioned (or dropped); an answer left without any object (a description that
    describes nothing) is rewritten as the gold answer. Equal to `text` when nothing was wrong."""
    scene = item["scene"]
    if item["kind"] == "yesno" and parse_yes_no(text) != parse_yes_no(item["answer"]):
        return item["answer"]
    mentioned = {s for _, s in object_mentions_norm(text)}
    spare = [o for o in described(scene) if o.shape not in mentioned]
    out = []
    for sentence in sentences(text):
        if hallucinations(normalize(sentence), scene):
            if spare:
                out.append(object_sentence(spare.pop(0), scene))
        else:
            out.append(sentence)
    fixed = " ".join(out)
    return fixed if object_mentions_norm(fixed) else item["answer"]  # nothing left to describe: rewritten


def rlhfv_pairs(items: list, answers: list) -> list:
    """RLHF-V-style pairs: (chosen = the answer corrected by the scene graph, rejected = the policy's answer),
    None where the answer needed no correction."""
    return [dict(item=it, chosen=fixed, rejected=text) if fixed != text else None
            for it, text in zip(items, answers) for fixed in [correct(text, it)]]


def samples(describe: list, texts: list, pope_items: list, pope_texts: list) -> list[str]:
    """Samples for report.md: 2 descriptions, then 3 POPE answers, unparseable ones first."""
    pope = sorted(zip(pope_texts, pope_items), key=lambda x: parse_yes_no(x[0]) is not None)
    return [f"{it['question']} -> {t!r} (gold {it['answer']!r})"
            for t, it in [*zip(texts[:2], describe), *pope[:3]]]


def normalize(text: str) -> str:
    """CHAIR's synonym step: synonyms (and their plurals) -> the world's shape words; and negated mentions
    ("there is no star") dropped: they deny an object, they do not claim one."""
    text = re.sub(r"\b(?:no|not an?|not any)\s+(?:[a-z]+\s+)?[a-z]+", "", text, flags=re.I)
    return re.sub(r"[A-Za-z]+", lambda m: SYNONYMS.get(m[0].lower().removesuffix("es").removesuffix("s"),
                                                     SYNONYMS.get(m[0].lower(), m[0])), text)


def object_mentions_norm(text: str):
    return object_mentions(normalize(text))


def score(text: str, item: dict) -> tuple:
    """The exact judge's key, smaller is better: (task failed, hallucinated objects, minus covered objects).
    Failed: a yes/no verdict wrong or unparseable, or a description that names no object. Without the last
    rule box digits ("43]") score (0, 0, 0), better than any description with one mistake, and online DPO
    learnt to answer "Describe the image." with digits (the collapse in results/dpo_bdhs.md)."""
    s = object_scores(normalize(text), item["scene"])  # a "no" answer's denied shape is not a mention
    if item["kind"] == "yesno":
        failed = parse_yes_no(text) != parse_yes_no(item["answer"])
    else:
        failed = s["mentions"] == 0
    covered = round(s["recall"] * len({(o.color, o.shape) for o in shapes_of(item["scene"])}))
    return int(failed), s["hallucinated"], -covered


def judge(texts: list[str], item: dict):
    """(index of the best, index of the worst) sample by score(); None when all score the same (a tie)."""
    keys = [score(t, item) for t in texts]
    best, worst = min(range(len(texts)), key=keys.__getitem__), max(range(len(texts)), key=keys.__getitem__)
    return None if keys[best] == keys[worst] else (best, worst)


POPE_SPLITS = ("random", "popular", "adversarial")


def item_sets(cfg) -> dict:
    """dpo_bdhs.py's items (cfg: n_train, eval_scenes, seed, yes_no_share, pairs), each set on scenes of its
    own: train prompts (or the user's --pairs), held-out pairs (test), descriptions for CHAIR (describe),
    general VQA, POPE per split. Train, test and describe items carry a POVID-style rejected answer."""
    n_eval, seed, share, long = cfg.eval_scenes, cfg.seed, cfg.yes_no_share, cfg.yes_no_long
    sets = dict(train=[pref_item("train", i, seed, share, long) for i in range(cfg.n_train)],
                test=[pref_item("test", i, seed, share, long) for i in range(n_eval)],
                describe=[pref_item("test", 10_000 + i, seed, 0.0) for i in range(n_eval)],
                vqa=vqa_items(n_eval, seed), pope={s: pope_items(s, n_eval, seed) for s in POPE_SPLITS})
    sets["train"], rng = user_items(cfg.pairs) if cfg.pairs else sets["train"], random.Random(seed)
    for item in [*sets["train"], *sets["test"], *sets["describe"]]:
        if "povid" not in item:  # a user's pair brings its own rejected answer
            item["povid"] = povid(item, rng)
    return sets


def gold_pairs(items: list, rejected: list | None = None) -> list[dict]:
    """Preference pairs with the gold answer as chosen; rejected: one per item (default: its POVID answer)."""
    rejected = [it["povid"] for it in items] if rejected is None else rejected
    return [dict(item=it, chosen=it["answer"], rejected=r) for it, r in zip(items, rejected)]


def pope_items(negatives: str, n_scenes: int, seed: int = 0) -> list[dict]:
    """POPE questions on test scenes, each with an id (negatives-scene-question) to match answers by."""
    out = []
    for i in range(n_scenes):
        scene = make_scene("test", 50_000 + i, seed, "natural")  # apart from the description / VQA scenes
        for j, (question, answer) in enumerate(pope(scene, negatives, seed)):
            out.append(dict(id=f"{negatives}-{i}-{j}", scene=scene, question=question, answer=answer))
    return out


def pope_scores(items: list[dict], answers: dict) -> dict:
    """POPE metrics (percent) with answers matched by item id: accuracy, precision, recall and F1 of "yes",
    yes-ratio, and the unparseable share (an answer that is neither yes nor no is never a yes: it counts
    as wrong and as neither a predicted yes nor a predicted no)."""
    pred = {it["id"]: parse_yes_no(answers[it["id"]]) for it in items}
    tp = sum(pred[it["id"]] == "yes" and it["answer"] == "yes" for it in items)
    fp = sum(pred[it["id"]] == "yes" and it["answer"] == "no" for it in items)
    fn = sum(pred[it["id"]] != "yes" and it["answer"] == "yes" for it in items)
    n, n_yes = len(items), sum(p == "yes" for p in pred.values())
    precision, recall = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    return dict(acc=100 * sum(pred[it["id"]] == it["answer"] for it in items) / n, precision=100 * precision,
                recall=100 * recall, f1=200 * precision * recall / max(precision + recall, 1e-9),
                yes_ratio=100 * n_yes / n, unparseable=100 * sum(p is None for p in pred.values()) / n)


def pope_splits(items: dict, texts: dict) -> dict:
    """pope_scores per split ({split: items}, {split: answer texts in item order}) as pope_<split>_<metric>,
    and pope_<metric>: the mean over the splits of accuracy, F1, yes-ratio and the unparseable share."""
    m = {f"pope_{s}_{k}": v for s in items
         for k, v in pope_scores(items[s], {it["id"]: t for it, t in zip(items[s], texts[s])}).items()}
    return m | {f"pope_{k}": sum(m[f"pope_{s}_{k}"] for s in items) / len(items)
                for k in ("acc", "f1", "yes_ratio", "unparseable")}


def drop_unfinished(text: str) -> str:
    """The text without an unfinished last sentence (one not ending in '.', '?' or '!')."""
    parts = sentences(text)
    return " ".join(parts[:-1] if parts and parts[-1][-1] not in ".?!" else parts)


def chair(texts: list[str], scenes: list, drop_last: bool = True) -> dict:
    """CHAIR (Rohrbach et al. 2018) against the scene graphs, after the synonym table: CHAIR-s = share of
    descriptions with a hallucinated object, CHAIR-i = hallucinated mentions / all mentions; object recall
    (OPERA's addition) and mean length in words beside them. All in percent but the length."""
    texts = [normalize(drop_unfinished(t) if drop_last else t) for t in texts]
    scores = [object_scores(t, s) for t, s in zip(texts, scenes, strict=True)]
    mentions = sum(s["mentions"] for s in scores)
    return dict(chair_s=100 * sum(s["hallucinated"] > 0 for s in scores) / len(scores),
                chair_i=100 * sum(s["hallucinated"] for s in scores) / max(mentions, 1),
                recall=100 * sum(s["recall"] for s in scores) / len(scores),
                length=sum(len(words(t)) for t in texts) / len(texts))


def vqa_accuracy(texts: list[str], items: list[dict]) -> float:
    """Exact match (percent) after data.metrics.words (lower case, punctuation dropped), as mm1's VQA."""
    return 100 * float(np.mean([words(t) == words(it["answer"]) for t, it in zip(texts, items)]))


def bow_cosine(a_text: str, b_text: str) -> float:
    """Cosine of bag-of-words count vectors (data.metrics.words): the offline stand-in for the
    all-mpnet-base-v2 similarity of BDHS's filter. 1.0 for the same words in any order."""
    ca, cb = Counter(words(a_text)), Counter(words(b_text))
    dot = sum(v * cb[k] for k, v in ca.items())
    norm = math.sqrt(sum(v * v for v in ca.values()) * sum(v * v for v in cb.values()))
    return dot / norm if norm else float(a_text.strip() == b_text.strip())


def write_preference_jsonl(path, rows: list[dict], image_folder) -> None:
    """TRL's standard preference JSONL: {"prompt": "<image>question", "chosen", "rejected", "images":
    [png path relative to the file]}, one PNG per row written into image_folder (PIL images in row["pil"])."""
    path, folder = Path(path), Path(image_folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i, row in enumerate(rows):
            row["pil"].save(folder / f"{i}.png")
            f.write(json.dumps({"prompt": "<image>" + row["question"], "chosen": row["chosen"],
                                "rejected": row["rejected"],
                                "images": [os.path.relpath(folder / f"{i}.png", path.parent)]}) + "\n")


def export_povid(path, items: list) -> None:
    """dpo_bdhs.py --export: the POVID-style training pairs (gold vs injected hallucination) as TRL JSONL."""
    write_preference_jsonl(path, [dict(it, chosen=it["answer"], rejected=it["povid"]) for it in items],
                           f"{path}.images")


def curves_png(path, series: dict, title: str, size=(640, 360)) -> None:
    """Line plot of named series (lists of numbers over steps) with Pillow: one colour per series, the legend
    and the y range written in the corner (matplotlib is not a dependency)."""
    image = Image.new("RGB", size, "white")
    draw, (w, h) = ImageDraw.Draw(image), size
    values = [v for ys in series.values() for v in ys] or [0.0]
    lo, hi = min(values), max(values) + 1e-9
    palette = [(0, 110, 200), (210, 40, 40), (0, 150, 60), (150, 90, 0), (120, 0, 160), (90, 90, 90)]
    for k, (name, ys) in enumerate(series.items()):
        points = [(40 + i * (w - 60) / max(len(ys) - 1, 1), h - 30 - (y - lo) / (hi - lo) * (h - 70))
                  for i, y in enumerate(ys)]
        draw.line(points, fill=palette[k % len(palette)], width=2) if len(points) > 1 else None
        draw.text((w - 230, 30 + 14 * k), name, fill=palette[k % len(palette)])
    draw.text((10, 8), f"{title}   y: {lo:.2f} .. {hi:.2f}   x: step", fill="black")
    image.save(path)


def vqa_items(n: int, seed: int = 0) -> list[dict]:
    """General VQA on held-out scenes (not counts or labels): the no-regression check of alignment."""
    out = []
    for i in range(n):
        scene = make_scene("test", 20_000 + i, seed, "natural")
        qa = [(q, ans) for q, ans in vqa(scene, seed) if not ans.isdigit() and "label" not in q]
        out += [dict(id=f"vqa-{i}", scene=scene, question=qa[0][0], answer=qa[0][1])] if qa else []
    return out


def user_items(path) -> list[dict]:
    """A user's TRL preference JSONL (read_preference_jsonl: unknown keys are an error), one image per pair,
    as prompt items: answer = chosen, povid = rejected, pil = the image."""
    items = []
    for row in read_preference_jsonl(path):
        if len(row["images"]) != 1:
            raise InputError(f"{path}:{row['line']}: {len(row['images'])} images, expected exactly 1")
        items.append(dict(id=f"user-{row['line']}", question=row["prompt"].replace("<image>", "").strip(),
                          answer=row["chosen"], povid=row["rejected"], kind="user",
                          pil=load_image(row["images"][0])))
    return items


def bdhs_prefixes(answer: str, rng) -> list[tuple[str, str]]:
    """BDHS's reference-guided prefixes (Algorithm 1): per gold sentence, (the gold sentences before it, the
    sentence cut before a random word). A sentence starting with yes / no is flipped with probability 0.5 and
    keeps that first word; any other may be cut to nothing (the sentence is then generated whole)."""
    gold, out = sentences(answer), []
    for i, sentence in enumerate(gold):
        w = sentence.split()
        verdict = bool(w) and w[0].lower().strip(",.") in ("yes", "no")
        if verdict and rng.random() < 0.5:  # the other verdict, same case: "no" -> "yes", "No," -> "Yes,"
            flipped = "no" if w[0].lower().startswith("yes") else "yes"
            w[0] = (flipped.title() if w[0][0].isupper() else flipped) + w[0][len(w[0].rstrip(",.")):]
        cut = rng.randrange(int(verdict), max(len(w), int(verdict) + 1))
        out.append((" ".join(gold[:i]), " ".join(w[:cut])))
    return out


def mean_sd(values) -> tuple[float, float]:
    """Mean and sample sd (ddof 1; nan for one value)."""
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else float("nan")
    return mean, math.sqrt(var)


def verdict(name_a: str, a: list, name_b: str, b: list, lower_better: bool) -> str:
    """a vs b over seeds: a difference of at most 2 pooled sd is noise; one seed gives no verdict."""
    (ma, sa), (mb, sb) = mean_sd(a), mean_sd(b)
    diff, sd = ma - mb, math.sqrt((sa ** 2 + sb ** 2) / 2)
    if math.isnan(sd):
        return f"{name_a} - {name_b}: {diff:+.2f} (one seed: no sd, no verdict)"
    better = name_a if (diff < 0) == lower_better else name_b
    return f"{name_a} - {name_b}: {diff:+.2f} (2 sd = {2 * sd:.2f}): " + (
        "noise" if abs(diff) <= 2 * sd else f"{better} better")  # <=: equal rows with sd 0 are no win


def histogram(values: list, bins: int = 10) -> str:
    """A text histogram of values in [0, 1]."""
    counts = Counter(min(int(v * bins), bins - 1) for v in values)
    top = max(counts.values(), default=1)
    return "\n".join(f"    {i / bins:.1f}-{(i + 1) / bins:.1f} {counts[i]:5d} "
                     + "#" * round(40 * counts[i] / top) for i in range(bins))


def table_and_verdicts(results: dict, rows, seeds, table: list, claims: list) -> str:
    """A markdown table of results["row/seed"][key] as mean ± sd over seeds (table: (header, key, lower is
    better or None)), then one verdict per claim (text, row a, row b, key) by verdict()."""
    cells = lambda row, key: mean_sd([results[f"{row}/{s}"][key] for s in seeds])  # noqa: E731
    lines = ["| row | " + " | ".join(name for name, _, _ in table) + " |", "|---" * (len(table) + 1) + "|"]
    for row in rows:
        lines.append(f"| {row} | " + " | ".join(f"{m:.{DIGITS.get(key, 1)}f}" + (
            "" if math.isnan(sd) else f" ± {sd:.{DIGITS.get(key, 1)}f}") for key, (m, sd) in
            ((key, cells(row, key)) for _, key, _ in table)) + " |")
    lower = {key: low for _, key, low in table}
    lines += ["", "Verdicts (a difference of at most 2 sd is noise):"] + [
        f"- {text or '  and'}: {key}: " + verdict(a, [results[f"{a}/{s}"][key] for s in seeds], b,
                                                  [results[f"{b}/{s}"][key] for s in seeds], lower[key])
        for text, a, b, key in claims if a in rows and b in rows]
    return "\n".join(lines)


def judged_pairs(items: list, samples: list, n: int, counts: dict) -> list:
    """Online pairs from n samples per item (item-major): chosen = the judge's best, rejected = its worst;
    an item whose samples tie is dropped and counted in counts["online_ties"]."""
    pairs = []
    for j, item in enumerate(items):
        verdict = judge(samples[j * n:(j + 1) * n], item)
        pairs += [dict(item=item, chosen=samples[j * n + verdict[0]], rejected=samples[j * n + verdict[1]])
                  ] if verdict else []
    counts["online_ties"] = counts.get("online_ties", 0) + len(items) - len(pairs)
    return pairs


def bdhs_report(stats: dict, threshold: float, max_tries: int) -> str:
    """BDHS's filter in report.md: similarity histogram over every try, tries per example, examples."""
    tries = dict(sorted(Counter(stats["tries"]).items()))
    examples = "\n".join(f"- y+ {gold!r}\n  y- {neg!r}" for gold, neg in stats["examples"][:4])
    return (f"similarity filter (bag-of-words cosine with y+, every try; threshold {threshold}):\n"
            f"{histogram(stats['similarity'])}\ntries per example (1..{max_tries}, the last unguided): "
            f"{tries}\n"
            f"{examples}")


# dpo_bdhs.py's table: (header, metrics key, lower is better / None: no direction), and the paper's claims as
# (text, row a, row b, key) comparisons
TABLE = [("POPE acc", "pope_acc", False), ("F1", "pope_f1", False), ("yes %", "pope_yes_ratio", None),
         ("unparsed %", "pope_unparseable", True), ("CHAIR-s", "chair_s", True), ("CHAIR-i", "chair_i", True),
         ("recall", "recall", False), ("length", "length", None), ("VQA", "vqa", False),
         ("RM acc off", "reward_acc_offline", False), ("on", "reward_acc_on_policy", False),
         ("margin img - blank", "image_use", None)]
DIGITS = {"image_use": 3}  # decimals where one hides the value: the margin is 0.01-0.08 nats at this scale
CLAIMS = [("offline: less hallucination", "povid", "online", "chair_i"), ("", "povid", "online", "pope_acc"),
          ("online best for helpfulness", "online", "povid", "recall"), ("", "mixed", "povid", "recall"),
          ("mixed combines", "mixed", "online", "chair_i"), ("BDHS >= offline", "bdhs", "povid", "chair_i"),
          ("", "bdhs", "povid", "pope_acc")]


def report_md(cfg, metrics: dict) -> str:
    """dpo_bdhs.py's report.md from its metrics.json: the table with verdicts, BDHS's filter, ties, the step-0
    loss per row, the reference mode (upfront: its check against live), a description sample per row (first
    seed)."""
    results, first = metrics["results"], cfg.seeds[0]
    step0 = {r: results[f"{r}/{first}"].get("step0_loss") for r in cfg.rows}
    samples = "\n".join(f"- {r}: {results[f'{r}/{first}']['samples'][0]}" for r in cfg.rows)
    checked = {s: d for s, d in metrics["ref_upfront_max_diff"].items() if d is not None}
    reference = "live (frozen copy)" if cfg.ref == "live" else (
        f"upfront (the table checked against the live reference on one batch per seed, max |diff| of summed "
        f"log-probs: {json.dumps(checked)})")
    return (f"# Multimodal DPO and BDHS miniature ({cfg.preset} preset)\n\n{len(cfg.seeds)} seed(s) "
            f"{list(cfg.seeds)}: mean ± sd over seeds\n\n"
            f"{table_and_verdicts(results, cfg.rows, cfg.seeds, TABLE, CLAIMS)}\n\n## BDHS\n"
            f"{bdhs_report(metrics['bdhs'], cfg.sim_threshold, cfg.max_tries)}\n\n"
            f"ties and corrections not needed: {json.dumps(metrics['ties'])}\n"
            f"step-0 DPO loss per row (RPO's NLL apart; ln 2 = {math.log(2):.6f}): {json.dumps(step0)}\n"
            f"reference: {reference}\n"
            f"responses truncated: {metrics['truncated']}\n\n{samples}\n\n"
            f"wall time {metrics['wall_time_s']:.0f} s\n")
