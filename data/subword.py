"""fastText-style subword vectors (Bojanowski et al. 2017) for jitter.py's "fasttext" input: skip-gram
with negative sampling over word + hashed character n-gram vectors, trained on unlabelled text, and a
reader for pre-trained .vec files. Words unseen in that text still get a vector from their n-grams, which
is what makes these vectors robust to ASR misspellings."""
from __future__ import annotations

import zlib

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data import InputError


def char_ngrams(word: str, n_buckets: int, min_n: int = 3, max_n: int = 5) -> list[int]:
    """fastText's subwords: hashed character n-grams of "<word>" (a stable hash, not Python's salted one)."""
    w = f"<{word}>"
    return [zlib.crc32(w[i: i + n].encode()) % n_buckets for n in range(min_n, max_n + 1)
            for i in range(len(w) - n + 1)]


def train_subword_vectors(sentences: list[list[str]], words_needed: list[str], dim: int, epochs: int = 2,
                          window: int = 3, negatives: int = 5, buckets: int = 20000, seed: int = 0,
                          device: str = "cpu") -> dict[str, torch.Tensor]:
    """Skip-gram with negative sampling over word + character n-gram vectors (fastText, Bojanowski et al.
    2017).

    Loss per (center, context) pair: -log s(u_c . v_o) - sum_k log s(-u_c . v_k), u_c = mean of the
    center word's vector and its n-gram vectors. Returns vectors for `words_needed`, unseen words included
    (their n-grams carry the meaning, which is what makes these vectors robust to ASR misspellings).
    """
    torch.manual_seed(seed)  # the tables' init draws from the global generator
    g = torch.Generator().manual_seed(seed)
    vocab = {w: i for i, w in enumerate(dict.fromkeys(w for s in sentences for w in s))}
    counts = np.zeros(len(vocab))
    for s in sentences:
        for w in s:
            counts[vocab[w]] += 1
    nb, pad = buckets, buckets + len(vocab)

    def subwords(words):  # (V, G) rows of the input table: the word's own row + its n-gram rows, padded
        rows = [[nb + vocab[w]] if w in vocab else [] for w in words]
        rows = [r + char_ngrams(w, nb) for r, w in zip(rows, words)]
        g_max = max(len(r) for r in rows)
        return torch.tensor([r + [pad] * (g_max - len(r)) for r in rows])

    sub = subwords(list(vocab)).to(device)
    # sparse: a step touches few rows
    emb_in = nn.Embedding(pad + 1, dim, padding_idx=pad, sparse=True).to(device)
    nn.init.uniform_(emb_in.weight, -0.5 / dim, 0.5 / dim)
    emb_out = nn.Embedding(len(vocab), dim, sparse=True).to(device)
    nn.init.zeros_(emb_out.weight)
    centers, contexts = [], []
    for s in sentences:  # all (center, context) pairs within the window
        ids = [vocab[w] for w in s]
        for k in range(1, window + 1):
            centers += ids[:-k] + ids[k:]
            contexts += ids[k:] + ids[:-k]
    centers, contexts = torch.tensor(centers), torch.tensor(contexts)
    neg_dist = torch.tensor(counts**0.75, dtype=torch.float)
    opt = torch.optim.SparseAdam(list(emb_in.parameters()) + list(emb_out.parameters()), lr=0.01)
    bs = 1024
    for _ in range(epochs):
        perm = torch.randperm(len(centers), generator=g)
        for i in range(0, len(perm), bs):
            idx = perm[i: i + bs]
            c_sub = sub[centers[idx].to(device)]  # (B, G)
            u = emb_in(c_sub).sum(1) / (c_sub != pad).sum(1, keepdim=True)  # (B, D)
            pos = emb_out(contexts[idx].to(device))  # (B, D)
            neg = emb_out(torch.multinomial(neg_dist, len(idx) * negatives, True, generator=g)
                          .view(len(idx), -1).to(device))  # (B, K, D)
            loss = -F.logsigmoid((u * pos).sum(-1)).mean()
            loss = loss - F.logsigmoid(-(neg @ u.unsqueeze(-1))).sum(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        s = subwords(words_needed).to(device)
        vecs = emb_in(s).sum(1) / (s != pad).sum(1, keepdim=True).clamp(min=1)
    return {w: v.cpu() for w, v in zip(words_needed, vecs)}


def read_vec(path: str, words_needed: list[str], dim: int) -> dict:
    """A fastText / word2vec text .vec file (header "n dim", then "word v1 ... vdim"); words not in it are
    absent from the result. A bad line is an InputError naming file:line."""
    need, out = set(words_needed), {}
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                parts = raw.decode("utf-8").rstrip().split(" ")
                if lineno == 1 and len(parts) == 2:
                    continue
                if len(parts) != dim + 1:
                    raise ValueError(f"{len(parts) - 1} numbers")
                if parts[0] in need:
                    out[parts[0]] = torch.tensor([float(x) for x in parts[1:]])
            except ValueError as e:  # UnicodeDecodeError is a ValueError too
                raise InputError(f"{path}:{lineno}: expected a word and {dim} numbers (--d_model={dim}), "
                                 f"got {e}") from None
    return out
