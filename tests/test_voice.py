"""data/voice.py: determinism, disjoint splits, BIO / mention consistency, catalogues, JointBERT I/O."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from data import voice

SNIPS = Path(__file__).resolve().parent.parent.parent / "shared" / "realdata" / "snips"


def test_make_query_is_pure_and_varied():
    a, b = voice.make_query("train", 7, seed=3, noise=0.2), voice.make_query("train", 7, seed=3, noise=0.2)
    assert a == b
    texts = {" ".join(voice.make_query("train", i).tokens) for i in range(200)}
    assert len(texts) > 150  # many different utterances
    assert {voice.make_query("train", i).intent for i in range(300)} == set(voice.INTENTS)
    with pytest.raises(ValueError, match="split"):
        voice.make_query("valid", 0)


def test_splits_are_disjoint():
    clean = {s: {" ".join(q.clean_tokens) for q in voice.dataset(s, 300)} for s in voice.SPLITS}
    for a, b in (("train", "test"), ("train", "dev"), ("dev", "test")):
        assert not clean[a] & clean[b], (a, b)
    for s in voice.SPLITS:
        assert all(voice.split_of(t) == s for t in clean[s])


def test_tags_mentions_and_entities_agree():
    catalog = {e.id: e for e in voice.load_catalog()}
    n_changed = 0
    for q in voice.dataset("train", 400, noise=0.3):
        assert len(q.tokens) == len(q.tags) and voice.check_bio(q.tags) is None
        assert [(m.start, m.end, m.type) for m in q.entities] == voice.bio_spans(q.tags)
        for m in q.entities:
            assert m.surface == " ".join(q.tokens[m.start:m.end])
            assert catalog[m.entity_id].type == m.type
        assert voice.INTENT_DOMAIN[q.intent] == q.domain
        n_changed += q.tokens != q.clean_tokens
    assert n_changed > 150  # noise 0.3 corrupts most queries
    for q in voice.dataset("dev", 100, noise=0.0):  # no noise: what was said is what was heard
        assert q.tokens == q.clean_tokens
        for m in q.entities:  # and every mention is the entity's name or one of its aliases
            assert m.surface in [catalog[m.entity_id].name, *catalog[m.entity_id].aliases]


def test_asr_noise_keeps_every_mention():
    import random

    words, spans = "call john smith on mobile".split(), [-1, 0, 0, -1, -1]
    for k in range(200):
        heard, ids = voice.asr_noise(words, spans, 1.0, random.Random(k))
        assert 0 in ids and heard  # a mention keeps at least one word, the query is never empty
        assert len(heard) == len(ids) and set(ids) <= {-1, 0}


def test_catalog_real_and_generated():
    cat = voice.load_catalog()
    assert set(voice.ENTITY_TYPES) == {e.type for e in cat}
    by_name = {(e.type, e.name): e for e in cat}
    assert ("city", "tokyo") in by_name and ("city", "london") in by_name  # real geonames cities
    assert by_name[("country", "france")].id == "country:FR"  # real pycountry countries
    cities = [e for e in cat if e.type == "city"]
    assert by_name[("city", "tokyo")].popularity > min(e.popularity for e in cities)  # from population
    assert any("bombay" in e.aliases for e in cities if e.name == "mumbai")  # real alternate names
    assert len({e.id for e in cat}) == len(cat)
    assert all(0 < e.popularity <= 1 for e in cat)
    assert voice.load_catalog() == cat and voice.load_catalog(seed=1) != cat  # generated part depends on seed


def test_jointbert_round_trip(tmp_path):
    qs = voice.dataset("train", 50, noise=0.2)
    voice.write_jointbert(qs, tmp_path / "train")
    back = voice.read_jointbert(tmp_path / "train")
    assert [q.tokens for q in back] == [q.tokens for q in qs]
    assert [q.tags for q in back] == [q.tags for q in qs]
    assert [q.intent for q in back] == [q.intent for q in qs]
    assert [[(m.start, m.end, m.type, m.surface) for m in q.entities] for q in back] == \
           [[(m.start, m.end, m.type, m.surface) for m in q.entities] for q in qs]
    voice.write_jointbert(qs, tmp_path / "dom", label="domain")
    assert [q.intent for q in voice.read_jointbert(tmp_path / "dom")] == [q.domain for q in qs]


@pytest.mark.parametrize("broken, message", [
    ("drop_label_line", r"label:3: has 2 lines but seq.in has 3"),
    ("tag_count", r"seq.out:2: 2 tags for 3 tokens"),
    ("bad_bio", r"seq.out:1: bad BIO: tag 2 'I-city'"),
    ("bad_tag", r"seq.out:3: bad BIO: tag 1 'X-city'"),
])
def test_jointbert_malformed(tmp_path, broken, message):
    seq_in = ["weather in paris", "call john smith", "play hello"]
    seq_out = ["O O B-city", "O B-contact I-contact", "O B-song"]
    label = ["get_weather", "call_contact", "play_song"]
    if broken == "drop_label_line":
        label = label[:2]
    elif broken == "tag_count":
        seq_out[1] = "O B-contact"
    elif broken == "bad_bio":
        seq_out[0] = "O I-city O"
    else:
        seq_out[2] = "X-city O"
    for name, lines in (("seq.in", seq_in), ("seq.out", seq_out), ("label", label)):
        (tmp_path / name).write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        voice.read_jointbert(tmp_path)


def test_read_catalog_jsonl(tmp_path):
    ents = voice.load_catalog()[:5]
    voice.write_catalog_jsonl(ents, tmp_path / "cat.jsonl")
    assert voice.read_catalog_jsonl(tmp_path / "cat.jsonl") == ents
    lines = (tmp_path / "cat.jsonl").read_text().splitlines()
    lines[1] = json.dumps({"id": "x", "name": "y"})
    (tmp_path / "bad.jsonl").write_text("\n".join(lines))
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*missing key"):
        voice.read_catalog_jsonl(tmp_path / "bad.jsonl")
    (tmp_path / "bad2.jsonl").write_text(lines[0] + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad2.jsonl:2:"):
        voice.read_catalog_jsonl(tmp_path / "bad2.jsonl")


def test_corpus():
    texts = list(voice.corpus(20))
    assert len(texts) == 20 and all(isinstance(t, str) and t for t in texts)


def test_reads_snips_when_present():
    if not SNIPS.is_dir():
        pytest.skip("../shared/realdata/snips not present")
    qs = voice.read_jointbert(SNIPS / "test")
    assert len(qs) == 700 and qs[0].domain == "" and qs[0].intent
    assert all(m.entity_id is None for q in qs for m in q.entities)
    assert sum(len(q.entities) for q in qs) > 700


def test_benchmark_same_clean_queries_at_every_noise_rate():
    """benchmark_query fills from one RNG stream and corrupts from another: the clean query (words, intent,
    entities) is the same at every noise rate, and noise changes only what is heard."""
    for split in voice.SPLITS:
        for i in range(60):
            clean = voice.benchmark_query(split, i, seed=1, noise=0.0)
            assert clean.tokens == clean.clean_tokens
            for rate in (0.2, 0.4):
                noisy = voice.benchmark_query(split, i, seed=1, noise=rate)
                assert noisy.clean_tokens == clean.clean_tokens and noisy.intent == clean.intent
                assert [m.entity_id for m in noisy.entities] == [m.entity_id for m in clean.entities]
    heard = [voice.benchmark_query("test", i, noise=0.4) for i in range(100)]
    assert sum(q.tokens != q.clean_tokens for q in heard) > 50


def only_the_heldout_template_fits(intent: str, text: str) -> bool:
    """Whether `text` can only have come from the held-out (last) carrier template of its intent."""
    templates = next(d[intent] for d in voice.TEMPLATES.values() if intent in d)
    fits = [re.fullmatch(re.sub(r"\\\{\w+\\\}", "(.+)", re.escape(t)), text) is not None for t in templates]
    return fits[-1] and not any(fits[:-1])


def test_benchmark_is_harder_and_holds_out_what_test_only_sees():
    catalog = {e.id: e for e in voice.load_catalog()}
    train = [voice.benchmark_query("train", i) for i in range(600)]
    test = [voice.benchmark_query("test", i, noise=0.4) for i in range(600)]
    clean_test = [voice.benchmark_query("test", i) for i in range(600)]
    mentions = [(m, q) for q in clean_test for m in q.entities]
    said = [m.surface in [catalog[m.entity_id].name, *catalog[m.entity_id].aliases] for m, _ in mentions]
    assert 0.05 < 1 - sum(said) / len(said) < 0.4  # user errors at noise 0: not all are dictionary hits
    heldout = {i for i in catalog if voice.heldout_entity(i)}
    assert 0.05 < len(heldout) / len(catalog) < 0.15
    assert not any(m.entity_id in heldout for q in train for m in q.entities)
    assert sum(any(m.entity_id in heldout for m in q.entities) for q in clean_test) > 20
    only_heldout = lambda q: only_the_heldout_template_fits(q.intent, " ".join(q.clean_tokens))
    assert not any(only_heldout(q) for q in train) and sum(only_heldout(q) for q in clean_test) > 20
    # the test-only noise: words heard as two pieces, never in a training set at the same rate
    pieces = lambda qs: sum(len(q.tokens) > len(q.clean_tokens) for q in qs)
    noisy_train = [voice.benchmark_query("train", i, noise=0.4) for i in range(600)]
    assert pieces(test) > 20 and pieces(noisy_train) == 0


def test_benchmark_prior_is_not_the_popularity_feature():
    """Queries are drawn with popularity^2 times a fixed per-entity log-normal factor: the popularity a
    reranker sees is informative (rank correlation well above 0) but is not the sampling prior (below 1)."""
    ranks = lambda x: np.argsort(np.argsort(x))
    for etype in ("artist", "song", "contact", "country"):
        ents, cum = voice._bench_by_type(0, False)[etype]
        weights = np.diff([0.0, *cum])
        rho = np.corrcoef(ranks(weights), ranks([e.popularity for e in ents]))[0, 1]
        assert 0.6 < rho < 0.97, (etype, rho)


def test_asr_noise_substitutes_real_confusable_words():
    """The recogniser outputs words of its vocabulary: phonetic neighbours (same metaphone key), no
    non-words unless the non-word knob asks for them."""
    import random

    import jellyfish

    vocab = {w for ws in voice.recogniser_words().values() for w in ws}
    assert "whether" in voice.phonetic_neighbours("weather")  # a listed confusion and the same key
    for word in ("alarm", "paris", "john", "minutes"):
        near = voice.phonetic_neighbours(word)
        assert near and set(near) <= vocab and word not in near
        key = jellyfish.metaphone(word)  # they sound alike: the same metaphone key or one edit away
        assert max(jellyfish.levenshtein_distance(jellyfish.metaphone(w), key) for w in near) <= 1
    rng = random.Random(0)
    clean = [voice.make_query("train", i).tokens for i in range(300)]
    heard = [w for ws in clean for w in voice.asr_noise(ws, [-1] * len(ws), 0.3, rng)[0]]
    assert len(heard) > 1000 and all(w in vocab for w in heard)  # default: no non-words at all
    rng = random.Random(0)
    noisy = [w for ws in clean for w in voice.asr_noise(ws, [-1] * len(ws), 0.3, rng, nonword=0.5)[0]]
    assert 0.02 < sum(w not in vocab for w in noisy) / len(noisy) < 0.2  # the knob makes some
