"""Model stability ("jitter") under random seeds and continuous data updates, in miniature.

Paper: "Model Stability with Continuous Data Updates", Liu, Patwardhan, Grasch, Agarwal (Apple), arXiv
2201.05692. A retrained model that answers the same utterance differently is noticed by users. Jitter
(churn) of models i, j on a fixed test set X is J_ij = |{x : pred_i(x) != pred_j(x)}| / |X|; the jitter of
N models is the mean J_ij over their N(N-1)/2 pairs (0 = perfectly stable). Per task and per row
(architecture / input representation / strategy) we measure accuracy (tagging: conlleval span F1) of the
final model over N seeds; seed jitter among the N final models (they differ only by init + data order);
update jitter between the models of nested snapshots D_t c D_t+1, with the same seed (data effect) and a
new one (data + seed); built-in snapshots add new entities, then a new intent and slot type (--updates).
Tasks: 4 classification (voice domain, voice intent under heavy ASR noise, catalogue entity type from a
name, continent of a real city from its name) and 2 slot-tagging tasks (voice queries, light / heavy ASR
noise) from data/voice_tasks.py, or any JointBERT folder (--data=DIR: intent + slots). Architectures: bag
of embeddings, CNN, Transformer (non-RNN) vs BiLSTM, GRU; taggers BiLSTM, Transformer, GRU seq2seq with
attention. Inputs: random-init words, fastText-style subword vectors (skip-gram with character n-grams
trained here, or --vec=FILE), characters (char CNN per word). Strategies: retrain per snapshot,
incremental (fine-tune the previous snapshot's model), ensemble (mean softmax of M retrained models).

Commands:
  OMP_NUM_THREADS=1 python jitter.py                 # cpu preset (default without CUDA): the built-in table
  python jitter.py --preset=smoke                    # tiny end-to-end check (tests)
  python jitter.py --data=DIR                        # a JointBERT folder (SNIPS, ATIS): intent + slots
  torchrun --standalone --nproc_per_node=2 jitter.py  # ranks share out the (task, arch, seed) job groups

Prints per task a table (every figure with its 95% bootstrap interval over test examples and seeds):
| model | acc or slot F1 | seed jitter | update jitter, same seed | update jitter, new seed | (old / new
examples) | (tagging: token rates) |, then findings (a difference is real only when intervals separate).
Writes out_dir/config.json, log.jsonl, metrics.json, report.md, progress.json (--resume=True skips its
finished jobs; an interrupted job reruns, same seeds, same predictions) and each row's seed-0 last-snapshot
model as models/<task>__<arch>__<input>__<strategy>.safetensors (save_checkpoint, no optimizer state).
"""

from __future__ import annotations

import ast
import copy
import csv
import dataclasses
import inspect
import itertools
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

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from data import InputError, voice
from data.metrics import bio_spans, span_f1
from data.subword import read_vec, train_subword_vectors
from data.voice_tasks import TASKS, Task, load_tasks

# ----------------------------------------------------------------------------- config

ARCHS_CLS, ARCHS_TAG = ("bag", "cnn", "transformer", "bilstm", "gru"), ("bilstm", "transformer", "seq2seq")
INPUTS, STRATEGIES = ("random", "fasttext", "char"), ("retrain", "incremental", "ensemble")


@dataclass
class Config:
    preset: str = "auto"  # smoke | cpu | gpu (auto: gpu with CUDA, else cpu)
    data: str = ""  # JointBERT root (train/, test/): tasks intent + slots; empty = built-in voice tasks
    tasks: tuple = ("domain", "intent", "entity_type", "city_continent", "slots", "slots_asr")  # built-in
    archs_cls: tuple = ("bag", "cnn", "transformer", "bilstm", "gru")  # classification architectures
    archs_tag: tuple = ("bilstm", "transformer", "seq2seq")  # tagging architectures
    base_input: str = ""  # input of the base and strategy rows ("": random; char for name tasks)
    inputs: tuple = ("random", "fasttext", "char")  # inputs crossed with input_archs (retrained)
    input_archs: tuple = ("bag", "cnn", "transformer", "bilstm", "gru", "seq2seq")  # archs with input rows
    strategies: tuple = ("incremental", "ensemble")  # extra strategies (besides retrain) for strategy_archs
    strategy_archs: tuple = ("bag", "cnn", "transformer", "bilstm", "gru", "seq2seq")  # archs with them
    detail_tasks: tuple = ()  # tasks with the input and strategy rows (empty = all); others: base rows
    n_seeds: int = 5  # N models per row (seed jitter over N(N-1)/2 pairs)
    n_snapshots: int = 3  # nested training snapshots D_1 c ... c D_S (update jitter over S-1 steps)
    first_snapshot: float = 0.8  # |D_1| / |D_S|; the others grow linearly to the full training set
    ensemble_size: int = 3  # M members averaged by the ensemble strategy
    n_train: int = 800  # built-in tasks: training utterances of the full snapshot (--data: all are used)
    n_test: int = 500  # built-in tasks: test utterances (the fixed set the jitter is measured on)
    noise: float = 0.1  # ASR noise rate of the domain / slots tasks
    noise_asr: float = 0.3  # ASR noise rate of the intent / slots_asr tasks
    d_model: int = 32  # embedding and hidden width
    n_layers: int = 1  # layers of the Transformer / RNN encoders
    n_heads: int = 2  # Transformer heads
    char_dim: int = 16  # character embedding width (char input)
    max_len: int = 40  # tokens kept per utterance
    max_chars: int = 16  # characters kept per word (char input)
    epochs: int = 10  # epochs per training from scratch
    incremental_epochs: int = 2  # epochs of fine-tuning on the next snapshot (incremental strategy)
    incremental_lr: float = 2e-3  # its peak lr: cosine from here, no warmup, AdamW state carried over
    unk_dropout: float = 0.5  # random-init input: singletons -> the unknown word with this probability
    updates: str = "shift"  # built-in voice tasks: shift (new entities, then a new intent + slot) | iid
    bootstrap: int = 1000  # resamples (of test examples and seeds) for the 95% intervals
    batch_size: int = 64  # utterances per step
    lr: float = 1e-2  # peak AdamW learning rate
    weight_decay: float = 0.01  # on >= 2-D parameters only
    warmup_frac: float = 0.1  # share of steps with linear warmup before cosine decay
    grad_clip: float = 1.0  # max gradient norm
    dropout: float = 0.1  # dropout on embeddings and before the heads
    vec: str = ""  # a fastText .vec file to use instead of the in-file skip-gram pre-training
    ft_sentences: int = 5000  # unlabelled utterances for skip-gram pre-training (built-in)
    ft_epochs: int = 2  # skip-gram epochs
    ft_window: int = 3  # skip-gram context window
    ft_negatives: int = 5  # negative samples per pair
    ft_buckets: int = 20000  # hash buckets of the character n-grams (3..5 as in fastText)
    seed: int = 0  # base seed: data generation and model seeds seed*1000 + k
    device: str = "auto"  # auto | cpu | cuda | mps
    out_dir: str = "out/jitter"  # run folder
    resume: bool = False  # skip the jobs finished in out_dir/progress.json (same config required)


