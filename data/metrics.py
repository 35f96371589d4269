"""Metrics that score answers against the world, written once for every script and tested against their
oracles (tests/test_metrics.py): CIDEr-D (pycocoevalcap), object mentions and hallucination against the
scene graph (CHAIR-style), POPE yes/no parsing, and conlleval span F1."""
from __future__ import annotations

import math
import re
from collections import Counter

from .shapes.text import hallucinations, object_mentions


def words(text: str) -> list[str]:
    """Lower-cased alphanumeric words: the stand-in for the PTB tokenizer of pycocoevalcap (no Java here)."""
    return re.findall(r"[a-z0-9]+", text.lower())


def sentences(text: str) -> list[str]:
    """Sentences: pieces ending at . ! ? before whitespace (or at a line end; an unfinished tail is one too),
    each with a letter or digit ("3.5" stays whole)."""
    return [s for s in re.split(r"(?<=[.!?])\s+|\n+", text.strip()) if re.search(r"[A-Za-z0-9]", s)]


def cider_d(candidates: list[str], references: list[list[str]], n: int = 4, sigma: float = 6.0):
    """CIDEr-D (Vedantam et al. 2015) as pycocoevalcap computes it: per n-gram order, the cosine between
    TF-IDF vectors of candidate and each reference (candidate counts clipped at the reference's), times a
    Gaussian penalty on the length difference; mean over orders and references, x 10. IDF comes from the
    references of this set; like pycocoevalcap, 'length' is the bigram count. Texts go through words().
    Returns (corpus mean, per-item scores); 1.0 is what captioning papers print as "CIDEr 100"."""
    def grams(text):
        w = words(text)
        return Counter(tuple(w[i:i + k]) for k in range(1, n + 1) for i in range(len(w) - k + 1))

    cands = [grams(c) for c in candidates]
    refs = [[grams(r) for r in rs] for rs in references]
    doc_freq = Counter(g for rs in refs for g in set().union(*rs))
    log_n_docs = math.log(max(len(refs), 1))

    def tfidf(counts):
        vec = [{} for _ in range(n)]
        for g, tf in counts.items():
            vec[len(g) - 1][g] = tf * (log_n_docs - math.log(max(1.0, doc_freq[g])))
        norms = [math.sqrt(sum(x * x for x in v.values())) for v in vec]
        return vec, norms, sum(tf for g, tf in counts.items() if len(g) == 2)

    scores = []
    for cand, rs in zip(cands, refs, strict=True):
        vc, nc, lc = tfidf(cand)
        total = 0.0
        for r in rs:
            vr, nr, lr = tfidf(r)
            penalty = math.exp(-((lc - lr) ** 2) / (2 * sigma ** 2))
            for k in range(n):
                dot = sum(min(x, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, x in vc[k].items())
                total += (dot / (nc[k] * nr[k]) if nc[k] and nr[k] else 0.0) * penalty / n
        scores.append(10.0 * total / len(rs))
    return (sum(scores) / len(scores) if scores else 0.0), scores


def object_scores(text: str, scene) -> dict:
    """CHAIR-style scores of one free description against its scene graph. Mentions are shapes.object_mentions
    ((colour or None, shape) per shape word). hallucinated: mentions of objects the scene lacks (CHAIR-i's
    numerator); precision = 1 - hallucinated / mentions (1.0 with no mention); recall: share of the scene's
    (colour, shape) objects mentioned with a matching or no colour."""
    mentions = object_mentions(text)
    wrong = hallucinations(text, scene)
    present = {(o.color, o.shape) for o in scene.objects}
    found = [any(s == shape and c in (None, colour) for c, s in mentions) for colour, shape in present]
    return dict(mentions=len(mentions), hallucinated=len(wrong),
                precision=1.0 - len(wrong) / len(mentions) if mentions else 1.0,
                recall=sum(found) / max(len(found), 1))


def parse_yes_no(text: str) -> str | None:
    """POPE answer parsing: 'yes' or 'no' when the answer's first word is one of them, else None (the
    "unparseable" bucket, never counted as yes)."""
    first = words(text)[:1]
    return first[0] if first and first[0] in ("yes", "no") else None


def bio_spans(tags: list[str]) -> set[tuple[int, int, str]]:
    """(start, end, type) spans of a BIO sequence, as conlleval reads them: an I- tag that does not continue
    a span of its type starts a new one."""
    spans, start, typ = set(), None, None
    for i, t in enumerate([*tags, "O"]):
        if start is not None and not (t.startswith("I-") and t[2:] == typ):
            spans.add((start, i, typ))
            start = None
        if t.startswith("B-") or (t.startswith("I-") and start is None):
            start, typ = i, t[2:]
    return spans


def span_f1_sets(gold: list[set], pred: list[set]) -> float:
    """Micro F1 in percent over exact (start, end, type) spans, summed over sentences (conlleval's FB1)."""
    tp = sum(len(g & p) for g, p in zip(gold, pred, strict=True))
    n_gold, n_pred = sum(len(g) for g in gold), sum(len(p) for p in pred)
    return 200.0 * tp / max(n_gold + n_pred, 1)


def span_f1(gold: list[list[str]], pred: list[list[str]]) -> float:
    """conlleval span F1 (percent) of BIO tag sequences."""
    return span_f1_sets([bio_spans(g) for g in gold], [bio_spans(p) for p in pred])
