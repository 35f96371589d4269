"""MM1 pre-training in one file: CLIP ViT -> VL connector -> Llama decoder (+MoE), with the paper's ablations.

McKinzie et al., "MM1: Methods, Analysis & Insights from Multimodal LLM Pre-training", arXiv:2403.09611.

Reproduced in miniature on ShapesWorld (data/shapes.py): image tokens spliced into the text at `<image>`
with causal attention over everything; the three VL connectors (average pooling, attention pooling,
C-Abstractor); caption / interleaved / text-only pre-training at a configurable ratio (45:45:10 default);
the paper's learning-rate rule; an optional MoE FFN every k layers (top-2, balance 0.01, z 0.001); and the
evaluation protocol of the pre-trained model: 0/4/8-shot captioning CIDEr and VQA, text-only perplexity.
MM1 starts from a pre-trained CLIP ViT; we pre-train a tiny one first ("stage 0": the ViT as the image tower
of a CLIP with a bag-of-words text tower, symmetric InfoNCE on the caption stream's pairs, --vit_pretrain_steps),
then pre-train MM1 with everything unfrozen. --init_vit= (a real CLIP) skips stage 0.

    python mm1.py                                   # cpu preset (default without CUDA): ~5 min on 2 cores
    python mm1.py --preset=smoke                    # tiny, < 1 min (what the tests run)
    python mm1.py --preset=gpu                      # one GPU, bf16 (default with CUDA)
    torchrun --standalone --nproc_per_node=8 mm1.py --preset=gpu
    python mm1.py --ablate=connector                # connector x image tokens grid (ablate preset, ~1.5 min/run)
    python mm1.py --ablate=mix                      # caption:interleaved:text = 100:0:0, 0:100:0, 45:45:10, 50:10:40
    python mm1.py --ablate=moe                      # dense vs MoE FFN
    python mm1.py --train_data=my_llava.json        # your LLaVA JSON / image-text CSV|JSONL as the caption stream
    python mm1.py --init_llm=llm.safetensors --init_vit=vit.safetensors   # local HF-format weights
    python mm1.py --bench=True                      # CPU: one decoder training step, ours vs transformers' Llama
    python mm1.py --help                            # every config field with its default and meaning

Prints (and writes to out_dir/metrics.json, keyed as in the table; report.md; samples.png):

    | shots | caption CIDEr | distinct captions | VQA acc (%) | average |
    | 0     | ...           | ... / 30          | ...         | ...     |
    | 4     | ...           | ... / 30          | ...         | ...     |
    | 8     | ...           | ... / 30          | ...         | ...     |
    constant-caption baseline (one training caption for every image): CIDEr ...
    text-only perplexity: ...
    caption NLL gain from the right image (vs a wrong one): ... nats/token   (0: the model ignores images)

Ablation grids print one row per setting: k-shot averages, distinct 0-shot captions, text perplexity, image gain,
params, minutes. The rows of a grid share one stage-0 ViT (as MM1's ablations share one CLIP).
"""
import ast
import contextlib
import dataclasses
import inspect
import json
import math
import os
import re
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script from anywhere
from data import shapes  # noqa: E402
from data.tokenizer import get_tokenizer  # noqa: E402
from kernels import attention, moe_ffn  # noqa: E402

# ----------------------------------------------------------------------------- config

@dataclass
class Config:
    preset: str = ""                # smoke | cpu | ablate | gpu ("": gpu with CUDA, else cpu)
    out_dir: str = ""               # output folder ("": out/mm1)
    seed: int = 0                   # weights, data order and held-out scenes
    device: str = ""                # cpu | cuda | mps ("": cuda when available)
    ablate: str = ""                # connector | mix | moe: train the ablation grid and print its table
    # data
    image_size: int = 64            # rendered image side (pixels)
    mix: str = "45:45:10"           # caption : interleaved : text-only share of training sequences
    caption_formats: str = "ssc,dsc"  # ShapesWorld caption styles in the caption stream
    train_data: str = ""            # your LLaVA JSON or image-text CSV/JSONL: replaces the ShapesWorld captions
    n_caption_scenes: int = 3000    # pre-rendered training scenes of the caption stream
    n_documents: int = 600          # pre-rendered interleaved training documents
    n_passages: int = 2000          # text-only training passages
    seq_len: int = 256              # tokens per packed training sequence
    # vision encoder (CLIP ViT, HF CLIPVisionModel names)
    patch_size: int = 8             # ViT patch side (pixels)
    vit_width: int = 128            # ViT hidden size
    vit_layers: int = 4             # ViT blocks
    vit_heads: int = 4              # ViT attention heads
    # vision-language connector
    connector: str = "cabstractor"  # avgpool | attnpool | cabstractor
    image_tokens: int = 16          # LLM tokens per image (a square number for the pooling connectors)
    # decoder (Llama, HF LlamaForCausalLM names)
    n_layer: int = 6                # decoder blocks
    n_embd: int = 192               # decoder width
    n_head: int = 6                 # query heads
    n_kv_head: int = 2              # key/value heads (GQA)
    ffn_hidden: int = 512           # SwiGLU hidden size
    rope_theta: float = 10000.0     # RoPE base
    moe_every: int = 0              # an MoE FFN in every k-th block (0: dense model)
    n_experts: int = 8              # experts per MoE FFN
    top_k: int = 2                  # experts per token
    balance_coef: float = 0.01      # load-balance loss weight
    z_coef: float = 0.001           # router z-loss weight
    # training
    steps: int = 300                # optimizer steps
    batch_size: int = 8             # sequences per step (global, over all ranks)
    grad_accum: int = 1             # micro-batches per step
    lr: float = 0.0                 # peak lr (0: the paper's rule exp(-0.4214 ln N - 0.5535), N = decoder params)
    vision_lr_mult: float = 0.3     # lr multiplier of the ViT and connector (below 1: keeps the stage-0 features)
    weight_decay: float = 0.1       # decoupled AdamW decay; torch multiplies it by lr: per-step decay 0.1 * lr, as in the paper
    warmup: int = 30                # linear warmup steps, then cosine to min_lr_frac * lr
    min_lr_frac: float = 0.1        # final lr / peak lr
    grad_clip: float = 1.0          # max global grad norm
    log_every: int = 10             # steps between log lines
    ckpt_every: int = 100           # steps between checkpoints (and at the end)
    resume: bool = False            # continue from out_dir/model.safetensors + optim.safetensors
    stop_after: int = 0             # stop after this many steps (0: run all), for split runs
    compile: bool = False           # torch.compile the model (CUDA only)
    init_llm: str = ""              # HF Llama safetensors (file or folder) to start the decoder from
    init_vit: str = ""              # HF CLIP(Vision)Model safetensors to start the ViT from (skips stage 0)
    vit_pretrain_steps: int = 300   # stage 0: tiny-CLIP contrastive steps for the ViT before MM1 (0: from scratch)
    vit_pretrain_batch: int = 64    # stage 0 (image, caption) pairs per step
    vit_pretrain_lr: float = 2e-3   # stage 0 peak lr (warmup + cosine)
    # evaluation
    eval_scenes: int = 30           # held-out test scenes for captioning and VQA
    shots: str = "0,4,8"            # few-shot settings to evaluate
    n_eval_passages: int = 30       # held-out text passages for perplexity
    max_new_tokens: int = 24        # caption length limit at generation
    temperature: float = 0.0        # 0: greedy decoding, else sampling
    bench: bool = False             # only time a training step of our decoder vs transformers' LlamaForCausalLM