PRESETS = {
    "smoke": dict(tasks=("intent", "slots"), archs_cls=("bag", "gru"), archs_tag=("bilstm", "seq2seq"),
                  input_archs=("gru", "bilstm"), strategy_archs=("bag", "bilstm"), n_seeds=2, n_snapshots=2,
                  ensemble_size=2, n_train=240, n_test=40, d_model=24, epochs=12, batch_size=32, lr=0.03,
                  incremental_epochs=2, ft_sentences=300, ft_epochs=1, ft_buckets=2000, bootstrap=200),
    "cpu": dict(input_archs=("cnn", "gru", "transformer"), strategy_archs=("gru", "transformer"),
                detail_tasks=("intent", "slots"), n_train=600, n_test=400),
    "gpu": dict(n_train=20000, n_test=2000, d_model=128, n_layers=2, n_heads=4, n_seeds=10, n_snapshots=5,
                first_snapshot=0.6, epochs=8, incremental_epochs=3, batch_size=64, ft_sentences=100000,
                ft_epochs=5, ft_buckets=200000),
}


def check_config(cfg: Config) -> None:
    """Script-specific checks, before any work."""
    if cfg.n_seeds < 2 or cfg.n_snapshots < 1 or not 0 < cfg.first_snapshot <= 1:
        raise InputError(f"--n_seeds={cfg.n_seeds} --n_snapshots={cfg.n_snapshots} --first_snapshot="
                         f"{cfg.first_snapshot}: expected n_seeds >= 2, n_snapshots >= 1 and "
                         "0 < first_snapshot <= 1")
    for key, allowed in (("tasks", TASKS), ("archs_cls", ARCHS_CLS), ("archs_tag", ARCHS_TAG),
                         ("inputs", INPUTS), ("strategies", STRATEGIES)):
        unknown = [x for x in getattr(cfg, key) if x not in allowed]
        if unknown:
            raise InputError(f"--{key}: unknown {', '.join(unknown)} (expected some of {', '.join(allowed)})")
    if cfg.updates not in ("shift", "iid") or cfg.bootstrap < 10:
        raise InputError(f"--updates={cfg.updates} --bootstrap={cfg.bootstrap}: expected shift or iid, >= 10")
    if cfg.base_input not in ("", *INPUTS):
        raise InputError(f"--base_input={cfg.base_input}: expected one of {', '.join(INPUTS)} or empty")
    if cfg.data and not Path(cfg.data).is_dir():
        raise InputError(f"--data={cfg.data}: not a folder (expected train/ and test/ JointBERT folders)")
    if cfg.vec and not Path(cfg.vec).is_file():
        raise InputError(f"--vec={cfg.vec}: no such file (expected a fastText .vec text file)")


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


class Encoded:
    """A split as tensors: words (N, T), chars (N, T, L), lengths (N,), labels (N,) or (N, T) with -100 on
    padding and on labels never seen in training (ignored by the loss; scoring reads the gold strings)."""

    def __init__(self, rows, vocab, chars, label_index, kind, cfg):
        n, t, lc = len(rows), max(min(len(r[0]), cfg.max_len) for r in rows), cfg.max_chars
        self.words = torch.zeros(n, t, dtype=torch.long)
        self.chars = torch.zeros(n, t, lc, dtype=torch.long)
        self.lengths = torch.zeros(n, dtype=torch.long)
        self.labels = torch.full((n, t) if kind == "tag" else (n,), -100, dtype=torch.long)
        for i, (tokens, label) in enumerate(rows):
            tokens = tokens[: cfg.max_len]
            self.lengths[i] = len(tokens)
            self.words[i, : len(tokens)] = torch.tensor([vocab.get(w, 1) for w in tokens])
            for j, w in enumerate(tokens):
                cs = [chars.get(c, 1) for c in w[:lc]]
                self.chars[i, j, : len(cs)] = torch.tensor(cs)
            if kind == "tag":
                ids = [label_index.get(x, -100) for x in label[: len(tokens)]]
                self.labels[i, : len(tokens)] = torch.tensor(ids)
            else:
                self.labels[i] = label_index.get(label, -100)

    def batch(self, idx: torch.Tensor, device: str) -> dict:
        t = int(self.lengths[idx].max())  # trim the padding to this batch's longest utterance
        labels = self.labels[idx, :t] if self.labels.dim() == 2 else self.labels[idx]
        return {"words": self.words[idx, :t].to(device), "chars": self.chars[idx, :t].to(device),
                "lengths": self.lengths[idx], "labels": labels.to(device)}


