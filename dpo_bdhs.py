"""Multimodal preference alignment in miniature: offline, online and mixed DPO, and BDHS.

Amirloo et al., "Understanding Alignment in Multimodal LLMs: A Comprehensive Study", arXiv:2407.02477:
from an mm15.py checkpoint, each row of the table trains a fresh policy against a frozen reference.

    python mm1.py && python mm15.py && python dpo_bdhs.py      # cpu preset: every row, one seed
    python dpo_bdhs.py --seeds=0,1,2                           # the three-seed table (mean +- sd)
    torchrun --nproc_per_node=2 dpo_bdhs.py                    # each step's pairs split over 2 processes
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

from data import InputError
from data.shapes import preferences as pref
from data.shapes.mm15_tasks import native_size, render_shaped
from data.shapes.world import rng_for
from data.tile_selectors import grids
from data.tokenizer import get_tokenizer
from data.vl_tasks import tokenizer_sha256
from kernels.attention import attention, visibility_mask

# ----------------------------------------------------------------------------- config
ROWS = ("sft", "povid", "rlhfv", "online", "mixed", "bdhs", "online_bdhs", "bdhs_ext", "bdhs_noise")

@dataclass
class Config:
    preset: str = "auto"            # smoke | cpu | gpu (auto: gpu with CUDA, else cpu)
    out_dir: str = "out/dpo_bdhs"   # output folder
    seed: int = 0                   # data (scenes, pairs); the training seeds are --seeds
    device: str = "auto"            # auto | cpu | cuda | mps
    resume: bool = False            # continue from out_dir/model.safetensors + model.optimizer.safetensors
    init: str = "out/mm15/model.safetensors"  # the mm15.py checkpoint to start from
    ref: str = "live"               # live: the frozen reference runs every batch | upfront: once, before
    rows: tuple = ROWS              # the table's rows (default: all of ROWS)
    seeds: tuple = (0,)             # training seeds of every row (--seeds=0,1,2: mean +- sd over three)
    pairs: str = ""                 # TRL preference JSONL for the offline rows instead of POVID-style pairs
    export: str = ""                # write the POVID-style training pairs here as TRL JSONL (+ PNGs)
    loss: str = "sigmoid"           # sigmoid (DPO) | ipo | hinge
    beta: float = 0.1               # DPO beta
    label_smoothing: float = 0.0    # cDPO: assumed share of flipped labels (sigmoid loss only)
    rpo_alpha: float = 1.0          # weight of the per-token NLL of chosen (RPO): keeps y+ likely; 0: off
    gamma: float = 0.5              # bdhs_ext: gamma * DPO(y+, y-_ext) + (1 - gamma) * DPO(y+, y-_BDHS)
    steps: int = 10                 # training steps per row
    lr: float = 1e-4                # peak lr (warmup, cosine to 0)
    batch_size: int = 8             # preference pairs per step
    n_train: int = 32               # training prompts (scenes)
    yes_no_share: float = 0.3       # share of yes/no existence questions among the prompts
    yes_no_long: bool = False       # answer them "Yes, there is a red star." (False: "yes", as the SFT's VQA)
    n_samples: int = 2              # online: samples per prompt for the judge
    temperature: float = 1.0        # sampling temperature (online samples, BDHS completions)
    rho_th: float = 0.99            # BDHS: an image token stays visible iff U(0,1) >= rho_th
    sim_threshold: float = 0.97     # BDHS: resample while cosine(y-, y+) >= this
    max_tries: int = 5              # BDHS: tries per example; the last one is unguided and kept
    seq_len: int = 256              # longest prompt + response; longer responses are cut (counted)
    max_new_tokens: int = 32        # generation limit of descriptions and online samples
    eval_scenes: int = 12           # held-out scenes per POPE split, descriptions, VQA, held-out pairs
    warmup: int = 2                 # linear warmup steps
    grad_clip: float = 1.0          # max global grad norm
    log_every: int = 5              # steps between log lines
    ckpt_every: int = 50            # steps between checkpoints (and at the end of each row)
PRESETS = {
    "smoke": dict(rows=("sft", "povid", "online", "mixed", "bdhs", "bdhs_ext"), steps=2, batch_size=2,
                  n_train=6, eval_scenes=2, max_new_tokens=8, max_tries=2, log_every=1, ckpt_every=2),
    "cpu": dict(),
    "gpu": dict(steps=300, batch_size=32, n_train=5000, eval_scenes=300, max_new_tokens=64, lr=1e-5,
                seeds=(0, 1, 2), log_every=20, ckpt_every=100),
}
RESUME_MAY_DIFFER = ("resume", "device", "out_dir", "log_every", "ckpt_every")
LOGGED = ("loss", "dpo_loss", "chosen", "rejected", "ref_chosen", "ref_rejected", "margin", "reward_chosen")

def check_config(cfg: Config) -> None:
    """Script-specific checks of the values (the skeleton checks keys and types)."""
    if cfg.loss not in ("sigmoid", "ipo", "hinge") or cfg.ref not in ("live", "upfront") or not cfg.rows \
            or not set(cfg.rows) <= set(ROWS):
        raise InputError(f"--loss={cfg.loss} --ref={cfg.ref} --rows={','.join(cfg.rows)}: expected sigmoid, "
                         f"ipo or hinge, live or upfront, and rows among {', '.join(ROWS)}")
    if cfg.pairs and {"rlhfv", "online", "mixed", "online_bdhs"} & set(cfg.rows):
        raise InputError("--pairs: user pairs have no scene graph for the judge; use --rows=sft,povid,bdhs")
    n = (cfg.steps + 1, cfg.batch_size, cfg.n_train, cfg.eval_scenes, cfg.max_tries, cfg.n_samples - 1)
    if min(n) < 1 or not (0 <= cfg.label_smoothing < 0.5 and 0 <= cfg.gamma <= 1 and 0 <= cfg.rho_th <= 1):
        raise InputError("expected --steps >= 0, --n_samples > 1, sizes > 0, 0 <= --label_smoothing < 0.5, "
                         "--gamma and --rho_th in [0, 1]")

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

class Data:
    """Prompts (ShapesWorld or a user's TRL pairs) and held-out items in mm15's SFT format and tiling."""
    def __init__(self, cfg: Config, enc, tiling: dict):
        self.enc, self.tiling, self.seq_len, self.truncated = enc, SimpleNamespace(**tiling), cfg.seq_len, 0
        self.image_id, self.eot_id, self.pad_id = map(enc.encode_single_token, ["<image>", "<|endoftext|>",
                                                                                 "<|pad|>"])
        assert self.pad_id != self.eot_id, "pad = eos: the model would never learn to stop"
        self.eot = torch.arange(enc.n_vocab) == self.eot_id  # (V,) the stop token of a whole answer
        self.period = self.eot | torch.tensor(["." in enc.decode([i]) for i in range(enc.n_vocab)])  # (V,)
        vars(self).update(pref.item_sets(cfg))  # self.train (or --pairs), test, describe, vqa, pope; POVID y-
        for item in [*self.train, *self.test, *self.describe, *self.vqa, *sum(self.pope.values(), [])]:
            if "pil" not in item:  # one image per scene: square, long side 0.75-2.5 tiles, as mm15's natural
                size = native_size("natural", rng_for("dpo-size", item["scene"].uid), tiling["tile_size"])
                item["pil"] = render_shaped(item["scene"], *size)
    def prompt(self, item: dict, blank=False):
        """(ids, tiles uint8 (n_views, 3, r, r)) of an item's prompt; blank: a grey image of the same size."""
        key = "blank_tiles" if blank else "tiles"
        if key not in item:
            pil = Image.new("RGB", item["pil"].size, (128, 128, 128)) if blank else item["pil"]
            plan, encode = plan_tiles(*pil.size, self.tiling), self.enc.encode_ordinary
            ids = encode("Question: " + item["question"]) + slot_ids(plan, self.tiling, self.image_id, encode)
            item[key] = ids + encode(" Answer:"), tile_pixels(pil, plan)
        return item[key]
    def pair_row(self, item: dict, text: str, blank=False):
        """(prompt, response + EOS, tiles); too long: the response's end is cut (counted), not the prompt."""
        ids, tiles = self.prompt(item, blank)
        response = self.enc.encode_ordinary(" " + text.strip()) + [self.eot_id]
        if len(ids) >= self.seq_len:
            raise InputError(f"--seq_len={self.seq_len}: the prompt of {item['id']} has {len(ids)} tokens")
        self.truncated += len(ids) + len(response) > self.seq_len
        return ids, response[:self.seq_len - len(ids)], tiles
    def pair_rows(self, pairs: list, blank=False):  # rows (chosen..., rejected..., ext...), table keys
        texts = [(p["item"], p[k]) for k in ("chosen", "rejected", "ext") if k in pairs[0] for p in pairs]
        return [self.pair_row(it, t, blank) for it, t in texts], [(it["id"], t, blank) for it, t in texts]

# ----------------------------------------------------------------------------- model
AttnPoolConnector = MoEMLP = None  # mm15.py's attention pooling and MoE: not copied, main() refuses them
# Copies of mm1.py / mm15.py (CLIP ViT, connectors, Llama decoder; the tiling above), see test_skeleton.py.
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

class AvgPoolConnector(nn.Module):
    """n x n average pooling of the patch grid, then a linear map into the LLM width."""

    def __init__(self, vit_width, llm_width, image_tokens):
        super().__init__()
        self.side = math.isqrt(image_tokens)
        self.proj = nn.Linear(vit_width, llm_width)

    def forward(self, feats):  # (N, P, Cv)
        grid = feats.transpose(1, 2).unflatten(2, (math.isqrt(feats.shape[1]),) * 2)  # (N, Cv, g, g)
        return self.proj(F.adaptive_avg_pool2d(grid, self.side).flatten(2).transpose(1, 2))  # (N, K, C)

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
def sequence_logps(model, rows, data: Data, device):
    """THE log-prob function: summed log-probs (B,) of each row's response + EOS and its length (B,)."""
    T = max(len(p) + len(r) for p, r, _ in rows)
    ids = torch.full((len(rows), T), data.pad_id, device=device)  # (B, T) right-padded: causal never sees it
    mask = torch.zeros(len(rows), T - 1, dtype=torch.bool, device=device)  # (B, T - 1): t predicts t + 1
    for b, (prompt, response, _) in enumerate(rows):
        ids[b, :len(prompt) + len(response)] = torch.tensor(prompt + response)
        mask[b, len(prompt) - 1:len(prompt) + len(response) - 1] = True
    logits = model(ids, torch.cat([t for _, _, t in rows]).to(device))[0][:, :-1].float()  # (B, T - 1, V)
    logps = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]  # (B, T - 1)
    return (logps * mask).sum(-1), mask.sum(-1)

