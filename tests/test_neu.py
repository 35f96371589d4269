"""neu.py: CRF maths against brute force (and at large emission gaps), retrieval, the reranker loss against
an enumerated softmax, the joint model fixing a wrong NER 1-best, NIL, the bootstrap, resume, end to end,
and bad input refused before anything is written."""

import itertools
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import neu
from data import InputError, voice
from data.metrics import span_f1_sets

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"


def random_crf(B=4, T=5, L=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    emissions = torch.randn(B, T, L, generator=g, dtype=torch.float64)
    trans, start, end = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((L, L), (L,), (L,)))
    lengths = torch.tensor([T, 1, 3, T - 1][:B])
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    return emissions, mask, trans, start, end, lengths


def all_paths(emissions, trans, start, end, b, n):
    """Every tag path of sequence b (length n) with its score, best first: the brute force."""
    L = emissions.shape[2]
    out = []
    for path in itertools.product(range(L), repeat=n):
        s = start[path[0]] + end[path[-1]] + sum(emissions[b, t, y] for t, y in enumerate(path))
        s = s + sum(trans[path[t - 1], path[t]] for t in range(1, n))
        out.append((float(s), list(path)))
    return sorted(out, reverse=True)


def test_kbest_viterbi_equals_brute_force():
    emissions, mask, trans, start, end, lengths = random_crf()
    k = 7
    paths, scores = neu.kbest_viterbi(emissions, mask, trans, start, end, k)
    for b, n in enumerate(lengths.tolist()):
        brute = all_paths(emissions, trans, start, end, b, n)
        for r in range(k):
            if r < len(brute):  # 3**n paths exist
                assert scores[b, r].item() == pytest.approx(brute[r][0], abs=1e-9)
                assert paths[b, r, :n].tolist() == brute[r][1]
            else:  # length 1: only 3 paths, the other ranks are empty
                assert scores[b, r].item() == float("-inf")


def test_crf_log_partition_and_path_score_equal_brute_force():
    emissions, mask, trans, start, end, lengths = random_crf(seed=1)
    log_z = neu.crf_log_partition(emissions, mask, trans, start, end)
    for b, n in enumerate(lengths.tolist()):
        brute = all_paths(emissions, trans, start, end, b, n)
        assert log_z[b].item() == pytest.approx(math.log(sum(math.exp(s) for s, _ in brute)), abs=1e-9)
        best_path = torch.tensor(brute[0][1] + [0] * (emissions.shape[1] - n)).unsqueeze(0)
        score = neu.crf_path_score(emissions[b:b + 1], best_path, mask[b:b + 1], trans, start, end)
        assert score.item() == pytest.approx(brute[0][0], abs=1e-9)


@pytest.mark.parametrize("gap", [30.0, 110.0, 1000.0])
def test_crf_stays_finite_at_large_emission_gaps(gap):
    """A confident tagger (O far ahead at every word) under the BIO constraint (I-x only after B-x / I-x):
    log Z and the NLL gradient stay finite and exact in float32. The earlier exp-space forward underflowed
    the I-x column to log(0) and gave NaN gradients from a gap of about 100."""
    emissions, mask, trans, start, end, lengths = random_crf(seed=2)  # tags: O, B-x, I-x
    trans[0, 2] = start[2] = neu.NEG  # O -> I-x and a leading I-x are illegal, as in BiLSTMCRF.crf_params
    emissions = emissions.float()
    emissions[:, :, 0] += gap
    emissions.requires_grad_(True)
    tags = torch.tensor([1] + [2] * (emissions.shape[1] - 1)).expand(emissions.shape[:2])  # B-x I-x I-x ...
    nll = neu.crf_nll(emissions, tags, mask, trans.float(), start.float(), end.float())
    nll.backward()
    assert torch.isfinite(nll) and torch.isfinite(emissions.grad).all()
    log_z = neu.crf_log_partition(emissions.detach(), mask, trans.float(), start.float(), end.float())
    for b, n in enumerate(lengths.tolist()):
        brute = all_paths(emissions.detach().double(), trans, start, end, b, n)
        top = brute[0][0]  # log-sum-exp by hand, shifted so it can't overflow
        expected = top + math.log(sum(math.exp(s - top) for s, _ in brute))
        assert log_z[b].item() == pytest.approx(expected, abs=1e-3)


