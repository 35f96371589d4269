"""Noise-robust named entity understanding (NEU) for voice assistants, in miniature.

Paper: "Noise Robust Named Entity Understanding for Voice Assistants", Muralidharan et al.,
NAACL 2021 Industry track, arXiv:2005.14408. NEU = named entity recognition (NER) + entity linking
(EL: resolve a heard span to its catalogue entry). The paper's point: a joint reranker that sees the
NER k-best hypotheses *and* the catalogue matches of their spans fixes errors of both (NER F1 up to
+3.13%, EL F1 up to +3.6% over the pipeline) and its features help downstream domain classification.

What runs here (our design where the paper gives no detail, see ../shared/papers/neu.md):
  1. NER: word + char-CNN BiLSTM-CRF over BIO tags, k-best Viterbi with sequence log-probs.
  2. EL retrieval per hypothesised span over real catalogues (data/voice.py: geonames cities with
     alternate names and population, pycountry countries, generated artists / songs / contacts):
     char n-gram TF-IDF cosine, phonetic keys (jellyfish metaphone / NYSIIS), edit similarity
     (rapidfuzz ratio, Jaro-Winkler); top-m candidates with their scores.
  3. Joint reranker over (NER hypothesis, one candidate or NIL per span), trained listwise (softmax
     cross-entropy over all joint hypotheses, computed exactly because the score decomposes over spans).
  4. Pipeline baseline: NER 1-best -> EL top-1. Downstream: domain classifier without / with NEU features.

Commands:
  python neu.py                                    # cpu preset (~5 min on 2 cores): the table below
  python neu.py --preset=smoke                     # tiny end-to-end run (tests)
  python neu.py --preset=gpu                       # one GPU (bf16 autocast for the BiLSTM)
  torchrun --standalone --nproc_per_node=4 neu.py --preset=gpu   # DDP for the NER training
  python neu.py --data=../shared/realdata/snips    # a user's JointBERT folders (train/ dev/ test/): NER F1
  python neu.py --data=DIR --catalog=cat.jsonl     # + pipeline entity links of the test queries -> links.jsonl

Prints, per test noise rate (0.0 = clean):
  | test set | metric | no NEU | pipeline | joint | delta (ours) | delta (paper) |
  NER span F1, EL acc (query: all links right), EL F1 (right span and right entity), domain accuracy,
then the entity-linking latency per query (median / p95 ms) with the catalogue size.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import os
import sys
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import jellyfish
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from rapidfuzz import fuzz
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from data import voice

# ----------------------------------------------------------------------------- config


@dataclass
class Config:
    data: str = ""  # JointBERT root with train/ dev/ test/ (a user's NER data); "" = built-in voice queries
    catalog: str = ""  # catalogue JSONL (id, name, aliases, type, popularity) linked against with --data
    n_train: int = 6000  # built-in NER training queries (split evenly over train_noises)
    n_rerank: int = 2000  # dev queries that train the joint reranker
    n_domain: int = 1500  # further dev queries that train the domain classifiers
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
    eval_every: int = 500  # steps between dev NER F1 evals and checkpoints
    stop_at: int = 0  # stop NER training after this step (0 = run to the end); --resume=True continues
    resume: bool = False  # continue NER training from out_dir/ner.safetensors
    k_best: int = 5  # NER hypotheses per query
    m_candidates: int = 8  # EL candidates per span
    tfidf_pool: int = 40  # aliases kept from the TF-IDF stage before edit / phonetic scoring
    type_bonus: float = 0.15  # retrieval bonus for a candidate of the span's NER type
    rerank_steps: int = 300  # full-batch AdamW steps of the joint reranker
    rerank_lr: float = 0.02  # reranker learning rate
    domain_steps: int = 300  # full-batch AdamW steps of each domain classifier
    peak_flops: float = 989e12  # accelerator peak (bf16 dense, H100) for the MFU log on CUDA
    compile: bool = False  # torch.compile the encoder (CUDA only)
    preset: str = ""  # smoke | cpu | gpu ("" = cpu without CUDA, gpu with it)
    out_dir: str = "out/neu"  # where config / logs / metrics / report / checkpoints go
    seed: int = 0  # seeds data order, init and dropout
    device: str = ""  # cpu | cuda | mps ("" = cuda when available)


PRESETS = {
    "smoke": dict(n_train=400, n_rerank=150, n_domain=150, n_test=100, test_noises=(0.0, 0.2), word_dim=32,
                  char_dim=16, char_channels=24, hidden=48, steps=80, lr=1e-2, warmup=10, log_every=20, eval_every=40,
                  k_best=3, m_candidates=5, rerank_steps=60, domain_steps=60),
    "cpu": {},
    "gpu": dict(n_train=40000, n_rerank=5000, n_domain=5000, n_test=3000, word_dim=128, char_channels=96,
                hidden=256, steps=6000, batch_size=128, lr=2e-3, warmup=300, eval_every=1000, k_best=8,
                m_candidates=10),
}
def _field_help() -> dict[str, str]:
    """field -> its one-line meaning, read from the comments in Config (so --help never drifts)."""
    lines = Path(__file__).read_text().splitlines()
    out = {}
    for line in lines:
        s = line.strip()
        if ":" in s and "  # " in s and s.split(":")[0] in Config.__dataclass_fields__:
            out[s.split(":")[0]] = s.split("  # ", 1)[1]
    return out


def parse_config(argv: list[str]) -> Config:
    """--key=value overrides (ast.literal_eval, type-checked against the default) on top of --preset."""
    pairs = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            helps = _field_help()
            print("usage: python neu.py [--key=value ...]\n")
            for f in dataclasses.fields(Config):
                print(f"  {'--' + f.name + '=' + repr(f.default):<34} {helps.get(f.name, '')}")
            sys.exit(0)
        if not arg.startswith("--") or "=" not in arg:
            raise ValueError(f"bad argument {arg!r}: expected --key=value (see --help)")
        key, value = arg[2:].split("=", 1)
        if key not in Config.__dataclass_fields__:
            raise ValueError(f"unknown config key {key!r} (see --help)")
        pairs[key] = value
    cfg = Config()
    preset = pairs.get("preset", "gpu" if torch.cuda.is_available() else "cpu")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose from {list(PRESETS)}")
    cfg = dataclasses.replace(cfg, preset=preset, **PRESETS[preset])
    for key, text in pairs.items():
        default = getattr(Config(), key)
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text if isinstance(default, str) else None  # bare strings need no quotes
            if value is None:
                raise ValueError(f"--{key}={text}: not a Python literal") from None
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(default, tuple) and isinstance(value, list | float | int):
            value = tuple(value) if isinstance(value, list) else (float(value),)
        if type(value) is not type(default):
            raise ValueError(f"--{key}={text}: expected {type(default).__name__}, got {type(value).__name__}")
        setattr(cfg, key, value)
    for rate in (*cfg.train_noises, *cfg.test_noises):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"noise rate {rate} outside [0, 1]")
    if cfg.k_best < 1 or cfg.m_candidates < 1 or cfg.steps < 1:
        raise ValueError("k_best, m_candidates and steps must be >= 1")
    if cfg.catalog and not cfg.data:
        raise ValueError("--catalog needs --data: the built-in queries link to the built-in catalogue")
    return cfg


# ----------------------------------------------------------------------------- data

PAD, UNK = 0, 1


@dataclass
class Vocab:
    words: list[str]
    chars: list[str]
    tags: list[str]  # "O" first, then B-/I- per type
    word_id: dict = field(init=False)
    char_id: dict = field(init=False)
    tag_id: dict = field(init=False)

    def __post_init__(self):
        self.word_id = {w: i for i, w in enumerate(self.words)}
        self.char_id = {c: i for i, c in enumerate(self.chars)}
        self.tag_id = {t: i for i, t in enumerate(self.tags)}

    @classmethod
    def build(cls, queries, min_count: int) -> Vocab:
        words = Counter(w.lower() for q in queries for w in q.tokens)
        chars = Counter(c for q in queries for w in q.tokens for c in w.lower())
        types = sorted({t[2:] for q in queries for t in q.tags if t != "O"})
        return cls(["<pad>", "<unk>"] + sorted(w for w, c in words.items() if c >= min_count),
                   ["<pad>", "<unk>"] + sorted(chars), ["O"] + [f"{p}-{t}" for t in types for p in "BI"])

    def metadata(self) -> dict[str, str]:
        """The vocabularies as safetensors metadata: a checkpoint is usable without the training data."""
        return {"words": json.dumps(self.words), "chars": json.dumps(self.chars), "tags": json.dumps(self.tags)}

    def encode(self, queries, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Padded (words (B, T), chars (B, T, W), tags (B, T), mask (B, T)); unseen tags -> O."""
        B, T = len(queries), max(len(q.tokens) for q in queries)
        W = max(len(w) for q in queries for w in q.tokens)
        words = torch.zeros(B, T, dtype=torch.long)
        chars = torch.zeros(B, T, W, dtype=torch.long)
        tags = torch.zeros(B, T, dtype=torch.long)
        for b, q in enumerate(queries):
            for t, (w, tag) in enumerate(zip(q.tokens, q.tags)):
                w = w.lower()
                words[b, t] = self.word_id.get(w, UNK)
                chars[b, t, :len(w)] = torch.tensor([self.char_id.get(c, UNK) for c in w])
                tags[b, t] = self.tag_id.get(tag, 0)
        mask = torch.arange(T).unsqueeze(0) < torch.tensor([len(q.tokens) for q in queries]).unsqueeze(1)
        return words.to(device), chars.to(device), tags.to(device), mask.to(device)


