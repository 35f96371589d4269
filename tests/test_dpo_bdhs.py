"""dpo_bdhs.py: the losses on hand-computed values, the step-0 invariants, the one log-prob function and its
mask, the reference model, BDHS's key masking / prefixes / filter, the scene-graph judge and corrections,
POPE matched by id, CHAIR, the TRL JSONL round trip, and a smoke run from an mm1 -> mm15 smoke chain."""
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import dpo_bdhs as dpo
from data import InputError
from data.shapes import preferences as pref
from data.tokenizer import get_tokenizer


def cfg_with(**kw):
    return SimpleNamespace(**{**dict(loss="sigmoid", beta=0.5, label_smoothing=0.0, rpo_alpha=0.0, gamma=0.5),
                              **kw})


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


# ----------------------------------------------------------------------------- losses, hand-computed
def test_sigmoid_dpo_and_cdpo_on_hand_values():
    # h = (-1 - -2) - (-3 - -2) = 2, beta h = 1: -log sigmoid(1) = log(1 + e^-1) = 0.3132617
    losses, r_c, r_r = dpo.preference_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), t(2.0), t(4.0), cfg_with())
    assert losses.item() == pytest.approx(0.3132617, abs=1e-6)
    assert (r_c.item(), r_r.item()) == pytest.approx((0.5, -0.5))
    # cDPO eps = 0.1: 0.9 log(1 + e^-1) + 0.1 log(1 + e^1) = 0.2819355 + 0.1313262
    smoothed = dpo.preference_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), t(2.0), t(4.0),
                                   cfg_with(label_smoothing=0.1))[0]
    assert smoothed.item() == pytest.approx(0.4132617, abs=1e-6)


def test_ipo_is_length_averaged_and_hinge():
    # IPO: h_avg = (-1 - -2) / 2 - (-3 - -2) / 4 = 0.75; (0.75 - 1 / (2 * 0.5))^2 = 0.0625
    ipo = dpo.preference_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), t(2.0), t(4.0), cfg_with(loss="ipo"))[0]
    assert ipo.item() == pytest.approx(0.0625)
    hinge = [dpo.preference_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), t(2.0), t(4.0),
                                 cfg_with(loss="hinge", beta=b))[0].item() for b in (0.5, 0.1)]
    assert hinge == pytest.approx([0.0, 0.8])  # max(0, 1 - beta * 2)


def test_gamma_combination():
    assert dpo.combined_loss(t(1.0), t(3.0), 0.5).item() == pytest.approx(2.0)
    assert dpo.combined_loss(t(1.0), t(3.0), 0.25).item() == pytest.approx(0.25 + 2.25)


# ----------------------------------------------------------------------------- model-level (smoke chain)
@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """mm1 smoke -> mm15 smoke: the mm15 checkpoint dpo_bdhs.py starts from."""
    import mm1
    import mm15

    out = tmp_path_factory.mktemp("dpo_chain")
    mm1.main(["--preset=smoke", f"--out_dir={out / 'mm1'}"])
    mm15.main(["--preset=smoke", f"--init={out / 'mm1' / 'model.safetensors'}", f"--out_dir={out / 'mm15'}",
               "--cpt_steps=2", "--sft_steps=2", "--eval_items=1", "--max_new_tokens=2"])
    return out


@pytest.fixture(scope="module")
def parts(chain):
    cfg = dpo.parse_config(["--preset=smoke", f"--init={chain / 'mm15' / 'model.safetensors'}"])
    weights, meta = dpo.read_safetensors(cfg.init)
    arch, tiling = json.loads(meta["arch"]), json.loads(meta["sft"])["tiling"]
    data = dpo.Data(cfg, get_tokenizer(), tiling)
    policy = dpo.MM1(arch)
    policy.load_state_dict(weights)
    live = dpo.Reference(arch, weights, "cpu", upfront=False)
    return SimpleNamespace(cfg=cfg, weights=weights, arch=arch, tiling=tiling, data=data,
                           policy=policy.train(), ref=live.model, live=live)


