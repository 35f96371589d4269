"""neu.py: CRF math against brute force, retrieval, reranker features and loss, end to end, bad input."""

import itertools
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import neu  # noqa: E402
from data import voice  # noqa: E402

SHARED = ROOT.parent / "shared"


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


def test_bio_constraint_gives_only_valid_hypotheses():
    vocab = neu.Vocab(["<pad>", "<unk>", "a"], ["<pad>", "<unk>", "a"], ["O", "B-city", "I-city", "B-song", "I-song"])
    torch.manual_seed(0)
    model = neu.BiLSTMCRF(neu.Config(word_dim=8, char_dim=4, char_channels=4, hidden=8), vocab)
    with torch.no_grad():
        model.transitions.normal_(0, 3)
    q = SimpleNamespace(tokens=["a"] * 4, tags=["O"] * 4)
    paths, logps = model.kbest(*[x for i, x in enumerate(vocab.encode([q], "cpu")) if i != 2], k=20)
    valid = [p for p, lp in zip(paths[0].tolist(), logps[0].tolist()) if lp > float("-inf")]
    assert len(valid) == 20 and all(voice.check_bio([vocab.tags[i] for i in p]) is None for p in valid)
    assert logps[0, 0] > logps[0, 1] and torch.exp(logps[0]).sum() <= 1.0 + 1e-6  # log-probs of distinct paths


def toy_catalog():
    E = lambda i, name, aliases, t, pop: SimpleNamespace(id=i, name=name, aliases=aliases, type=t, popularity=pop)
    return [E("contact:0", "bob smith", ["robert smith"], "contact", 0.5),
            E("contact:1", "rob smith", [], "contact", 1.0),
            E("city:0", "springfield", ["sprngfld"], "city", 0.8),
            E("city:1", "bombay", ["mumbai"], "city", 0.9),
            E("song:0", "bob smith blues", [], "song", 0.1)]


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
            assert top[0][1][neu.LINK_FEATURES.index("exact_alias")] == 1, alias
            owners = {cat[ei].id for ei, f in top if f[neu.LINK_FEATURES.index("exact_alias")] == 1}
            if sharing[voice.normalize(alias)] <= 5:  # "horizon" names many songs: only some fit in the top 5
                assert e.id in owners, (alias, e.id)


def test_reranker_features_on_hand_made_case():
    index = neu.EntityIndex(toy_catalog(), pool=10, type_bonus=0.15)
    cands = index.retrieve("bob smith", "contact", 3)
    feats = {index.entities[ei].id: dict(zip(neu.LINK_FEATURES, f.tolist())) for ei, f in cands}
    assert [index.entities[ei].id for ei, _ in cands][:2] == ["contact:0", "contact:1"]
    exact, near = feats["contact:0"], feats["contact:1"]
    assert exact["tfidf"] == pytest.approx(1.0, abs=1e-6) and exact["edit"] == 1.0 and exact["exact_alias"] == 1.0
    assert exact["metaphone"] == exact["nysiis"] == exact["type_agree"] == 1.0 and exact["retrieval_rank"] == 0.0
    assert exact["popularity"] == pytest.approx(math.log1p(0.5) / math.log1p(1.0), rel=1e-6)
    # "bob smith" vs "rob smith": Indel distance 2 over 18 characters -> ratio 16/18
    assert near["edit"] == pytest.approx(16 / 18, rel=1e-6) and near["exact_alias"] == 0.0
    assert near["popularity"] == pytest.approx(1.0) and near["retrieval_rank"] == pytest.approx(1 / 3)
    assert near["nysiis"] == 0.0  # BAB vs RAB
    if "song:0" in feats:
        assert feats["song:0"]["type_agree"] == 0.0
    n_pool = feats["contact:0"]["n_candidates"] * math.log1p(13)
    assert round(math.expm1(n_pool)) == len(index.entities)  # all 5 entities were in the pool of 10 aliases
    phi = neu.hypothesis_features(-2.5, 1, [(0, 1, "contact"), (2, 3, "city")], 1)
    assert phi.tolist() == pytest.approx([-0.25, 0.0, 0.5, 2 / 3, 0.5])


