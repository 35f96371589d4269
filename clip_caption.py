"""Captions for CLIP: AltText, synthetic captions, or both? A miniature of

    "Revisit Large-Scale Image-Caption Data in Pre-training Multimodal Foundation Models"
    Lai et al. (Apple), arXiv:2410.02740

What runs, top to bottom (one file, ShapesWorld data, no downloads):
  1. A controllable captioner: small ViT + decoder trained on the "human" split, where every image has
     gold captions in every format. A control token picks the format: <|ssc|> short, <|dsc|> descriptive
     (<= 77 tokens), <|dsc+|> dense, <|afc|> AltText-fusion (the prompt also holds the image's AltText).
     Optional stage 2: a short fine-tune on the "human2" split. Measured on held-out "test" scenes: CIDEr-D
     against gold per format, object precision / recall against the scene graph (hallucination = 1 - P).
  2. The "web" split, where images only have noisy AltTexts, is captioned in SSC / DSC / AFC with batched
     KV-cache greedy decoding; results go to a JSONL cache that a killed run resumes without loss.
  3. CLIP from scratch (ViT + causal text transformer, 77-token limit, symmetric InfoNCE with a learned
     logit scale clamped at 100) once per recipe: each sample draws its text from the recipe:
     alt = AltText only; ssc30..ssc100 / dsc30..dsc100 = synthetic with p in {0.3, 0.5, 0.7, 1.0}, else
     AltText; afc = AltText-fusion captions.
  4. Eval on held-out web images: zero-shot top-1 over the emblem names (the long tail only AltTexts
     name), over shape and colour classes (prompt templates averaged); image<->text retrieval R@1 / R@5
     with human-style short (SSC) queries and text->image R@1 with descriptive (DSC) queries; a linear
     probe on frozen image features (which emblem: visual knowledge, no names). One table, rows = recipes.

Commands:
  python clip_caption.py                                  # cpu preset (default without CUDA); measured ~20 min on 2 busy cores
  python clip_caption.py --preset=smoke                   # tiny end-to-end run (what the tests run)
  python clip_caption.py --preset=gpu                     # one GPU, bf16 autocast
  torchrun --standalone --nproc_per_node=8 clip_caption.py --preset=gpu   # DDP, CLIP loss over all ranks
  python clip_caption.py --data=pairs.csv                 # your images: CSV/JSONL with filepath, caption[, alttext]
  python clip_caption.py --recipes=alt,ssc50 --clip_steps=400    # any config field: --key=value (see --help)

The table it prints (numbers in README.md / out_dir/report.md; "-" = not measurable on user data):
  | recipe | emblem top1 | shape top1 | colour top1 | I->T R@1 | I->T R@5 | T->I R@1 | T->I R@5 | T->I R@1 dsc | probe |
Writes out_dir/config.json, log.jsonl, metrics.json, report.md, recipes.png, captioner.safetensors,
clip_<recipe>.safetensors and the web caption cache (captions_<hash>.jsonl).
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import hashlib
import inspect
import json
import math
import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from data import shapes
from data.tokenizer import get_tokenizer
from kernels import attention

# ----------------------------------------------------------------------------- config


@dataclass
class Config:
    preset: str = ""  # smoke | cpu | gpu ("" = gpu with CUDA, else cpu); fields below are the cpu preset
    out_dir: str = "out/clip_caption"  # where config / logs / metrics / checkpoints / caches go
    seed: int = 0  # seeds the weights and every batch draw (batches are a function of seed and step)
    device: str = ""  # cpu | cuda | mps ("" = cuda if available)
    data: str = ""  # your image-text CSV/JSONL (filepath, caption[, alttext]): replaces the web split
    image_size: int = 32  # pixels per side of rendered images
    patch_size: int = 8  # ViT patch side in pixels
    vit_width: int = 96  # image towers (captioner and CLIP): width
    vit_layers: int = 3  # image towers: transformer layers
    vit_heads: int = 4  # image towers: attention heads
    text_width: int = 96  # CLIP text tower width
    text_layers: int = 2  # CLIP text tower layers
    text_heads: int = 4  # CLIP text tower heads
    context_length: int = 77  # CLIP text limit in tokens (longer captions are truncated, as in CLIP)
    embed_dim: int = 64  # CLIP joint embedding size
    dec_width: int = 128  # captioner decoder width
    dec_layers: int = 2  # captioner decoder layers
    dec_heads: int = 4  # captioner decoder heads
    n_human: int = 2000  # captioner stage-1 images ("human" split, gold captions in every format)
    n_human2: int = 500  # captioner stage-2 images ("human2" split)
    cap_steps: int = 800  # captioner stage-1 optimizer steps
    stage2_steps: int = 0  # captioner stage-2 fine-tune steps (0 = skip)
    cap_batch: int = 16  # captioner batch size (images, one random format each)
    cap_lr: float = 1e-3  # captioner peak learning rate
    cap_max_tokens: int = 128  # captions are cut to this many tokens for training / generation / CIDEr
    alt_tokens: int = 32  # AltText tokens the AFC prompt reads (left-padded to this length)
    n_cap_eval: int = 200  # held-out "test" scenes for the captioner's CIDEr / hallucination eval
    gen_batch: int = 256  # images per batched generation call
    n_web: int = 4000  # web images CLIP trains on (each has only its AltText + generated captions)
    n_eval: int = 500  # held-out web images for zero-shot / retrieval / probe eval
    recipes: tuple = ("alt", "ssc30", "ssc50", "ssc70", "ssc100", "dsc30", "dsc50", "dsc70", "dsc100", "afc")  # text recipes, one CLIP each
    clip_steps: int = 150  # CLIP optimizer steps per recipe
    clip_batch: int = 128  # CLIP global batch size
    clip_lr: float = 1e-3  # CLIP peak learning rate (2e-3 collapses the tiny towers to constant embeddings)
    warmup_frac: float = 0.1  # captioner: fraction of steps with linear warmup (then cosine to 10%)
    clip_warmup_frac: float = 0.3  # CLIP: fraction of steps with linear warmup
    weight_decay: float = 0.1  # AdamW decay on >= 2-D weights only
    grad_clip: float = 1.0  # max global grad norm
    log_every: int = 25  # steps between log lines
    ckpt_every: int = 200  # steps between checkpoints (and always at the end)
    compile: bool = False  # torch.compile the models (CUDA only)
    peak_tflops: float = 989.0  # accelerator bf16 peak for MFU (H100 SXM dense)


PRESETS = {
    "smoke": dict(image_size=16, patch_size=4, vit_width=32, vit_layers=1, vit_heads=2, text_width=32,
                  text_layers=1, text_heads=2, embed_dim=16, dec_width=48, dec_layers=1, dec_heads=2, n_human=16,
                  n_human2=16, cap_steps=100, stage2_steps=2, cap_batch=16, cap_lr=1e-2, cap_max_tokens=32, alt_tokens=12,
                  n_cap_eval=8, gen_batch=16, n_web=32, n_eval=24, recipes=("alt", "ssc50", "afc"),
                  clip_steps=4, clip_batch=16, log_every=20, ckpt_every=3),
    "cpu": dict(),
    "gpu": dict(image_size=64, patch_size=8, vit_width=384, vit_layers=6, vit_heads=6, text_width=384, text_layers=6,
                text_heads=6, embed_dim=256, dec_width=512, dec_layers=6, dec_heads=8, n_human=20000, n_human2=5000,
                cap_steps=4000, stage2_steps=500, cap_batch=128, cap_lr=1e-3, cap_max_tokens=200, n_cap_eval=1000,
                gen_batch=512, n_web=60000, n_eval=2000, clip_steps=3000, clip_batch=1024, clip_lr=1e-3,
                ckpt_every=1000, log_every=50, compile=True),
}
FORMATS = ("ssc", "dsc", "dsc+", "afc")  # captioner formats; CLIP recipes use ssc / dsc / afc
FIELD_HELP = dict(re.findall(r"^\s+(\w+): \w+ = .*?  # (.*)$", inspect.getsource(Config), re.M))


def parse_config(argv: list[str]) -> Config:
    """`--key=value` overrides (ast.literal_eval, type-checked against the default) on top of the preset."""
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.split("\nCommands:")[0] + "\nConfig fields (--key=value):")
        for f in dataclasses.fields(Config):
            print(f"  --{f.name}={f.default!r}  {FIELD_HELP.get(f.name, '')}")
        raise SystemExit(0)
    defaults, overrides = Config(), {}
    for arg in argv:
        key, eq, text = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not eq:
            raise SystemExit(f"bad argument {arg!r}: expected --key=value")
        if not hasattr(defaults, key):
            raise SystemExit(f"unknown config key {key!r} (python clip_caption.py --help lists them)")
        default = getattr(defaults, key)
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # bare words are strings: --device=cpu
        if isinstance(default, tuple) and isinstance(value, str | list):
            value = tuple(value.split(",")) if isinstance(value, str) else tuple(value)
        if isinstance(default, float) and type(value) is int:
            value = float(value)
        if type(value) is not type(default):
            raise SystemExit(f"--{key}={text}: expected {type(default).__name__} like {default!r}")
        overrides[key] = value
    preset = overrides.get("preset") or ("gpu" if torch.cuda.is_available() else "cpu")
    if preset not in PRESETS:
        raise SystemExit(f"--preset={preset}: expected one of {', '.join(PRESETS)}")
    cfg = Config(**{**PRESETS[preset], **overrides, "preset": preset})
    if cfg.image_size % cfg.patch_size:
        raise SystemExit(f"--image_size={cfg.image_size} is not a multiple of --patch_size={cfg.patch_size}")
    for name in cfg.recipes:
        parse_recipe(name)
    return cfg


def parse_recipe(name: str) -> tuple[str, float]:
    """'alt' -> (alt, 0.0); 'ssc30' -> (ssc, 0.3); 'dsc' / 'afc' -> (fmt, 1.0): text source and p(synthetic)."""
    match = re.fullmatch(r"(alt|ssc|dsc|afc)(\d{1,3})?", name)
    if not match or int(match.group(2) or 100) > 100:
        raise SystemExit(f"bad recipe {name!r}: expected alt, ssc<P>, dsc<P> or afc<P> with P in 0..100")
    fmt, pct = match.group(1), int(match.group(2) or 100)
    return (fmt, 0.0) if fmt == "alt" else (fmt, pct / 100)


# ----------------------------------------------------------------------------- data


@dataclass
class ImageSet:
    """Images as one uint8 tensor plus their texts; scenes only where the data is ShapesWorld."""
    images: torch.Tensor  # (N, 3, S, S) uint8
    alttexts: list[str]
    scenes: list | None = None  # list[shapes.Scene]; None for a user's files
    captions: dict | None = None  # fmt -> list[str]: gold captions (ShapesWorld) or the user's `caption` column


def render_split(split: str, start: int, n: int, cfg: Config, gold: bool) -> ImageSet:
    """Scenes split[start:start+n], rendered once and cached as .npy (rendering dominates small runs)."""
    scenes = [shapes.make_scene(split, i, seed=cfg.seed) for i in range(start, start + n)]
    # the key fingerprints the world's first scene and pixels, so a changed generator never reads stale images
    first = shapes.render(scenes[0], size=cfg.image_size).tobytes() + repr(scenes[0]).encode()
    cache = Path(cfg.out_dir) / "cache" / f"{split}_{start}_{n}_{cfg.image_size}_{hashlib.sha1(first).hexdigest()[:8]}.npy"
    if cache.exists():
        pixels = np.load(cache)
    else:
        pixels = np.stack([np.asarray(shapes.render(s, size=cfg.image_size)) for s in scenes])  # (N, S, S, 3)
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(str(cache) + ".tmp.npy", pixels)
        os.replace(str(cache) + ".tmp.npy", cache)
    alttexts = [shapes.caption(s, "alttext", seed=start + i) for i, s in enumerate(scenes)]
    captions = None
    if gold:
        captions = {f: [shapes.caption(s, f, seed=start + i) for i, s in enumerate(scenes)] for f in FORMATS}
    return ImageSet(torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), alttexts, scenes, captions)


def read_user_pairs(path: str, cfg: Config) -> ImageSet:
    """A user's CSV/JSONL (filepath, caption[, alttext]). AltText = `alttext` if given, else `caption`."""
    rows = shapes.read_image_text(path)  # raises ValueError naming the file and line on bad rows
    if len(rows) < 10:
        raise ValueError(f"{path}: {len(rows)} rows; need at least 10 image-text pairs")
    pixels = [np.asarray(shapes.load_image(row["filepath"]).resize((cfg.image_size, cfg.image_size)).convert("RGB"))
              for row in rows]  # filepath comes back resolved against the file's folder
    alttexts = [row.get("alttext") or row["caption"] for row in rows]
    images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous()
    return ImageSet(images, alttexts, None, {"caption": [row["caption"] for row in rows]})