PRESETS = {
    "smoke": dict(image_size=32, patch_size=8, vit_width=32, vit_layers=1, vit_heads=2, image_tokens=4,
                  n_layer=2, n_embd=64, n_head=4, n_kv_head=2, ffn_hidden=128, seq_len=96, batch_size=4,
                  steps=30, warmup=3, log_every=5, ckpt_every=15, n_caption_scenes=48, n_documents=12,
                  n_passages=24, eval_scenes=3, shots="0,2", n_eval_passages=4, max_new_tokens=8, lr=3e-3,
                  vit_pretrain_steps=60, vit_pretrain_batch=16),
    "cpu": dict(),
    "ablate": dict(vit_width=96, vit_layers=3, n_layer=4, n_embd=128, n_head=4, n_kv_head=2, ffn_hidden=384,
                   steps=80, warmup=8, n_caption_scenes=1200, n_documents=300, n_passages=1000,
                   eval_scenes=20, n_eval_passages=20),
    "gpu": dict(image_size=224, patch_size=14, vit_width=768, vit_layers=12, vit_heads=12, image_tokens=64,
                n_layer=16, n_embd=1024, n_head=16, n_kv_head=4, ffn_hidden=2816, seq_len=1024, batch_size=64,
                steps=5000, warmup=200, log_every=20, ckpt_every=500, n_caption_scenes=60000,
                n_documents=10000, n_passages=40000, eval_scenes=200, n_eval_passages=200, compile=True),
}
ABLATIONS = {  # name -> list of (row label, config overrides)
    "connector": [(f"{c} | {k}", dict(connector=c, image_tokens=k))
                  for c in ("avgpool", "attnpool", "cabstractor") for k in (16, 36)],
    "mix": [(m, dict(mix=m)) for m in ("100:0:0", "0:100:0", "45:45:10", "50:10:40")],
    "moe": [("dense", dict(moe_every=0)), ("moe every 2, 8 experts", dict(moe_every=2, n_experts=8))],
}


class BadInput(Exception):
    """A user error (bad flag, file or value): main() prints it as one line and exits non-zero."""


def config_help():
    """`--help`: every field of Config with its default and the comment beside it."""
    lines = [__doc__.split("\n\n")[0], "", "options (--key=value):"]
    for line in inspect.getsource(Config).splitlines()[2:]:
        m = re.match(r"\s+(\w+): (\w+) = (.+?)\s+# (.*)", line)
        if m:
            lines.append(f"  {'--' + m[1] + '=' + m[3]:<34} {m[4]}")
    lines.append(f"presets: {', '.join(PRESETS)}; ablations: {', '.join(ABLATIONS)}")
    return "\n".join(lines)


def parse_args(argv):
    """`--key=value` overrides (ast.literal_eval, type-checked against the default) on top of a preset."""
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    overrides = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(config_help())
            raise SystemExit(0)
        key, eq, raw = arg[2:].partition("=")
        if not arg.startswith("--") or not eq:
            raise BadInput(f"bad argument {arg!r}: expected --key=value (see --help)")
        if key not in defaults:
            raise BadInput(f"unknown config key --{key} (see --help)")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # bare words are strings: --connector=avgpool
        want = type(defaults[key])
        if want is float and type(value) is int:
            value = float(value)
        if want is str and not isinstance(value, str):
            value = raw
        if type(value) is not want:
            raise BadInput(f"--{key}={raw}: expected {want.__name__}, got {type(value).__name__}")
        overrides[key] = value
    preset = overrides.get("preset") or ("ablate" if overrides.get("ablate") else
                                         "gpu" if torch.cuda.is_available() else "cpu")
    if preset not in PRESETS:
        raise BadInput(f"--preset={preset}: expected one of {', '.join(PRESETS)}")
    cfg = Config(**{**PRESETS[preset], **overrides, "preset": preset})
    cfg.out_dir = cfg.out_dir or "out/mm1"
    check_config(cfg)
    return cfg


def check_config(cfg):
    if cfg.connector not in ("avgpool", "attnpool", "cabstractor"):
        raise BadInput(f"--connector={cfg.connector}: expected avgpool | attnpool | cabstractor")
    if cfg.connector != "attnpool" and math.isqrt(cfg.image_tokens) ** 2 != cfg.image_tokens:
        raise BadInput(f"--image_tokens={cfg.image_tokens}: {cfg.connector} needs a square number")
    if cfg.image_size % cfg.patch_size:
        raise BadInput(f"--image_size={cfg.image_size} is not a multiple of --patch_size={cfg.patch_size}")
    if cfg.n_embd % cfg.n_head or cfg.n_head % cfg.n_kv_head or cfg.vit_width % cfg.vit_heads:
        raise BadInput("n_embd must divide by n_head, n_head by n_kv_head, vit_width by vit_heads")
    if cfg.ablate and cfg.ablate not in ABLATIONS:
        raise BadInput(f"--ablate={cfg.ablate}: expected one of {', '.join(ABLATIONS)}")
    mix_weights(cfg.mix)
    for key in ("init_llm", "init_vit", "train_data"):  # fail before minutes of data building
        if getattr(cfg, key) and not Path(getattr(cfg, key)).exists():
            raise BadInput(f"--{key}={getattr(cfg, key)}: no such file")
    if cfg.resume and not (Path(cfg.out_dir) / "model.safetensors").is_file():
        raise BadInput(f"--resume=True: missing checkpoint {Path(cfg.out_dir) / 'model.safetensors'}")
    for fmt in cfg.caption_formats.split(","):
        if fmt not in shapes.CAPTION_FORMATS:
            raise BadInput(f"--caption_formats: unknown format {fmt!r} (choose from {shapes.CAPTION_FORMATS})")


def mix_weights(mix):
    try:
        w = np.array([float(x) for x in mix.split(":")])
        assert len(w) == 3 and (w >= 0).all() and w.sum() > 0
    except (ValueError, AssertionError):
        raise BadInput(f"--mix={mix}: expected caption:interleaved:text, e.g. 45:45:10") from None
    return w / w.sum()


# ----------------------------------------------------------------------------- data
# A document is (ids, images): int32 token ids with ONE `<image>` marker per image, and the indices of its
# images in a shared uint8 image bank. Packing expands each marker to `image_tokens` copies, the slots the
# connector's outputs are written into, so one pre-rendered pool serves every connector / token count.

class Pools:
    """Pre-rendered training and evaluation data, built once per process (ablation runs share it)."""

    def __init__(self, cfg, enc):
        self.enc, self.size = enc, cfg.image_size
        self.image_id = enc.encode_single_token("<image>")
        self.eot_id = enc.encode_single_token("<|endoftext|>")
        self.pad_id = enc.encode_single_token("<|pad|>")
        self.bank = []  # uint8 (3, S, S) tensors
        self.pretrained_vit = {}  # stage 0 results: ViT config -> (ViT state_dict, stats)
        formats = cfg.caption_formats.split(",")
        if cfg.train_data:
            self.captions = [[d] for d in self.read_user_file(cfg.train_data)]
        else:
            self.captions = []  # per scene: one document per caption format
            for i in tqdm(range(cfg.n_caption_scenes), desc="render caption scenes", leave=False):
                scene = shapes.make_scene("train", i, seed=cfg.seed)
                img = self.add_image(shapes.render(scene, size=self.size))
                self.captions.append([self.doc([img, shapes.caption(scene, f, seed=i)]) for f in formats])
        self.documents = [self.doc(shapes.interleaved_document("train", i, seed=cfg.seed))
                          for i in tqdm(range(cfg.n_documents), desc="render documents", leave=False)]
        self.passages = [self.doc([shapes.text_passage("train", i, seed=cfg.seed)]) for i in range(cfg.n_passages)]
        self.caption_docs = [d for group in self.captions for d in group]
        # held out: test-split scenes (never trained on), few-shot demonstrations from the training split
        self.eval_items = [self.eval_item(shapes.make_scene("test", i, seed=cfg.seed), i) for i in range(cfg.eval_scenes)]
        self.shot_items = [self.eval_item(shapes.make_scene("train", i, seed=cfg.seed), i) for i in range(16)]
        self.eval_passages = [self.doc([shapes.text_passage("test", i, seed=cfg.seed)])[0]
                              for i in range(cfg.n_eval_passages)]

    def add_image(self, pil):
        pil = pil.convert("RGB").resize((self.size, self.size))
        self.bank.append(torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1))  # (3, S, S) uint8
        return len(self.bank) - 1

    def doc(self, parts):
        """Parts (str | Scene | bank index) in reading order -> (ids with one marker per image, image indices)."""
        ids, images = [], []
        for part in parts:
            if isinstance(part, str):
                ids += self.enc.encode_ordinary(part)
            else:
                images.append(part if isinstance(part, int) else self.add_image(shapes.render(part, size=self.size)))
                ids.append(self.image_id)
        return np.array(ids + [self.eot_id], dtype=np.int32), images

    def eval_item(self, scene, i):
        refs = list(dict.fromkeys(shapes.caption(scene, "ssc", seed=s) for s in range(5)))  # distinct phrasings
        return dict(image=self.add_image(shapes.render(scene, size=self.size)), refs=refs, vqa=shapes.vqa(scene, seed=i)[0])

    def read_user_file(self, path):
        """A user's LLaVA JSON or image-text CSV/JSONL -> caption-stream documents."""
        try:
            if path.endswith(".json"):
                docs = []
                for row in shapes.read_llava_json(path):
                    image = self.add_image(shapes.load_image(resolve(path, row["image"])))
                    text = " ".join(turn["value"].replace("<image>", "").strip() for turn in row["conversations"])
                    docs.append(self.doc([image, text]))
                return docs
            return [self.doc([self.add_image(shapes.load_image(resolve(path, row["filepath"]))), row["caption"]])
                    for row in shapes.read_image_text(path)]
        except (ValueError, OSError, KeyError) as e:
            raise BadInput(f"--train_data={path}: {e}") from None