# ----------------------------------------------------------------------------- model


class InputEmbedder(nn.Module):
    """Token representations (B, T, D): random-init or pre-trained word vectors, or a char CNN per word."""

    def __init__(self, kind: str, n_words: int, n_chars: int, cfg: Config, pretrained: torch.Tensor | None):
        super().__init__()
        self.kind = kind
        if kind == "char":
            self.char_emb = nn.Embedding(n_chars, cfg.char_dim, padding_idx=0)
            self.char_conv = nn.Conv1d(cfg.char_dim, cfg.d_model, kernel_size=3, padding=1)
        else:
            self.word_emb = nn.Embedding(n_words, cfg.d_model, padding_idx=0)
            if pretrained is not None:  # fastText init, then fine-tuned with the task
                with torch.no_grad():
                    self.word_emb.weight.copy_(pretrained)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, batch: dict) -> torch.Tensor:
        if self.kind != "char":
            return self.drop(self.word_emb(batch["words"]))  # (B, T, D)
        b, t, lc = batch["chars"].shape
        c = self.char_emb(batch["chars"].view(b * t, lc)).transpose(1, 2)  # (B*T, Dc, L)
        h = self.char_conv(c).masked_fill((batch["chars"].view(b * t, 1, lc) == 0), -1e4).amax(-1)  # (B*T, D)
        return self.drop(torch.relu(h).view(b, t, -1))  # (B, T, D)


def pad_mask(batch: dict, t: int) -> torch.Tensor:
    """(B, T) True on real tokens."""
    device = batch["words"].device
    return torch.arange(t, device=device)[None] < batch["lengths"].to(device)[:, None]


class RNNEncoder(nn.Module):
    """Packed (Bi)LSTM / GRU over the real tokens only, so padding never leaks into the states."""

    def __init__(self, cell: str, cfg: Config, bidirectional: bool):
        super().__init__()
        rnn = nn.LSTM if cell == "lstm" else nn.GRU
        self.rnn = rnn(cfg.d_model, cfg.d_model, cfg.n_layers, batch_first=True, bidirectional=bidirectional)
        self.out_dim = cfg.d_model * (2 if bidirectional else 1)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor):
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, state = self.rnn(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])  # (B, T, H)
        h = state[0] if isinstance(state, tuple) else state  # (layers*dirs, B, D)
        last = torch.cat([h[-2], h[-1]], -1) if self.rnn.bidirectional else h[-1]  # (B, H)
        return out, last


