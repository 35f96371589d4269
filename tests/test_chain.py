"""The checkpoint chain mm1 -> mm15 -> dpo_bdhs / mia_bench: a model rebuilt from nothing but a checkpoint's
metadata (`arch`, tokenizer sha256, `<image>` id) reproduces mm1's logits. Each later script adds its own
model class to BUILDERS (the copies of mm1's classes it holds)."""

import importlib
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import mm1
from data.tokenizer import get_tokenizer

# script -> the class that builds the model from an arch dict
BUILDERS = {"mm1": "MM1", "mm15": "MM1", "mia_bench": "MM1", "dpo_bdhs": "MM1"}


@pytest.fixture(scope="module")
def smoke_checkpoint(tmp_path_factory):
    """A short smoke run of mm1.py (every stage, a few steps): its out_dir with model.safetensors."""
    out = tmp_path_factory.mktemp("chain")
    mm1.main(
        [
            "--preset=smoke",
            f"--out_dir={out}",
            "--steps=6",
            "--stop_after=5",
            "--vit_pretrain_steps=3",
            "--lm_pretrain_steps=3",
            "--connector_warmup_steps=3",
            "--log_every=3",
            "--eval_every=3",
            "--vit_stem=2",  # the conv stem (not in HF's CLIPVisionModel) must travel through `arch` too
        ]
    )
    return out


def read_checkpoint(out):
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    return load_file(str(out / "model.safetensors")), meta


