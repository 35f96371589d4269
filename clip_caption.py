"""clip_caption.py: AltText, synthetic captions or both? arXiv:2410.02740 (Apple) in miniature: Lai et al.,
"Revisit Large-Scale Image-Caption Data in Pre-training Multimodal Foundation Models", CLIP and text-to-image
(its multimodal LLMs are in mm1.py). 1. A controllable captioner: a ViT taught objects' shape and colour from
human boxes (stage 0), frozen, + a causal decoder; a control token picks <|ssc|> short, <|dsc|> descriptive,
<|dsc+|> dense or <|afc|> AltText fusion. Scored beside a blind row (another scene's gold caption).
2. Synthetic captions for the web images: --synthetic=gold (scene graph, --gold_error swapped) or captioner.
3. One CLIP per recipe (alt; ssc50 = SSC with p = 0.5, else AltText; dsc100; afc): zero-shot emblem / shape /
   colour, gallery retrieval; baselines; a paired bootstrap over seeds on KEY_PAIRS, fixed in advance.
4. One text-to-image flow per recipe (32 px UNet, own text tower), scored GenEval-style by a probe trained on
   real renders; samples in out_dir/diffusion_samples.png. Report: out_dir/report.md.
  python clip_caption.py                          # cpu preset (default without CUDA)
  python clip_caption.py --synthetic=captioner    # CLIP and diffusion on the captioner's captions
  torchrun --standalone --nproc_per_node=8 clip_caption.py --preset=gpu   # DDP; captioning sharded too
  python clip_caption.py --data=pairs.csv         # your images: CSV/JSONL with filepath, caption[, alttext]
"""
from __future__ import annotations

import ast
import csv
import dataclasses
import hashlib
import inspect
import json
import math
import multiprocessing
import os
import random
import re
import sys
import tempfile
import time
from collections import namedtuple
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.distributed.nn.functional import all_gather
from tqdm import tqdm

from data import InputError
from data import clip_tasks as ct
from data.clip_tasks import COLUMNS, FORMATS, GENEVAL, ImageSet, Texts, render_split
from data.shapes import COLORS, SHAPES
from kernels import attention


# ----------------------------------------------------------------------------- config
@dataclass
class Config:
    preset: str = "auto"  # smoke | cpu | gpu (auto: gpu with CUDA, else cpu); the defaults are the cpu preset
    out_dir: str = "out/clip_caption"  # config, log, metrics, report, checkpoints, caption cache
    seed: int = 0  # scenes, weights, batch order and recipe coins
    device: str = "auto"  # auto | cpu | cuda | mps
    resume: bool = False  # continue out_dir's checkpoints (the saved config must match: RESUME_MAY_DIFFER)
    data: str = ""  # your image-text CSV/JSONL (filepath, caption[, alttext]): replaces the web split
    synthetic: str = "gold"  # CLIP's synthetic captions: gold (scene graph / user's captions) | captioner
    gold_error: float = 0.0  # --synthetic=gold: share of captions swapped for another image's caption
    image_size: int = 48  # pixels per side of CLIP's images
    cap_image_size: int = 64  # pixels per side of the captioner's images (at 48, small shapes are 5-px blobs)
    patch_size: int = 8  # ViT patch side in pixels
    vit_width: int = 96  # image towers (captioner and CLIP): width
    vit_layers: int = 3  # image towers: transformer layers
    vit_heads: int = 4  # image towers: attention heads
    vit_stem: int = 0  # CLIP's ViT: 3x3 conv layers before the patchify conv (0: HF CLIP's patchify alone)
    cap_stem: int = 3  # the captioner's ViT: the same (without a stem it learns no shape in stage 0)
    text_width: int = 96  # CLIP text tower width
    text_layers: int = 2  # CLIP text tower layers
    text_heads: int = 4  # CLIP text tower heads
    context_length: int = 77  # CLIP text limit in tokens (longer captions are truncated, as in CLIP)
    embed_dim: int = 64  # CLIP joint embedding size
    dec_width: int = 128  # captioner decoder width
    dec_layers: int = 2  # captioner decoder layers
    dec_heads: int = 4  # captioner decoder heads
    n_human: int = 2000  # captioner images ("human" split, gold captions and object boxes)
    region_steps: int = 1000  # captioner stage 0: ViT learns objects' shape + colour, then frozen (0: none)
    cap_steps: int = 1000  # captioner optimizer steps
    cap_batch: int = 16  # captioner batch size (images, one random format each)
    cap_lr: float = 1e-3  # captioner peak learning rate
    cap_max_tokens: int = 128  # captions are cut to this many tokens for training / generation / CIDEr
    alt_tokens: int = 32  # AltText tokens the AFC prompt reads (left-padded to this length)
    n_cap_eval: int = 1000  # held-out "test" scenes for the captioner's eval (at 200, halluc. s.e. ~0.03)
    n_web: int = 4000  # web images CLIP trains on (each has only its AltText + synthetic captions)
    n_eval: int = 2000  # held-out web images for zero-shot / retrieval / probe eval
    gallery: int = 500  # retrieval gallery size (the eval images are cut into galleries of this many)
    recipes: tuple = ("alt", "ssc50", "ssc100", "dsc50", "dsc100", "afc")  # text recipes, one CLIP each
    seeds: int = 2  # seeds for the recipes of the key pairs (KEY_PAIRS); the other recipes get one
    clip_steps: int = 300  # CLIP optimizer steps per recipe
    clip_batch: int = 64  # CLIP global batch size
    clip_lr: float = 1e-3  # CLIP peak learning rate
    warmup_frac: float = 0.1  # fraction of steps with linear warm-up (then cosine to 10% of the peak)
    bootstrap: int = 1000  # paired-bootstrap resamples for the key pairs
    log_every: int = 25  # steps between log lines
    ckpt_every: int = 200  # steps between checkpoints (and always at the end)
    export: bool = False  # write out_dir/export: captions.csv (filepath,alttext,ssc,dsc,afc), web image PNGs
    parts: tuple = ("captioner", "clip", "diffusion")  # what runs (with gold captions, each part alone)
    diff_recipes: tuple = ("ssc100", "dsc100")  # text recipes, one text-to-image flow each
    diff_seeds: int = 2  # seeds for the first DIFF_KEY_PAIRS claim's recipes; the other recipes get one
    diff_size: int = 32  # pixels per side of the images the diffusion models learn and generate
    diff_width: int = 32  # UNet channels at its top level (twice as many one level down)
    diff_steps: int = 400  # flow-matching optimizer steps per model
    diff_batch: int = 32  # flow-matching batch size
    diff_lr: float = 2e-3  # flow-matching peak learning rate
    diff_drop: float = 0.1  # share of training prompts replaced by the empty prompt (for guidance)
    sample_steps: int = 10  # Euler steps from noise to image
    guidance: float = 3.0  # classifier-free guidance scale w (1 = the conditional model alone)
    n_diff_eval: int = 100  # held-out web prompts per model for the GenEval-style probe
    probe_steps: int = 300  # steps of the probe (reads colour, shape, count, position off real renders)
    workers: int = 2  # CPU processes that train the independent models side by side (1: all in this one)
