"""Noise-robust named entity understanding (NEU) for voice assistants, in miniature.

Paper: "Noise Robust Named Entity Understanding for Voice Assistants", Muralidharan et al., NAACL 2021
Industry track, arXiv:2005.14408. NEU = named entity recognition (NER) + entity linking (EL: a heard span ->
its catalogue entry). A joint reranker that sees the NER k-best *and* the catalogue matches of their spans
fixes errors of both: NER F1 up to +3.13, EL F1 up to +3.6 over the pipeline.

Here (our design where the paper gives no detail): a word + char-CNN BiLSTM-CRF with k-best Viterbi; EL
candidates per span from data/entity_search.py (char n-gram TF-IDF, phonetic keys, edit similarity over real
catalogues); a joint reranker over (NER hypothesis, a candidate or NIL per span), trained listwise (exact
softmax over all joint hypotheses). Systems: the pipeline (NER 1-best -> EL top-1 by the hand-set retrieval
score), learned EL (NER 1-best -> the same reranker, features and budget, NIL included), joint, joint with
NIL off. The paper's downstream domain-classification claim is not measured here.

Commands:
  python neu.py                                    # cpu preset: the table below
  python neu.py --preset=smoke                     # tiny end-to-end run (tests)
  python neu.py --preset=gpu                       # one GPU (bf16 autocast for the BiLSTM)
  torchrun --standalone --nproc_per_node=4 neu.py --preset=gpu   # DDP for the NER training
  python neu.py --preset=snips --data=DIR          # JointBERT folders (train/ dev/ test/), e.g. SNIPS: NER F1
  python neu.py --data=DIR --catalog=cat.jsonl     # + the pipeline's links of the test queries -> links.jsonl

Prints, per test set (noise rate; held-out-entity slice): NER span F1 and EL F1 (right span and entity) per
system (mean of n_seeds [95% bootstrap interval]), the joint model's deltas, a verdict on the paper's
gains, then the end-to-end latency per query (median / p95).
"""

from __future__ import annotations

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
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from tqdm import tqdm

from data import InputError, voice
from data.entity_search import LINK_FEATURES, EntityIndex
from data.metrics import bio_spans, span_f1_sets


# ----------------------------------------------------------------------------- config
@dataclass
class Config:
    data: str = ""  # JointBERT root with train/ dev/ test/ (a user's NER data); "" = built-in voice queries
    catalog: str = ""  # catalogue JSONL (id, name, aliases, type, popularity) linked against with --data
    n_train: int = 6000  # built-in NER training queries (split evenly over train_noises)
    n_rerank: int = 2000  # dev queries that train the rerankers
    n_test: int = 1500  # test queries per noise rate
    train_noises: tuple = (0.0, 0.1, 0.2)  # ASR noise rates mixed into every training set
    test_noises: tuple = (0.0, 0.2, 0.4)  # one table block per rate (0.0 = clean; 0.4 is beyond training)
    word_dim: int = 64  # word embedding width
    char_dim: int = 24  # character embedding width
    char_channels: int = 48  # char-CNN filters (noise-robust sub-word evidence)
    hidden: int = 128  # BiLSTM hidden size per direction
    dropout: float = 0.3  # dropout on embeddings and LSTM outputs
    word_dropout: float = 0.05  # train-time rate of replacing a word by <unk> (teaches OOV handling)
    min_word_count: int = 2  # rarer training words map to <unk>
    steps: int = 2000  # NER optimizer steps
    batch_size: int = 32  # sentences per step (global, split over DDP ranks)
    lr: float = 3e-3  # peak AdamW learning rate
    weight_decay: float = 0.01  # AdamW decay on >=2-D parameters only
    warmup: int = 100  # linear warmup steps, then cosine to lr / 10
    grad_clip: float = 5.0  # global grad-norm clip
    log_every: int = 50  # steps between log lines
    eval_every: int = 500  # steps between dev NER F1 evals and checkpoints (the best dev F1 is kept)
    stop_at: int = 0  # stop NER training after this step (0 = run to the end); --resume=True continues
    k_best: int = 5  # NER hypotheses per query
    m_candidates: int = 8  # EL candidates per span
    tfidf_pool: int = 40  # aliases kept from the TF-IDF stage before edit / phonetic scoring
    type_bonus: float = 0.15  # retrieval bonus for a candidate of the span's NER type
    rerank_steps: int = 300  # full-batch AdamW steps of each reranker (joint and learned EL alike)
    rerank_lr: float = 0.02  # reranker learning rate
    n_seeds: int = 3  # model seeds (seed, seed + 1, ...): NER and rerankers retrained, the same test queries
    n_boot: int = 1000  # bootstrap resamples of the test queries for the 95% intervals
    n_latency: int = 200  # test queries timed one at a time, end to end
    latency_repeats: int = 3  # passes over them (the first 20 timings are warm-up)
    preset: str = "auto"  # smoke | cpu | gpu | snips (auto: gpu with CUDA, else cpu)
    out_dir: str = "out/neu"  # where config / logs / metrics / report / checkpoints go
    seed: int = 0  # seeds the data, data order, init and dropout
    device: str = "auto"  # auto | cpu | cuda | mps
    resume: bool = False  # continue NER training from out_dir/ner.safetensors


PRESETS = {
    "smoke": dict(n_train=400, n_rerank=150, n_test=100, test_noises=(0.0, 0.2), word_dim=32, char_dim=16,
                  char_channels=24, hidden=48, steps=80, lr=1e-2, warmup=10, log_every=20, eval_every=40,
                  k_best=3, m_candidates=5, rerank_steps=60, n_seeds=1, n_boot=200, n_latency=30,
                  latency_repeats=1),
    "cpu": {},
    "gpu": dict(n_train=40000, n_rerank=5000, n_test=3000, word_dim=128, char_channels=96, hidden=256,
                steps=6000, batch_size=128, lr=2e-3, warmup=300, eval_every=1000, k_best=8, m_candidates=10),
    "snips": dict(min_word_count=1, word_dim=100, char_channels=64, hidden=200, steps=8000, eval_every=1000,
                  lr=2e-3, warmup=200, n_seeds=1),  # with --data=<SNIPS JointBERT root>: 93.39 span F1
}