def tiny_config(**kw):
    sizes = {"word_dim": 8, "char_dim": 4, "char_channels": 4, "hidden": 8}
    return neu.dataclasses.replace(neu.Config(), **{**sizes, **kw})


def test_bio_constraint_gives_only_valid_hypotheses():
    vocab = neu.Vocab(["<pad>", "<unk>", "a"], ["<pad>", "<unk>", "a"],
                      ["O", "B-city", "I-city", "B-song", "I-song"])
    torch.manual_seed(0)
    model = neu.BiLSTMCRF(tiny_config(), vocab)
    with torch.no_grad():
        model.transitions.normal_(0, 3)
    q = SimpleNamespace(tokens=["a"] * 4, tags=["O"] * 4)
    words, chars, _, mask = vocab.encode([q], "cpu")
    paths, logps = model.kbest(words, chars, mask, k=20)
    valid = [p for p, lp in zip(paths[0].tolist(), logps[0].tolist()) if lp > float("-inf")]
    assert len(valid) == 20 and all(voice.check_bio([vocab.tags[i] for i in p]) is None for p in valid)
    assert logps[0, 0] > logps[0, 1] and torch.exp(logps[0]).sum() <= 1.0 + 1e-6  # distinct paths' log-probs


def toy_catalog():
    E = lambda i, name, aliases, t, p: SimpleNamespace(id=i, name=name, aliases=aliases, type=t, popularity=p)
    return [E("contact:0", "bob smith", ["robert smith"], "contact", 0.5),
            E("contact:1", "rob smith", [], "contact", 1.0),
            E("city:0", "springfield", ["sprngfld"], "city", 0.8),
            E("city:1", "bombay", ["mumbai"], "city", 0.9),
            E("song:0", "bob smith blues", [], "song", 0.1)]


def feature(feats, name):
    return feats[neu.LINK_FEATURES.index(name)]


def test_retrieval_finds_exact_alias_first():
    index = neu.EntityIndex(toy_catalog(), pool=10)
    assert index.retrieve("Mumbai", "city", 3)[0][0] == 3  # alias, not name, and case-folded
    assert index.retrieve("robert smith", None, 3)[0][0] == 0
    cat = voice.load_catalog()
    index = neu.EntityIndex(cat, pool=40)
    sharing = {}
    for x in cat:
        for a in {voice.normalize(s) for s in [x.name, *x.aliases]}:
            sharing[a] = sharing.get(a, 0) + 1
    for e in cat[::200]:
        for alias in [e.name, *e.aliases][:2]:
            top = index.retrieve(alias, e.type, 5)
            assert feature(top[0][1], "exact_alias") == 1, alias
            owners = {cat[ei].id for ei, f in top if feature(f, "exact_alias") == 1}
            if sharing[voice.normalize(alias)] <= 5:  # "horizon" names many songs: only some fit in the top 5
                assert e.id in owners, (alias, e.id)