PRESETS = {
    "smoke": dict(image_size=16, cap_image_size=20, patch_size=4, vit_width=32, vit_layers=1, vit_heads=2,
                  text_width=32, text_layers=1, text_heads=2, embed_dim=16, dec_width=48, dec_layers=1,
                  dec_heads=2, n_human=16, region_steps=20, cap_steps=200, cap_lr=1e-2, cap_max_tokens=32,
                  alt_tokens=12, n_cap_eval=8, n_web=32, n_eval=24, gallery=12, seeds=1, clip_steps=4,
                  recipes=("alt", "ssc50", "afc"), clip_batch=16, bootstrap=50, log_every=20, ckpt_every=3,
                  diff_recipes=("alt", "dsc100"), diff_seeds=1, diff_size=16, diff_width=16, diff_steps=4,
                  diff_batch=8, sample_steps=3, n_diff_eval=8, probe_steps=4, workers=1),
    "cpu": dict(),
    "gpu": dict(image_size=64, vit_width=384, vit_layers=6, vit_heads=6, text_width=384, text_layers=6,
                text_heads=6, embed_dim=256, dec_width=512, dec_layers=6, dec_heads=8, n_human=20000,
                region_steps=2000, cap_steps=4000, cap_batch=128, cap_max_tokens=200, n_web=60000,
                n_eval=5000, seeds=3, clip_steps=3000, clip_batch=1024, ckpt_every=1000, diff_seeds=3,
                diff_width=96, diff_recipes=("alt", "ssc100", "dsc100", "dsc50"), diff_steps=5000,
                diff_batch=256, sample_steps=20, n_diff_eval=2000, probe_steps=3000, workers=1)}
GEN_BATCH = 256  # images per batched generation call
# fields that change no model: a resume may set them anew (every other one, schedules included, must match)
RESUME_MAY_DIFFER = ("preset", "out_dir", "device", "resume", "recipes", "n_cap_eval", "n_eval",
                     "gallery", "bootstrap", "log_every", "ckpt_every", "export", "parts", "diff_recipes",
                     "diff_seeds", "sample_steps", "guidance", "n_diff_eval", "workers")
# the comparisons the verdict tests, fixed before any run: (a, b, metric), read "a beats b on metric"
KEY_PAIRS = (("ssc50", "ssc100", "retrieval"), ("ssc50", "ssc100", "emblem top1"),
             ("ssc50", "alt", "retrieval"), ("ssc100", "dsc100", "retrieval"),
             ("alt", "ssc100", "emblem top1"))
# the diffusion side's, fixed likewise: the paper finds DSC best for SD3, and GenEval peaking at 50% DSC
DIFF_KEY_PAIRS = (("dsc100", "ssc100", "attributes (dense)"), ("dsc100", "ssc100", "attributes (short)"),
                  ("dsc100", "alt", "attributes (dense)"), ("dsc50", "dsc100", "attributes (dense)"))
def check_config(cfg: Config) -> None:
    for key in [k for k in ("image_size", "cap_image_size") if getattr(cfg, k) % cfg.patch_size]:
        raise InputError(f"--{key}={getattr(cfg, key)}: expected a multiple of --patch_size={cfg.patch_size}")
    if cfg.synthetic not in ("gold", "captioner") or not 0.0 <= cfg.gold_error <= 1.0 or (
            cfg.synthetic == "captioner" and "captioner" not in cfg.parts):
        raise InputError(f"--synthetic={cfg.synthetic} --gold_error={cfg.gold_error}: expected gold or "
                         "captioner (with captioner in --parts), and an error share in 0..1")
    for key in [k for k in ("vit_stem", "cap_stem")
                if not 0 <= getattr(cfg, k) <= cfg.vit_width.bit_length()]:  # = 1 + log2(width), floored
        raise InputError(f"--{key}={getattr(cfg, key)}: expected 0 .. 1 + log2(--vit_width) conv layers")
    for key in [k for k in "n_web n_eval gallery clip_steps seeds workers".split() if getattr(cfg, k) < 1]:
        raise InputError(f"--{key}={getattr(cfg, key)}: expected a positive number")
    list(map(ct.parse_recipe, cfg.recipes + cfg.diff_recipes))  # InputError on a bad name
    if not set(cfg.parts) <= {"captioner", "clip", "diffusion"} or cfg.diff_size % 4 or cfg.diff_width % 8:
        raise InputError(f"--parts={','.join(cfg.parts)} --diff_size={cfg.diff_size} --diff_width="
                         f"{cfg.diff_width}: expected captioner, clip, diffusion; multiples of 4 and 8")
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
# data/clip_tasks.py: ImageSet (uint8 images, AltTexts, gold captions per format, scenes), render_split
# (ShapesWorld), read_user_pairs (your CSV/JSONL), gold_synthetic, export, Texts (tokenization), and what the
# evals score against (caption_row, scene_labels, geneval_targets, baselines, paired bootstrap, report)
def to_float(images: torch.Tensor, device) -> torch.Tensor:  # uint8 (B, 3, S, S) -> float in about [-2, 2]
    return (images.to(device).float() / 255.0 - 0.5) / 0.25
# ----------------------------------------------------------------------------- model
# The CLIP ViT (HF names): verbatim copies of mm1.py's classes (tests/test_skeleton.py compares them).
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
# ----------------------------------------------------------------------------- model: text tower, captioner
class CausalAttention(CLIPAttention):
    """CLIPAttention's weights (HF names) with a causal mask and a KV cache for generation."""
    def forward(self, x, cache: dict | None = None):  # (B, T, C)
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))  # (B, H, T, D)
        if cache is not None:  # generation: keep keys / values of every position seen so far
            k = cache["k"] = torch.cat([cache["k"], k], 2) if "k" in cache else k  # (B, H, T_all, D)
            v = cache["v"] = torch.cat([cache["v"], v], 2) if "v" in cache else v
        # one new query attends to the whole cache (no mask); a prefill is square and causal
        y = attention(q, k, v, causal=T > 1)  # (B, H, T, D)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))
