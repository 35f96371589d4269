"""MIA-Bench's judge protocol (Qian et al., arXiv:2407.01509), written once for the official file and ours.

    items = load_items("instruction_benchmark_all.json")  # the official 400, or a ShapesWorld benchmark
    stats(items)                                           # type counts, weight patterns, repeated types
    prompt = judge_prompt(item, response)                  # the official notebook's judge prompt, verbatim
    parsed = parse_reply(reply, item["component_weight"])  # ratios per component, or the failure's kind
    score_replies(items, replies)                          # official-compatible / strict / failures, per type

Differences from the official notebook (apple/ml-mia-bench evaluation.ipynb), each a fault found there:
its parser reads only the text before the first '.' (a decimal "8.5/10" or markdown breaks it), trusts
the judge's denominators and total, and drops every failure silently (`except: pass`); its per-type means
overwrite a type that repeats within an item (22 of the 400 items); answers are matched by row order.
Here the reply is searched for "score of component i: x/w" and "total score: z/10" anywhere (markdown,
decimals, missing spaces), each denominator must equal the item's weight, the total must equal the sum of
the parts (scaled to 10 when the weights don't sum to 10, as in 2 official items), the item score is the
sum of the parts (never the judge's total), failures are counted, and answers are matched by id.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections import Counter

from . import InputError
from .jsonl import iter_jsonl, read_text

TYPES = ("describe", "mention", "length_limit", "linguistics", "grammar", "textual", "math", "perspective")
FIELDS = ("instruction", "type", "num_of_component", "components", "component_weight", "component_type")
ORDINALS = ("first", "second", "third", "fourth", "fifth")
# the official wording of the weights sentence, sic ("The first second, and third component is each worth")
WORTH = {1: "The first component is worth", 2: "The first and second component is each worth",
         3: "The first second, and third component is each worth",
         4: "The first second, third, and fourth component is each worth",
         5: "The first second, third, fourth and fifth component is each worth"}
FAILURES = ("error_answer", "no_answer", "no_reply", "empty", "missing_component", "denominator",
            "out_of_range", "total_missing", "total_mismatch")


def item_id(item: dict) -> str:
    """An item's key for matching answers: its `id`, else its image (the official file's URLs are unique)."""
    return str(item.get("id") or item["image"])


def load_items(path) -> list[dict]:
    """A MIA-Bench JSON list (official fields + `image`), every item checked: the fields present, one
    weight and one known type per component, unique ids."""
    text = read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(data, list) or not data:
        raise InputError(f"{path}: expected a non-empty JSON list of MIA-Bench items")
    seen = set()
    for n, item in enumerate(data):
        where = f"{path}: item {n}"
        missing = [k for k in (*FIELDS, "image") if not isinstance(item, dict) or k not in item]
        if missing:
            raise InputError(f"{where}: missing {', '.join(missing)} (expected {', '.join(FIELDS)}, image)")
        if not isinstance(item["image"], str) or not item["image"].strip():
            raise InputError(f"{where}: image {item['image']!r}: expected its URL or path (judges see it)")
        comps, weights, types = item["components"], item["component_weight"], item["component_type"]
        if not (isinstance(comps, list) and all(isinstance(c, str) for c in comps) and 1 <= len(comps) <= 5):
            raise InputError(f"{where}: components must be a list of 1 to 5 strings")
        if len(weights) != len(comps) or not all(type(w) is int and w > 0 for w in weights):
            raise InputError(f"{where}: component_weight {weights}: expected one positive int per component")
        if len(types) != len(comps) or any(t not in TYPES for t in types):
            raise InputError(f"{where}: component_type {types}: expected one of {TYPES} per component")
        if item_id(item) in seen:
            raise InputError(f"{where}: id {item_id(item)!r} repeats")
        seen.add(item_id(item))
    return data


def stats(items: list[dict]) -> dict:
    """Component-type counts (every instance), weight patterns, component counts, categories, items that
    repeat a type (where the official per-type means overwrite) and items whose weights don't sum to 10."""
    return dict(items=len(items), types=dict(Counter(t for it in items for t in it["component_type"])),
                weights=dict(Counter(str(it["component_weight"]) for it in items).most_common()),
                components=dict(sorted(Counter(len(it["components"]) for it in items).items())),
                categories=dict(Counter(it["type"] for it in items).most_common()),
                repeated_type=sum(len(set(it["component_type"])) < len(it["component_type"]) for it in items),
                weights_not_10=sum(sum(it["component_weight"]) != 10 for it in items))