def test_reranker_features_on_hand_made_case():
    index = neu.EntityIndex(toy_catalog(), pool=10, type_bonus=0.15)
    cands = index.retrieve("bob smith", "contact", 3)
    feats = {index.entities[ei].id: dict(zip(neu.LINK_FEATURES, f.tolist())) for ei, f in cands}
    assert [index.entities[ei].id for ei, _ in cands][:2] == ["contact:0", "contact:1"]
    exact, near = feats["contact:0"], feats["contact:1"]
    assert exact["tfidf"] == pytest.approx(1.0, abs=1e-6) and exact["edit"] == exact["exact_alias"] == 1.0
    assert exact["metaphone"] == exact["nysiis"] == exact["type_agree"] == 1.0
    assert exact["retrieval_rank"] == 0.0
    assert exact["popularity"] == pytest.approx(math.log1p(0.5) / math.log1p(1.0), rel=1e-6)
    # "bob smith" vs "rob smith": Indel distance 2 over 18 characters -> ratio 16/18
    assert near["edit"] == pytest.approx(16 / 18, rel=1e-6) and near["exact_alias"] == 0.0
    assert near["popularity"] == pytest.approx(1.0) and near["retrieval_rank"] == pytest.approx(1 / 3)
    assert near["nysiis"] == 0.0  # BAB vs RAB
    n_pool = feats["contact:0"]["n_candidates"] * math.log1p(13)
    assert round(math.expm1(n_pool)) == len(index.entities)  # all 5 entities were in the pool of 10 aliases
    tags = ["O", "B-contact", "I-contact", "B-num", "I-num"]
    vocab = neu.Vocab(["<pad>", "<unk>"], ["<pad>", "<unk>"], tags)
    hyps = neu.build_hypotheses(["call", "bob", "smith", "xx"], [[0, 1, 2, 3], [0, 0, 0, 0]], [-2.5, -3.0],
                                vocab, index, 3)
    assert hyps[0].spans == [(1, 3, "contact"), (3, 4, "num")] and hyps[0].linkable == [0]  # no num entity
    assert hyps[0].features.tolist() == pytest.approx([-0.25, 1.0, 1.0, 2 / 3, 0.0])
    assert hyps[1].spans == [] and hyps[1].features.tolist() == pytest.approx([-0.3, 0.0, 0.5, 0.0, 0.0])


def test_listwise_loss_equals_enumerated_softmax():
    """The decomposed log-partition equals a softmax over every (hypothesis, candidate-or-NIL) combination."""
    rng = np.random.default_rng(0)
    F = len(neu.LINK_FEATURES)
    cands = lambda n: [(i, rng.random(F).astype(np.float32)) for i in range(n)]
    hyp = lambda n_spans, n_c: neu.Hypothesis([(i, i + 1, "city") for i in range(n_spans)],
                                              rng.random(5).astype(np.float32),
                                              [cands(n_c) for _ in range(n_spans)], list(range(n_spans)))
    queries = [[hyp(2, 3), hyp(1, 2), hyp(0, 0)], [hyp(1, 1), hyp(2, 2)]]
    gold = [(1, [2]), (1, [0, 1])]
    torch.manual_seed(0)
    model = neu.JointReranker()
    torch.nn.init.normal_(model.nil, std=1.0)
    loss = neu.listwise_loss(model, neu.pack(queries, gold))
    expected = []
    with torch.no_grad():
        for hyps, (gh, gc) in zip(queries, gold):
            totals, gold_total, best = [], None, (-math.inf, None, None)
            for hi, h in enumerate(hyps):
                f = model.hyp(torch.from_numpy(h.features)).item()
                options = [[model.nil.item()] + [model.link(torch.from_numpy(x)).item() for _, x in c]
                           for c in h.candidates]
                for choice in itertools.product(*[range(len(o)) for o in options]):
                    total = f + sum(o[c] for o, c in zip(options, choice))
                    totals.append(total)
                    best = max(best, (total, hi, choice))
                    if hi == gh and list(choice) == gc:
                        gold_total = total
            expected.append(math.log(sum(math.exp(t) for t in totals)) - gold_total)
            spans, links = neu.decode_joint(model, hyps)  # decode = the argmax of the same joint scores
            _, hi, choice = best
            assert spans == hyps[hi].spans
            assert links == {hyps[hi].spans[s][:2]: c - 1 for s, c in enumerate(choice) if c > 0}
    assert loss.item() == pytest.approx(sum(expected) / len(expected), rel=1e-5)


CASE_TAGS = ["O", "B-contact", "I-contact", "B-song", "I-song"]


def case(tokens, paths, logps, gold_spans, index):
    """Hand-made NER k-best for one query, with a gold analysis: (query, hypotheses)."""
    vocab = neu.Vocab(["<pad>", "<unk>"], ["<pad>", "<unk>"], CASE_TAGS)
    hyps = neu.build_hypotheses(tokens, paths, logps, vocab, index, 3)
    mentions = [voice.Mention(s, e, t, i, " ".join(tokens[s:e])) for s, e, t, i in gold_spans]
    return SimpleNamespace(tokens=tokens, entities=mentions), hyps