def to_float(images: torch.Tensor, device) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> float in about [-2, 2]."""
    return (images.to(device).float() / 255.0 - 0.5) / 0.25


class Texts:
    """Tokenization shared by both models: `<|endoftext|>` ends a text, `<|pad|>` fills batches."""

    def __init__(self):
        self.enc = get_tokenizer()
        self.eot, self.pad = self.enc.encode_single_token("<|endoftext|>"), self.enc.encode_single_token("<|pad|>")
        self.alt = self.enc.encode_single_token("<|alt|>")
        self.control = {f: self.enc.encode_single_token(f"<|{f}|>") for f in FORMATS}

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)  # user text never produces control tokens

    def clip_batch(self, texts: list[str], context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) ids, each truncated to context_length - 1 tokens + <|endoftext|>; and (B,) lengths."""
        ids = [self.encode(t)[: context_length - 1] + [self.eot] for t in texts]
        return self.pad_right(ids), torch.tensor([len(x) for x in ids])

    def pad_right(self, seqs: list[list[int]], fill: int | None = None) -> torch.Tensor:
        width = max(len(s) for s in seqs)
        out = torch.full((len(seqs), width), self.pad if fill is None else fill, dtype=torch.long)
        for i, s in enumerate(seqs):
            out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        return out

    def prompt(self, fmt: str, alttext: str, alt_tokens: int) -> list[int]:
        """The captioner's text prompt: [<|dsc|>], or for AFC [pads..., <|alt|>, alttext..., <|afc|>] of fixed length."""
        if fmt != "afc":
            return [self.control[fmt]]
        alt = self.encode(alttext)[:alt_tokens]
        return [self.pad] * (alt_tokens - len(alt)) + [self.alt] + alt + [self.control["afc"]]


