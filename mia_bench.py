"""MIA-Bench in miniature (Qian et al., "MIA-Bench: Towards Better Instruction Following Evaluation of
Multimodal LLMs", arXiv:2407.01509): layered instructions, the official judge protocol, instruction SFT.
From an mm15.py checkpoint (model rebuilt from its `arch`, tiled and prompted as its `sft` block says), the
model answers ShapesWorld MIA items (data/shapes/mia.py: the official fields, eight component types checked
exactly against the scene graph); a rule judge (IFEval strict / loose) writes the official score sentence,
which the official protocol's parser (data/mia.py) scores like any judge's reply. Then instruction SFT on
items whose component combinations are held out from the benchmark's, the benchmark again, VQA / POPE.

    python mm1.py && python mm15.py && python mia_bench.py   # cpu preset: base vs +SFT table
    python mia_bench.py --preset=smoke --init=PATH            # tiny (what the tests run)
    python mia_bench.py --official=path/to/instruction_benchmark_all.json --answers=answers.jsonl \\
        [--judge=replies:judge_replies.jsonl]                 # the official file: statistics, prompts, scores

Tables (report.md, metrics.json): statistics (official vs ours); per type, constant answer / base / +SFT
(strict rule judge, x100), length_limit last beside the answers that stop (EOS); judge failures, agreement;
VQA / POPE retention beside a blank image. Checkpoint: mm15's + `mia`. No network judge (prompts go out as
JSONL with the image; replies come back through --judge=replies:FILE). Not implemented yet: torchrun.
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
from tqdm import tqdm

from data import InputError, mia, shapes
from data.metrics import parse_yes_no, words
from data.shapes import mia as world_mia
from data.shapes.mm15_tasks import native_size, render_shaped
from data.shapes.world import rng_for
from data.tile_selectors import grids
from data.tokenizer import get_tokenizer
from data.vl_tasks import generate, tokenizer_sha256
from kernels import attention, moe_ffn


# ----------------------------------------------------------------------------- config
@dataclass
class Config:
    preset: str = "auto"            # smoke | cpu | gpu (auto: gpu with CUDA, else cpu)
    out_dir: str = "out/mia_bench"  # output folder
    seed: int = 0                   # SFT items, data order
    device: str = "auto"            # auto | cpu | cuda | mps
    resume: bool = False            # continue from out_dir/model.safetensors + model.optimizer.safetensors
    init: str = "out/mm15/model.safetensors"  # the mm15.py checkpoint to start from
    # the benchmark and its judge
    official: str = ""              # official instruction_benchmark_all.json: statistics + prompts, no model
    answers: str = ""               # with --official: answers JSONL (question_id = the image URL, text)
    judge: str = "rule"             # rule | replies:FILE (a judge's replies, JSONL {prompt_sha256, reply})
    n_bench: int = 100              # ShapesWorld benchmark items (test scenes)
    max_new_tokens: int = 48        # answer length limit at generation (gold answers: <= 41 tokens)
    n_retention: int = 100          # held-out VQA and POPE questions (retention)
    # instruction SFT (the paper: ~5k items on LLaVA-NeXT)
    n_sft: int = 1000               # SFT items (train scenes; combinations disjoint from the benchmark's)
    replay: float = 0.25            # share of each batch that is plain VQA in mm15's format (retention)
    sft_steps: int = 400            # SFT steps (0: score the checkpoint only)
    sft_lr: float = 3e-4            # peak lr (warmup, cosine to min_lr_frac x peak)
    batch_size: int = 8             # samples per step, one per row
    seq_len: int = 400              # longest training sample (tokens): a longer one is an error, never cut
    warmup: int = 10                # linear warmup steps
    min_lr_frac: float = 0.0        # final lr / peak lr
    vit_lr_mult: float = 0.1        # lr multiplier of the ViT
    weight_decay: float = 0.1       # AdamW decay
    grad_clip: float = 1.0          # max global grad norm
    log_every: int = 10             # steps between log lines
    ckpt_every: int = 100           # steps between checkpoints (and at the end)

PRESETS = {
    "smoke": dict(n_bench=4, max_new_tokens=8, n_retention=4, n_sft=8, sft_steps=4, batch_size=2, warmup=2,
                  log_every=2, ckpt_every=3),
    "cpu": dict(),
    "gpu": dict(n_bench=400, max_new_tokens=96, n_retention=500, n_sft=5000, sft_steps=2000, batch_size=32,
                seq_len=1024, sft_lr=1e-4, warmup=100, log_every=20, ckpt_every=500),
}
RESUME_MAY_DIFFER = ("resume", "device", "out_dir", "log_every", "ckpt_every", "n_bench", "max_new_tokens",
                     "n_retention", "judge")
CONSTANT = "A red circle sits in the center."  # the constant-answer baseline
PROMPT_FORMAT = "Question: {q} <image slots> Answer: {a}<|endoftext|>"  # mm15's SFT format, read from --init

def check_config(cfg: Config) -> None:
    """Script-specific checks of the values (the skeleton checks keys and types)."""
    if cfg.judge != "rule" and not cfg.judge.startswith("replies:"):
        raise InputError(f"--judge={cfg.judge}: expected rule or replies:FILE")
    if min(cfg.n_bench, cfg.n_sft, cfg.n_retention, cfg.batch_size, cfg.seq_len, cfg.max_new_tokens) < 1:
        raise InputError("expected n_bench, n_sft, n_retention, batch_size, seq_len, max_new_tokens > 0")
    if not 0 <= cfg.replay < 1:
        raise InputError(f"--replay={cfg.replay}: expected a share in [0, 1)")
    if cfg.answers and not cfg.official:
        raise InputError("--answers: only with --official=FILE (our own items are answered by the model)")

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
# Tiling, copied from mm15.py (tests/test_skeleton.py compares the copies): one plan for pixels and slots.

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

# ----------------------------------------------------------------------------- data: items
# data/shapes/mia.py: the items, their checks and gold responses; images at mm15's sizes for natural scenes.

def render_item(key: str, scene, tile: int) -> Image.Image:
    """A natural scene at its own size (square, long side 0.75-2.5 tiles, as mm15 trains), set by its key."""
    return render_shaped(scene, *native_size("natural", rng_for("mia-size", key), tile))

class Data:
    """Benchmark items (test scenes, seed 0: one benchmark for every run), SFT items (train scenes, the
    other combinations, gold responses), plain VQA for replay, and VQA / POPE (val scenes) for retention."""

    def __init__(self, cfg: Config, enc, tiling):
        self.enc, self.tiling, tile = enc, tiling, tiling.tile_size
        self.image_id = enc.encode_single_token("<image>")
        self.eot_id, self.pad_id = (enc.encode_single_token(t) for t in ("<|endoftext|>", "<|pad|>"))
        self.bench, self.sft = [], []
        for split, n, seed, side, pool in (("test", cfg.n_bench, 0, "bench", self.bench),
                                           ("train", cfg.n_sft, cfg.seed, "sft", self.sft)):
            for i in range(n):
                item = world_mia.mia_item(split, i, seed, side)
                scene = world_mia.item_scene(item)
                pool.append(dict(item=item, scene=scene, question=item["instruction"],
                                 answer=world_mia.gold_response(item, scene),
                                 pil=render_item(item["id"], scene, tile)))
        self.replay = [self.vqa_item("train", i, cfg.seed, tile) for i in range(cfg.n_sft)]
        self.vqa = [self.vqa_item("val", i, 0, tile) for i in range(cfg.n_retention)]
        self.pope = [self.vqa_item("val", i, 0, tile, "adversarial") for i in range(cfg.n_retention)]
        longest = max(len(self.sample(item)[0]) for item in self.sft + self.replay)
        if longest > cfg.seq_len:  # a sample is never cut (that would cut image slots)
            raise InputError(f"--seq_len={cfg.seq_len}: the longest SFT sample has {longest} tokens")

    def vqa_item(self, split: str, i: int, seed: int, tile: int, pope: str = "") -> dict:
        scene = shapes.make_scene(split, i, seed)
        question, answer = (shapes.pope(scene, pope, seed) if pope else shapes.vqa(scene, seed))[0]
        return dict(question=question, answer=answer, pil=render_item(f"{split}/{i}/{seed}", scene, tile))

    def sample(self, item: dict, with_answer=True, blank=False):
        """(ids, n_prompt, tiles (N, 3, r, r)): "Question: q <image slots> Answer: a<eot>" (mm15's format)."""
        encode, pil = self.enc.encode_ordinary, item["pil"]
        plan = plan_tiles(*pil.size, self.tiling)
        ids = encode("Question: " + item["question"]) + slot_ids(plan, self.tiling, self.image_id, encode)
        ids += encode(" Answer:")
        n_prompt = len(ids)
        ids += encode(" " + item["answer"]) + [self.eot_id] if with_answer else []
        image = Image.new("RGB", pil.size, (128, 128, 128)) if blank else pil
        return ids, n_prompt, tile_pixels(image, plan)

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

def loss_of(model, rows, pad_id: int, device: str):
    """Mean next-token cross-entropy over the answers of a batch of samples (ids, n_prompt, tiles): the
    prompt, image slots and padding are never targets; the answer's end-of-text is (learning to stop)."""
    T = max(len(ids) for ids, _, _ in rows) - 1
    x = torch.full((len(rows), T), pad_id)  # (B, T) right-padded: causal attention never sees the padding
    y = torch.full((len(rows), T), -100)  # (B, T)
    for b, (ids, n_prompt, _) in enumerate(rows):
        x[b, :len(ids) - 1] = torch.tensor(ids[:-1])
        y[b, n_prompt - 1:len(ids) - 1] = torch.tensor(ids[n_prompt:])
    logits, aux = model(x.to(device), torch.cat([t for _, _, t in rows]).to(device))
    loss = F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten())
    return loss + (0.01 * aux["balance_loss"] + 0.001 * aux["z_loss"] if aux else 0.0)  # MM1's MoE recipe