def test_listwise_loss_equals_enumerated_softmax():
    """The decomposed log-partition must equal a softmax over every (hypothesis, candidate-or-NIL) combination."""
    rng = np.random.default_rng(0)
    F = len(neu.LINK_FEATURES)
    cands = lambda n: [(i, rng.random(F).astype(np.float32)) for i in range(n)]
    hyp = lambda n_spans, n_c: neu.Hypothesis([(i, i + 1, "city") for i in range(n_spans)],
                                              rng.random(len(neu.HYP_FEATURES)).astype(np.float32),
                                              [cands(n_c) for _ in range(n_spans)], list(range(n_spans)))
    queries = [[hyp(2, 3), hyp(1, 2), hyp(0, 0)], [hyp(1, 1), hyp(2, 2)]]
    gold = [(1, [2]), (1, [0, 1])]
    torch.manual_seed(0)
    model = neu.JointReranker()
    torch.nn.init.normal_(model.nil, std=1.0)
    loss = model.loss(neu.pack(queries, gold))
    expected = []
    with torch.no_grad():
        for hyps, (gh, gc) in zip(queries, gold):
            totals, gold_total, best = [], None, (-math.inf, None, None)
            for hi, h in enumerate(hyps):
                f = model.hyp(torch.from_numpy(h.features)).item()
                options = [[model.nil.item()] + [model.link(torch.from_numpy(x)).item() for _, x in c] for c in h.candidates]
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


def test_metrics_by_hand():
    gold = [{(0, 1, "city"), (2, 4, "song")}, {(1, 2, "contact")}]
    pred = [{(0, 1, "city"), (2, 3, "song")}, {(1, 2, "contact"), (3, 4, "city")}]
    assert neu.span_f1(gold, pred) == pytest.approx(100 * 2 * 2 / (4 + 3))  # tp 2, 4 predicted, 3 gold
    f1, acc = neu.el_scores([{(0, 1, "a")}, {(1, 2, "b")}, set()], [{(0, 1, "a")}, {(1, 2, "c")}, {(0, 1, "x")}])
    assert f1 == pytest.approx(100 * 2 * 1 / 5) and acc == 50.0  # empty-gold queries do not count in acc


SMOKE = ["--preset=smoke", "--n_train=240", "--n_rerank=60", "--n_domain=60", "--n_test=40", "--steps=40",
         "--eval_every=20", "--log_every=10", "--test_noises=(0.0, 0.3)"]


def test_smoke_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert neu.main(SMOKE + [f"--out_dir={out}"]) == 0
    table = capsys.readouterr().out
    assert "| noise=0.3 | EL F1 |" in table and "EL latency per query" in table
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["catalog_entities"] == len(voice.load_catalog())
    for block in metrics["table"].values():
        for metric in ("NER span F1", "EL acc", "EL F1", "domain acc"):
            row = block[metric]
            assert 0.0 <= row["pipeline"] <= 100.0 and row["delta"] == pytest.approx(row["joint"] - row["pipeline"])
        assert block["NER span F1"]["joint"] > 20.0 and block["domain acc"]["no NEU"] > 40.0  # chance: 1/7
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < 0.6 * losses[0]
    rr = next(r for r in log if "reranker_loss_last" in r)
    assert rr["reranker_loss_last"] < 0.5 * rr["reranker_loss_first"]
    for name in ("config.json", "report.md", "neu.png", "ner.safetensors", "neu.safetensors"):
        assert (out / name).exists(), name


