"""clip_caption.py: losses and metrics against hand-computed values, the control token, the caption cache,
exact resume, the smoke preset end to end (ShapesWorld and a user's CSV), bad input."""
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import clip_caption as cc  # noqa: E402
from data import shapes  # noqa: E402

# ----------------------------------------------------------------------------- losses


def test_clip_loss_matches_hand_computed_value():
    # image rows [1,0],[0,1]; text rows [1,0],[.6,.8]; scale e^{ln 2} = 2 -> logits [[2, 1.2], [0, 1.6]]
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    rows = (math.log1p(math.exp(-0.8)) + math.log1p(math.exp(-1.6))) / 2  # image -> text
    cols = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(-0.4))) / 2  # text -> image
    loss = cc.clip_loss(image, text, torch.tensor(math.log(2.0)))
    assert loss.item() == pytest.approx((rows + cols) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(0.298736, abs=1e-5)


def test_clip_loss_clamps_logit_scale_at_100():
    image, text = torch.eye(3), torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    clamped = cc.clip_loss(image, text, torch.tensor(math.log(1000.0)))
    at_100 = cc.clip_loss(image, text, torch.tensor(math.log(100.0)))
    assert clamped.item() == pytest.approx(at_100.item(), rel=1e-6)
    assert clamped.item() == pytest.approx(200 / 3, rel=1e-3)  # rows 0, 1 miss by 100 logits: (100 + 100 + 0) / 3


def test_caption_loss_ignores_prompt_and_padding():
    logits = torch.randn(2, 3, 5)
    targets = torch.tensor([[-100, 1, 2], [-100, -100, 4]])
    expected = -torch.stack([logits[0, 1].log_softmax(-1)[1], logits[0, 2].log_softmax(-1)[2],
                             logits[1, 2].log_softmax(-1)[4]]).mean()
    assert cc.caption_loss(logits, targets).item() == pytest.approx(expected.item(), abs=1e-6)


# ----------------------------------------------------------------------------- metrics


def test_retrieval_recall_on_constructed_similarities():
    # 3 images, 4 texts: texts 0, 1 describe image 0, text 2 image 1, text 3 image 2
    text_to_image = torch.tensor([0, 0, 1, 2])
    sim = torch.tensor([[0.1, 0.9, 0.2, 0.0],    # image 0: best text 1 (its own): hit @1
                        [0.8, 0.1, 0.7, 0.0],    # image 1: text 0 (wrong), then its own text 2: hit @2
                        [0.5, 0.4, 0.3, 0.2]])   # image 2: its own text 3 ranks 4th: miss @2
    r = cc.retrieval_recall(sim, text_to_image, ks=(1, 2))
    assert r["I->T R@1"] == pytest.approx(1 / 3)
    assert r["I->T R@2"] == pytest.approx(2 / 3)
    # T->I by column: text 0 ranks images 1, 2, 0 (miss @1, miss @2); texts 1, 2, 3 rank their own image first
    assert r["T->I R@1"] == pytest.approx(3 / 4)
    assert r["T->I R@2"] == pytest.approx(3 / 4)


def test_zero_shot_accuracy_single_and_multi_label():
    image = torch.nn.functional.normalize(torch.tensor([[1.0, 0.1], [0.1, 1.0], [1.0, 0.9]]), dim=-1)
    classes = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # unnormalised on purpose: the metric normalises
    assert cc.zero_shot_accuracy(image, classes, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)  # 3rd -> class 0
    multi = torch.tensor([[True, False], [False, True], [True, True]])
    assert cc.zero_shot_accuracy(image, classes, multi) == pytest.approx(1.0)


def test_linear_probe_separates_separable_classes():
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 8, generator=gen) * 4
    labels = torch.arange(4).repeat(30)
    x = centers[labels] + torch.randn(120, 8, generator=gen) * 0.3
    assert cc.linear_probe(x[:80], labels[:80], x[80:], labels[80:], 4, iters=30) == 1.0
    shuffled = labels[torch.randperm(120, generator=gen)]  # no signal: near chance
    assert cc.linear_probe(x[:80], shuffled[:80], x[80:], shuffled[80:], 4, iters=20) < 0.6