# ----------------------------------------------------------------------------- model


class Attention(nn.Module):
    """Multi-head self-attention (HF CLIPAttention parameter names) on kernels.attention, with a KV cache."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj = nn.Linear(width, width), nn.Linear(width, width)
        self.v_proj, self.out_proj = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x, causal: bool, cache: dict | None = None):
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, H, T, D)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        if cache is not None:  # generation: keep keys / values of every position seen so far
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
        # one new query attends to the whole cache: no mask needed; a prefill is square and causal
        y = attention(q, k, v, causal=causal and T > 1)  # (B, H, T, D)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class EncoderLayer(nn.Module):
    """Pre-LN transformer block (HF CLIPEncoderLayer names), used by all three towers."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.self_attn = Attention(width, heads)
        self.mlp = nn.Sequential()  # names fc1 / fc2 as in HF CLIPMLP
        self.mlp.fc1, self.mlp.act, self.mlp.fc2 = nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)

    def forward(self, x, causal: bool = False, cache: dict | None = None):
        x = x + self.self_attn(self.layer_norm1(x), causal, cache)
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(width, heads) for _ in range(layers))

    def forward(self, x, causal: bool = False, caches: list | None = None):
        for i, layer in enumerate(self.layers):
            x = layer(x, causal, caches[i] if caches is not None else None)
        return x


class Embeddings(nn.Module):
    """ViT patch + class + position embeddings (HF CLIPVisionEmbeddings names)."""

    def __init__(self, cfg: Config):
        super().__init__()
        n_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.patch_embedding = nn.Conv2d(3, cfg.vit_width, cfg.patch_size, cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(cfg.vit_width) * 0.02)
        self.position_embedding = nn.Embedding(n_patches + 1, cfg.vit_width)

    def forward(self, images):
        x = self.patch_embedding(images).flatten(2).transpose(1, 2)  # (B, P, C)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)  # (B, 1, C)
        return torch.cat([cls, x], 1) + self.position_embedding.weight  # (B, 1 + P, C)


class VisionTransformer(nn.Module):
    """CLIP-style ViT (HF CLIPVisionTransformer names): returns all tokens and the pooled CLS token."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.vit_width)  # sic: HF's spelling
        self.encoder = Encoder(cfg.vit_width, cfg.vit_layers, cfg.vit_heads)
        self.post_layernorm = nn.LayerNorm(cfg.vit_width)

    def forward(self, images):
        hidden = self.post_layernorm(self.encoder(self.pre_layrnorm(self.embeddings(images))))  # (B, 1 + P, C)
        return hidden, hidden[:, 0]  # all tokens (the captioner's prefix), pooled CLS (CLIP; = HF pooler_output)


class TextTransformer(nn.Module):
    """CLIP text tower (HF CLIPTextTransformer names): causal, pooled at each text's <|endoftext|>."""

    def __init__(self, cfg: Config, vocab_size: int):
        super().__init__()
        self.embeddings = nn.Module()
        self.embeddings.token_embedding = nn.Embedding(vocab_size, cfg.text_width)
        self.embeddings.position_embedding = nn.Embedding(cfg.context_length, cfg.text_width)
        self.encoder = Encoder(cfg.text_width, cfg.text_layers, cfg.text_heads)
        self.final_layer_norm = nn.LayerNorm(cfg.text_width)

    def forward(self, ids, lengths):
        T = ids.shape[1]
        x = self.embeddings.token_embedding(ids) + self.embeddings.position_embedding.weight[:T]  # (B, T, C)
        x = self.final_layer_norm(self.encoder(x, causal=True))  # (B, T, C)
        return x[torch.arange(len(ids), device=ids.device), lengths.to(ids.device) - 1]  # (B, C) at <|endoftext|>


def init_weights(module: nn.Module):
    """GPT-2 / CLIP-style init: N(0, 0.02) for linear and embedding weights, zero biases. (PyTorch's default
    N(0, 1) embeddings would let position embeddings drown the image signal of a fresh ViT.)"""
    for m in module.modules():
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