def probe_inputs(arch: dict):
    """A prompt with two images, built from the metadata alone: `<image>` id x image tokens per image."""
    slots = [arch["image_token_id"]] * arch["connector"]["image_tokens"]
    ids = torch.tensor([[11, 12] + slots + [13, 14, 15] + slots + [16, 17]])
    size = arch["image_size"]
    images = torch.randint(
        0, 256, (2, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    return ids, images


def mm1_logits(out, ids, images):
    """mm1's own path: its Config from the checkpoint, the model built by mm1.py, weights loaded."""
    weights, meta = read_checkpoint(out)
    cfg = mm1.Config(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(meta["config"]).items()}
    )
    enc = get_tokenizer()
    model = mm1.MM1(mm1.arch_of(cfg, enc.n_vocab, enc.encode_single_token("<image>"))).eval()
    model.load_state_dict(weights)
    with torch.no_grad():
        return model(ids, images)[0]


def test_metadata_carries_the_contract(smoke_checkpoint):
    _, meta = read_checkpoint(smoke_checkpoint)
    arch = json.loads(meta["arch"])
    enc = get_tokenizer()
    assert meta["format_version"] == str(mm1.CKPT_FORMAT) and int(meta["step"]) == 5
    assert meta["tokenizer_sha256"] == mm1.tokenizer_sha256()
    assert int(meta["image_token_id"]) == arch["image_token_id"] == enc.encode_single_token("<image>")
    assert arch["text"]["vocab_size"] == enc.n_vocab and arch["image_size"] == int(meta["image_size"])
    for key in ("rms_norm_eps", "rope_theta", "hidden_act", "num_key_value_heads", "moe_every"):
        assert key in arch["text"]
    for key in ("hidden_act", "layer_norm_eps", "patch_size", "feature"):
        assert key in arch["vision"]
    weights, _ = read_checkpoint(smoke_checkpoint)
    assert arch["vision"]["conv_stem_layers"] == 2
    assert any(k.startswith("vision_model.embeddings.stem.") for k in weights)
    assert {"type", "image_tokens", "depth"} <= set(arch["connector"]) and len(arch["pixel_std"]) == 3


@pytest.mark.parametrize("script", sorted(BUILDERS))
def test_model_rebuilt_from_metadata_reproduces_mm1_logits(smoke_checkpoint, script):
    weights, meta = read_checkpoint(smoke_checkpoint)
    arch = json.loads(meta["arch"])
    ids, images = probe_inputs(arch)
    want = mm1_logits(smoke_checkpoint, ids, images)
    model = getattr(importlib.import_module(script), BUILDERS[script])(arch).eval()
    model.load_state_dict(weights)  # strict: every tensor has its place
    with torch.no_grad():
        got = model(ids, images)[0]
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the metadata matters: a wrong constant in it gives other logits
    wrong = json.loads(meta["arch"])
    wrong["text"]["rms_norm_eps"] = 0.1
    model = getattr(importlib.import_module(script), BUILDERS[script])(wrong).eval()
    model.load_state_dict(weights)
    with torch.no_grad():
        assert not torch.allclose(model(ids, images)[0], want, atol=1e-3)
    # an arch without conv_stem_layers (checkpoints before the stem) builds no stem: these weights don't fit
    old = json.loads(meta["arch"])
    del old["vision"]["conv_stem_layers"]
    model = getattr(importlib.import_module(script), BUILDERS[script])(old)
    assert not any(name.startswith("vision_model.embeddings.stem.") for name in model.state_dict())
    with pytest.raises(RuntimeError, match="embeddings.stem"):
        model.load_state_dict(weights)


@pytest.mark.parametrize("script", sorted(BUILDERS))
def test_every_script_builds_the_cpu_presets_connector(smoke_checkpoint, script):
    """The smoke chain uses the C-Abstractor; `python mm1.py` (cpu preset) writes another connector, and every
    later script must hold its class (dpo_bdhs once refused it)."""
    arch = json.loads(read_checkpoint(smoke_checkpoint)[1]["arch"])
    arch["connector"]["type"] = mm1.PRESETS["cpu"].get("connector", mm1.Config.connector)
    model = getattr(importlib.import_module(script), BUILDERS[script])(arch)
    assert type(model.connector).__name__ == type(mm1.MM1(arch).connector).__name__


@pytest.fixture(scope="module")
def mm15_checkpoint(smoke_checkpoint, tmp_path_factory):
    """mm15.py at smoke size from mm1's smoke checkpoint: (its out_dir, its metrics)."""
    import mm15

    out = tmp_path_factory.mktemp("chain") / "mm15"
    args = ["--cpt_steps=2", "--sft_steps=3", "--eval_items=1", "--max_new_tokens=3"]
    init = smoke_checkpoint / "model.safetensors"
    return out, mm15.main(["--preset=smoke", f"--init={init}", f"--out_dir={out}", *args])


def test_mm15_continues_from_an_mm1_smoke_checkpoint(smoke_checkpoint, mm15_checkpoint):
    """mm15.py at smoke size from mm1's checkpoint: its own checkpoint keeps mm1's contract (the same arch,
    tokenizer, <image> id) plus the SFT fields, mm1's class rebuilds it from the metadata alone (strict
    load), its weights moved, and the SFT rows sampled add up to the steps x batch."""
    out, metrics = mm15_checkpoint
    weights, meta = read_checkpoint(out)
    _, mm1_meta = read_checkpoint(smoke_checkpoint)
    for key in ("arch", "tokenizer_sha256", "image_token_id", "image_size"):
        assert meta[key] == mm1_meta[key], key
    arch, sft = json.loads(meta["arch"]), json.loads(meta["sft"])
    assert int(meta["step"]) == 5 and sft["tiling"]["tile_size"] == arch["image_size"]
    assert sft["tiling"]["image_tokens"] == arch["connector"]["image_tokens"] and "floor" in sft["boxes"]
    model = mm1.MM1(arch).eval()
    model.load_state_dict(weights)
    ids, images = probe_inputs(arch)
    with torch.no_grad():
        assert not torch.allclose(model(ids, images)[0], mm1_logits(smoke_checkpoint, ids, images), atol=1e-4)
    assert sum(metrics["sampled_counts"].get(c, 0) for c in metrics["shares"]) == 3 * 4
    assert (out / "grounding.png").is_file() and (out / "report.md").is_file()


def test_mia_bench_continues_from_an_mm15_smoke_checkpoint(mm15_checkpoint, tmp_path):
    """mm1 -> mm15 -> mia_bench at smoke size: mia_bench's checkpoint keeps the contract (arch, tokenizer,
    <image> id, image size, mm15's sft block) plus its `mia` block, and mm1's class rebuilds it (strict)."""
    import mia_bench

    init = mm15_checkpoint[0] / "model.safetensors"
    mia_bench.main(["--preset=smoke", f"--init={init}", f"--out_dir={tmp_path / 'mia'}", "--sft_steps=2"])
    weights, meta = read_checkpoint(tmp_path / "mia")
    _, mm15_meta = read_checkpoint(mm15_checkpoint[0])
    for key in ("arch", "tokenizer_sha256", "image_token_id", "image_size", "sft"):
        assert meta[key] == mm15_meta[key], key
    assert json.loads(meta["mia"])["n_sft"] == 8 and int(meta["step"]) == 2
    model = mm1.MM1(json.loads(meta["arch"])).eval()
    model.load_state_dict(weights)


def test_dpo_bdhs_continues_from_an_mm15_smoke_checkpoint(mm15_checkpoint, tmp_path):
    """mm1 -> mm15 -> dpo_bdhs at smoke size: dpo_bdhs's checkpoint keeps the contract (arch, tokenizer,
    <image> id, image size, mm15's sft block) plus its `dpo` block, mm1's class rebuilds it (strict), and
    the DPO step moved the weights."""
    import dpo_bdhs

    init = mm15_checkpoint[0] / "model.safetensors"
    dpo_bdhs.main(["--preset=smoke", f"--init={init}", f"--out_dir={tmp_path / 'dpo'}", "--rows=povid"])
    weights, meta = read_checkpoint(tmp_path / "dpo")
    mm15_weights, mm15_meta = read_checkpoint(mm15_checkpoint[0])
    for key in ("arch", "tokenizer_sha256", "image_token_id", "image_size", "sft"):
        assert meta[key] == mm15_meta[key], key
    assert json.loads(meta["dpo"])["row"] == "povid" and int(meta["step"]) == 2
    model = mm1.MM1(json.loads(meta["arch"])).eval()
    model.load_state_dict(weights)
    assert any(not torch.equal(weights[k], mm15_weights[k]) for k in weights)