def test_findings_call_small_differences_noise():
    assert cc.beats(0.5, 0.1, 100) == "YES" and cc.beats(0.1, 0.5, 100) == "NO"
    assert cc.beats(0.012, 0.007, 410) == "within noise"  # 5 vs 3 images of 410
    row = lambda e, r: dict.fromkeys(cc.COLUMNS, 0.0) | {"emblem top1": e, "I->T R@1": r, "T->I R@1": r}
    lines = cc.findings({"alt": row(0.30, 0.1), "ssc50": row(0.25, 0.5), "ssc100": row(0.02, 0.5)}, 500, 400)
    assert any("ssc50" in x and x.endswith("emblem top1 0.250 vs 0.020 -> YES") for x in lines)
    assert any("alt vs ssc100" in x and x.endswith("-> YES") for x in lines)


def test_cider_d_matches_pycocoevalcap():
    cider_mod = pytest.importorskip("pycocoevalcap.cider.cider")
    rng = np.random.default_rng(0)
    words = "a red blue circle square star on the left right of large small background".split()
    refs = [[" ".join(rng.choice(words, rng.integers(4, 12))) for _ in range(2)] for _ in range(6)]
    cands = [" ".join(rng.choice(words, rng.integers(3, 12))) for _ in range(6)]
    cands[0] = refs[0][0]  # one exact match
    theirs, _ = cider_mod.Cider().compute_score({i: r for i, r in enumerate(refs)}, {i: [c] for i, c in enumerate(cands)})
    assert cc.cider_d(cands, refs) == pytest.approx(theirs, rel=1e-9)
    assert cc.cider_d(["the cat sat", "a dog ran"], [["a dog ran"], ["the cat sat"]]) == 0.0


def test_object_precision_recall_against_the_scene_graph():
    scene = shapes.Scene(1000, 1000, "white", [shapes.Obj("circle", "red", "large", (0, 0, 300, 300)),
                                               shapes.Obj("star", "blue", "small", (500, 500, 600, 600))])
    p, r, n = cc.object_precision_recall("A large red circle and a green star.", scene)
    assert (p, r, n) == (0.5, 0.5, 2)  # green star is hallucinated; the blue star is missed
    p, r, n = cc.object_precision_recall("Two shapes: a red circle, stars. A pattern of 9 white squares.", scene)
    assert (p, r, n) == (1.0, 1.0, 2)  # "stars" without colour counts; glyph squares are not objects
    for i in range(30):  # gold captions never hallucinate
        scene = shapes.make_scene("test", i)
        for fmt in ("ssc", "dsc", "dsc+", "afc"):
            assert cc.object_precision_recall(shapes.caption(scene, fmt, seed=i), scene)[0] == 1.0


# ----------------------------------------------------------------------------- config and bad input


def test_config_overrides_and_errors():
    cfg = cc.parse_config(["--preset=smoke", "--clip_lr=1", "--recipes=alt,dsc30", "--compile=False"])
    assert cfg.clip_lr == 1.0 and cfg.recipes == ("alt", "dsc30") and cfg.n_web == cc.PRESETS["smoke"]["n_web"]
    assert cc.parse_recipe("ssc30") == ("ssc", 0.3) and cc.parse_recipe("alt") == ("alt", 0.0)
    for argv, needle in [(["--no_such_key=1"], "no_such_key"), (["--clip_steps=abc"], "clip_steps"),
                         (["--recipes=alt,ssc300"], "ssc300"), (["--preset=huge"], "huge"), (["clip_steps=3"], "clip_steps=3"),
                         (["--image_size=30"], "patch_size")]:
        with pytest.raises(SystemExit) as err:
            cc.parse_config(argv)
        assert needle in str(err.value)


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit) as err:
        cc.parse_config(["--help"])
    assert err.value.code == 0
    printed = capsys.readouterr().out
    for field in ("--clip_steps=", "--recipes=", "--data="):
        assert field in printed
    assert "captioner stage-1 optimizer steps" in printed  # one-line meanings come from the source comments