class CLIP(nn.Module):
    """Two towers and a learned temperature (HF CLIPModel names; logit_scale stores log(1/temperature))."""

    def __init__(self, cfg: Config, vocab_size: int):
        super().__init__()
        self.vision_model, self.text_model = VisionTransformer(cfg), TextTransformer(cfg, vocab_size)
        self.visual_projection = nn.Linear(cfg.vit_width, cfg.embed_dim, bias=False)
        self.text_projection = nn.Linear(cfg.text_width, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        init_weights(self)

    def encode_image(self, images):
        return F.normalize(self.visual_projection(self.vision_model(images)[1]), dim=-1)  # (B, E)

    def encode_text(self, ids, lengths):
        return F.normalize(self.text_projection(self.text_model(ids, lengths)), dim=-1)  # (B, E)

    def forward(self, images, ids, lengths):
        return self.encode_image(images), self.encode_text(ids, lengths), self.logit_scale


class Captioner(nn.Module):
    """ViT -> linear connector -> causal decoder over [image tokens, prompt, caption] (prefix-LM captioner).
    The mean image token is also added to every text embedding: a direct path that makes a tiny decoder
    use the image sooner (through attention alone it first learns the captions' language, then the image)."""

    def __init__(self, cfg: Config, vocab_size: int):
        super().__init__()
        n_image = (cfg.image_size // cfg.patch_size) ** 2 + 1
        self.vision_model = VisionTransformer(cfg)
        self.connector = nn.Linear(cfg.vit_width, cfg.dec_width)
        self.embed_tokens = nn.Embedding(vocab_size, cfg.dec_width)
        self.position_embedding = nn.Embedding(n_image + cfg.alt_tokens + 3 + cfg.cap_max_tokens, cfg.dec_width)
        self.decoder = Encoder(cfg.dec_width, cfg.dec_layers, cfg.dec_heads)
        self.norm = nn.LayerNorm(cfg.dec_width)
        self.lm_head = nn.Linear(cfg.dec_width, vocab_size, bias=False)
        init_weights(self)

    def forward(self, images, ids, caches: list | None = None, start: int = 0):
        """Logits (B, T, V) for the text positions. With images: prefix them (training / prefill);
        without: continue from `caches` at position `start` (one decode step)."""
        if images is not None:
            prefix = self.connector(self.vision_model(images)[0])  # (B, 1 + P, C)
            summary = prefix.mean(1, keepdim=True)  # (B, 1, C)
            if caches is not None:
                caches[0]["image"] = summary  # decode steps add it too
            x = torch.cat([prefix, self.embed_tokens(ids) + summary], 1)  # (B, 1 + P + T, C)
        else:
            x = self.embed_tokens(ids) + caches[0]["image"]  # (B, T, C)
        x = x + self.position_embedding.weight[start: start + x.shape[1]]
        x = self.decoder(x, causal=True, caches=caches)
        return self.lm_head(self.norm(x[:, x.shape[1] - ids.shape[1]:]))  # (B, T, V)


# ----------------------------------------------------------------------------- losses


def clip_loss(image_emb, text_emb, logit_scale):
    """Symmetric InfoNCE (CLIP, Radford et al. 2021, eq. of Fig. 3; the paper's CLIP objective):
    L = (CE(s * I T^T, diag) + CE(s * T I^T, diag)) / 2 with s = exp(logit_scale) clamped at 100 (open_clip).
    Embeddings are L2-normalised rows; computed in fp32."""
    scale = logit_scale.float().exp().clamp(max=100.0)
    logits = scale * image_emb.float() @ text_emb.float().t()  # (B, B)
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def caption_loss(logits, targets, ignore: int = -100):
    """Next-token cross-entropy on caption tokens only (the captioner's autoregressive objective), fp32."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=ignore)


# ----------------------------------------------------------------------------- metrics


def tokenize_words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def cider_d(candidates: list[str], references: list[list[str]], n: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D (Vedantam et al. 2015) exactly as pycocoevalcap computes it: tf-idf n-gram vectors (idf over
    the references of this set), clipped cosine per n, Gaussian length penalty, mean over n, x10.
    (pycocoevalcap measures "length" in bigrams; kept for parity.)"""
    def ngram_counts(words):
        return Counter(tuple(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))

    cands = [ngram_counts(tokenize_words(c)) for c in candidates]
    refs = [[ngram_counts(tokenize_words(r)) for r in rs] for rs in references]
    doc_freq = Counter(g for rs in refs for g in set().union(*rs))
    log_n_docs = math.log(len(refs))

    def vectorize(counts):
        vec, norm = [{} for _ in range(n)], [0.0] * n
        for gram, tf in counts.items():
            vec[len(gram) - 1][gram] = tf * (log_n_docs - math.log(max(1.0, doc_freq[gram])))
            norm[len(gram) - 1] += vec[len(gram) - 1][gram] ** 2
        return vec, [math.sqrt(x) for x in norm], sum(tf for g, tf in counts.items() if len(g) == 2)

    scores = []
    for cand, rs in zip(cands, refs):
        vc, nc, lc = vectorize(cand)
        total = 0.0
        for r in rs:
            vr, nr, lr = vectorize(r)
            for k in range(n):
                dot = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vc[k].items())
                cos = dot / (nc[k] * nr[k]) if nc[k] and nr[k] else dot
                total += cos * math.exp(-((lc - lr) ** 2) / (2 * sigma ** 2)) / n
        scores.append(10.0 * total / len(rs))
    return float(np.mean(scores))


def object_mentions(text: str) -> list[tuple[str | None, str]]:
    """(colour or None, shape) for each shape word in the text, colour = a colour word up to 2 words before
    ("a large red circle", "the red circle badge"); glyph descriptions are not objects."""
    words = tokenize_words(text)
    singular = {s + suffix: s for s in shapes.SHAPES for suffix in ("", "s", "es")}
    out = []
    for i, w in enumerate(words):
        if w in singular and "pattern" not in words[max(0, i - 4): i]:  # "a pattern of 10 white squares" is a glyph
            before = [w for w in reversed(words[max(0, i - 2): i])]
            before = before[: next((j for j, b in enumerate(before) if b in singular), len(before))]  # not past a shape
            colour = next((c for c in before if c in shapes.COLORS), None)
            out.append((colour, singular[w]))
    return out


def object_precision_recall(text: str, scene) -> tuple[float, float, int]:
    """Precision: mentioned (colour, shape) that exist in the scene; recall: scene objects mentioned.
    1 - precision is the caption's hallucination rate (CHAIR-style, against the scene graph)."""
    present = {(o.color, o.shape) for o in scene.objects}
    mentions = object_mentions(text)
    correct = [any(s == shape and (c is None or c == colour) for colour, shape in present) for c, s in mentions]
    found = [any(s == shape and c in (None, colour) for c, s in mentions) for colour, shape in present]
    return (sum(correct) / len(mentions) if mentions else 1.0), (sum(found) / max(1, len(found))), len(mentions)


def retrieval_recall(similarity: torch.Tensor, text_to_image: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """Image<->text recall@k. similarity (N_img, N_txt); text j describes image text_to_image[j].
    I->T: an image hits if any of its texts ranks in the top k; T->I: a text hits if its image does."""
    out = {}
    ranked_texts = similarity.argsort(dim=1, descending=True)  # (N_img, N_txt)
    ranked_images = similarity.t().argsort(dim=1, descending=True)  # (N_txt, N_img)
    own_image = text_to_image[ranked_texts]  # (N_img, N_txt): image of each ranked text
    for k in ks:
        hit_i2t = (own_image[:, :k] == torch.arange(len(similarity))[:, None]).any(1)
        hit_t2i = (ranked_images[:, :k] == text_to_image[:, None]).any(1)
        out[f"I->T R@{k}"], out[f"T->I R@{k}"] = hit_i2t.float().mean().item(), hit_t2i.float().mean().item()
    return out


def zero_shot_accuracy(image_emb, class_emb, labels) -> float:
    """Top-1 of argmax cosine over classes. class_emb (K, E): mean of each class's prompt-template
    embeddings, renormalised; labels (N,) class ids, or (N, K) bool when several classes are correct."""
    pred = (image_emb @ F.normalize(class_emb, dim=-1).t()).argmax(1)  # (N,)
    hit = labels[torch.arange(len(pred)), pred] if labels.dim() == 2 else pred == labels
    return hit.float().mean().item()


def linear_probe(train_x, train_y, test_x, test_y, n_classes: int, l2: float = 1e-3, iters: int = 100) -> float:
    """Multinomial logistic regression on frozen, standardised features (L-BFGS); test top-1."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    weight = torch.zeros(train_x.shape[1], n_classes, requires_grad=True)
    bias = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(train_x @ weight + bias, train_y) + l2 * weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return ((test_x @ weight + bias).argmax(1) == test_y).float().mean().item()


# ----------------------------------------------------------------------------- training


def dist_info() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def setup_device(cfg: Config) -> torch.device:
    """Picks the device; under torchrun (RANK set) joins the process group (NCCL on CUDA, else gloo)."""
    rank, world = dist_info()
    name = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device={cfg.device}: CUDA is not available here")
    if world > 1:
        torch.distributed.init_process_group("nccl" if name.startswith("cuda") else "gloo")
        if name.startswith("cuda"):
            name = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(name)
    return torch.device(name)


def barrier():
    if dist_info()[1] > 1:
        torch.distributed.barrier()


def batch_indices(n: int, batch: int, step: int, seed: int) -> torch.Tensor:
    """Positions step*batch .. of an endless stream of epochs, each a fresh permutation of range(n).
    A pure function of (n, batch, step, seed), so a resumed run sees exactly the batches it would have."""
    positions = range(step * batch, (step + 1) * batch)
    perms = {e: torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + e))
             for e in {p // n for p in positions}}
    rank, world = dist_info()
    return torch.stack([perms[p // n][p % n] for p in positions])[rank::world]  # this rank's shard


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; decay only on matrices / embeddings (>= 2-D), never on biases, norms, logit_scale."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)


def lr_at(step: int, steps: int, peak: float, warmup_frac: float) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    warmup = max(1, int(warmup_frac * steps))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


ARCH_KEYS = ("image_size", "patch_size", "vit_width", "vit_layers", "vit_heads", "text_width", "text_layers",
             "text_heads", "context_length", "embed_dim", "dec_width", "dec_layers", "dec_heads", "cap_max_tokens",
             "alt_tokens")


def save_checkpoint(path: Path, model: nn.Module, optimizer, step: int, cfg: Config):
    """Weights + AdamW state + step in one safetensors file, written to a tmp file then renamed (atomic)."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for i, state in optimizer.state_dict()["state"].items():
        tensors.update({f"optim.{i}.{name}": v.detach().cpu().contiguous() for name, v in state.items()})
    tmp = Path(f"{path}.tmp")
    save_file(tensors, tmp, metadata={"config": json.dumps(dataclasses.asdict(cfg)), "step": str(step)})
    os.replace(tmp, path)


def load_checkpoint(path: Path, model: nn.Module, optimizer=None, cfg: Config | None = None, keys=ARCH_KEYS) -> int:
    """Restores weights (and optimizer state); checks that the saved config agrees with `cfg` on `keys`."""
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    saved = json.loads(meta.get("config", "{}"))
    if cfg is not None:
        bad = [f"{k}={saved.get(k)!r} (run: {getattr(cfg, k)!r})" for k in keys if saved.get(k) != getattr(cfg, k)]
        if bad:
            raise ValueError(f"{path}: checkpoint config differs: {', '.join(bad)}; use another --out_dir")
    tensors = load_file(str(path))
    weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: missing {missing[:5]} / unexpected {unexpected[:5]} weights")
    if optimizer is not None:
        state = optimizer.state_dict()
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, i, name = key.split(".", 2)
                state["state"].setdefault(int(i), {})[name] = value
        optimizer.load_state_dict(state)
    return int(meta.get("step", 0))


class Logger:
    """One JSON object per line in log.jsonl (rank 0), echoed above the progress bar."""

    def __init__(self, path: Path):
        self.path, self.rank = path, dist_info()[0]

    def __call__(self, **record):
        if self.rank == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))