def preference_loss(pi_c, pi_r, ref_c, ref_r, n_c, n_r, cfg):
    """Per-pair loss and the implicit rewards beta (log pi(y|x) - log pi_ref(y|x)) of chosen and rejected.
    With h = (log pi(y+) - log pi_ref(y+)) - (log pi(y-) - log pi_ref(y-)):
    sigmoid (DPO, Rafailov et al. 2023 Eq. 7; cDPO label smoothing eps, Mitchell 2023):
        L = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
    ipo (Azar et al. 2023 Eq. 17; TRL's form on log-probs averaged over tokens): L = (h_avg - 1 / (2 beta))^2
    hinge (SLiC-HF, Zhao et al. 2023): L = max(0, 1 - beta h)."""
    h = (pi_c - ref_c) - (pi_r - ref_r)  # (B,)
    if cfg.loss == "ipo":
        losses = ((pi_c - ref_c) / n_c - (pi_r - ref_r) / n_r - 1 / (2 * cfg.beta)) ** 2
    elif cfg.loss == "hinge":
        losses = F.relu(1 - cfg.beta * h)
    else:
        eps = cfg.label_smoothing
        losses = -(1 - eps) * F.logsigmoid(cfg.beta * h) - eps * F.logsigmoid(-cfg.beta * h)
    return losses, cfg.beta * (pi_c - ref_c).detach(), cfg.beta * (pi_r - ref_r).detach()

