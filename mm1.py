"""MM1 pre-training in miniature: CLIP ViT -> VL connector -> Llama decoder (+MoE), with MM1's ablations.

McKinzie et al., "MM1: Methods, Analysis & Insights from Multimodal LLM Pre-training", arXiv:2403.09611.
On ShapesWorld (data/shapes/): image tokens spliced into the text at `<image>`; the three VL connectors
(average pooling, attention pooling, C-Abstractor); caption / interleaved / text-only data at a ratio
(45:45:10); the paper's lr rule; an optional MoE FFN every k layers (top-2, balance 0.01, z 0.001); 0/4/8-shot
captioning CIDEr and VQA, text perplexity. MM1 starts from a pre-trained CLIP and LLM, so we pre-train both
in miniature first: stage 0, a tiny CLIP (a conv-stem ViT + a bag-of-words text tower, InfoNCE on caption
pairs, plus each object's shape and colour from its box: a CLIP this small learns no shape); stage 0b, the
decoder on text alone; then MM1 pre-training of connector + decoder (the ViT frozen) with average pooling, SSC
captions and 2 VQA per scene (a C-Abstractor or a connector-only warm-up collapses the image tokens here).

    python mm1.py                                   # cpu preset (default without CUDA): prints the table
    python mm1.py --preset=smoke                    # tiny, < 1 min (what the tests run)
    torchrun --standalone --nproc_per_node=8 mm1.py --preset=gpu  # DDP; with --ablate: whole rows per process
    python mm1.py --preset=ablate --ablate=connector  # grid: connector|resolution|mix|captions|moe, 3 seeds
    python mm1.py --train_data=mix.json --image_folder=images/   # your LLaVA JSON / image-text CSV|JSONL
    python -m kernels.bench_decoder                 # our decoder's training step vs transformers' Llama

Table (vl_tasks.results_table, also in out_dir/report.md; metrics.json): k-shot caption CIDEr, distinct
captions, main object named, VQA exact match; baselines (constant caption, majority answer), text perplexity
on test passages unseen / seen in training, image gain (nats/token) and the connector's image variance share.
Checkpoint (out_dir/model.safetensors): HF names, `vision_model.*` (CLIPVisionModel), `connector.*`, `model.*`
and `lm_head.*` (LlamaForCausalLM); metadata: format version, config, step, `arch` (JSON, see arch_of(): every
field and constant needed to rebuild the model without this file), tokenizer_sha256, image_token_id.
"""
import ast
import csv
import dataclasses
import inspect
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from data import InputError, shapes, vl_tasks
from data.clip_tasks import object_regions
from data.tokenizer import get_tokenizer
from data.vl_tasks import Pools, doc_attention, evaluate, get_batch, tokenizer_sha256, vision_probe
from kernels import attention, moe_ffn


# ----------------------------------------------------------------------------- config
@dataclass
class Config:
    preset: str = "auto"            # smoke | cpu | ablate | gpu (auto: gpu with CUDA, else cpu)
    out_dir: str = "out/mm1"        # output folder
    seed: int = 0                   # weights, data order and held-out scenes
    device: str = "auto"            # auto | cpu | cuda | mps
    resume: bool = False            # continue from out_dir/model.safetensors + model.optimizer.safetensors
    ablate: str = ""                # connector | resolution | mix | captions | moe: run that ablation grid
    image_size: int = 64            # rendered image side (pixels)
    mix: str = "45:45:10"           # caption : interleaved : text-only share of training sequences
    caption_formats: tuple = ("ssc",)  # ShapesWorld caption styles in the caption stream
    train_data: str = ""            # your LLaVA JSON or image-text CSV/JSONL (replaces ShapesWorld captions)
    image_folder: str = ""          # folder that relative image paths of train_data start from (LLaVA's)
    n_caption_scenes: int = 3000    # pre-rendered training scenes of the caption stream
    n_documents: int = 600          # pre-rendered interleaved training documents
    n_passages: int = 2000          # text-only training passages
    vqa_per_scene: int = 2          # "Question: .. Answer: .." documents per caption scene (the eval format)
    seq_len: int = 256              # tokens per packed training sequence
    patch_size: int = 8             # ViT patch side (pixels)
    vit_width: int = 128            # ViT hidden size
    vit_layers: int = 4             # ViT blocks
    vit_heads: int = 4              # ViT attention heads
    vit_stem: int = 3               # 3x3 conv layers before the patchify conv (0: HF CLIP's patchify alone)
    connector: str = "avgpool"      # avgpool | attnpool | cabstractor (cabstractor collapses at this scale)
    image_tokens: int = 16          # LLM tokens per image (a square number for the pooling connectors)
    n_layer: int = 6                # decoder blocks
    n_embd: int = 192               # decoder width
    n_head: int = 6                 # query heads
    n_kv_head: int = 2              # key/value heads (GQA)
    ffn_hidden: int = 512           # SwiGLU hidden size
    rope_theta: float = 10000.0     # RoPE base
    moe_every: int = 0              # an MoE FFN in every k-th block (0: dense model)
    n_experts: int = 8              # experts per MoE FFN
    top_k: int = 2                  # experts per token
    steps: int = 300                # optimizer steps
    batch_size: int = 8             # sequences per step (global, over all ranks)
    lr: float = 0.0                 # peak lr (0: MM1's rule exp(-0.4214 ln N - 0.5535), N = decoder params)
    vit_lr_mult: float = 0.0        # lr multiplier of the ViT in MM1 training (0: frozen after stage 0)
    connector_lr_mult: float = 1.0  # lr multiplier of the connector
    weight_decay: float = 0.1       # AdamW decay; torch multiplies it by lr (per-step 0.1 * lr, as the paper)
    warmup: int = 30                # linear warmup steps, then cosine to min_lr_frac * lr
    min_lr_frac: float = 0.1        # final lr / peak lr
    grad_clip: float = 1.0          # max global grad norm
    log_every: int = 10             # steps between log lines
    ckpt_every: int = 100           # steps between checkpoints (and at the end)
    stop_after: int = 0             # stop after this many steps (0: run all), for split runs
    vit_pretrain_steps: int = 2000  # stage 0: tiny-CLIP steps for the ViT (0: from scratch)
    vit_pretrain_batch: int = 8     # stage 0 (image, caption) pairs per step
    vit_pretrain_lr: float = 1e-3   # stage 0 peak lr (warmup + cosine)
    vit_region_weight: float = 4.0  # stage 0: + this x each object's shape + colour CE, from its box
    lm_pretrain_steps: int = 100    # stage 0b: text-only steps of the decoder (passages + caption words)
    connector_warmup_steps: int = 0  # caption steps of the connector alone, ViT + decoder frozen (collapses)
    doc_mask: bool = True           # packed rows: positions restart and attention stays inside each document
    eval_scenes: int = 100          # held-out test scenes for captioning and VQA
    shots: tuple = (0, 4, 8)        # few-shot settings to evaluate
    n_eval_passages: int = 30       # held-out text passages for perplexity
    max_new_tokens: int = 24        # caption length limit at generation
    eval_every: int = 100           # steps between vision probes (image gain, connector variance share)
    ablation_seeds: tuple = (0, 1, 2)  # --ablate: seeds per row (mean ± sd)