# ----------------------------------------------------------------------------- train

def train(cfg: Config, data: Data, model, opt, device: str, log, start: int, meta: dict) -> dict:
    """Instruction SFT: each row an SFT item (gold response), or with probability `replay` a plain VQA item;
    a step's samples are a pure function of (seed, step)."""
    t0, seen = time.time(), 0
    model.train()
    for step in tqdm(range(start, cfg.sft_steps), desc="sft", disable=None):
        peak = cfg.sft_lr
        lr = lr_at(step, cfg.sft_steps, peak, min(cfg.warmup, cfg.sft_steps), cfg.min_lr_frac * peak)
        set_lr(opt, lr)
        rng, rows = np.random.default_rng([cfg.seed, step]), []
        while len(rows) < cfg.batch_size:
            pool = data.replay if rng.random() < cfg.replay else data.sft
            rows.append(data.sample(pool[rng.integers(len(pool))]))
        loss = loss_of(model, rows, data.pad_id, device)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        seen += len(rows)
        last = step + 1 == cfg.sft_steps
        if (step + 1) % cfg.log_every == 0 or last:
            print(json.dumps(log(step + 1, loss.item(), lr, seen)))
            seen = 0
        if (step + 1) % cfg.ckpt_every == 0 or last:
            save_checkpoint(cfg.out_dir, model, opt, cfg, step + 1, meta=meta)
    return dict(train_time_s=round(time.time() - t0, 1))