def combined_loss(loss_ext, loss_bdhs, gamma):  # the paper's gamma DPO(y+, y-ext) + (1-gamma) DPO(y+, y-BDHS)
    return gamma * loss_ext + (1 - gamma) * loss_bdhs

def pair_losses(policy, ref, data: Data, pairs: list, cfg, device, blank=False):
    """Loss and per-pair statistics: policy and Reference log-probs of every response (blank: grey images)."""
    rows, keys = data.pair_rows(pairs, blank)
    B, k = len(pairs), len(rows) // len(pairs)
    pi, n = (x.view(k, B) for x in sequence_logps(policy, rows, data, device))  # (k, B)
    ref_lp = ref(rows, keys, data).view(k, B)  # (k, B), no graph: the Reference is frozen
    losses, reward_c, reward_r = preference_loss(pi[0], pi[1], ref_lp[0], ref_lp[1], n[0], n[1], cfg)
    if k == 3:
        ext = preference_loss(pi[0], pi[2], ref_lp[0], ref_lp[2], n[0], n[2], cfg)[0]
        losses = combined_loss(ext, losses, cfg.gamma)
    per_token = dict(chosen=pi[0] / n[0], rejected=pi[1] / n[1], ref_chosen=ref_lp[0] / n[0], dpo_loss=losses,
                     ref_rejected=ref_lp[1] / n[1], reward_chosen=reward_c, reward_rejected=reward_r)
    loss = losses.mean() - cfg.rpo_alpha * (pi[0] / n[0]).mean()  # + RPO's NLL of y+ per token (Pang 2024)
    return loss, {k: v.detach() for k, v in per_token.items()} | dict(margin=reward_c - reward_r)