def resolve(list_file, image_path):
    p = Path(image_path)
    return str(p if p.is_absolute() else Path(list_file).resolve().parent / p)


def expand_images(ids, image_id, image_tokens):
    """Each `<image>` marker -> image_tokens copies (the slots the connector output fills)."""
    return np.repeat(ids, np.where(ids == image_id, image_tokens, 1))


def pack_sequence(rng, docs, seq_len, image_id, pad_id, image_tokens):
    """Fill one sequence with whole documents of one source; the last one is cut, never inside an image."""
    ids, images, n = np.full(seq_len, pad_id, dtype=np.int64), [], 0
    while n < seq_len:
        doc_ids, doc_images = docs[rng.integers(len(docs))]
        x = expand_images(doc_ids, image_id, image_tokens)
        cut = len(x) > seq_len - n
        if cut:
            x = x[: seq_len - n]
            x = x[: len(x) - int((x == image_id).sum()) % image_tokens]  # drop a half-written image
        ids[n: n + len(x)] = x
        images += doc_images[: int((x == image_id).sum()) // image_tokens]
        n += len(x)
        if cut:
            break
    return ids, images


def get_batch(pools, cfg, step):
    """The global batch of `step`: a pure function of (seed, step), so resume and DDP need no data state.
    Each sequence draws its source by the mix ratio. Returns ids (B, T), targets (B, T) with -100 on image
    slots / padding, the image-bank indices of each row, and the target count of the whole global batch
    (every rank's loss normaliser)."""
    rng = np.random.default_rng([cfg.seed, step])
    sources = [pools.caption_docs, pools.documents, pools.passages]
    weights = mix_weights(cfg.mix)
    rows = [pack_sequence(rng, sources[rng.choice(3, p=weights)], cfg.seq_len, pools.image_id, pools.pad_id,
                          cfg.image_tokens) for _ in range(cfg.batch_size)]
    ids = torch.from_numpy(np.stack([r[0] for r in rows]))  # (B, T)
    targets = torch.cat([ids[:, 1:], torch.full((len(ids), 1), pools.pad_id)], 1)  # (B, T) next token
    targets[(targets == pools.image_id) | (targets == pools.pad_id)] = -100
    return ids, targets, [r[1] for r in rows], int((targets != -100).sum())


# ----------------------------------------------------------------------------- model: CLIP ViT (HF names)

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


class CLIPAttention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x):  # (B, N, C)
        B, N, C = x.shape
        q, k, v = (p(x).view(B, N, self.heads, C // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))  # (B, H, N, D)
        return self.out_proj(attention(q, k, v, causal=False).transpose(1, 2).reshape(B, N, C))


class CLIPMLP(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # quick_gelu, CLIP's activation


class CLIPEncoderLayer(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.self_attn, self.mlp = CLIPAttention(width, heads), CLIPMLP(width)
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(width), nn.LayerNorm(width)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, width, patch, image_size):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.randn(width) * 0.02)
        self.patch_embedding = nn.Conv2d(3, width, patch, stride=patch, bias=False)
        self.position_embedding = nn.Embedding((image_size // patch) ** 2 + 1, width)

    def forward(self, pixels):  # (B, 3, H, W) normalised
        patches = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # (B, P, C)
        cls = self.class_embedding.expand(len(patches), 1, -1)  # (B, 1, C)
        return torch.cat([cls, patches], 1) + self.position_embedding.weight  # (B, 1 + P, C)


class CLIPEncoder(nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(width, heads) for _ in range(layers))


class VisionTransformer(nn.Module):
    """CLIP's vision tower; its state_dict keys are CLIPVisionModel's minus the `vision_model.` prefix."""

    def __init__(self, cfg):
        super().__init__()
        w = cfg.vit_width
        self.embeddings = CLIPEmbeddings(w, cfg.patch_size, cfg.image_size)
        self.pre_layrnorm = nn.LayerNorm(w)  # sic: HF's spelling
        self.encoder = CLIPEncoder(w, cfg.vit_layers, cfg.vit_heads)
        self.post_layernorm = nn.LayerNorm(w)

    def forward(self, pixels):  # (B, 3, H, W) -> last_hidden_state (B, 1 + P, C), as HF
        x = self.pre_layrnorm(self.embeddings(pixels))
        for layer in self.encoder.layers:
            x = layer(x)
        return x


# ----------------------------------------------------------------------------- model: VL connectors

class AvgPoolConnector(nn.Module):
    """n x n average pooling of the patch grid, then a linear map into the LLM width."""

    def __init__(self, vit_width, llm_width, image_tokens):
        super().__init__()
        self.side = math.isqrt(image_tokens)
        self.proj = nn.Linear(vit_width, llm_width)

    def forward(self, feats):  # (N, P, Cv)
        grid = feats.transpose(1, 2).unflatten(2, (math.isqrt(feats.shape[1]),) * 2)  # (N, Cv, g, g)
        return self.proj(F.adaptive_avg_pool2d(grid, self.side).flatten(2).transpose(1, 2))  # (N, K, C)


class AttnPoolConnector(nn.Module):
    """k learned queries cross-attend to the patch features (one attention layer), then a linear map."""

    def __init__(self, vit_width, llm_width, image_tokens, heads):
        super().__init__()
        self.heads = heads
        self.queries = nn.Parameter(torch.randn(image_tokens, vit_width) * 0.02)
        self.norm = nn.LayerNorm(vit_width)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(vit_width, vit_width) for _ in range(3))
        self.proj = nn.Linear(vit_width, llm_width)

    def forward(self, feats):  # (N, P, Cv)
        N, P, C = feats.shape
        kv = self.norm(feats)
        q = self.q_proj(self.queries).view(1, -1, self.heads, C // self.heads).transpose(1, 2).expand(N, -1, -1, -1)
        k, v = (p(kv).view(N, P, self.heads, C // self.heads).transpose(1, 2) for p in (self.k_proj, self.v_proj))
        out = attention(q, k, v, causal=False).transpose(1, 2).reshape(N, -1, C)  # (N, K, Cv)
        return self.proj(out + self.queries)


class LayerNorm2d(nn.LayerNorm):
    def forward(self, x):  # (N, C, H, W): normalise over channels
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class RegBlock(nn.Module):
    """RegNet bottleneck (timm defaults, as in Honeybee's C-Abstractor): 1x1 -> LN -> SiLU -> 3x3 depthwise
    -> LN -> SiLU -> squeeze-excite(0.25) -> 1x1 -> LN, plus the residual, then SiLU."""

    def __init__(self, width):
        super().__init__()
        self.conv1, self.norm1 = nn.Conv2d(width, width, 1, bias=False), LayerNorm2d(width)
        self.conv2, self.norm2 = nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False), LayerNorm2d(width)
        self.se_reduce, self.se_expand = nn.Conv2d(width, width // 4, 1), nn.Conv2d(width // 4, width, 1)
        self.conv3, self.norm3 = nn.Conv2d(width, width, 1, bias=False), LayerNorm2d(width)

    def forward(self, x):  # (N, C, H, W)
        h = F.silu(self.norm1(self.conv1(x)))
        h = F.silu(self.norm2(self.conv2(h)))
        h = h * torch.sigmoid(self.se_expand(F.relu(self.se_reduce(h.mean((2, 3), keepdim=True)))))
        return F.silu(x + self.norm3(self.conv3(h)))


class CAbstractor(nn.Module):
    """Honeybee's C-Abstractor: conv blocks keep locality, adaptive pooling sets the token count."""

    def __init__(self, vit_width, llm_width, image_tokens, depth=3):
        super().__init__()
        self.side = math.isqrt(image_tokens)
        self.stage1 = nn.Sequential(*(RegBlock(vit_width) for _ in range(depth)))
        self.stage2 = nn.Sequential(*(RegBlock(vit_width) for _ in range(depth)))
        self.readout = nn.Sequential(nn.Linear(vit_width, llm_width), nn.SiLU(), nn.Linear(llm_width, llm_width))

    def forward(self, feats):  # (N, P, Cv)
        grid = feats.transpose(1, 2).unflatten(2, (math.isqrt(feats.shape[1]),) * 2)  # (N, Cv, g, g)
        grid = self.stage2(F.adaptive_avg_pool2d(self.stage1(grid), self.side))  # (N, Cv, k, k)
        return self.readout(grid.flatten(2).transpose(1, 2))  # (N, K, C)


# ----------------------------------------------------------------------------- model: Llama decoder (HF names)

class RMSNorm(nn.Module):
    def __init__(self, width, eps=1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(width)), eps

    def forward(self, x):
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class LlamaAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv, self.hd = cfg.n_head, cfg.n_kv_head, cfg.n_embd // cfg.n_head
        self.q_proj = nn.Linear(cfg.n_embd, self.n_head * self.hd, bias=False)
        self.k_proj = nn.Linear(cfg.n_embd, self.n_kv * self.hd, bias=False)
        self.v_proj = nn.Linear(cfg.n_embd, self.n_kv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.hd, cfg.n_embd, bias=False)

    def forward(self, x, cos, sin, cache=None):  # x (B, T, C); cos/sin (T, D)
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hd).transpose(1, 2)  # (B, Hq, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)  # under bf16 autocast q, k, v are bf16: keep them one dtype
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:  # cache: [k, v] of the earlier positions, extended in place
            if cache:
                k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
            cache[:] = [k, v]
        # a prompt attends causally; a single new token sees the whole cache
        y = attention(q, k, v, causal=T > 1)  # (B, Hq, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class LlamaMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_hidden, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)), None


class MoEMLP(nn.Module):
    """Top-k routed SwiGLU experts (kernels.moe_ffn); returns the balance / z auxiliary losses too."""

    def __init__(self, cfg):
        super().__init__()
        E, C, Fh = cfg.n_experts, cfg.n_embd, cfg.ffn_hidden
        self.top_k = cfg.top_k
        self.gate = nn.Linear(C, E, bias=False)  # router
        self.w1, self.w3 = nn.Parameter(torch.randn(E, Fh, C) * 0.02), nn.Parameter(torch.randn(E, Fh, C) * 0.02)
        self.w2 = nn.Parameter(torch.randn(E, C, Fh) * 0.02)

    def forward(self, x):  # (B, T, C)
        y, aux = moe_ffn(x.reshape(-1, x.shape[-1]), self.gate.weight, self.w1, self.w3, self.w2, self.top_k)
        return y.view_as(x), aux


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg, moe):
        super().__init__()
        self.self_attn = LlamaAttention(cfg)
        self.mlp = MoEMLP(cfg) if moe else LlamaMLP(cfg)
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(cfg.n_embd), RMSNorm(cfg.n_embd)

    def forward(self, x, cos, sin, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        h, aux = self.mlp(self.post_attention_layernorm(x))
        return x + h, aux


class LlamaModel(nn.Module):
    def __init__(self, cfg, vocab_size):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, cfg.moe_every > 0 and (i + 1) % cfg.moe_every == 0)
                                    for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd)
        hd = cfg.n_embd // cfg.n_head
        self.register_buffer("inv_freq", 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2).float() / hd), persistent=False)

    def forward(self, x, pos0=0, cache=None):  # x (B, T, C) embeddings -> (B, T, C), summed aux losses
        freqs = torch.arange(pos0, pos0 + x.shape[1], device=x.device).float()[:, None] * self.inv_freq  # (T, D/2)
        emb = torch.cat([freqs, freqs], -1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)  # (T, D)
        aux_total = {}
        for i, layer in enumerate(self.layers):
            x, aux = layer(x, cos, sin, None if cache is None else cache[i])
            for key in ("balance_loss", "z_loss") if aux else ():
                aux_total[key] = aux_total.get(key, 0.0) + aux[key]
        return self.norm(x), aux_total


class MM1(nn.Module):
    """ViT -> connector -> decoder; state_dict keys: `vision_model.*` (CLIPVisionModel), `connector.*`,
    `model.*` and `lm_head.*` (LlamaForCausalLM)."""

    def __init__(self, cfg, vocab_size, image_token_id):
        super().__init__()
        self.cfg, self.image_token_id = cfg, image_token_id
        self.vision_model = VisionTransformer(cfg)
        if cfg.connector == "avgpool":
            self.connector = AvgPoolConnector(cfg.vit_width, cfg.n_embd, cfg.image_tokens)
        elif cfg.connector == "attnpool":
            self.connector = AttnPoolConnector(cfg.vit_width, cfg.n_embd, cfg.image_tokens, cfg.vit_heads)
        else:
            self.connector = CAbstractor(cfg.vit_width, cfg.n_embd, cfg.image_tokens)
        self.model = LlamaModel(cfg, vocab_size)
        self.lm_head = nn.Linear(cfg.n_embd, vocab_size, bias=False)
        self.register_buffer("pixel_mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: shrink residual projections by depth
            if name.endswith(("o_proj.weight", "down_proj.weight", ".w2")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding, nn.Conv2d)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def patch_features(self, images):  # uint8 (N, 3, S, S) -> normalised patch tokens (N, P, Cv)
        pixels = (images.float() / 255 - self.pixel_mean) / self.pixel_std
        feats = self.vision_model(pixels.to(self.lm_head.weight.dtype))[:, 1:]  # drop the class token
        return self.vision_model.post_layernorm(feats)

    def image_embeddings(self, images):  # uint8 (N, 3, S, S) -> (N, K, C)
        return self.connector(self.patch_features(images))

    def forward(self, ids, images=None, pos0=0, cache=None):
        """ids (B, T) with image_tokens `<image>` slots per image; images uint8 (N, 3, S, S) in reading
        order. Returns logits (B, T, V) and the summed MoE auxiliary losses."""
        x = self.model.embed_tokens(ids)  # (B, T, C)
        if images is not None and len(images):
            slots = (ids == self.image_token_id).unsqueeze(-1)  # (B, T, 1)
            x = x.masked_scatter(slots, self.image_embeddings(images).to(x.dtype))  # row-major = reading order
        h, aux = self.model(x, pos0, cache)
        return self.lm_head(h), aux

    @torch.no_grad()
    def generate(self, ids, images, max_new_tokens, stop_id, temperature=0.0, generator=None):
        """Greedy (temperature 0) or sampled continuation of one prompt (1, T), with a KV cache."""
        cache = [[] for _ in self.model.layers]
        logits, _ = self(ids, images, 0, cache)
        out, pos = [], ids.shape[1]
        for _ in range(max_new_tokens):
            last = logits[0, -1].float()
            if temperature > 0:
                nxt = int(torch.multinomial(F.softmax(last / temperature, -1), 1, generator=generator))
            else:
                nxt = int(last.argmax())
            if nxt == stop_id:
                break
            out.append(nxt)
            logits, _ = self(torch.tensor([[nxt]], device=ids.device), None, pos, cache)
            pos += 1
        return out


def count_params(module):
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- loading local HF weights

def load_hf_weights(model, path, prefix_keep):
    """Copy a local HF safetensors checkpoint (file or folder of shards) into the matching submodule.
    Keys outside `prefix_keep` (e.g. a CLIPModel's text tower) are ignored; any missing / unexpected /
    mis-shaped key inside it is a BadInput naming the keys."""
    p = Path(path)
    files = sorted(p.glob("*.safetensors")) if p.is_dir() else [p]
    if not files or not all(f.is_file() for f in files):
        raise BadInput(f"{path}: no safetensors file found")
    state = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except Exception as e:  # safetensors raises its own error types on corrupt files
            raise BadInput(f"{f}: not a readable safetensors file ({e})") from None
    if prefix_keep == "vision_model." and not any(k.startswith(prefix_keep) for k in state):
        state = {prefix_keep + k: v for k, v in state.items()}  # CLIPVisionModel saved by transformers >= 5
    ours = {k: v for k, v in model.state_dict().items() if k.startswith(prefix_keep)}
    theirs = {k: v for k, v in state.items() if k.startswith(prefix_keep)}
    if "lm_head.weight" in ours and "lm_head.weight" not in theirs and "model.embed_tokens.weight" in theirs:
        theirs["lm_head.weight"] = theirs["model.embed_tokens.weight"]  # tied embeddings (e.g. SmolLM2)
    missing = sorted(set(ours) - set(theirs))
    unexpected = sorted(set(theirs) - set(ours))
    misshaped = [f"{k} {tuple(theirs[k].shape)} vs ours {tuple(ours[k].shape)}"
                 for k in ours if k in theirs and theirs[k].shape != ours[k].shape]
    if missing or unexpected or misshaped:
        raise BadInput(f"{path}: does not match the model config: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                       f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, mis-shaped {misshaped[:5]}")
    with torch.no_grad():
        for k, v in ours.items():
            v.copy_(theirs[k])
    return len(ours)


# ----------------------------------------------------------------------------- losses

def lm_loss_sum(logits, targets):
    """Next-token cross-entropy, the autoregressive objective MM1 pre-trains with on all three data
    types (image slots and padding are masked with -100), in fp32, summed over this micro-batch."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")


def moe_aux_loss(aux, cfg):
    """MM1's MoE recipe (Sec. 3.3 / ST-MoE): 0.01 x load-balance loss + 0.001 x router z-loss, averaged over MoE layers."""
    if not aux:
        return 0.0
    n_moe = cfg.n_layer // cfg.moe_every
    return (cfg.balance_coef * aux["balance_loss"] + cfg.z_coef * aux["z_loss"]) / n_moe


def paper_lr(n_params):
    """MM1's fitted peak learning rate for an N-parameter LLM: lr = exp(-0.4214 ln N - 0.5535)."""
    return math.exp(-0.4214 * math.log(n_params) - 0.5535)


def lr_at(step, cfg, peak):
    """Linear warmup, then cosine decay to min_lr_frac * peak."""
    if step < cfg.warmup:
        return peak * (step + 1) / cfg.warmup
    t = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return peak * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


# ----------------------------------------------------------------------------- stage 0: a tiny CLIP for the ViT

def clip_loss(image_emb, text_emb, logit_scale):
    """CLIP's symmetric InfoNCE (Radford et al. 2021, Fig. 3): cross-entropy of the scaled cosine similarities
    of a batch of (image, text) pairs, the matching pair on the diagonal, image->text and text->image, in fp32."""
    logits = logit_scale.exp() * F.normalize(image_emb.float(), dim=-1) @ F.normalize(text_emb.float(), dim=-1).T  # (B, B)
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def pretrain_vit(model, pools, cfg, device, log):
    """Stage 0. MM1 starts from a pre-trained CLIP ViT; ours would start from noise and learn too slowly to
    inform the decoder, so we pre-train a tiny CLIP first: the ViT (mean of its normalised patch tokens, what
    the connector reads) is the image tower, mean-pooled token embeddings + a linear map the text tower, on
    the caption stream's (image, caption) pairs. Only the ViT's weights are kept. Every rank runs the same
    steps on the same data; DDP's start-up broadcast from rank 0 makes them bit-equal anyway.
    Returns the first and last losses and the last batch's image->text retrieval accuracy."""
    width = cfg.vit_width
    text_embed = nn.EmbeddingBag(pools.enc.n_vocab, width, mode="mean").to(device)
    heads = nn.ModuleDict(dict(image=nn.Linear(width, width), text=nn.Linear(width, width))).to(device)
    logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07), device=device))  # CLIP's initial temperature
    params = [*model.vision_model.parameters(), *text_embed.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                             {"params": [p for p in params if p.dim() < 2] + [logit_scale], "weight_decay": 0.0}],
                            lr=cfg.vit_pretrain_lr, betas=(0.9, 0.98))
    sched = dataclasses.replace(cfg, steps=cfg.vit_pretrain_steps, warmup=max(1, cfg.vit_pretrain_steps // 10))
    rng = np.random.default_rng([cfg.seed, 0])  # its own stream: stage 0 never shifts the MM1 batches
    batch = min(cfg.vit_pretrain_batch, len(pools.captions))
    losses = []
    for step in tqdm(range(cfg.vit_pretrain_steps), desc="stage 0: tiny CLIP", leave=False):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, sched, cfg.vit_pretrain_lr)
        docs = [group[rng.integers(len(group))] for group in (pools.captions[i] for i in rng.choice(len(pools.captions), batch, replace=False))]
        images = torch.stack([pools.bank[doc_images[0]] for _, doc_images in docs]).to(device)  # (B, 3, S, S)
        texts = [torch.from_numpy(ids[(ids != pools.image_id) & (ids != pools.eot_id)]).long() for ids, _ in docs]
        offsets = torch.tensor([0] + [len(t) for t in texts[:-1]]).cumsum(0)
        text_emb = heads["text"](text_embed(torch.cat(texts).to(device), offsets.to(device)))  # (B, Cv)
        image_emb = heads["image"](model.patch_features(images).mean(1))  # (B, Cv)
        loss = clip_loss(image_emb, text_emb, logit_scale)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            logit_scale.clamp_(0, math.log(100))  # CLIP caps the scale at 100
        losses.append(loss.item())
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.vit_pretrain_steps:
            log(dict(stage=0, step=step + 1, clip_loss=round(losses[-1], 4)))
    with torch.no_grad():
        accuracy = float((F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).T).argmax(1).eq(torch.arange(batch, device=device)).float().mean())
    return dict(clip_loss_first=round(losses[0], 4), clip_loss_last=round(losses[-1], 4),
                clip_batch_retrieval=round(accuracy, 3), clip_chance=round(1 / batch, 3))


