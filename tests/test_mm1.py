"""mm1.py: parity with transformers, KV cache, CIDEr-D vs pycocoevalcap, packing, smoke training,
exact resume, DDP (2 gloo processes) == 1 process, bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import mm1  # noqa: E402

SMOKE = ["--preset=smoke"]


def tiny_cfg(**kw):
    base = dict(mm1.PRESETS["smoke"], preset="smoke")
    base.update(kw)
    return mm1.Config(**base)


def read_log(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- parity with transformers

def test_llama_parity_and_loader(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = tiny_cfg(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, ffn_hidden=96, rope_theta=500.0)
    vocab = 101
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                                      rope_theta=500.0, max_position_embeddings=256, tie_word_embeddings=False)).eval()
    path = tmp_path / "llm.safetensors"
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(path))
    ours = mm1.MM1(cfg, vocab, image_token_id=vocab - 1).eval()
    assert mm1.load_hf_weights(ours, str(path), ("model.", "lm_head.")) == len(
        [k for k in ours.state_dict() if k.startswith(("model.", "lm_head."))])
    ids = torch.randint(0, vocab - 1, (2, 37))
    with torch.no_grad():
        theirs = hf(ids).logits
        mine, _ = ours(ids)
    assert theirs.abs().max() > 0.1  # a real signal, not all zeros
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)


def test_clip_vision_parity(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel
    cfg = tiny_cfg(image_size=32, patch_size=8, vit_width=48, vit_layers=2, vit_heads=3)
    hf = CLIPVisionModel(CLIPVisionConfig(hidden_size=48, intermediate_size=192, num_hidden_layers=2,
                                          num_attention_heads=3, image_size=32, patch_size=8)).eval()
    with torch.no_grad():  # HF's init leaves biases / LN at trivial values: randomise everything
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(path))
    ours = mm1.MM1(cfg, 50, image_token_id=49).eval()
    mm1.load_hf_weights(ours, str(path), "vision_model.")
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = hf(pixel_values=pixels)
        hidden = ours.vision_model(pixels)
        pooled = ours.vision_model.post_layernorm(hidden[:, 0])
    torch.testing.assert_close(hidden, out.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, out.pooler_output, atol=1e-5, rtol=1e-5)


def test_loader_names_mismatched_keys(tmp_path):
    cfg = tiny_cfg()
    model = mm1.MM1(cfg, 60, 59)
    state = {k: v for k, v in model.state_dict().items() if k.startswith("model.")}
    state["model.norm.weight"] = torch.ones(7)  # mis-shaped
    del state["model.layers.0.mlp.up_proj.weight"]  # missing
    state["model.layers.9.extra.weight"] = torch.ones(2)  # unexpected
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(mm1.BadInput) as e:
        mm1.load_hf_weights(model, str(tmp_path / "bad.safetensors"), ("model.", "lm_head."))
    msg = str(e.value)
    assert "model.norm.weight (7,)" in msg and "up_proj" in msg and "layers.9.extra" in msg


# ----------------------------------------------------------------------------- model pieces

@pytest.mark.parametrize("connector,tokens", [("avgpool", 4), ("attnpool", 5), ("cabstractor", 4)])
def test_kv_cache_generation_matches_uncached(connector, tokens):
    torch.manual_seed(0)
    cfg = tiny_cfg(connector=connector, image_tokens=tokens, moe_every=2, n_experts=4)
    model = mm1.MM1(cfg, 80, image_token_id=79).eval()
    with torch.no_grad():
        for p in model.parameters():  # larger weights: a peaked, prompt-dependent next-token distribution
            p.mul_(4.0)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    ids = torch.tensor([[5, 6] + [79] * tokens + [7, 8, 9] + [79] * tokens + [10]])
    cached = model.generate(ids, images, max_new_tokens=12, stop_id=-1)
    seq, uncached = ids, []
    for _ in range(12):  # recompute the whole sequence at every step
        logits, _ = model(seq, images)
        nxt = int(logits[0, -1].argmax())
        uncached.append(nxt)
        seq = torch.cat([seq, torch.tensor([[nxt]])], 1)
    assert cached == uncached
    assert len(set(cached)) > 1
    # and the cached logits of the last step equal the full forward's
    cache = [[] for _ in model.model.layers]
    model(seq[:, :-1], images, 0, cache)
    step_logits, _ = model(seq[:, -1:], None, seq.shape[1] - 1, cache)
    torch.testing.assert_close(step_logits[0, -1], model(seq, images)[0][0, -1], atol=1e-4, rtol=1e-5)


def test_images_land_in_image_slots():
    cfg = tiny_cfg(connector="avgpool", image_tokens=4)
    model = mm1.MM1(cfg, 40, image_token_id=39).eval()
    ids = torch.tensor([[1, 39, 39, 39, 39, 2, 39, 39, 39, 39]])
    a, b = (torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8) for _ in range(2))
    with torch.no_grad():
        one, _ = model(ids, torch.cat([a, b]))
        two, _ = model(ids, torch.cat([b, a]))
    torch.testing.assert_close(one[0, 0], two[0, 0])  # before any image: causal, unchanged
    assert not torch.allclose(one[0, 5], two[0, 5])  # after the first image: depends on which image


def test_bf16_autocast_forward_backward():
    """The CUDA path trains under bf16 autocast; CPU autocast exercises the same dtype mixing (RoPE, splice)."""
    cfg = tiny_cfg(moe_every=2, n_experts=4)
    model = mm1.MM1(cfg, 60, image_token_id=59)
    ids = torch.randint(0, 58, (2, 12))
    ids[:, 2:6] = 59
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, aux = model(ids, torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
        loss = mm1.lm_loss_sum(logits, ids) / ids.numel() + mm1.moe_aux_loss(aux, cfg)
    loss.backward()
    assert logits.dtype == torch.bfloat16 and torch.isfinite(loss)
    assert model.vision_model.embeddings.patch_embedding.weight.grad.abs().sum() > 0


def test_cider_d_matches_pycocoevalcap():
    from pycocoevalcap.cider.cider_scorer import CiderScorer
    rng = np.random.default_rng(0)
    vocab = "a red blue green circle square star on the left right top of large small two".split()
    cands, refs = [], []
    for _ in range(12):
        refs.append([" ".join(rng.choice(vocab, rng.integers(4, 12))) for _ in range(rng.integers(1, 5))])
        cands.append(" ".join(rng.choice(vocab, rng.integers(1, 12))))
    cands[0] = refs[0][0]  # an exact match
    cands[1] = "zebra"  # no overlap
    scorer = CiderScorer(n=4, sigma=6.0)
    for c, r in zip(cands, refs):
        scorer += (c, r)
    want_mean, want = scorer.compute_score()
    got_mean, got = mm1.cider_d(cands, refs)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    assert abs(got_mean - want_mean) < 1e-9 and got[0] > 1.0 and got[1] == 0.0


def test_clip_loss_by_hand():
    """Symmetric InfoNCE: one-hot embeddings, scale e^0 = 1 -> logits = identity, loss = -log(e / (e + B - 1))."""
    B = 4
    emb = torch.eye(B) * 3.0  # normalised away
    loss = mm1.clip_loss(emb, emb, torch.tensor(0.0))
    torch.testing.assert_close(loss, torch.tensor(-np.log(np.e / (np.e + B - 1)), dtype=torch.float32))
    shuffled = mm1.clip_loss(emb, emb[[1, 0, 2, 3]], torch.tensor(0.0))  # two wrong pairs: higher loss
    expect = (2 * -np.log(np.e / (np.e + 3)) + 2 * -np.log(1 / (np.e + 3))) / 4
    torch.testing.assert_close(shuffled, torch.tensor(expect, dtype=torch.float32))


def test_packing_never_splits_an_image():
    image_id, pad_id, k = 9, 0, 4
    docs = [(np.array([1, 9, 2, 3, 9, 9, 4, 5], dtype=np.int32), [10, 11, 12]), (np.array([6, 7, 8], dtype=np.int32), [])]
    rng = np.random.default_rng(0)
    for seq_len in range(3, 40):
        ids, images = mm1.pack_sequence(rng, docs, seq_len, image_id, pad_id, k)
        slots = ids == image_id
        assert len(ids) == seq_len and slots.sum() == k * len(images)
        runs = np.diff(np.flatnonzero(np.diff(np.r_[0, slots.astype(int), 0])))[::2]  # lengths of slot runs
        assert all(r % k == 0 for r in runs)


def test_paper_lr_rule_and_schedule():
    # hand-computed: exp(-0.4214 * ln(1.2e9) - 0.5535) = exp(-9.3631) and exp(-0.4214 * ln(1e6) - 0.5535) = exp(-6.3754)
    assert mm1.paper_lr(1.2e9) == pytest.approx(8.583e-5, rel=1e-3)
    assert mm1.paper_lr(1e6) == pytest.approx(1.7028e-3, rel=1e-3)
    cfg = tiny_cfg(steps=110, warmup=10, min_lr_frac=0.1)
    assert mm1.lr_at(0, cfg, 1.0) == pytest.approx(0.1) and mm1.lr_at(9, cfg, 1.0) == pytest.approx(1.0)
    assert mm1.lr_at(60, cfg, 1.0) == pytest.approx(0.55) and mm1.lr_at(110, cfg, 1.0) == pytest.approx(0.1)


def test_user_llava_file_becomes_caption_documents(tmp_path):
    from data import shapes
    from data.tokenizer import get_tokenizer
    for i in range(2):
        shapes.render(shapes.make_scene("train", i), size=48).save(tmp_path / f"im{i}.png")
    convs = [{"id": str(i), "image": f"im{i}.png", "conversations": [
        {"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": f"Answer number {i}."}]}
        for i in range(2)]
    (tmp_path / "data.json").write_text(json.dumps(convs))
    cfg = tiny_cfg(train_data=str(tmp_path / "data.json"), n_documents=1, n_passages=1, eval_scenes=1, n_eval_passages=1)
    pools = mm1.Pools(cfg, get_tokenizer())
    assert len(pools.caption_docs) == 2
    for i, (ids, images) in enumerate(pools.caption_docs):
        assert ids[0] == pools.image_id and (ids == pools.image_id).sum() == 1 and ids[-1] == pools.eot_id
        assert f"Answer number {i}." in pools.enc.decode(ids[1:-1].tolist())
        assert pools.bank[images[0]].shape == (3, 32, 32) and pools.bank[images[0]].float().std() > 0


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    metrics = mm1.main(SMOKE + [f"--out_dir={out}"])
    return out, metrics


def test_smoke_loss_falls_and_outputs(smoke_run):
    out, metrics = smoke_run
    losses = [line["loss"] for line in read_log(out) if "loss" in line]
    assert losses[-1] < losses[0] - 1.0, losses
    clip = [line["clip_loss"] for line in read_log(out) if line.get("stage") == 0]  # stage 0: tiny CLIP for the ViT
    assert len(clip) == 12 and np.mean(clip[-3:]) < min(np.mean(clip[:3]) - 0.3, np.log(16) - 0.2), clip  # chance: ln 16
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("caption_cider_0shot", "vqa_acc_2shot", "average_2shot", "text_ppl"):
        assert key in saved and saved[key] == metrics[key]
    assert saved["text_ppl"] < 2048  # better than uniform over the vocabulary
    assert 1 <= saved["distinct_captions_0shot"] <= 3 and saved["constant_caption_cider"] > 0
    for name in ("config.json", "report.md", "samples.png", "model.safetensors", "optim.safetensors"):
        assert (out / name).stat().st_size > 0


def test_resume_is_exact(smoke_run, tmp_path):
    full, _ = smoke_run
    mm1.main(SMOKE + [f"--out_dir={tmp_path}", "--stop_after=15"])
    assert read_log(tmp_path)[-1]["step"] == 15
    mm1.main(SMOKE + [f"--out_dir={tmp_path}", "--resume=True"])
    a, b = load_file(str(full / "model.safetensors")), load_file(str(tmp_path / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)
    assert read_log(full)[-1]["loss"] == read_log(tmp_path)[-1]["loss"]


def test_ddp_two_processes_equal_one(tmp_path):
    args = SMOKE + ["--steps=8", "--stop_after=4", "--log_every=1", "--batch_size=4", "--vit_pretrain_steps=5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for launcher, out in (([], "one"), (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"], "two")):
        proc = subprocess.run([sys.executable, *launcher, str(ROOT / "mm1.py"), *args, f"--out_dir={tmp_path / out}"],
                              env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
    one, two = ([x for x in read_log(tmp_path / d) if "loss" in x] for d in ("one", "two"))  # stage-0 lines aside
    assert [x["step"] for x in one] == [x["step"] for x in two] == [1, 2, 3, 4]
    np.testing.assert_allclose([x["loss"] for x in two], [x["loss"] for x in one], rtol=1e-5)


# ----------------------------------------------------------------------------- bad input

def run_bad(args, capsys):
    with pytest.raises(SystemExit) as e:
        mm1.main(args)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    return err


def test_bad_input_is_one_clear_line(tmp_path, capsys):
    assert "--nosuchkey" in run_bad(["--nosuchkey=1"], capsys)
    assert "--steps=abc: expected int" in run_bad(["--steps=abc"], capsys)
    assert "--connector=resnet" in run_bad(["--connector=resnet"], capsys)
    assert "--mix=1:2" in run_bad(["--mix=1:2"], capsys)
    assert "missing checkpoint" in run_bad(SMOKE + [f"--out_dir={tmp_path}", "--resume=True"], capsys)
    assert "nothere.safetensors" in run_bad(SMOKE + [f"--out_dir={tmp_path}", "--init_llm=nothere.safetensors"], capsys)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "pairs.csv").write_text("filepath,caption\nbroken.png,a red circle\n")
    err = run_bad(SMOKE + [f"--out_dir={tmp_path}", f"--train_data={tmp_path / 'pairs.csv'}"], capsys)
    assert "broken.png" in err and "cannot read image" in err


def test_help_lists_fields(capsys):
    with pytest.raises(SystemExit) as e:
        mm1.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--connector=" in out and "--mix=" in out and "avgpool" in out