# ----------------------------------------------------------------------------- train
class Reference:
    """log pi_ref(y|x) of a frozen copy, sharing nothing with the policy: live, or upfront (checked once)."""
    def __init__(self, arch: dict, weights: dict, device, upfront: bool):
        self.model, self.table, self.checked, self.device = MM1(arch), {} if upfront else None, None, device
        self.model.load_state_dict(weights)  # copies: load_state_dict never shares the dict's tensors
        self.model.to(device).eval().requires_grad_(False)  # frozen: its log-probs build no autograd graph
    def fill(self, data: Data, pairs: list, blank=False):  # upfront, as TRL's precompute_ref_log_probs
        for lo in range(0, len(pairs), 8):
            rows, keys = data.pair_rows(pairs[lo:lo + 8], blank)
            self.table |= dict(zip(keys, sequence_logps(self.model, rows, data, self.device)[0].cpu()))
    def __call__(self, rows, keys, data: Data):  # keys: (item id, response text, blank) per row
        if self.table is None or not all(key in self.table for key in keys):
            return sequence_logps(self.model, rows, data, self.device)[0]  # (B,)
        upfront = torch.stack([self.table[key] for key in keys]).to(self.device)  # (B,)
        if self.checked is None:  # once: the table must equal the live reference on this batch (TRL PR 1961)
            live = sequence_logps(self.model, rows, data, self.device)[0]  # (B,)
            torch.testing.assert_close(upfront, live, rtol=1e-5, atol=1e-3, msg=lambda m: f"upfront: {m}")
            self.checked = (upfront - live).abs().max().item()
        return upfront