def train_on_cases(index):
    """A joint reranker and a learned-EL reranker trained on cases where the NER 1-best sometimes calls a
    contact a song (then only the 2nd hypothesis finds an exact, type-agreeing catalogue match), and where a
    heard span matches nothing (gold: NIL)."""
    contact, song, other = [0, 1, 2], [0, 3, 4], [0, 0, 0]
    data = []
    for logps in ([-0.3, -1.5, -3.0], [-0.5, -1.0, -3.0], [-0.2, -2.0, -3.0]):
        data.append(case(["call", "robert", "smith"], [song, contact, other], logps,
                         [(1, 3, "contact", "contact:0")], index))  # wrong 1-best
        data.append(case(["play", "bob", "smith"], [contact, song, other], logps,
                         [(1, 3, "contact", "contact:0")], index))  # right 1-best
        data.append(case(["call", "zork", "quux"], [contact, song, other], logps,
                         [(1, 3, "contact", None)], index))  # nothing in the catalogue: NIL
    queries, analysed = zip(*data)
    cfg = neu.dataclasses.replace(neu.Config(), rerank_steps=200, rerank_lr=0.05)
    return neu.train_rerankers(cfg, list(queries), list(analysed), index)[0]


def test_joint_reranker_fixes_a_wrong_ner_1best_and_answers_nil():
    index = neu.EntityIndex(toy_catalog(), pool=10)
    rerankers = train_on_cases(index)
    decode = neu.decoders(rerankers)
    paths = [[0, 3, 4], [0, 1, 2], [0, 0, 0]]  # song, contact, nothing
    _, hyps = case(["ring", "robert", "smith"], paths, [-0.4, -1.2, -3.0], [], index)
    assert hyps[0].spans == [(1, 3, "song")]  # the NER 1-best is wrong ...
    assert decode["pipeline"](hyps)[0] == decode["learned EL"](hyps)[0] == [(1, 3, "song")]  # kept
    spans, links = decode["joint"](hyps)  # ... and the joint reranker takes the 2nd hypothesis and its link
    assert spans == [(1, 3, "contact")] and index.entities[links[(1, 3)]].id == "contact:0"
    _, junk = case(["phone", "zork", "quux"], paths[1::-1] + paths[2:], [-0.2, -2.0, -3.0], [], index)
    assert junk[0].candidates[0], "retrieval returns some weak candidate for any span"
    assert decode["joint"](junk) == ([(1, 3, "contact")], {})  # NIL: no link rather than a wrong one
    assert decode["learned EL"](junk)[1] == {}
    assert decode["pipeline"](junk)[1] and decode["joint, NIL off"](junk)[1]  # without NIL: a wrong link


def test_f1_counts_and_bootstrap():
    gold = [{(0, 1, "city"), (2, 4, "song")}, {(1, 2, "contact")}, set()]
    pred = [{(0, 1, "city"), (2, 3, "song")}, {(1, 2, "contact"), (3, 4, "city")}, set()]
    counts = neu.f1_counts(gold, pred)
    assert counts.tolist() == [[1, 2, 2], [1, 1, 2], [0, 0, 0]]
    assert neu.micro_f1(counts) == pytest.approx(span_f1_sets(gold, pred)) == pytest.approx(100 * 4 / 7)
    rng = np.random.default_rng(0)
    good = np.stack([rng.integers(0, 2, 300), np.ones(300), np.ones(300)], 1)[None]  # (1 seed, N, 3)
    better = good.copy()
    better[0, :30, 0] = 1  # 30 more hits on the same queries
    out = neu.summarise({"pipeline": good, "learned EL": good, "joint": better}, 500, 0)
    for name, (value, low, high) in out.items():
        assert low <= value <= high, name
    assert out["joint - learned EL"][0] == pytest.approx(out["joint"][0] - out["learned EL"][0])
    assert out["joint - learned EL"][1] > 0  # paired: the 30 extra hits are never resampled away
    assert out["joint"][1] < out["learned EL"][0]  # while the unpaired intervals overlap
    both = np.concatenate([good, better])  # two seeds: the point value is their mean
    two_seeds = neu.summarise({"pipeline": both, "learned EL": good, "joint": better}, 100, 0)
    assert two_seeds["pipeline"][0] == pytest.approx((out["learned EL"][0] + out["joint"][0]) / 2)