PRESETS = {  # smoke keeps the C-Abstractor recipe: the test chain's dpo_bdhs.py holds only that connector
    "smoke": dict(image_size=32, patch_size=8, vit_width=32, vit_layers=1, vit_heads=2, image_tokens=4,
                  n_layer=2, n_embd=64, n_head=4, n_kv_head=2, ffn_hidden=128, seq_len=96, batch_size=4,
                  steps=30, warmup=3, log_every=5, ckpt_every=15, n_caption_scenes=48, n_documents=12,
                  n_passages=24, eval_scenes=3, shots=(0, 2), n_eval_passages=4, max_new_tokens=8, lr=3e-3,
                  vit_pretrain_steps=60, lm_pretrain_steps=20, connector_warmup_steps=10, eval_every=15,
                  connector="cabstractor", caption_formats=("ssc", "dsc"), vqa_per_scene=1), "cpu": dict(),
    "ablate": dict(vit_width=96, vit_layers=3, n_layer=4, n_embd=128, n_head=4, n_kv_head=2, ffn_hidden=384,
                   seq_len=320, shots=(0, 4), n_caption_scenes=1200, n_documents=300, n_passages=1000,
                   n_eval_passages=100, vit_pretrain_steps=200, vit_pretrain_batch=64,  # 8 shots: > 320 tok
                   vit_pretrain_lr=2e-3, vit_stem=0, vit_region_weight=0.0, vit_lr_mult=0.1),  # grids' recipe
    "gpu": dict(image_size=224, patch_size=14, vit_width=768, vit_layers=12, vit_heads=12, image_tokens=64,
                n_layer=16, n_embd=1024, n_head=16, n_kv_head=4, ffn_hidden=2816, seq_len=1024, batch_size=64,
                steps=5000, warmup=200, log_every=20, ckpt_every=500, n_caption_scenes=60000,
                n_documents=10000, n_passages=40000, eval_scenes=200, n_eval_passages=200, vit_stem=0,
                vit_pretrain_steps=3000, vit_pretrain_batch=64),  # patch 14: a conv stem would run at 112 px
}
ABLATIONS = {  # name -> (row label, overrides); 36-token and DSC rows: longer contexts, ~55 images per step
    "connector": [(f"{c}, {k} tokens", dict(connector=c, image_tokens=k, seq_len=320 if k == 16 else 496))
                  for c in ("avgpool", "attnpool", "cabstractor") for k in (16, 36)],
    "resolution": [(f"{s} px", dict(image_size=s)) for s in (32, 64, 96)] + [("64 px, random ViT",
                                                                              dict(vit_pretrain_steps=0))],
    "mix": [(m, dict(mix=m)) for m in ("100:0:0", "0:100:0", "45:45:10", "50:10:40")],
    "captions": [(" + ".join(f), dict(caption_formats=f, seq_len=n)) for f, n in zip((("alttext",), ("ssc",),
                 ("dsc",), ("alttext", "ssc"), ("alttext", "dsc")), (312, 320, 400, 312, 376))],
    "moe": [("dense", dict(moe_every=0)), ("moe every 2, 8 experts", dict(moe_every=2, n_experts=8))],
}
RESUME_MAY_DIFFER = ("resume", "stop_after", "device", "out_dir", "log_every", "ckpt_every", "eval_scenes",
                     "n_eval_passages", "shots", "max_new_tokens", "eval_every", "ablation_seeds")

def check_config(cfg: Config) -> None:
    """Script-specific checks of the values (the skeleton checks keys and types)."""
    if cfg.connector not in ("avgpool", "attnpool", "cabstractor"):
        raise InputError(f"--connector={cfg.connector}: expected avgpool, attnpool or cabstractor")
    if cfg.connector != "attnpool" and math.isqrt(cfg.image_tokens) ** 2 != cfg.image_tokens:
        raise InputError(f"--image_tokens={cfg.image_tokens}: {cfg.connector} needs a square number")
    if not 0 <= cfg.vit_stem <= 1 + math.log2(cfg.vit_width):  # its channels double up to vit_width
        raise InputError(f"--vit_stem={cfg.vit_stem}: expected 0 .. 1 + log2(--vit_width) conv layers")
    if cfg.image_size % cfg.patch_size:
        raise InputError(f"--image_size={cfg.image_size}: expected a multiple of --patch_size")
    if cfg.n_embd % cfg.n_head or cfg.n_head % cfg.n_kv_head or cfg.vit_width % cfg.vit_heads:
        raise InputError("expected n_embd divisible by n_head, n_head by n_kv_head, vit_width by vit_heads")
    if cfg.ablate and cfg.ablate not in ABLATIONS:
        raise InputError(f"--ablate={cfg.ablate}: expected one of {', '.join(ABLATIONS)}")
    if cfg.moe_every and cfg.n_layer % cfg.moe_every or cfg.batch_size % int(os.environ.get("WORLD_SIZE", 1)):
        raise InputError("expected --n_layer divisible by --moe_every and --batch_size by the ranks")
    vl_tasks.mix_weights(cfg.mix)
    if bad := [f for f in cfg.caption_formats if f not in shapes.CAPTION_FORMATS]:
        raise InputError(f"--caption_formats: unknown {bad[0]!r}, expected some of {shapes.CAPTION_FORMATS}")
    if cfg.image_folder and not Path(cfg.image_folder).is_dir():  # fail before minutes of data building
        raise InputError(f"--image_folder={cfg.image_folder}: no such folder")

# ============================================================================= skeleton: begin
# The shared skeleton, byte for byte the same in every script (tests/test_skeleton.py diffs the copies):
# CLI and --help, device, seeding, lr schedule, AdamW, checkpoints, log.jsonl, outputs, error handler.
# It needs `Config` above it (a dataclass, one `name: type = default  # meaning` line per field, with
# preset, out_dir, seed, device and resume) and PRESETS (name -> overrides, with smoke, cpu and gpu).
CKPT_FORMAT = 1  # version of the checkpoint layout written by save_checkpoint
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def config_help() -> str:
    """--help: every Config field with its default and meaning, aligned, then the presets."""
    lines = [__doc__.strip().splitlines()[0], "", f"usage: python {Path(sys.argv[0]).name} [--key=value ...]"]
    for line in inspect.getsource(Config).splitlines():
        field = re.match(r"\s+(\w+): [^=]+ = (.+?)\s+# (.*)", line)
        if field:
            lines.append(f"  --{field[1] + '=' + field[2]:<36} {field[3]}")
        elif line.strip().startswith("#"):
            lines.append(" " + line.strip().lstrip("#"))  # section comments inside Config
    return "\n".join([*lines, f"presets: {', '.join(PRESETS)} (auto: gpu with CUDA, else cpu)"])