def builtin_queries(cfg: Config) -> dict[str, list]:
    """Train (noise mixture), reranker / domain sets (dev split) and one test set per noise rate.

    Each noise rate of a training set takes its own index range so no clean query repeats; the test
    sets share indices, so every rate corrupts the same clean queries.
    """
    def mixed(split, n, offset):
        per = max(1, n // len(cfg.train_noises))
        return [voice.make_query(split, offset + j * per + i, cfg.seed, rate)
                for j, rate in enumerate(cfg.train_noises) for i in range(per)]
    sets = {"train": mixed("train", cfg.n_train, 0), "rerank": mixed("dev", cfg.n_rerank, 0),
            "domain": mixed("dev", cfg.n_domain, cfg.n_rerank)}
    for rate in cfg.test_noises:
        sets[f"test@{rate}"] = voice.dataset("test", cfg.n_test, cfg.seed, rate)
    return sets


# ----------------------------------------------------------------------------- model


class CharCNN(nn.Module):
    """Per-word character CNN + max-pool: misspelt / merged words still share most character n-grams."""

    def __init__(self, n_chars: int, dim: int, channels: int):
        super().__init__()
        self.embed = nn.Embedding(n_chars, dim, padding_idx=PAD)
        self.conv = nn.Conv1d(dim, channels, kernel_size=3, padding=1)

    def forward(self, chars: torch.Tensor) -> torch.Tensor:
        B, T, W = chars.shape
        x = self.embed(chars.view(B * T, W)).transpose(1, 2)  # (B*T, C, W)
        x = self.conv(x).masked_fill((chars.view(B * T, 1, W) == PAD), -1e4)  # padding never wins the max
        return x.max(dim=2).values.clamp(min=-1.0).view(B, T, -1)  # (B, T, channels)


class Encoder(nn.Module):
    """Words + char-CNN -> BiLSTM -> per-tag emission scores."""

    def __init__(self, cfg: Config, vocab: Vocab):
        super().__init__()
        self.word_embed = nn.Embedding(len(vocab.words), cfg.word_dim, padding_idx=PAD)
        self.char_cnn = CharCNN(len(vocab.chars), cfg.char_dim, cfg.char_channels)
        self.lstm = nn.LSTM(cfg.word_dim + cfg.char_channels, cfg.hidden, batch_first=True, bidirectional=True)
        self.drop = nn.Dropout(cfg.dropout)
        self.emit = nn.Linear(2 * cfg.hidden, len(vocab.tags))

    def forward(self, words, chars, mask):
        x = self.drop(torch.cat([self.word_embed(words), self.char_cnn(chars)], dim=-1))  # (B, T, D)
        lengths = mask.sum(1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        h, _ = self.lstm(packed)
        h, _ = nn.utils.rnn.pad_packed_sequence(h, batch_first=True, total_length=words.shape[1])  # (B, T, 2H)
        return self.emit(self.drop(h))  # (B, T, L)


NEG = -1e4  # score of an illegal BIO transition (finite so that gradients stay clean)


def crf_log_partition(emissions, mask, trans, start, end) -> torch.Tensor:
    """log Z = log sum over all tag paths of exp(score): the forward algorithm. (B, T, L) -> (B,)."""
    alpha = start + emissions[:, 0]  # (B, L)
    exp_trans = trans.exp()  # lse_i(alpha_i + trans_ij) as a matmul in exp space: 10x faster than (B, L, L) lse
    for t in range(1, emissions.shape[1]):
        peak = alpha.max(dim=1, keepdim=True).values  # (B, 1): keeps exp() in range
        nxt = ((alpha - peak).exp() @ exp_trans).log() + peak + emissions[:, t]  # (B, L)
        alpha = torch.where(mask[:, t:t + 1], nxt, alpha)
    return torch.logsumexp(alpha + end, dim=1)


def crf_path_score(emissions, tags, mask, trans, start, end) -> torch.Tensor:
    """score(y) = start[y1] + sum_t emit[t, y_t] + sum_t trans[y_{t-1}, y_t] + end[y_T]. (B,)."""
    B, T, _ = emissions.shape
    emit = emissions.gather(2, tags.unsqueeze(2)).squeeze(2) * mask  # (B, T)
    step = trans[tags[:, :-1], tags[:, 1:]] * mask[:, 1:]  # (B, T-1)
    last = tags.gather(1, (mask.sum(1, keepdim=True) - 1)).squeeze(1)
    return start[tags[:, 0]] + emit.sum(1) + step.sum(1) + end[last]


def kbest_viterbi(emissions, mask, trans, start, end, k: int):
    """The k highest-scoring tag paths per sequence (list Viterbi): ((B, k, T) tags, (B, k) scores).

    Each (position, tag) keeps its k best partial paths; a step ranks the L*k extensions of each tag.
    Ranks a sequence cannot fill (fewer than k paths exist) come back with score -inf.
    """
    B, T, L = emissions.shape
    scores = emissions.new_full((B, L, k), float("-inf"))
    scores[:, :, 0] = start + emissions[:, 0]  # (B, L, k): score of the r-th best path ending in tag l
    keep_ptr = torch.arange(L * k, device=emissions.device).view(1, L, k).expand(B, L, k)
    pointers = []
    for t in range(1, T):
        ext = (scores.unsqueeze(2) + trans.view(1, L, L, 1)).permute(0, 2, 1, 3).reshape(B, L, L * k)  # (B, L', L*k)
        top, ptr = ext.topk(k, dim=2)  # pointer = prev_tag * k + prev_rank
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
        """Mean negative log-likelihood -log p(y|x) = log Z - score(y) (the CRF objective), in fp32."""
        emissions = self.encoder(words, chars, mask).float()
        trans, start, end = self.crf_params()
        return (crf_log_partition(emissions, mask, trans, start, end)
                - crf_path_score(emissions, tags, mask, trans, start, end)).mean()

    @torch.no_grad()
    def kbest(self, words, chars, mask, k: int):
        """k-best paths with log p(path | x) = score - log Z; illegal / missing ranks get -inf."""
        emissions = self.encoder(words, chars, mask).float()
        trans, start, end = self.crf_params()
        paths, scores = kbest_viterbi(emissions, mask, trans, start, end, k)
        logp = scores - crf_log_partition(emissions, mask, trans, start, end).unsqueeze(1)
        return paths, logp.masked_fill(scores < NEG / 2, float("-inf"))


# ----------------------------------------------------------------------------- entity retrieval


def char_ngrams(text: str, sizes=(2, 3)) -> Counter:
    padded = f" {text} "
    return Counter(padded[i:i + n] for n in sizes for i in range(len(padded) - n + 1))


def phonetic_keys(text: str) -> tuple[str, str]:
    """(metaphone, NYSIIS) of a phrase, word by word: spelling-independent sound keys."""
    words = text.split() or [""]
    return " ".join(jellyfish.metaphone(w) for w in words), " ".join(jellyfish.nysiis(w) for w in words)


LINK_FEATURES = ["tfidf", "edit", "jaro_winkler", "metaphone", "nysiis", "exact_alias", "popularity",
                 "type_agree", "n_candidates", "retrieval_rank", "retrieval_score"]
HYP_FEATURES = ["ner_logprob", "ner_top1", "ner_inv_rank", "n_spans", "n_unlinked"]


class EntityIndex:
    """Candidate retrieval over a catalogue's names and aliases.

    Stage 1: cosine of character 2/3-gram TF-IDF vectors (an inverted index; one bincount per query),
    plus every alias with the same phonetic key or the same text. Stage 2: edit similarity (rapidfuzz
    ratio), Jaro-Winkler and phonetic agreement on that pool; the best alias stands for its entity.
    """

    def __init__(self, entities, pool: int = 40, type_bonus: float = 0.15):
        self.entities, self.pool, self.type_bonus = entities, pool, type_bonus
        self.alias_text, owner = [], []
        for ei, e in enumerate(entities):
            for a in dict.fromkeys(voice.normalize(s) for s in [e.name, *e.aliases]):
                if a:
                    self.alias_text.append(a)
                    owner.append(ei)
        self.alias_owner = np.array(owner)
        N = len(self.alias_text)
        self.gram_id, rows, cols, tfs = {}, [], [], []
        for ai, text in enumerate(self.alias_text):
            for g, c in char_ngrams(text).items():
                rows.append(ai)
                cols.append(self.gram_id.setdefault(g, len(self.gram_id)))
                tfs.append(1.0 + math.log(c))
        rows, cols = np.array(rows), np.array(cols)
        df = np.bincount(cols, minlength=len(self.gram_id))
        self.idf = np.log((1 + N) / (1 + df)) + 1.0
        self.unseen_idf = math.log(1 + N) + 1.0
        w = np.array(tfs) * self.idf[cols]
        w /= np.sqrt(np.bincount(rows, weights=w * w, minlength=N))[rows]  # unit-length alias vectors
        order = np.argsort(cols, kind="stable")  # CSR by n-gram: postings[g] = aliases holding g
        self.post_alias, self.post_weight = rows[order], w[order]
        self.post_ptr = np.concatenate([[0], np.cumsum(df)])
        self.by_key: dict[str, list[int]] = {}
        self.keys = [phonetic_keys(t) for t in self.alias_text]
        for ai, (text, keys) in enumerate(zip(self.alias_text, self.keys)):
            for key in (f"t:{text}", f"m:{keys[0]}", f"n:{keys[1]}"):
                self.by_key.setdefault(key, []).append(ai)
        pops = np.array([max(e.popularity, 0.0) for e in entities], dtype=float)
        self.pop_feature = np.log1p(pops) / max(np.log1p(pops.max()), 1e-9) if len(pops) else pops

    def tfidf(self, text: str) -> np.ndarray:
        """Cosine similarity of `text` to every alias. (N_alias,)"""
        grams = char_ngrams(text)
        q_w, ids, weights = [], [], []
        for g, c in grams.items():
            gid = self.gram_id.get(g)
            qw = (1.0 + math.log(c)) * (self.idf[gid] if gid is not None else self.unseen_idf)
            q_w.append(qw)
            if gid is not None:
                lo, hi = self.post_ptr[gid], self.post_ptr[gid + 1]
                ids.append(self.post_alias[lo:hi])
                weights.append(self.post_weight[lo:hi] * qw)
        if not ids:
            return np.zeros(len(self.alias_text))
        sims = np.bincount(np.concatenate(ids), weights=np.concatenate(weights), minlength=len(self.alias_text))
        return sims / math.sqrt(sum(x * x for x in q_w))

    def retrieve(self, text: str, span_type: str | None, m: int) -> list[tuple[int, np.ndarray]]:
        """Top-m (entity index, LINK_FEATURES vector) for a heard span, best first."""
        text = voice.normalize(text)
        if not text:
            return []
        sims = self.tfidf(text)
        pool = set(np.argpartition(-sims, min(self.pool, len(sims) - 1))[:self.pool].tolist())
        meta, nysiis = phonetic_keys(text)
        for key in (f"t:{text}", f"m:{meta}", f"n:{nysiis}"):
            pool.update(self.by_key.get(key, [])[:self.pool])
        best: dict[int, tuple] = {}  # entity -> (retrieval score, raw features) of its best alias
        for ai in pool:
            alias = self.alias_text[ai]
            raw = (sims[ai], fuzz.ratio(text, alias) / 100.0, jellyfish.jaro_winkler_similarity(text, alias),
                   float(self.keys[ai][0] == meta), float(self.keys[ai][1] == nysiis), float(alias == text))
            # hand-set retrieval score (untuned): string evidence first, an exact alias always on top
            score = 0.35 * raw[0] + 0.35 * raw[1] + 0.1 * raw[2] + 0.1 * max(raw[3], raw[4]) + 0.5 * raw[5]
            ei = int(self.alias_owner[ai])
            if ei not in best or score > best[ei][0]:
                best[ei] = (score, raw)

        def rank_key(ei):  # type agreement and popularity only order, they do not replace, string evidence
            agree = self.entities[ei].type == span_type
            return best[ei][0] + self.type_bonus * agree + 0.01 * self.pop_feature[ei]
        ranked = sorted(best, key=rank_key, reverse=True)[:m]
        n_cand = math.log1p(len(best)) / math.log1p(self.pool + 3)  # ambiguity: ~1 when the pool is full
        out = []
        for r, ei in enumerate(ranked):
            score, raw = best[ei]
            feats = [*raw, self.pop_feature[ei], float(self.entities[ei].type == span_type), n_cand, r / m, score]
            out.append((ei, np.array(feats, dtype=np.float32)))
        return out


# ----------------------------------------------------------------------------- joint reranker


@dataclass
class Hypothesis:
    spans: list[tuple[int, int, str]]  # NER spans (start, end, type)
    features: np.ndarray  # HYP_FEATURES
    candidates: list[list[tuple[int, np.ndarray]]]  # per linkable span (in `linkable` order): retrieve()
    linkable: list[int]  # indices into spans whose type the catalogue holds


def hypothesis_features(logprob: float, rank: int, spans, n_unlinked: int) -> np.ndarray:
    return np.array([max(logprob, -30.0) / 10.0, float(rank == 0), 1.0 / (1 + rank), len(spans) / 3.0,
                     n_unlinked / 2.0], dtype=np.float32)


def build_hypotheses(tokens, paths, logps, vocab: Vocab, index: EntityIndex, m: int, cache: dict) -> list[Hypothesis]:
    """NER k-best (paths (k, T), logps (k,)) -> hypotheses with EL candidates for each linkable span."""
    linkable_types = {e.type for e in index.entities}
    hyps = []
    for rank, (path, logp) in enumerate(zip(paths, logps)):
        if logp == float("-inf"):
            continue
        tags = [vocab.tags[i] for i in path[:len(tokens)]]
        spans = voice.bio_spans(tags)
        linkable = [i for i, s in enumerate(spans) if s[2] in linkable_types]
        cands = []
        for i in linkable:
            s, e, t = spans[i]
            key = (s, e, t)
            if key not in cache:
                cache[key] = index.retrieve(" ".join(tokens[s:e]), t, m)
            cands.append(cache[key])
        n_unlinked = sum(1 for c in cands if not c)
        hyps.append(Hypothesis(spans, hypothesis_features(logp, rank, spans, n_unlinked), cands, linkable))
    return hyps


class JointReranker(nn.Module):
    """score(h, e) = w . phi(h) + sum over linkable spans s of g(psi(s, e_s)), with e_s a candidate or NIL.

    The paper's joint reranking module, our parametrisation: a linear NER-hypothesis term and a small MLP
    per (span, candidate) pair; NIL (no candidate is right) has a learned score.
    """

    def __init__(self, hidden: int = 32):
        super().__init__()
        self.hyp = nn.Linear(len(HYP_FEATURES), 1)
        self.link = nn.Sequential(nn.Linear(len(LINK_FEATURES), hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.nil = nn.Parameter(torch.zeros(1))

    def scores(self, batch):
        """Per hypothesis: total score with each span's candidates summed out (lse) or maxed out; choices."""
        f = self.hyp(batch["hyp_feats"]).squeeze(-1)  # (H,)
        g = self.link(batch["cand_feats"]).squeeze(-1).masked_fill(~batch["cand_mask"], float("-inf"))  # (S, C)
        g = torch.cat([self.nil.expand(g.shape[0], 1), g], dim=1)  # (S, 1 + C): column 0 = NIL
        lse = f.index_add(0, batch["span_hyp"], torch.logsumexp(g, dim=1))
        best, choice = g.max(dim=1)
        return g, lse, f.index_add(0, batch["span_hyp"], best), choice

    def loss(self, batch):
        """Listwise softmax CE over all joint hypotheses of a query: -log p(h*, e*) (exact, decomposed)."""
        g, lse, _, _ = self.scores(batch)
        q = batch["hyp_query"]
        n_q = int(q.max()) + 1
        peak = torch.full((n_q,), float("-inf")).scatter_reduce(0, q, lse, "amax").detach()
        log_z = peak + torch.zeros(n_q).index_add(0, q, torch.exp(lse - peak[q])).log()
        f = self.hyp(batch["hyp_feats"]).squeeze(-1)
        gold = f[batch["gold_hyp"]]
        gs = batch["gold_span"]  # spans of gold hypotheses, with their gold choice
        gold = gold.index_add(0, batch["gold_span_query"], g[gs, batch["gold_choice"]])
        return (log_z - gold).mean()


def pack(queries_hyps, gold=None):
    """Flatten many queries' hypotheses into tensors. gold[q] = (hyp index, [choice per linkable span])."""
    hyp_feats, hyp_query, span_hyp, cand_rows = [], [], [], []
    gold_hyp, gold_span, gold_choice, gold_span_query = [], [], [], []
    for qi, hyps in enumerate(queries_hyps):
        for hi, h in enumerate(hyps):
            h_id = len(hyp_feats)
            hyp_feats.append(h.features)
            hyp_query.append(qi)
            if gold is not None and gold[qi][0] == hi:
                gold_hyp.append(h_id)
            for si, cands in enumerate(h.candidates):
                if gold is not None and gold[qi][0] == hi:
                    gold_span.append(len(span_hyp))
                    gold_choice.append(gold[qi][1][si])
                    gold_span_query.append(qi)
                span_hyp.append(h_id)
                cand_rows.append(cands)
    C = max([len(c) for c in cand_rows] + [1])
    cand_feats = np.zeros((len(cand_rows), C, len(LINK_FEATURES)), dtype=np.float32)
    cand_mask = np.zeros((len(cand_rows), C), dtype=bool)
    for s, cands in enumerate(cand_rows):
        for c, (_, feats) in enumerate(cands):
            cand_feats[s, c], cand_mask[s, c] = feats, True
    long = lambda x: torch.tensor(x, dtype=torch.long)
    batch = dict(hyp_feats=torch.from_numpy(np.stack(hyp_feats)), hyp_query=long(hyp_query),
                 span_hyp=long(span_hyp), cand_feats=torch.from_numpy(cand_feats), cand_mask=torch.from_numpy(cand_mask))
    if gold is not None:
        batch.update(gold_hyp=long(gold_hyp), gold_span=long(gold_span), gold_choice=long(gold_choice),
                     gold_span_query=long(gold_span_query))
    return batch


def gold_choice_of(query, hyps, index: EntityIndex):
    """(hyp index, choice per linkable span) of the gold analysis, or None when the NER k-best misses it."""
    gold_spans = {(m.start, m.end, m.type): m.entity_id for m in query.entities}
    for hi, h in enumerate(hyps):
        if sorted(h.spans) == sorted(gold_spans):
            choices = []
            for si, cands in zip(h.linkable, h.candidates):
                ids = [index.entities[ei].id for ei, _ in cands]
                want = gold_spans[h.spans[si]]
                choices.append(ids.index(want) + 1 if want in ids else 0)  # 0 = NIL
            return hi, choices
    return None


def decode_pipeline(hyps, index):
    """NER 1-best -> EL top-1: (spans, {(start, end): entity index})."""
    if not hyps:
        return [], {}
    h = hyps[0]
    return h.spans, {h.spans[si][:2]: c[0][0] for si, c in zip(h.linkable, h.candidates) if c}


@torch.no_grad()
def decode_joint(reranker, hyps):
    """Best joint hypothesis: argmax_h [w.phi(h) + sum_s max_e g(s, e)], then each span's argmax."""
    if not hyps:
        return [], {}
    batch = pack([hyps])
    _, _, best, choice = reranker.scores(batch)
    h_id = int(best.argmax())
    h = hyps[h_id]
    rows = (batch["span_hyp"] == h_id).nonzero().flatten().tolist()
    links = {}
    for si, cands, row in zip(h.linkable, h.candidates, rows):
        c = int(choice[row])
        if c > 0:
            links[h.spans[si][:2]] = cands[c - 1][0]
    return h.spans, links


# ----------------------------------------------------------------------------- metrics


def span_f1(gold: list[set], pred: list[set]) -> float:
    """Micro F1 over exact (start, end, type) spans (conlleval-style), in percent."""
    tp = sum(len(g & p) for g, p in zip(gold, pred))
    n_pred, n_gold = sum(len(p) for p in pred), sum(len(g) for g in gold)
    return 200.0 * tp / max(n_pred + n_gold, 1)


def el_scores(gold_links: list[set], pred_links: list[set]) -> tuple[float, float]:
    """EL F1 over (start, end, entity id) triples and query accuracy (every link right), in percent."""
    acc = [g == p for g, p in zip(gold_links, pred_links) if g]
    return span_f1(gold_links, pred_links), 100.0 * sum(acc) / max(len(acc), 1)


def neu_features(spans, links, index: EntityIndex, types: list[str]) -> np.ndarray:
    """Downstream NEU features: NER span types present, linked entity types present, best linked popularity."""
    x = np.zeros(2 * len(types) + 1, dtype=np.float32)
    for _, _, t in spans:
        if t in types:
            x[types.index(t)] = 1.0
    for ei in links.values():
        x[len(types) + types.index(index.entities[ei].type)] = 1.0
        x[-1] = max(x[-1], index.pop_feature[ei])
    return x


# ----------------------------------------------------------------------------- training helpers


def setup_device(cfg: Config):
    ddp = "RANK" in os.environ
    if ddp:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            return torch.device("cuda", torch.cuda.current_device()), rank, world
        return torch.device("cpu"), rank, world
    name = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name), 0, 1


def lr_at(step: int, cfg: Config) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def make_optimizer(model: nn.Module, cfg: Config, lr: float | None = None):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr or cfg.lr)


def save_checkpoint(path: Path, model: nn.Module, opt, step: int, meta: dict) -> None:
    """Weights + AdamW moments in one safetensors file, written atomically (tmp, then rename)."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            for key, val in opt.state.get(p, {}).items():
                tensors[f"opt.{names[id(p)]}.{key}"] = torch.as_tensor(val).detach().cpu().reshape(-1 if key == "step" else val.shape).contiguous()
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"step": str(step), **{k: json.dumps(v) for k, v in meta.items()}})
    os.replace(tmp, path)


def load_checkpoint(path: Path, model: nn.Module, opt, cfg: Config, vocab: Vocab) -> int:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    saved = json.loads(meta["config"])
    for key in ("word_dim", "char_dim", "char_channels", "hidden", "data", "n_train", "train_noises", "seed"):
        if json.dumps(saved.get(key)) != json.dumps(getattr(cfg, key)):
            raise ValueError(f"{path}: checkpoint has {key}={saved.get(key)!r}, config has {getattr(cfg, key)!r}")
    for key in ("words", "chars", "tags"):
        if json.loads(meta[key]) != getattr(vocab, key):
            raise ValueError(f"{path}: checkpoint {key} vocabulary differs from the one built from the data")
    tensors = load_file(str(path))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    params = dict(model.named_parameters())
    for name, p in params.items():
        if f"opt.{name}.exp_avg" in tensors:
            opt.state[p] = {"step": tensors[f"opt.{name}.step"].reshape(()),
                            "exp_avg": tensors[f"opt.{name}.exp_avg"].to(p.device),
                            "exp_avg_sq": tensors[f"opt.{name}.exp_avg_sq"].to(p.device)}
    return int(meta["step"])


def train_ner(cfg, vocab, train, dev, device, rank, world, log):
    """AdamW on the CRF negative log-likelihood; batch and dropout RNG are functions of the step (exact resume)."""
    model = BiLSTMCRF(cfg, vocab).to(device)
    opt = make_optimizer(model, cfg)
    ckpt = Path(cfg.out_dir) / "ner.safetensors"
    step = load_checkpoint(ckpt, model, opt, cfg, vocab) if cfg.resume and ckpt.exists() else 0
    net = model
    if cfg.compile and device.type == "cuda":
        model.encoder = torch.compile(model.encoder)
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    n_params = sum(p.numel() for p in model.parameters())
    end = min(cfg.steps, cfg.stop_at) if cfg.stop_at else cfg.steps
    tokens, t0, losses = 0, time.time(), []
    bar = tqdm(range(step, end), initial=step, total=end, desc="NER", disable=rank != 0, leave=False)
    for step in bar:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        idx = torch.randint(len(train), (cfg.batch_size,), generator=g)[rank::world].tolist()
        words, chars, tags, mask = vocab.encode([train[i] for i in idx], device)
        torch.manual_seed(cfg.seed * 7919 + step)  # dropout depends on the step only
        if cfg.word_dropout > 0:
            drop = (torch.rand(words.shape, device=device) < cfg.word_dropout) & mask
            words = words.masked_fill(drop, UNK)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        model.train()
        with autocast:
            loss = net(words, chars, tags, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(loss.item())
        tokens += int(mask.sum()) * world
        if rank == 0 and ((step + 1) % cfg.log_every == 0 or step + 1 == end):
            dt = time.time() - t0
            rec = {"step": step + 1, "loss": sum(losses) / len(losses), "lr": lr_at(step, cfg), "tok_per_s": tokens / dt}
            if device.type == "cuda":
                rec["mfu"] = 6 * n_params * tokens / dt / cfg.peak_flops
            log(rec)
            bar.set_postfix(loss=f"{rec['loss']:.3f}")
            tokens, t0, losses = 0, time.time(), []
        if rank == 0 and ((step + 1) % cfg.eval_every == 0 or step + 1 == end):
            model.dev_f1 = ner_f1(model, vocab, dev, cfg, device)
            log({"step": step + 1, "dev_ner_f1": model.dev_f1})
            save_checkpoint(ckpt, model, opt, step + 1, {"config": dataclasses.asdict(cfg), "words": vocab.words,
                                                         "chars": vocab.chars, "tags": vocab.tags})
    model.eval()
    return model


def ner_kbest(model, vocab, queries, cfg, device, batch: int = 256):
    """[(paths (k, T) list, logps (k,) list)] per query."""
    model.eval()
    out = []
    for i in range(0, len(queries), batch):
        words, chars, _, mask = vocab.encode(queries[i:i + batch], device)
        paths, logps = model.kbest(words, chars, mask, cfg.k_best)
        out.extend(zip(paths.tolist(), logps.tolist()))
    return out


def ner_f1(model, vocab, queries, cfg, device) -> float:
    pred = []
    for q, (paths, _) in zip(queries, ner_kbest(model, vocab, queries, dataclasses.replace(cfg, k_best=1), device)):
        pred.append(set(voice.bio_spans([vocab.tags[i] for i in paths[0][:len(q.tokens)]])))
    return span_f1([set(voice.bio_spans(q.tags)) for q in queries], pred)


def fit(model: nn.Module, loss_fn, steps: int, lr: float, cfg: Config) -> list[float]:
    """Full-batch AdamW (decay on >=2-D params) for the small heads; returns the loss curve."""
    opt = make_optimizer(model, cfg, lr)
    curve = []
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        curve.append(loss.item())
    return curve


# ----------------------------------------------------------------------------- NEU evaluation


def analyse(model, vocab, queries, index, cfg, device, reranker=None):
    """NER k-best + retrieval per query; with a reranker also both decodes and the per-query EL latency."""
    out = []
    for q, (paths, logps) in zip(queries, ner_kbest(model, vocab, queries, cfg, device)):
        t0 = time.perf_counter()
        hyps = build_hypotheses(q.tokens, paths, logps, vocab, index, cfg.m_candidates, cache={})
        rec = {"hyps": hyps}
        if reranker is not None:
            rec["joint"] = decode_joint(reranker, hyps)
            rec["joint_ms"] = 1000 * (time.perf_counter() - t0)
            t0 = time.perf_counter()
            top = build_hypotheses(q.tokens, paths[:1], logps[:1], vocab, index, cfg.m_candidates, cache={})
            rec["pipeline"] = decode_pipeline(top, index)
            rec["pipeline_ms"] = 1000 * (time.perf_counter() - t0)
        out.append(rec)
    return out


def bag_of_words(queries, vocab) -> np.ndarray:
    x = np.zeros((len(queries), len(vocab.words)), dtype=np.float32)
    for i, q in enumerate(queries):
        for w in q.tokens:
            x[i, vocab.word_id.get(w.lower(), UNK)] = 1.0
    return x


def domain_inputs(queries, analysed, system, vocab, index, types):
    bow = bag_of_words(queries, vocab)
    if system == "no NEU":
        return torch.from_numpy(bow)
    neu = np.stack([neu_features(*a[system], index, types) for a in analysed])
    return torch.from_numpy(np.concatenate([bow, neu], axis=1))


def run_builtin(cfg, device, rank, world, log, out_dir):
    sets = builtin_queries(cfg)
    vocab = Vocab.build(sets["train"], cfg.min_word_count)
    model = train_ner(cfg, vocab, sets["train"], sets["rerank"][:300], device, rank, world, log)
    if rank != 0:
        return None
    catalog = voice.load_catalog(cfg.seed)
    t0 = time.time()
    index = EntityIndex(catalog, cfg.tfidf_pool, cfg.type_bonus)
    log({"catalog_entities": len(catalog), "catalog_aliases": len(index.alias_text), "index_build_s": time.time() - t0})

    # Joint reranker: listwise on dev queries whose gold NER analysis is among the k-best.
    rr_queries = sets["rerank"]
    rr = analyse(model, vocab, rr_queries, index, cfg, device)
    golds = [gold_choice_of(q, a["hyps"], index) for q, a in zip(rr_queries, rr)]
    usable = [i for i, g in enumerate(golds) if g is not None]
    torch.manual_seed(cfg.seed)
    reranker = JointReranker()
    batch = pack([rr[i]["hyps"] for i in usable], [golds[i] for i in usable])
    curve = fit(reranker, lambda: reranker.loss(batch), cfg.rerank_steps, cfg.rerank_lr, cfg)
    log({"reranker_train_queries": len(usable), "reranker_oracle_coverage": len(usable) / len(rr_queries),
         "reranker_loss_first": curve[0], "reranker_loss_last": curve[-1]})

    # Domain classifiers (no NEU / pipeline NEU / joint NEU features), trained on further dev queries.
    types = sorted({t[2:] for t in vocab.tags if t != "O"} | {e.type for e in catalog})
    dom_queries = sets["domain"]
    dom = analyse(model, vocab, dom_queries, index, cfg, device, reranker)
    labels = torch.tensor([voice.DOMAINS.index(q.domain) for q in dom_queries])
    systems = ["no NEU", "pipeline", "joint"]
    classifiers = {}
    for system in systems:
        x = domain_inputs(dom_queries, dom, system, vocab, index, types)
        torch.manual_seed(cfg.seed)
        clf = nn.Linear(x.shape[1], len(voice.DOMAINS))
        fit(clf, lambda clf=clf, x=x: F.cross_entropy(clf(x), labels), cfg.domain_steps, 0.05, cfg)
        classifiers[system] = clf

    table, latency = {}, {"pipeline": [], "joint": []}
    for rate in cfg.test_noises:
        queries = sets[f"test@{rate}"]
        res = analyse(model, vocab, queries, index, cfg, device, reranker)
        gold_spans = [set(voice.bio_spans(q.tags)) for q in queries]
        gold_links = [{(m.start, m.end, m.entity_id) for m in q.entities if m.entity_id} for q in queries]
        labels = torch.tensor([voice.DOMAINS.index(q.domain) for q in queries])
        block = {}
        for system in ("pipeline", "joint"):
            spans = [set(r[system][0]) for r in res]
            links = [{(s, e, catalog[ei].id) for (s, e), ei in r[system][1].items()} for r in res]
            el_f1, el_acc = el_scores(gold_links, links)
            block.setdefault("NER span F1", {})[system] = span_f1(gold_spans, spans)
            block.setdefault("EL acc", {})[system] = el_acc
            block.setdefault("EL F1", {})[system] = el_f1
            latency[system] += [r[f"{system}_ms"] for r in res]
        for system in systems:
            with torch.no_grad():
                pred = classifiers[system](domain_inputs(queries, res, system, vocab, index, types)).argmax(1)
            block.setdefault("domain acc", {})[system] = 100.0 * (pred == labels).float().mean().item()
        for row in block.values():
            row["delta"] = row["joint"] - row["pipeline"]
        table[f"noise={rate}"] = block
    lat = {s: {"median_ms": float(np.median(v)), "p95_ms": float(np.percentile(v, 95))} for s, v in latency.items()}
    metrics = {"table": table, "EL latency per query": lat, "catalog_entities": len(catalog),
               "catalog_aliases": len(index.alias_text), "reranker_oracle_coverage": len(usable) / len(rr_queries)}
    tensors = {f"ner.{k}": v.cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"reranker.{k}": v.contiguous() for k, v in reranker.state_dict().items()})
    for system, clf in classifiers.items():
        tensors.update({f"domain.{system.replace(' ', '_')}.{k}": v.contiguous() for k, v in clf.state_dict().items()})
    tmp = out_dir / "neu.tmp"
    save_file(tensors, str(tmp), metadata={"config": json.dumps(dataclasses.asdict(cfg)), **vocab.metadata()})
    os.replace(tmp, out_dir / "neu.safetensors")
    plot(table, out_dir / "neu.png")
    return metrics


PAPER_DELTA = {"NER span F1": "up to +3.13", "EL F1": "up to +3.6"}


def format_table(metrics, cfg) -> str:
    lines = ["| test set | metric | no NEU | pipeline | joint | delta (ours) | delta (paper) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, block in metrics["table"].items():
        for metric, row in block.items():
            no = f"{row['no NEU']:.2f}" if "no NEU" in row else ""
            lines.append(f"| {name} | {metric} | {no} | {row['pipeline']:.2f} | {row['joint']:.2f} | "
                         f"{row['delta']:+.2f} | {PAPER_DELTA.get(metric, '')} |")
    lat = metrics["EL latency per query"]
    lines.append(f"\nEL latency per query (catalogue: {metrics['catalog_entities']} entities, "
                 f"{metrics['catalog_aliases']} aliases; k={cfg.k_best}, m={cfg.m_candidates}): "
                 + ", ".join(f"{s} median {v['median_ms']:.2f} ms / p95 {v['p95_ms']:.2f} ms" for s, v in lat.items()))
    return "\n".join(lines)


def plot(table, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = [float(k.split("=")[1]) for k in table]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for ax, metric in zip(axes, ["NER span F1", "EL F1", "domain acc"]):
        for system in ("pipeline", "joint") + (("no NEU",) if metric == "domain acc" else ()):
            ax.plot(rates, [b[metric][system] for b in table.values()], marker="o", label=system)
        ax.set(title=metric, xlabel="ASR noise rate", ylabel="%")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- a user's data


def run_user_data(cfg, device, rank, world, log, out_dir):
    """NER on JointBERT folders: train on train/, report span F1 on test/ (1-best and k-best oracle)."""
    root = Path(cfg.data)
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise ValueError(f"{root}: expected JointBERT folders {root}/train and {root}/test")
    train, test = voice.read_jointbert(root / "train"), voice.read_jointbert(root / "test")
    dev = voice.read_jointbert(root / "dev") if (root / "dev").is_dir() else train[:300]
    catalog = voice.read_catalog_jsonl(cfg.catalog) if cfg.catalog else None
    vocab = Vocab.build(train, cfg.min_word_count)
    model = train_ner(cfg, vocab, train, dev, device, rank, world, log)
    if rank != 0:
        return None
    kb = ner_kbest(model, vocab, test, cfg, device)
    gold = [set(voice.bio_spans(q.tags)) for q in test]
    hyps = [[set(voice.bio_spans([vocab.tags[i] for i in p[:len(q.tokens)]])) for p, lp in zip(*r) if lp > float("-inf")]
            for q, r in zip(test, kb)]
    oracle = [max(h, key=lambda s, g=g: len(s & g) * 2 - len(s)) for h, g in zip(hyps, gold)]
    block = {"NER span F1 (1-best)": span_f1(gold, [h[0] for h in hyps]),
             f"NER span F1 (oracle of {cfg.k_best}-best)": span_f1(gold, oracle),
             "dev NER span F1 (1-best)": getattr(model, "dev_f1", None) or ner_f1(model, vocab, dev, cfg, device)}
    metrics = {"table": {f"{root.name}/test": block}, "n_train": len(train), "n_test": len(test)}
    if catalog is not None:  # no gold entity ids in a JointBERT folder: links are written, not scored
        index = EntityIndex(catalog, cfg.tfidf_pool, cfg.type_bonus)
        with open(out_dir / "links.jsonl", "w") as f:
            for q, (paths, logps) in zip(test, kb):
                spans, links = decode_pipeline(build_hypotheses(q.tokens, paths[:1], logps[:1], vocab, index,
                                                                cfg.m_candidates, {}), index)
                f.write(json.dumps({"tokens": q.tokens, "links": [
                    {"start": s, "end": e, "entity_id": catalog[ei].id} for (s, e), ei in links.items()]}) + "\n")
        metrics["catalog_entities"] = len(catalog)
    save_file({k: v.cpu().contiguous() for k, v in model.state_dict().items()}, str(out_dir / "ner_final.safetensors"),
              metadata={"config": json.dumps(dataclasses.asdict(cfg)), **vocab.metadata()})
    return metrics


def format_user_table(metrics) -> str:
    lines = ["| data | metric | value |", "| --- | --- | ---: |"]
    for name, block in metrics["table"].items():
        lines += [f"| {name} | {k} | {v:.2f} |" for k, v in block.items()]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def main(argv: list[str]) -> int:
    try:
        cfg = parse_config(argv)
    except ValueError as e:
        print(f"neu.py: error: {e}", file=sys.stderr)
        return 2
    device, rank, world = setup_device(cfg)
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        print(json.dumps(dataclasses.asdict(cfg)))
        (out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    log_file = open(out_dir / "log.jsonl", "a" if cfg.resume else "w") if rank == 0 else None

    def log(rec):
        if log_file:
            log_file.write(json.dumps(rec) + "\n")
            log_file.flush()

    t0 = time.time()
    try:
        metrics = (run_user_data if cfg.data else run_builtin)(cfg, device, rank, world, log, out_dir)
    except (ValueError, FileNotFoundError) as e:
        print(f"neu.py: error: {e}", file=sys.stderr)
        return 2
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()
    if rank != 0:
        return 0
    metrics["wall_s"] = time.time() - t0
    table = format_user_table(metrics) if cfg.data else format_table(metrics, cfg)
    print(table)
    print(f"wall time {metrics['wall_s']:.0f} s on {device}")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    (out_dir / "report.md").write_text(f"# neu.py report\n\npreset `{cfg.preset}`, seed {cfg.seed}, device {device}, "
                                       f"wall time {metrics['wall_s']:.0f} s\n\n{table}\n"
                                       + ("" if cfg.data else "\n![F1 vs noise](neu.png)\n"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