def check_config(cfg: Config) -> None:
    """Every size flag and rate, before any work (a bad --n_test must not fail after the training)."""
    sizes = ("n_train n_rerank n_test word_dim char_dim char_channels hidden steps batch_size log_every "
             "eval_every k_best m_candidates tfidf_pool rerank_steps min_word_count n_seeds n_boot n_latency "
             "latency_repeats")
    value = lambda k: f"--{k}={getattr(cfg, k)}"
    bad = [f"{value(k)}: expected a whole number >= 1" for k in sizes.split() if getattr(cfg, k) < 1]
    bad += [f"{value(k)}: expected a whole number >= 0" for k in ("warmup", "stop_at") if getattr(cfg, k) < 0]
    bad += [f"{value(k)}: expected a rate in [0, 1)" for k in ("dropout", "word_dropout")
            if not 0.0 <= getattr(cfg, k) < 1.0]
    bad += [f"{value(k)}: expected a number > 0" for k in ("lr", "rerank_lr", "grad_clip")
            if getattr(cfg, k) <= 0]
    bad += [f"--{k}={','.join(map(str, getattr(cfg, k)))}: expected rates in [0, 1], like 0.0,0.2"
            for k in ("train_noises", "test_noises") if not getattr(cfg, k)
            or not all(isinstance(r, float) and 0.0 <= r <= 1.0 for r in getattr(cfg, k))]
    if cfg.n_train < len(cfg.train_noises):
        bad.append(f"--n_train={cfg.n_train}: expected at least one query per train noise rate")
    if cfg.catalog and not cfg.data:
        bad.append("--catalog needs --data: the built-in queries link to the built-in catalogue")
    if bad:
        raise InputError(bad[0])


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
PAD, UNK = 0, 1