def test_checkpoint_resumes_exactly(tmp_path):
    """Stopped at step 6 and resumed: the weights of 12 steps in one go (batches, dropout, AdamW state)."""
    queries = voice.dataset("train", 64, noise=0.1)
    vocab = neu.Vocab.build(queries, 1)
    cfg = tiny_config(char_channels=6, steps=12, warmup=3, batch_size=8, eval_every=6, log_every=6)
    quiet = lambda *args, **kw: None
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    run = lambda c, resume=None: neu.train_ner(c, vocab, queries, queries[:8], "cpu", 0, 1, quiet, "ner",
                                               resume)
    whole = run(neu.dataclasses.replace(cfg, out_dir=str(tmp_path / "a")))
    part = neu.dataclasses.replace(cfg, out_dir=str(tmp_path / "b"), stop_at=6)
    run(part)
    torch.manual_seed(123)  # the resumed run must not depend on the init RNG
    resumed_cfg = neu.dataclasses.replace(cfg, out_dir=str(tmp_path / "b"), resume=True)
    resumed = run(resumed_cfg, neu.load_ner_resume(resumed_cfg, vocab, "ner"))
    a, b = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(InputError, match="hidden=8 .now 9"):  # another shape is named, not half-loaded
        neu.load_ner_resume(neu.dataclasses.replace(resumed_cfg, hidden=9), vocab, "ner")
    with pytest.raises(InputError, match="words vocabulary"):
        neu.load_ner_resume(resumed_cfg, neu.Vocab.build(queries[:10], 1), "ner")


SMOKE = ["--preset=smoke", "--n_train=300", "--n_rerank=100", "--n_test=60", "--steps=60", "--eval_every=30",
         "--log_every=10", "--test_noises=0.0,0.3"]


def test_smoke_end_to_end(tmp_path, capsys):
    torch.set_num_threads(1)
    out = tmp_path / "run"
    neu.main(SMOKE + [f"--out_dir={out}"])
    table = capsys.readouterr().out
    assert "| noise=0.3 | EL F1 |" in table and "End-to-end latency per query" in table and "Verdict" in table
    metrics = json.loads((out / "metrics.json").read_text())
    block = metrics["table"]["noise=0.0"]
    assert set(block["EL F1"]) == {*neu.SYSTEMS, "joint - pipeline", "joint - learned EL"}
    assert block["NER span F1"]["pipeline"][0] > 50.0  # the tagger learned (an untrained one scores ~0)
    assert metrics["table"]["noise=0.3"]["NER span F1"]["pipeline"][0] < block["NER span F1"]["pipeline"][0]
    assert sum(metrics["heldout_slice_queries"].values()) > 0
    assert "noise=0.3, held-out entities" in metrics["table"]
    assert set(metrics["latency"]) == {"pipeline", "learned EL", "joint"}
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [10, 20, 30, 40, 50, 60] and log[-1]["loss"] < 0.6 * log[0]["loss"]
    assert {"step", "loss", "lr", "tok_s", "dev_ner_f1"} <= set(log[2])
    for name, stats in metrics["seeds"][0].items():
        if isinstance(stats, dict):
            assert stats["loss_last"] < 0.7 * stats["loss_first"], name
    for name in ("config.json", "report.md", "ner.safetensors", "ner.optimizer.safetensors",
                 "ner_best.safetensors", "reranker.safetensors"):
        assert (out / name).exists(), name


