"""mia_bench.py and its data: the official protocol (judge prompt verbatim, the reply parser on a fake judge's
malformed replies, the three scores, per-type means over every instance, answers by id), the official file's
statistics (skipped when ../shared is absent), the ShapesWorld items (every rule on hand-made answers, gold
responses, held-out combinations), the official mode, the missing --init message, and a smoke run from an
mm1 -> mm15 smoke chain."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mia_bench
from data import InputError, mia
from data.shapes import Obj, Scene, TextItem
from data.shapes import mia as world_mia

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "mia"
OFFICIAL = ROOT.parent / "shared" / "miabench" / "instruction_benchmark_all.json"
ITEM = {"image": "http://example.org/1.jpg", "instruction": "Explain the activity in the image using exactly "
        "two sentences, including one metaphor.", "type": "advanced", "num_of_component": 3,
        "components": ["Explain the activity in the image", "using exactly two sentences",
                       "including one metaphor"], "component_weight": [4, 3, 3],
        "component_type": ["describe", "length_limit", "linguistics"]}


def fake_judge():
    return [json.loads(line) for line in (FIXTURES / "fake_judge.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- the official protocol
def test_judge_prompt_is_the_official_notebooks_text():
    want = ("Here is an instruction for a multimodal LLM: ' Explain the activity in the image using exactly "
            "two sentences, including one metaphor. You need to grade if the response from the model follows "
            "each component of the instruction. The first component is:' Explain the activity in the image', "
            "and the second component is:' using exactly two sentences', and the third component is:' "
            "including one metaphor' The response is:' Two dogs run. They fly.' You need to score the "
            "response and be strict. The total score ranges from 0 to 10, depending on if the response "
            "follows the instruction. The first second, and third component is each worth 4, 3 and 3 scores. "
            "List scores of each component, and the total score in one sentence in this format: score of "
            "component 1: x/2, score of component 2: y/8, total score: z/10. Then explain your reasons.")
    assert mia.judge_prompt(ITEM, "Two dogs run. They fly.") == want
    two = dict(ITEM, components=["a", "b"], component_weight=[6, 4])
    assert ("The first component is:' a', and the second component is:' b' The response is:' r' "
            in mia.judge_prompt(two, "r"))
    assert "The first and second component is each worth 6 and 4 scores." in mia.judge_prompt(two, "r")
    one = dict(ITEM, components=["a"], component_weight=[10])
    assert "The first component is:' a' The response" in mia.judge_prompt(one, "r")
    assert "The first component is worth 10 scores." in mia.judge_prompt(one, "r")


@pytest.mark.parametrize("row", fake_judge(), ids=lambda r: r["case"])
def test_parser_on_the_fake_judges_replies(row):
    parsed = mia.parse_reply(row["reply"], row["weights"])
    if isinstance(row["expect"], str):
        assert parsed.get("failure") == row["expect"], parsed
    else:
        assert parsed.get("score") == pytest.approx(row["expect"]), parsed
    types = ["describe", "mention", "grammar"][:len(row["weights"])]
    try:  # the notebook's parser on the same reply: what it skips silently, and what it trusts
        official = f"{mia.official_parse(row['reply'], types)['total_score']:g}"
    except (IndexError, ValueError, ZeroDivisionError):
        official = "skipped"
    assert official == row["official"]


def test_three_scores_failures_and_per_type_over_every_instance():
    rows = fake_judge()
    items = [dict(ITEM, image=f"u{i}", components=["c"] * len(r["weights"]), component_weight=r["weights"],
                  component_type=(["mention"] * 3)[:len(r["weights"])]) for i, r in enumerate(rows)]
    items.append(dict(items[0], image="no-answer"))
    items.append(dict(items[0], image="error-answer"))
    answers = {f"u{i}": "text" for i in range(len(rows))} | {"error-answer": "error"}
    replies = {f"u{i}": r["reply"] for i, r in enumerate(rows)}
    scores = mia.score_replies(items, answers, replies)
    good = [r["expect"] for r in rows if not isinstance(r["expect"], str)]
    assert scores["parsed"] == len(good) == 4
    assert scores["official_compatible"] == pytest.approx(100 * sum(good) / 4, abs=0.01)
    assert scores["strict"] == pytest.approx(100 * sum(good) / len(items), abs=0.01)
    assert scores["failed"] == len(items) - 4
    assert scores["failures"] == {"missing_component": 2, "denominator": 1, "total_mismatch": 1,
                                  "out_of_range": 1, "empty": 1, "no_answer": 1, "error_answer": 1}
    # every component is of type mention: over every instance vs the notebook's overwrite (the last one)
    instances = [1.0, 0.5, 1.0, 1.0, 0.0, 0.875, 1.0, 0.5, 1.0, 1.0]
    assert scores["per_type"]["mention"] == pytest.approx(100 * sum(instances) / 10, abs=0.01)
    assert scores["per_type_n"]["mention"] == 10
    assert scores["per_type_overwritten"]["mention"] == pytest.approx(100 * (0.5 + 0 + 0.5 + 1) / 4, abs=0.01)
    # the notebook skips markdown, decimal, missing spaces (parsed here), the copied example and the empty
    # reply; it trusts the rest's totals: missing component 6/10, wrong denominator 9/10, mismatch 9/10, ...
    assert scores["official_as_is_skipped"] == 5
    assert scores["official_as_is"] == pytest.approx(100 * (0.8 + 0.6 + 0.9 + 0.9 + 1.0) / 5, abs=0.01)


def test_answers_are_matched_by_id_never_by_order(tmp_path):
    items = [dict(ITEM, image=f"u{i}") for i in range(3)]
    rows = [{"question_id": f"u{i}", "text": f"answer {i}"} for i in (2, 0, 1)]
    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    answers = mia.read_answers(path)
    assert [answers[mia.item_id(it)] for it in items] == ["answer 0", "answer 1", "answer 2"]
    path.write_text(path.read_text() + json.dumps(rows[0]) + "\n")
    with pytest.raises(InputError, match=r"answers.jsonl:4: question_id 'u2' repeats"):
        mia.read_answers(path)


def test_bad_benchmark_file_names_item_and_field(tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps([ITEM, dict(ITEM, image="b", component_weight=[4, 3])]))
    with pytest.raises(InputError, match=r"bench.json: item 1: component_weight \[4, 3\]"):
        mia.load_items(path)
    path.write_text(json.dumps([dict(ITEM, image="")]))
    with pytest.raises(InputError, match=r"bench.json: item 0: image '': expected its URL or path"):
        mia.load_items(path)  # a judge prompt never goes out without its image


@pytest.mark.skipif(not OFFICIAL.is_file(), reason="../shared/miabench is not here")
def test_official_file_statistics_and_its_400_prompts():
    items = mia.load_items(OFFICIAL)
    s = mia.stats(items)
    assert s["items"] == 400 and s["repeated_type"] == 22 and s["weights_not_10"] == 2
    assert s["types"] == {"describe": 311, "mention": 221, "length_limit": 213, "linguistics": 140,
                          "grammar": 72, "textual": 40, "math": 31, "perspective": 10}
    assert (s["weights"]["[6, 4]"], s["weights"]["[4, 3, 3]"], s["weights"]["[4, 2, 2, 2]"]) == (190, 140, 27)
    prompts = {mia.judge_prompt(it, "r") for it in items}
    assert len(prompts) == 400 and all("score of component 1: x/2" in p for p in prompts)


# ----------------------------------------------------------------------------- ShapesWorld items
SCENE = Scene(1000, 1000, "beige", [Obj("star", "red", "large", (100, 100, 400, 400)),
                                     Obj("circle", "blue", "small", (600, 600, 720, 720))],
              [TextItem("SALE", (600, 100, 800, 180))])
CASES = {  # rule: (argument, answers that pass, answers that fail), checked against SCENE
    "describe/image": (None, ["A red star and a blue circle."], ["A green square and a red star.", "Nice."]),
    "describe/largest": (None, ["The largest is a red star.", "A big star."],
                         ["The largest is a blue circle."]),
    "textual/quote": ("SALE", ['The sign says "SALE".', "It reads “SALE”."],
                      ["It says SALE.", 'It says "sale".']),
    "math/count": (2, ["There are two shapes.", "2"], ["There are 3 shapes.", "2 shapes and 1 label."]),
    "math/color_count": (1, ["One red shape."], ["Two red shapes.", "None."]),
    "math/sum": (2, ["The total is 2."], ["1 plus 1 is 2.", "Three."]),
    "perspective/object": (["red", "star", 0], ["I am a red star.", "My star points shine."],
                           ["The red star is big.", "I am a circle."]),
    "mention/background": ("beige", ["A star on beige."], ["A star on white."]),
    "mention/no_color": (None, ["A star and a circle."], ["A red star."]),
    "mention/only_color": ("red", ["A red star.", "A star."],
                           ["A red star and a blue circle.", "A red circle."]),
    "mention/word": ("picture", ["This picture is calm."], ["This image is calm.", "Pictures."]),
    "length_limit/sentences": (2, ["One star. Two circles!"], ["One. Two. Three.", "One star."]),
    "length_limit/max_words": (5, ["A red star sits here."], ["A red star sits right here.", ""]),
    "linguistics/bullets": (None, ["- a red star\n- a blue circle"], ["a red star\n- a blue circle"]),
    "linguistics/lowercase": (None, ["a red star."], ["A red star."]),
    "linguistics/start_word": ("Look", ["Look, a star.", "look at it"], ["A star, look."]),
    "linguistics/question": (None, ["Is it a star?"], ["It is a star.", "Is it? It is."]),
    "grammar/no_pronouns": (None, ["A red star sits."], ["It sits.", "I see them."]),
    "grammar/no_articles": (None, ["Red star sits."], ["The red star sits.", "An arc."]),
    "grammar/present": (None, ["A star sits."], ["A star sat there.", "It was red."]),
}


@pytest.mark.parametrize("rule", sorted(CASES))
def test_each_rule_on_hand_made_answers(rule):
    arg, good, bad = CASES[rule]
    for text in good:
        assert world_mia.check(rule, arg, text, SCENE), f"{rule} should pass {text!r}"
    for text in bad:
        assert not world_mia.check(rule, arg, text, SCENE), f"{rule} should fail {text!r}"
    assert {r.split("/")[0] for r in CASES} == set(mia.TYPES) and len(CASES) == sum(map(len,
                                                                                    world_mia.RULES.values()))


def test_rule_judge_strict_vs_loose_and_the_official_sentence():
    item = dict(ITEM, component_weight=[6, 4], components=["Describe the image", "as a bulleted list"],
                checks=[dict(rule="describe/image", arg=None), dict(rule="linguistics/bullets", arg=None)])
    answer = "Here is the list:\n- a red star\n- a blue circle"
    assert world_mia.judge(item, SCENE, answer)[0] == [6, 0]
    points, sentence = world_mia.judge(item, SCENE, answer, loose=True)  # the first line dropped
    assert points == [6, 4] and sentence == "score of component 1: 6/6, score of component 2: 4/4, total " \
                                            "score: 10/10."
    assert mia.parse_reply(sentence, [6, 4])["score"] == 1.0
    assert world_mia.judge(item, SCENE, "   ", loose=True)[0] == [0, 0]  # empty fails everything (IFEval)
    assert world_mia.variants("**A**\nb\nc") == ["**A**\nb\nc", "A\nb\nc", "b\nc", "b\nc", "**A**\nb", "A\nb",
                                                  "b", "b"]  # IFEval's 8: first / last line dropped, no '*'


def test_benchmark_items_gold_responses_and_distribution():
    items = [world_mia.mia_item("test", i, 0, "bench") for i in range(200)]
    for item in items:
        scene = world_mia.item_scene(item)
        gold = world_mia.gold_response(item, scene)
        assert sum(world_mia.judge(item, scene, gold)[0]) == 10, (item["instruction"], gold)
        assert sum(world_mia.judge(item, scene, "Yes.")[0]) < 10
        assert set(mia.FIELDS) <= set(item) and item["image"].endswith(".png")
    s = mia.stats(items)
    assert set(s["types"]) == set(mia.TYPES) and set(s["weights"]) == {"[6, 4]", "[4, 3, 3]", "[4, 2, 2, 2]"}
    assert 0.65 < s["types"]["describe"] / 200 < 0.9 and s["repeated_type"] >= 1
    assert items == [world_mia.mia_item("test", i, 0, "bench") for i in range(200)]  # a pure function


def test_sft_combinations_are_held_out_from_the_benchmark():
    bench = [world_mia.mia_item("test", i, 0, "bench") for i in range(300)]
    sft = [world_mia.mia_item("train", i, 0, "sft") for i in range(300)]
    assert not {it["combo"] for it in bench} & {it["combo"] for it in sft}
    rules = lambda items: {c["rule"] for it in items for c in it["checks"]}
    assert rules(bench) == rules(sft) == {r for r in CASES}  # every rule is taught, no combination shown


# ----------------------------------------------------------------------------- the script
def test_official_mode_writes_prompts_with_images_and_scores_replies(tmp_path):
    bench, answers, replies = tmp_path / "bench.json", tmp_path / "answers.jsonl", tmp_path / "replies.jsonl"
    items = [dict(ITEM, image=f"http://example.org/{i}.jpg") for i in range(3)]
    bench.write_text(json.dumps(items))
    rows = [{"question_id": items[i]["image"], "text": t} for i, t in ((2, "error"), (0, "One. Two."))]
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompt = mia.judge_prompt(items[0], "One. Two.")
    reply = ("**score of component 1:** 4/4, score of component 2: 3/3, score of component 3: 0/3, "
             "total score:7/10")
    replies.write_text(json.dumps({"prompt_sha256": mia.prompt_sha256(prompt), "reply": reply}) + "\n")
    out = tmp_path / "out"
    m = mia_bench.main([f"--official={bench}", f"--answers={answers}", f"--judge=replies:{replies}",
                        f"--out_dir={out}"])
    written = [json.loads(line) for line in (out / "judge_prompts.jsonl").read_text().splitlines()]
    assert [(r["id"], r["image"], r["prompt"]) for r in written] == [(items[0]["image"],) * 2 + (prompt,)]
    assert m["judge_prompts"] == 1 and m["scores"]["official_compatible"] == 70.0
    assert m["scores"]["failures"] == {"error_answer": 1, "no_answer": 1} and m["scores"]["strict"] == 23.33
    answers.write_text(json.dumps({"question_id": "http://elsewhere/9.jpg", "text": "x"}) + "\n")
    with pytest.raises(InputError, match="answers.jsonl:1: question_id 'http://elsewhere/9.jpg' is no item"):
        mia_bench.main([f"--official={bench}", f"--answers={answers}", f"--out_dir={tmp_path}/o2"])


def test_missing_init_names_the_commands_to_run_first(tmp_path):
    done = subprocess.run([sys.executable, "mia_bench.py", "--preset=smoke", f"--init={tmp_path}/none",
                           f"--out_dir={tmp_path}/out"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and not (tmp_path / "out").exists()
    assert done.stderr.count("\n") == 1 and "python mm1.py && python mm15.py" in done.stderr
    assert "--init=PATH" in done.stderr and "min on 2 cores" in done.stderr


@pytest.fixture(scope="module")
def mm15_smoke(tmp_path_factory):
    """mm1.py then mm15.py at smoke size (tests/test_skeleton.py's chain): mm15's out_dir."""
    out = tmp_path_factory.mktemp("chain")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for argv in (["mm1.py", f"--out_dir={out}/mm1"],
                 ["mm15.py", f"--out_dir={out}/mm15", f"--init={out}/mm1/model.safetensors"]):
        done = subprocess.run([sys.executable, *argv, "--preset=smoke"], cwd=ROOT, capture_output=True,
                              text=True, timeout=600, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
    return out / "mm15"


def test_smoke_run_from_an_mm15_checkpoint(mm15_smoke, tmp_path):
    out, replies = tmp_path / "mia", tmp_path / "replies.jsonl"
    items = [world_mia.mia_item("test", i, 0, "bench") for i in range(4)]  # the smoke benchmark
    rows = []  # an external judge's replies to the constant answer: 2 good, 1 malformed, 1 missing
    for item in items[:3]:
        weights = item["component_weight"]
        reply = world_mia.judge(item, world_mia.item_scene(item), mia_bench.CONSTANT, loose=True)[1]
        reply = reply if item is not items[1] else reply.replace(f"/{weights[0]},", f"/{weights[0] + 1},")
        prompt = mia.judge_prompt(item, mia_bench.CONSTANT)
        rows.append(dict(prompt_sha256=mia.prompt_sha256(prompt), reply=reply))
    replies.write_text(mia.jsonl(rows))
    m = mia_bench.main(["--preset=smoke", f"--init={mm15_smoke}/model.safetensors", f"--out_dir={out}",
                        f"--judge=replies:{replies}"])
    from_file = m["constant"]["judged"]["replies_file"]
    assert from_file["parsed"] == 2 and from_file["failures"] == {"denominator": 1, "no_reply": 1}
    assert m["constant"]["judged"]["agree_rule_replies"] is not None
    for run in ("base", "sft"):
        judged = m[run]["judged"]
        assert judged["strict"]["n"] == 4 and judged["strict"]["failed"] == 0  # the rule judge never fails
        assert 0 <= judged["strict"]["strict"] <= judged["loose"]["strict"] <= 100
        rows = (out / f"answers_{run}.jsonl").read_text().splitlines()
        assert [json.loads(r)["question_id"] for r in rows] == [f"bench-test-0-{i:05d}" for i in range(4)]
    assert all((out / json.loads(r)["image"]).is_file()
               for r in (out / "judge_prompts_sft.jsonl").read_text().splitlines())
    weights, meta = mia_bench.read_safetensors(out / "model.safetensors")
    _, init_meta = mia_bench.read_safetensors(mm15_smoke / "model.safetensors")
    for key in ("arch", "tokenizer_sha256", "image_token_id", "image_size", "sft"):
        assert meta[key] == init_meta[key], key
    assert json.loads(meta["mia"])["n_sft"] == 8 and int(meta["step"]) == 4
    model = mia_bench.MM1(json.loads(meta["arch"]))
    model.load_state_dict(weights)  # strict: the contract rebuilds it
    init_weights, _ = mia_bench.read_safetensors(mm15_smoke / "model.safetensors")
    assert not torch.equal(weights["lm_head.weight"], init_weights["lm_head.weight"])  # SFT moved it
    assert "| length_limit" in (out / "report.md").read_text()
