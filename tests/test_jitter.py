"""jitter.py: the jitter metric on hand-made predictions, exact seed reproduction, nested snapshots,
config errors, the smoke preset end to end (resume included) and users' JointBERT folders."""

import json

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


def tiny_cfg(**kw):
    cfg = J.parse_config(["--preset=smoke", *[f"--{k}={v}" for k, v in kw.items()]])
    J.check_config(cfg)
    return J.dataclasses.replace(cfg, device="cpu")


def test_seeds_reproduce_predictions_exactly_and_snapshots_are_nested(monkeypatch, log):
    cfg = tiny_cfg(n_snapshots=3, first_snapshot=0.5, n_train=120)
    task = builtin_task("intent", cfg)
    ex = J.Experiment(task, cfg, {})
    sizes = ex.snapshot_sizes
    assert sizes[0] == 60 and sizes[-1] == len(task.train) == 120 and sizes == sorted(set(sizes))
    seen = []  # the rows each snapshot's training draws must be the first n of one fixed order (nested)
    original = J.Encoded.batch

    def spy(self, idx, device):
        seen.append(idx.tolist())
        return original(self, idx, device)

    monkeypatch.setattr(J.Encoded, "batch", spy)
    first = ex.run("gru", "char", "retrain", 0, log)
    assert max(max(s) for s in seen) < 120
    again = ex.run("gru", "char", "retrain", 0, log)
    other = ex.run("gru", "char", "retrain", 1, log)
    assert first["preds"] == again["preds"] and first["scores"] == again["scores"]
    assert first["preds"] != other["preds"]  # a different seed is a different model
    for a, b in zip(first["models"][0].state_dict().values(), again["models"][0].state_dict().values()):
        assert torch.equal(a, b)


def test_ensemble_of_copies_is_the_model_and_incremental_warm_starts(log):
    cfg = tiny_cfg()
    for name, arch in (("intent", "bag"), ("slots", "seq2seq")):
        ex = J.Experiment(builtin_task(name, cfg), cfg, {})
        m = ex.build(arch, "random").eval()
        batch = ex.enc[("test", "train")].batch(torch.arange(8), "cpu")
        assert torch.allclose(J.predict_proba([m, m], batch), J.predict_proba([m], batch), atol=1e-6)
    ex = J.Experiment(builtin_task("intent", cfg), cfg, {})
    inc = ex.run("bag", "random", "incremental", 0, log)
    ret = ex.run("bag", "random", "retrain", 0, log)
    assert inc["preds"][0] == ret["preds"][0]  # same first model; then the incremental one only fine-tunes
    assert inc["preds"][1] != ret["preds"][1]


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
    for f in ("config.json", "log.jsonl", "metrics.json", "report.md", "jitter_scatter.png", "progress.json"):
        assert (out / f).stat().st_size > 0, f
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved) == {"intent", "slots", "seconds"}
    assert set(saved["intent"]) == {"bag/random/retrain", "gru/random/retrain", "gru/fasttext/retrain",
                                    "gru/char/retrain", "bag/random/incremental", "bag/random/ensemble"}
    for row in saved["slots"].values():
        assert {"score_mean", "seed_jitter", "update_jitter", "seed_jitter_tok"} <= set(row)
    report = (out / "report.md").read_text()
    assert "| gru/char/retrain |" in report and "seed jitter" in report
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
    with pytest.raises(InputError, match=r"blank/train/seq.in:2: byte 0xe9"):
        voice.read_jointbert(tmp_path / "blank" / "train")
