"""MM1.5 in miniature (Zhang et al., "MM1.5: Methods, Analysis & Insights from Multimodal LLM Fine-tuning",
arXiv:2409.20566). From an mm1.py checkpoint (rebuilt from its `arch` metadata): continual pre-training on
text-rich scenes, dynamic image splitting (plan_tiles: ONE plan for pixels and `<image>` slots), SFT on a
category mixture (ratios -> the paper's shares), video (4 frames) and UI screens (share 0 by default). Boxes:
"[x1, y1, x2, y2]" on 0-999 of the original image, one token per digit. torchrun: DDP, eval shared by task.

    python mm1.py && python mm15.py                  # cpu preset from out/mm1: prints the tables
    python mm15.py --ablate=resolution               # also split | mixture: whole runs x 3 seeds, mean +- sd
    python mm15.py --sft_data=conv.json              # SFT on LLaVA conversation JSON (boxes in the text)
    python mm15.py --preset=smoke --init=PATH        # tiny (what the tests run)
    torchrun --standalone --nproc_per_node=8 mm15.py --preset=gpu --init=out/mm1/model.safetensors

Tables (report.md, metrics.json): tile selectors (MM1.5, LLaVA-NeXT, InternVL); SFT shares, counts; accuracy
per task beside a blank image and the majority answer; grounding (IoU >= 0.5, parse failures, n_min = 1).
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
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from data import InputError
from data.shapes import mm15_tasks
from data.shapes.mm15_tasks import CATEGORIES, EVAL_TASKS, ItemPools, item_texts, resolve_mixture, text_to_box
from data.tile_selectors import grids, selector_table
from data.tokenizer import get_tokenizer
from data.vl_tasks import generate, tokenizer_sha256
from kernels import attention, moe_ffn


# ----------------------------------------------------------------------------- config
@dataclass
class Config:
    preset: str = "auto"            # smoke | cpu | gpu (auto: gpu with CUDA, else cpu)
    out_dir: str = "out/mm15"       # output folder
    seed: int = 0                   # data order and items
    device: str = "auto"            # auto | cpu | cuda | mps
    resume: bool = False            # continue from out_dir/model.safetensors + model.optimizer.safetensors
    init: str = "out/mm1/model.safetensors"  # the mm1.py checkpoint to continue from
    # dynamic image splitting
    tile_size: int = 0              # tile side in pixels (0: the --init checkpoint's image_size)
    image_tokens: int = 0           # LLM tokens per tile (0: the checkpoint's connector output)
    split: bool = True              # dynamic splitting (False: the whole image, aspect kept, in one tile)
    n_min: int = 4                  # fewest tiles of a split image (MM1.5: 4)
    n_max: int = 6                  # most tiles of a split image (MM1.5: 9)
    overview: str = "after"         # after | before | none: the whole image as one more tile
    indicators: str = "none"        # none | index ("r1c2:" before a tile) | seps ("," and newline)
    # continual pre-training (text-rich scenes + dense captions), then SFT on the mixture
    cpt_steps: int = 40             # continual pre-training steps
    cpt_lr: float = 3e-4            # its peak lr (warmup, cosine to min_lr_frac x peak)
    n_cpt_items: int = 300          # pre-rendered text-rich training scenes
    cpt_split: bool = True          # split its images too (False: one tile each, MM1.5's "low resolution")
    sft_steps: int = 260            # SFT steps
    sft_lr: float = 3e-4            # its peak lr
    mix_ratios: str = "general=1,describe=0.5,text_rich=3.3,refer_ground=2,knowledge=0.1,math=0.5"  # weights
    mix_groups: str = "single=0.8,multi_image=0.1,text_only=0.1"  # shares of the three groups (the paper's)
    n_train_items: int = 200        # pre-rendered SFT items per category
    sft_data: str = ""              # LLaVA conversation JSON to fine-tune on, not the mixture (boxes in text)
    batch_size: int = 8             # samples per step, one per row
    seq_len: int = 400              # longest sample (tokens); a longer one is counted and skipped, never cut
    warmup: int = 10                # linear warmup steps of each stage
    min_lr_frac: float = 0.0        # final lr / peak lr (the paper decays to 0)
    vit_lr_mult: float = 0.1        # lr multiplier of the ViT
    weight_decay: float = 0.1       # AdamW decay
    grad_clip: float = 1.0          # max global grad norm
    log_every: int = 10             # steps between log lines
    ckpt_every: int = 100           # steps between checkpoints (and at the end)
    eval_items: int = 100           # held-out items per eval category
    max_new_tokens: int = 32        # answer length limit at generation (a box: 18 tokens, a widget list 28)
    # ablations: whole runs in out_dir/<variant>_seed<k> (a finished one with the same config is reused)
    ablate: str = ""                # resolution | split | mixture: run its variants, print mean +- sd
    ablation_seeds: tuple = (0, 1, 2)  # seeds of each ablation variant

PRESETS = {
    "smoke": dict(n_min=2, n_max=4, cpt_steps=4, n_cpt_items=6, sft_steps=6, n_train_items=6, batch_size=4,
                  warmup=2, log_every=2, ckpt_every=5, eval_items=2, max_new_tokens=6),
    "cpu": dict(),
    "gpu": dict(n_max=9, cpt_steps=3000, n_cpt_items=8000, sft_steps=5000, n_train_items=4000,  # ~27 GB/rank
                batch_size=64, seq_len=2048, cpt_lr=1e-4, sft_lr=1e-4, warmup=100, log_every=20,
                ckpt_every=500, eval_items=500),
}
RESUME_MAY_DIFFER = ("resume", "device", "out_dir", "log_every", "ckpt_every", "eval_items", "max_new_tokens")

def check_config(cfg: Config) -> None:
    """Script-specific checks of the values (the skeleton checks keys and types)."""
    for key, allowed in dict(overview=("after", "before", "none"), indicators=("none", "index", "seps"),
                             ablate=("", "resolution", "split", "mixture")).items():
        if getattr(cfg, key) not in allowed:
            raise InputError(f"--{key}={getattr(cfg, key)}: expected one of {', '.join(map(repr, allowed))}")
    if not 1 <= cfg.n_min <= cfg.n_max:
        raise InputError(f"--n_min={cfg.n_min} --n_max={cfg.n_max}: expected 1 <= n_min <= n_max")
    if min(cfg.batch_size, cfg.seq_len, cfg.n_cpt_items, cfg.n_train_items, cfg.eval_items) < 1:
        raise InputError("expected --batch_size, --seq_len, --n_cpt_items, --n_train_items, --eval_items > 0")
    mixture(cfg)

def parse_ratios(text: str, key: str) -> dict:  # "a=1,b=0.5" -> {"a": 1.0, "b": 0.5}
    pairs = [part.partition("=") for part in text.split(",")]
    if any(not eq or not re.fullmatch(r"\d+(\.\d*)?", v.strip()) for _, eq, v in pairs) or len(
            {k.strip() for k, _, _ in pairs}) < len(pairs):
        raise InputError(f"--{key}={text}: expected name=number pairs, like {getattr(Config, key)}")
    return {k.strip(): float(v) for k, _, v in pairs}

def mixture(cfg: Config) -> dict:
    if cfg.sft_data:  # the user's data replaces the ShapesWorld mixture (the eval stays on ShapesWorld)
        return {"user": 1.0}
    ratios, groups = parse_ratios(cfg.mix_ratios, "mix_ratios"), parse_ratios(cfg.mix_groups, "mix_groups")
    shares = resolve_mixture(ratios, groups)
    if set(shares) - set(CATEGORIES):
        raise InputError(f"--mix_ratios / --mix_groups: unknown {sorted(set(shares) - set(CATEGORIES))}, "
                         f"expected some of {CATEGORIES} (MM1.5's code and science have no counterpart here)")
    return shares

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
# data/shapes/mm15_tasks.py: images at their real shapes, the SFT categories, boxes in original pixels.

def fit(width, height, box_w, box_h):
    """Aspect-kept resize of width x height into box_w x box_h: scale, (w, h), centred pad (left, top)."""
    scale = min(box_w / width, box_h / height)
    w, h = min(box_w, max(1, round(width * scale))), min(box_h, max(1, round(height * scale)))
    return scale, (w, h), ((box_w - w) // 2, (box_h - h) // 2)

def plan_tiles(width: int, height: int, cfg) -> dict:
    """The one tiling plan that both the pixels (tile_pixels) and the `<image>` slots (slot_ids) follow.
    MM1.5's rule over the grids with n_min <= tiles <= n_max of tile_size tiles: if some grids fit the image
    without downscaling (the aspect-kept resize has scale >= 1), the least padding; otherwise the least
    resolution loss; ties go to fewer tiles. The overview (the whole image in one tile) is added when the
    grid has more than one tile. Returns grid (rows, cols), resized (w, h), pad (left, top), overview
    ((w, h), pad), order (views in reading order), n_image_tokens."""
    r = cfg.tile_size

    def cost(grid):
        rows, cols = grid
        scale, (w, h), _ = fit(width, height, cols * r, rows * r)
        loss = rows * cols * r * r - w * h if scale >= 1 else width * height - w * h
        return scale < 1, loss, rows * cols, rows
    rows, cols = min(grids(cfg.n_min, cfg.n_max), key=cost) if cfg.split else (1, 1)
    _, resized, pad = fit(width, height, cols * r, rows * r)
    tiles = [("tile", i, j) for i in range(rows) for j in range(cols)]
    overview = [] if cfg.overview == "none" or len(tiles) == 1 else [("overview", 0, 0)]
    order = overview + tiles if cfg.overview == "before" else tiles + overview
    return dict(size=(width, height), tile=r, grid=(rows, cols), resized=resized, pad=pad, order=order,
                overview=fit(width, height, r, r)[1:], n_image_tokens=len(order) * cfg.image_tokens)

def slot_ids(plan: dict, cfg, image_id: int, encode) -> list:
    """An image's `<image>` slots (image_tokens per view, in plan order) with the position indicators."""
    ids = []
    for kind, i, j in plan["order"]:
        if cfg.indicators == "index":
            ids += encode(f" r{i + 1}c{j + 1}:" if kind == "tile" else " overview:")
        ids += [image_id] * cfg.image_tokens
        if cfg.indicators == "seps" and kind == "tile":
            ids += encode("," if j + 1 < plan["grid"][1] else "\n")
    return ids