# ----------------------------------------------------------------------------- eval

@torch.no_grad()
def answers(model, data: Data, items: list, max_new_tokens: int, device: str, blank=False):
    """Greedy answers, 16 at a time (data.vl_tasks.generate), and whether each stopped (EOS) in time."""
    model.eval()
    texts, stopped = [], []
    for lo in range(0, len(items), 16):
        built = [data.sample(item, with_answer=False, blank=blank) for item in items[lo:lo + 16]]
        new = generate(model, [ids for ids, _, _ in built], torch.cat([t for _, _, t in built]).to(device),
                       max_new_tokens, data.eot_id, data.pad_id)
        texts += [data.enc.decode(ids).strip() for ids in new]
        stopped += [len(ids) < max_new_tokens for ids in new]
    model.train()
    return texts, stopped

def judge_bench(data: Data, texts: list, judge: str) -> dict:
    """The rule judge's replies (strict and loose) scored by the official protocol's parser (data/mia.py)
    like any judge's; a replies file's judge too (looked up by prompt hash); agreement of strict and loose
    per component, and of the rule judge (strict) and the replies file per item (scores within 0.05)."""
    items = [b["item"] for b in data.bench]
    given, out, passed = {it["id"]: t for it, t in zip(items, texts)}, {}, {}
    for mode in ("strict", "loose"):
        replies, passed[mode] = {}, []
        for b, text in zip(data.bench, texts):
            points, replies[b["item"]["id"]] = world_mia.judge(b["item"], b["scene"], text, mode == "loose")
            passed[mode] += [p > 0 for p in points]
        out[mode] = mia.score_replies(items, given, replies) | {"replies": replies}
    out["agree_strict_loose"] = round(100 * np.mean(np.equal(passed["strict"], passed["loose"])), 1)
    if judge != "rule":
        cache = mia.read_replies(judge.removeprefix("replies:"))
        rows = mia.prompt_rows(items, given)
        found = {r["id"]: cache[r["prompt_sha256"]] for r in rows if r["prompt_sha256"] in cache}
        out["replies_file"] = mia.score_replies(items, given, found)
        pairs = [[mia.parse_reply(reply, it["component_weight"]).get("score") for reply in
                  (out["strict"]["replies"][it["id"]], found.get(it["id"], ""))] for it in items]
        both = [abs(a - b) < 0.05 for a, b in pairs if a is not None and b is not None]
        out["agree_rule_replies"] = round(100 * np.mean(both), 1) if both else None
    return out