def parse_value(key: str, raw: str, default):
    """One --key=value, type-checked against the field's default: strings stay as typed, tuples take comma
    lists (--shots=0,4,8), everything else goes through ast.literal_eval (never bool('False') == True)."""
    if isinstance(default, tuple):
        kind = type(default[0]) if default else str
        return tuple(parse_value(key, part.strip(), kind()) for part in raw.split(",") if part.strip())
    if isinstance(default, str):
        return raw
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = None
    if isinstance(default, float) and type(value) is int:
        value = float(value)
    if type(value) is not type(default):
        raise InputError(f"--{key}={raw}: expected {type(default).__name__}, like --{key}={default!r}")
    return value


def parse_config(argv: list[str]) -> Config:
    """A preset plus --key=value overrides (nanoGPT's configurator); an unknown key is an error."""
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    overrides = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(config_help())
            raise SystemExit(0)
        key, eq, raw = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not eq:
            raise InputError(f"argument {arg!r}: expected --key=value (see --help)")
        if key not in defaults:
            raise InputError(f"--{key}: unknown config key (see --help)")
        overrides[key] = parse_value(key, raw, defaults[key])
    preset = overrides.get("preset", defaults["preset"])
    preset = ("gpu" if torch.cuda.is_available() else "cpu") if preset == "auto" else preset
    if preset not in PRESETS:
        raise InputError(f"--preset={preset}: expected auto or one of {', '.join(PRESETS)}")
    return Config(**{**PRESETS[preset], **overrides, "preset": preset})


def setup_device(name: str) -> tuple[str, int, int]:
    """(device, rank, world) for --device=auto|cpu|cuda|mps, checked before any work. Under torchrun (RANK
    set) the process joins the group: nccl with one GPU per local rank, gloo on CPU."""
    if name not in ("auto", "cpu", "cuda", "mps"):
        raise InputError(f"--device={name}: expected auto, cpu, cuda or mps")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device=cuda: no CUDA device on this machine (use --device=cpu)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise InputError("--device=mps: no Apple MPS device on this machine (use --device=cpu)")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
    if "RANK" not in os.environ:
        return device, 0, 1
    if device == "mps":
        raise InputError("--device=mps: torchrun runs on cpu (gloo) or cuda (nccl)")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = f"cuda:{torch.cuda.current_device()}"
    return device, dist.get_rank(), dist.get_world_size()


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; returns a CPU generator for the data order."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float) -> float:
    """Linear warm-up to `peak` over `warmup` steps, then cosine decay to `floor` at step `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


def make_adamw(model: torch.nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95), lr_mult=None):
    """AdamW with decay only on parameters of 2 or more dimensions (matrices, embeddings; not norms, biases).
    lr_mult maps a parameter-name prefix to an lr multiplier ({"vision_model.": 0.3}); set_lr applies it."""
    groups = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            mult = next((m for prefix, m in (lr_mult or {}).items() if name.startswith(prefix)), 1.0)
            groups.setdefault((mult, weight_decay if param.dim() >= 2 else 0.0), []).append(param)
    return torch.optim.AdamW([{"params": params, "lr_mult": mult, "weight_decay": decay}
                              for (mult, decay), params in groups.items()], lr=lr, betas=betas)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_mult"]


def read_safetensors(path, tensors: bool = True) -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors file; a missing or corrupt file is an InputError naming it."""
    if not Path(path).is_file():
        raise InputError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), "pt") as f:
            return ({k: f.get_tensor(k) for k in f.keys()} if tensors else {}), (f.metadata() or {})
    except SafetensorError as e:
        raise InputError(f"{path}: not a readable safetensors file ({e})") from None


def save_checkpoint(out_dir, model, optimizer, cfg: Config, step: int, meta=None, name: str = "model"):
    """{name}.safetensors: the weights under their (HF) names; metadata: format version, config, step and
    `meta` (values JSON-encoded). {name}.optimizer.safetensors: the AdamW state. Both are written to .tmp
    files and renamed only when both are complete, the optimizer first, so a kill leaves a consistent pair
    (or new optimizer state whose weights wait complete in .tmp, which load_checkpoint reads)."""
    out = Path(out_dir)
    model = getattr(model, "module", model)  # DDP
    model = getattr(model, "_orig_mod", model)  # torch.compile
    info = {"format_version": str(CKPT_FORMAT), "config": json.dumps(asdict(cfg)), "step": str(step)}
    info.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (meta or {}).items()})
    weights = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(out / f"{name}.safetensors.tmp"), metadata=info)
    if optimizer is not None:
        state = optimizer.state_dict()
        moments = {f"state.{i}.{k}": v.detach().to("cpu", copy=True) for i, s in state["state"].items()
                   for k, v in s.items() if torch.is_tensor(v)}
        opt_info = {**info, "param_groups": json.dumps(state["param_groups"])}
        save_file(moments, str(out / f"{name}.optimizer.safetensors.tmp"), metadata=opt_info)
        os.replace(out / f"{name}.optimizer.safetensors.tmp", out / f"{name}.optimizer.safetensors")
    os.replace(out / f"{name}.safetensors.tmp", out / f"{name}.safetensors")


def load_checkpoint(out_dir, cfg: Config, may_differ=(), name: str = "model"):
    """For --resume: (weights, optimizer state dict, step, metadata) of a save_checkpoint pair. Refuses a
    missing or mismatched pair, another format version, and a saved config that differs from cfg in any
    field outside `may_differ`, naming the fields. Reads only: call it before anything is written."""
    out = Path(out_dir)
    weights_path, optim_path = out / f"{name}.safetensors", out / f"{name}.optimizer.safetensors"
    _, optim_meta = read_safetensors(optim_path, tensors=False)
    pending = weights_path.with_name(weights_path.name + ".tmp")  # a save killed between its two renames
    if pending.is_file() and read_safetensors(pending, False)[1].get("step") == optim_meta.get("step"):
        weights_path = pending
    weights, meta = read_safetensors(weights_path)
    if meta.get("format_version") != str(CKPT_FORMAT):
        raise InputError(f"{weights_path}: format {meta.get('format_version')}, expected {CKPT_FORMAT}")
    if meta.get("step") != optim_meta.get("step"):
        raise InputError(f"{weights_path} (step {meta.get('step')}) and {optim_path} "
                         f"(step {optim_meta.get('step')}) are not one checkpoint")
    saved, now = json.loads(meta["config"]), json.loads(json.dumps(asdict(cfg)))
    changed = [k for k in now if k not in may_differ and saved.get(k) != now[k]]
    if changed:
        raise InputError(f"--resume=True: {weights_path} was saved with " + ", ".join(
            f"{k}={saved.get(k)!r} (now {now[k]!r})" for k in changed))
    state = {"state": {}, "param_groups": json.loads(optim_meta["param_groups"])}
    for key, tensor in read_safetensors(optim_path)[0].items():
        _, index, slot = key.split(".", 2)
        state["state"].setdefault(int(index), {})[slot] = tensor
    return weights, state, int(meta["step"]), meta