def place(image: Image.Image, size, pad, canvas) -> Image.Image:
    out = Image.new("RGB", canvas)  # black padding
    out.paste(image.resize(size, Image.Resampling.BILINEAR), pad)
    return out

def tile_pixels(image: Image.Image, plan: dict) -> torch.Tensor:
    """The views of `plan` cut from the image: uint8 (n_views, 3, r, r)."""
    assert image.size == plan["size"], f"image {image.size} planned as {plan['size']}"
    r, (rows, cols) = plan["tile"], plan["grid"]
    canvas = np.asarray(place(image, plan["resized"], plan["pad"], (cols * r, rows * r)))  # (H, W, 3)
    overview = np.asarray(place(image, *plan["overview"], (r, r)))
    views = [overview if kind == "overview" else canvas[i * r:(i + 1) * r, j * r:(j + 1) * r]
             for kind, i, j in plan["order"]]
    return torch.from_numpy(np.stack(views)).permute(0, 3, 1, 2).contiguous()  # (n, 3, r, r)

def box_to_canvas(box, plan: dict, overview: bool = False, inverse: bool = False) -> list:
    """Original-image pixels -> pixels of the padded grid canvas (or of the overview tile); or back."""
    (w, h), (left, top) = plan["overview"] if overview else (plan["resized"], plan["pad"])
    scale, shift = (w / plan["size"][0], h / plan["size"][1]) * 2, (left, top) * 2
    return [(v - d) / k if inverse else v * k + d for v, k, d in zip(box, scale, shift)]