def evaluate(model, data: Data, cfg: Config, device: str, blank: bool) -> dict:
    """The benchmark (answers, judges, EOS in time, words) and retention: VQA exact match and POPE
    accuracy (an unparsed answer is wrong), also with blank (grey) images of the same sizes when `blank`."""
    texts, stopped = answers(model, data, data.bench, cfg.max_new_tokens, device)
    m = dict(texts=texts, judged=judge_bench(data, texts, cfg.judge))
    m["stopped"] = round(100 * float(np.mean(stopped)), 1)
    m["pope_always_no"] = round(100 * float(np.mean([it["answer"] == "no" for it in data.pope])), 1)
    m["mean_words"] = round(float(np.mean([len(words(t)) for t in texts])), 1)
    for task, items in (("vqa", data.vqa), ("pope", data.pope)):
        for run in ("model", "blank") if blank else ("model",):
            said, _ = answers(model, data, items, 6, device, blank=run == "blank")
            norm = parse_yes_no if task == "pope" else words
            m[f"{task}_{run}"] = round(100 * np.mean([norm(t) == norm(it["answer"])
                                                      for t, it in zip(said, items)]), 1)
    return m

def results_table(constant: dict, base: dict, tuned: dict | None) -> str:
    """Per type (strict rule judge, mean over component instances, x100): a constant answer (what vacuous
    compliance earns), base, +SFT; then EOS, length, judges, retention."""
    runs = [constant, base] + ([tuned] if tuned else [])
    cell = lambda v: "n/a" if v is None else f"{v:.1f}"
    row = lambda name, get: f"| {name} | " + " | ".join(cell(get(r)) for r in runs) + " |"
    strict = lambda r: r["judged"]["strict"]
    lines = [f"| | constant {CONSTANT!r} | base |" + (" +SFT |" if tuned else ""),
             "|---" * (len(runs) + 1) + "|",
             row("**score (strict rule judge)**", lambda r: strict(r)["strict"]),
             row("score (loose rule judge)", lambda r: r["judged"]["loose"]["strict"])]
    lines += [row(f"{t} (n={strict(base)['per_type_n'].get(t, 0)})",
                  lambda r, t=t: strict(r)["per_type"].get(t))
              for t in [t for t in mia.TYPES if t != "length_limit"] + ["length_limit"]]
    lines += [row("answers ending with EOS (%)", lambda r: r.get("stopped")),
              row("mean words per answer", lambda r: r.get("mean_words")),
              row("rule judge failures", lambda r: strict(r)["failed"]),
              row("strict vs loose agreement (% comp.)", lambda r: r["judged"]["agree_strict_loose"]),
              row("POPE's blind baseline: always 'no'", lambda r: r.get("pope_always_no"))]
    if "replies_file" in base["judged"]:
        replies = lambda r: r["judged"]["replies_file"]
        lines += [row("replies file: strict score", lambda r: replies(r)["strict"]),
                  row("replies file: failures", lambda r: replies(r)["failed"]),
                  row("rule vs replies agreement (% items)", lambda r: r["judged"]["agree_rule_replies"])]
    return "\n".join(lines + [row(f"{t} retention (blank image {cell(base[f'{t}_blank'])})",
                                  lambda r, t=t: r.get(f"{t}_model")) for t in ("vqa", "pope")])