class Vocab:
    """Word, character and tag ids (<pad> = 0, <unk> = 1; tags: "O" first, then B-/I- per type)."""

    def __init__(self, words: list[str], chars: list[str], tags: list[str]):
        self.words, self.chars, self.tags = words, chars, tags
        self.word_id, self.char_id, self.tag_id = (
            {s: i for i, s in enumerate(x)} for x in (words, chars, tags))

    @classmethod
    def build(cls, queries, min_count: int) -> Vocab:
        words = Counter(w.lower() for q in queries for w in q.tokens)
        chars = Counter(c for q in queries for w in q.tokens for c in w.lower())
        types = sorted({t[2:] for q in queries for t in q.tags if t != "O"})
        return cls(["<pad>", "<unk>"] + sorted(w for w, c in words.items() if c >= min_count),
                   ["<pad>", "<unk>"] + sorted(chars), ["O"] + [f"{p}-{t}" for t in types for p in "BI"])

    def encode(self, queries, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Padded (words (B, T), chars (B, T, W), tags (B, T), mask (B, T)); unseen tags -> O."""
        B, T = len(queries), max(len(q.tokens) for q in queries)
        W = max(len(w) for q in queries for w in q.tokens)
        words, tags = torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T, dtype=torch.long)
        chars = torch.zeros(B, T, W, dtype=torch.long)
        for b, q in enumerate(queries):
            for t, (w, tag) in enumerate(zip(q.tokens, q.tags, strict=True)):
                w = w.lower()
                words[b, t] = self.word_id.get(w, UNK)
                chars[b, t, :len(w)] = torch.tensor([self.char_id.get(c, UNK) for c in w])
                tags[b, t] = self.tag_id.get(tag, 0)
        mask = torch.arange(T).unsqueeze(0) < torch.tensor([len(q.tokens) for q in queries]).unsqueeze(1)
        return words.to(device), chars.to(device), tags.to(device), mask.to(device)


# ----------------------------------------------------------------------------- model
class Encoder(nn.Module):
    """Words + a per-word character CNN (max-pooled: misspelt, merged, split or unknown words still share
    most character n-grams) -> BiLSTM -> per-tag emission scores."""

    def __init__(self, cfg: Config, vocab: Vocab):
        super().__init__()
        self.word_embed = nn.Embedding(len(vocab.words), cfg.word_dim, padding_idx=PAD)
        self.char_embed = nn.Embedding(len(vocab.chars), cfg.char_dim, padding_idx=PAD)
        self.char_conv = nn.Conv1d(cfg.char_dim, cfg.char_channels, kernel_size=3, padding=1)
        self.lstm = nn.LSTM(cfg.word_dim + cfg.char_channels, cfg.hidden, batch_first=True,
                            bidirectional=True)
        self.drop = nn.Dropout(cfg.dropout)
        self.emit = nn.Linear(2 * cfg.hidden, len(vocab.tags))

    def forward(self, words, chars, mask):
        B, T, W = chars.shape
        c = self.char_conv(self.char_embed(chars.view(B * T, W)).transpose(1, 2))  # (B*T, channels, W)
        c = c.masked_fill(chars.view(B * T, 1, W) == PAD, -1e4).max(dim=2).values.clamp(min=-1.0)  # pad loses
        x = self.drop(torch.cat([self.word_embed(words), c.view(B, T, -1)], dim=-1))  # (B, T, D)
        h, _ = self.lstm(pack_padded_sequence(x, mask.sum(1).cpu(), batch_first=True, enforce_sorted=False))
        h, _ = pad_packed_sequence(h, batch_first=True, total_length=T)  # (B, T, 2H)
        return self.emit(self.drop(h))  # (B, T, L)


NEG = -1e4  # score of an illegal BIO transition (finite so that gradients stay clean)


def kbest_viterbi(emissions, mask, trans, start, end, k: int):
    """The k highest-scoring tag paths per sequence (list Viterbi): ((B, k, T) tags, (B, k) scores).
    Each (position, tag) keeps its k best partial paths; a step ranks the L*k extensions of each tag.
    Ranks a sequence cannot fill (fewer than k paths exist) come back with score -inf."""
    B, T, L = emissions.shape
    scores = emissions.new_full((B, L, k), float("-inf"))
    scores[:, :, 0] = start + emissions[:, 0]  # (B, L, k): score of the r-th best path ending in tag l
    keep_ptr = torch.arange(L * k, device=emissions.device).view(1, L, k).expand(B, L, k)
    pointers = []
    for t in range(1, T):
        ext = (scores.unsqueeze(2) + trans.view(1, L, L, 1)).permute(0, 2, 1, 3)  # (B, L', L, k)
        top, ptr = ext.reshape(B, L, L * k).topk(k, dim=2)  # pointer = prev_tag * k + prev_rank
        live = mask[:, t].view(B, 1, 1)
        scores = torch.where(live, top + emissions[:, t].unsqueeze(2), scores)  # padding copies the paths on
        pointers.append(torch.where(live, ptr, keep_ptr))
    best, state = (scores + end.view(1, L, 1)).reshape(B, L * k).topk(k, dim=1)  # (B, k)
    paths = torch.zeros(B, k, T, dtype=torch.long, device=emissions.device)
    for t in range(T - 1, 0, -1):
        paths[:, :, t] = state // k
        state = pointers[t - 1].reshape(B, L * k).gather(1, state)
    paths[:, :, 0] = state // k
    return paths, best


class BiLSTMCRF(nn.Module):
    """The NER tagger: emissions from the encoder, BIO-constrained transitions of a linear-chain CRF."""

    def __init__(self, cfg: Config, vocab: Vocab):
        super().__init__()
        self.encoder = Encoder(cfg, vocab)
        L = len(vocab.tags)
        self.transitions = nn.Parameter(torch.zeros(L, L))  # [from, to]
        self.start = nn.Parameter(torch.zeros(L))
        self.end = nn.Parameter(torch.zeros(L))
        ok = torch.ones(L, L, dtype=torch.bool)  # I-x may only follow B-x or I-x
        for j, tag in enumerate(vocab.tags):
            if tag.startswith("I-"):
                ok[:, j] = torch.tensor([t in (f"B-{tag[2:]}", tag) for t in vocab.tags])
        self.register_buffer("allowed", ok)
        self.register_buffer("may_start", torch.tensor([not t.startswith("I-") for t in vocab.tags]))

    def crf_params(self):
        return (self.transitions.float().masked_fill(~self.allowed, NEG),
                self.start.float().masked_fill(~self.may_start, NEG), self.end.float())

    def forward(self, words, chars, tags, mask):
        """Mean negative log-likelihood of the gold tags (crf_nll), in fp32."""
        return crf_nll(self.encoder(words, chars, mask).float(), tags, mask, *self.crf_params())

    @torch.no_grad()
    def kbest(self, words, chars, mask, k: int):
        """k-best paths with log p(path | x) = score - log Z; illegal / missing ranks get -inf."""
        emissions = self.encoder(words, chars, mask).float()
        trans, start, end = self.crf_params()
        paths, scores = kbest_viterbi(emissions, mask, trans, start, end, k)
        logp = scores - crf_log_partition(emissions, mask, trans, start, end).unsqueeze(1)
        return paths, logp.masked_fill(scores < NEG / 2, float("-inf"))


# ----------------------------------------------------------------------------- model: joint reranker
@dataclass
class Hypothesis:
    spans: list[tuple[int, int, str]]  # NER spans (start, end, type), in order
    features: np.ndarray  # (5,) log p(path) / 10, is 1-best, 1 / (1 + rank), spans / 3, unlinked spans / 2
    candidates: list[list[tuple[int, np.ndarray]]]  # per linkable span (in `linkable` order): retrieve()
    linkable: list[int]  # indices into spans whose type the catalogue holds


def build_hypotheses(tokens, paths, logps, vocab: Vocab, index: EntityIndex, m: int) -> list[Hypothesis]:
    """NER k-best (paths (k, T), logps (k,)) -> hypotheses with EL candidates for each linkable span."""
    hyps, retrieved = [], {}  # the k paths share most spans: retrieve each (start, end, type) once
    for rank, (path, logp) in enumerate(zip(paths, logps, strict=True)):
        if logp == float("-inf"):
            continue
        spans = sorted(bio_spans([vocab.tags[i] for i in path[:len(tokens)]]))
        linkable = [i for i, s in enumerate(spans) if s[2] in index.linkable_types]
        for s, e, t in [spans[i] for i in linkable]:
            if (s, e, t) not in retrieved:
                retrieved[s, e, t] = index.retrieve(" ".join(tokens[s:e]), t, m)
        cands = [retrieved[spans[i]] for i in linkable]
        features = [max(logp, -30.0) / 10.0, float(rank == 0), 1.0 / (1 + rank), len(spans) / 3.0,
                    sum(not c for c in cands) / 2.0]
        hyps.append(Hypothesis(spans, np.array(features, dtype=np.float32), cands, linkable))
    return hyps


class JointReranker(nn.Module):
    """score(h, e) = w . phi(h) + sum over linkable spans s of g(psi(s, e_s)), with e_s a candidate or NIL.
    The paper's joint reranking module, our parametrisation: a linear NER-hypothesis term and a small MLP
    per (span, candidate) pair; NIL (no candidate is right) has a learned score. The learned-EL pipeline
    is the same module shown only the NER 1-best; allow_nil=False is the NIL ablation."""

    def __init__(self, hidden: int = 32, allow_nil: bool = True):
        super().__init__()
        self.hyp = nn.Linear(5, 1)  # over Hypothesis.features
        self.link = nn.Sequential(nn.Linear(len(LINK_FEATURES), hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.nil = nn.Parameter(torch.zeros(1))
        self.allow_nil = allow_nil

    def scores(self, batch):
        """Per hypothesis f (H,); per span the link scores g (S, 1 + C), column 0 = NIL; per hypothesis its
        total with each span's choice summed out (lse, (H,)) and maxed out (best, (H,)); the argmax of g."""
        f = self.hyp(batch["hyp_feats"]).squeeze(-1)  # (H,)
        g = self.link(batch["cand_feats"]).squeeze(-1).masked_fill(~batch["cand_mask"], -math.inf)  # (S, C)
        nil = self.nil if self.allow_nil else torch.full_like(self.nil, NEG)  # finite: no row is all -inf
        g = torch.cat([nil.expand(g.shape[0], 1), g], dim=1)  # (S, 1 + C)
        lse = f.index_add(0, batch["span_hyp"], torch.logsumexp(g, dim=1))  # (H,)
        best, choice = g.max(dim=1)  # (S,)
        return f, g, lse, f.index_add(0, batch["span_hyp"], best), choice


def pack(queries_hyps, gold=None):
    """Flatten many queries' hypotheses into tensors. gold[q] = (hyp index, [choice per linkable span])."""
    hyp_feats, hyp_query, span_hyp, cand_rows = [], [], [], []
    gold_rows = {"gold_hyp": [], "gold_span": [], "gold_choice": []}
    for qi, hyps in enumerate(queries_hyps):
        for hi, h in enumerate(hyps):
            is_gold = gold is not None and gold[qi][0] == hi
            gold_rows["gold_hyp"] += [len(hyp_feats)] * is_gold
            for si, cands in enumerate(h.candidates):
                if is_gold:
                    gold_rows["gold_span"].append(len(span_hyp))
                    gold_rows["gold_choice"].append(gold[qi][1][si])
                span_hyp.append(len(hyp_feats))
                cand_rows.append(cands)
            hyp_feats.append(h.features)
            hyp_query.append(qi)
    n_cands = max([len(c) for c in cand_rows] + [1])
    cand_feats = np.zeros((len(cand_rows), n_cands, len(LINK_FEATURES)), dtype=np.float32)
    cand_mask = np.zeros(cand_feats.shape[:2], dtype=bool)
    for s, cands in enumerate(cand_rows):
        for c, (_, feats) in enumerate(cands):
            cand_feats[s, c], cand_mask[s, c] = feats, True
    batch = dict(hyp_feats=torch.from_numpy(np.stack(hyp_feats)), hyp_query=torch.tensor(hyp_query),
                 span_hyp=torch.tensor(span_hyp, dtype=torch.long), cand_feats=torch.from_numpy(cand_feats),
                 cand_mask=torch.from_numpy(cand_mask))
    return batch | ({k: torch.tensor(v, dtype=torch.long) for k, v in gold_rows.items()} if gold else {})


def decode_pipeline(hyps):
    """NER 1-best -> EL top-1 of the hand-set retrieval score: (spans, {(start, end): entity index})."""
    h = hyps[0]
    return h.spans, {h.spans[si][:2]: c[0][0] for si, c in zip(h.linkable, h.candidates, strict=True) if c}


@torch.no_grad()
def decode_joint(reranker, hyps):
    """Best joint hypothesis: argmax_h [w.phi(h) + sum_s max_e g(s, e)], then each span's argmax."""
    batch = pack([hyps])
    _, _, _, best, choice = reranker.scores(batch)
    h_id = int(best.argmax())
    rows = (batch["span_hyp"] == h_id).nonzero().flatten().tolist()
    h = hyps[h_id]
    return h.spans, {h.spans[si][:2]: cands[int(choice[row]) - 1][0] for si, cands, row
                     in zip(h.linkable, h.candidates, rows, strict=True) if choice[row] > 0}


# ----------------------------------------------------------------------------- losses
def crf_log_partition(emissions, mask, trans, start, end) -> torch.Tensor:
    """log Z = log sum over tag paths of exp(score), the forward algorithm in log space: alpha'_j =
    logsumexp_i(alpha_i + trans_ij) + emit_j, as a matmul of shifted exponentials (20x faster than a (B, L, L)
    logsumexp at 79 tags) except where that underflows (float32 gaps over ~70): there the exact logsumexp."""
    alpha = start + emissions[:, 0]  # (B, L)
    trans_peak = trans.max(dim=0).values  # (L,): per destination tag, so every column of exp_trans peaks at 1
    exp_trans = (trans - trans_peak).exp()  # (L, L)
    for t in range(1, emissions.shape[1]):
        peak = alpha.max(dim=1, keepdim=True).values.detach()  # (B, 1)
        summed = (alpha - peak).exp() @ exp_trans  # (B, L)
        fits = summed > 1e-30
        nxt = summed.clamp(min=1e-30).log() + peak + trans_peak  # (B, L); clamped entries are replaced below
        if not fits.all():
            nxt = torch.where(fits, nxt, torch.logsumexp(alpha.unsqueeze(2) + trans.unsqueeze(0), dim=1))
        alpha = torch.where(mask[:, t:t + 1], nxt + emissions[:, t], alpha)
    return torch.logsumexp(alpha + end, dim=1)


def crf_path_score(emissions, tags, mask, trans, start, end) -> torch.Tensor:
    """score(y) = start[y1] + sum_t emit[t, y_t] + sum_t trans[y_{t-1}, y_t] + end[y_T]. (B,)."""
    emit = emissions.gather(2, tags.unsqueeze(2)).squeeze(2) * mask  # (B, T)
    step = trans[tags[:, :-1], tags[:, 1:]] * mask[:, 1:]  # (B, T-1)
    last = tags.gather(1, (mask.sum(1, keepdim=True) - 1)).squeeze(1)  # (B,)
    return start[tags[:, 0]] + emit.sum(1) + step.sum(1) + end[last]


def crf_nll(emissions, tags, mask, trans, start, end) -> torch.Tensor:
    """The CRF objective: mean over the batch of -log p(y | x) = log Z(x) - score(x, y)."""
    return (crf_log_partition(emissions, mask, trans, start, end)
            - crf_path_score(emissions, tags, mask, trans, start, end)).mean()


def listwise_loss(reranker: JointReranker, batch) -> torch.Tensor:
    """Listwise softmax CE over all joint hypotheses of a query: -log p(h*, e*), where log Z sums every
    (hypothesis, one choice per span) combination, exactly: it factorises into per-span logsumexps."""
    f, g, lse, _, _ = reranker.scores(batch)
    q = batch["hyp_query"]
    n_q = int(q.max()) + 1
    peak = torch.full((n_q,), float("-inf")).scatter_reduce(0, q, lse, "amax").detach()  # (Q,)
    log_z = peak + torch.zeros(n_q).index_add(0, q, torch.exp(lse - peak[q])).log()  # (Q,)
    gold_span_query = q[batch["span_hyp"][batch["gold_span"]]]
    gold = f[batch["gold_hyp"]].index_add(0, gold_span_query, g[batch["gold_span"], batch["gold_choice"]])
    return (log_z - gold).mean()


def span_choices(h: Hypothesis, query, index: EntityIndex) -> list[int]:
    """Per linkable span of h: 1 + the gold entity's candidate index, or 0 (NIL) when the span is not a
    gold mention or its entity was not retrieved."""
    gold = {(m.start, m.end, m.type): m.entity_id for m in query.entities}
    ids = [[index.entities[ei].id for ei, _ in cands] for cands in h.candidates]
    return [ids[j].index(gold[h.spans[si]]) + 1 if gold.get(h.spans[si]) in ids[j] else 0
            for j, si in enumerate(h.linkable)]


# ----------------------------------------------------------------------------- train
def train_ner(cfg: Config, vocab: Vocab, train, dev, device, rank, world, log, name="ner", resume=None):
    """AdamW on the CRF NLL; batch and dropout RNG are functions of (seed, step), so a resume (load_ner_resume
    in main) equals an uninterrupted run. Every eval_every steps: dev F1 and a checkpoint; the model
    returned has the best dev F1 seen (selection on dev, never on test), also saved as {name}_best."""
    torch.manual_seed(cfg.seed)
    model = BiLSTMCRF(cfg, vocab).to(device)
    opt = make_adamw(model, cfg.lr, cfg.weight_decay, betas=(0.9, 0.999))
    first, best = 0, (-1.0, None)
    if resume is not None:
        weights, optim_state, first, meta, best_weights = resume
        model.load_state_dict(weights)
        opt.load_state_dict(optim_state)
        best = (float(meta.get("best_dev_f1", -1.0)), best_weights)
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    cuda = str(device).startswith("cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    end = min(cfg.steps, cfg.stop_at) if cfg.stop_at else cfg.steps
    tokens, losses = 0, []
    for step in tqdm(range(first, end), desc="NER", disable=None if rank == 0 else True):
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        idx = torch.randint(len(train), (cfg.batch_size,), generator=g)[rank::world].tolist()
        words, chars, tags, mask = vocab.encode([train[i] for i in idx], device)
        torch.manual_seed(cfg.seed * 7919 + step)  # dropout depends on the step only
        words = words.masked_fill((torch.rand(words.shape, device=device) < cfg.word_dropout) & mask, UNK)
        lr = lr_at(step, cfg.steps, cfg.lr, cfg.warmup, cfg.lr / 10)
        set_lr(opt, lr)
        model.train()
        with autocast:
            loss = net(words, chars, tags, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(loss.item())
        tokens += int(mask.sum()) * world
        evaluate_now = (step + 1) % cfg.eval_every == 0 or step + 1 == end
        if rank == 0 and (evaluate_now or (step + 1) % cfg.log_every == 0):
            extra = {"model_seed": cfg.seed}
            if evaluate_now:
                extra["dev_ner_f1"] = ner_f1(model, vocab, dev, device)
                if extra["dev_ner_f1"] > best[0]:
                    best = (extra["dev_ner_f1"], {k: v.clone() for k, v in model.state_dict().items()})
                    save_checkpoint(cfg.out_dir, model, None, cfg, step + 1, {"dev_ner_f1": best[0]},
                                    name + "_best")
                meta = dict(words=vocab.words, chars=vocab.chars, tags=vocab.tags, best_dev_f1=best[0])
                save_checkpoint(cfg.out_dir, model, opt, cfg, step + 1, meta, name)
            log(step + 1, sum(losses) / len(losses), lr, tokens, **extra)
            tokens, losses = 0, []
    if best[1] is not None:
        model.load_state_dict(best[1])
    model.eval()
    model.best_dev_f1 = best[0]
    return model


def train_rerankers(cfg: Config, queries, analysed, index: EntityIndex) -> tuple[dict, dict]:
    """The learned rerankers, each on the same dev queries with the same features, model and step budget:
    joint (k-best x candidates, NIL allowed), joint with NIL off, and learned EL on the NER 1-best (each of
    its spans learns its gold entity, or NIL when the span is wrong or the entity was not retrieved)."""
    gold_spans = [sorted((m.start, m.end, m.type) for m in q.entities) for q in queries]
    golds = [next(((hi, span_choices(h, q, index)) for hi, h in enumerate(hyps) if h.spans == spans), None)
             for q, hyps, spans in zip(queries, analysed, gold_spans, strict=True)]  # None: k-best misses it
    covered = [i for i, gc in enumerate(golds) if gc is not None]
    no_nil = [i for i in covered if all(golds[i][1])]  # without NIL a gold choice of NIL can't be learnt
    jobs = {"joint": (JointReranker(), [analysed[i] for i in covered], [golds[i] for i in covered]),
            "joint, NIL off": (JointReranker(allow_nil=False), [analysed[i] for i in no_nil],
                               [golds[i] for i in no_nil]),
            "learned EL": (JointReranker(), [hyps[:1] for hyps in analysed],
                           [(0, span_choices(hyps[0], q, index)) for q, hyps in zip(queries, analysed)])}
    rerankers, stats = {}, {"reranker_oracle_coverage": len(covered) / len(queries)}
    for name, (reranker, hyps, gold) in jobs.items():
        if not hyps:
            raise InputError(f"no training query for the {name} reranker: raise --n_rerank or --steps")
        torch.manual_seed(cfg.seed)
        batch, curve = pack(hyps, gold), []
        opt = make_adamw(reranker, cfg.rerank_lr, cfg.weight_decay, betas=(0.9, 0.999))
        for _ in range(cfg.rerank_steps):  # full batch: a few thousand queries fit at once
            loss = listwise_loss(reranker, batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(loss.item())
        rerankers[name] = reranker.eval()
        stats[name] = {"train_queries": len(hyps), "loss_first": curve[0], "loss_last": curve[-1]}
    return rerankers, stats


# ----------------------------------------------------------------------------- eval
def ner_kbest(model, vocab, queries, k: int, device, batch: int = 256):
    """[(paths (k, T) list, logps (k,) list)] per query."""
    model.eval()
    out = []
    for i in range(0, len(queries), batch):
        words, chars, _, mask = vocab.encode(queries[i:i + batch], device)
        paths, logps = model.kbest(words, chars, mask, k)
        out.extend(zip(paths.tolist(), logps.tolist(), strict=True))
    return out


def ner_f1(model, vocab, queries, device) -> float:
    pred = [bio_spans([vocab.tags[i] for i in paths[0][:len(q.tokens)]])
            for q, (paths, _) in zip(queries, ner_kbest(model, vocab, queries, 1, device), strict=True)]
    return span_f1_sets([bio_spans(q.tags) for q in queries], pred)


def analyse(model, vocab, queries, index, cfg, device) -> list[list[Hypothesis]]:
    """NER k-best + EL candidates of every span, per query."""
    return [build_hypotheses(q.tokens, paths, logps, vocab, index, cfg.m_candidates)
            for q, (paths, logps) in zip(queries, ner_kbest(model, vocab, queries, cfg.k_best, device),
                                         strict=True)]


SYSTEMS = ["pipeline", "learned EL", "joint", "joint, NIL off"]


def decoders(rerankers: dict) -> dict:
    """System name -> hypotheses -> (spans, {(start, end): entity index}). The pipelines see the 1-best."""
    return {"pipeline": decode_pipeline,
            "learned EL": lambda hyps: decode_joint(rerankers["learned EL"], hyps[:1]),
            "joint": lambda hyps: decode_joint(rerankers["joint"], hyps),
            "joint, NIL off": lambda hyps: decode_joint(rerankers["joint, NIL off"], hyps)}


def f1_counts(gold: list[set], pred: list[set]) -> np.ndarray:
    """Per query (true positives, gold, predicted): summed over queries they give conlleval's micro F1
    (span_f1_sets). (N, 3)"""
    counts = [(len(g & p), len(g), len(p)) for g, p in zip(gold, pred, strict=True)]
    return np.array(counts, dtype=float).reshape(-1, 3)


def micro_f1(counts: np.ndarray) -> np.ndarray:
    """(..., N, 3) per-query counts -> (...) micro F1 in percent."""
    tp, n_gold, n_pred = np.moveaxis(counts.sum(-2), -1, 0)
    return 200.0 * tp / np.maximum(n_gold + n_pred, 1)


def evaluate(cfg, model, vocab, queries, index, rerankers, device) -> dict:
    """metric -> system -> per-query counts (N, 3) on one test set: NER (start, end, type) spans and EL
    (start, end, entity id) triples; micro_f1 of the counts is span_f1_sets of the sets."""
    analysed = analyse(model, vocab, queries, index, cfg, device)
    gold_spans = [bio_spans(q.tags) for q in queries]
    gold_links = [{(m.start, m.end, m.entity_id) for m in q.entities if m.entity_id} for q in queries]
    out = {"NER span F1": {}, "EL F1": {}}
    for system, decode in decoders(rerankers).items():
        decoded = [decode(h) for h in analysed]
        out["NER span F1"][system] = f1_counts(gold_spans, [set(spans) for spans, _ in decoded])
        links = [{(s, e, index.entities[ei].id) for (s, e), ei in links.items()} for _, links in decoded]
        out["EL F1"][system] = f1_counts(gold_links, links)
    return out


def summarise(counts: dict, n_boot: int, seed: int) -> dict:
    """counts: system -> (seeds, N, 3). Per system the mean over seeds of micro F1 with a 95% bootstrap
    interval over test queries, and the joint model's deltas; every system and seed sees the same resample
    (a paired bootstrap). Returns system or delta name -> (value, low, high)."""
    n = next(iter(counts.values())).shape[1]
    resample = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=n_boot)  # (B, N) counts
    boot = {s: micro_f1(np.einsum("bn,snk->sbk", resample, c)[..., None, :]).mean(0)  # (B,)
            for s, c in counts.items()}
    point = {s: float(micro_f1(c).mean()) for s, c in counts.items()}
    for other in ("pipeline", "learned EL"):
        point[f"joint - {other}"] = point["joint"] - point[other]
        boot[f"joint - {other}"] = boot["joint"] - boot[other]
    return {s: (point[s], *np.percentile(boot[s], [2.5, 97.5]).tolist()) for s in point}


def latency(cfg, model, vocab, queries, index, rerankers, device) -> dict:
    """End-to-end ms per query (NER Viterbi + retrieval + decode), one query at a time: pipelines decode the
    1-best, the joint system the k-best. Systems take turns in a rotating order per query (load spikes hit all
    alike), latency_repeats passes; the first 20 timings are warm-up. -> system -> {median_ms, p95_ms}"""
    systems = {"pipeline": 1, "learned EL": 1, "joint": cfg.k_best}
    decode = decoders(rerankers)
    times = {s: [] for s in systems}
    for i, q in enumerate(queries * cfg.latency_repeats):
        for s in list(systems)[i % 3:] + list(systems)[:i % 3]:
            t0 = time.perf_counter()
            paths, logps = ner_kbest(model, vocab, [q], systems[s], device)[0]
            decode[s](build_hypotheses(q.tokens, paths, logps, vocab, index, cfg.m_candidates))
            times[s].append(1000.0 * (time.perf_counter() - t0))
    warm = min(20, len(queries) // 2)
    return {s: {"median_ms": float(np.median(t[warm:])), "p95_ms": float(np.percentile(t[warm:], 95))}
            for s, t in times.items()}


PAPER_DELTA = {"NER span F1": 3.13, "EL F1": 3.6}


def format_table(metrics) -> str:
    """The table (mean over seeds [95% bootstrap interval]) and the verdict on the paper's gains."""
    cell, delta = (lambda v, s=s: f"{v[0]:{s}.2f} [{v[1]:{s}.1f}, {v[2]:{s}.1f}]" for s in ("", "+"))
    lines = ["| test set | metric | " + " | ".join(SYSTEMS) + " | joint - pipeline | joint - learned EL "
             "| paper |", "| --- | --- |" + " ---: |" * 7]
    verdict = []
    for name, block in metrics["table"].items():
        for metric, row in block.items():
            cells = [cell(row[s]) for s in SYSTEMS] + [delta(row[f"joint - {s}"]) for s in SYSTEMS[:2]]
            lines.append(f"| {name} | {metric} | " + " | ".join(cells) + f" | up to +{PAPER_DELTA[metric]} |")
            value, low, high = row["joint - learned EL"]
            real = "a real gain (interval above 0)" if low > 0 else "no gain shown (interval reaches 0)"
            verdict.append(f"- {name}, {metric}: {value:+.2f} [{low:+.2f}, {high:+.2f}]: {real}")
    lines.append(f"\n{metrics['n_seeds']} seed(s); [95% bootstrap interval over test queries].\n"
                 "Verdict, joint - learned EL (the fair pipeline) vs the paper's +3.13 NER / +3.6 EL F1:\n"
                 + "\n".join(verdict))
    lines.append(f"\nEnd-to-end latency per query (NER + EL, {metrics['catalog_entities']} entities): "
                 + ", ".join(f"{s} median {v['median_ms']:.2f} ms / p95 {v['p95_ms']:.2f} ms"
                             for s, v in metrics["latency"].items()))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def load_ner_resume(cfg: Config, vocab: Vocab, name: str):
    """(weights, optimizer state, step, metadata, best-dev weights) for --resume; reads only."""
    weights, optim_state, step, meta = load_checkpoint(
        cfg.out_dir, cfg, name=name, may_differ=(  # what the NER training does not depend on
            "resume stop_at device log_every n_test test_noises k_best m_candidates tfidf_pool type_bonus "
            "rerank_steps rerank_lr n_seeds n_boot n_latency latency_repeats catalog").split())
    for key in ("words", "chars", "tags"):
        if json.loads(meta[key]) != getattr(vocab, key):
            raise InputError(f"--resume=True: {cfg.out_dir}/{name}.safetensors has another {key} vocabulary "
                             "than the training data")
    best_path = Path(cfg.out_dir) / f"{name}_best.safetensors"
    return weights, optim_state, step, meta, read_safetensors(best_path)[0] if best_path.is_file() else None


def run_builtin(cfg, sets, resumes, device, rank, world, log):
    """Per model seed: NER, then the rerankers, then every test set; the table pools the seeds (the same test
    queries) with paired bootstrap intervals, plus each test set's held-out-entity slice."""
    vocab, index = sets["vocab"], EntityIndex(sets["catalog"], cfg.tfidf_pool, cfg.type_bonus)
    tests = [name for name in sets if name.startswith("noise=")]
    counts, stats = {}, []  # test set -> metric -> system -> [per-seed (N, 3) counts]
    for i in range(cfg.n_seeds):
        seed_cfg = dataclasses.replace(cfg, seed=cfg.seed + i)  # model seed i; the data keep cfg.seed
        name = "ner" if i == 0 else f"ner_seed{seed_cfg.seed}"
        model = train_ner(seed_cfg, vocab, sets["train"], sets["rerank"][:300], device, rank, world, log,
                          name, resumes[i])
        if rank != 0:
            continue
        rerank_hyps = analyse(model, vocab, sets["rerank"], index, cfg, device)
        rerankers, stat = train_rerankers(seed_cfg, sets["rerank"], rerank_hyps, index)
        stats.append({"model_seed": seed_cfg.seed, "dev_ner_f1": model.best_dev_f1, **stat})
        for test in tests:
            for metric, row in evaluate(cfg, model, vocab, sets[test], index, rerankers, device).items():
                for system, c in row.items():
                    counts.setdefault(test, {}).setdefault(metric, {}).setdefault(system, []).append(c)
        if i == 0:
            rerank_modules = nn.ModuleDict({re.sub(r"\W+", "_", k): v for k, v in rerankers.items()})
            save_checkpoint(cfg.out_dir, rerank_modules, None, seed_cfg, cfg.steps, name="reranker")
            lat = latency(cfg, model, vocab, sets[tests[-1]][:cfg.n_latency], index, rerankers, device)
    if rank != 0:
        return None
    table, slices = {}, {}
    for test in tests:
        slices[test] = [j for j, q in enumerate(sets[test])
                        if any(m.entity_id in sets["heldout"] for m in q.entities)]
        everything = list(range(len(sets[test])))
        for rows, label in ((everything, test), (slices[test], f"{test}, held-out entities")):
            for metric, row in counts[test].items() if rows else ():
                stacked = {system: np.stack(c)[:, rows] for system, c in row.items()}  # (seeds, N, 3)
                table.setdefault(label, {})[metric] = summarise(stacked, cfg.n_boot, cfg.seed)
    return {"table": table, "latency": lat, "n_seeds": cfg.n_seeds, "catalog_entities": len(index.entities),
            "catalog_aliases": len(index.alias_text), "seeds": stats,
            "heldout_slice_queries": {t: len(r) for t, r in slices.items()}}


def run_user_data(cfg, sets, resumes, device, rank, world, log):
    """NER on JointBERT folders: train on train/, keep the best dev checkpoint, report span F1 on test/;
    with --catalog, the pipeline's links of the test queries (no gold ids there: written, not scored)."""
    vocab, test = sets["vocab"], sets["test"]
    model = train_ner(cfg, vocab, sets["train"], sets["dev"], device, rank, world, log, "ner", resumes[0])
    if rank != 0:
        return None
    oov = sum(vocab.word_id.get(w.lower(), UNK) == UNK for q in test for w in q.tokens)
    block = {"NER span F1 (1-best, best dev checkpoint)": ner_f1(model, vocab, test, device),
             "dev NER span F1 (best checkpoint)": model.best_dev_f1,
             "test words out of the vocabulary (%)": 100.0 * oov / sum(len(q.tokens) for q in test)}
    metrics = {"table": {f"{Path(cfg.data).name}/test": block}, "n_train": len(sets["train"]),
               "n_test": len(test)}
    if sets["catalog"]:
        index, lines = EntityIndex(sets["catalog"], cfg.tfidf_pool, cfg.type_bonus), []
        for q, (paths, logps) in zip(test, ner_kbest(model, vocab, test, 1, device), strict=True):
            _, links = decode_pipeline(build_hypotheses(q.tokens, paths, logps, vocab, index,
                                                        cfg.m_candidates))
            links = [dict(start=s, end=e, entity_id=index.entities[ei].id) for (s, e), ei in links.items()]
            lines.append(json.dumps({"tokens": q.tokens, "links": links}) + "\n")
        write_outputs(cfg.out_dir, {"links.jsonl": "".join(lines)})
        metrics["catalog_entities"] = len(index.entities)
    return metrics


def main(argv: list[str]) -> None:
    cfg = parse_config(argv)
    check_config(cfg)
    device, rank, world = setup_device(cfg.device)
    check_out_dir(cfg.out_dir)
    seed_everything(cfg.seed)
    t0 = time.time()
    if cfg.data:  # every input is read and checked here, before anything is written
        sets = voice.read_jointbert_root(cfg.data, cfg.catalog)
    else:  # the built-in benchmark: train / rerank / noise=<rate> test sets, catalogue, held-out entity ids
        sets = voice.benchmark_sets(cfg.seed, cfg.n_train, cfg.n_rerank, cfg.n_test, cfg.train_noises,
                                    cfg.test_noises)
    vocab = sets["vocab"] = Vocab.build(sets["train"], cfg.min_word_count)
    resumes = [None] * cfg.n_seeds
    for i in range(cfg.n_seeds if cfg.resume else 0):  # reads only; seed 0's checkpoint must exist
        seed_cfg = dataclasses.replace(cfg, seed=cfg.seed + i)
        name = "ner" if i == 0 else f"ner_seed{seed_cfg.seed}"
        if i == 0 or (Path(cfg.out_dir) / f"{name}.safetensors").is_file():
            resumes[i] = load_ner_resume(seed_cfg, vocab, name)
    if rank == 0:
        write_outputs(cfg.out_dir, {"config.json": cfg})
    n_params = sum(p.numel() for p in BiLSTMCRF(cfg, vocab).parameters())
    log = RunLog(cfg.out_dir, "tok", 6.0 * n_params, device, rank, world)  # ~6 FLOPs per weight and token
    metrics = (run_user_data if cfg.data else run_builtin)(cfg, sets, resumes, device, rank, world, log)
    if world > 1:
        dist.destroy_process_group()
    if rank != 0:
        return
    metrics["wall_s"] = time.time() - t0
    table = "\n".join(["| data | metric | value |", "| --- | --- | ---: |"] + [
        f"| {name} | {k} | {v:.2f} |" for name, block in metrics["table"].items() for k, v in block.items()]
                      ) if cfg.data else format_table(metrics)
    print(table)
    print(f"wall time {metrics['wall_s']:.0f} s on {device}")
    write_outputs(cfg.out_dir, {"metrics.json": metrics, "report.md": (
        f"# neu.py report\n\npreset `{cfg.preset}`, seed {cfg.seed}, device {device}, "
        f"wall time {metrics['wall_s']:.0f} s\n\n{table}\n")})


if __name__ == "__main__":
    run_main(main)