def box_in_tiles(canvas_box, plan: dict) -> dict:
    """{view index: the part of a canvas box inside that tile, in its pixels} for the tiles it meets."""
    r, out = plan["tile"], {}
    for n, (kind, i, j) in enumerate(plan["order"]):
        x1, y1 = max(canvas_box[0], j * r) - j * r, max(canvas_box[1], i * r) - i * r
        x2, y2 = min(canvas_box[2], (j + 1) * r) - j * r, min(canvas_box[3], (i + 1) * r) - i * r
        if kind == "tile" and x2 > x1 and y2 > y1:
            out[n] = [x1, y1, x2, y2]
    return out

class Data(ItemPools):
    """The pre-rendered items (data/shapes/mm15_tasks.py) and their samples, tiled by plan_tiles."""

    def __init__(self, cfg: Config, enc):
        self.enc, self.image_id = enc, enc.encode_single_token("<image>")
        self.eot_id, self.pad_id = (enc.encode_single_token(t) for t in ("<|endoftext|>", "<|pad|>"))
        super().__init__(cfg.seed, cfg.tile_size, cfg.n_cpt_items, cfg.n_train_items, cfg.eval_items)
        self.train = {"user": mm15_tasks.llava_sft_items(cfg.sft_data)} if cfg.sft_data else self.train

    def sample(self, item: dict, cfg: Config, with_answer=True, blank=False):
        """(ids, n_prompt, tiles (N, 3, r, r) or None). SFT: "Question: q <image slots> Answer: a<eot>";
        continual pre-training: "<image slots>caption<eot>" (mm1's caption format)."""
        encode = lambda text: mm15_tasks.encode_text(self.enc, text)  # BPE, box digits one token each
        ids, tiles = ([] if "text" in item else encode("Question: " + item_texts(item)[0])), []
        for pil in item["pil"]:  # MM1.5 splits only samples of < 3 images (video frames: one tile each)
            plan = plan_tiles(*pil.size, dataclasses.replace(cfg, split=cfg.split and len(item["pil"]) < 3))
            slots = slot_ids(plan, cfg, self.image_id, encode)
            assert slots.count(self.image_id) == plan["n_image_tokens"], "slots and plan disagree"
            ids += slots
            tiles.append(tile_pixels(Image.new("RGB", pil.size, (128, 128, 128)) if blank else pil, plan))
        ids += [] if "text" in item else encode(" Answer:")
        n_prompt = len(ids)
        answer = item["text"] if "text" in item else " " + item_texts(item)[1]
        ids += encode(answer) + [self.eot_id] if with_answer else []
        return ids, n_prompt, torch.cat(tiles) if tiles else None

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