@torch.no_grad()
def answer(model, data: Data, items, max_new: int, temperature=0.0, gens=None, prefixes=None, rho=None,
           noise=False, stop=None) -> list[str]:
    """Greedy or Gumbel-max (each row's generator) continuations of the prompts (+ prefixes) to `stop` (EOS).
    rho (BDHS): an image slot's key is hidden iff U(0,1) < rho; noise: pixels (1 - rho) x + rho U(0, 255)."""
    texts, stop, dev = [], data.eot if stop is None else stop, model.lm_head.weight.device
    for lo in range(0, len(items), 32):
        batch = []
        for i in range(lo, min(lo + 32, len(items))):
            ids, t = data.prompt(items[i])
            ids = ids + (data.enc.encode_ordinary(prefixes[i]) if prefixes and prefixes[i] else [])
            if rho is not None and noise:
                t = ((1 - rho) * t + rho * 255 * torch.rand(t.shape, generator=gens[i])).to(torch.uint8)
            drawn = torch.rand(len(ids), generator=gens[i]) < rho if rho is not None and not noise else False
            batch.append((ids, t, drawn & (torch.tensor(ids) == data.image_id)))  # hidden (T_i,)
        prompts, tiles, hidden = zip(*batch)
        B, T = len(prompts), max(map(len, prompts))
        ids = torch.tensor([[data.pad_id] * (T - len(p)) + p for p in prompts], device=dev)  # (B, T)
        positions = torch.tensor([[0] * (T - len(p)) + [*range(len(p))] for p in prompts]).to(dev)  # (B, T)
        keys = torch.stack([F.pad(~h, (T - len(h), 0), value=False) for h in hidden]).to(dev)  # (B, T)
        mask = visibility_mask(T, T, causal=True, key_mask=keys) | torch.eye(T, dtype=torch.bool, device=dev)
        cache, out, done = [[] for _ in model.model.layers], [[] for _ in prompts], torch.zeros(B).bool()
        logits = model(ids, torch.cat(tiles).to(dev), positions, mask, cache)[0][:, -1].float().cpu()  # B, V
        for step in range(max_new):
            if temperature > 0:
                uniform = torch.stack([torch.rand(logits.shape[-1], generator=g) for g in gens[lo:lo + B]])
                logits = logits / temperature - torch.log(-torch.log(uniform.clamp(1e-20, 1 - 1e-7)))
            nxt = logits.argmax(-1)  # (B,)
            out = [o if d else o + [t] for o, t, d in zip(out, nxt.tolist(), done.tolist())]  # until its stop
            done |= stop[nxt]
            if done.all():
                break
            keys = torch.cat([keys, torch.ones(B, 1, dtype=torch.bool, device=dev)], 1)  # (B, T + step + 1)
            step_ids, step_pos = nxt[:, None].to(dev), positions[:, -1:] + step + 1
            logits = model(step_ids, None, step_pos, keys[:, None, None, :], cache)[0][:, -1].float().cpu()
        texts += [data.enc.decode([t for t in o if t not in (data.eot_id, data.pad_id)]).strip() for o in out]
    return texts

def bdhs(model, data: Data, items: list, cfg, example_seeds: list, stats: dict, noise=False) -> list[str]:
    """BDHS (Algorithm 1): y- by the model with ~rho_th of its image keys masked (or pixels noised): each gold
    sentence cut at a random word and completed; redrawn while cos(y-, y+) >= sim_threshold."""
    rngs = [random.Random(int(s)) for s in example_seeds[:len(items)]]
    gens = [torch.Generator().manual_seed(int(s)) for s in example_seeds[:len(items)]]
    out, pending = [None] * len(items), list(range(len(items)))
    for attempt in range(cfg.max_tries):
        guided = attempt < cfg.max_tries - 1
        cuts = [pref.bdhs_prefixes(items[e]["answer"], rngs[e]) if guided else [("", "")] for e in pending]
        jobs = [(e, context, cut) for e, pairs in zip(pending, cuts) for context, cut in pairs]
        prefixes = [(" " + f"{context} {cut}".strip()).rstrip() for _, context, cut in jobs]
        texts = answer(model, data, [items[e] for e, _, _ in jobs], 16 if guided else cfg.max_new_tokens,
                       cfg.temperature, [gens[e] for e, _, _ in jobs], prefixes, cfg.rho_th, noise,
                       data.period if guided else None)
        made, pending = {}, []
        for (e, _, cut), text in zip(jobs, texts):
            made[e] = re.sub(r"\s+", " ", f"{made.get(e, '')} {cut} {text}").strip()
        for e, text in made.items():
            stats["similarity"].append(pref.bow_cosine(text, items[e]["answer"]))
            if stats["similarity"][-1] < cfg.sim_threshold or not guided:
                out[e] = text
                stats["tries"].append(attempt + 1)
            else:
                pending.append(e)
    stats["examples"] += [(it["answer"], text) for it, text in zip(items[:2], out[:2])]
    return out

def online_pairs(policy, data: Data, items: list, cfg, seeds, counts: dict) -> list:
    """Online pairs: the judge's best and worst of n_samples answers per prompt; ties dropped, counted."""
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds[:len(items) * cfg.n_samples]]
    samples = answer(policy, data, [it for it in items for _ in range(cfg.n_samples)], cfg.max_new_tokens,
                     cfg.temperature, gens)
    return pref.judged_pairs(items, samples, cfg.n_samples, counts)