# ----------------------------------------------------------------------------- checkpoints

def atomic_save(tensors, path, metadata):
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)  # a crash mid-write never leaves a truncated checkpoint


def save_checkpoint(model, opt, cfg, step, out_dir):
    """model.safetensors (HF names, config + step in the metadata) and optim.safetensors (AdamW moments)."""
    meta = {"config": json.dumps(asdict(cfg)), "step": str(step)}
    osd = opt.state_dict()
    moments = {f"state.{i}.{k}": v.contiguous() for i, s in osd["state"].items() for k, v in s.items()}
    atomic_save(moments, out_dir / "optim.safetensors", {**meta, "param_groups": json.dumps(osd["param_groups"])})
    atomic_save({k: v.contiguous() for k, v in model.state_dict().items()}, out_dir / "model.safetensors", meta)


def load_checkpoint(model, opt, out_dir):
    """Restore weights and optimizer state; returns the step to continue from."""
    paths = [out_dir / "model.safetensors", out_dir / "optim.safetensors"]
    for p in paths:
        if not p.is_file():
            raise BadInput(f"--resume=True: missing checkpoint {p}")
    metas = []
    for p in paths:
        with safe_open(str(p), "pt") as f:
            metas.append(f.metadata())
    if metas[0]["step"] != metas[1]["step"]:
        raise BadInput(f"--resume=True: {paths[0]} (step {metas[0]['step']}) and {paths[1]} (step {metas[1]['step']}) differ")
    try:
        model.load_state_dict(load_file(str(paths[0])))
    except RuntimeError as e:
        raise BadInput(f"{paths[0]}: does not fit the config: {str(e).splitlines()[1].strip()}") from None
    state = defaultdict(dict)
    for key, t in load_file(str(paths[1])).items():
        _, i, name = key.split(".", 2)
        state[int(i)][name] = t
    opt.load_state_dict({"state": dict(state), "param_groups": json.loads(metas[1]["param_groups"])})
    return int(metas[0]["step"])