# ----------------------------------------------------------------------------- losses
def loss_of(model, rows, pad_id: int, device: str, scale: float = 1.0):
    """Mean next-token cross-entropy over the targets of a batch of samples (ids, n_prompt, tiles), x scale:
    only the answer (SFT) or the caption (continual pre-training) is a target; image slots, padding never."""
    T = max(len(ids) for ids, _, _ in rows) - 1
    x = torch.full((len(rows), T), pad_id)  # (B, T) right-padded: causal attention never sees the padding
    y = torch.full((len(rows), T), -100)  # (B, T)
    for b, (ids, n_prompt, _) in enumerate(rows):
        x[b, :len(ids) - 1] = torch.tensor(ids[:-1])
        y[b, n_prompt - 1:len(ids) - 1] = torch.tensor(ids[n_prompt:])
    tiles = [t for _, _, t in rows if t is not None]
    with torch.autocast("cuda", torch.bfloat16, enabled=device.startswith("cuda")):
        logits, aux = model(x.to(device), torch.cat(tiles).to(device) if tiles else None)
    loss = F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten()) * scale
    return loss + (0.01 * aux["balance_loss"] + 0.001 * aux["z_loss"] if aux else 0.0)  # MM1's MoE recipe

# ----------------------------------------------------------------------------- train
def train(cfg: Config, data: Data, model, opt, device: str, log, start: int, meta: dict, rank=0, world=1):
    """Continual pre-training (steps 0..cpt_steps-1), then SFT on the mixture, one optimizer; each stage
    warms up and decays on its own. A step's samples are a pure function of (seed, step): under torchrun
    every rank draws the same global batch and trains on its slice of the rows; rank 0 logs and saves."""
    names, p = zip(*(shares := mixture(cfg)).items())
    sampled, skipped, t0, seen = Counter(), 0, time.time(), 0
    cpt_cfg = dataclasses.replace(cfg, split=cfg.cpt_split)
    gpu = [torch.cuda.current_device()] if device.startswith("cuda") else None  # text-only rows: no ViT
    net = model if world == 1 else nn.parallel.DistributedDataParallel(model, gpu, find_unused_parameters=1)
    mine = slice(rank * cfg.batch_size // world, (rank + 1) * cfg.batch_size // world)  # this rank's rows
    model.train()
    for step in tqdm(range(start, cfg.cpt_steps + cfg.sft_steps), desc="cpt + sft", disable=None):
        stage, first, steps, peak = (("cpt", 0, cfg.cpt_steps, cfg.cpt_lr) if step < cfg.cpt_steps else
                                     ("sft", cfg.cpt_steps, cfg.sft_steps, cfg.sft_lr))
        set_lr(opt, lr := lr_at(step - first, steps, peak, min(cfg.warmup, steps), cfg.min_lr_frac * peak))
        rng, rows = np.random.default_rng([cfg.seed, step]), []
        while len(rows) < cfg.batch_size:
            name = "cpt" if stage == "cpt" else names[rng.choice(len(names), p=p)]
            pool = data.cpt if stage == "cpt" else data.train[name]
            row = data.sample(pool[rng.integers(len(pool))], cpt_cfg if stage == "cpt" else cfg)
            if len(row[0]) > cfg.seq_len:  # never cut (that would cut image slots): counted and skipped
                skipped += 1
                if skipped > 20 * cfg.batch_size + sum(sampled.values()):
                    raise InputError(f"--seq_len={cfg.seq_len}: most samples are longer ({len(row[0])})")
                continue
            sampled[name] += 1
            rows.append(row)
        n = [len(ids) - n_prompt for ids, n_prompt, _ in rows]  # x world / ranks' mean = global token mean
        loss = loss_of(net, rows[mine], data.pad_id, device, sum(n[mine]) / sum(n) * world)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        seen, last, loss = seen + len(rows), step + 1 == cfg.cpt_steps + cfg.sft_steps, loss.detach()
        dist.all_reduce(loss) if world > 1 else None  # sum over ranks / world: the batch's token mean
        if (step + 1) % cfg.log_every == 0 or last:
            line = log(step + 1, loss.item() / world, lr, seen, stage=stage, skipped_too_long=skipped)
            print(json.dumps(line)) if rank == 0 else None
            seen = 0
        if rank == 0 and ((step + 1) % cfg.ckpt_every == 0 or last):
            save_checkpoint(cfg.out_dir, model, opt, cfg, step + 1, meta=meta)
    total = sum(v for k, v in sampled.items() if k != "cpt")
    return dict(train_time_s=round(time.time() - t0, 1), skipped=skipped, sampled_counts=dict(sampled),
                sampled_shares={k: round(sampled[k] / max(total, 1), 4) for k in names}, shares=shares)

# ----------------------------------------------------------------------------- eval
@torch.no_grad()
def answers(model, data: Data, cfg, items: list, device: str, blank=False) -> list:
    """Greedy answers to items, 16 at a time, left-padded (data.vl_tasks.generate)."""
    model.eval()
    out = []
    for lo in range(0, len(items), 16):
        built = [data.sample(item, cfg, with_answer=False, blank=blank) for item in items[lo:lo + 16]]
        tiles = [t for _, _, t in built if t is not None]
        new = generate(model, [ids for ids, _, _ in built], torch.cat(tiles).to(device) if tiles else None,
                       cfg.max_new_tokens, data.eot_id, data.pad_id)
        out += [data.enc.decode(ids).strip() for ids in new]
    model.train()
    return out

def evaluate(model, data: Data, cfg, device: str, rank=0, world=1) -> dict:
    """Accuracy per eval task: the model, the same model with blank (grey) images of the same shapes (so
    the same tiles and tokens), and the majority training answer; grounding also with n_min = 1 at
    inference only (MM1.5: 74.0 -> 24.5) and its parse failures. torchrun: task k on rank k % world."""
    m = {}
    for task, items in list(data.test.items())[rank::world]:
        runs = {"model": answers(model, data, cfg, items, device),
                "majority": [data.majority(item, task) for item in items]}
        if any(item["pil"] for item in items):
            runs["blank"] = answers(model, data, cfg, items, device, blank=True)
        if task == "grounding":
            runs["n_min_1"] = answers(model, data, dataclasses.replace(cfg, n_min=1), items, device)
            predicted = [text_to_box(t, *it["pil"][0].size) for t, it in zip(runs["model"], items)]
            mm15_tasks.boxes_png(items[:8], predicted, Path(cfg.out_dir) / "grounding.png")  # gold, predicted
        for run, texts in runs.items():
            hits = [mm15_tasks.score(t, item, task) for t, item in zip(texts, items)]
            m[f"{task}_{run}"] = round(100 * np.mean([bool(h) for h in hits]), 1)
            if task in mm15_tasks.BOX_TASKS:
                m[f"{task}_{run}_parse_fail"] = round(100 * np.mean([h is None for h in hits]), 1)
        m[f"{task}_n"] = len(items)
        m.setdefault("samples", []).append(f"{task}: {item_texts(items[0])[0]!r} -> {runs['model'][0]!r} "
                                           f"(gold {item_texts(items[0])[1]!r})")
    parts = [m] * world
    dist.all_gather_object(parts, m) if world > 1 else None  # torchrun: every rank gets every task's numbers
    m = {k: v for p in parts for k, v in p.items()} | {"samples": [s for p in parts for s in p["samples"]]}
    return m | {"average_model": round(np.mean([m[f"{t}_model"] for t in data.test]), 1)}

def results_table(m: dict, data: Data) -> str:
    lines = ["| eval task | n | model | blank image | majority answer |", "|---" * 5 + "|"] + [
        f"| {t} | {m[f'{t}_n']} | {m[f'{t}_model']:.1f} | {m.get(f'{t}_blank', 'n/a (no image)')} | "
        f"{m[f'{t}_majority']:.1f} |" for t in data.test] + [f"| average | | {m['average_model']:.1f} | | |"]
    fails = m["grounding_model_parse_fail"], m["grounding_n_min_1"], m["grounding_n_min_1_parse_fail"]
    return "\n".join(lines) + ("\n\ngrounding (acc at IoU >= 0.5): parse failures {}%; with n_min = 1 at "
                              "inference only: {}% (parse failures {}%)").format(*fails)

# ----------------------------------------------------------------------------- main
def load_init(cfg: Config, enc):
    """The mm1.py checkpoint: weights, metadata and the arch dict, checked against this tokenizer."""
    if not Path(cfg.init).is_file():
        raise InputError(f"--init={cfg.init}: no such checkpoint; run `python mm1.py` first (about 6 min on "
                         "2 cores) or pass --init=PATH")
    weights, meta = read_safetensors(cfg.init)
    arch, image_id = json.loads(meta.get("arch", "{}")), enc.encode_single_token("<image>")
    if (meta.get("tokenizer_sha256"), arch.get("image_token_id")) != (tokenizer_sha256(), image_id):
        raise InputError(f"--init={cfg.init}: no mm1.py metadata, or another tokenizer (sha256, <image> id)")
    return weights, meta, arch

def variants(cfg: Config) -> dict:
    """{variant: config overrides} of --ablate ({}: the base run, shared by the three). Mixture: each category
    dropped in turn (its ratio or group share 0), text-rich, refer & ground and multi-image doubled."""
    if cfg.ablate != "mixture":
        return dict(resolution=dict(none=dict(cpt_steps=0), low=dict(cpt_split=False), high={}),
                    split=dict(off=dict(split=False), on={}))[cfg.ablate]
    tables = dict(mix_ratios=parse_ratios(cfg.mix_ratios, ""), mix_groups=parse_ratios(cfg.mix_groups, ""))
    scaled = lambda name, x: {key: ",".join(f"{k}={v * x if k == name else v:g}" for k, v in table.items())
                              for key, table in tables.items()}
    return ({"paper shares": {}} | {f"no {c}": scaled(c, 0) for c, share in mixture(cfg).items() if share}
            | {f"{c} x2": scaled(c, 2) for c in ("text_rich", "refer_ground", "multi_image")})

def finished(cfg: Config):
    """The metrics of a finished run in cfg.out_dir made with this config, else None."""
    folder, now = Path(cfg.out_dir), json.loads(json.dumps(asdict(cfg)))
    if not (folder / "metrics.json").is_file():
        return None
    saved = json.loads((folder / "config.json").read_text())
    free = RESUME_MAY_DIFFER + ("tile_size", "image_tokens", "ablation_seeds")  # sizes: filled in from --init
    return json.loads((folder / "metrics.json").read_text()) if all(
        saved.get(k) == v for k, v in now.items() if k not in free) else None

def ablate(cfg: Config) -> dict:
    """Each variant x seed as a whole run in out_dir/<variant>_seed<k> (a finished run of the same config is
    reused); accuracy per eval task, mean +- sd (n - 1) over the seeds, and minutes per run."""
    header = ("", cfg.ablate, *EVAL_TASKS, "average", "minutes", "")
    lines, means = [" | ".join(header).strip(), "|---" * (len(header) - 2) + "|"], {}
    for name, overrides in variants(cfg).items():
        folder = Path(cfg.out_dir) / (re.sub(r"\W+", "_", name) if overrides else "base")
        subs = [dataclasses.replace(cfg, ablate="", seed=seed, out_dir=f"{folder}_seed{seed}", **overrides)
                for seed in cfg.ablation_seeds]
        runs = [finished(sub) or run(sub) for sub in subs]
        cells = [[m[f"{t}_model"] for m in runs] for t in (*EVAL_TASKS, "average")] + [
            [(m["train_time_s"] + m["eval_time_s"] + m["data_time_s"]) / 60 for m in runs]]
        means[name] = [round(float(np.mean(c)), 2) for c in cells]
        lines.append(f"| {name} | " + " | ".join(f"{np.mean(c):.1f}" + (
            f" ± {np.std(c, ddof=1):.1f}" if len(c) > 1 else "") for c in cells) + " |")
    if not dist.is_initialized() or dist.get_rank() == 0:  # torchrun: rank 0 prints and writes the table
        print("\n".join(lines)) or write_outputs(cfg.out_dir, {f"ablation_{cfg.ablate}.md": "\n".join(lines)
                                                               + "\n", f"ablation_{cfg.ablate}.json": means})
    return means

def main(argv):
    check_config(cfg := parse_config(argv))
    try:
        return ablate(cfg) if cfg.ablate else run(cfg)
    finally:
        dist.destroy_process_group() if dist.is_initialized() else None

def run(cfg: Config) -> dict:
    device, rank, world = setup_device(cfg.device)
    if cfg.batch_size % world:
        raise InputError(f"--batch_size={cfg.batch_size}: expected a multiple of the {world} torchrun ranks")
    check_out_dir(cfg.out_dir)
    t0, enc = time.time(), get_tokenizer()
    weights, meta, arch = load_init(cfg, enc)
    for key, v in (("tile_size", arch["image_size"]), ("image_tokens", arch["connector"]["image_tokens"])):
        if getattr(cfg, key) not in (0, v):
            raise InputError(f"--{key}={getattr(cfg, key)}: the checkpoint {cfg.init} has {v}")
        cfg = dataclasses.replace(cfg, **{key: v})
    seed_everything(cfg.seed)
    data, model, start = Data(cfg, enc), MM1(arch), 0
    model.to(device).load_state_dict(weights)
    opt = make_adamw(model, cfg.sft_lr, cfg.weight_decay, lr_mult={"vision_model.": cfg.vit_lr_mult})
    if cfg.resume:  # reads only
        weights, optim_state, start, _ = load_checkpoint(cfg.out_dir, cfg, RESUME_MAY_DIFFER)
        model.load_state_dict(weights)
        opt.load_state_dict(optim_state)
    tiling = ("tile_size", "image_tokens", "split", "n_min", "n_max", "overview", "indicators")
    sft = dict(init=cfg.init, tiling={k: getattr(cfg, k) for k in tiling},
               boxes="[x1, y1, x2, y2] on 0-999 of the original image: floor(x / W * 1000), clipped to 999; "
               "one token per digit (data.shapes.mm15_tasks.encode_text)",
               prompt="Question: {q} <image slots> Answer: {a}<|endoftext|>", shares=mixture(cfg))
    meta = {k: meta[k] for k in ("arch", "tokenizer_sha256", "image_token_id", "image_size")} | {"sft": sft}
    write_outputs(cfg.out_dir, {"config.json": cfg}) if rank == 0 else None  # inputs all checked: only now
    selectors, data_time = selector_table(cfg, plan_tiles, fit), round(time.time() - t0, 1)
    print(f"config: {json.dumps(asdict(cfg))}\ndata: {data_time} s\n{selectors}") if rank == 0 else None
    log = RunLog(cfg.out_dir, "items", 0.0, device, rank, world)
    summary, t1 = train(cfg, data, model, opt, device, log, start, meta, rank, world), time.time()
    metrics = {**evaluate(model, data, cfg, device, rank, world), **summary}
    metrics |= {"eval_time_s": round(time.time() - t1, 1), "data_time_s": data_time}
    shares = "\n".join(f"| {k} | {100 * v:.1f} | {summary['sampled_counts'].get(k, 0)} |"
                       for k, v in summary["shares"].items())
    table = results_table(metrics, data)
    report = (f"# MM1.5 miniature ({cfg.preset} preset)\n\n## Tile selectors\n{selectors}\n\n## SFT mixture\n"
              f"| category | share (%) | sampled |\n|---|---|---|\n{shares}\n\n## Eval\n{table}\n\n"
              + "\n".join(f"- {s}" for s in metrics["samples"]) + "\n")
    if rank == 0:  # torchrun: the others return the same metrics
        print(report) or write_outputs(cfg.out_dir, {"metrics.json": metrics, "report.md": report})
    return metrics

if __name__ == "__main__":
    run_main(main)