def make_pools(ref: Reference, data: Data, cfg, seed: int, stats: dict) -> dict:
    """Per seed, from the SFT model: the offline rows' pairs; held-out pairs (POVID, judged SFT samples)."""
    pools, base, sft = {"ties": {}, "bdhs_stats": stats, "ref": ref}, seed * 1_000_003, ref.model
    pools["povid"] = pref.gold_pairs(data.train)
    if "rlhfv" in cfg.rows:
        pools["rlhfv"] = pref.rlhfv_pairs(data.train, answer(sft, data, data.train, cfg.max_new_tokens))
        pools["ties"]["rlhfv_already_correct"] = pools["rlhfv"].count(None)
    for row in [r for r in ("bdhs", "bdhs_noise") if r in cfg.rows or r + "_ext" in cfg.rows]:
        y_neg = bdhs(sft, data, data.train, cfg, range(base, base + 99_999), stats, row == "bdhs_noise")
        pools[row] = pref.gold_pairs(data.train, y_neg)
        pools[row + "_ext"] = [dict(p, ext=it["povid"]) for p, it in zip(pools[row], data.train)]
    on_policy = online_pairs(sft, data, data.test, cfg, range(base, base + 99_999), pools["ties"])  # held out
    offline = pref.gold_pairs(data.test)
    if ref.table is not None:  # --ref=upfront: every fixed response once, before any training
        for pairs in [v for v in pools.values() if isinstance(v, list)] + [offline, on_policy]:
            ref.fill(data, [p for p in pairs if p is not None])
        ref.fill(data, offline, blank=True)
    return pools | {"heldout": dict(offline=offline, on_policy=on_policy)}

def step_pairs(row, policy, data: Data, pools: dict, cfg, seed: int, step: int, counts: dict, rank, world):
    """This rank's share of a step's pairs, a function of (seed, row, step); mixed: Bernoulli(0.5) (Eq. 4)."""
    rng = np.random.default_rng([seed, ROWS.index(row), step])
    index = rng.choice(len(data.train), min(cfg.batch_size, len(data.train)), replace=False)
    seeds = rng.integers(2**31, size=(len(index), cfg.n_samples))  # (B, n_samples): one RNG per sample
    offline = rng.random(len(index)) < (0.5 if row == "mixed" else 0.0)  # (B,)
    index, seeds, offline = index[rank::world], seeds[rank::world], offline[rank::world]
    if row in pools:  # povid, rlhfv, bdhs, bdhs_ext, bdhs_noise: offline pairs, made up front
        return [pools[row][i] for i in index if pools[row][i] is not None]
    if row == "online_bdhs":
        items = [data.train[i] for i in index]  # y- made live by the policy, one RNG per example
        return pref.gold_pairs(items, bdhs(policy, data, items, cfg, seeds[:, 0], pools["bdhs_stats"]))
    judged = online_pairs(policy, data, [data.train[i] for i in index[~offline]], cfg,
                          seeds[~offline].ravel(), counts)
    return [pools["povid"][i] for i in index[offline]] + judged