def check_out_dir(out_dir: str) -> Path:
    """Fail before any work when --out_dir can't be written. The nearest existing folder on its path is
    probed with an anonymous temporary file, which leaves nothing behind in an earlier run's folder."""
    probe = Path(out_dir).absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"--out_dir={out_dir}: {probe} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise InputError(f"--out_dir={out_dir}: cannot write in {probe} ({e.strerror})") from None
    return Path(out_dir)


class RunLog:
    """log.jsonl, appended and never truncated, one line per call with the same keys in every script:
    step, loss, lr, tok_s or items_s (throughput since the previous call), mfu on CUDA (flops_per_unit
    = training FLOPs per token or item), then any extras. Only rank 0 writes."""

    def __init__(self, out_dir, unit: str, flops_per_unit: float = 0.0, device="cpu", rank=0, world=1):
        self.path, self.unit, self.flops = Path(out_dir) / "log.jsonl", unit, flops_per_unit
        self.rank, self.world = rank, world
        gpu = torch.cuda.get_device_name() if str(device).startswith("cuda") else "none"
        self.peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in gpu), 0.0)
        self.last = time.time()

    def __call__(self, step: int, loss: float, lr: float, n_units: float, **extra) -> dict:
        """n_units: tokens (or items) processed over all ranks since the previous call."""
        seconds, self.last = max(time.time() - self.last, 1e-9), time.time()
        line = {"step": step, "loss": round(float(loss), 6), "lr": lr,
                f"{self.unit}_s": round(n_units / seconds, 1)}
        if self.peak and self.flops:
            line["mfu"] = round(self.flops * n_units / seconds / (self.peak * self.world), 4)
        line.update(extra)
        if self.rank == 0:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")
        return line


def write_outputs(out_dir, files: dict) -> None:
    """Write each {file name: content} atomically into out_dir (created here, after every check has passed):
    .json names get a dict or dataclass as JSON (config.json, metrics.json), others get text (report.md)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for filename, content in files.items():
        if dataclasses.is_dataclass(content):
            content = asdict(content)
        if filename.endswith(".json"):
            content = json.dumps(content, indent=2, default=lambda x: x.item())  # numpy / torch scalars
        (out / f"{filename}.tmp").write_text(content, encoding="utf-8")
        os.replace(out / f"{filename}.tmp", out / filename)


def run_main(main) -> None:
    """Run main(argv). User errors (InputError, OSError, decode and CSV errors, Ctrl-C) print one line,
    `<script>: error: <why>` (why starts with file:line where known), and exit with status 2; a bug in our
    own code keeps its traceback."""
    try:
        main(sys.argv[1:])
        return
    except KeyboardInterrupt:
        why = "interrupted; checkpoints written so far are complete (continue with --resume=True)"
    except InputError as e:
        why = str(e)
    except UnicodeDecodeError as e:
        why = f"byte 0x{e.object[e.start]:02x} at position {e.start} is not {e.encoding}: expected UTF-8 text"
    except csv.Error as e:
        why = f"CSV: {e}"
    except OSError as e:
        why = f"{e.filename}: {e.strerror}" if e.filename else str(e)
    print(f"{Path(sys.argv[0]).name}: error: {why}", file=sys.stderr)
    raise SystemExit(2)
# ============================================================================= skeleton: end

# ----------------------------------------------------------------------------- data
# data/vl_tasks.py (shared with the scripts after mm1): Pools (documents: ids with one `<image>` marker per
# image + image-bank indices; user-file readers), get_batch (packed rows), doc_attention (per-document mask).

# ----------------------------------------------------------------------------- model
# The CLIP ViT (HF CLIPVisionModel names), identical in clip_caption.py (tests/test_skeleton.py checks).
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
    """HF's patchify conv; stem > 0 puts 3x3 conv -> GroupNorm -> ReLU layers before it (Xiao et al. 2021,
    arXiv:2106.14881; not in HF's CLIPVisionModel), stride 2 while it divides the patch: same patch grid."""

    def __init__(self, width, patch, image_size, stem=0):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.randn(width) * 0.02)
        layers, channels, stride = [], 3, 1
        for i in range(stem):  # channels double up to the width: .., width / 2, width
            out, step = width >> (stem - 1 - i), 2 if patch % (2 * stride) == 0 else 1
            layers += [nn.Conv2d(channels, out, 3, step, 1, bias=False), nn.GroupNorm(1, out), nn.ReLU()]
            channels, stride = out, stride * step
        self.stem = nn.Sequential(*layers)  # (B, 3, H, W) -> (B, channels, H / stride, W / stride)
        self.patch_embedding = nn.Conv2d(channels, width, patch // stride, stride=patch // stride, bias=False)
        self.position_embedding = nn.Embedding((image_size // patch) ** 2 + 1, width)

    def forward(self, pixels):  # (B, 3, H, W) normalised
        patches = self.patch_embedding(self.stem(pixels)).flatten(2).transpose(1, 2)  # (B, P, C)
        cls = self.class_embedding.expand(len(patches), 1, -1)  # (B, 1, C)
        return torch.cat([cls, patches], 1) + self.position_embedding.weight  # (B, 1 + P, C)

class CLIPEncoder(nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(width, heads) for _ in range(layers))

class CLIPVisionTransformer(nn.Module):
    """CLIP's vision tower; its state_dict keys are CLIPVisionModel's minus the `vision_model.` prefix."""

    def __init__(self, cfg):
        super().__init__()
        w = cfg.vit_width
        self.embeddings = CLIPEmbeddings(w, cfg.patch_size, cfg.image_size, cfg.vit_stem)
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
        q = self.q_proj(self.queries).view(1, -1, self.heads, C // self.heads).transpose(1, 2)  # (1, H, K, D)
        k, v = (p(kv).view(N, P, self.heads, -1).transpose(1, 2) for p in (self.k_proj, self.v_proj))
        out = attention(q.expand(N, -1, -1, -1), k, v, causal=False).transpose(1, 2).reshape(N, -1, C)
        return self.proj(out + self.queries)  # (N, K, C)

class LayerNorm2d(nn.LayerNorm):
    def forward(self, x):  # (N, C, H, W): normalise over channels
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

class RegBlock(nn.Module):
    """RegNet bottleneck (timm defaults, as in Honeybee's C-Abstractor): 1x1 -> LN -> SiLU -> 3x3 depthwise
    -> LN -> SiLU -> squeeze-excite(0.25) -> 1x1 -> LN, plus the residual, then SiLU."""

    def __init__(self, width):
        super().__init__()
        self.conv1, self.norm1 = nn.Conv2d(width, width, 1, bias=False), LayerNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False)
        self.norm2 = LayerNorm2d(width)
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
        self.stage1, self.stage2 = (nn.Sequential(*map(RegBlock, [vit_width] * depth)) for _ in range(2))
        width = llm_width
        self.readout = nn.Sequential(nn.Linear(vit_width, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, feats):  # (N, P, Cv)
        grid = feats.transpose(1, 2).unflatten(2, (math.isqrt(feats.shape[1]),) * 2)  # (N, Cv, g, g)
        grid = self.stage2(F.adaptive_avg_pool2d(self.stage1(grid), self.side))  # (N, Cv, k, k)
        return self.readout(grid.flatten(2).transpose(1, 2))  # (N, K, C)

# ----------------------------------------------------------------------------- model: Llama decoder
# The Llama classes take an HF LlamaConfig-like namespace (hidden_size, intermediate_size, num_hidden_layers,
# num_attention_heads, num_key_value_heads, rms_norm_eps, rope_theta, vocab_size) plus the MoE fields.

class RMSNorm(nn.Module):
    def __init__(self, width, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(width)), eps

    def forward(self, x):
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)

class LlamaAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        C, self.hd = config.hidden_size, config.hidden_size // self.n_head
        self.q_proj = nn.Linear(C, self.n_head * self.hd, bias=False)
        self.k_proj, self.v_proj = (nn.Linear(C, self.n_kv * self.hd, bias=False) for _ in range(2))
        self.o_proj = nn.Linear(self.n_head * self.hd, C, bias=False)

    def forward(self, x, cos, sin, mask=None, cache=None):  # x (B, T, C); cos/sin (B, 1, T, D)
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, -1, self.hd).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))  # (B, Hq, T, D), (B, Hkv, T, D) x 2
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)  # bf16 autocast makes q, k, v bf16: keep one dtype
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:  # cache: [k, v] of the earlier positions, extended in place
            if cache:
                k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
            cache[:] = [k, v]
        if mask is None:  # a prompt attends causally; a single new token sees the whole cache
            y = attention(q, k, v, causal=T > 1)  # (B, Hq, T, D)
        else:  # mask (B, 1, T, S) bool, True = visible: documents of packed rows, left padding
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # (B, Hq, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

class LlamaMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)), None

class MoEMLP(nn.Module):
    """Top-k routed SwiGLU experts (kernels.moe_ffn); returns the balance / z auxiliary losses too."""

    def __init__(self, config):
        super().__init__()
        E, C, Fh = config.num_experts, config.hidden_size, config.intermediate_size
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(C, E, bias=False)  # router
        self.w1, self.w3 = (nn.Parameter(torch.randn(E, Fh, C) * 0.02) for _ in range(2))
        self.w2 = nn.Parameter(torch.randn(E, C, Fh) * 0.02)

    def forward(self, x):  # (B, T, C)
        y, aux = moe_ffn(x.reshape(-1, x.shape[-1]), self.gate.weight, self.w1, self.w3, self.w2, self.top_k)
        return y.view_as(x), aux

class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, moe: bool):
        super().__init__()
        self.self_attn, self.mlp = LlamaAttention(config), MoEMLP(config) if moe else LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask=None, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        h, aux = self.mlp(self.post_attention_layernorm(x))
        return x + h, aux

class LlamaModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        every = config.moe_every
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, every > 0 and (i + 1) % every == 0)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        hd = config.hidden_size // config.num_attention_heads
        inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, hd, 2).float() / hd)  # (D/2,)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x, positions, mask=None, cache=None):
        """x (B, T, C) embeddings, positions (B, T) -> (B, T, C) and the summed MoE aux losses."""
        freqs = positions[..., None].float() * self.inv_freq  # (B, T, D/2)
        emb = torch.cat([freqs, freqs], -1)[:, None]  # (B, 1, T, D)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        aux_total = {}
        for i, layer in enumerate(self.layers):
            x, aux = layer(x, cos, sin, mask, None if cache is None else cache[i])
            for key in ("balance_loss", "z_loss") if aux else ():
                aux_total[key] = aux_total.get(key, 0.0) + aux[key]
        return self.norm(x), aux_total

def arch_of(cfg: Config, vocab_size: int, image_token_id: int) -> dict:
    """Every field and constant that shapes the model, under HF config names: the checkpoint's `arch`
    metadata, and all MM1() is built from (the next scripts rebuild the model from it alone)."""
    return {
        "vision": dict(hidden_size=cfg.vit_width, intermediate_size=4 * cfg.vit_width,
                       num_hidden_layers=cfg.vit_layers, num_attention_heads=cfg.vit_heads,
                       image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_act="quick_gelu",
                       layer_norm_eps=1e-5, feature="post_layernorm(last_hidden_state[:, 1:])",
                       conv_stem_layers=cfg.vit_stem),  # not an HF field: CLIPEmbeddings's conv stem
        "connector": dict(type=cfg.connector, image_tokens=cfg.image_tokens, depth=3, heads=cfg.vit_heads,
                          hidden_act="silu", layer_norm_eps=1e-5, se_ratio=0.25),
        "text": dict(vocab_size=vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.ffn_hidden,
                     num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                     num_key_value_heads=cfg.n_kv_head, rms_norm_eps=1e-6, rope_theta=cfg.rope_theta,
                     hidden_act="silu", tie_word_embeddings=False, moe_every=cfg.moe_every,
                     num_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k),
        "image_token_id": image_token_id, "image_size": cfg.image_size,
        "pixel_mean": [0.48145466, 0.4578275, 0.40821073], "pixel_std": [0.26862954, 0.26130258, 0.27577711],
        "pixels": "uint8 RGB (N, 3, S, S) -> / 255 -> (x - mean) / std",
    }

