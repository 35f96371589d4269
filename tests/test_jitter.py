"""jitter.py: the jitter metric on hand-made predictions, exact seed reproduction, nested snapshots,
config errors, the smoke preset end to end (resume included) and a user's JointBERT folder."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import jitter as J  # noqa: E402
from data import voice  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one intra-op thread is faster than two (restored for the other test files)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_churn_and_jitter_hand_made():
    a, b, c = [0, 1, 2, 3], [0, 1, 2, 0], [1, 1, 2, 0]
    assert J.churn(a, b) == 0.25 and J.churn(a, c) == 0.5 and J.churn(b, c) == 0.25
    assert J.jitter([a, b, c]) == pytest.approx((0.25 + 0.5 + 0.25) / 3)
    assert J.jitter([a, a, a]) == 0.0
    # tagging: an utterance changes if any tag changes; the token rate counts tags
    s1 = [[0, 1, 2], [0, 0]]
    s2 = [[0, 1, 0], [0, 0]]
    s3 = [[0, 1, 0], [1, 0]]
    assert J.churn(s1, s2) == 0.5 and J.churn(s1, s3) == 1.0
    assert J.token_churn(s1, s2) == pytest.approx(1 / 5) and J.token_churn(s1, s3) == pytest.approx(2 / 5)
    assert J.jitter([s1, s2, s3], J.token_churn) == pytest.approx((1 / 5 + 2 / 5 + 1 / 5) / 3)


def test_span_f1_hand_made():
    gold = [["O", "B-city", "I-city", "O"], ["B-contact", "O"]]
    assert J.span_f1(gold, gold) == 1.0
    pred = [["O", "B-city", "O", "O"], ["B-contact", "O"]]  # one of two spans right, one wrong boundary
    assert J.span_f1(gold, pred) == pytest.approx(2 * 1 / (2 + 2))
    assert J.span_f1(gold, [["O"] * 4, ["O", "O"]]) == 0.0


def tiny_cfg(**kw):
    return J.parse_args(["--preset=smoke", *[f"--{k}={v}" for k, v in kw.items()]])


def test_seeds_reproduce_predictions_exactly_and_snapshots_are_nested(monkeypatch):
    cfg = tiny_cfg(n_snapshots=3, first_snapshot=0.5, n_train=120)
    task = J.builtin_task("intent", cfg)
    ex = J.Experiment(task, cfg, {})
    sizes = ex.snapshot_sizes
    assert sizes[0] == 60 and sizes[-1] == len(task.train) == 120 and sizes == sorted(set(sizes))
    seen = []  # the rows each snapshot's training draws must be the first n of one fixed order (nested)
    original = J.Encoded.batch

    def spy(self, idx, device):
        seen.append(int(idx.max()))
        return original(self, idx, device)

    monkeypatch.setattr(J.Encoded, "batch", spy)
    first = ex.run("gru", "char", "retrain", 0, lambda r: None)
    assert max(seen) < 120
    again = ex.run("gru", "char", "retrain", 0, lambda r: None)
    other = ex.run("gru", "char", "retrain", 1, lambda r: None)
    assert first["preds"] == again["preds"] and first["scores"] == again["scores"]
    assert first["preds"] != other["preds"]  # a different seed is a different model
    for a, b in zip(first["models"][0].state_dict().values(), again["models"][0].state_dict().values()):
        assert torch.equal(a, b)


def test_ensemble_of_copies_is_the_model_and_incremental_warm_starts():
    cfg = tiny_cfg()
    for name, arch in (("intent", "bag"), ("slots", "seq2seq")):
        ex = J.Experiment(J.builtin_task(name, cfg), cfg, {})
        m = ex.build(arch, "random").eval()
        batch = ex.enc[("test", "train")].batch(torch.arange(8), "cpu")
        assert torch.allclose(J.predict_proba([m, m], batch), J.predict_proba([m], batch), atol=1e-6)
    ex = J.Experiment(J.builtin_task("intent", cfg), cfg, {})
    inc = ex.run("bag", "random", "incremental", 0, lambda r: None)
    ret = ex.run("bag", "random", "retrain", 0, lambda r: None)
    assert inc["preds"][0] == ret["preds"][0]  # same first model; then the incremental one only fine-tunes
    assert inc["preds"][1] != ret["preds"][1]


def test_learns_and_subword_vectors_know_unseen_spellings():
    cfg = tiny_cfg(n_train=300, epochs=5, d_model=32)
    ex = J.Experiment(J.builtin_task("domain", cfg), cfg, {})
    res = ex.run("cnn", "random", "retrain", 0, lambda r: None)
    assert res["scores"][-1] > 0.6  # 7 domains: chance is about 0.14
    text = [q.split() for q in voice.corpus(400)]
    vecs = J.train_subword_vectors(text, ["weather", "wether", "timer", "zzqx"], cfg, "cpu")
    again = J.train_subword_vectors(text, ["weather", "wether", "timer", "zzqx"], cfg, "cpu")
    assert all(torch.equal(vecs[w], again[w]) for w in vecs)  # same seed, same vectors
    cos = torch.nn.functional.cosine_similarity
    assert cos(vecs["weather"], vecs["wether"], 0) > cos(vecs["weather"], vecs["timer"], 0)  # shared n-grams


def test_config_errors(capsys):
    with pytest.raises(SystemExit, match="unknown config key 'epoch'"):
        J.parse_args(["--epoch=3"])
    with pytest.raises(SystemExit, match="--epochs expects int"):
        J.parse_args(["--epochs=2.5"])
    with pytest.raises(SystemExit, match="--preset must be one of"):
        J.parse_args(["--preset=huge"])
    with pytest.raises(SystemExit) as e:
        J.parse_args(["--help"])
    assert e.value.code == 0 and "--n_seeds=5" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown strategy 'bagging'"):
        J.rows_for(J.Task("t", "cls", [], [], [], []), tiny_cfg(strategies="bagging"))


def test_smoke_end_to_end_and_resume(tmp_path):
    out = tmp_path / "run"
    metrics = J.main(["--preset=smoke", f"--out_dir={out}"])
    for f in ("config.json", "log.jsonl", "metrics.json", "report.md", "jitter_scatter.png", "progress.json"):
        assert (out / f).stat().st_size > 0, f
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved) == {"intent", "slots", "seconds"}
    assert set(saved["intent"]) == {"bag/random/retrain", "gru/random/retrain", "gru/fasttext/retrain", "gru/char/retrain",
                                    "bag/random/incremental", "bag/random/ensemble"}
    for row in saved["slots"].values():
        assert {"score_mean", "seed_jitter", "update_jitter", "seed_jitter_tok", "update_jitter_tok"} <= set(row)
        assert 0 <= row["seed_jitter"] <= 100
    report = (out / "report.md").read_text()
    assert "| gru/char/retrain |" in report and "seed jitter" in report
    from safetensors.torch import load_file

    ckpt = load_file(str(out / "models" / "slots__bilstm__char__retrain.safetensors"))
    assert any("char_emb" in k for k in ckpt)
    again = J.main(["--preset=smoke", f"--out_dir={out}"])  # resumes: every job is read back, same table
    assert again == metrics
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert sum("scores" in r for r in logged) == 24 and all(r["loss"] > 0 for r in logged if "loss" in r)


def test_jointbert_folder_and_malformed(tmp_path):
    for split, n in (("train", 80), ("test", 30)):
        voice.write_jointbert(voice.dataset(split, n, noise=0.1), tmp_path / "d" / split)
    metrics = J.main([f"--data={tmp_path / 'd'}", "--preset=smoke", f"--out_dir={tmp_path / 'o'}", "--inputs='random'",
                      "--strategies=''", "--archs_cls='bag'", "--archs_tag='bilstm'"])
    assert set(metrics) == {"intent", "slots"} and set(metrics["slots"]) == {"bilstm/random/retrain"}
    (tmp_path / "d" / "test" / "seq.out").write_text("O O\n" * 30)
    with pytest.raises(SystemExit, match=r"test/seq.out:1: 2 tags for \d+ tokens"):
        J.main([f"--data={tmp_path / 'd'}", "--preset=smoke", f"--out_dir={tmp_path / 'o2'}"])