# ----------------------------------------------------------------------------- main

def load_init(cfg: Config, enc):
    """The mm15.py checkpoint: weights, metadata, arch, and the tiling its SFT used (checked)."""
    if not Path(cfg.init).is_file():
        raise InputError(f"--init={cfg.init}: no such checkpoint; run `python mm1.py && python mm15.py` "
                         "first (cpu presets: about 20 min on 2 cores) or pass --init=PATH")
    weights, meta = read_safetensors(cfg.init)
    for key in ("arch", "tokenizer_sha256", "sft"):
        if key not in meta:
            raise InputError(f"--init={cfg.init}: no `{key}` metadata (expected a checkpoint of mm15.py)")
    arch, sft = json.loads(meta["arch"]), json.loads(meta["sft"])
    if (meta["tokenizer_sha256"], arch["image_token_id"]) != (tokenizer_sha256(), enc.encode_single_token(
            "<image>")):
        raise InputError(f"--init={cfg.init}: made with another tokenizer (sha256 or <image> id differs)")
    if sft.get("prompt") != PROMPT_FORMAT:
        raise InputError(f"--init={cfg.init}: sft.prompt {sft.get('prompt')!r}, expected {PROMPT_FORMAT!r}")
    lacks = {"tile_size", "image_tokens", "split", "n_min", "n_max", "overview", "indicators"} - set(sft.get(
        "tiling", {}))
    if lacks:
        raise InputError(f"--init={cfg.init}: sft.tiling lacks {sorted(lacks)}")
    return weights, meta, arch, SimpleNamespace(**sft["tiling"])

def official_mode(cfg: Config) -> dict:
    """The official file: its statistics beside ours, the judge prompts for an answers file (with each
    image URL: the official judge sees the image), and the scores of a judge's replies when given."""
    items = mia.load_items(cfg.official)
    given = mia.read_answers(cfg.answers, items) if cfg.answers else {}
    cache = mia.read_replies(cfg.judge.removeprefix("replies:")) if cfg.judge != "rule" else None
    write_outputs(cfg.out_dir, {"config.json": cfg})
    ours = mia.stats([world_mia.mia_item("test", i, 0, "bench") for i in range(len(items))])
    rows = mia.prompt_rows(items, given)
    m = dict(official=mia.stats(items), ours=ours, judge_prompts=len(rows))
    if cache is not None:
        m["scores"] = mia.score_replies(items, given, {r["id"]: cache[r["prompt_sha256"]] for r in rows
                                                       if r["prompt_sha256"] in cache})
    report = (f"# MIA-Bench: the official file\n\n{mia.stats_table(ours, m['official'])}\n\n{len(rows)} "
              "judge prompts in judge_prompts.jsonl; each must go to the judge WITH its image (the URL in "
              "`image`: the images are remote, not in this repository).\n"
              + (f"\nscores of the replies: {json.dumps(m['scores'])}\n" if cache is not None else ""))
    print(report)
    write_outputs(cfg.out_dir, {"metrics.json": m, "report.md": report,
                                "judge_prompts.jsonl": mia.jsonl(rows)})
    return m