class MM1(nn.Module):
    """ViT -> connector -> decoder, built from an arch dict (arch_of); state_dict keys: `vision_model.*`
    (CLIPVisionModel), `connector.*`, `model.*` and `lm_head.*` (LlamaForCausalLM)."""

    def __init__(self, arch: dict):
        super().__init__()
        v, text, conn = arch["vision"], SimpleNamespace(**arch["text"]), arch["connector"]
        self.image_token_id, self.image_tokens = arch["image_token_id"], conn["image_tokens"]
        self.vision_model = CLIPVisionTransformer(SimpleNamespace(
            vit_width=v["hidden_size"], vit_layers=v["num_hidden_layers"], vit_heads=v["num_attention_heads"],
            patch_size=v["patch_size"], image_size=v["image_size"], vit_stem=v.get("conv_stem_layers", 0)))
        sizes = v["hidden_size"], text.hidden_size, conn["image_tokens"]  # ViT width, LLM width, image tokens
        self.connector = {"avgpool": lambda: AvgPoolConnector(*sizes),  # lambdas: a script may hold only some
                          "attnpool": lambda: AttnPoolConnector(*sizes, conn["heads"]),
                          "cabstractor": lambda: CAbstractor(*sizes, conn["depth"])}[conn["type"]]()
        self.model = LlamaModel(text)
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        for key in ("pixel_mean", "pixel_std"):
            self.register_buffer(key, torch.tensor(arch[key]).view(1, 3, 1, 1), persistent=False)
        for m in self.modules():  # GPT-2's init: N(0, 0.02), zero biases
            if isinstance(m, nn.Linear | nn.Embedding | nn.Conv2d):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias) if getattr(m, "bias", None) is not None else None
        for name, p in self.named_parameters():  # and residual projections shrunk by depth
            if name.endswith(("o_proj.weight", "down_proj.weight", ".w2")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * text.num_hidden_layers))

    def image_embeddings(self, images):  # uint8 (N, 3, S, S) -> (N, K, C)
        pixels = (images.float() / 255 - self.pixel_mean) / self.pixel_std
        feats = self.vision_model(pixels.to(self.lm_head.weight.dtype))[:, 1:]  # (N, P, Cv) without the CLS
        return self.connector(self.vision_model.post_layernorm(feats))

    def forward(self, ids, images=None, positions=None, mask=None, cache=None, keep=None):
        """ids (B, T) with image_tokens `<image>` slots per image; images uint8 (N, 3, S, S) in reading
        order; positions (B, T) (default 0..T-1); mask (B, 1, T, S) bool or None (causal). Returns logits
        (B, T, V), or (K, V) at the K True positions of keep (B, T), and the summed MoE auxiliary losses."""
        x = self.model.embed_tokens(ids)  # (B, T, C)
        slots = (ids == self.image_token_id).unsqueeze(-1)  # (B, T, 1)
        n_images = 0 if images is None else len(images)
        assert int(slots.sum()) == n_images * self.image_tokens, \
            f"{int(slots.sum())} image slots for {n_images} images x {self.image_tokens} tokens"
        if n_images:
            x = x.masked_scatter(slots, self.image_embeddings(images).to(x.dtype))  # row-major: reading order
        if positions is None:
            positions = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape)
        h, aux = self.model(x, positions, mask, cache)
        return self.lm_head(h if keep is None else h[keep]), aux  # training: no logits where no target

def count_params(module):
    return sum(p.numel() for p in module.parameters())

# ----------------------------------------------------------------------------- losses
def lm_loss_sum(logits, targets):
    """Next-token cross-entropy, the autoregressive objective MM1 pre-trains with on all three data
    types (image slots and padding have target -100: ignored, and train() computes no logits there), in
    fp32, summed over this micro-batch. logits (..., V), targets (...)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")

def moe_aux_loss(aux, cfg):
    """MM1's MoE recipe (Sec. 3.3, ST-MoE): 0.01 x load balance + 0.001 x router z-loss, mean over layers."""
    return (0.01 * aux["balance_loss"] + 0.001 * aux["z_loss"]) * cfg.moe_every / cfg.n_layer if aux else 0.0

def paper_lr(n_params):
    """MM1's fitted peak learning rate for an N-parameter LLM: lr = exp(-0.4214 ln N - 0.5535)."""
    return math.exp(-0.4214 * math.log(n_params) - 0.5535)

def clip_loss(image_emb, text_emb, logit_scale):
    """CLIP's symmetric InfoNCE (Radford et al. 2021, Fig. 3): cross-entropy of the scaled cosine
    similarities of (image, text) pairs, the matching pair on the diagonal, image->text and text->image."""
    image_emb, text_emb = F.normalize(image_emb.float(), dim=-1), F.normalize(text_emb.float(), dim=-1)
    logits = logit_scale.exp() * image_emb @ text_emb.T  # (B, B)
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

def region_loss(tokens, mask, labels, head):
    """Bottom-up features (Anderson et al. 2018, arXiv:1707.07998), boxes from the scene graph: an object's
    feature f = sum_p m_p h_p / sum_p m_p over the ViT tokens h_p its box overlaps (m_p = 1); the loss is
    CE(shape | W_s f) + CE(colour | W_c f), means over the M objects. tokens (M, 1 + P, Cv), mask (M, 1 + P),
    labels (M, 2): (shape id, colour id)."""
    logits, n = head((tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)), len(shapes.SHAPES)
    return F.cross_entropy(logits[:, :n], labels[:, 0]) + F.cross_entropy(logits[:, n:], labels[:, 1])