def test_step0_invariants_loss_ln2_rewards_zero_gradient_nonzero(parts):
    """Policy == reference: every pair's h is 0, so the sigmoid loss is ln 2 and both rewards are 0, but the
    gradient (of -log sigmoid at 0: -beta / 2 * grad h) is not zero. RPO's NLL (default on) comes on top."""
    pairs = [dict(item=it, chosen=it["answer"], rejected=it["povid"]) for it in parts.data.train[:3]]
    parts.policy.zero_grad()
    cfg = cfg_with(**{**vars(parts.cfg), "rpo_alpha": 0.0})
    loss, stats = dpo.pair_losses(parts.policy, parts.live, parts.data, pairs, cfg, "cpu")
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert stats["dpo_loss"].mean().item() == pytest.approx(math.log(2), abs=1e-6)
    assert stats["reward_chosen"].abs().max() < 1e-6 and stats["reward_rejected"].abs().max() < 1e-6
    loss.backward()
    grad = sum(p.grad.abs().sum().item() for p in parts.policy.parameters() if p.grad is not None)
    assert grad > 1e-6
    assert all(p.grad is None for p in parts.ref.parameters())


def test_upfront_reference_equals_live_is_read_not_run_and_checked(parts, monkeypatch):
    """--ref=upfront: the table filled before training gives the live frozen reference's loss and rewards on a
    batch (the run-time check passes and records the difference); later batches read the table without
    running the reference; a wrong table entry fails the run-time check on the first batch."""
    data, pairs = parts.data, [dict(item=it, chosen=it["answer"], rejected=it["povid"])
                               for it in parts.data.train[:3]]
    upfront = dpo.Reference(parts.arch, parts.weights, "cpu", upfront=True)
    upfront.model = parts.ref  # the same frozen copy as parts.live, so the forward calls can be counted
    upfront.fill(data, pairs)
    upfront.fill(data, pairs, blank=True)
    assert len(upfront.table) == 12  # 3 pairs x 2 responses x (real, blank image)
    with torch.no_grad():
        for blank in (False, True):
            want = dpo.pair_losses(parts.policy, parts.live, data, pairs, parts.cfg, "cpu", blank)
            got = dpo.pair_losses(parts.policy, upfront, data, pairs, parts.cfg, "cpu", blank)
            torch.testing.assert_close(got[0], want[0])
            for key in ("reward_chosen", "reward_rejected", "ref_chosen", "ref_rejected"):
                torch.testing.assert_close(got[1][key], want[1][key])
    assert upfront.checked is not None and upfront.checked < 1e-4
    calls = []
    forward = parts.ref.forward
    monkeypatch.setattr(parts.ref, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    with torch.no_grad():
        dpo.pair_losses(parts.policy, upfront, data, pairs, parts.cfg, "cpu")
        assert not calls  # read from the table, the reference not run
        online = [dict(pairs[0], rejected="A made up answer.")]  # a response made in training: live
        dpo.pair_losses(parts.policy, upfront, data, online, parts.cfg, "cpu")
        assert calls
        wrong = dpo.Reference(parts.arch, parts.weights, "cpu", upfront=True)
        wrong.fill(data, pairs)
        key = (pairs[0]["item"]["id"], pairs[0]["chosen"], False)
        wrong.table[key] = wrong.table[key] + 0.5
        with pytest.raises(AssertionError, match="upfront"):
            dpo.pair_losses(parts.policy, wrong, data, pairs, parts.cfg, "cpu")


def test_prompt_is_mm15s_sft_sample_with_the_checkpoints_tiling(parts):
    """The prompt ids and tiles equal mm15.py's own SFT sample of the same image and question under the
    checkpoint's tiling (split: several views + overview); --one_tile gives one view."""
    import mm15

    data, item = parts.data, parts.data.describe[0]
    assert item["question"] == "Describe the image." == pref.PROMPT_DESCRIBE  # mm15's describe category
    ids, tiles = data.prompt(item)
    mm15_data = SimpleNamespace(enc=data.enc, image_id=data.image_id, eot_id=data.eot_id)
    want_ids, n_prompt, want_tiles = mm15.Data.sample(mm15_data, dict(item, pil=[item["pil"]]),
                                                      mm15.Config(**parts.tiling), with_answer=False)
    assert parts.tiling["split"] and len(tiles) > 1
    assert ids == want_ids == want_ids[:n_prompt] and torch.equal(tiles, want_tiles)
    one = dpo.Data(parts.cfg, data.enc, parts.tiling | {"split": False})
    ids, tiles = one.prompt(one.describe[0])
    assert len(tiles) == 1 and ids.count(data.image_id) == parts.tiling["image_tokens"]


def test_rpo_adds_the_per_token_nll_of_chosen(parts):
    pairs = [dict(item=it, chosen=it["answer"], rejected=it["povid"]) for it in parts.data.train[:2]]
    with torch.no_grad():
        plain = dpo.pair_losses(parts.policy, parts.live, parts.data, pairs, cfg_with(
            **{**vars(parts.cfg), "rpo_alpha": 0.0}), "cpu")[0]
        rpo = dpo.pair_losses(parts.policy, parts.live, parts.data, pairs, cfg_with(
            **{**vars(parts.cfg), "rpo_alpha": 2.0}), "cpu")[0]
        rows = [parts.data.pair_row(p["item"], p["chosen"]) for p in pairs]
        logps, n = dpo.sequence_logps(parts.policy, rows, parts.data, "cpu")
    assert (rpo - plain).item() == pytest.approx(2.0 * (-logps / n).mean().item(), rel=1e-5)


def test_reference_is_frozen_eval_and_shares_nothing(parts):
    assert not parts.ref.training and not any(p.requires_grad for p in parts.ref.parameters())
    ours = {p.data_ptr() for p in parts.policy.parameters()}
    assert not ours & {p.data_ptr() for p in parts.ref.parameters()}
    assert not any(a is b for a in parts.policy.modules() for b in parts.ref.modules())


def test_logps_cover_the_response_and_eos_only(parts):
    """sequence_logps == a direct sum of log p over response tokens (EOS included); prompt and image slots
    are never in it; pad is not EOS."""
    data, model = parts.data, parts.ref
    assert data.pad_id != data.eot_id
    rows = [data.pair_row(it, it["answer"]) for it in data.train[:2]]
    got, count = dpo.sequence_logps(model, rows, data, "cpu")
    for b, (prompt, response, tiles) in enumerate(rows):
        assert response[-1] == data.eot_id and count[b] == len(response)
        ids = torch.tensor([prompt + response])
        logp = torch.log_softmax(model(ids, tiles)[0][0].float(), -1)  # (T, V)
        want = sum(logp[len(prompt) - 1 + j, tok] for j, tok in enumerate(response))
        assert got[b].item() == pytest.approx(want.item(), abs=1e-4)
        assert data.image_id not in response


def test_truncation_cuts_the_response_end_never_the_prompt(parts):
    data = parts.data
    ids, _ = data.prompt(data.train[0])
    before, data.seq_len = data.truncated, len(ids) + 3
    try:
        prompt, response, _ = data.pair_row(data.train[0], "a very long answer " * 20)
        assert prompt == ids and len(response) == 3 and data.truncated == before + 1
        data.seq_len = len(ids)
        with pytest.raises(InputError, match="seq_len"):
            data.pair_row(data.train[0], "x")
    finally:
        data.seq_len = parts.cfg.seq_len


def test_hidden_image_keys_make_the_answer_blind(parts):
    """With every image slot hidden (rho = 1), two different images give the same greedy answer and the
    same logits; with none hidden the logits differ: the key mask, not the embeddings, cuts the image."""
    data, model = parts.data, parts.ref
    a, b = data.train[0], dict(data.train[0], pil=Image.new("RGB", data.train[0]["pil"].size, (250, 10, 10)))
    b.pop("tiles", None)
    gens = [torch.Generator().manual_seed(0) for _ in range(2)]
    blind = dpo.answer(model, data, [a, b], 6, rho=1.0, gens=gens)
    assert blind[0] == blind[1]
    ids = [data.prompt(x)[0] for x in (a, b)]
    tiles = torch.cat([data.prompt(x)[1] for x in (a, b)])
    hide = [torch.tensor(p) == data.image_id for p in ids]
    T = len(ids[0])
    seen = model(torch.tensor(ids), tiles)[0][:, -1]
    keys = ~torch.stack(hide)
    mask = dpo.visibility_mask(T, T, causal=True, key_mask=keys) | torch.eye(T, dtype=torch.bool)
    masked = model(torch.tensor(ids), tiles, None, mask)[0][:, -1]
    assert not torch.allclose(seen[0], seen[1], atol=1e-5)
    torch.testing.assert_close(masked[0], masked[1])


def test_bdhs_masking_reaches_the_model_as_hidden_image_keys(parts, monkeypatch):
    """answer(rho=1) hides exactly the image slots, rho=0 none; generate turns that into the attention mask
    the model gets (the last prompt token sees no image key); noise=True changes the pixels instead."""
    data, item, seen = parts.data, parts.data.train[1], []
    forward = parts.ref.forward
    monkeypatch.setattr(parts.ref, "forward", lambda *a, **k: seen.append(a) or forward(*a, **k))
    ids = torch.tensor(data.prompt(item)[0])
    for rho, visible in ((1.0, 0), (0.0, int((ids == data.image_id).sum()))):
        seen.clear()
        dpo.answer(parts.ref, data, [item], 2, gens=[torch.Generator().manual_seed(0)], rho=rho)
        mask = seen[0][3]  # (B, 1, T, T) of the prompt pass
        assert int(mask[0, 0, -1][ids == data.image_id].sum()) == visible
        assert bool(mask[0, 0, -1][ids != data.image_id].all())
    seen.clear()
    dpo.answer(parts.ref, data, [item], 1, gens=[torch.Generator().manual_seed(0)], rho=0.9, noise=True)
    assert not torch.equal(seen[0][1], data.prompt(item)[1]) and bool(seen[0][3][0, 0, -1].all())


def test_bdhs_prefixes_flip_yes_no_half_the_time_and_keep_gold_context():
    answer = "Yes, there is a red star. A blue circle is on the left."
    flips = 0
    for seed in range(400):
        (ctx0, cut0), (ctx1, cut1) = pref.bdhs_prefixes(answer, random.Random(seed))
        assert ctx0 == "" and ctx1 == "Yes, there is a red star."
        assert cut0.split()[0] in ("Yes,", "No,")  # a yes/no sentence keeps its verdict word
        assert "A blue circle is on the left.".startswith(cut1) and cut1 != "A blue circle is on the left."
        flips += cut0.startswith("No")
    assert 160 < flips < 240


def test_yes_no_answers_are_the_sfts_words_and_flip_in_the_same_case():
    """Gold yes/no answers are "yes" / "no", as the SFT's VQA answers them (a long gold format the SFT never
    produced made DPO push its bare "no" + EOS away: POPE answers like "no64,"); POVID and BDHS flip them."""
    items = [pref.pref_item("train", i, 0) for i in range(40)]
    yes_no = [it for it in items if it["kind"] == "yesno"]
    assert yes_no and {it["answer"] for it in yes_no} == {"yes", "no"}
    assert all({pref.povid(it, random.Random(0)), it["answer"]} == {"yes", "no"} for it in yes_no)
    assert {pref.bdhs_prefixes("no", random.Random(seed))[0][1] for seed in range(30)} == {"no", "yes"}
    long = pref.pref_item("train", int(yes_no[0]["id"].split("-")[1]), 0, long=True)
    assert long["answer"].startswith(("Yes, there is ", "No, there is no "))


def test_bdhs_filter_retries_and_the_last_try_is_unguided(parts):
    items = parts.data.train[:3]
    for threshold, want in ((-1.0, 2), (2.0, 1)):  # always too similar -> last try; never -> first
        stats = dict(similarity=[], tries=[], examples=[])
        cfg = SimpleNamespace(**{**vars(parts.cfg), "sim_threshold": threshold, "max_tries": 2})
        out = dpo.bdhs(parts.policy, parts.data, items, cfg, [1, 2, 3], stats)
        assert stats["tries"] == [want] * 3 and len(stats["similarity"]) == 3 * want
        again = dpo.bdhs(parts.policy, parts.data, items, cfg, [1, 2, 3], dict(similarity=[], tries=[],
                                                                                   examples=[]))
        assert out == again and all(isinstance(x, str) for x in out)  # one RNG per example: reproducible


# ----------------------------------------------------------------------------- data: pairs, judge, metrics
def test_povid_injects_a_hallucination_and_correct_removes_it():
    for i in range(40):
        item = pref.pref_item("train", i, 0)
        rejected = pref.povid(item, random.Random(i))
        assert pref.score(rejected, item) > pref.score(item["answer"], item), (item["answer"], rejected)
        assert pref.judge([item["answer"], rejected], item) == (0, 1)
        fixed = pref.correct(rejected, item)
        assert pref.score(fixed, item)[:2] == (0, 0)
    item = pref.pref_item("train", 0, 0)
    assert pref.judge([item["answer"], item["answer"]], item) is None  # a tie


def test_judge_never_prefers_an_answer_that_names_no_object():
    """The online judge's reward hack: box digits mention no object, hence no hallucination; they must lose to
    a description with a mistake, and to a yes/no answer with a verdict."""
    item = next(it for i in range(40) for it in [pref.pref_item("train", i, 0)] if it["kind"] == "describe")
    wrong = pref.povid(item, random.Random(0))  # one hallucinated object
    assert pref.judge(["43, 12, 88]", wrong], item) == (1, 0)
    assert pref.judge(["", wrong], item) == (1, 0)
    yes_no = next(it for i in range(40) for it in [pref.pref_item("train", i, 0)] if it["kind"] == "yesno")
    assert pref.judge(["no54,", yes_no["answer"]], yes_no) == (1, 0)


def test_pope_is_matched_by_id_and_unparseable_is_never_yes():
    items = [dict(id=f"q{i}", answer=a) for i, a in enumerate(["yes", "yes", "no", "no"])]
    answers = {"q3": "No.", "q0": "Yes", "q2": "yes it is", "q1": "maybe"}  # out of order on purpose
    s = pref.pope_scores(items, answers)
    assert s["acc"] == 50 and s["precision"] == 50 and s["recall"] == 50 and s["f1"] == pytest.approx(50)
    assert s["yes_ratio"] == 50 and s["unparseable"] == 25


def test_chair_with_synonyms_and_unfinished_sentence():
    scene = pref.pref_item("train", 0, 0)["scene"]  # a blue circle, a purple square, a red cross, ...
    text = "A blue ball is at the bottom left. A green star is here. A red cro"
    s = pref.chair([text], [scene], drop_last=True)
    assert s["chair_i"] == 50 and s["chair_s"] == 100  # ball -> circle (present), green star (absent)
    kept = pref.chair([text], [scene], drop_last=False)
    assert kept["length"] > s["length"]


def test_trl_jsonl_round_trip_and_unknown_keys(tmp_path):
    items = [pref.pref_item("train", i, 0) for i in range(2)]
    rows = [dict(it, chosen=it["answer"], rejected=pref.povid(it, random.Random(0)),
                 pil=Image.new("RGB", (8, 8))) for it in items]
    pref.write_preference_jsonl(tmp_path / "p.jsonl", rows, tmp_path / "img")
    back = pref.user_items(tmp_path / "p.jsonl")
    assert [b["answer"] for b in back] == [r["chosen"] for r in rows]
    assert [b["question"] for b in back] == [r["question"] for r in rows]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "<image>q", "chosen": "a", "rejected": "b", "images": ["img/0.png"],
                               "score": 1}) + "\n")
    with pytest.raises(InputError, match="unknown key"):
        pref.user_items(bad)