def test_bad_user_file_is_a_one_line_error(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "clip_caption.py"), "--preset=smoke",
                          f"--data={tmp_path / 'missing.csv'}", f"--out_dir={tmp_path / 'out'}"],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert "missing.csv" in run.stderr.strip().splitlines()[-1]
    bad = tmp_path / "pairs.csv"
    bad.write_text("filepath,text\nimg.png,a red circle\n")
    with pytest.raises(SystemExit) as err:  # checked before any training starts
        cc.main(["--preset=smoke", f"--data={bad}", f"--out_dir={tmp_path / 'out'}"])
    assert "pairs.csv:1" in str(err.value) and "caption" in str(err.value) and "\n" not in str(err.value)


# ----------------------------------------------------------------------------- captioner, cache, resume


class SimulatedKill(Exception):
    """Stands for the process dying (SIGKILL) at that point: nothing after it runs."""


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The smoke preset end to end, in process (what `python clip_caption.py --preset=smoke` runs)."""
    out = tmp_path_factory.mktemp("smoke")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same float sums, so the same tiny model, on every machine
    try:
        cc.main(["--preset=smoke", f"--out_dir={out}"])
    finally:
        torch.set_num_threads(threads)
    return out


def test_smoke_preset_end_to_end(smoke_run):
    for name in ("config.json", "log.jsonl", "metrics.json", "report.md", "captioner.safetensors", "clip_alt.safetensors"):
        assert (smoke_run / name).exists(), name
    metrics = json.loads((smoke_run / "metrics.json").read_text())
    assert set(metrics["clip"]) == {"alt", "ssc50", "afc"}
    for row in metrics["clip"].values():
        assert set(row) == set(cc.COLUMNS) and all(0.0 <= v <= 1.0 for v in row.values())
    assert set(metrics["captioner"]) == set(cc.FORMATS)
    log = [json.loads(line) for line in (smoke_run / "log.jsonl").read_text().splitlines()]
    cap = [r["loss"] for r in log if r.get("run") == "captioner"]
    assert cap[-1] < cap[0] - 1.0  # the captioner learns
    table = (smoke_run / "report.md").read_text()
    assert "| alt |" in table and "| dsc+ |" in table


def test_control_token_changes_the_format(smoke_run):
    cfg = cc.parse_config(["--preset=smoke", f"--out_dir={smoke_run}"])
    texts = cc.Texts()
    model = cc.Captioner(cfg, texts.enc.n_vocab)
    cc.load_checkpoint(smoke_run / "captioner_stage2.safetensors", model, cfg=cfg)
    images = cc.render_split("human", 0, 16, cfg, gold=False)  # training images: the smoke captioner is tiny
    out = {f: cc.generate(model, images.images, [texts.prompt(f, a, cfg.alt_tokens) for a in images.alttexts],
                          cfg, texts, "cpu") for f in cc.FORMATS}
    length = {f: np.mean([len(texts.encode(c)) for c in caps]) for f, caps in out.items()}
    print("mean generated tokens per format:", length)
    assert length["ssc"] < 0.75 * length["dsc"]  # SSC: one short sentence; DSC: a paragraph
    assert np.mean([c.startswith("A ") for c in out["ssc"]]) > 0.5  # SSC opens on the subject ...
    assert np.mean([c.startswith(("The image", "Two", "Three", "Four", "Five", "Six", "Seven", "One", "Eight"))
                    for c in out["dsc"]]) > 0.5  # ... DSC on the scene


def test_caption_cache_survives_a_kill(smoke_run, tmp_path, monkeypatch):
    cfg = cc.parse_config(["--preset=smoke", f"--out_dir={tmp_path}", "--gen_batch=8"])
    texts = cc.Texts()
    model = cc.Captioner(cfg, texts.enc.n_vocab)
    cc.load_checkpoint(smoke_run / "captioner.safetensors", model, cfg=cfg)
    data = cc.render_split("web", 0, 24, cfg, gold=False)
    fresh = cc.caption_images(model, data, ["ssc", "afc"], tmp_path / "fresh.jsonl", cfg, texts, "cpu")

    real_generate, calls, killed = cc.generate, [], []

    def dying_generate(*args, **kwargs):  # the first run "dies" during its 3rd batch
        calls.append(1)
        if len(calls) == 3 and not killed:
            killed.append(True)
            raise SimulatedKill
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(cc, "generate", dying_generate)
    cache = tmp_path / "cache.jsonl"
    with pytest.raises(SimulatedKill):
        cc.caption_images(model, data, ["ssc", "afc"], cache, cfg, texts, "cpu")
    assert len(cache.read_text().splitlines()) == 16  # two finished batches of 8 are on disk
    with open(cache, "a") as f:
        f.write('{"index": 16, "fmt": "ss')  # and a record cut in the middle of its write
    calls.clear()
    resumed = cc.caption_images(model, data, ["ssc", "afc"], cache, cfg, texts, "cpu")
    assert len(calls) == 4  # 6 batches in all, 2 were done
    assert resumed == fresh
    assert len([json.loads(x) for x in cache.read_text().splitlines() if x.endswith("}")]) == 48


def test_checkpoint_resumes_exactly(tmp_path):
    cfg = cc.parse_config(["--preset=smoke", f"--out_dir={tmp_path}", "--clip_steps=4", "--ckpt_every=2"])
    texts = cc.Texts()
    data = cc.render_split("web", 0, 32, cfg, gold=True)
    synthetic = {"ssc": data.captions["ssc"]}
    log = lambda **k: None
    straight = cc.train_clip("ssc50", data, synthetic, cfg, texts, torch.device("cpu"), log)
    (tmp_path / "clip_ssc50.safetensors").rename(tmp_path / "straight.safetensors")

    real_clip_loss = cc.clip_loss
    def dying_loss(*args):  # killed inside step 3, after the step-2 checkpoint
        if dying_loss.calls == 2:
            raise SimulatedKill
        dying_loss.calls += 1
        return real_clip_loss(*args)
    dying_loss.calls = 0
    cc.clip_loss = dying_loss
    try:
        with pytest.raises(SimulatedKill):
            cc.train_clip("ssc50", data, synthetic, cfg, texts, torch.device("cpu"), log)
    finally:
        cc.clip_loss = real_clip_loss
    resumed = cc.train_clip("ssc50", data, synthetic, cfg, texts, torch.device("cpu"), log)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    other = cc.parse_config(["--preset=smoke", f"--out_dir={tmp_path}", "--embed_dim=8"])
    with pytest.raises(ValueError, match="embed_dim"):
        cc.load_checkpoint(tmp_path / "clip_ssc50.safetensors", cc.CLIP(other, texts.enc.n_vocab), cfg=other)


def test_user_image_text_file(smoke_run, tmp_path):
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "caption", "alttext"])
        for i in range(15):
            scene = shapes.make_scene("val", i)
            shapes.render(scene, size=24).save(tmp_path / f"img{i}.png")
            writer.writerow([f"img{i}.png", shapes.caption(scene, "ssc", seed=i), shapes.caption(scene, "alttext", seed=i)])
    out = tmp_path / "out"
    out.mkdir()
    (out / "captioner.safetensors").write_bytes((smoke_run / "captioner.safetensors").read_bytes())  # reuse: skip training
    cc.main(["--preset=smoke", f"--out_dir={out}", f"--data={tmp_path / 'pairs.csv'}", "--stage2_steps=0",
             "--recipes=alt,ssc50"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["clip"]["ssc50"]["emblem top1"] is None  # no scene graph: retrieval only
    assert 0.0 <= metrics["clip"]["ssc50"]["T->I R@1"] <= 1.0
    cached = [json.loads(x) for x in next(out.glob("captions_*.jsonl")).read_text().splitlines()]
    assert {r["index"] for r in cached} == set(range(12))  # 15 rows, last 3 held out for retrieval