class CausalLayer(CLIPEncoderLayer):
    """CLIPEncoderLayer (HF names, quick_gelu MLP), causal: CLIP's text tower and the captioner's decoder."""
    def __init__(self, width: int, heads: int):
        super().__init__(width, heads)
        self.self_attn = CausalAttention(width, heads)
    def forward(self, x, cache: dict | None = None):
        x = x + self.self_attn(self.layer_norm1(x), cache)
        return x + self.mlp(self.layer_norm2(x))
class TextTransformer(nn.Module):
    """CLIP text tower (HF CLIPTextTransformer names): causal, pooled at each text's <|endoftext|>."""
    def __init__(self, cfg: Config, vocab_size: int):
        super().__init__()
        self.embeddings, self.encoder = nn.Module(), nn.Module()
        self.embeddings.token_embedding = nn.Embedding(vocab_size, cfg.text_width)
        self.embeddings.position_embedding = nn.Embedding(cfg.context_length, cfg.text_width)
        self.encoder.layers = nn.ModuleList(CausalLayer(cfg.text_width, cfg.text_heads)
                                            for _ in range(cfg.text_layers))
        self.final_layer_norm = nn.LayerNorm(cfg.text_width)
    def forward(self, ids, lengths, pooled: bool = True):  # (B, T), (B,) -> (B, C); or (B, T, C) states
        x = self.embeddings.token_embedding(ids) + self.embeddings.position_embedding.weight[:ids.shape[1]]
        for layer in self.encoder.layers:
            x = layer(x)  # (B, T, C)
        x = self.final_layer_norm(x)
        return x[torch.arange(len(ids), device=ids.device), lengths.to(ids.device) - 1] if pooled else x