def test_user_jointbert_folder_and_catalogue(tmp_path, capsys):
    for split, n in (("train", 200), ("test", 40)):
        voice.write_jointbert(voice.dataset(split, n, noise=0.1), tmp_path / "d" / split)
    voice.write_catalog_jsonl(voice.load_catalog(), tmp_path / "cat.jsonl")
    neu.main(["--preset=smoke", "--steps=60", f"--data={tmp_path / 'd'}",
              f"--catalog={tmp_path / 'cat.jsonl'}", f"--out_dir={tmp_path / 'out'}"])
    assert "NER span F1 (1-best, best dev checkpoint)" in capsys.readouterr().out
    ids = {e.id for e in voice.load_catalog()}
    links = [json.loads(line) for line in (tmp_path / "out" / "links.jsonl").read_text().splitlines()]
    assert len(links) == 40 and sum(bool(r["links"]) for r in links) >= 10
    assert all(x["entity_id"] in ids and 0 <= x["start"] < x["end"] <= len(r["tokens"])
               for r in links for x in r["links"])


BAD_CATALOGUES = {
    "bad line": ('{"id": "a", "name": "x", "aliases": [], "type": "city", "popularity": 1}\n'
                 '{"id": "b", "name": "y"}\n', "cat.jsonl:2: bad catalogue line"),
    "empty": ("\n", "cat.jsonl: no entities"),
    "duplicate id": ('{"id": "a", "name": "x", "aliases": [], "type": "city", "popularity": 1}\n' * 2,
                     "cat.jsonl:2: id 'a' repeats line 1"),
    "no shared type": ('{"id": "a", "name": "x", "aliases": [], "type": "planet", "popularity": 1}\n',
                       "share none with the entity types"),
}


@pytest.mark.parametrize("case_name", [*BAD_CATALOGUES, "seq_out", "key", "value", "n_test", "noise"])
def test_bad_input_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch, case_name):
    voice.write_jointbert(voice.dataset("train", 5), tmp_path / "d" / "train")
    voice.write_jointbert(voice.dataset("test", 5), tmp_path / "d" / "test")
    cat = tmp_path / "cat.jsonl"
    text, expected = BAD_CATALOGUES.get(case_name, (BAD_CATALOGUES["bad line"][0], None))
    cat.write_text(text)
    args = ["--preset=smoke", f"--data={tmp_path / 'd'}", f"--catalog={cat}", f"--out_dir={tmp_path / 'o'}"]
    if case_name == "seq_out":
        cat.write_text(BAD_CATALOGUES["duplicate id"][0].splitlines()[0])
        seq_out = tmp_path / "d" / "test" / "seq.out"
        lines = seq_out.read_text().splitlines()
        lines[2] = "I-city " + lines[2].split(" ", 1)[1] if " " in lines[2] else "I-city"
        seq_out.write_text("\n".join(lines) + "\n")
        expected = "seq.out:3"
    extra = {"key": ("--hiden=3", "--hiden: unknown config key"), "value": ("--k_best=2.5", "--k_best=2.5"),
             "n_test": ("--n_test=-5", "--n_test=-5: expected a whole number >= 1"),
             "noise": ("--test_noises=0.0,1.5", "--test_noises=0.0,1.5: expected rates")}
    if case_name in extra:
        args.append(extra[case_name][0])
        expected = extra[case_name][1]
    monkeypatch.setattr(sys, "argv", ["neu.py", *args])
    with pytest.raises(SystemExit) as exit_info:
        neu.run_main(neu.main)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.startswith("neu.py: error:") and "\n" not in err
    assert expected in err
    assert not (tmp_path / "o").exists()  # refused before the first training step and before any write


@pytest.mark.skipif(not (SHARED / "realdata" / "snips" / "test").is_dir(), reason="../shared/realdata absent")
def test_snips_reads_and_trains(tmp_path):
    out = tmp_path / "snips"
    neu.main(["--preset=smoke", "--steps=3", f"--data={SHARED / 'realdata' / 'snips'}", f"--out_dir={out}"])
    block = json.loads((out / "metrics.json").read_text())["table"]["snips/test"]
    assert 0 < block["test words out of the vocabulary (%)"] < 50
