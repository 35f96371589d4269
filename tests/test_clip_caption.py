"""clip_caption.py: losses and metrics against hand-computed values, HF parity of the CLIP ViT, the control
token, the caption cache (kill, key, shards), exact and refused resume, the smoke preset end to end
(ShapesWorld and a user's CSV), bad input."""
import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clip_caption as cc
from data import InputError, shapes
from data import clip_tasks as ct
from data.shapes.text import fused_names

ROOT = Path(__file__).resolve().parent.parent

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
    assert clamped.item() == pytest.approx(200 / 3, rel=1e-3)  # rows 0, 1 miss by 100 logits: (100 + 100) / 3


def test_flow_pair_is_the_straight_path_from_noise_to_image():
    images, noise = torch.full((1, 3, 2, 2), 2.0), torch.full((1, 3, 2, 2), -2.0)
    x_t, target = cc.flow_pair(images, noise, torch.tensor([0.25]))
    assert torch.all(x_t == -1.0) and torch.all(target == 4.0)  # 0.25 * 2 + 0.75 * -2; 2 - (-2)
    images, noise, t = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4), torch.tensor([0.0, 0.3, 1.0])
    x_t, target = cc.flow_pair(images, noise, t)
    torch.testing.assert_close(x_t[0], noise[0])
    torch.testing.assert_close(x_t[2], images[2])
    later, _ = cc.flow_pair(images, noise, t + 0.1)
    torch.testing.assert_close((later - x_t) / 0.1, target, atol=1e-4, rtol=1e-4)  # target = dx_t / dt


def test_euler_sampler_integrates_known_velocity_fields():
    point, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    toward = lambda x, t: (point - x) / (1 - t.view(-1, 1, 1, 1))  # the flow that ends exactly on `point`
    for steps in (1, 3, 20):
        torch.testing.assert_close(cc.euler_sample(toward, noise, steps), point, atol=1e-5, rtol=1e-5)
    ramp = lambda x, t: torch.ones_like(x) * 2 * t.view(-1, 1, 1, 1)  # Euler takes t = 0, 1/4, 2/4, 3/4
    torch.testing.assert_close(cc.euler_sample(ramp, noise, 4), noise + 0.75)  # 2 (0 + 1 + 2 + 3) / 16