def init_weights(module: nn.Module):
    """N(0, 0.02) weights, zero biases (GPT-2 / CLIP): PyTorch's N(0, 1) embeddings drown a fresh ViT."""
    for m in module.modules():
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
class CLIPModel(nn.Module):
    """Two towers and a learned temperature (HF CLIPModel names; logit_scale stores log(1/temperature))."""
    def __init__(self, cfg: Config, vocab_size: int):
        super().__init__()
        self.vision_model, self.text_model = CLIPVisionTransformer(cfg), TextTransformer(cfg, vocab_size)
        self.visual_projection = nn.Linear(cfg.vit_width, cfg.embed_dim, bias=False)
        self.text_projection = nn.Linear(cfg.text_width, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        init_weights(self)
    def encode_image(self, images):  # (B, 3, S, S); pooled = post_layernorm(CLS), HF's pooler_output
        pooled = self.vision_model.post_layernorm(self.vision_model(images)[:, 0])  # (B, C)
        return F.normalize(self.visual_projection(pooled), dim=-1)  # (B, E)
    def encode_text(self, ids, lengths):
        return F.normalize(self.text_projection(self.text_model(ids, lengths)), dim=-1)  # (B, E)
    def forward(self, images, ids, lengths):
        return self.encode_image(images), self.encode_text(ids, lengths), self.logit_scale
class Captioner(nn.Module):
    """ViT -> linear connector -> causal decoder over [image tokens, prompt, caption] (a prefix LM). The mean
    image token is also added to every text embedding: a tiny decoder then uses the image sooner."""
    def __init__(self, cfg: Config, vocab_size: int):
        super().__init__()
        n_positions = (cfg.cap_image_size // cfg.patch_size) ** 2 + cfg.alt_tokens + cfg.cap_max_tokens + 4
        self.vision_model = CLIPVisionTransformer(dataclasses.replace(cfg, image_size=cfg.cap_image_size,
                                                                      vit_stem=cfg.cap_stem))
        self.connector = nn.Linear(cfg.vit_width, cfg.dec_width)
        self.embed_tokens = nn.Embedding(vocab_size, cfg.dec_width)
        self.position_embedding = nn.Embedding(n_positions, cfg.dec_width)
        self.layers = nn.ModuleList(CausalLayer(cfg.dec_width, cfg.dec_heads) for _ in range(cfg.dec_layers))
        self.norm = nn.LayerNorm(cfg.dec_width)
        self.lm_head = nn.Linear(cfg.dec_width, vocab_size, bias=False)
        init_weights(self)
    def forward(self, images, ids, caches: list | None = None, start: int = 0, keep=None):
        """(B, T, V) text logits, or (N, V) at `keep` (training); images=None: decoding on from `caches`."""
        if images is not None:
            prefix = self.connector(self.vision_model.post_layernorm(self.vision_model(images)))  # (B,P+1,C)
            summary = prefix.mean(1, keepdim=True)  # (B, 1, C)
            if caches is not None:
                caches[0]["image"] = summary  # decode steps add it too
            x = torch.cat([prefix, self.embed_tokens(ids) + summary], 1)  # (B, 1 + P + T, C)
        else:
            x = self.embed_tokens(ids) + caches[0]["image"]  # (B, T, C)
        x = x + self.position_embedding.weight[start: start + x.shape[1]]
        for i, layer in enumerate(self.layers):
            x = layer(x, caches[i] if caches is not None else None)
        x = self.norm(x[:, x.shape[1] - ids.shape[1]:])  # (B, T, C)
        return self.lm_head(x if keep is None else x[keep])  # (B, T, V) or (N, V)
class RegionHead(nn.Module):
    """Captioner stage 0 (bottom-up features, arXiv:1707.07998): box-pooled ViT tokens name shape, colour."""
    def __init__(self, vision_model: CLIPVisionTransformer, width: int, n_classes: int):
        super().__init__()
        self.vision_model, self.head = vision_model, nn.Linear(width, n_classes)
    def forward(self, images, scene, mask):  # (B, 3, S, S), (M,) image of each object, (M, 1 + P) -> (M, K)
        tokens = self.vision_model.post_layernorm(self.vision_model(images))[scene]  # (M, 1 + P, C)
        return self.head((mask[:, :, None] * tokens).sum(1) / mask.sum(1, keepdim=True))  # (M, K)
# ----------------------------------------------------------------------------- model: text-to-image, probe
class ResBlock(nn.Module):
    """GroupNorm, SiLU, 3x3 conv, twice, with the conditioning vector added in between (DDPM / SD UNet)."""
    def __init__(self, c_in: int, c_out: int, c_cond: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(8, c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.cond_proj = nn.Linear(c_cond, c_out)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
    def forward(self, x, cond):  # (B, C_in, H, W), (B, C_cond) -> (B, C_out, H, W)
        h = self.conv1(F.silu(self.norm1(x))) + self.cond_proj(cond)[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))
class FlowUNet(nn.Module):
    """v(x_t, t, prompt): its own CLIP-style text tower; a two-level UNet on 2x2-unshuffled pixels; the pooled
    prompt joins the time embedding, and cross-attention reads the prompt's tokens a level down."""
    def __init__(self, cfg: Config, vocab_size: int):
        super().__init__()
        c, c_cond = cfg.diff_width, 4 * cfg.diff_width
        self.text_model = TextTransformer(cfg, vocab_size)
        self.time_mlp = nn.Sequential(nn.Linear(c, c_cond), nn.SiLU(), nn.Linear(c_cond, c_cond))
        self.pooled_proj = nn.Linear(cfg.text_width, c_cond)
        self.stem = nn.Conv2d(12, c, 3, padding=1)
        self.down_block, self.downsample = ResBlock(c, c, c_cond), nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.mid_block1, self.mid_block2 = ResBlock(2 * c, 2 * c, c_cond), ResBlock(2 * c, 2 * c, c_cond)
        self.attn_norm = nn.GroupNorm(8, 2 * c)  # every image position attends to the prompt's tokens (SD)
        self.cross_attn = nn.MultiheadAttention(2 * c, cfg.text_heads, batch_first=True, kdim=cfg.text_width,
                                                vdim=cfg.text_width)
        self.up_block = ResBlock(3 * c, c, c_cond)
        self.out_norm, self.out_conv = nn.GroupNorm(8, c), nn.Conv2d(c, 12, 3, padding=1)
        init_weights(self)
    def encode_text(self, ids, lengths):  # (B, T), (B,) -> token states (B, T, C), keep (B, T), pooled (B, C)
        tokens, lengths = self.text_model(ids, lengths, pooled=False), lengths.to(ids.device)
        keep = torch.arange(ids.shape[1], device=ids.device)[None] < lengths[:, None]  # False on padding
        return tokens, keep, tokens[torch.arange(len(ids), device=ids.device), lengths - 1]  # pooled at <eot>
    def forward(self, x, t, ids, lengths, text=None):  # (B, 3, S, S), (B,), (B, T), (B,) -> (B, 3, S, S)
        """The velocity at x_t; `text` = encode_text(ids, lengths), computed once for a sampler's steps."""
        tokens, keep, pooled = text or self.encode_text(ids, lengths)
        half = torch.arange(self.stem.out_channels // 2, device=t.device) / (self.stem.out_channels // 2)
        angles = 1000.0 * t[:, None] * torch.exp(-math.log(1000.0) * half)  # (B, c / 2): sinusoids of t
        cond = F.silu(self.time_mlp(torch.cat([angles.cos(), angles.sin()], 1)) + self.pooled_proj(pooled))
        top = self.down_block(self.stem(F.pixel_unshuffle(x, 2)), cond)  # (B, c, S/2, S/2)
        h = self.mid_block1(self.downsample(top), cond)  # (B, 2c, S/4, S/4)
        query = self.attn_norm(h).flatten(2).transpose(1, 2)  # (B, S/4 * S/4, 2c)
        attended = self.cross_attn(query, tokens, tokens, key_padding_mask=~keep, need_weights=False)[0]
        h = self.mid_block2(h + attended.transpose(1, 2).view_as(h), cond)
        h = self.up_block(torch.cat([F.interpolate(h, scale_factor=2.0), top], 1), cond)  # (B, c, S/2, S/2)
        return F.pixel_shuffle(self.out_conv(F.silu(self.out_norm(h))), 2)  # (B, 3, S, S)
def read_probe(probe: nn.Module, images: torch.Tensor) -> dict:  # (B, 3, S, S) -> {attribute: (B, K) logits}
    return dict(zip(GENEVAL, probe(images).split([len(v) for v in GENEVAL.values()], 1)))
# ----------------------------------------------------------------------------- losses
def clip_loss(image_emb, text_emb, logit_scale):
    """Symmetric InfoNCE (CLIP): (CE(s I T^T, diag) + CE(s T I^T, diag)) / 2, s = e^logit_scale <= 100."""
    scale = logit_scale.float().exp().clamp(max=100.0)
    logits = scale * image_emb.float() @ text_emb.float().t()  # (B, B)
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
def flow_pair(images, noise, t):
    """Rectified flow (Liu et al. 2023; SD3): x_t = t x_1 + (1 - t) x_0, x_0 noise, target x_1 - x_0."""
    t = t.view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    return t * images + (1 - t) * noise, images - noise
# ----------------------------------------------------------------------------- train
Run = namedtuple("Run", "device rank world texts saved")  # saved: name -> load_checkpoint(...) (--resume)
def train(model: nn.Module, step_loss, steps: int, lr: float, name: str, cfg: Config, run: Run) -> nn.Module:
    """Generic loop; step_loss(runner, step) -> (loss, items, tokens per item) on this rank's shard."""
    optimizer = make_adamw(model, lr, weight_decay=0.1, betas=(0.9, 0.98))  # CLIP's betas
    weights, optim_state, start, _ = run.saved.get(name, (None, None, 0, None))
    if weights is not None:
        model.load_state_dict(weights)
        optimizer.load_state_dict(optim_state)
    runner = nn.parallel.DistributedDataParallel(model) if run.world > 1 else model
    autocast = torch.autocast("cuda", torch.bfloat16) if run.device.startswith("cuda") else nullcontext()
    log, items = None, 0
    model.train()
    for step in tqdm(range(start, steps), desc=name, disable=None if run.rank == 0 else True):
        set_lr(optimizer, lr_at(step, steps, lr, max(1, int(cfg.warmup_frac * steps)), 0.1 * lr))
        with autocast:
            loss, n_items, tokens = step_loss(runner, step)
        flops = 6.0 * sum(p.numel() for p in model.parameters()) * tokens  # per item; attention left out
        log = log or RunLog(cfg.out_dir, "items", flops, run.device, run.rank, run.world)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        items += n_items * run.world
        if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
            line, items = log(step + 1, loss.item(), optimizer.param_groups[0]["lr"], items, run=name,
                              grad_norm=round(grad_norm.item(), 4)), 0
            if run.rank == 0:
                print(" ".join(f"{k}={v}" for k, v in line.items()), flush=True)
        if run.rank == 0 and ((step + 1) % cfg.ckpt_every == 0 or step + 1 == steps):
            save_checkpoint(cfg.out_dir, model, optimizer, cfg, step + 1, name=name)
    return model.eval()
def train_captioner(data: ImageSet, cfg: Config, run: Run) -> Captioner:
    """Step s: format s % 4 on a batch of images and their gold captions; loss on the caption tokens. One
    format a step pads to its own length (mixed: to DSC+'s) and weighs formats alike (not 10 DSC+ : 1 SSC)."""
    texts = run.texts
    torch.manual_seed(cfg.seed)
    model = Captioner(cfg, texts.enc.n_vocab).to(run.device)
    if cfg.region_steps:  # stage 0, then a frozen ViT (as MM1's and LLaVA's in their stage 1)
        scene, mask, labels = ct.object_regions(data.scenes, cfg.cap_image_size, cfg.patch_size)
        def region_loss(runner, step):  # each object: cross-entropy of its shape + that of its colour
            idx = ct.batch_indices(len(data.images), cfg.cap_batch, step, cfg.seed, run)  # (B,)
            mine = scene[:, None] == idx[None, :]  # (M, B): object m is in batch image b
            rows = mine.any(1).nonzero()[:, 0]  # this batch's objects
            logits = runner(to_float(data.images[idx], run.device), mine[rows].int().argmax(1).to(run.device),
                            mask[rows].to(run.device)).float().split([len(SHAPES), len(COLORS)], 1)
            loss = sum(F.cross_entropy(part, labels[rows, i].to(run.device)) for i, part in enumerate(logits))
            return loss, len(idx), 1 + (cfg.cap_image_size // cfg.patch_size) ** 2
        stage0 = RegionHead(model.vision_model, cfg.vit_width, len(SHAPES) + len(COLORS)).to(run.device)
        train(stage0, region_loss, cfg.region_steps, cfg.cap_lr, "captioner_vision", cfg, run)
        model.vision_model.requires_grad_(False)
    gold = {f: [texts.encode(c)[: cfg.cap_max_tokens] + [texts.eot] for c in cs]
            for f, cs in data.captions.items()}
    def step_loss(runner, step):
        idx, fmt = ct.batch_indices(len(data.images), cfg.cap_batch, step, cfg.seed, run), FORMATS[step % 4]
        prompts = [texts.prompt(fmt, data.alttexts[i], cfg.alt_tokens) for i in idx.tolist()]  # one length
        captions = [gold[fmt][i] for i in idx.tolist()]
        ids = texts.pad_right([p + c for p, c in zip(prompts, captions)])  # (B, T)
        targets = texts.pad_right([[-100] * (len(prompts[0]) - 1) + c for c in captions], -100)  # (B, T - 1)
        keep = (targets != -100).to(run.device)  # caption tokens and their <|endoftext|>
        logits = runner(to_float(data.images[idx], run.device), ids[:, :-1].to(run.device), keep=keep)
        loss = F.cross_entropy(logits.float(), targets.to(run.device)[keep])  # (N, V), (N,): fp32
        return loss, len(idx), ids.shape[1] + (cfg.cap_image_size // cfg.patch_size) ** 2
    return train(model, step_loss, cfg.cap_steps, cfg.cap_lr, "captioner", cfg, run)
def run_name(model: str, recipe: str, seed: int, cfg: Config) -> str:  # clip_ssc50, diffusion_alt_seed1, ...
    return f"{model}_{recipe}" + ("" if seed == cfg.seed else f"_seed{seed}")
def recipe_texts(recipe: str, idx: list, coins: list, data: ImageSet, synthetic: dict) -> list[str]:
    """Each image's text under a recipe: its synthetic caption where the coin is below p, else its AltText."""
    fmt, p_synthetic = ct.parse_recipe(recipe)
    return [synthetic[fmt][i] if c < p_synthetic else data.alttexts[i] for i, c in zip(idx, coins)]
def train_clip(recipe: str, seed: int, data: ImageSet, synthetic: dict, cfg: Config, run: Run) -> CLIPModel:
    """One CLIP per (recipe, seed); a seed's recipes share init and image order: only the texts differ."""
    torch.manual_seed(seed)
    model = CLIPModel(cfg, run.texts.enc.n_vocab).to(run.device)
    def step_loss(runner, step):
        idx = ct.batch_indices(len(data.images), cfg.clip_batch, step, seed, run)
        coins = torch.rand(cfg.clip_batch, generator=torch.Generator().manual_seed(seed + 104729 * step))
        chosen = recipe_texts(recipe, idx.tolist(), coins[run.rank::run.world].tolist(), data, synthetic)
        ids, lengths = run.texts.clip_batch(chosen, cfg.context_length)  # (B, T), (B,)
        image_emb, text_emb, logit_scale = runner(to_float(data.images[idx], run.device), ids.to(run.device),
                                                  lengths)  # (B, E), (B, E), ()
        if run.world > 1:  # contrast against every rank's batch; gradients flow through the gather
            image_emb, text_emb = torch.cat(all_gather(image_emb)), torch.cat(all_gather(text_emb))
        n_tokens = ids.shape[1] + (cfg.image_size // cfg.patch_size) ** 2
        return clip_loss(image_emb, text_emb, logit_scale), len(idx), n_tokens
    return train(model, step_loss, cfg.clip_steps, cfg.clip_lr, run_name("clip", recipe, seed, cfg), cfg, run)
def train_diffusion(recipe: str, seed: int, data: ImageSet, synthetic: dict, cfg: Config, run: Run):
    """One flow per (recipe, seed): t ~ logit-normal (SD3); diff_drop of prompts emptied (for guidance)."""
    torch.manual_seed(seed)
    model, mine = FlowUNet(cfg, run.texts.enc.n_vocab).to(run.device), slice(run.rank, None, run.world)
    def step_loss(runner, step):
        idx = ct.batch_indices(len(data.images), cfg.diff_batch, step, seed, run)
        gen = torch.Generator().manual_seed(seed + 15485863 * step)
        coins, drops = torch.rand(2, cfg.diff_batch, generator=gen)[:, mine]
        t = torch.sigmoid(torch.randn(cfg.diff_batch, generator=gen)[mine]).to(run.device)  # (B,)
        noise = torch.randn(cfg.diff_batch, 3, cfg.diff_size, cfg.diff_size, generator=gen)[mine]  # (B,3,S,S)
        texts = ct.drop_prompts(recipe_texts(recipe, idx.tolist(), coins.tolist(), data, synthetic), drops,
                             cfg.diff_drop)
        ids, lengths = run.texts.clip_batch(texts, cfg.context_length)  # (B, T), (B,)
        x_t, target = flow_pair(to_float(data.images[idx], run.device), noise.to(run.device), t)
        velocity = runner(x_t, t, ids.to(run.device), lengths)  # L = E || v(x_t, t, c) - (x_1 - x_0) ||^2:
        return F.mse_loss(velocity.float(), target.float()), len(idx), 1
    return train(model, step_loss, cfg.diff_steps, cfg.diff_lr, run_name("diffusion", recipe, seed, cfg), cfg,
                 run)
def train_probe(data: ImageSet, cfg: Config, run: Run) -> nn.Module:
    """A small CNN (GenEval: a detector) learns ct.geneval_targets from real renders; summed cross-entropy."""
    torch.manual_seed(cfg.seed)
    cnn = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1),
                        nn.ReLU(), nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(64 * (cfg.diff_size // 4) ** 2, sum(map(len, GENEVAL.values()))))
    model, targets = cnn.to(run.device), ct.geneval_targets(data.scenes)
    def step_loss(runner, step):
        idx = ct.batch_indices(len(data.images), 64, step, cfg.seed, run)
        logits = read_probe(runner, to_float(data.images[idx], run.device))
        return sum(F.cross_entropy(logits[k], targets[k][idx].to(run.device)) for k in GENEVAL), len(idx), 1
    return train(model, step_loss, cfg.probe_steps, 2e-3, "probe", cfg, run)
@torch.no_grad()
def generate(model: Captioner, data: ImageSet, batch: list[int], fmt: str, cfg: Config, run: Run) -> list:
    """Greedy, KV-cached: a prefill over [image, prompt] (one length: no padding), then a token a step."""
    texts, caches = run.texts, [{} for _ in model.layers]
    prompts = torch.tensor([texts.prompt(fmt, data.alttexts[i], cfg.alt_tokens) for i in batch])  # (B, T)
    logits = model(to_float(data.images[batch], run.device), prompts.to(run.device), caches)  # prefill
    position = caches[0]["k"].shape[2]
    out, done = [], torch.zeros(len(prompts), dtype=torch.bool)
    for t in range(cfg.cap_max_tokens):
        out.append(torch.where(done, texts.eot, logits[:, -1].float().argmax(-1).cpu()))  # (B,)
        done |= out[-1] == texts.eot
        if done.all() or t + 1 == cfg.cap_max_tokens:
            break
        logits = model(None, out[-1][:, None].to(run.device), caches, start=position + t)  # (B, 1, V)
    rows = torch.stack(out, 1).tolist()  # (B, T) ids
    return [texts.enc.decode(row[: row.index(texts.eot)] if texts.eot in row else row) for row in rows]
def caption_images(model: Captioner, data: ImageSet, fmts, prefix: Path, cfg: Config, run: Run) -> dict:
    """{fmt: [caption per image]}. Rank r of w captions its images (i % w == r) that no {prefix}.*.json holds
    into {prefix}.{r}of{w}.json (atomic; the one file ranks other than 0 write); reruns read them back."""
    read = lambda: {(f, i): c for path in prefix.parent.glob(f"{prefix.name}.*.json")
                    for shard in [json.loads(path.read_text(encoding="utf-8"))] for f in fmts
                    for i, c in zip(shard["index"], shard[f])}
    done, mine = read(), Path(f"{prefix}.{run.rank}of{run.world}.json")
    idx = [i for i in range(run.rank, len(data.images), run.world) if any((f, i) not in done for f in fmts)]
    if idx:
        shard = {f: [c for s in range(0, len(idx), GEN_BATCH)
                     for c in generate(model, data, idx[s: s + GEN_BATCH], f, cfg, run)] for f in fmts}
        Path(f"{mine}.tmp").write_text(json.dumps({"index": idx, **shard}), encoding="utf-8")
        os.replace(f"{mine}.tmp", mine)
    if run.world > 1:
        dist.barrier()  # every shard is on disk
    done = read()
    return {f: [done[f, i] for i in range(len(data.images))] for f in fmts}
def run_jobs(jobs: dict, cfg: Config, run: Run, timings: dict) -> dict:
    """{name: result} of independent jobs (functions of no argument). With --workers > 1 in a CPU process, in
    that many forked processes sharing this one's threads (one each on 2 cores); every job seeds itself."""
    global JOBS
    JOBS = list(jobs.values())  # a forked worker inherits them: only an index goes to it, a result comes back
    if cfg.workers < 2 or run.world > 1 or run.device != "cpu" or len(jobs) < 2:
        results = [run_job(i) for i in range(len(jobs))]
    else:  # (on a shared machine, two threads of one process spin-wait for each other: two processes don't)
        threads = max(1, torch.get_num_threads() // cfg.workers)
        with multiprocessing.get_context("fork").Pool(cfg.workers, torch.set_num_threads, (threads,)) as pool:
            results = pool.map(run_job, range(len(jobs)), chunksize=1)  # handed out in order: longest first
    timings |= {name: seconds for name, (_, seconds) in zip(jobs, results)}
    return {name: result for name, (result, _) in zip(jobs, results)}
def run_job(index: int) -> tuple:
    clock = time.time()
    return JOBS[index](), time.time() - clock
# ----------------------------------------------------------------------------- eval
def evaluate_captioner(model: Captioner, data: ImageSet, cfg: Config, run: Run) -> dict:
    """Rows per format, each with its image-blind row: every gold caption scored against the next scene."""
    rows, n = {}, len(data.images)
    for f in FORMATS:
        generated = [c for s in range(0, n, GEN_BATCH)
                     for c in generate(model, data, list(range(s, min(s + GEN_BATCH, n))), f, cfg, run)]
        gold = [run.texts.enc.decode(run.texts.encode(c)[: cfg.cap_max_tokens]) for c in data.captions[f]]
        rows[f] = ct.caption_row(generated, gold, data.scenes, run.texts, blind=gold[1:] + gold[:1])
        rows[f"{f} (blind)"] = ct.caption_row(gold[1:] + gold[:1], gold, data.scenes, run.texts)
    return rows
# ----------------------------------------------------------------------------- eval: CLIP
@torch.no_grad()
def embed(model: CLIPModel, items, cfg: Config, run: Run, batch: int = 500) -> torch.Tensor:
    """(N, E) normalised embeddings of images (a uint8 tensor) or texts (a list of strings)."""
    def encode(chunk):  # (B, E)
        if isinstance(chunk, torch.Tensor):
            return model.encode_image(to_float(chunk, run.device))
        ids, lengths = run.texts.clip_batch(chunk, cfg.context_length)
        return model.encode_text(ids.to(run.device), lengths)
    return torch.cat([encode(items[i: i + batch]).float().cpu() for i in range(0, len(items), batch)])
def score_clip(model: CLIPModel, held_out: ImageSet, cfg: Config, run: Run) -> dict:
    """Per-item hits for each column (NaN = not applicable). Zero-shot is multi-label top-1: a hit when the
    class nearest to the image (template embeddings averaged, renormalised) is one of the classes present."""
    image_emb, gallery = embed(model, held_out.images, cfg, run), min(cfg.gallery, len(held_out.images))
    hits = dict.fromkeys(COLUMNS, np.full(len(image_emb), np.nan))
    hits |= ct.retrieval_hits(image_emb, embed(model, held_out.captions["ssc"], cfg, run), gallery)
    labels = ct.scene_labels(held_out.scenes) if held_out.scenes else {}  # a user's file: retrieval only
    for name, present in labels.items():
        prompts = [t.format(c) for c in ct.CLASSES[name] for t in ct.TEMPLATES[name]]
        class_emb = embed(model, prompts, cfg, run).view(len(ct.CLASSES[name]), -1, image_emb.shape[1])
        class_emb = F.normalize(class_emb.mean(1), dim=-1)  # (K, E)
        pred = (image_emb @ class_emb.t()).argmax(1)  # (N,)
        hits[f"{name} top1"] = np.where(present.any(1), present[torch.arange(len(pred)), pred], np.nan)
    return hits
# ----------------------------------------------------------------------------- eval: diffusion
@torch.no_grad()
def euler_sample(velocity, x: torch.Tensor, steps: int) -> torch.Tensor:
    """Integrate dx/dt = v(x, t) from t = 0 (x: noise) to t = 1 (image) in `steps` steps of 1 / steps."""
    for i in range(steps):
        x = x + velocity(x, torch.full((len(x),), i / steps, device=x.device)) / steps
    return x
@torch.no_grad()
def generate_images(model: FlowUNet, prompts: list[str], cfg: Config, run: Run) -> torch.Tensor:
    """uint8 samples, one batch, from the same noise (cfg.seed) for every model: compared image by image."""
    gen = torch.Generator().manual_seed(cfg.seed)
    noise = torch.randn(len(prompts), 3, cfg.diff_size, cfg.diff_size, generator=gen).to(run.device)
    ids, lengths = run.texts.clip_batch(prompts + [""] * len(prompts), cfg.context_length)  # (2N, T), (2N,)
    ids = ids.to(run.device)  # the N prompts, then N empty ones
    text = model.eval().encode_text(ids, lengths)  # the prompts' token states, the same at every step
    def velocity(x, t):  # classifier-free guidance: v(x, t, "") + w (v(x, t, c) - v(x, t, "")), w = guidance
        cond, empty = model(torch.cat([x, x]), torch.cat([t, t]), ids, lengths, text).float().chunk(2)
        return empty + cfg.guidance * (cond - empty)
    pixels = euler_sample(velocity, noise, cfg.sample_steps).cpu() * 0.25 + 0.5  # to_float's inverse
    return (pixels.clamp(0, 1) * 255).round().to(torch.uint8)  # (N, 3, S, S)
@torch.no_grad()
def geneval_hits(probe: nn.Module, images: torch.Tensor, targets: dict, kind: str, run: Run) -> dict:
    """Per prompt, 1 / 0 per requested attribute; "attributes": share right; "all requested": GenEval's."""
    logits = read_probe(probe, to_float(images, run.device))
    hits = np.stack([(logits[k].argmax(1).cpu() == targets[k]).float().numpy() for k in ct.REQUESTED[kind]])
    return dict(zip(ct.REQUESTED[kind], hits)) | {"attributes": hits.mean(0), "all requested": hits.prod(0)}
def score_diffusion(probe: nn.Module, held_out: ImageSet, samples: dict, cfg: Config, run: Run):
    """(rows, DIFF_KEY_PAIRS verdicts): the probe reads samples[recipe, seed][kind]; baselines; PNG grid."""
    rows, hits, grid, targets, out = {}, {}, {}, ct.geneval_targets(held_out.scenes), Path(cfg.out_dir)
    def score(name: str, images: torch.Tensor, kinds=tuple(ct.REQUESTED)) -> dict:  # a row per prompt kind
        found = {kind: geneval_hits(probe, images, targets, kind, run) for kind in kinds}
        rows.update({f"{name} ({k})": {c: float(np.mean(h[c])) if c in h else None
                                       for c in ct.GENEVAL_COLUMNS} for k, h in found.items()})
        grid.setdefault(name, images[:8])
        return found
    score("real render", held_out.images), score("another scene's render", held_out.images.roll(1, 0))
    for (recipe, seed), images in samples.items():
        for kind in ("dense", "short"):
            found = score(recipe + ("" if seed == cfg.seed else f" seed {seed}"), images[kind], [kind])[kind]
            hits.setdefault((recipe, seed), {})[f"attributes ({kind})"] = found["attributes"]
    score("empty prompt", images["empty"])
    grid = torch.cat([torch.cat(list(images), 2) for images in grid.values()], 1)  # (3, rows * S, 8 * S)
    image = Image.fromarray(grid.permute(1, 2, 0).numpy())  # one row of samples per model / baseline, 2x
    image.resize((2 * image.width, 2 * image.height), Image.NEAREST).save(out / "diffusion_samples.png")
    return rows, ct.key_pair_verdicts(hits, DIFF_KEY_PAIRS, cfg.bootstrap)
# ----------------------------------------------------------------------------- main
def read_resume_state(cfg: Config) -> dict:
    """--resume: every checkpoint of this run that exists, checked against cfg (reads only)."""
    steps = {"captioner": cfg.cap_steps, "captioner_vision": cfg.region_steps, "probe": cfg.probe_steps}
    for model, recipes, seeds, n in (("clip", cfg.recipes, cfg.seeds, cfg.clip_steps),
                                     ("diffusion", cfg.diff_recipes, cfg.diff_seeds, cfg.diff_steps)):
        steps |= {run_name(model, r, s, cfg): n for r in recipes for s in range(cfg.seed, cfg.seed + seeds)}
    saved = {name: load_checkpoint(cfg.out_dir, cfg, RESUME_MAY_DIFFER, name) for name in steps
             if (Path(cfg.out_dir) / f"{name}.optimizer.safetensors").is_file()}
    for name, step in [(name, s[2]) for name, s in saved.items() if s[2] > steps[name]]:
        raise InputError(f"--resume=True: {name} was saved at step {step}, past its {steps[name]} steps")
    if not saved:
        raise InputError(f"--resume=True: no checkpoint in {cfg.out_dir}")
    return saved
def main(argv: list[str]):
    cfg = parse_config(argv)
    check_config(cfg)
    device, rank, world = setup_device(cfg.device)
    out = check_out_dir(cfg.out_dir)
    pairs = ct.read_user_pairs(cfg.data, cfg) if cfg.data else None  # the only user file: checked up front
    run = Run(device, rank, world, Texts(), read_resume_state(cfg) if cfg.resume else {})
    if rank == 0:  # every check has passed: only now is anything written
        write_outputs(out, {"config.json": cfg})
    if world > 1:
        dist.barrier()
    seed_everything(cfg.seed)
    timings = {}
    cut = len(pairs.images) - min(cfg.n_eval, len(pairs.images) // 5) if pairs else 0  # user data: the tail
    web, held_out = (pairs[:cut], pairs[cut:]) if pairs else (
        render_split("web", 0, cfg.n_web, cfg), render_split("web", cfg.n_web, cfg.n_eval, cfg))

    # 1. the controllable captioner, trained on the "human" split's gold captions, scored on "test"
    def captioner_job():  # (model, rank 0: its table)
        model = train_captioner(render_split("human", 0, cfg.n_human, cfg, cfg.cap_image_size), cfg, run)
        test = render_split("test", 0, cfg.n_cap_eval, cfg, cfg.cap_image_size)
        return model, rank == 0 and evaluate_captioner(model, test, cfg, run)
    jobs = {"captioner": captioner_job} if "captioner" in cfg.parts else {}

    # 2. synthetic captions for the web images: gold (the captioner then trains beside the models below), or
    # the captioner's (trained first; its captions cached, sharded over ranks)
    fmts = {ct.parse_recipe(r)[0] for r in cfg.recipes * ("clip" in cfg.parts) + cfg.diff_recipes} - {"alt"}
    fmts, done = sorted(fmts | {"ssc", "dsc", "afc"} if cfg.export else fmts), {}  # the export has all three
    if cfg.synthetic == "gold":
        synthetic = ct.gold_synthetic(web, fmts, cfg.gold_error, cfg.seed)
    else:
        done, jobs, clock = run_jobs(jobs, cfg, run, timings), {}, time.time()
        captioner, state = done["captioner"][0], done["captioner"][0].state_dict()
        data_id = hashlib.sha256(Path(cfg.data).read_bytes()).hexdigest() if cfg.data else \
            f"shapesworld/{cfg.seed}/{cfg.n_web}/{cfg.cap_image_size}"
        weights = b"".join(k.encode() + v.float().cpu().numpy().tobytes() for k, v in state.items())
        key = hashlib.sha256(weights + f"/{data_id}/{cfg.alt_tokens}/{fmts}".encode())
        seen = ct.read_user_pairs(cfg.data, cfg, cfg.cap_image_size)[:cut] if pairs else \
            render_split("web", 0, cfg.n_web, cfg, cfg.cap_image_size)  # the web images, captioner's size
        synthetic = caption_images(captioner, seen, fmts, out / f"captions_{key.hexdigest()[:12]}", cfg, run)
        timings["web captioning"] = time.time() - clock
    if cfg.export and rank == 0:
        ct.export(out / "export", web, synthetic)

    # 3. one CLIP per recipe (and per seed for the key pairs' recipes), scored on held-out images
    clips = [(recipe, seed) for seed in range(cfg.seed, cfg.seed + cfg.seeds * ("clip" in cfg.parts))
             for recipe in cfg.recipes if seed == cfg.seed or recipe in {r for p in KEY_PAIRS for r in p[:2]}]
    def clip_job(recipe: str, seed: int):  # rank 0 returns the CLIP's per-item hits on the held-out images
        model = train_clip(recipe, seed, web, synthetic, cfg, run)
        return score_clip(model, held_out, cfg, run) if rank == 0 else None
    jobs |= {run_name("clip", *r, cfg): partial(clip_job, *r) for r in clips}

    # 4. the diffusion side: one text-to-image flow per recipe (per seed for the first DIFF_KEY_PAIRS claim),
    # scored by a probe trained on real renders; the last flow also draws from the empty prompt
    diffusing, flows = "diffusion" in cfg.parts and web.scenes is not None, []
    if diffusing:
        plain = render_split("web", 0, cfg.n_web + cfg.n_diff_eval, cfg, cfg.diff_size, plain=True)
        diff_web, diff_held_out = plain[:cfg.n_web], plain[cfg.n_web:]
        jobs["probe"] = partial(train_probe, diff_web, cfg, run)
        flows = [(recipe, seed) for seed in range(cfg.seed, cfg.seed + cfg.diff_seeds) for recipe in
                 cfg.diff_recipes if seed == cfg.seed or recipe in DIFF_KEY_PAIRS[0][:2]]
        def flow_job(recipe: str, seed: int):  # rank 0 returns {prompt kind: uint8 (n, 3, S, S) samples}
            model = train_diffusion(recipe, seed, diff_web, synthetic, cfg, run)
            prompts = {"dense": diff_held_out.captions["dsc"], "short": diff_held_out.captions["ssc"]} | (
                {"empty": [""] * cfg.n_diff_eval} if (recipe, seed) == flows[-1] else {})
            return {k: generate_images(model, p, cfg, run) for k, p in prompts.items()} if rank == 0 else {}
        jobs |= {run_name("diffusion", *r, cfg): partial(flow_job, *r) for r in flows}
    done |= run_jobs(jobs, cfg, run, timings)  # with --workers > 1, side by side
    if rank == 0:
        clip_rows, hits = {}, {r: done[run_name("clip", *r, cfg)] for r in clips}
        row_of = lambda h: {c: None if np.isnan(h[c]).all() else float(np.nanmean(h[c])) for c in COLUMNS}
        if "clip" in cfg.parts:  # baselines, then the recipes
            torch.manual_seed(cfg.seed)
            untrained = CLIPModel(cfg, run.texts.enc.n_vocab).to(device).eval()
            clip_rows["untrained CLIP"] = row_of(score_clip(untrained, held_out, cfg, run))
            clip_rows |= ct.baseline_rows(held_out, web.scenes, cfg.gallery) if web.scenes is not None else {}
        clip_rows |= {r if s == cfg.seed else f"{r} (seed {s})": row_of(h) for (r, s), h in hits.items()}
        diff_rows, diff_pairs = score_diffusion(done["probe"], diff_held_out, {
            r: done[run_name("diffusion", *r, cfg)] for r in flows}, cfg, run) if diffusing else ({}, [])
        clip_pairs = ct.key_pair_verdicts(hits, KEY_PAIRS, cfg.bootstrap) if web.scenes is not None else []
        metrics = {"captioner": done.get("captioner", [None])[-1], "clip": clip_rows, "diffusion": diff_rows,
                   "timings_s": timings, "key_pairs": clip_pairs, "diffusion_key_pairs": diff_pairs}
        write_outputs(out, {"metrics.json": metrics, "report.md": ct.report(cfg, metrics)})
        print(ct.report(cfg, metrics))
    if world > 1:
        dist.destroy_process_group()

if __name__ == "__main__":
    run_main(main)
