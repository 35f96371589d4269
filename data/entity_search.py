"""Entity-linking candidate retrieval over a catalogue (neu.py): for a heard span, the top-m catalogue
entries by string evidence, with the features a reranker scores them by. No learned parameters: an index
over names and aliases (character 2/3-gram TF-IDF, phonetic keys, exact text), then edit similarity,
Jaro-Winkler and phonetic agreement on the pooled aliases, ordered by a hand-set score (the pipeline's)."""
from __future__ import annotations

import math
from collections import Counter

import jellyfish
import numpy as np
from rapidfuzz import fuzz

from data.voice import normalize


def char_ngrams(text: str, sizes=(2, 3)) -> Counter:
    padded = f" {text} "
    return Counter(padded[i:i + n] for n in sizes for i in range(len(padded) - n + 1))


def phonetic_keys(text: str) -> tuple[str, str]:
    """(metaphone, NYSIIS) of a phrase, word by word: spelling-independent sound keys."""
    words = text.split() or [""]
    return " ".join(jellyfish.metaphone(w) for w in words), " ".join(jellyfish.nysiis(w) for w in words)


LINK_FEATURES = ["tfidf", "edit", "jaro_winkler", "metaphone", "nysiis", "exact_alias", "popularity",
                 "type_agree", "n_candidates", "retrieval_rank", "retrieval_score"]


class EntityIndex:
    """Candidate retrieval over a catalogue's names and aliases.

    Stage 1: cosine of character 2/3-gram TF-IDF vectors (an inverted index of n-gram postings),
    plus every alias with the same phonetic key or the same text. Stage 2: edit similarity (rapidfuzz
    ratio), Jaro-Winkler and phonetic agreement on that pool; the best alias stands for its entity.
    """

    def __init__(self, entities, pool: int = 40, type_bonus: float = 0.15):
        self.entities, self.pool, self.type_bonus = entities, pool, type_bonus
        self.linkable_types = {e.type for e in entities}  # built once: a span of another type gets no link
        self.alias_text, owner = [], []
        for ei, e in enumerate(entities):
            for a in dict.fromkeys(normalize(s) for s in [e.name, *e.aliases]):
                if a:
                    self.alias_text.append(a)
                    owner.append(ei)
        self.alias_owner = np.array(owner)
        grams = [char_ngrams(text) for text in self.alias_text]
        n_alias, doc_freq = len(grams), Counter(g for gs in grams for g in gs)
        self.idf = {g: math.log((1 + n_alias) / (1 + d)) + 1.0 for g, d in doc_freq.items()}
        self.unseen_idf = math.log(1 + n_alias) + 1.0
        postings = {}  # n-gram -> (aliases holding it, their unit-length TF-IDF weight)
        for ai, gs in enumerate(grams):
            weights = {g: (1.0 + math.log(c)) * self.idf[g] for g, c in gs.items()}
            norm = math.sqrt(sum(w * w for w in weights.values()))
            for g, w in weights.items():
                postings.setdefault(g, ([], []))
                postings[g][0].append(ai)
                postings[g][1].append(w / norm)
        self.postings = {g: (np.array(a), np.array(w)) for g, (a, w) in postings.items()}
        self.by_key: dict[str, list[int]] = {}
        self.keys = [phonetic_keys(t) for t in self.alias_text]
        for ai, (text, keys) in enumerate(zip(self.alias_text, self.keys, strict=True)):
            for key in (f"t:{text}", f"m:{keys[0]}", f"n:{keys[1]}"):
                self.by_key.setdefault(key, []).append(ai)
        pops = np.array([max(e.popularity, 0.0) for e in entities], dtype=float)
        self.pop_feature = np.log1p(pops) / max(np.log1p(pops.max()), 1e-9)

    def tfidf(self, text: str) -> np.ndarray:
        """Cosine similarity of `text` to every alias. (N_alias,)"""
        grams = char_ngrams(text).items()
        query = {g: (1.0 + math.log(c)) * self.idf.get(g, self.unseen_idf) for g, c in grams}
        sims = np.zeros(len(self.alias_text))
        for g, w in query.items():
            if g in self.postings:
                aliases, weights = self.postings[g]
                sims[aliases] += weights * w  # an alias holds each n-gram once: no repeated index
        return sims / math.sqrt(sum(w * w for w in query.values()))

    def retrieve(self, text: str, span_type: str | None, m: int) -> list[tuple[int, np.ndarray]]:
        """Top-m (entity index, LINK_FEATURES vector) for a heard span, best first."""
        text = normalize(text)
        if not text or not self.alias_text:
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
            agree = float(self.entities[ei].type == span_type)
            feats = [*raw, self.pop_feature[ei], agree, n_cand, r / m, score]
            out.append((ei, np.array(feats, dtype=np.float32)))
        return out