def train(model: nn.Module, step_loss, steps: int, lr: float, cfg: Config, ckpt: Path, name: str, log, device,
          keys=ARCH_KEYS, warmup_frac: float | None = None):
    """Generic loop. step_loss(runner, step) -> (loss, items, flops) for this rank's shard of batch `step`.
    Resumes from `ckpt` if present (weights, AdamW state, step; batches depend only on the step)."""
    optimizer = make_optimizer(model, lr, cfg.weight_decay)
    start = load_checkpoint(ckpt, model, optimizer, cfg, keys) if ckpt.exists() else 0
    rank, world = dist_info()
    runner = torch.compile(model) if cfg.compile and device.type == "cuda" else model
    if world > 1:
        runner = nn.parallel.DistributedDataParallel(runner, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    model.train()
    t0, items, flops = time.time(), 0, 0.0
    for step in tqdm(range(start, steps), desc=name, disable=rank != 0, leave=False):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, cfg.warmup_frac if warmup_frac is None else warmup_frac)
        with autocast:
            loss, n_items, n_flops = step_loss(runner, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        items, flops = items + n_items, flops + n_flops
        if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.time() - t0
            record = dict(run=name, step=step + 1, loss=loss.item(), lr=group["lr"], grad_norm=grad_norm.item(),
                          items_per_s=items * world / dt)
            if device.type == "cuda":  # 6 * params * tokens per rank, attention FLOPs left out
                record["mfu"] = flops / dt / (cfg.peak_tflops * 1e12)
            log(**record)
            t0, items, flops = time.time(), 0, 0.0
        if rank == 0 and ((step + 1) % cfg.ckpt_every == 0 or step + 1 == steps):
            save_checkpoint(ckpt, model, optimizer, step + 1, cfg)
    return model


# ----------------------------------------------------------------------------- captioner: train, generate, evaluate


def train_captioner(data: ImageSet, cfg: Config, texts: Texts, device, log, steps: int, ckpt: Path,
                    name: str, model: Captioner | None = None) -> Captioner:
    """Each sample: one image, one random format, its gold caption; loss on the caption tokens only.
    Stage 2 (`model` given) fine-tunes at a quarter of the peak learning rate."""
    lr = cfg.cap_lr if model is None else cfg.cap_lr / 4
    if model is None:
        torch.manual_seed(cfg.seed)
        model = Captioner(cfg, texts.enc.n_vocab).to(device)
    gold = {f: [texts.encode(c)[: cfg.cap_max_tokens] + [texts.eot] for c in data.captions[f]] for f in FORMATS}
    n_params = sum(p.numel() for p in model.parameters())

    def step_loss(runner, step):
        idx = batch_indices(len(data.images), cfg.cap_batch, step, cfg.seed)
        fmts = torch.randint(len(FORMATS), (cfg.cap_batch,), generator=torch.Generator().manual_seed(cfg.seed + step))
        fmts = fmts[dist_info()[0]:: dist_info()[1]]  # this rank's shard, like idx
        prompts = [texts.prompt(FORMATS[f], data.alttexts[i], cfg.alt_tokens) for i, f in zip(idx.tolist(), fmts.tolist())]
        seqs = [p + gold[FORMATS[f]][i] for p, i, f in zip(prompts, idx.tolist(), fmts.tolist())]
        ids = texts.pad_right(seqs)  # (B, T)
        targets = texts.pad_right([[-100] * (len(p) - 1) + s[len(p):] for p, s in zip(prompts, seqs)], fill=-100)
        logits = runner(to_float(data.images[idx], device), ids[:, :-1].to(device))  # (B, T-1, V)
        tokens = len(idx) * ((cfg.image_size // cfg.patch_size) ** 2 + ids.shape[1])
        return caption_loss(logits, targets[:, : ids.shape[1] - 1].to(device)), len(idx), 6.0 * n_params * tokens

    return train(model, step_loss, steps, lr, cfg, ckpt, name, log, device, ARCH_KEYS + ("seed", "n_human"))


@torch.no_grad()
def generate(model: Captioner, images: torch.Tensor, prompts: list[list[int]], cfg: Config, texts: Texts, device):
    """Greedy decoding with a KV cache: one prefill over [image, prompt], then one token per step.
    All prompts of a call have the same length, so the batch needs no padding."""
    model.eval()
    caches = [{} for _ in model.decoder.layers]
    logits = model(to_float(images, device), torch.tensor(prompts, device=device), caches)  # prefill
    position = caches[0]["k"].shape[2]
    out = torch.full((len(prompts), cfg.cap_max_tokens), texts.eot, dtype=torch.long)
    done = torch.zeros(len(prompts), dtype=torch.bool)
    for t in range(cfg.cap_max_tokens):
        next_id = logits[:, -1].float().argmax(-1).cpu()  # (B,)
        out[:, t] = torch.where(done, texts.eot, next_id)
        done |= next_id == texts.eot
        if done.all() or t + 1 == cfg.cap_max_tokens:
            break
        logits = model(None, next_id[:, None].to(device), caches, start=position + t)  # (B, 1, V)
    return [texts.enc.decode(row[: row.index(texts.eot)] if texts.eot in row else row) for row in out.tolist()]


def caption_images(model: Captioner, data: ImageSet, fmts, path: Path, cfg: Config, texts: Texts, device):
    """Captions every image of `data` in every format of `fmts`, as {fmt: [caption per image]}.
    Each finished batch is appended to the JSONL cache at `path` and fsync'ed: a killed run loses at most
    the batch in flight, and the next run generates only what is missing."""
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
                done[(row["fmt"], row["index"])] = row["caption"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut short by a kill: its batch is generated again
    with open(path, "a") as f:
        if path.stat().st_size and not path.read_bytes().endswith(b"\n"):
            f.write("\n")  # never glue a new record onto a cut one
        for fmt in fmts:
            todo = [i for i in range(len(data.images)) if (fmt, i) not in done]
            for start in tqdm(range(0, len(todo), cfg.gen_batch), desc=f"caption {fmt}", leave=False):
                batch = todo[start: start + cfg.gen_batch]
                prompts = [texts.prompt(fmt, data.alttexts[i], cfg.alt_tokens) for i in batch]
                captions = generate(model, data.images[batch], prompts, cfg, texts, device)
                f.write("".join(json.dumps({"index": i, "fmt": fmt, "caption": c}) + "\n" for i, c in zip(batch, captions)))
                f.flush()
                os.fsync(f.fileno())
                done.update({(fmt, i): c for i, c in zip(batch, captions)})
    return {fmt: [done[(fmt, i)] for i in range(len(data.images))] for fmt in fmts}


def evaluate_captioner(model: Captioner, data: ImageSet, cfg: Config, texts: Texts, device) -> tuple[dict, dict]:
    """Per format: CIDEr-D vs the gold caption, object precision / recall vs the scene graph, hallucination
    rate, mean length (generated vs gold tokens) and the share of scene emblems named in the caption."""
    generated = {f: [] for f in FORMATS}
    for start in range(0, len(data.images), cfg.gen_batch):
        batch = list(range(start, min(start + cfg.gen_batch, len(data.images))))
        for f in FORMATS:
            prompts = [texts.prompt(f, data.alttexts[i], cfg.alt_tokens) for i in batch]
            generated[f] += generate(model, data.images[batch], prompts, cfg, texts, device)
    metrics = {}
    for f in FORMATS:
        pr = [object_precision_recall(c, s) for c, s in zip(generated[f], data.scenes)]
        n_mentions = sum(m for _, _, m in pr)  # micro-average over mentions; no mention = nothing to judge
        precision = sum(p * m for p, _, m in pr) / n_mentions if n_mentions else None
        emblems = [(shapes.EMBLEMS[o.emblem], c) for c, s in zip(generated[f], data.scenes) for o in s.objects
                   if o.emblem is not None]
        gold = [texts.enc.decode(texts.encode(c)[: cfg.cap_max_tokens]) for c in data.captions[f]]  # as trained
        metrics[f] = {"CIDEr-D": cider_d(generated[f], [[g] for g in gold]),
                      "obj P": precision, "obj R": float(np.mean([r for _, r, _ in pr])),
                      "halluc.": None if precision is None else 1 - precision,
                      "tokens": float(np.mean([len(texts.encode(c)) for c in generated[f]])),
                      "gold tokens": float(np.mean([len(texts.encode(c)) for c in data.captions[f]])),  # uncut
                      "names": float(np.mean([n in c for n, c in emblems])) if emblems else 0.0}
    return metrics, generated


# ----------------------------------------------------------------------------- CLIP: recipes, training, eval


def train_clip(recipe: str, data: ImageSet, synthetic: dict, cfg: Config, texts: Texts, device, log) -> CLIP:
    """One CLIP per recipe, same init and same image order: only the text each image is paired with differs."""
    fmt, p_synthetic = parse_recipe(recipe)
    torch.manual_seed(cfg.seed)
    model = CLIP(cfg, texts.enc.n_vocab).to(device)
    n_vision = sum(p.numel() for p in model.vision_model.parameters())
    n_text = sum(p.numel() for p in model.text_model.parameters())
    n_image_tokens = (cfg.image_size // cfg.patch_size) ** 2 + 1

    def step_loss(runner, step):
        idx = batch_indices(len(data.images), cfg.clip_batch, step, cfg.seed)
        coins = torch.rand(cfg.clip_batch, generator=torch.Generator().manual_seed(cfg.seed + 104729 * step))
        coins = coins[dist_info()[0]:: dist_info()[1]]
        chosen = [synthetic[fmt][i] if c < p_synthetic else data.alttexts[i] for i, c in zip(idx.tolist(), coins.tolist())]
        ids, lengths = texts.clip_batch(chosen, cfg.context_length)
        image_emb, text_emb, logit_scale = runner(to_float(data.images[idx], device), ids.to(device), lengths)
        if dist_info()[1] > 1:  # contrast against every rank's batch; gradients flow through the gather
            from torch.distributed.nn.functional import all_gather
            image_emb, text_emb = torch.cat(all_gather(image_emb)), torch.cat(all_gather(text_emb))
        flops = 6.0 * (n_vision * len(idx) * n_image_tokens + n_text * ids.numel())
        return clip_loss(image_emb, text_emb, logit_scale), len(idx), flops

    return train(model, step_loss, cfg.clip_steps, cfg.clip_lr, cfg, Path(cfg.out_dir) / f"clip_{recipe}.safetensors",
                 f"clip_{recipe}", log, device, ARCH_KEYS + ("seed", "data", "n_web"), cfg.clip_warmup_frac)


# Zero-shot prompt templates (averaged per class, as in CLIP's ImageNet eval).
EMBLEM_TEMPLATES = ("{}", "the {} emblem", "a photo of the {} emblem.", "{} logo")
SHAPE_TEMPLATES = ("a {}.", "a photo of a {}.", "a {} shape on a background.")
COLOUR_TEMPLATES = ("a {} shape.", "a photo of a {} object.", "something {}.")


@dataclass
class EvalSet:
    images: torch.Tensor  # (N, 3, S, S) uint8
    queries: list[str]  # short human-style queries, one per image
    long_queries: list[str] | None = None  # descriptive (DSC) queries
    emblem_labels: torch.Tensor | None = None  # (N, K) bool: emblems in the image
    shape_labels: torch.Tensor | None = None  # (N,) main (largest) object's shape
    colour_labels: torch.Tensor | None = None  # (N,) main object's colour


def main_object(scene):
    return max(scene.objects, key=lambda o: (o.box[2] - o.box[0]) * (o.box[3] - o.box[1]))


def make_eval_set(data: ImageSet) -> EvalSet:
    if data.scenes is None:  # a user's file: retrieval with their captions only
        return EvalSet(data.images, data.captions["caption"])
    emblems = torch.zeros(len(data.scenes), len(shapes.EMBLEMS), dtype=torch.bool)
    for n, scene in enumerate(data.scenes):
        for o in scene.objects:
            if o.emblem is not None:
                emblems[n, o.emblem] = True
    mains = [main_object(s) for s in data.scenes]
    return EvalSet(data.images, data.captions["ssc"], data.captions["dsc"], emblems,
                   torch.tensor([shapes.SHAPES.index(o.shape) for o in mains]),
                   torch.tensor([shapes.COLORS.index(o.color) for o in mains]))


@torch.no_grad()
def embed_images(model: CLIP, images, device, batch: int = 512):
    """(N, E) normalised embeddings and (N, C) pooled pre-projection features (for the probe)."""
    model.eval()
    embs, feats = [], []
    for i in range(0, len(images), batch):
        pooled = model.vision_model(to_float(images[i: i + batch], device))[1].float()
        feats.append(pooled.cpu())
        embs.append(F.normalize(model.visual_projection(pooled.to(model.visual_projection.weight.dtype)), dim=-1).float().cpu())
    return torch.cat(embs), torch.cat(feats)


@torch.no_grad()
def embed_texts(model: CLIP, strings: list[str], texts: Texts, cfg: Config, device, batch: int = 512):
    model.eval()
    out = []
    for i in range(0, len(strings), batch):
        ids, lengths = texts.clip_batch(strings[i: i + batch], cfg.context_length)
        out.append(model.encode_text(ids.to(device), lengths).float().cpu())
    return torch.cat(out)


def class_embeddings(model, names, templates, texts, cfg, device):
    """(K, E): each class's template embeddings averaged."""
    emb = embed_texts(model, [t.format(n) for n in names for t in templates], texts, cfg, device)
    return emb.view(len(names), len(templates), -1).mean(1)


def evaluate_clip(model: CLIP, ev: EvalSet, probe_train: tuple, cfg: Config, texts: Texts, device) -> dict:
    """The table's columns for one CLIP ("-" columns are None on a user's data)."""
    image_emb, feats = embed_images(model, ev.images, device)
    n = len(ev.images)
    sim = image_emb @ embed_texts(model, ev.queries, texts, cfg, device).t()  # (N, N)
    row = retrieval_recall(sim, torch.arange(n))
    row.update({"emblem top1": None, "shape top1": None, "colour top1": None, "T->I R@1 dsc": None, "probe": None})
    if ev.emblem_labels is not None:
        has = ev.emblem_labels.any(1)
        row["emblem top1"] = zero_shot_accuracy(image_emb[has], class_embeddings(
            model, shapes.EMBLEMS, EMBLEM_TEMPLATES, texts, cfg, device), ev.emblem_labels[has])
        row["shape top1"] = zero_shot_accuracy(image_emb, class_embeddings(
            model, shapes.SHAPES, SHAPE_TEMPLATES, texts, cfg, device), ev.shape_labels)
        row["colour top1"] = zero_shot_accuracy(image_emb, class_embeddings(
            model, shapes.COLORS, COLOUR_TEMPLATES, texts, cfg, device), ev.colour_labels)
        long_sim = image_emb @ embed_texts(model, ev.long_queries, texts, cfg, device).t()
        row["T->I R@1 dsc"] = retrieval_recall(long_sim, torch.arange(n), ks=(1,))["T->I R@1"]
        train_images, train_labels = probe_train
        train_feats = embed_images(model, train_images, device)[1]
        row["probe"] = linear_probe(train_feats, train_labels, feats[has], ev.emblem_labels[has].float().argmax(1),
                                    len(shapes.EMBLEMS))
    return row


# ----------------------------------------------------------------------------- report

COLUMNS = ("emblem top1", "shape top1", "colour top1", "I->T R@1", "I->T R@5", "T->I R@1", "T->I R@5",
           "T->I R@1 dsc", "probe")
CAPTION_COLUMNS = ("CIDEr-D", "obj P", "obj R", "halluc.", "tokens", "gold tokens", "names")


def markdown_table(first: str, rows: dict, columns) -> str:
    fmt = lambda v: "-" if v is None else f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    lines = [f"| {first} | " + " | ".join(columns) + " |", "|" + " --- |" * (len(columns) + 1)]
    return "\n".join(lines + [f"| {name} | " + " | ".join(fmt(row[c]) for c in columns) + " |" for name, row in rows.items()])


def beats(a: float, b: float, n: int) -> str:
    """YES / NO when accuracies a, b on n items differ by more than 2 standard errors, else 'within noise'."""
    if abs(a - b) <= 2 * math.sqrt((a * (1 - a) + b * (1 - b)) / max(1, n)):
        return "within noise"
    return "YES" if a > b else "NO"


def findings(rows: dict, n_images: int, n_emblem: int) -> list[str]:
    """The paper's three CLIP findings, checked on this run's numbers, with a 2-standard-error noise check
    (n_images eval images, n_emblem of them with an emblem)."""
    retrieval = lambda r: (r["I->T R@1"] + r["T->I R@1"]) / 2  # over 2 * n_images queries
    out = []
    if not rows or next(iter(rows.values()))["emblem top1"] is None:
        return out
    for fmt in ("ssc", "dsc"):
        hybrids = {k: v for k, v in rows.items() if parse_recipe(k)[0] == fmt and 0 < parse_recipe(k)[1] < 1}
        only = next((v for k, v in rows.items() if parse_recipe(k) == (fmt, 1.0)), None)
        if hybrids and only:
            best = max(hybrids, key=lambda k: retrieval(hybrids[k]) + hybrids[k]["emblem top1"])
            out.append(f"hybrid beats {fmt}-only (best hybrid {best}): retrieval R@1 {retrieval(hybrids[best]):.3f} vs "
                       f"{retrieval(only):.3f} -> {beats(retrieval(hybrids[best]), retrieval(only), 2 * n_images)}; "
                       f"emblem top1 {hybrids[best]['emblem top1']:.3f} vs {only['emblem top1']:.3f} -> "
                       f"{beats(hybrids[best]['emblem top1'], only['emblem top1'], n_emblem)}")
    for s, d in [(k, f"dsc{k[3:]}") for k in rows if k.startswith("ssc") and f"dsc{k[3:]}" in rows]:
        out.append(f"short captions suit CLIP ({s} vs {d}, short-query retrieval R@1): {retrieval(rows[s]):.3f} vs "
                   f"{retrieval(rows[d]):.3f} -> {beats(retrieval(rows[s]), retrieval(rows[d]), 2 * n_images)}")
    for k in [k for k in rows if parse_recipe(k)[1] == 1.0 and k[:3] in ("ssc", "dsc")] if "alt" in rows else []:
        out.append(f"AltText carries the long tail (alt vs {k}, emblem top1): {rows['alt']['emblem top1']:.3f} vs "
                   f"{rows[k]['emblem top1']:.3f} -> {beats(rows['alt']['emblem top1'], rows[k]['emblem top1'], n_emblem)}")
    return out


def plot_recipes(rows: dict, path: Path):
    """Emblem zero-shot and short-query retrieval vs p(synthetic) for SSC and DSC mixes (p=0 is AltText)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    metrics = {"emblem top1 (long tail)": lambda r: r["emblem top1"],
               "retrieval R@1 (mean I->T, T->I)": lambda r: (r["I->T R@1"] + r["T->I R@1"]) / 2,
               "shape + colour top1 (mean)": lambda r: (r["shape top1"] + r["colour top1"]) / 2}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (title, metric) in zip(axes, metrics.items()):
        for fmt, colour in (("ssc", "tab:blue"), ("dsc", "tab:orange")):
            points = sorted((parse_recipe(k)[1], metric(v)) for k, v in rows.items() if parse_recipe(k)[0] in (fmt, "alt"))
            if points:
                ax.plot(*zip(*points), "o-", color=colour, label=f"{fmt.upper()} + AltText")
        for k, v in rows.items():
            if parse_recipe(k)[0] == "afc":
                ax.plot([parse_recipe(k)[1]], [metric(v)], "*", ms=12, color="tab:green", label=k.upper())
        ax.set(title=title, xlabel="p(synthetic caption)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(cfg: Config, cap_metrics: dict | None, samples: list, rows: dict, timings: dict, ev: EvalSet):
    out = Path(cfg.out_dir)
    n_emblem = int(ev.emblem_labels.any(1).sum()) if ev.emblem_labels is not None else 0
    verdict = findings(rows, len(ev.images), n_emblem)
    metrics = {"captioner": cap_metrics, "clip": rows, "findings": verdict, "timings_s": timings}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    clip_table = markdown_table("recipe", rows, COLUMNS)
    text = [f"# clip_caption.py ({cfg.preset} preset)\n", "Paper: Lai et al., arXiv:2410.02740.\n"]
    if cap_metrics:
        text += ["## Captioner (held-out test scenes, greedy)\n", markdown_table("format", cap_metrics, CAPTION_COLUMNS), ""]
    text += ["## CLIP per caption recipe (held-out web images)\n", clip_table, "", "![recipes](recipes.png)\n",
             "## The paper's findings on these numbers\n"] + [f"- {v}" for v in verdict]
    text += ["", "## Sample captions (web images)\n"] + [f"- image {i}: **alttext**: {a}  \n  " + "  \n  ".join(
        f"**{f}**: {c}" for f, c in caps.items()) for i, a, caps in samples]
    text += ["", "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())]
    (out / "report.md").write_text("\n".join(text) + "\n")
    if rows and next(iter(rows.values()))["emblem top1"] is not None:
        plot_recipes(rows, out / "recipes.png")
    if cap_metrics:
        print(markdown_table("format", cap_metrics, CAPTION_COLUMNS))
    print(clip_table)
    print("\n".join(verdict))


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None):
    cfg = parse_config(sys.argv[1:] if argv is None else argv)
    device = setup_device(cfg)
    rank, world = dist_info()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
        print(json.dumps(dataclasses.asdict(cfg)))
    log, texts, timings = Logger(out / "log.jsonl"), Texts(), {}
    clock = time.time()
    if cfg.data:  # read (and check) the user's file before any training
        try:
            pairs = read_user_pairs(cfg.data, cfg)
        except (ValueError, OSError) as err:
            raise SystemExit(f"--data: {err}") from None
        cut = len(pairs.images) - min(cfg.n_eval, len(pairs.images) // 5)  # the tail is held out for retrieval
        web = ImageSet(pairs.images[:cut], pairs.alttexts[:cut])
        held_out = ImageSet(pairs.images[cut:], pairs.alttexts[cut:], None, {"caption": pairs.captions["caption"][cut:]})
    else:
        web = render_split("web", 0, cfg.n_web, cfg, gold=False)
        held_out = render_split("web", cfg.n_web, cfg.n_eval, cfg, gold=True)

    # 1. the controllable captioner: stage 1 on "human", optional stage 2 on "human2"
    human = render_split("human", 0, cfg.n_human, cfg, gold=True)
    captioner = train_captioner(human, cfg, texts, device, log, cfg.cap_steps, out / "captioner.safetensors", "captioner")
    if cfg.stage2_steps > 0:
        human2 = render_split("human2", 0, cfg.n_human2, cfg, gold=True)
        captioner = train_captioner(human2, cfg, texts, device, log, cfg.stage2_steps,
                                    out / "captioner_stage2.safetensors", "captioner_stage2", model=captioner)
    timings["captioner train"] = time.time() - clock
    cap_metrics = None
    if rank == 0:
        clock = time.time()
        cap_metrics, _ = evaluate_captioner(captioner, render_split("test", 0, cfg.n_cap_eval, cfg, gold=True),
                                            cfg, texts, device)
        log(run="captioner_eval", **{f"{f}/{k}": v for f, m in cap_metrics.items() for k, v in m.items()})
        timings["captioner eval"] = time.time() - clock

    # 2. caption the web images (or the user's), cached as JSONL
    clock = time.time()
    fmts = sorted({parse_recipe(r)[0] for r in cfg.recipes} - {"alt"})
    key = json.dumps([getattr(cfg, k) for k in ARCH_KEYS + ("seed", "data", "n_human", "cap_steps", "stage2_steps")])
    cache = out / f"captions_{hashlib.sha1(key.encode()).hexdigest()[:10]}.jsonl"
    if rank == 0:
        synthetic = caption_images(captioner, web, fmts, cache, cfg, texts, device)
    barrier()
    if rank != 0:  # the cache is complete now: reading it generates nothing
        synthetic = caption_images(captioner, web, fmts, cache, cfg, texts, device)
    timings["web captioning"] = time.time() - clock
    samples = [(i, web.alttexts[i], {f: synthetic[f][i] for f in fmts}) for i in range(min(3, len(web.images)))]

    # 3 + 4. one CLIP per recipe, evaluated on held-out images
    ev = make_eval_set(held_out)
    probe_train = (torch.empty(0), torch.empty(0))
    if web.scenes is not None:
        with_emblem = [i for i, s in enumerate(web.scenes) if any(o.emblem is not None for o in s.objects)][:2000]
        probe_train = (web.images[with_emblem], torch.tensor(
            [next(o.emblem for o in web.scenes[i].objects if o.emblem is not None) for i in with_emblem]))
    rows = {}
    for recipe in cfg.recipes:
        clock = time.time()
        clip = train_clip(recipe, web, synthetic, cfg, texts, device, log)
        timings[f"clip {recipe}"] = time.time() - clock
        if rank == 0:
            rows[recipe] = evaluate_clip(clip, ev, probe_train, cfg, texts, device)
            log(run=f"clip_{recipe}_eval", **{k: v for k, v in rows[recipe].items() if v is not None})
        barrier()
    if rank == 0:
        write_report(cfg, cap_metrics, samples, rows, timings, ev)
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