# ----------------------------------------------------------------------------- the script end to end
def test_smoke_run_writes_the_table_and_a_checkpoint_with_the_contract(chain, tmp_path):
    init = chain / "mm15" / "model.safetensors"
    metrics = dpo.main(["--preset=smoke", f"--init={init}", f"--out_dir={tmp_path / 'run'}",
                        "--rows=sft,povid,online,bdhs_ext", f"--export={tmp_path / 'pairs.jsonl'}"])
    assert set(metrics["results"]) == {"sft/0", "povid/0", "online/0", "bdhs_ext/0"}
    assert metrics["results"]["povid/0"]["step0_loss"] == pytest.approx(math.log(2), abs=1e-5)
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| povid |" in report and "similarity filter" in report
    assert (tmp_path / "run" / "logps.png").is_file()
    weights, meta = dpo.read_safetensors(tmp_path / "run" / "model.safetensors")
    _, init_meta = dpo.read_safetensors(init)
    for key in ("arch", "tokenizer_sha256", "image_token_id", "image_size", "sft"):
        assert meta[key] == init_meta[key], key
    assert json.loads(meta["dpo"])["row"] == "bdhs_ext"
    dpo.MM1(json.loads(meta["arch"])).load_state_dict(weights)  # strict
    assert len(pref.user_items(tmp_path / "pairs.jsonl")) == 6