class TransformerEncoder(nn.Module):
    """Pre-norm Transformer encoder with learned positions; padding masked out of the attention."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.pos = nn.Embedding(cfg.max_len, cfg.d_model)
        layer = nn.TransformerEncoderLayer(cfg.d_model, cfg.n_heads, 4 * cfg.d_model, cfg.dropout,
                                           batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.pos(torch.arange(x.shape[1], device=x.device))  # (B, T, D)
        return self.norm(self.layers(x, src_key_padding_mask=~mask))  # (B, T, D)


class Classifier(nn.Module):
    """Utterance classifier: bag (masked mean + MLP), cnn (conv + max pool), transformer (mean pool), bilstm,
    gru (final states)."""

    def __init__(self, arch: str, embedder: InputEmbedder, n_labels: int, cfg: Config):
        super().__init__()
        self.arch, self.embedder, d = arch, embedder, cfg.d_model
        if arch == "bag":
            self.body = nn.Sequential(nn.Linear(d, d), nn.ReLU())
        elif arch == "cnn":
            self.body = nn.Conv1d(d, d, kernel_size=3, padding=1)
        elif arch == "transformer":
            self.body = TransformerEncoder(cfg)
        elif arch in ("bilstm", "gru"):
            self.body = RNNEncoder("lstm" if arch == "bilstm" else "gru", cfg, bidirectional=arch == "bilstm")
            d = self.body.out_dim
        else:
            raise InputError(f"{arch}: unknown classification arch (expected one of {ARCHS_CLS})")
        self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(d, n_labels))

    def forward(self, batch: dict) -> torch.Tensor:
        x = self.embedder(batch)  # (B, T, D)
        mask = pad_mask(batch, x.shape[1])  # (B, T)
        m = mask.unsqueeze(-1).to(x.dtype)
        if self.arch == "bag":
            h = self.body((x * m).sum(1) / m.sum(1))  # (B, D)
        elif self.arch == "cnn":
            h = torch.relu(self.body(x.transpose(1, 2))).transpose(1, 2)  # (B, T, D)
            h = h.masked_fill(~mask.unsqueeze(-1), -1e4).amax(1)  # (B, D)
        elif self.arch == "transformer":
            h = self.body(x, mask)
            h = (h * m).sum(1) / m.sum(1)  # (B, D)
        else:
            h = self.body(x, batch["lengths"])[1]  # (B, H): final states
        return self.head(h)  # (B, K)


class Tagger(nn.Module):
    """Per-token tagger: bilstm or transformer encoder + linear head."""

    def __init__(self, arch: str, embedder: InputEmbedder, n_tags: int, cfg: Config):
        super().__init__()
        self.arch, self.embedder = arch, embedder
        if arch == "bilstm":
            self.body = RNNEncoder("lstm", cfg, bidirectional=True)
            d = self.body.out_dim
        elif arch == "transformer":
            self.body, d = TransformerEncoder(cfg), cfg.d_model
        else:
            raise InputError(f"{arch}: unknown tagging arch (expected one of {ARCHS_TAG})")
        self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(d, n_tags))

    def forward(self, batch: dict) -> torch.Tensor:
        x = self.embedder(batch)  # (B, T, D)
        if self.arch == "bilstm":
            h = self.body(x, batch["lengths"])[0]  # (B, T, 2D)
        else:
            h = self.body(x, pad_mask(batch, x.shape[1]))  # (B, T, D)
        return self.head(h)  # (B, T, K)


class Seq2SeqTagger(nn.Module):
    """Encoder-decoder tagger: BiGRU encoder; a GRU decoder emits tag t from tag t-1 and dot-product attention
    over all encoder states (no hard token alignment), teacher-forced in training, greedy at inference."""

    def __init__(self, embedder: InputEmbedder, n_tags: int, cfg: Config):
        super().__init__()
        d = cfg.d_model
        self.embedder, self.n_tags = embedder, n_tags
        self.encoder = RNNEncoder("gru", cfg, bidirectional=True)
        self.enc_proj = nn.Linear(2 * d, d)
        self.tag_emb = nn.Embedding(n_tags + 1, d)  # + a start symbol
        self.decoder = nn.GRUCell(2 * d, d)
        self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(2 * d, n_tags))

    def encode(self, batch: dict):
        x = self.embedder(batch)
        out, last = self.encoder(x, batch["lengths"])
        mem = self.enc_proj(out)  # (B, T, D)
        return mem, torch.tanh(self.enc_proj(last)), pad_mask(batch, x.shape[1])

    def step(self, mem, mask, h, prev_tag, ctx):
        h = self.decoder(torch.cat([self.tag_emb(prev_tag), ctx], -1), h)  # (B, D)
        att = (mem @ h.unsqueeze(-1)).squeeze(-1).masked_fill(~mask, -1e4).softmax(-1)  # (B, T)
        ctx = (att.unsqueeze(-1) * mem).sum(1)  # (B, D)
        return self.head(torch.cat([h, ctx], -1)), h, ctx  # logits (B, K)

    def forward(self, batch: dict) -> torch.Tensor:
        """Teacher forcing: logits (B, T, K) for the gold previous tags."""
        mem, h, mask = self.encode(batch)
        gold = batch["labels"].clamp(min=0)
        prev = torch.full_like(gold[:, 0], self.n_tags)
        ctx, logits = torch.zeros_like(h), []
        for t in range(gold.shape[1]):
            lg, h, ctx = self.step(mem, mask, h, prev, ctx)
            logits.append(lg)
            prev = gold[:, t]
        return torch.stack(logits, 1)


@torch.no_grad()
def predict_proba(models: list[nn.Module], batch: dict) -> torch.Tensor:
    """Averaged softmax of the models (an ensemble of one is the model): (B, K) or (B, T, K).
    Seq2seq members decode jointly: at each step the averaged distribution picks the next tag for all."""
    if not isinstance(models[0], Seq2SeqTagger):
        return torch.stack([m(batch).float().softmax(-1) for m in models]).mean(0)
    states = [m.encode(batch) for m in models]
    hs = [s[1] for s in states]
    ctxs = [torch.zeros_like(h) for h in hs]
    prev = torch.full((batch["words"].shape[0],), models[0].n_tags, dtype=torch.long, device=hs[0].device)
    probs = []
    for _ in range(batch["words"].shape[1]):
        step_p = []
        for k, (m, (mem, _, mask)) in enumerate(zip(models, states)):
            lg, hs[k], ctxs[k] = m.step(mem, mask, hs[k], prev, ctxs[k])
            step_p.append(lg.float().softmax(-1))
        p = torch.stack(step_p).mean(0)  # (B, K)
        probs.append(p)
        prev = p.argmax(-1)
    return torch.stack(probs, 1)  # (B, T, K)


# ----------------------------------------------------------------------------- losses


def task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (log-softmax in fp32) over utterances or real tokens (labels -100 ignored)."""
    logits = logits.float().reshape(-1, logits.shape[-1])  # (B*T, K) or (B, K)
    return F.cross_entropy(logits, labels.reshape(-1), ignore_index=-100)


# ----------------------------------------------------------------------------- train