def main(argv):
    cfg = parse_config(argv)
    check_config(cfg)
    device, rank, world = setup_device(cfg.device)
    if world > 1:
        raise InputError("torchrun: mia_bench.py runs in one process (not implemented yet)")
    check_out_dir(cfg.out_dir)
    if cfg.official:
        return official_mode(cfg)
    t0, enc = time.time(), get_tokenizer()
    weights, meta, arch, tiling = load_init(cfg, enc)
    if cfg.judge != "rule":
        mia.read_replies(cfg.judge.removeprefix("replies:"))  # checked before anything is written
    seed_everything(cfg.seed)
    data, model, start = Data(cfg, enc, tiling), MM1(arch), 0
    model.load_state_dict(weights)
    model.to(device)
    opt = make_adamw(model, cfg.sft_lr, cfg.weight_decay, lr_mult={"vision_model.": cfg.vit_lr_mult})
    resumed = load_checkpoint(cfg.out_dir, cfg, RESUME_MAY_DIFFER) if cfg.resume else None  # reads only
    keep = ("arch", "tokenizer_sha256", "image_token_id", "image_size", "sft")
    meta = {k: meta[k] for k in keep} | {"mia": dict(
        init=cfg.init, n_sft=cfg.n_sft, replay=cfg.replay, seed=cfg.seed, prompt=PROMPT_FORMAT,
        held_out="component combinations: data.shapes.mia.combo_side (bench vs sft)")}
    write_outputs(cfg.out_dir, {"config.json": cfg})  # every input is read and checked: only now
    data_time = round(time.time() - t0, 1)
    ours = mia.stats([b["item"] for b in data.bench])
    print(f"config: {json.dumps(asdict(cfg))}\ndata: {data_time} s\n{mia.stats_table(ours, None)}")
    t1 = time.time()
    constant = dict(judged=judge_bench(data, [CONSTANT] * len(data.bench), cfg.judge))
    base = evaluate(model, data, cfg, device, blank=True)
    summary, tuned = {}, None
    if cfg.sft_steps:
        if resumed:
            model.load_state_dict(resumed[0])
            opt.load_state_dict(resumed[1])
            start = resumed[2]
        summary = train(cfg, data, model, opt, device, RunLog(cfg.out_dir, "items", 0.0, device), start, meta)
        tuned = evaluate(model, data, cfg, device, blank=False)
    (Path(cfg.out_dir) / "images").mkdir(exist_ok=True)
    for b in data.bench:  # the judge prompts name these files
        b["pil"].save(Path(cfg.out_dir) / b["item"]["image"])
    items, files = [b["item"] for b in data.bench], {}
    m = {"data_time_s": data_time, "eval_and_train_time_s": round(time.time() - t1, 1), **summary}
    for name, run in (("constant", constant), ("base", base), ("sft", tuned)):
        if run is None:
            continue
        m[name], given = run, {it["id"]: t for it, t in zip(items, run.pop("texts", [CONSTANT] * len(items)))}
        files[f"answers_{name}.jsonl"] = mia.jsonl([dict(question_id=k, text=given[k]) for k in given])
        files[f"judge_prompts_{name}.jsonl"] = mia.jsonl(mia.prompt_rows(items, given))
        m[f"{name}_samples"] = [f"{it['instruction']!r} -> {given[it['id']]!r}" for it in items[:3]]
        for mode in ("strict", "loose"):
            run["judged"][mode].pop("replies")
    table = results_table(constant, base, tuned)
    report = (f"# MIA-Bench miniature ({cfg.preset} preset, seed {cfg.seed})\n\n## Benchmark statistics\n"
              f"{mia.stats_table(ours, None)}\n\n## Results (x100)\n{table}\n\n"
              + "".join(f"- {s}\n" for name in ("base", "sft") for s in m.get(f"{name}_samples", [])))
    print(report)
    write_outputs(cfg.out_dir, {"metrics.json": m, "report.md": report, **files})
    return m

if __name__ == "__main__":
    run_main(main)