def test_torchrun_two_processes_train_as_one(chain, tmp_path):
    """torchrun on CPU (gloo): each rank takes half of every step's pairs and the gradients are summed, so two
    processes log the same losses and make the same table as one (online samples and BDHS draws included)."""
    init = chain / "mm15" / "model.safetensors"
    argv = ["--preset=smoke", f"--init={init}", "--rows=sft,povid,mixed,bdhs_noise"]
    one = dpo.main([*argv, f"--out_dir={tmp_path / 'one'}"])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run = subprocess.run([*torchrun, "dpo_bdhs.py", *argv, f"--out_dir={tmp_path / 'two'}"],
                         cwd=Path(dpo.__file__).parent, env=os.environ | {"OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    logged = [[json.loads(line)["loss"] for line in (tmp_path / d / "log.jsonl").read_text().splitlines()]
              for d in ("one", "two")]
    assert len(logged[0]) >= 4 and logged[1] == pytest.approx(logged[0], abs=1e-5)
    for key, got in one["results"].items():
        numbers = {k: v for k, v in got.items() if k not in ("samples", "time_s")}
        assert {k: two["results"][key][k] for k in numbers} == pytest.approx(numbers, abs=1e-3), key
        assert two["results"][key]["samples"] == got["samples"]


def test_missing_init_names_the_commands_to_run(tmp_path):
    with pytest.raises(InputError, match=r"python mm1\.py && python mm15\.py"):
        dpo.main(["--preset=smoke", f"--init={tmp_path / 'none.safetensors'}", f"--out_dir={tmp_path / 'o'}"])
    assert not (tmp_path / "o").exists()


def test_verdict_calls_differences_within_2_sd_noise():
    assert pref.verdict("a", [1, 2, 3], "b", [5, 6, 7], True).endswith("a better")  # -4 vs 2 sd = 2
    assert pref.verdict("a", [1, 2, 3], "b", [5, 6, 7], False).endswith("b better")
    assert pref.verdict("a", [1, 2, 3], "b", [2, 3, 4], True).endswith("noise")  # -1 vs 2 sd = 2
    assert pref.verdict("a", [0, 0, 0], "b", [0, 0, 0], True).endswith("noise")  # equal, sd 0: no winner
    assert "no verdict" in pref.verdict("a", [1.0], "b", [2.0], True)


def test_table_shows_the_image_use_margin_at_its_scale():
    """The image-vs-blank reward margin is a few hundredths of a nat here: one decimal printed it as 0.0."""
    keys = [key for _, key, _ in pref.TABLE]
    results = {f"povid/{s}": {key: 50.0 for key in keys} | {"image_use": value}
               for s, value in enumerate((0.037, 0.046, 0.055))}
    table = pref.table_and_verdicts(results, ["povid"], [0, 1, 2], pref.TABLE, [])
    assert "| 0.046 ± 0.009 |" in table and "| 50.0 ± 0.0 |" in table