def judge_prompt(item: dict, response: str) -> str:
    """The judge prompt of the official notebook (generate_prompt), character for character, including its
    quirks: the instruction's opening quote never closes, and the example sentence says x/2 and y/8 whatever
    the weights are."""
    comps, weights = item["components"], [str(w) for w in item["component_weight"]]
    listed = ", and ".join(f"the {ORDINALS[i]} component is:' {c}'" for i, c in enumerate(comps))
    worth = weights[0] if len(weights) == 1 else ", ".join(weights[:-1]) + " and " + weights[-1]
    return (f"Here is an instruction for a multimodal LLM: ' {item['instruction']} You need to grade if the "
            f"response from the model follows each component of the instruction. {listed[0].upper()}"
            f"{listed[1:]} The response is:' {response}' You need to score the response and be strict. The "
            "total score ranges from 0 to 10, depending on if the response follows the instruction. "
            f"{WORTH[len(comps)]} {worth} scores. List scores of each component, and the total score in one "
            "sentence in this format: score of component 1: x/2, score of component 2: y/8, total score: "
            "z/10. Then explain your reasons.")


def prompt_sha256(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()


def score_sentence(scores: list, weights: list) -> str:
    """The official output sentence: "score of component 1: x/w1, ..., total score: z/10"."""
    parts = [f"score of component {i + 1}: {s:g}/{w}" for i, (s, w) in enumerate(zip(scores, weights))]
    return ", ".join(parts + [f"total score: {sum(scores) * 10 / sum(weights):g}/10"]) + "."


_NUM = r"(\d+(?:\.\d+)?)"
_COMPONENT = re.compile(rf"score\s*of\s*component\s*(\d+)\s*\W*:\W*\s*{_NUM}\s*/\s*{_NUM}", re.I)
_TOTAL = re.compile(rf"total\s*score\s*\W*:\W*\s*{_NUM}\s*/\s*{_NUM}", re.I)


def parse_reply(reply: str, weights: list) -> dict:
    """A judge's reply -> {"ratios": [x_i / w_i], "score": sum x / sum w} or {"failure": kind, "why": ...}.
    Tolerates markdown (**bold**), decimals, missing or extra spaces and text around the sentence; takes the
    first score of each component; every denominator must equal the item's weight, 0 <= x <= w, and the
    judge's total must match the sum of the parts within 0.5 (the total is checked, never used)."""
    if not reply or not reply.strip():
        return dict(failure="empty", why="empty reply")
    text = reply.replace("*", "").replace("`", "")
    found = {}
    for m in _COMPONENT.finditer(text):
        found.setdefault(int(m[1]), (float(m[2]), float(m[3])))
    scores = []
    for i, w in enumerate(weights, 1):
        if i not in found:
            return dict(failure="missing_component", why=f"no score of component {i}")
        x, denominator = found[i]
        if denominator != w:
            return dict(failure="denominator", why=f"component {i}: {x:g}/{denominator:g}, weight {w}")
        if not 0 <= x <= w:
            return dict(failure="out_of_range", why=f"component {i}: {x:g}/{w}")
        scores.append(x)
    total = _TOTAL.search(text)
    if total is None or float(total[2]) != 10:
        return dict(failure="total_missing", why="no 'total score: z/10'")
    expected = sum(scores) * 10 / sum(weights)
    if abs(float(total[1]) - expected) > 0.5:
        return dict(failure="total_mismatch", why=f"total {float(total[1]):g}/10, parts give {expected:g}/10")
    return dict(ratios=[x / w for x, w in zip(scores, weights)], score=sum(scores) / sum(weights))


def official_parse(reply: str, types: list) -> dict:
    """The official notebook's process_rawscore re-stated (for comparison only): the text before the first
    '.', split on ',', each part's "x/y" after ': ' as int(x) / int(y), keyed by component type (a repeated
    type overwrites), the last part as the total. Raises on anything else (the notebook then skips it)."""
    parts = reply.split(".")[0].split(",")
    out = {}
    for i, part in enumerate(parts[:-1]):
        x, y = part.split(":")[1][1:].split("/")
        out[types[i]] = int(x) / int(y)
    x, y = parts[-1].split(":")[1][1:].split("/")
    return out | {"total_score": int(x) / int(y)}


def read_replies(path) -> dict:
    """A judge's replies, JSONL rows {"prompt_sha256": ..., "reply": ...} -> {sha256: reply} (a cache keyed
    by the prompt, so a changed answer or prompt never reuses an old reply)."""
    out = {}
    for lineno, row in iter_jsonl(path):
        if not isinstance(row.get("prompt_sha256"), str) or not isinstance(row.get("reply"), str):
            raise InputError(f"{path}:{lineno}: expected string fields prompt_sha256 and reply")
        out[row["prompt_sha256"]] = row["reply"]
    return out


def read_answers(path, items: list[dict] | None = None) -> dict:
    """Model answers, JSONL rows {"question_id": item id (official: the image URL), "text": ...} -> {id:
    text}; an id given twice, or one that is no item's (when `items` is given), is an error: matching is by
    id, never by row order."""
    out, known = {}, None if items is None else {item_id(item) for item in items}
    for lineno, row in iter_jsonl(path):
        key, text = row.get("question_id", row.get("id")), row.get("text")
        if not isinstance(key, str) or not isinstance(text, str):
            raise InputError(f"{path}:{lineno}: expected string fields question_id and text")
        if key in out:
            raise InputError(f"{path}:{lineno}: question_id {key!r} repeats")
        if known is not None and key not in known:
            raise InputError(f"{path}:{lineno}: question_id {key!r} is no item of the benchmark (the "
                             "official file's ids are its image URLs)")
        out[key] = text
    return out


def score_replies(items: list[dict], answers: dict, replies: dict) -> dict:
    """Scores of a judge's replies ({item id: reply}) to the answers ({item id: text}), in percent:
    official_compatible (mean over parsed items, failures skipped as the notebook does), strict (failures
    count 0), failures by kind, per-type means over every component instance, the notebook's overwriting
    per-type means, and the notebook's own parse of every reply (official_as_is: the judge's totals as it
    trusts them, and how many replies it skips)."""
    item_scores, failures, per_type, overwrite, as_is, as_is_skipped = [], Counter(), {}, {}, [], 0
    for item in items:
        key = item_id(item)
        if key not in answers or answers[key] == "error":  # the notebook sends no 'error' answer to a judge
            failures["no_answer" if key not in answers else "error_answer"] += 1
            item_scores.append(None)
            continue
        reply = replies.get(key)
        parsed = dict(failure="no_reply") if reply is None else parse_reply(reply, item["component_weight"])
        item_scores.append(parsed.get("score"))
        try:
            as_is.append(official_parse(reply or "", item["component_type"])["total_score"])
        except (IndexError, ValueError, ZeroDivisionError):  # the notebook's `except: pass`
            as_is_skipped += 1
        if "failure" in parsed:
            failures[parsed["failure"]] += 1
            continue
        last = {}
        for t, ratio in zip(item["component_type"], parsed["ratios"]):
            per_type.setdefault(t, []).append(ratio)
            last[t] = ratio
        for t, ratio in last.items():
            overwrite.setdefault(t, []).append(ratio)
    parsed_scores = [s for s in item_scores if s is not None]
    mean = lambda xs: round(100 * sum(xs) / len(xs), 2) if xs else None
    return dict(n=len(items), parsed=len(parsed_scores), official_compatible=mean(parsed_scores),
                strict=mean([s or 0.0 for s in item_scores]), failures=dict(failures),
                failed=sum(failures.values()), per_type={t: mean(v) for t, v in per_type.items()},
                per_type_n={t: len(v) for t, v in per_type.items()},
                per_type_overwritten={t: mean(v) for t, v in overwrite.items()},
                official_as_is=mean(as_is), official_as_is_skipped=as_is_skipped)


def prompt_rows(items: list[dict], answers: dict) -> list[dict]:
    """The judge prompt of every answered item ({item id: text}; an 'error' answer gets none, as in the
    notebook), each row with the item's image: the official judge sees the image with the prompt."""
    rows = []
    for item in items:
        text = answers.get(item_id(item), "error")
        if text != "error":
            prompt = judge_prompt(item, text)
            rows.append(dict(id=item_id(item), image=item["image"], prompt_sha256=prompt_sha256(prompt),
                             prompt=prompt))
    return rows


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def stats_table(ours: dict, official: dict | None) -> str:
    """Markdown: type counts, weight patterns, component counts, items repeating a type and items whose
    weights don't sum to 10 (stats()), the official file's beside ours."""
    lines = [f"| statistic | official ({official['items'] if official else 'file not given'}) | ours "
             f"({ours['items']}) |", "|---|---|---|"]
    for key, subs in (("types", TYPES), ("weights", ("[6, 4]", "[4, 3, 3]", "[4, 2, 2, 2]")),
                      ("components", (2, 3, 4, 5)), ("repeated_type", [None]), ("weights_not_10", [None])):
        for sub in subs:
            get = lambda s, k=key, x=sub: (s[k] if x is None else s[k].get(x, 0)) if s else "n/a"
            lines.append(f"| {key} {'' if sub is None else sub} | {get(official)} | {get(ours)} |")
    return "\n".join(lines)