def train(model: nn.Module, opt: torch.optim.Optimizer, data: Encoded, n_rows: int, epochs: int,
          gen: torch.Generator, cfg: Config, log: RunLog, peak: float, warmup: bool, unk_dropout: float,
          **log_extra) -> None:
    """Train on the first n_rows rows (a snapshot: nested by construction), cosine from `peak` to 10% of it,
    after a warmup over cfg.warmup_frac of the steps when `warmup` (from scratch; incremental fine-tuning
    continues AdamW's moments and step without one). unk_dropout: words seen once in the snapshot become
    the unknown word (row 1) with this probability, which trains that row for the test words unseen in
    training. Grad clip, bf16 autocast on CUDA, one log.jsonl line at the end."""
    total = epochs * math.ceil(n_rows / cfg.batch_size)
    n_warmup = max(1, int(cfg.warmup_frac * total)) if warmup else 0
    counts = torch.bincount(data.words[:n_rows].flatten(), minlength=2)  # (V,)
    singleton = (counts == 1) & (torch.arange(len(counts)) > 1)  # (V,) never pad / unknown
    step, loss, lr, tokens, cuda = 0, torch.tensor(0.0), peak, 0, cfg.device.startswith("cuda")
    model.train()
    log.last = time.time()
    for _ in range(epochs):
        perm = torch.randperm(n_rows, generator=gen)
        for i in range(0, n_rows, cfg.batch_size):
            idx = perm[i: i + cfg.batch_size]
            batch = data.batch(idx, cfg.device)
            if unk_dropout > 0:
                words = data.words[idx, : batch["words"].shape[1]]  # (B, T)
                drop = singleton[words] & (torch.rand(words.shape, generator=gen) < unk_dropout)
                batch["words"] = words.masked_fill(drop, 1).to(cfg.device)
            lr = lr_at(step, total, peak, n_warmup, 0.1 * peak)
            set_lr(opt, lr)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                loss = task_loss(model(batch), batch["labels"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            step, tokens = step + 1, tokens + int(batch["lengths"].sum())
    log(step, loss.item(), lr, tokens, **log_extra)


class Experiment:
    """One task: vocabularies, tensors, pre-trained vectors; builds and trains every row's models. Models
    of the `reuse` (arch, input) pairs are kept (on CPU) for the rows that reuse them bit for bit: ensemble
    member 0 is the retrain model (same seed and snapshot); incremental starts from its snapshot 0."""

    def __init__(self, task: Task, cfg: Config, vectors: dict, reuse: set = frozenset()):
        self.task, self.cfg, self.reuse, self.kept = task, cfg, reuse, {}
        train_words = {w for toks, _ in task.train for w in toks}
        all_words = sorted({w for toks, _ in task.train + task.test for w in toks})
        self.vocab_all = {w: i + 2 for i, w in enumerate(all_words)}  # 0 pad, 1 unknown
        # random init: words never seen in training share the unknown row (trained by word dropout on
        # singletons); fastText: every word keeps its own row, initialised from its subword vector
        self.vocab_train = {w: (i if w in train_words else 1) for w, i in self.vocab_all.items()}
        chars = sorted({c for toks, _ in task.train for w in toks for c in w})
        char_index = {c: i + 2 for i, c in enumerate(chars)}
        label_index = {x: i for i, x in enumerate(task.labels)}
        self.enc = {(split, vk): Encoded(rows, vocab, char_index, label_index, task.kind, cfg)
                    for split, rows in (("train", task.train), ("test", task.test))
                    for vk, vocab in (("train", self.vocab_train), ("all", self.vocab_all))}
        self.gold = [label if task.kind == "cls" else label[: cfg.max_len] for _, label in task.test]
        self.oov = np.array([any(w not in train_words for w in toks) for toks, _ in task.test])  # (X,)
        self.n_chars = len(chars) + 2
        self.pretrained = torch.zeros(len(all_words) + 2, cfg.d_model)
        for w, i in self.vocab_all.items():
            if w in vectors:  # unit scale like nn.Embedding's init
                self.pretrained[i] = vectors[w] * (1.0 / (vectors[w].std() + 1e-6))
        self.snapshot_sizes = task.snapshot_sizes(cfg.n_snapshots, cfg.first_snapshot)

    def build(self, arch: str, inp: str) -> nn.Module:
        emb = InputEmbedder(inp, len(self.vocab_all) + 2, self.n_chars, self.cfg,
                            self.pretrained if inp == "fasttext" else None)
        k = len(self.task.labels)
        if self.task.kind == "cls":
            model = Classifier(arch, emb, k, self.cfg)
        else:
            model = Seq2SeqTagger(emb, k, self.cfg) if arch == "seq2seq" else Tagger(arch, emb, k, self.cfg)
        return model.to(self.cfg.device)

    def from_scratch(self, arch: str, inp: str, seed: int, t: int, log: RunLog, keep: bool, **log_extra):
        """(model, optimizer) trained on snapshot t with this seed (init, data order; the same for every
        snapshot). keep: hold it for reuse (with the optimizer state at snapshot 0: incremental)."""
        key, gen = (arch, inp, seed, t), seed_everything(seed)  # seeds the init too
        model = self.build(arch, inp)
        opt = make_adamw(model, self.cfg.lr, self.cfg.weight_decay, betas=(0.9, 0.999))
        if key in self.kept:
            model.load_state_dict(self.kept[key][0])
            if self.kept[key][1] is not None:
                opt.load_state_dict(copy.deepcopy(self.kept[key][1]))
            return model, opt
        vk, cfg = "train" if inp == "random" else "all", self.cfg
        train(model, opt, self.enc[("train", vk)], self.snapshot_sizes[t], cfg.epochs, gen, cfg, log, cfg.lr,
              True, cfg.unk_dropout if inp == "random" else 0.0, snapshot=t, **log_extra)
        if keep:
            self.kept[key] = ({k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                              copy.deepcopy(opt.state_dict()) if t == 0 else None)
        return model, opt

    def run(self, arch: str, inp: str, strategy: str, seed_k: int, log: RunLog, job: str = "") -> dict:
        """All snapshots of one (row, seed) job: test predictions and scores (percent) per snapshot."""
        cfg, seed, vk = self.cfg, self.cfg.seed * 1000 + seed_k, "train" if inp == "random" else "all"
        members = cfg.ensemble_size if strategy == "ensemble" else 1
        keep = (arch, inp) in self.reuse
        models, opt, preds, scores = [], None, [], []
        for t, n_rows in enumerate(self.snapshot_sizes):
            if strategy == "incremental" and t > 0:  # fine-tune the previous snapshot's model on D_t
                train(models[0], opt, self.enc[("train", vk)], n_rows, cfg.incremental_epochs,
                      seed_everything(seed * 100 + t), cfg, log, cfg.incremental_lr, False,
                      cfg.unk_dropout if inp == "random" else 0.0, job=job, snapshot=t, member=0)
            else:  # member 0 has the retrain row's seed; the other members their own
                trained = [self.from_scratch(arch, inp, seed * 100 + 7919 * m, t, log, keep and m == 0,
                                             job=job, member=m) for m in range(members)]
                models, opt = [m for m, _ in trained], trained[0][1]
            p = predict(models, self.enc[("test", vk)], self.task.kind, cfg)
            preds.append(p)
            scores.append(self.score(p))
        return {"preds": preds, "scores": scores, "models": models}

    def score(self, pred: list) -> float:
        """Accuracy or conlleval span F1 in percent against the gold as read (unseen labels count wrong)."""
        names = self.task.labels
        if self.task.kind == "cls":
            return 100.0 * sum(names[p] == g for p, g in zip(pred, self.gold)) / len(pred)
        return span_f1(self.gold, [[names[x] for x in p] for p in pred])


# ----------------------------------------------------------------------------- eval


@torch.no_grad()
def predict(models: list[nn.Module], data: Encoded, kind: str, cfg: Config) -> list:
    """Test predictions: class ids, or per-utterance tag-id lists (real tokens only)."""
    for m in models:
        m.eval()
    out = []
    for i in range(0, len(data.lengths), 256):
        idx = torch.arange(i, min(i + 256, len(data.lengths)))
        pred = predict_proba(models, data.batch(idx, cfg.device)).argmax(-1).cpu()
        if kind == "cls":
            out += pred.tolist()
        else:
            out += [p[: int(n)].tolist() for p, n in zip(pred, data.lengths[idx])]
    return out


def rows_for(task: Task, cfg: Config) -> list[tuple[str, str, str]]:
    """(arch, input, strategy) rows of a task: every arch x input retrained, plus the strategy rows."""
    archs = cfg.archs_cls if task.kind == "cls" else cfg.archs_tag
    # names of unseen cities / artists are all "unknown word" to a word model: name tasks read characters
    base = cfg.base_input or ("char" if task.name in ("entity_type", "city_continent") else "random")
    rows = [(a, base, "retrain") for a in archs]
    if cfg.detail_tasks and task.name not in cfg.detail_tasks:
        return rows
    rows += [(a, inp, "retrain") for inp in cfg.inputs for a in archs if a in cfg.input_archs]
    rows += [(a, base, s) for s in cfg.strategies for a in archs if a in cfg.strategy_archs]
    return list(dict.fromkeys(rows))


def per_example(ex: Experiment, pred: list) -> tuple[np.ndarray, np.ndarray]:
    """(numerator, denominator) per test example, (X,) each: accuracy (correct, 1) or F1 (2 x correct spans,
    gold + predicted spans)."""
    if ex.task.kind == "cls":
        return np.array([ex.task.labels[p] == g for p, g in zip(pred, ex.gold)], float), np.ones(len(pred))
    gold, hyp = [bio_spans(g) for g in ex.gold], [bio_spans([ex.task.labels[x] for x in p]) for p in pred]
    return (np.array([2.0 * len(g & h) for g, h in zip(gold, hyp)]),
            np.array([len(g) + len(h) for g, h in zip(gold, hyp)], float))


def differ(a: list, b: list, tokens: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(changed, total) per test example of two models' predictions: the utterance (or its tags)."""
    if not tokens:
        return np.array([x != y for x, y in zip(a, b)], float), np.ones(len(a))
    return (np.array([sum(u != v for u, v in zip(x, y)) for x, y in zip(a, b)], float),
            np.array([len(x) for x in a], float))


def interval(units: list, unit_w: np.ndarray, example_w: np.ndarray, keep=None) -> list[float]:
    """[value, low, high] in percent: the mean over units (seeds, seed pairs, ...) of sum(numerator) /
    sum(denominator) over the test examples (those in the mask `keep`), and its 95% bootstrap interval over
    examples (example_w: (R, X) resampling counts) and seeds (unit_w: (R, U), a unit's weight in each
    resample of the seeds: for a pair, the product of its two seeds' counts)."""
    num, den = np.stack([u[0] for u in units]), np.stack([u[1] for u in units])  # (U, X)
    if keep is not None:
        num, den, example_w = num[:, keep], den[:, keep], example_w[:, keep]
    point = np.mean(num.sum(1) / np.maximum(den.sum(1), 1e-12))
    ratios = (example_w @ num.T) / np.maximum(example_w @ den.T, 1e-12)  # (R, U)
    with np.errstate(invalid="ignore"):  # a resample with one distinct seed has no pair: left out
        stats = (ratios * unit_w).sum(1) / unit_w.sum(1)
    low, high = np.nanpercentile(stats, [2.5, 97.5])
    return [round(100 * float(v), 2) for v in (point, low, high)]


def summarize(ex: Experiment, results: list[dict], seed_w: np.ndarray, example_w: np.ndarray) -> dict:
    """Table entries of one row from its N seed jobs, each [value, low, high] (percent, 95% bootstrap
    interval over test examples and seeds). Update jitter two ways: between the models of consecutive
    snapshots with the same seed (the data effect alone) and with different seeds (data + seed); with update
    groups also on the old and the new test examples apart."""
    preds = [r["preds"] for r in results]  # [seed][snapshot] -> predictions
    final, n, steps, tag = [p[-1] for p in preds], len(preds), range(len(preds[0]) - 1), ex.task.kind == "tag"
    pairs = list(itertools.combinations(range(n), 2))
    cross = [(a, b) for a in range(n) for b in range(n) if a != b]
    both = lambda ab: np.stack([seed_w[:, a] * seed_w[:, b] for a, b in ab], 1)  # (R, pairs): both drawn
    same_w, cross_w = np.repeat(seed_w, len(steps), 1), np.repeat(both(cross), len(steps), 1)
    out = {"score": interval([per_example(ex, f) for f in final], seed_w, example_w)}
    for key, tokens in (("_tok", True), ("", False)) if tag else (("", False),):  # `same` ends per utterance
        seed_pairs = [differ(final[a], final[b], tokens) for a, b in pairs]
        out["seed_jitter" + key] = interval(seed_pairs, both(pairs), example_w)
        if len(steps):
            same = [differ(preds[k][t], preds[k][t + 1], tokens) for k in range(n) for t in steps]
            out["update_jitter" + key] = interval(same, same_w, example_w)
    if ex.oov.any():  # test utterances with a word never seen in training
        out["seed_jitter_oov"] = interval(seed_pairs, both(pairs), example_w, ex.oov)
    if len(steps):
        new_seed = [differ(preds[a][t], preds[b][t + 1]) for a, b in cross for t in steps]
        out["update_jitter_new_seed"] = interval(new_seed, cross_w, example_w)
        if ex.task.test_new:
            new = np.array(ex.task.test_new)
            out["update_jitter_old"] = interval(same, same_w, example_w, ~new)
            out["update_jitter_new"] = interval(same, same_w, example_w, new)
    return out


COLUMNS = {"score": "{score}", "seed_jitter": "seed jitter", "seed_jitter_oov": "seed jitter, unseen word",
           "update_jitter": "update jitter, same seed", "update_jitter_new_seed": "update jitter, new seed",
           "update_jitter_old": "upd. old examples", "update_jitter_new": "upd. new examples",
           "seed_jitter_tok": "token seed jitter", "update_jitter_tok": "token update jitter"}


def format_table(task: Task, table: dict) -> str:
    """One markdown table: every figure as value [95% interval], in percent."""
    keys = [k for k in COLUMNS if k in next(iter(table.values()))]
    score = "acc" if task.kind == "cls" else "slot F1"
    head = "| model | " + " | ".join(COLUMNS[k].format(score=score) for k in keys) + " |"
    lines = [f"### {task.name} ({'classification' if task.kind == 'cls' else 'tagging'}, "
             f"{len(task.train)} train / {len(task.test)} test; % with 95% bootstrap intervals)", "",
             *[f"- {note}" for note in task.notes], *([""] if task.notes else []),
             head, "|" + " --- |" * (len(keys) + 1)]
    for row, m in table.items():
        lines.append(f"| {row} | " + " | ".join("{:.1f} [{:.1f}, {:.1f}]".format(*m[k]) for k in keys) + " |")
    return "\n".join(lines)


def findings(task: Task, table: dict) -> list[str]:
    """Each strategy / input row against the retrain row of its arch (random input for input rows): a
    difference is called real only when the two 95% intervals do not overlap."""
    lines = []
    for row, m in table.items():
        arch, _, strat = row.split("/")
        base = next((r for r in table if r.startswith(arch + "/") and r.endswith("/retrain") and r != row
                     and (strat != "retrain" or "/random/" in r)), None)
        for key in [k for k in ("score", "seed_jitter", "update_jitter", "update_jitter_new_seed") if k in m]:
            if base is not None:
                (a, a_lo, a_hi), (b, b_lo, b_hi) = m[key], table[base][key]
                verdict = ("real" if a_hi < b_lo or b_hi < a_lo else "not separated") + f" ({a - b:+.1f})"
                lines.append(f"| {task.name} | {row} vs {base} | {key} | {a:.1f} vs {b:.1f} | {verdict} |")
    return lines


# ----------------------------------------------------------------------------- main


def read_progress(out_dir: Path, cfg: Config) -> dict:
    """--resume=True: the finished jobs of out_dir/progress.json, refused (naming the fields) when that run's
    config differs in anything but out_dir, device and resume. Reads only."""
    path = out_dir / "progress.json"
    if not path.is_file():
        raise InputError(f"{path}: missing, nothing to resume (run without --resume=True)")
    saved = json.loads(path.read_text(encoding="utf-8"))  # a JSON error is a ValueError: one line, exit 2
    config, jobs, now = saved.get("config", {}), saved.get("jobs", {}), json.loads(json.dumps(asdict(cfg)))
    changed = [k for k in now if k not in ("out_dir", "device", "resume") and config.get(k) != now[k]]
    if changed:
        raise InputError(f"--resume=True: {path} was saved with " + ", ".join(
            f"{k}={config.get(k)!r} (now {now[k]!r})" for k in changed))
    return jobs


def main(argv: list[str]) -> dict:
    cfg = parse_config(argv)
    check_config(cfg)
    device, rank, world = setup_device(cfg.device)
    cfg = dataclasses.replace(cfg, device=device)
    out = check_out_dir(cfg.out_dir)
    if device.startswith("cuda"):  # CPU kernels are deterministic already
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    t_start, tasks = time.time(), load_tasks(cfg)  # all input is read and checked before anything is written
    done = read_progress(out, cfg) if cfg.resume else {}
    jobs = [(t, row, k) for t in tasks for row in rows_for(t, cfg) for k in range(cfg.n_seeds)]
    todo = [j for j in jobs if f"{j[0].name}/{'/'.join(j[1])}/{j[2]}" not in done]
    needed = sorted({w for t in tasks for toks, _ in t.train + t.test for w in toks})
    wants_fasttext = any(row[1] == "fasttext" for _, row, _ in todo)
    vectors = read_vec(cfg.vec, needed, cfg.d_model) if cfg.vec and wants_fasttext else {}
    if rank == 0:
        write_outputs(out, {"config.json": cfg})
        (out / "models").mkdir(exist_ok=True)
    log = RunLog(out, "tok", 0.0, device, rank, world)
    progress = {"config": asdict(cfg), "jobs": dict(done)}
    if wants_fasttext and not cfg.vec:  # one skip-gram model for all tasks, on unlabelled text (no labels)
        text = list({tuple(s): s for t in tasks for s in t.unlabelled}.values())  # tasks of a folder share it
        text = text or [s.split() for s in voice.corpus(cfg.ft_sentences, cfg.seed)]
        text += [toks for t in tasks if t.name in ("entity_type", "city_continent") for toks, _ in t.train]
        vectors = train_subword_vectors(text, needed, cfg.d_model, cfg.ft_epochs, cfg.ft_window,
                                        cfg.ft_negatives, cfg.ft_buckets, cfg.seed, device)
    reused = {t.name: {(a, i) for a, i, s in rows_for(t, cfg) if s != "retrain"} for t in tasks}
    experiments = {t.name: Experiment(t, cfg, vectors, reused[t.name]) for t in tasks}
    groups = list(dict.fromkeys((t.name, row[0], k) for t, row, k in todo))  # a group shares reused models
    mine = [j for j in todo if groups.index((j[0].name, j[1][0], j[2])) % world == rank]
    for i, (task, (arch, inp, strat), k) in enumerate(tqdm(mine, "models", disable=rank != 0 or None)):
        name = f"{task.name}/{arch}/{inp}/{strat}/{k}"
        t0, res = time.time(), experiments[task.name].run(arch, inp, strat, k, log, job=name)
        progress["jobs"][name] = {"preds": res["preds"], "scores": [round(s, 4) for s in res["scores"]]}
        print(f"job {i + 1}/{len(mine)} {name}: {res['scores'][-1]:.1f}, {time.time() - t0:.1f} s")
        if k == 0:
            save_checkpoint(out, res["models"][0], None, cfg, len(res["scores"]),
                            meta={"row": [arch, inp, strat], "labels": task.labels},
                            name=f"models/{task.name}__{arch}__{inp}__{strat}")
        if world == 1:
            write_outputs(out, {"progress.json": progress})
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, progress["jobs"])
        progress["jobs"] = {name: job for g in gathered for name, job in g.items()}
        if rank == 0:
            write_outputs(out, {"progress.json": progress})
    metrics, tables, found, rng = {}, [], [], np.random.default_rng(cfg.seed)  # one resampling per task
    for task in tasks:
        seed_w = rng.multinomial(cfg.n_seeds, [1 / cfg.n_seeds] * cfg.n_seeds, cfg.bootstrap).astype(float)
        example_w = rng.multinomial(len(task.test), [1 / len(task.test)] * len(task.test), cfg.bootstrap)
        rows = ["/".join(row) for row in rows_for(task, cfg)]
        results = {r: [progress["jobs"][f"{task.name}/{r}/{k}"] for k in range(cfg.n_seeds)] for r in rows}
        metrics[task.name] = {row: summarize(experiments[task.name], r, seed_w, example_w.astype(float))
                              for row, r in results.items()}
        tables.append(format_table(task, metrics[task.name]))
        found += findings(task, metrics[task.name])
    seconds = round(time.time() - t_start, 1)
    if rank == 0:
        text = "\n\n".join(tables)
        found_text = ("| task | rows | metric | values | difference |\n| --- | --- | --- | --- | --- |\n"
                      + "\n".join(found)) if found else "(no strategy or input rows)"
        print(text + "\n\nFindings (real = the 95% intervals do not overlap):\n" + found_text)
        print(f"{len(jobs)} jobs ({len(todo)} run now, {len(jobs) - len(todo)} resumed) in {seconds} s on "
              f"{device}, {time.process_time():.0f} CPU s in rank 0 (about the wall time on an idle core)")
        sizes, kind = experiments[tasks[0].name].snapshot_sizes, "iid" if cfg.data else cfg.updates
        report = (f"# jitter.py report ({cfg.preset} preset{', data ' + cfg.data if cfg.data else ''})\n\n"
                  f"Rows are arch/input/strategy; {cfg.n_seeds} seeds, snapshots of {sizes} training rows "
                  f"({kind} updates). Seed jitter: mean pairwise churn of the final models; update jitter: "
                  "churn between consecutive snapshots' models with the same seed (data effect) or another "
                  f"seed (data + seed). 95% intervals: {cfg.bootstrap} bootstraps of examples and seeds."
                  f"\n\n{text}\n\n## Findings\n\nA difference is real only when the 95% intervals do not "
                  f"overlap.\n\n{found_text}\n\nWall time: {seconds} s on {device}.\n")
        write_outputs(out, {"metrics.json": metrics | {"seconds": seconds}, "report.md": report})
    if dist.is_initialized():
        dist.destroy_process_group()
    return metrics


if __name__ == "__main__":
    run_main(main)