def test_checkpoint_resumes_exactly(tmp_path):
    """Interrupted at step 6 and resumed: the same weights as 12 steps in one go (batches, dropout, AdamW state)."""
    queries = voice.dataset("train", 64, noise=0.1)
    vocab = neu.Vocab.build(queries, 1)
    cfg = neu.Config(word_dim=8, char_dim=4, char_channels=6, hidden=8, steps=12, warmup=3, batch_size=8,
                     eval_every=6, log_every=6, out_dir=str(tmp_path / "a"))
    run = lambda c: neu.train_ner(c, vocab, queries, queries[:8], torch.device("cpu"), 0, 1, lambda rec: None)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    torch.manual_seed(0)
    whole = run(cfg)
    torch.manual_seed(0)
    run(neu.dataclasses.replace(cfg, out_dir=str(tmp_path / "b"), stop_at=6))
    torch.manual_seed(123)  # the resumed run must not depend on the init RNG
    resumed = run(neu.dataclasses.replace(cfg, out_dir=str(tmp_path / "b"), resume=True))
    a, b = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    moved = load_file(str(tmp_path / "b" / "ner.safetensors"))
    assert not torch.equal(moved["model.transitions"], torch.zeros_like(moved["model.transitions"]))
    with pytest.raises(ValueError, match="hidden"):  # a checkpoint of another shape is named, not half-loaded
        run(neu.dataclasses.replace(cfg, out_dir=str(tmp_path / "b"), resume=True, hidden=9))


def test_user_jointbert_folder_and_catalogue(tmp_path, capsys):
    for split, n in (("train", 200), ("test", 40)):
        voice.write_jointbert(voice.dataset(split, n, noise=0.1), tmp_path / "d" / split)
    voice.write_catalog_jsonl(voice.load_catalog(), tmp_path / "cat.jsonl")
    args = ["--preset=smoke", "--steps=60", f"--data={tmp_path / 'd'}", f"--catalog={tmp_path / 'cat.jsonl'}",
            f"--out_dir={tmp_path / 'out'}"]
    assert neu.main(args) == 0
    assert "NER span F1 (1-best)" in capsys.readouterr().out
    ids = {e.id for e in voice.load_catalog()}
    links = [json.loads(line) for line in (tmp_path / "out" / "links.jsonl").read_text().splitlines()]
    assert len(links) == 40 and sum(bool(r["links"]) for r in links) >= 10
    assert all(x["entity_id"] in ids and 0 <= x["start"] < x["end"] <= len(r["tokens"]) for r in links for x in r["links"])


@pytest.mark.parametrize("case", ["catalog", "seq_out", "key", "value"])
def test_bad_input_gives_one_line_error(tmp_path, capsys, case):
    voice.write_jointbert(voice.dataset("train", 5), tmp_path / "d" / "train")
    voice.write_jointbert(voice.dataset("test", 5), tmp_path / "d" / "test")
    cat = tmp_path / "cat.jsonl"
    cat.write_text('{"id": "a", "name": "x", "aliases": [], "type": "city", "popularity": 1}\n{"id": "b", "name": "y"}\n')
    args = ["--preset=smoke", f"--data={tmp_path / 'd'}", f"--catalog={cat}", f"--out_dir={tmp_path / 'o'}"]
    if case == "seq_out":
        cat.write_text("")
        seq_out = tmp_path / "d" / "test" / "seq.out"
        lines = seq_out.read_text().splitlines()
        lines[2] = "I-city " + lines[2].split(" ", 1)[1] if " " in lines[2] else "I-city"
        seq_out.write_text("\n".join(lines) + "\n")
    if case == "key":
        args.append("--hiden=3")
    if case == "value":
        args.append("--k_best=2.5")
    assert neu.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("neu.py: error:") and "\n" not in err
    expected = {"catalog": f"{cat}:2", "seq_out": "seq.out:3", "key": "'hiden'", "value": "--k_best=2.5"}[case]
    assert expected in err


@pytest.mark.skipif(not (SHARED / "realdata" / "snips" / "test").is_dir(), reason="../shared/realdata absent")
def test_snips_reads_and_trains(tmp_path):
    out = tmp_path / "snips"
    assert neu.main(["--preset=smoke", "--steps=3", f"--data={SHARED / 'realdata' / 'snips'}", f"--out_dir={out}"]) == 0
    block = json.loads((out / "metrics.json").read_text())["table"]["snips/test"]
    assert block["NER span F1 (oracle of 3-best)"] >= block["NER span F1 (1-best)"]