def train_row(row, seed, cfg, data, arch, init_weights, pools, device, log, meta, state, rank, world):
    """One table row: a fresh policy (SFT weights or resumed), cfg.steps of DPO; torchrun: DDP by hand."""
    policy, ref = MM1(arch), pools["ref"]  # the seed's Reference (frozen SFT copy, its table if upfront)
    policy.load_state_dict(state[0] if state else init_weights)
    for module in (policy.vision_model, policy.connector):  # the LLM only is trained, as LLaVA's DPO recipes
        module.requires_grad_(False)
    opt = make_adamw(policy.to(device).train(), cfg.lr, 0.0)  # no decay: DPO pulls toward the reference
    trainable = [p for p in policy.parameters() if p.requires_grad]
    opt.load_state_dict(state[1]) if state else None
    curves, counts = {k: [] for k in ("chosen", "rejected", "ref_chosen", "ref_rejected")}, dict(pairs=0)
    steps = 0 if row == "sft" else cfg.steps
    for step in range(state[2] if state else 0, steps):
        set_lr(opt, lr := lr_at(step, steps, cfg.lr, min(cfg.warmup, steps), 0.0))
        pairs = step_pairs(row, policy, data, pools, cfg, seed, step, counts, rank, world)
        sums = torch.zeros(len(LOGGED) + 1)  # pairs, then sums over pairs of LOGGED: this rank's, then all's
        if pairs:
            loss, stats = pair_losses(policy, ref, data, pairs, cfg, device)
            (loss * len(pairs)).backward()  # a sum over pairs, divided by every rank's count below
            sums = torch.tensor([len(pairs), loss.item() * len(pairs), *(stats[k].sum() for k in LOGGED[1:])])
        dist.all_reduce(sums) if world > 1 else None  # DDP by hand: all ranks' counts, sums, gradients
        if not sums[0]:  # every online pair of every rank a tie (counted as online_ties)
            continue
        for p in trainable:
            p.grad = torch.zeros_like(p) if p.grad is None else p.grad  # a rank whose pairs all tied
            dist.all_reduce(p.grad) if world > 1 else None
            p.grad /= sums[0]  # the gradient of the mean loss over the batch's pairs
        torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        mean = dict(zip(LOGGED, (sums[1:] / sums[0]).tolist()))
        counts["pairs"] += int(sums[0])
        counts.setdefault("step0_loss", round(mean["dpo_loss"], 6)) if step == 0 else None  # without RPO
        curves = {k: v + [mean[k]] for k, v in curves.items()}
        if ((step + 1) % cfg.log_every == 0 or step + 1 == steps) and rank == 0:
            extra = {k: round(mean[k], 4) for k in ("dpo_loss", "margin", "reward_chosen", "chosen")}
            print(json.dumps(log(step + 1, mean["loss"], lr, int(sums[0]), row=row, seed=seed, **extra)))
        if (step + 1) % cfg.ckpt_every == 0 and step + 1 < steps and rank == 0:
            save_checkpoint(cfg.out_dir, policy, opt, cfg, step + 1, meta=meta(row, seed))
    if world > 1 and "online_ties" in counts:  # each rank counted the ties of its share
        dist.all_reduce(ties := torch.tensor(float(counts["online_ties"])))
        counts["online_ties"] = int(ties)
    return policy, ref, opt, curves, counts

# ----------------------------------------------------------------------------- eval
@torch.no_grad()
def evaluate(policy, ref, data: Data, cfg, device, heldout: dict) -> dict:
    """POPE (by id), CHAIR, VQA, held-out reward accuracy, image use (margin real - blank), samples."""
    def reward_margins(pairs, blank=False):  # (N,) beta h per held-out pair
        return torch.cat([pair_losses(policy, ref, data, pairs[lo:lo + 16], cfg, device, blank)[1]["margin"]
                          for lo in range(0, len(pairs), 16)]) if pairs else torch.zeros(1)
    pope = {s: answer(policy, data, items, 4) for s, items in data.pope.items()}
    m = pref.pope_splits(data.pope, pope)
    texts = answer(policy, data, data.describe, cfg.max_new_tokens)
    m |= pref.chair(texts, [it["scene"] for it in data.describe])  # an unfinished last sentence dropped
    m["vqa"] = pref.vqa_accuracy(answer(policy, data, data.vqa, 8), data.vqa)
    margins = {name: reward_margins(pairs) for name, pairs in heldout.items()}  # 0 (step 0): half
    m |= {f"reward_acc_{k}": 100 * ((v > 0) + (v == 0) / 2).mean().item() for k, v in margins.items()}
    m["image_use"] = (margins["offline"].mean() - reward_margins(heldout["offline"], True).mean()).item()
    samples = pref.samples(data.describe, texts, data.pope["adversarial"], pope["adversarial"])
    return {k: round(v, 4) for k, v in m.items()} | {"samples": samples}