# ----------------------------------------------------------------------------- training

def setup_device(cfg):
    """(rank, world, device); joins the process group when launched by torchrun (RANK set)."""
    if "RANK" not in os.environ:
        return 0, 1, cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    use_cuda = torch.cuda.is_available() and cfg.device in ("", "cuda")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size(), f"cuda:{torch.cuda.current_device()}" if use_cuda else "cpu"


PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def train(cfg, pools, model, device, rank, world, out_dir, log):
    """The loop of the script anatomy; returns summary numbers (final loss, tok/s, time)."""
    if cfg.batch_size % (world * cfg.grad_accum):
        raise BadInput(f"--batch_size={cfg.batch_size} must divide by ranks x grad_accum = {world * cfg.grad_accum}")
    n_decoder = count_params(model.model) + count_params(model.lm_head)
    peak = cfg.lr or paper_lr(n_decoder)
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if (p.dim() >= 2) == decay and n.startswith(("vision_model.", "connector.")) == vis],
               "weight_decay": cfg.weight_decay if decay else 0.0,  # no decay on norms and biases
               "lr_mult": cfg.vision_lr_mult if vis else 1.0} for decay in (True, False) for vis in (True, False)]
    opt = torch.optim.AdamW(groups, lr=peak, betas=(0.9, 0.95), eps=1e-8)
    start = load_checkpoint(model, opt, out_dir) if cfg.resume else 0
    cuda = device.startswith("cuda")
    net = model
    if world > 1:  # text-only micro-batches leave the vision tower unused: find_unused_parameters
        net = nn.parallel.DistributedDataParallel(model, device_ids=[torch.cuda.current_device()] if cuda else None,
                                                  find_unused_parameters=True)
    if cfg.compile and cuda:
        net = torch.compile(net)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    rows_per_rank = cfg.batch_size // world
    micro = rows_per_rank // cfg.grad_accum
    end = min(cfg.steps, cfg.stop_after) if cfg.stop_after else cfg.steps
    # MFU: 6 FLOPs per active parameter per token (+ attention), ViT per patch token
    active = n_decoder - (1 - cfg.top_k / cfg.n_experts) * sum(p.numel() for n, p in model.named_parameters() if n.endswith((".w1", ".w2", ".w3")))
    flops_per_token = 6 * active + 12 * cfg.n_layer * cfg.n_embd * cfg.seq_len
    vit_flops_per_image = 6 * count_params(model.vision_model) * ((cfg.image_size // cfg.patch_size) ** 2 + 1)
    peak_flops = next((v for k, v in PEAK_BF16_FLOPS.items() if cuda and k in torch.cuda.get_device_name()), None)
    summary = dict(start_step=start, peak_lr=peak, decoder_params=n_decoder, total_params=count_params(model))
    t_start, t_log, tokens_since, images_since, loss = time.time(), time.time(), 0, 0, float("nan")
    model.train()
    bar = tqdm(range(start, end), desc="train", disable=rank != 0, initial=start, total=end)
    for step in bar:
        lr = lr_at(step, cfg, peak)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_mult"]
        ids, targets, row_images, n_targets = get_batch(pools, cfg, step)
        loss_sum = torch.zeros((), device=device)
        for m in range(cfg.grad_accum):
            rows = list(range(rank * rows_per_rank + m * micro, rank * rows_per_rank + (m + 1) * micro))
            images = [pools.bank[j] for r in rows for j in row_images[r]]
            images = torch.stack(images).to(device) if images else None
            sync = contextlib.nullcontext() if world == 1 or m == cfg.grad_accum - 1 else net.no_sync()
            with sync, autocast():
                logits, aux = net(ids[rows].to(device), images)
                part = lm_loss_sum(logits, targets[rows].to(device))
                # sum / global count x world: DDP's gradient mean then equals the global token mean
                (part / n_targets * world + moe_aux_loss(aux, cfg) / cfg.grad_accum).backward()
            loss_sum += part.detach()
            images_since += 0 if images is None else len(images)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens_since += cfg.batch_size * cfg.seq_len
        if world > 1:
            dist.all_reduce(loss_sum)
        loss = loss_sum.item() / n_targets
        if (step + 1) % cfg.log_every == 0 or step + 1 == end:
            dt = time.time() - t_log
            line = dict(step=step + 1, loss=round(loss, 6), lr=lr, tok_per_s=round(tokens_since / dt, 1))
            if peak_flops:
                line["mfu"] = round((flops_per_token * tokens_since + vit_flops_per_image * images_since * world) / dt / (peak_flops * world), 4)
            log(line)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{line['tok_per_s']:.0f}")
            t_log, tokens_since, images_since = time.time(), 0, 0
        if rank == 0 and ((step + 1) % cfg.ckpt_every == 0 or step + 1 == end):
            save_checkpoint(model, opt, cfg, step + 1, out_dir)
    bar.close()
    elapsed = time.time() - t_start
    summary.update(final_train_loss=loss, train_time_s=round(elapsed, 1),
                   train_tok_per_s=round((end - start) * cfg.batch_size * cfg.seq_len / max(elapsed, 1e-9), 1))
    return summary


# ----------------------------------------------------------------------------- evaluation

def words(text):
    """Lower-cased alphanumeric words: the stand-in for the PTB tokenizer (no Java here)."""
    return re.findall(r"[a-z0-9]+", text.lower())


def cider_d(candidates, references, n=4, sigma=6.0):
    """CIDEr-D (Vedantam et al. 2015, as in pycocoevalcap): per n-gram order, the cosine between TF-IDF
    vectors of candidate and each reference, candidate counts clipped at the reference's, times a Gaussian
    penalty on the length difference; mean over orders and references, x 10. IDF from the references.
    Returns (corpus mean, per-item scores). (Like pycocoevalcap, the 'length' is the bigram count.)"""
    def grams(text):
        w = text.split()
        return Counter(tuple(w[i:i + k]) for k in range(1, n + 1) for i in range(len(w) - k + 1))

    cands = [grams(c) for c in candidates]
    refs = [[grams(r) for r in rs] for rs in references]
    doc_freq = Counter(g for rs in refs for g in set().union(*rs))
    log_n_docs = math.log(len(refs))

    def tfidf(counts):
        vec = [{} for _ in range(n)]
        for g, tf in counts.items():
            vec[len(g) - 1][g] = tf * (log_n_docs - math.log(max(1.0, doc_freq[g])))
        norms = [math.sqrt(sum(x * x for x in v.values())) for v in vec]
        return vec, norms, sum(tf for g, tf in counts.items() if len(g) == 2)

    scores = []
    for cand, rs in zip(cands, refs):
        vc, nc, lc = tfidf(cand)
        total = 0.0
        for r in rs:
            vr, nr, lr = tfidf(r)
            penalty = math.exp(-((lc - lr) ** 2) / (2 * sigma ** 2))
            for k in range(n):
                dot = sum(min(x, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, x in vc[k].items())
                total += (dot / (nc[k] * nr[k]) if nc[k] and nr[k] else 0.0) * penalty / n
        scores.append(10.0 * total / len(rs))
    return float(np.mean(scores)), scores


def prompt_tensors(pools, parts, image_tokens, device):
    """Parts (bank index = image, str = text, None = end of text) -> ids (1, T) and images (N, 3, S, S)."""
    ids, images = [], []
    for part in parts:
        if part is None:
            ids.append(pools.eot_id)
        elif isinstance(part, int):
            ids += [pools.image_id] * image_tokens
            images.append(pools.bank[part])
        else:
            ids += pools.enc.encode_ordinary(part)
    return torch.tensor([ids], device=device), torch.stack(images).to(device)


@torch.no_grad()
def evaluate(model, pools, cfg, device):
    """k-shot captioning CIDEr and VQA accuracy on held-out test scenes; text-only perplexity.
    Few-shot = k (image, answer) demonstrations from the training split before the query (as in MM1)."""
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed)
    metrics, samples = {}, defaultdict(dict)
    for k in [int(s) for s in cfg.shots.split(",")]:
        captions, correct = [], 0
        for i, item in enumerate(pools.eval_items):
            order = np.random.default_rng([cfg.seed, i]).permutation(len(pools.shot_items))[:k]  # 4-shot within 8-shot
            demos = [pools.shot_items[j] for j in order]
            ids, images = prompt_tensors(pools, [p for d in demos for p in (d["image"], d["refs"][0], None)] + [item["image"]],
                                         cfg.image_tokens, device)
            out = model.generate(ids, images, cfg.max_new_tokens, pools.eot_id, cfg.temperature, gen)
            captions.append(pools.enc.decode(out).strip())
            # VQA in the interleaved documents' own style: "<image> How many hearts are there? 1."
            qa = [p for d in demos for p in (d["image"], f"{d['vqa'][0]} {d['vqa'][1]}.", None)]
            ids, images = prompt_tensors(pools, qa + [item["image"], item["vqa"][0]], cfg.image_tokens, device)
            answer = pools.enc.decode(model.generate(ids, images, 8, pools.eot_id, cfg.temperature, gen))
            correct += words(re.split(r"[.?!\n]", answer)[0]) == words(item["vqa"][1])  # first sentence only
            if i < 6:
                samples[i].update(image=item["image"], ref=item["refs"][0], **{f"{k}-shot": captions[-1]})
        cider = cider_d([" ".join(words(c)) for c in captions],
                        [[" ".join(words(r)) for r in item["refs"]] for item in pools.eval_items])[0]
        metrics[f"caption_cider_{k}shot"] = round(100 * cider, 2)  # x100 as papers report CIDEr
        metrics[f"distinct_captions_{k}shot"] = len(set(captions))  # 1: the same caption for every image
        metrics[f"vqa_acc_{k}shot"] = round(100 * correct / len(pools.eval_items), 2)
        metrics[f"average_{k}shot"] = round((metrics[f"caption_cider_{k}shot"] + metrics[f"vqa_acc_{k}shot"]) / 2, 2)
    # the blind baseline: one caption for every test image, the training caption that best matches other training
    # captions (CIDEr-D over 300 of them; candidates: the 50 most frequent short ones). Templated references reward it.
    texts = [" ".join(words(pools.enc.decode(ids[(ids != pools.image_id) & (ids != pools.eot_id)].tolist())))
             for ids, _ in pools.caption_docs]
    short = [t for t in texts if len(t.split()) <= 20] or texts
    pool_refs = [[t] for t in np.random.default_rng(cfg.seed).choice(short, min(300, len(short)), replace=False)]
    candidates = [t for t, _ in Counter(short).most_common(50)]
    constant = max(candidates, key=lambda c: cider_d([c] * len(pool_refs), pool_refs)[0])
    metrics["constant_caption_cider"] = round(100 * cider_d([constant] * len(pools.eval_items),
                                                             [[" ".join(words(r)) for r in item["refs"]] for item in pools.eval_items])[0], 2)
    # does the model look at the image? caption NLL with a wrong image minus with the right one
    nll, count = {True: 0.0, False: 0.0}, 0
    for i, item in enumerate(pools.eval_items):
        for right in (True, False):
            image = item["image"] if right else pools.eval_items[(i + 1) % len(pools.eval_items)]["image"]
            ids, images = prompt_tensors(pools, [image, item["refs"][0], None], cfg.image_tokens, device)
            targets = ids[:, 1:].masked_fill(ids[:, 1:] == pools.image_id, -100)
            nll[right] += lm_loss_sum(model(ids[:, :-1], images)[0], targets).item()
        count += int((targets != -100).sum())
    metrics["image_gain_nats"] = round((nll[False] - nll[True]) / count, 4)
    nll, count = 0.0, 0
    for ids in pools.eval_passages:
        x = torch.tensor(ids[: cfg.seq_len + 1], dtype=torch.long, device=device)[None]
        logits, _ = model(x[:, :-1])
        nll += lm_loss_sum(logits, x[:, 1:]).item()
        count += x.shape[1] - 1
    metrics["text_ppl"] = round(math.exp(nll / max(count, 1)), 3)
    model.train()
    return metrics, list(samples.values())


def results_table(metrics, cfg):
    lines = ["| shots | caption CIDEr | distinct captions | VQA acc (%) | average |", "| --- | --- | --- | --- | --- |"]
    for k in cfg.shots.split(","):
        lines.append(f"| {k} | {metrics[f'caption_cider_{k}shot']:.1f} | {metrics[f'distinct_captions_{k}shot']} / {cfg.eval_scenes} | "
                     f"{metrics[f'vqa_acc_{k}shot']:.1f} | {metrics[f'average_{k}shot']:.1f} |")
    return "\n".join(lines) + (f"\n\nconstant-caption baseline (one training caption for every image): CIDEr "
                              f"{metrics['constant_caption_cider']:.1f}\ntext-only perplexity: {metrics['text_ppl']:.2f}\n"
                              f"caption NLL gain from the right image (vs a wrong one): {metrics['image_gain_nats']:.3f} nats/token")


def draw_samples(samples, pools, path):
    """Sample captions under their test images (the zero-shot and the most-shot generation)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(samples), figsize=(3.2 * len(samples), 4.2), squeeze=False)
    for ax, s in zip(axes[0], samples):
        ax.imshow(pools.bank[s["image"]].permute(1, 2, 0).numpy())
        ax.axis("off")
        text = "\n".join(f"{k}: {v}" for k, v in s.items() if k != "image")
        ax.set_title("\n".join(line[i:i + 38] for line in text.split("\n") for i in range(0, len(line), 38)), fontsize=6, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- main

def run(cfg, pools=None):
    """One training run + evaluation; writes config.json, log.jsonl, metrics.json, report.md, samples.png."""
    rank, world, device = setup_device(cfg)
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        print("config:", json.dumps(asdict(cfg)))
        (out_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    log_path = out_dir / "log.jsonl"
    if rank == 0 and not cfg.resume:
        log_path.write_text("")

    def log(line):
        if rank == 0:
            with open(log_path, "a") as f:
                f.write(json.dumps(line) + "\n")

    t0 = time.time()
    pools = pools or Pools(cfg, get_tokenizer())
    data_time = time.time() - t0
    model = MM1(cfg, pools.enc.n_vocab, pools.image_id).to(device)
    stage0 = {}
    if cfg.init_vit:
        n = load_hf_weights(model, cfg.init_vit, "vision_model.")
        print(f"loaded {n} ViT tensors from {cfg.init_vit}")
    elif cfg.vit_pretrain_steps and not cfg.resume:  # a resumed run takes its ViT from the checkpoint
        # one pre-trained ViT per ViT config and process: ablation rows share it, as MM1's ablations share CLIP
        key = tuple(getattr(cfg, k) for k in ("seed", "image_size", "patch_size", "vit_width", "vit_layers", "vit_heads",
                                                "vit_pretrain_steps", "vit_pretrain_batch", "vit_pretrain_lr"))
        t_vit = time.time()
        if key not in pools.pretrained_vit:
            stats = pretrain_vit(model, pools, cfg, device, log)
            pools.pretrained_vit[key] = ({k: v.clone() for k, v in model.vision_model.state_dict().items()}, stats)
        state, stats = pools.pretrained_vit[key]
        model.vision_model.load_state_dict(state)
        stage0 = dict(stats, vit_pretrain_time_s=round(time.time() - t_vit, 1))
        if rank == 0:
            print(f"stage 0 (tiny CLIP, {cfg.vit_pretrain_steps} steps): " + json.dumps(stage0))
    if cfg.init_llm:
        n = load_hf_weights(model, cfg.init_llm, ("model.", "lm_head."))
        print(f"loaded {n} LLM tensors from {cfg.init_llm}")
    summary = {**stage0, **train(cfg, pools, model, device, rank, world, out_dir, log)}
    if world > 1:
        dist.barrier()
    if rank != 0 or (cfg.stop_after and cfg.stop_after < cfg.steps):  # a split run evaluates once, at its end
        if world > 1:
            dist.destroy_process_group()
        return summary
    t1 = time.time()
    metrics, samples = evaluate(model, pools, cfg, device)
    metrics.update(summary, data_time_s=round(data_time, 1), eval_time_s=round(time.time() - t1, 1))
    table = results_table(metrics, cfg)
    print(table)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    draw_samples(samples, pools, out_dir / "samples.png")
    sample_lines = "\n".join(f"- reference: {s['ref']!r} -> " + "; ".join(f"{k}: {v!r}" for k, v in s.items()
                                                                       if k not in ("image", "ref")) for s in samples)
    (out_dir / "report.md").write_text(
        f"# MM1 miniature ({cfg.preset} preset)\n\n{table}\n\n"
        f"Decoder {metrics['decoder_params'] / 1e6:.2f}M params, total {metrics['total_params'] / 1e6:.2f}M, "
        f"peak lr {metrics['peak_lr']:.2e}, {cfg.steps} steps x {cfg.batch_size} x {cfg.seq_len} tokens, "
        f"final train loss {metrics['final_train_loss']:.3f}, {metrics['train_tok_per_s']:.0f} tok/s, "
        f"data {metrics['data_time_s']} s, train {metrics['train_time_s']} s, eval {metrics['eval_time_s']} s on {device}.\n\n"
        f"## Samples (test scenes)\n\n{sample_lines}\n\n![samples](samples.png)\n")
    if world > 1:
        dist.destroy_process_group()
    return metrics


def bench_decoder(cfg, repeats=5):
    """Median time of one training step (forward, fp32 loss, backward, AdamW) of our decoder and of
    transformers' LlamaForCausalLM with the same config, weights and batch (a benchmark, not a test)."""
    from transformers import LlamaConfig, LlamaForCausalLM  # dev dependency, only needed here
    vocab = get_tokenizer().n_vocab
    ours = MM1(cfg, vocab, image_token_id=-1)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=cfg.n_embd, intermediate_size=cfg.ffn_hidden,
                                      num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                                      num_key_value_heads=cfg.n_kv_head, rms_norm_eps=1e-6, rope_theta=cfg.rope_theta,
                                      max_position_embeddings=cfg.seq_len, tie_word_embeddings=False))
    hf.load_state_dict({k: v for k, v in ours.state_dict().items() if k.startswith(("model.", "lm_head."))})
    ids = torch.randint(0, vocab, (cfg.batch_size, cfg.seq_len + 1), generator=torch.Generator().manual_seed(0))

    def step_ours():
        logits, _ = ours(ids[:, :-1])
        (lm_loss_sum(logits, ids[:, 1:]) / ids[:, 1:].numel()).backward()

    def step_hf():
        hf(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss.backward()  # HF shifts the labels itself

    times = {}
    for name, model, fn in (("ours", ours, step_ours), ("transformers", hf, step_hf), ("ours_again", ours, step_ours)):
        params = [p for n, p in model.named_parameters() if not n.startswith(("vision_model.", "connector."))]
        opt = torch.optim.AdamW(params, lr=1e-4)
        samples = []
        for _ in range(repeats + 2):  # 2 warm-up steps
            t = time.perf_counter()
            fn()
            opt.step()
            opt.zero_grad(set_to_none=True)
            samples.append(time.perf_counter() - t)
        times[name] = sorted(samples[2:])[repeats // 2]
    ours_t = min(times["ours"], times["ours_again"])  # run ours before and after: less order bias
    tokens = cfg.batch_size * cfg.seq_len
    print(f"decoder training step, batch {cfg.batch_size} x {cfg.seq_len}, {cfg.n_layer} layers x {cfg.n_embd}, "
          f"{torch.get_num_threads()} threads:\n| impl | ms / step | tok/s |\n| --- | --- | --- |\n"
          f"| mm1.py | {1000 * ours_t:.0f} | {tokens / ours_t:.0f} |\n"
          f"| transformers LlamaForCausalLM | {1000 * times['transformers']:.0f} | {tokens / times['transformers']:.0f} |\n"
          f"speed ratio (transformers time / ours): {times['transformers'] / ours_t:.2f}")
    return dict(ours_s=ours_t, transformers_s=times["transformers"], ratio=times["transformers"] / ours_t)


def run_ablation(cfg):
    """Train every row of one ablation grid on shared pre-rendered data; print and save the table."""
    pools = Pools(cfg, get_tokenizer())
    header = {"connector": "| connector | image tokens", "mix": "| caption:interleaved:text", "moe": "| FFN"}[cfg.ablate]
    shots = cfg.shots.split(",")
    lines = [header + "".join(f" | {k}-shot" for k in shots) + f" | distinct {shots[0]}-shot captions | text ppl | image gain | total params | minutes |",
             "| --- " * (header.count("|") + len(shots) + 5) + "|"]
    results = {}
    for label, overrides in ABLATIONS[cfg.ablate]:
        sub = dataclasses.replace(cfg, ablate="", out_dir=str(Path(cfg.out_dir) / f"ablate_{cfg.ablate}" / re.sub(r"\W+", "_", label)), **overrides)
        check_config(sub)
        t0 = time.time()
        m = run(sub, pools)
        results[label] = {**m, "minutes": round((time.time() - t0) / 60, 2)}
        lines.append(f"| {label}" + "".join(f" | {m[f'average_{k}shot']:.1f}" for k in shots) +
                     f" | {m[f'distinct_captions_{shots[0]}shot']} / {sub.eval_scenes} | {m['text_ppl']:.2f} | {m['image_gain_nats']:.3f} | {m['total_params'] / 1e6:.2f}M | {results[label]['minutes']:.1f} |")
        (Path(cfg.out_dir) / f"ablate_{cfg.ablate}.md").write_text("\n".join(lines) + "\n")  # partial tables survive
    table = "\n".join(lines)
    print(f"\nablation {cfg.ablate} (k-shot = mean of caption CIDEr and VQA accuracy, as MM1 averages):\n{table}")
    (Path(cfg.out_dir) / f"ablate_{cfg.ablate}.json").write_text(json.dumps(results, indent=2))
    return results


def main(argv=None):
    try:
        cfg = parse_args(sys.argv[1:] if argv is None else argv)
        if cfg.bench:
            return bench_decoder(cfg)
        return run_ablation(cfg) if cfg.ablate else run(cfg)
    except BadInput as e:
        print(f"mm1.py: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
