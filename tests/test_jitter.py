"""jitter.py: the jitter metric on hand-made predictions, exact seed reproduction, nested snapshots,
config errors, the smoke preset end to end (resume included) and users' JointBERT folders."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import jitter as J
from data import InputError, voice
from data.voice_tasks import builtin_task


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one intra-op thread is faster than two (restored for the other test files)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def log(tmp_path):
    return J.RunLog(tmp_path, "tok")


def test_differ_and_interval_hand_made():
    a, b, c = [0, 1, 2, 3], [0, 1, 2, 0], [1, 1, 2, 0]
    assert J.differ(a, b)[0].tolist() == [0, 0, 0, 1] and J.differ(a, b)[1].tolist() == [1, 1, 1, 1]
    # tagging: an utterance changes if any tag changes; the token rate counts tags
    s1, s2 = [[0, 1, 2], [0, 0]], [[0, 1, 0], [1, 0]]
    assert J.differ(s1, s2)[0].tolist() == [1, 1]
    assert [x.tolist() for x in J.differ(s1, s2, tokens=True)] == [[1, 1], [3, 2]]
    # jitter of 3 models: mean pairwise churn (0.25 + 0.5 + 0.25) / 3; no resampling -> a zero-width interval
    units = [J.differ(x, y) for x, y in ((a, b), (a, c), (b, c))]
    ones_u, ones_x = np.ones((5, 3)), np.ones((5, 4))
    assert J.interval(units, ones_u, ones_x) == [pytest.approx(100 / 3, abs=0.01)] * 3
    assert J.interval([J.differ(s1, s2, True)], np.ones((5, 1)), np.ones((5, 2))) == [40.0] * 3  # 2 of 5 tags
    # a resample of only the 2nd example sees no change, one of only the last sees 2 of 3 pairs change:
    # percentiles 2.5 and 97.5 of [0, 66.67]
    low, high = J.interval(units, np.ones((2, 3)), np.array([[0, 4.0, 0, 0], [0, 0, 0, 4.0]]))[1:]
    assert low == pytest.approx(1.67) and high == pytest.approx(65.0)
    # the mask keeps examples: on the first three only a-c differ (1 of 3 examples) -> (0 + 1/3 + 1/3) / 3
    assert J.interval(units, ones_u, ones_x, np.array([True, True, True, False]))[0] == pytest.approx(22.22)


def tiny_cfg(**kw):
    cfg = J.parse_config(["--preset=smoke", *[f"--{k}={v}" for k, v in kw.items()]])
    J.check_config(cfg)
    return J.dataclasses.replace(cfg, device="cpu")


def test_seeds_reproduce_predictions_exactly_and_snapshots_are_nested(monkeypatch, log):
    cfg = tiny_cfg(n_snapshots=3, first_snapshot=0.5, n_train=120, epochs=2)
    task = builtin_task("intent", cfg)
    ex = J.Experiment(task, cfg, {})
    sizes = ex.snapshot_sizes
    groups = task.train_groups  # shift updates: old rows, then new entities, then the new intent / slot
    assert groups == sorted(groups) and sizes == [groups.count(0), groups.count(0) + groups.count(1), 120]
    seen = []  # rows drawn for training, batch by batch
    original = J.Encoded.batch

    def spy(self, idx, device):
        if self is ex.enc[("train", "all")]:
            seen.append(idx.tolist())
        return original(self, idx, device)

    monkeypatch.setattr(J.Encoded, "batch", spy)
    first = ex.run("gru", "char", "retrain", 0, log)
    per_snapshot = [cfg.epochs * -(-n // cfg.batch_size) for n in sizes]  # batches of each snapshot
    assert len(seen) == sum(per_snapshot)
    for t, n in enumerate(sizes):  # snapshot t trains on exactly its first n rows: D_0 c D_1 c D_2
        start = sum(per_snapshot[:t])
        assert {i for batch in seen[start: start + per_snapshot[t]] for i in batch} == set(range(n))
    again = ex.run("gru", "char", "retrain", 0, log)
    other = ex.run("gru", "char", "retrain", 1, log)
    assert first["preds"] == again["preds"] and first["scores"] == again["scores"]
    assert first["preds"] != other["preds"]  # a different seed is a different model
    for a, b in zip(first["models"][0].state_dict().values(), again["models"][0].state_dict().values()):
        assert torch.equal(a, b)


def test_incremental_fine_tunes_the_snapshot_0_model_without_warmup(monkeypatch, log):
    cfg = tiny_cfg()
    ex = J.Experiment(builtin_task("intent", cfg), cfg, {})
    calls, original = [], J.train

    def wrapped(model, opt, *args, **kw):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        steps = max((int(s["step"]) for s in opt.state.values()), default=0)
        original(model, opt, *args, **kw)
        calls.append(dict(before=before, after={k: v.clone() for k, v in model.state_dict().items()},
                          peak=args[6], warmup=args[7], adam_steps=steps))

    monkeypatch.setattr(J, "train", wrapped)
    inc = ex.run("bag", "random", "incremental", 0, log)
    assert len(calls) == 2 and calls[0]["warmup"] and calls[0]["peak"] == cfg.lr
    assert calls[0]["adam_steps"] == 0
    assert not calls[1]["warmup"] and calls[1]["peak"] == cfg.incremental_lr < cfg.lr
    assert calls[1]["adam_steps"] > 0  # AdamW's moments and step carry over
    assert all(torch.equal(calls[1]["before"][k], v) for k, v in calls[0]["after"].items())
    ret = ex.run("bag", "random", "retrain", 0, log)
    assert inc["preds"][0] == ret["preds"][0]  # the chain starts from the retrain model of snapshot 0


def test_reused_models_are_bit_identical(monkeypatch, log):
    cfg = tiny_cfg(epochs=2)
    task = builtin_task("intent", cfg)
    fresh = J.Experiment(task, cfg, {}).run("bag", "random", "ensemble", 0, log)
    ex = J.Experiment(task, cfg, {}, reuse={("bag", "random")})
    ex.run("bag", "random", "retrain", 0, log)
    n_calls, original = [], J.train
    monkeypatch.setattr(J, "train", lambda *a, **k: n_calls.append(1) or original(*a, **k))
    reused = ex.run("bag", "random", "ensemble", 0, log)
    assert len(n_calls) == (cfg.ensemble_size - 1) * cfg.n_snapshots  # member 0 is never trained again
    assert reused["preds"] == fresh["preds"]
    inc = ex.run("bag", "random", "incremental", 0, log)
    assert len(n_calls) == (cfg.ensemble_size - 1) * cfg.n_snapshots + cfg.n_snapshots - 1  # no snapshot 0
    assert inc["preds"] == J.Experiment(task, cfg, {}).run("bag", "random", "incremental", 0, log)["preds"]


def test_ensemble_of_copies_is_the_model():
    cfg = tiny_cfg()
    for name, arch in (("intent", "bag"), ("slots", "seq2seq")):
        ex = J.Experiment(builtin_task(name, cfg), cfg, {})
        m = ex.build(arch, "random").eval()
        batch = ex.enc[("test", "train")].batch(torch.arange(8), "cpu")
        assert torch.allclose(J.predict_proba([m, m], batch), J.predict_proba([m], batch), atol=1e-6)


def test_word_dropout_trains_the_unknown_row(log):
    cfg = tiny_cfg(epochs=1, weight_decay=0.0)
    ex = J.Experiment(builtin_task("intent", cfg), cfg, {})
    rows = {}
    for p in (0.0, 0.5):
        torch.manual_seed(0)
        model = ex.build("bag", "random")
        start = model.embedder.word_emb.weight[1].clone()
        opt = J.make_adamw(model, cfg.lr, cfg.weight_decay)
        J.train(model, opt, ex.enc[("train", "train")], 160, 1, torch.Generator().manual_seed(0), cfg, log,
                cfg.lr, True, p)
        rows[p] = (model.embedder.word_emb.weight[1] - start).abs().max().item()
    assert rows[0.0] == 0.0 < 1e-3 < rows[0.5]  # no training word maps to row 1 without dropout


def test_learns_and_subword_vectors_know_unseen_spellings(log):
    cfg = tiny_cfg(n_train=300, epochs=5, d_model=32)
    ex = J.Experiment(builtin_task("domain", cfg), cfg, {})
    res = ex.run("cnn", "random", "retrain", 0, log)
    assert res["scores"][-1] > 60  # percent; 7 domains: chance is about 14
    text = [q.split() for q in voice.corpus(400)]
    words = ["weather", "wether", "timer", "zzqx"]
    vecs = J.train_subword_vectors(text, words, 32, epochs=1, buckets=2000)
    again = J.train_subword_vectors(text, words, 32, epochs=1, buckets=2000)
    assert all(torch.equal(vecs[w], again[w]) for w in vecs)  # same seed, same vectors
    cos = torch.nn.functional.cosine_similarity
    assert cos(vecs["weather"], vecs["wether"], 0) > cos(vecs["weather"], vecs["timer"], 0)  # shared n-grams


@pytest.mark.parametrize("argv, message", [
    (["--epoch=3"], "--epoch: unknown config key"), (["--epochs=2.5"], "--epochs=2.5: expected int"),
    (["--preset=huge"], "--preset=huge: expected auto or one of"),
    (["--strategies=bagging"], "--strategies: unknown bagging"), (["--n_seeds=1"], "expected n_seeds >= 2"),
    (["--data=/no/such/dir"], "--data=/no/such/dir: not a folder"),
    (["--base_input=bpe"], "--base_input=bpe"),
])
def test_config_errors(argv, message):
    with pytest.raises(InputError, match=message):
        J.check_config(J.parse_config(argv))


def test_smoke_end_to_end_and_resume(tmp_path):
    out = tmp_path / "run"
    metrics = J.main(["--preset=smoke", f"--out_dir={out}"])
    for f in ("config.json", "log.jsonl", "metrics.json", "report.md", "progress.json"):
        assert (out / f).stat().st_size > 0, f
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved) == {"intent", "slots", "seconds"}
    assert set(saved["intent"]) == {"bag/random/retrain", "gru/random/retrain", "gru/fasttext/retrain",
                                    "gru/char/retrain", "bag/random/incremental", "bag/random/ensemble"}
    cfg = tiny_cfg()
    gold = [label for _, label in builtin_task("intent", cfg).test]
    majority = 100 * max(gold.count(x) for x in set(gold)) / len(gold)
    for row, m in saved["intent"].items():  # every row learned: well above the majority class
        assert m["score"][0] > majority + 20, (row, m["score"], majority)
        assert m["score"][1] <= m["score"][0] <= m["score"][2]
    jobs = json.loads((out / "progress.json").read_text())["jobs"]
    for row, m in saved["slots"].items():  # no degenerate all-O tagger
        assert m["score"][0] > 25, (row, m["score"])
        assert {"seed_jitter", "update_jitter", "update_jitter_new_seed", "update_jitter_old",
                "update_jitter_new", "seed_jitter_tok", "update_jitter_tok"} <= set(m)
        for k in range(cfg.n_seeds):
            assert any(tag != 0 for p in jobs[f"slots/{row}/{k}"]["preds"][-1] for tag in p), row
    report = (out / "report.md").read_text()
    assert "| gru/char/retrain |" in report and "update jitter, new seed" in report and "Findings" in report
    ckpt = load_file(str(out / "models" / "slots__bilstm__char__retrain.safetensors"))
    assert any("char_emb" in k for k in ckpt)
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all({"step", "loss", "lr", "tok_s", "job", "snapshot"} <= set(r) and r["loss"] > 0 for r in logged)
    again = J.main(["--preset=smoke", f"--out_dir={out}", "--resume=True"])  # every job is read back
    assert again == metrics
    assert len((out / "log.jsonl").read_text().splitlines()) == len(logged)  # nothing retrained
    with pytest.raises(InputError, match="was saved with seed=0 .now 7."):
        J.main(["--preset=smoke", f"--out_dir={out}", "--resume=True", "--seed=7"])
    with pytest.raises(InputError, match="progress.json: missing"):
        J.main(["--preset=smoke", f"--out_dir={tmp_path / 'new'}", "--resume=True"])


def write_folder(root, split, seq_in, seq_out, label=None):
    folder = root / split
    folder.mkdir(parents=True)
    (folder / "seq.in").write_text("".join(line + "\n" for line in seq_in))
    (folder / "seq.out").write_text("".join(line + "\n" for line in seq_out))
    if label is not None:
        (folder / "label").write_text("".join(line + "\n" for line in label))


def test_jointbert_folder_and_malformed(tmp_path):
    for split, n in (("train", 80), ("test", 30)):
        voice.write_jointbert(voice.dataset(split, n, noise=0.1), tmp_path / "d" / split)
    metrics = J.main([f"--data={tmp_path / 'd'}", "--preset=smoke", f"--out_dir={tmp_path / 'o'}",
                      "--inputs=random", "--strategies=", "--archs_cls=bag", "--archs_tag=bilstm"])
    assert set(metrics) == {"intent", "slots"} and set(metrics["slots"]) == {"bilstm/random/retrain"}
    (tmp_path / "d" / "test" / "seq.out").write_text("O O\n" * 30)
    with pytest.raises(InputError, match=r"test/seq.out:1: 2 tags for \d+ tokens"):
        J.main([f"--data={tmp_path / 'd'}", "--preset=smoke", f"--out_dir={tmp_path / 'o2'}"])
    assert not (tmp_path / "o2").exists()  # checked before anything is written


def test_jointbert_loud_failures(tmp_path):
    """Hand-written folders: a missing label file, a trailing blank line, a byte that is not UTF-8."""
    seq_in, seq_out = ["play hello", "weather in paris"], ["O B-song", "O O B-city"]
    write_folder(tmp_path / "nolabel", "train", seq_in, seq_out)
    write_folder(tmp_path / "nolabel", "test", seq_in, seq_out)
    with pytest.raises(InputError, match=r"nolabel/train/label: missing"):
        J.load_tasks(tiny_cfg(data=tmp_path / "nolabel"))
    assert [t.name for t in J.load_tasks(tiny_cfg(data=tmp_path / "nolabel", tasks="slots"))] == ["slots"]
    write_folder(tmp_path / "blank", "train", [*seq_in, ""], seq_out, ["a", "b"])
    with pytest.raises(InputError, match=r"blank/train/seq.in:3: empty line"):  # not blamed on seq.out
        voice.read_jointbert(tmp_path / "blank" / "train")
    (tmp_path / "blank" / "train" / "seq.in").write_bytes(b"play hello\nweather in caf\xe9\n")
    with pytest.raises(InputError, match=r"blank/train/seq.in:2: not UTF-8 \(byte 0xe9"):
        voice.read_jointbert(tmp_path / "blank" / "train")


def test_unseen_test_labels_and_tags_count_as_errors(tmp_path):
    """Hand-written folders: a multi-intent label, a test label and a slot type never seen in training."""
    train_in = ["play hello", "weather in paris", "play hello and weather in rome"]
    write_folder(tmp_path / "d", "train", train_in,
                 ["O B-song", "O O B-city", "O B-song O O O B-city"], ["play", "weather", "play#weather"])
    write_folder(tmp_path / "d", "test", ["play hello", "wake me at six", "weather in paris at six"],
                 ["O B-song", "O O O B-time", "O O B-city O B-time"], ["play", "alarm", "play#weather"])
    intent, slots = J.load_tasks(tiny_cfg(data=tmp_path / "d"))
    assert intent.labels == ["play", "play#weather", "weather"]  # a#b: a class of its own
    assert "1 multi-intent" in intent.notes[0]
    assert "1 test labels never seen in training (alarm)" in intent.notes[1]
    assert "2 test tags never seen in training (B-time)" in slots.notes[0]
    cfg = tiny_cfg(data=tmp_path / "d")
    ex = J.Experiment(intent, cfg, {})
    perfect = [intent.labels.index(g) if g in intent.labels else 0 for _, g in intent.test]
    assert ex.score(perfect) == pytest.approx(200 / 3)  # the unseen label is an error, not dropped
    ex = J.Experiment(slots, cfg, {})
    perfect = [[slots.labels.index(t) if t in slots.labels else 0 for t in tags] for _, tags in slots.test]
    assert ex.score(perfect) == pytest.approx(100 * 2 * 2 / (4 + 2))  # 2 of 4 gold spans, both B-time missed
    table = J.format_table(slots, {"bilstm/random/retrain": {"score": [1, 0, 2]}})
    assert "- 2 test tags never seen" in table


def test_vec_reader_names_file_and_line(tmp_path):
    good = tmp_path / "ok.vec"
    good.write_text("2 3\nplay 1 2 3\nhello 0.5 0 -1\n")
    vecs = J.read_vec(str(good), ["play", "absent"], 3)
    assert set(vecs) == {"play"} and vecs["play"].tolist() == [1.0, 2.0, 3.0]
    bad = tmp_path / "bad.vec"
    bad.write_bytes(b"2 3\nplay 1 2 3\nhello 0.5 0\n")
    with pytest.raises(InputError, match=r"bad.vec:3: expected a word and 3 numbers"):
        J.read_vec(str(bad), ["hello"], 3)
    bad.write_bytes(b"2 3\ncaf\xe9 1 2 3\n")
    with pytest.raises(InputError, match=r"bad.vec:2: "):
        J.read_vec(str(bad), ["hello"], 3)