# ----------------------------------------------------------------------------- train
def pretrain_vit(model, pools, cfg, device, log):
    """Stage 0, MM1's pre-trained CLIP in miniature: the ViT (mean of the patch tokens the connector reads)
    is the image tower of a CLIP whose text tower is a bag of token embeddings; InfoNCE on Pools.clip_pairs
    + weight x region_loss on their scenes' objects. Only the ViT is kept; all ranks run the same steps."""
    width, vit, t0 = cfg.vit_width, model.vision_model, time.time()
    tower = nn.ModuleDict(dict(vit=vit, text=nn.EmbeddingBag(pools.enc.n_vocab, width, mode="mean"),
                               image_head=nn.Linear(width, width), text_head=nn.Linear(width, width),
                               region_head=nn.Linear(width, len(shapes.SHAPES) + len(shapes.COLORS))))
    tower.to(device)
    tower.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07), device=device))  # CLIP's initial value
    opt = make_adamw(tower, cfg.vit_pretrain_lr, 0.1, betas=(0.9, 0.98))
    rng = np.random.default_rng([cfg.seed, 9])  # its own stream
    batch, steps, losses = min(cfg.vit_pretrain_batch, len(pools.clip_pairs)), cfg.vit_pretrain_steps, []
    regions = pools.clip_scenes and [x.to(device) for x in  # pair (M,), box mask (M, 1 + P), labels (M, 2)
                                     object_regions(pools.clip_scenes, cfg.image_size, cfg.patch_size)]
    for step in range(steps):
        set_lr(opt, lr_at(step, steps, cfg.vit_pretrain_lr, max(1, steps // 10), 0.1 * cfg.vit_pretrain_lr))
        chosen = rng.choice(len(pools.clip_pairs), batch, replace=False)
        docs = [pools.clip_pairs[i] for i in chosen]
        images = torch.stack([pools.bank[doc_images[0]] for _, doc_images in docs]).to(device)  # (B, 3, S, S)
        texts = [torch.from_numpy(ids[(ids != pools.image_id) & (ids != pools.eot_id)]) for ids, _ in docs]
        offsets = torch.tensor([0] + [len(t) for t in texts[:-1]]).cumsum(0)
        text_emb = tower.text_head(tower.text(torch.cat(texts).long().to(device), offsets.to(device)))
        pixels = (images.float() / 255 - model.pixel_mean) / model.pixel_std
        tokens = vit.post_layernorm(vit(pixels))  # (B, 1 + P, Cv)
        image_emb = tower.image_head(tokens[:, 1:].mean(1))  # (B, Cv)
        loss = clip = clip_loss(image_emb, text_emb, tower.logit_scale)
        if cfg.vit_region_weight and regions:  # the batch's objects: rows of the batch, box masks, labels
            keep = torch.isin(regions[0], chosen := torch.from_numpy(chosen).to(device))  # (M,)
            rows = (regions[0][keep, None] == chosen).int().argmax(1)  # (M,)
            region = region_loss(tokens[rows], regions[1][keep], regions[2][keep], tower.region_head)
            loss = loss + cfg.vit_region_weight * region
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tower.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tower.logit_scale.data.clamp_(0, math.log(100))  # CLIP caps the scale at 100
        losses.append(clip.item())  # the InfoNCE part; the log's region_loss: the object term
        if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
            log(step + 1, losses[-1], opt.param_groups[0]["lr"], batch * cfg.log_every, stage="vit_clip",
                region_loss=round(region.item(), 4) if cfg.vit_region_weight and regions else None)
    sims = F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).T  # (B, B) of the last batch
    hits = sims.argmax(1) == torch.arange(batch, device=device)
    return dict(clip_loss_first=round(losses[0], 4), clip_loss_last=round(losses[-1], 4),
                clip_batch_retrieval=round(hits.float().mean().item(), 3), clip_chance=round(1 / batch, 3),
                vit_pretrain_time_s=round(time.time() - t0, 1))

STAGES = {  # name: (steps field, trained parameter prefixes or None for all, data)
    "lm": ("lm_pretrain_steps", ("model.", "lm_head."), "text"),  # stage 0b: the decoder learns the text
    "warmup": ("connector_warmup_steps", ("connector.",), "captions"),  # ViT and decoder frozen
    "mm1": ("steps", None, "mix"),  # MM1 pre-training, everything unfrozen
}

def train(cfg, pools, model, device, rank, world, log, stage="mm1", resume_state=None):
    """One stage of STAGES, the same loop for all; only "mm1" writes checkpoints and resumes. The vision probe
    runs every eval_every steps and at the end, not in "lm" (no image yet). Returns numbers keyed by stage."""
    steps_key, trained, data = STAGES[stage]
    steps, stream = getattr(cfg, steps_key), list(STAGES).index(stage)
    mix = [pools.caption_docs, pools.documents, pools.passages]
    sources, weights = {"text": ([pools.lm_texts], [1.0]), "captions": ([pools.caption_docs], [1.0]),
                        "mix": (mix, vl_tasks.mix_weights(cfg.mix))}[data]
    mult = {"vision_model.": cfg.vit_lr_mult, "connector.": cfg.connector_lr_mult}
    for name, p in model.named_parameters():  # an lr multiplier of 0 freezes: no gradient is computed
        lr_mult = next((m for prefix, m in mult.items() if name.startswith(prefix)), 1.0)
        p.requires_grad_((trained is None or name.startswith(trained)) and lr_mult > 0)
    n_decoder = count_params(model.model) + count_params(model.lm_head)
    peak = cfg.lr or paper_lr(n_decoder)
    opt = make_adamw(model, peak, cfg.weight_decay, lr_mult=mult)
    start = resume_state[1] if resume_state else 0
    opt.load_state_dict(resume_state[0]) if resume_state else None
    cuda = device.startswith("cuda")
    net = model if world == 1 else nn.parallel.DistributedDataParallel(  # text-only rows leave the ViT unused
        model, [torch.cuda.current_device()] if cuda else None, find_unused_parameters=True)
    rows = slice(rank * cfg.batch_size // world, (rank + 1) * cfg.batch_size // world)  # this rank's rows
    end = min(steps, cfg.stop_after) if cfg.stop_after and stage == "mm1" else steps
    t_start, loss, tokens_since, n_images, probe = time.time(), float("nan"), 0, 0, {}
    meta = {"arch": arch_of(cfg, pools.enc.n_vocab, pools.image_id), "tokenizer_sha256": tokenizer_sha256(),
            "image_token_id": pools.image_id, "image_size": cfg.image_size}  # the checkpoints' metadata
    model.train()
    for step in range(start, end):
        set_lr(opt, lr := lr_at(step, steps, peak, min(cfg.warmup, steps // 10 + 1), cfg.min_lr_frac * peak))
        ids, targets, row_images, doc_of, n_targets = get_batch(pools, cfg, step, sources, weights, stream)
        images = [pools.bank[j] for r in row_images[rows] for j in r]
        n_images += len(images) * world
        images = torch.stack(images).to(device) if images else None
        packed = [x[rows].to(device) for x in doc_attention(doc_of)] if cfg.doc_mask else []  # positions mask
        with torch.autocast("cuda", torch.bfloat16, enabled=cuda):
            keep = (row_targets := targets[rows].to(device)) != -100  # (b, T): image slots, padding: none
            logits, aux = net(ids[rows].to(device), images, *packed, keep=keep)  # (K, V)
            loss_sum = lm_loss_sum(logits, row_targets[keep])
            # sum / global count x world: DDP's gradient mean then equals the global token mean
            (loss_sum / n_targets * world + moe_aux_loss(aux, cfg)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else None
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens_since += cfg.batch_size * cfg.seq_len
        loss_sum = loss_sum.detach()
        dist.all_reduce(loss_sum) if world > 1 else None
        loss, last = loss_sum.item() / n_targets, step + 1 == end
        if (step + 1) % cfg.log_every == 0 or last:
            probe = vision_probe(model, pools, cfg, device) if stage != "lm" and (
                last or (step + 1) % cfg.eval_every < 1) else {}
            line, tokens_since = log(step + 1, loss, lr, tokens_since, stage=stage, **probe), 0
            print(json.dumps(line)) if rank == 0 else None
            if rank == 0 and probe and probe["image_gain"] < 0.05:
                print(f"warning: {stage} step {step + 1}: image gain {probe['image_gain']:.3f} < 0.05 "
                      "nats/token: the model ignores the image", file=sys.stderr)
        if stage == "mm1" and rank == 0 and ((step + 1) % cfg.ckpt_every == 0 or last):
            save_checkpoint(cfg.out_dir, model, opt, cfg, step + 1, meta=meta)
    model.requires_grad_(True)
    elapsed = time.time() - t_start
    summary = {f"{stage}_loss": loss, f"{stage}_time_s": round(elapsed, 1),
               f"{stage}_tok_s": round((end - start) * cfg.batch_size * cfg.seq_len / max(elapsed, 1e-9), 1),
               **{f"{stage}_{k}": v for k, v in probe.items()}}
    if stage == "mm1":
        summary.update(start_step=start, peak_lr=peak, decoder_params=n_decoder,
                       total_params=count_params(model), images_per_step=n_images / max(end - start, 1))
    return summary

# ----------------------------------------------------------------------------- eval
# data/vl_tasks.py: evaluate() (k-shot captioning, VQA, vision probe, perplexity, baselines), results_table()

# ----------------------------------------------------------------------------- main
SHARED_STAGES = {  # stage 0 / 0b: the weights it trains, its steps field, then the grid-row fields it ignores
    "vit": (("vision_model.",), "vit_pretrain_steps", "connector", "image_tokens", "seq_len", "mix",
            "caption_formats", "moe_every"),
    "lm": (("model.", "lm_head."), "lm_pretrain_steps", "connector", "image_tokens", "seq_len", "mix",
           "image_size", "vit_pretrain_steps")}  # so stage 0b runs at the context of its first row

def run(cfg: Config, device: str, rank: int, world: int, pools=None, shared=None, only=()):
    """Stage 0 (ViT), the STAGES (0b: decoder, connector warm-up, MM1), evaluation; writes config.json,
    log.jsonl, checkpoints, metrics.json and report.md. For a grid (run_ablation): shared = a row's stage 0 /
    0b, {stage: (weights, numbers)}, trained once by a call with only=(stage,), which returns them."""
    t0 = time.time()
    pools = pools or Pools(cfg, get_tokenizer())  # everything that reads input, before anything is written
    seed_everything(cfg.seed)
    model, resume_state = MM1(arch_of(cfg, pools.enc.n_vocab, pools.image_id)).to(device), None
    if cfg.resume:  # the config was checked field by field: the same keys and shapes
        weights, optim_state, step, _ = load_checkpoint(cfg.out_dir, cfg, RESUME_MAY_DIFFER)
        model.load_state_dict(weights)
        resume_state = (optim_state, step)
    summary = dict(data_time_s=round(time.time() - t0, 1), user_text_only_items=pools.user_text_items)
    if rank == 0:  # every input is read and checked: only now is anything written
        write_outputs(cfg.out_dir, {"config.json": cfg})
        print(f"config: {json.dumps(asdict(cfg))}\ntext-only items of --train_data: {pools.user_text_items}")
    log = RunLog(cfg.out_dir, "tok", 6 * count_params(model.model), device, rank, world)
    for stage in only or (("vit", *STAGES) if resume_state is None else ("mm1",)):
        if stage in (shared or {}):  # a grid row: loaded as the first row that needs it trained it
            model.load_state_dict({**model.state_dict(), **shared[stage][0]})
            summary.update(shared[stage][1])
        elif stage != "vit" or cfg.vit_pretrain_steps:
            summary.update(train(cfg, pools, model, device, rank, world, log, stage, resume_state)
                           if stage != "vit" else pretrain_vit(model, pools, cfg, device, RunLog(
                               cfg.out_dir, "items", 0, device, rank)))
    if only:  # a grid's shared stage: the weights it trained
        return {k: v for k, v in model.state_dict().items() if k.startswith(SHARED_STAGES[stage][0])}, summary
    dist.barrier() if world > 1 else None
    if rank != 0 or (cfg.stop_after and cfg.stop_after < cfg.steps):  # a split run evaluates once, at its end
        return summary
    t1 = time.time()
    metrics = {**evaluate(model, pools, cfg, device), **summary, "eval_time_s": round(time.time() - t1, 1)}
    print(table := vl_tasks.results_table(metrics, cfg))
    samples = "\n".join(f"- {s}" for s in metrics["samples"])
    report = f"# MM1 miniature ({cfg.preset} preset)\n\n{table}\n\n## 0-shot test samples\n{samples}\n"
    write_outputs(cfg.out_dir, {"metrics.json": metrics, "report.md": report})
    return metrics

def run_ablation(cfg: Config, device: str, rank: int, world: int):
    """Every row of one grid, once per seed. As MM1's ablations share one pre-trained CLIP and LLM, rows that
    differ only in fields stage 0 (0b) ignores share one ViT (decoder), trained once; then under torchrun each
    process takes the next unclaimed row and trains it alone (one machine: the claims are files)."""
    jobs, labels, pools = [], [label for label, _ in ABLATIONS[cfg.ablate]], {}  # jobs: label, config, data
    for seed in cfg.ablation_seeds:  # (by seed, image size and caption formats), {stage: shared part's key}
        for label, overrides in ABLATIONS[cfg.ablate]:
            row = Path(cfg.out_dir) / f"ablate_{cfg.ablate}" / (re.sub(r"\W+", "_", label) + f"_seed{seed}")
            check_config(sub := dataclasses.replace(cfg, ablate="", seed=seed, out_dir=str(row), **overrides))
            key = seed, sub.image_size, sub.caption_formats
            data = pools[key] = pools.get(key) or Pools(sub, get_tokenizer())
            jobs.append((label, sub, data, {stage: (stage, repr(dataclasses.replace(
                sub, out_dir="", **{f: getattr(cfg, f) for f in ignored}))) for stage, (_, steps, *ignored)
                in SHARED_STAGES.items() if getattr(sub, steps)}))
    owners = {key: job for job in reversed(jobs) for key in job[3].values()}  # key -> the first row with it
    shared = {key: run(sub, device, 0, 1, data, only=key[:1])  # the parts split over the processes
              for n, (key, (_, sub, data, _)) in enumerate(owners.items()) if n % world == rank}
    if world > 1:  # every process gets every part
        dist.all_gather_object(gathered := [None] * world, shared)
        shared = {key: part for g in gathered for key, part in g.items()}
    done, claims = [], [tempfile.mkdtemp(prefix="mm1_grid_") if rank == 0 and world > 1 else ""]
    dist.broadcast_object_list(claims) if world > 1 else None  # one folder of claim files per launch
    # costliest rows (context x image size) first: the processes' last rows are short and end together
    for i in sorted(range(len(jobs)), key=lambda i: -jobs[i][1].seq_len * jobs[i][1].image_size):
        label, sub, data, keys = jobs[i]
        try:  # O_EXCL: of the processes, exactly one creates row i's claim file and runs the row
            os.close(os.open(Path(claims[0]) / str(i), os.O_CREAT | os.O_EXCL)) if world > 1 else None
        except FileExistsError:
            continue
        t0 = time.time()
        metrics = run(sub, device, 0, 1, data, {stage: shared[key] for stage, key in keys.items()})
        done.append((i, label, {**metrics, "minutes": (time.time() - t0) / 60}))
        vl_tasks.grid_table(cfg, labels, done, write_outputs) if world == 1 else None  # the table so far
    if world > 1:  # every process's rows, in job order
        dist.all_gather_object(gathered := [None] * world, done)
        done = sum(gathered, [])
        shutil.rmtree(claims[0]) if rank == 0 else None
    table, results = vl_tasks.grid_table(cfg, labels, done, write_outputs if rank == 0 else None)
    print(table) if rank == 0 else None
    return results

def main(argv):
    check_config(cfg := parse_config(argv))
    device, rank, world = setup_device(cfg.device)
    check_out_dir(cfg.out_dir)
    try:
        return run_ablation(cfg, device, rank, world) if cfg.ablate else run(cfg, device, rank, world)
    finally:
        dist.destroy_process_group() if world > 1 and dist.is_initialized() else None

if __name__ == "__main__":
    run_main(main)