def test_guidance_mixes_prompt_and_empty_prompt():
    class Stub:  # velocity = prompt length / 64 (exact in binary): 7/64 for the prompts, 1/64 for ""
        def eval(self):
            return self
        def encode_text(self, ids, lengths):
            return (lengths.float(),)
        def __call__(self, x, t, ids, lengths, text):
            return torch.zeros_like(x) + text[0].view(-1, 1, 1, 1) / 64
    texts = ct.Texts()
    assert texts.clip_batch(["a red circle on the left", ""], 77)[1].tolist() == [7, 1]  # 6 tokens + <|eot|>
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))  # cfg.seed's, smoke's 16 px
    images, run = {}, cc.Run("cpu", 0, 1, texts, {})
    for w in (3.0, 1.0):  # one Euler step from the noise: x = noise + v(empty) + w (v(prompt) - v(empty))
        cfg = cc.parse_config(["--preset=smoke", f"--guidance={w}", "--sample_steps=1"])
        images[w] = cc.generate_images(Stub(), ["a red circle on the left"] * 2, cfg, run)
        x = noise + (torch.tensor(1 / 64) + w * torch.tensor(6 / 64))
        assert torch.equal(images[w], ((x * 0.25 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8))
    assert not torch.equal(images[3.0], images[1.0])
    assert ct.drop_prompts(["a", "b", "c"], torch.tensor([0.05, 0.5, 0.09]), 0.1) == ["", "b", ""]
    coins = torch.rand(10000, generator=torch.Generator().manual_seed(0))
    assert 0.09 < np.mean([p == "" for p in ct.drop_prompts(["x"] * 10000, coins, 0.1)]) < 0.11


def test_geneval_targets_and_probe_scoring():
    scene = shapes.Scene(1000, 1000, "white", [shapes.Obj("star", "blue", "small", (700, 50, 820, 170)),
                                               shapes.Obj("circle", "red", "large", (20, 350, 320, 650))])
    targets = ct.geneval_targets([scene, scene])
    assert targets["colour"].tolist() == [shapes.COLORS.index("red")] * 2  # the largest shape, not the first
    assert targets["shape"].tolist() == [shapes.SHAPES.index("circle")] * 2
    assert targets["count"].tolist() == [1, 1] and targets["position"].tolist() == [3, 3]  # 2 shapes; left
    assert targets["background"].tolist() == [0, 0]  # white

    logits = {k: torch.zeros(2, len(v)) for k, v in ct.GENEVAL.items()}
    for k in logits:  # a probe that reads both images right, but image 1's position wrong
        logits[k][:, targets[k][0]] = 1.0
    logits["position"][1, 0] = 2.0
    reads = lambda images: torch.cat(list(logits.values()), 1)  # the probe's layout: the heads side by side
    run = cc.Run("cpu", 0, 1, None, {})
    dense = cc.geneval_hits(reads, torch.zeros(2, 3, 8, 8, dtype=torch.uint8), targets, "dense", run)
    assert dense["colour"].tolist() == [1, 1] and dense["position"].tolist() == [1, 0]
    assert dense["all requested"].tolist() == [1, 0]
    assert dense["attributes"] == pytest.approx([1, 0.8])  # image 1: 4 of the 5 attributes
    short = cc.geneval_hits(reads, torch.zeros(2, 3, 8, 8, dtype=torch.uint8), targets, "short", run)
    assert set(short) == {"colour", "shape", "attributes", "all requested"}
    assert short["all requested"].tolist() == [1, 1]  # a short prompt requests neither position nor count


# ----------------------------------------------------------------------------- model


def test_clip_vit_matches_transformers():
    from transformers import CLIPVisionConfig, CLIPVisionModel
    cfg = cc.parse_config(["--preset=smoke", "--image_size=32", "--patch_size=8", "--vit_width=48",
                           "--vit_layers=2", "--vit_heads=3"])
    hf = CLIPVisionModel(CLIPVisionConfig(hidden_size=48, intermediate_size=192, num_hidden_layers=2,
                                          num_attention_heads=3, image_size=32, patch_size=8)).eval()
    with torch.no_grad():  # HF's init leaves biases / LN at trivial values: randomise everything
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ours = cc.CLIPModel(cfg, 50).eval()
    state = {k.removeprefix("vision_model."): v for k, v in hf.state_dict().items()
             if "position_ids" not in k}
    assert set(state) == set(ours.vision_model.state_dict())  # the same names: HF weights load as they are
    ours.vision_model.load_state_dict(state)
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = hf(pixel_values=pixels)
        hidden = ours.vision_model(pixels)
        pooled = ours.vision_model.post_layernorm(hidden[:, 0])
    torch.testing.assert_close(hidden, out.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, out.pooler_output, atol=1e-5, rtol=1e-5)


def test_flow_unet_ignores_padding_and_caches_the_prompt():
    cfg = cc.parse_config(["--preset=smoke"])
    texts = ct.Texts()
    model = cc.FlowUNet(cfg, texts.enc.n_vocab).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # a fresh model's output layers are near zero: randomise them so text matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x, t = torch.randn(1, 3, 16, 16).repeat(2, 1, 1, 1), torch.tensor([0.3, 0.3])
    alone = texts.clip_batch(["a red circle"], 77)
    padded = texts.clip_batch(["a red circle", "a much longer prompt about a blue star at the top left"], 77)
    with torch.no_grad():
        v_alone = model(x[:1], t[:1], *alone)
        v_padded = model(x, t, *padded)
        cached = model(x, t, *padded, model.encode_text(*padded))
    torch.testing.assert_close(v_padded[:1], v_alone, atol=1e-5, rtol=1e-5)  # pads are masked out
    torch.testing.assert_close(cached, v_padded)
    assert (v_padded[0] - v_padded[1]).abs().max() > 1e-3  # the prompt changes the velocity


def test_kv_cache_decoding_matches_full_recompute():
    cfg = cc.parse_config(["--preset=smoke"])
    model = cc.Captioner(cfg, 60).eval()
    images, ids = torch.randn(2, 3, 20, 20), torch.randint(0, 60, (2, 7))  # the smoke captioner's 20 px
    with torch.no_grad():
        full = model(images, ids)  # (2, 7, V)
        caches = [{} for _ in model.layers]
        prefill = model(images, ids[:, :4], caches)
        position = caches[0]["k"].shape[2]
        steps = [model(None, ids[:, t: t + 1], caches, start=position + t - 4) for t in range(4, 7)]
    torch.testing.assert_close(torch.cat([prefill, *steps], 1), full, atol=1e-5, rtol=1e-5)
    keep = torch.tensor([[False, True, True, True, True, True, False], [False] * 3 + [True] * 4])
    with torch.no_grad():  # training's head only at the caption tokens: the same logits, in (N, V)
        torch.testing.assert_close(model(images, ids, keep=keep), full[keep], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- metrics


def test_retrieval_hits_on_constructed_similarities():
    # gallery 0 = items 0..2, gallery 1 = items 3..5; the last item (6) is a partial gallery: NaN
    image = torch.eye(7)
    text = torch.eye(7)
    text[1] = torch.tensor([0.9, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # text 1 sits on image 0, not on image 1
    text[4] = torch.tensor([0.0, 0.0, 0.0, 0.6, 0.5, 0.7, 0.0])  # text 4: image 5, then 3, then its own
    hits = ct.retrieval_hits(image, torch.nn.functional.normalize(text, dim=-1), gallery=3)
    # image 0 ties texts 0 and 1 (a tie counts against it); image 1 scores 0 with every text
    assert hits["I->T R@1"][:6].tolist() == [0, 0, 1, 1, 1, 1] and np.isnan(hits["I->T R@1"][6])
    assert hits["T->I R@1"][:6].tolist() == [1, 0, 1, 1, 0, 1]  # text 4 ranks its own image 3rd of 3
    constant = ct.retrieval_hits(torch.ones(4, 2), torch.ones(4, 2), gallery=4)
    assert constant["I->T R@1"].sum() == 0 and constant["T->I R@1"].sum() == 0  # no credit for a collapse


def test_paired_bootstrap_and_verdicts():
    rng = np.random.default_rng(0)
    base = rng.random(2000) < 0.3
    better = base | (rng.random(2000) < 0.2)  # the same items right plus more
    diff, lo, hi = ct.paired_bootstrap(better.astype(float), base.astype(float), 500, 0)
    assert lo > 0 and diff == pytest.approx(better.mean() - base.mean())
    noise = base.copy()  # 20 flips each way: the same mean, different items
    noise[np.flatnonzero(base)[:20]], noise[np.flatnonzero(~base)[:20]] = False, True
    _, lo, hi = ct.paired_bootstrap(noise.astype(float), base.astype(float), 500, 0)
    assert lo < 0 < hi
    hits = {("ssc50", s): {"I->T R@1": better.astype(float), "T->I R@1": better.astype(float)}
            for s in (0, 1)}
    hits |= {("alt", 0): {"I->T R@1": base.astype(float), "T->I R@1": base.astype(float)},
             ("alt", 1): {"I->T R@1": better.astype(float), "T->I R@1": better.astype(float)}}
    hits["alt", 1]["I->T R@1"][:40] = 1 - hits["alt", 1]["I->T R@1"][:40]  # about as good as ssc50
    (pair,) = ct.key_pair_verdicts(hits, cc.KEY_PAIRS, 200)  # only ssc50 vs alt ran
    assert pair["claim"] == "ssc50 beats alt on retrieval" and pair["seeds"] == [0, 1]
    assert pair["verdict"] == "not resolved"  # seed 0 separates, seed 1 does not
    hits["alt", 1] = hits["alt", 0]
    assert ct.key_pair_verdicts(hits, cc.KEY_PAIRS, 200)[0]["verdict"] == "yes"


def test_hallucination_below_blind_is_paired_over_scenes():
    scenes = [shapes.make_scene("test", i, seed=0) for i in range(60)]
    gold = [shapes.caption(s, "ssc", seed=i) for i, s in enumerate(scenes)]
    blind = gold[1:] + gold[:1]
    exact = ct.caption_row(gold, gold, scenes, ct.Texts(), blind=blind)  # no hallucination at all
    blind_rate = ct.caption_row(blind, gold, scenes, ct.Texts())["halluc."]
    assert exact["halluc."] == 0.0 and exact["below blind"] == blind_rate > 0.5
    low, high = exact["95% CI"]
    assert low < exact["below blind"] < high
    same = ct.caption_row(blind, gold, scenes, ct.Texts(), blind=blind)  # the same scenes resampled for both
    assert same["below blind"] == 0.0 and same["95% CI"] == [0.0, 0.0]


def test_object_regions_mask_the_patches_each_box_overlaps():
    # 1000-unit canvas at 64 px, 8-px patches (an 8 x 8 grid, token 0 = CLS): boxes in canvas units
    objects = [shapes.Obj("star", "red", "large", (0, 0, 260, 500)),  # x 0-16.6 px, y 0-32 px
               shapes.Obj("ring", "cyan", "small", (500, 500, 620, 620)),  # x, y 32-39.7 px: one patch
               shapes.Obj("button", "gray", "small", (0, 900, 100, 1000))]  # a UI widget: not a shape
    scenes = [shapes.Scene(1000, 1000, "white", []), shapes.Scene(1000, 1000, "white", objects)]
    scene, mask, labels = ct.object_regions(scenes, 64, 8)
    assert scene.tolist() == [1, 1] and mask.shape == (2, 65) and not mask[:, 0].any()
    first = mask[0, 1:].view(8, 8)
    assert first[:4, :3].all() and first.sum() == 12  # rows 0-3, columns 0-2 (a pixel into column 2)
    assert mask[1].nonzero().flatten().tolist() == [1 + 4 * 8 + 4]  # row 4, column 4
    assert labels.tolist() == [[shapes.SHAPES.index("star"), shapes.COLORS.index("red")],
                               [shapes.SHAPES.index("ring"), shapes.COLORS.index("cyan")]]


def test_gold_synthetic_swaps_the_stated_share():
    cfg = cc.parse_config(["--preset=smoke"])
    data = ct.render_split("web", 0, 400, cfg)
    exact = ct.gold_synthetic(data, ["ssc", "dsc"], 0.0, 0)
    assert exact["dsc"] == data.captions["dsc"]
    noisy = ct.gold_synthetic(data, ["dsc"], 0.25, 0)["dsc"]
    swapped = np.mean([a != b for a, b in zip(noisy, data.captions["dsc"])])
    assert 0.18 < swapped < 0.32


def test_baseline_rows_chance_and_majority():
    cfg = cc.parse_config(["--preset=smoke"])
    held_out, train = ct.render_split("web", 100, 300, cfg), ct.render_split("web", 0, 300, cfg)
    rows = ct.baseline_rows(held_out, train.scenes, gallery=50)
    assert rows["chance"]["I->T R@1"] == pytest.approx(1 / 50) == rows["chance"]["T->I R@1"]
    shape = ct.scene_labels(held_out.scenes)["shape"]
    shape = shape[shape.any(1)]
    assert rows["chance"]["shape top1"] == pytest.approx((shape.sum(1) / shape.shape[1]).mean().item())
    train_shapes = ct.scene_labels(train.scenes)["shape"].sum(0)  # the majority class comes from training
    assert rows["majority"]["shape top1"] == shape[:, train_shapes.argmax()].float().mean().item()


def test_object_mentions_skip_glyph_descriptions():
    scene = shapes.Scene(1000, 1000, "white", [shapes.Obj("circle", "red", "large", (0, 0, 300, 300)),
                                               shapes.Obj("star", "blue", "small", (500, 500, 600, 600))])
    text = "Two shapes: a red circle, stars. The badge shows a pattern of 9 white squares."
    assert shapes.object_mentions(text) == [("red", "circle"), (None, "star")]
    assert not shapes.hallucinations(text, scene)
    mentions = shapes.object_mentions("A black square and a pattern. Red star")
    assert mentions == [("black", "square"), ("red", "star")]


def test_afc_fuses_only_the_names_the_alttext_emitted():
    badge = lambda emblem, x: shapes.Obj("hexagon", "black", "medium", (x, 0, x + 200, 200), emblem=emblem)
    scene = shapes.Scene(1000, 1000, "white", [badge(5, 0), badge(9, 500)])
    name = shapes.EMBLEMS
    fused = lambda alt: sorted(fused_names(scene, alt).values())
    assert fused(f"IMG_1.jpg | {name[9].lower()} emblem | {name[5]} sticker") == sorted([name[5], name[9]])
    assert fused(f"{name[5]} sticker | Buy now") == [name[5]]  # the AltText dropped badge 9's name
    assert fused(f"the {name[7]} logo") == [name[7]]  # a misaligned AltText misleads the fusion
    assert fused("Royalty free") == []
    unsupported = 0
    for i in range(300):  # the built-in web split: AFC names nothing its AltText did not
        web = shapes.make_scene("web", i)
        alt, afc = shapes.caption(web, "alttext", seed=i).lower(), shapes.caption(web, "afc", seed=i)
        named = [n for n in name if re.search(rf"\b{n}\b", afc)]
        unsupported += any(n.lower() not in alt for n in named)
        assert set(named) == set(fused_names(web, alt).values())
    assert unsupported == 0


# ----------------------------------------------------------------------------- config and bad input


def test_config_overrides_and_errors():
    cfg = cc.parse_config(["--preset=smoke", "--clip_lr=1", "--recipes=alt,dsc30", "--synthetic=captioner"])
    assert cfg.clip_lr == 1.0 and cfg.recipes == ("alt", "dsc30")
    assert cfg.n_web == cc.PRESETS["smoke"]["n_web"]
    assert ct.parse_recipe("ssc30") == ("ssc", 0.3) and ct.parse_recipe("alt") == ("alt", 0.0)
    for argv, needle in [(["--no_such_key=1"], "no_such_key"), (["--clip_steps=abc"], "clip_steps"),
                         (["--recipes=alt,ssc300"], "ssc300"), (["--preset=huge"], "huge"),
                         (["clip_steps=3"], "clip_steps=3"), (["--image_size=30"], "patch_size"),
                         (["--synthetic=magic"], "magic"), (["--gold_error=1.5"], "gold_error"),
                         (["--n_eval=0"], "n_eval"), (["--cap_image_size=30"], "cap_image_size=30"),
                         (["--vit_stem=-1"], "vit_stem=-1"), (["--vit_stem=9"], "vit_stem=9")]:  # 96 >> 8 = 0
        with pytest.raises(InputError, match=needle):
            cc.check_config(cc.parse_config(argv))
    cfg = cc.parse_config(["--vit_stem=7"])  # 7 <= 1 + log2(96): the first stem layer has 96 >> 6 = 1 channel
    cc.check_config(cfg)
    assert cc.Captioner(cfg, 10)(torch.zeros(1, 3, 64, 64), torch.zeros(1, 1).long()).shape == (1, 1, 10)


def test_bad_user_file_is_a_one_line_error(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "clip_caption.py"), "--preset=smoke",
                          f"--data={tmp_path / 'missing.csv'}", f"--out_dir={tmp_path / 'out'}"],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         timeout=120)
    assert run.returncode == 2 and run.stderr.startswith("clip_caption.py: error: ")
    assert "missing.csv" in run.stderr and len(run.stderr.strip().splitlines()) == 1
    bad = tmp_path / "pairs.csv"
    bad.write_text("filepath,text\nimg.png,a red circle\n")
    with pytest.raises(InputError, match="pairs.csv:1") as err:  # checked before anything is written
        cc.main(["--preset=smoke", f"--data={bad}", f"--out_dir={tmp_path / 'out'}"])
    assert "caption" in str(err.value) and not (tmp_path / "out").exists()


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
        cc.main(["--preset=smoke", f"--out_dir={out}", "--export=True"])
    finally:
        torch.set_num_threads(threads)
    return out


def load(out: Path, name: str, model: torch.nn.Module, cfg) -> torch.nn.Module:
    model.load_state_dict(cc.load_checkpoint(out, cfg, cc.RESUME_MAY_DIFFER, name)[0])
    return model.eval()


def test_smoke_preset_end_to_end(smoke_run):
    for name in ("config.json", "log.jsonl", "metrics.json", "report.md", "captioner.safetensors",
                 "clip_alt.safetensors", "clip_afc.optimizer.safetensors"):
        assert (smoke_run / name).exists(), name
    metrics = json.loads((smoke_run / "metrics.json").read_text())
    assert set(metrics["clip"]) == {"untrained CLIP", "chance", "majority", "alt", "ssc50", "afc"}
    for name in ("alt", "ssc50", "afc", "untrained CLIP"):
        row = metrics["clip"][name]
        assert set(row) == set(ct.COLUMNS) and all(0.0 <= v <= 1.0 for v in row.values())
    assert set(metrics["captioner"]) == {f for fmt in ct.FORMATS for f in (fmt, f"{fmt} (blind)")}
    assert [p["claim"] for p in metrics["key_pairs"]] == ["ssc50 beats alt on retrieval"]
    log = [json.loads(line) for line in (smoke_run / "log.jsonl").read_text().splitlines()]
    assert all({"step", "loss", "lr", "items_s"} <= set(r) for r in log)
    cap = [r["loss"] for r in log if r["run"] == "captioner"]
    assert cap[-1] < cap[0] - 1.0  # the captioner learns
    assert {"real render (dense)", "another scene's render (short)", "alt (dense)", "dsc100 (short)",
            "empty prompt (dense)"} <= set(metrics["diffusion"])
    assert [p["claim"] for p in metrics["diffusion_key_pairs"]] == ["dsc100 beats alt on attributes (dense)"]
    diffusion = [r["loss"] for r in log if r["run"] == "diffusion_alt"]
    assert diffusion and all(math.isfinite(v) for v in diffusion)
    grid = Image.open(smoke_run / "diffusion_samples.png")  # rows: real, another scene, alt, dsc100, empty
    assert grid.size == (8 * 16 * 2, 5 * 16 * 2)
    table = (smoke_run / "report.md").read_text()
    assert "| alt |" in table and "| dsc+ (blind) |" in table and "| untrained CLIP |" in table
    # the captioner's ViT is stage 0's, unchanged by the captioner's training (frozen), and stage 0 trained it
    stage0, _ = cc.read_safetensors(smoke_run / "captioner_vision.safetensors")
    captioner, _ = cc.read_safetensors(smoke_run / "captioner.safetensors")
    torch.manual_seed(0)
    fresh = cc.Captioner(cc.parse_config(["--preset=smoke"]), ct.Texts().enc.n_vocab).state_dict()
    vision = [k for k in stage0 if k.startswith("vision_model.")]
    assert vision and all(torch.equal(stage0[k], captioner[k]) for k in vision)
    assert not torch.equal(stage0["vision_model.embeddings.patch_embedding.weight"],
                           fresh["vision_model.embeddings.patch_embedding.weight"])
    assert any(r["run"] == "captioner_vision" and math.isfinite(r["loss"]) for r in log)


def test_workers_train_the_same_models_side_by_side(smoke_run, tmp_path, monkeypatch):
    """--workers=2: the independent models (captioner, CLIPs, probe, flows) train in two forked processes of
    one thread each, and every number equals the one-process run's."""
    real_train_clip = cc.train_clip

    def train_clip(*args):  # runs in a worker: it notes its process id
        with open(tmp_path / "pids", "a") as f:
            f.write(f"{os.getpid()}\n")
        return real_train_clip(*args)

    monkeypatch.setattr(cc, "train_clip", train_clip)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cc.main(["--preset=smoke", f"--out_dir={tmp_path / 'out'}", "--export=True", "--workers=2"])
    finally:
        torch.set_num_threads(threads)
    pids = set((tmp_path / "pids").read_text().split())
    assert pids and str(os.getpid()) not in pids  # the CLIPs trained in other processes
    one, two = (json.loads((d / "metrics.json").read_text()) for d in (smoke_run, tmp_path / "out"))
    assert list(one.pop("timings_s")) == list(two.pop("timings_s"))
    assert one == two
    for name in ("captioner", "clip_afc", "probe", "diffusion_dsc100"):
        ours, theirs = (cc.read_safetensors(d / f"{name}.safetensors")[0]
                        for d in (smoke_run, tmp_path / "out"))
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name


def test_export_reads_back(smoke_run):
    rows = shapes.read_image_text(smoke_run / "export" / "captions.csv", caption_key="ssc")
    assert len(rows) == 32 and all(Path(r["filepath"]).is_file() for r in rows)
    cfg = cc.parse_config(["--preset=smoke"])
    web = ct.render_split("web", 0, 32, cfg)
    assert [r["caption"] for r in rows] == web.captions["ssc"]
    assert [r["alttext"] for r in rows] == web.alttexts
    assert [r["afc"] for r in rows] == web.captions["afc"]  # --synthetic=gold: the gold captions
    image = np.asarray(shapes.load_image(rows[3]["filepath"]))
    assert np.array_equal(image, web.images[3].permute(1, 2, 0).numpy())  # PNG: lossless


def test_control_token_changes_the_format(smoke_run):
    cfg = cc.parse_config(["--preset=smoke", f"--out_dir={smoke_run}"])
    texts = ct.Texts()
    run = cc.Run("cpu", 0, 1, texts, {})
    model = load(smoke_run, "captioner", cc.Captioner(cfg, texts.enc.n_vocab), cfg)
    images = ct.render_split("human", 0, 16, cfg, cfg.cap_image_size)  # training images: a tiny captioner
    out = {f: cc.generate(model, images, list(range(16)), f, cfg, run) for f in ct.FORMATS}
    length = {f: np.mean([len(texts.encode(c)) for c in caps]) for f, caps in out.items()}
    print("mean generated tokens per format:", length)
    assert length["ssc"] < 0.75 * length["dsc"]  # SSC: one short sentence; DSC: a paragraph
    assert np.mean([c.startswith("A ") for c in out["ssc"]]) > 0.5  # SSC opens on the subject ...
    scene_openers = ("The image", "Two", "Three", "Four", "Five", "Six", "Seven", "One", "Eight")
    assert np.mean([c.startswith(scene_openers) for c in out["dsc"]]) > 0.5  # ... DSC on the scene


def test_caption_cache_shards_over_ranks_and_is_reused(smoke_run, tmp_path, monkeypatch):
    cfg = cc.parse_config(["--preset=smoke", f"--out_dir={tmp_path}"])
    texts = ct.Texts()
    model = load(smoke_run, "captioner", cc.Captioner(cfg, texts.enc.n_vocab), cfg)
    data = ct.render_split("web", 0, 24, cfg, cfg.cap_image_size)
    one = cc.Run("cpu", 0, 1, texts, {})
    single = cc.caption_images(model, data, ["ssc", "afc"], tmp_path / "one", cfg, one)
    assert all(len(c) == 24 and all(c) for c in single.values())
    real_generate, calls = cc.generate, []

    def counted_generate(model, data, batch, *args):
        calls.append(batch)
        return real_generate(model, data, batch, *args)

    monkeypatch.setattr(cc, "generate", counted_generate)
    monkeypatch.setattr(cc.dist, "barrier", lambda: None)  # the two "ranks" run one after the other here
    with pytest.raises(KeyError):  # rank 1 alone: rank 0's shard is not written yet
        cc.caption_images(model, data, ["ssc", "afc"], tmp_path / "two", cfg, cc.Run("cpu", 1, 2, texts, {}))
    assert calls == [list(range(1, 24, 2))] * 2  # rank 1 captioned the odd images only, in each format
    rank0 = cc.Run("cpu", 0, 2, texts, {})
    both = cc.caption_images(model, data, ["ssc", "afc"], tmp_path / "two", cfg, rank0)
    assert both == single and calls[2:] == [list(range(0, 24, 2))] * 2
    calls.clear()  # one process reads both ranks' shards (a rerun on fewer ranks): nothing to generate
    assert cc.caption_images(model, data, ["ssc", "afc"], tmp_path / "two", cfg, one) == single and not calls
    assert cc.caption_images(model, data, ["ssc", "afc"], tmp_path / "one", cfg, one) == single
    assert not calls  # the same key: read back, nothing generated


def test_checkpoint_resumes_exactly_and_refuses_changes(tmp_path):
    cfg = cc.parse_config(["--preset=smoke", f"--out_dir={tmp_path}", "--clip_steps=4", "--ckpt_every=2"])
    texts = ct.Texts()
    run = cc.Run("cpu", 0, 1, texts, {})
    data = ct.render_split("web", 0, 32, cfg)
    synthetic = {"ssc": data.captions["ssc"]}
    straight = cc.train_clip("ssc50", 0, data, synthetic, cfg, run)

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
            cc.train_clip("ssc50", 0, data, synthetic, cfg, run)
    finally:
        cc.clip_loss = real_clip_loss
    resume = cc.parse_config(["--preset=smoke", f"--out_dir={tmp_path}", "--clip_steps=4", "--ckpt_every=2",
                              "--resume=True"])
    saved = cc.read_resume_state(resume)
    assert saved["clip_ssc50"][2] == 2
    resumed = cc.train_clip("ssc50", 0, data, synthetic, resume, cc.Run("cpu", 0, 1, texts, saved))
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    # every schedule field is checked; a saved step past the run's steps is refused
    for argv, needle in [(["--clip_steps=3", "--clip_lr=0.05", "--clip_batch=8"], "clip_steps=4"),
                         (["--embed_dim=8"], "embed_dim"), (["--warmup_frac=0.3"], "warmup_frac")]:
        other = cc.parse_config(["--preset=smoke", f"--out_dir={tmp_path}", "--clip_steps=4",
                                 "--ckpt_every=2", "--resume=True", *argv])
        with pytest.raises(InputError, match=needle):
            cc.read_resume_state(other)
    optimizer = cc.make_adamw(straight, 1e-3, 0.1)
    cc.save_checkpoint(tmp_path, straight, optimizer, resume, 9, name="clip_ssc50")
    with pytest.raises(InputError, match="step 9, past its 4 steps"):
        cc.read_resume_state(resume)


def test_user_image_text_file(smoke_run, tmp_path):
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "caption", "alttext"])
        for i in range(15):
            scene = shapes.make_scene("val", i)
            shapes.render(scene, size=24).save(tmp_path / f"img{i}.png")
            writer.writerow([f"img{i}.png", shapes.caption(scene, "ssc", seed=i),
                             shapes.caption(scene, "alttext", seed=i)])
    out = tmp_path / "out"
    cc.main(["--preset=smoke", f"--out_dir={out}", f"--data={tmp_path / 'pairs.csv'}", "--recipes=alt,ssc50",
             "--synthetic=captioner", "--cap_steps=2"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["clip"]["ssc50"]["emblem top1"] is None  # no scene graph: retrieval only
    assert 0.0 <= metrics["clip"]["ssc50"]["T->I R@1"] <= 1.0 and metrics["key_pairs"] == []
    cached = json.loads(next(out.glob("captions_*.0of1.json")).read_text())
    assert cached["index"] == list(range(12)) and len(cached["ssc"]) == 12  # 15 rows, 3 held out
    cc.main(["--preset=smoke", f"--out_dir={out}", f"--data={tmp_path / 'pairs.csv'}", "--recipes=alt,ssc50",
             "--synthetic=captioner", "--cap_steps=3"])  # other captioner weights: another cache file
    assert len(list(out.glob("captions_*.0of1.json"))) == 2