# ----------------------------------------------------------------------------- main
def main(argv):
    cfg = parse_config(argv)
    check_config(cfg)
    device, rank, world = setup_device(cfg.device)  # torchrun: pools on every rank, eval and files on rank 0
    check_out_dir(cfg.out_dir)
    t0, enc = time.time(), get_tokenizer()
    if not Path(cfg.init).is_file():
        raise InputError(f"--init={cfg.init}: no such checkpoint; run `python mm1.py && python mm15.py` "
                         "first (cpu presets: about 13 + 7 min on 2 cores) or pass --init=PATH")
    weights, init_meta = read_safetensors(cfg.init)
    if not {"arch", "tokenizer_sha256", "sft"} <= set(init_meta):
        raise InputError(f"--init={cfg.init}: no `arch`, `tokenizer_sha256` or `sft` metadata (not mm15's)")
    arch = json.loads(init_meta["arch"])
    if arch["connector"]["type"] == "attnpool" or arch["text"]["moe_every"]:
        raise InputError(f"--init={cfg.init}: arch.connector.type={arch['connector']['type']!r}, arch.text."
                         f"moe_every={arch['text']['moe_every']}: held here: avgpool, cabstractor, no MoE")
    data = Data(cfg, enc, json.loads(init_meta["sft"])["tiling"])  # tiled as the checkpoint's SFT tiled them
    if (init_meta["tokenizer_sha256"], arch["image_token_id"]) != (tokenizer_sha256(), data.image_id):
        raise InputError(f"--init={cfg.init}: made with another tokenizer (sha256 or <image> id differs)")
    resumed = load_checkpoint(cfg.out_dir, cfg, RESUME_MAY_DIFFER) if cfg.resume else None  # reads only
    saved = json.loads(resumed[3]["dpo"]) if resumed else dict(row=None, seed=None, done={})
    results = saved["done"]  # finished rows are kept, the unfinished one continues at its step
    keep = {k: init_meta[k] for k in ("arch", "tokenizer_sha256", "image_token_id", "image_size", "sft")}
    meta = lambda row, seed: keep | {"dpo": dict(row=row, seed=seed, done=results)}  # noqa: E731
    write_outputs(cfg.out_dir, {"config.json": cfg}) if rank == 0 else None  # every input checked: only now
    pref.export_povid(cfg.export, data.train) if cfg.export and rank == 0 else None
    print(f"config: {json.dumps(asdict(cfg))}\ndata: {time.time() - t0:.1f} s")
    log, ties, curves, ref_checks = RunLog(cfg.out_dir, "items", 0.0, device, rank, world), {}, {}, {}
    bdhs_stats = dict(similarity=[], tries=[], examples=[])  # BDHS's filter over every row and seed
    for seed in cfg.seeds:
        seed_everything(seed)
        reference = Reference(arch, weights, device, cfg.ref == "upfront")  # frozen SFT copy, per seed
        pools = make_pools(reference, data, cfg, seed, bdhs_stats)
        ties |= {f"{k}/{seed}": v for k, v in pools["ties"].items()}
        for row in (r for r in cfg.rows if f"{r}/{seed}" not in results):
            t1, state = time.time(), resumed[:3] if (saved["row"], saved["seed"]) == (row, seed) else None
            policy, ref, opt, curves[row], counts = train_row(row, seed, cfg, data, arch, weights, pools,
                                                              device, log, meta, state, rank, world)
            if rank == 0:  # the other ranks go on to the next row and wait for rank 0 at its first step
                save_checkpoint(cfg.out_dir, policy, opt, cfg, cfg.steps * (row != "sft"), meta(row, seed))
                m = evaluate(policy, ref, data, cfg, device, pools["heldout"]) | counts
                results[f"{row}/{seed}"] = m | {"time_s": round(time.time() - t1, 1)}
        ref_checks[seed] = pools["ref"].checked  # upfront: max |table - live| on the batch checked
    if rank:
        return None
    for row in [r for r in cfg.rows if curves.get(r, {}).get("chosen")][-1:]:  # the last trained row
        pref.curves_png(Path(cfg.out_dir) / "logps.png", curves[row], f"{row}: per-token log-probs")
    metrics = dict(results=results, bdhs=bdhs_stats, ties=ties, truncated=data.truncated, wall_time_s=round(
        time.time() - t0, 1), ref_upfront_max_diff=ref_checks)
    print(report := pref.report_md(cfg, metrics))
    write_outputs(cfg.out_dir, {"metrics.json": metrics, "report.md": report})
    return metrics

if __name__ == "__main__":
    run_main(main)
