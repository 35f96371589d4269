"""data/metrics.py against hand-computed values and its oracles (pycocoevalcap for CIDEr-D, conlleval's rules
for span F1). Each metric is written once; every script imports it from here."""
import pytest

from data import metrics, shapes


def test_object_scores_hand_computed():
    scene = shapes.make_scene("test", 3)
    present = [(o.color, o.shape) for o in scene.objects]
    colour, shape = present[0]
    absent_colour = next(c for c in shapes.COLORS if (c, shape) not in present)
    absent_shape = next(s for s in shapes.SHAPES if s not in {p[1] for p in present})
    text = f"a {colour} {shape}, a {absent_colour} {shape} and a {absent_shape}."
    got = metrics.object_scores(text, scene)
    assert got["mentions"] == 3 and got["hallucinated"] == 2
    assert got["precision"] == pytest.approx(1 / 3)
    objects = set(present)
    assert got["recall"] == pytest.approx(sum(s == shape and c in (colour, absent_colour) for c, s in objects)
                                          / len(objects))
    assert metrics.object_scores("nothing to see", scene) == dict(mentions=0, hallucinated=0, precision=1.0,
                                                                   recall=0.0)


@pytest.mark.parametrize("answer, parsed", [("Yes.", "yes"), ("no, there is none", "no"), ("YES", "yes"),
                                            ("There is a red star", None), ("", None), ("yesterday", None),
                                            ("maybe yes", None)])
def test_parse_yes_no(answer, parsed):
    assert metrics.parse_yes_no(answer) == parsed


# conlleval span F1 (the jitter engineer's tests): spans are exact (start, end, type); an I- tag that does
# not continue a span of its type starts a new one; F1 is micro over all sentences, in percent.
@pytest.mark.parametrize("tags, spans", [
    (["I-city", "I-city", "O"], {(0, 2, "city")}),  # I- without a B- starts a span
    (["B-city", "I-song"], {(0, 1, "city"), (1, 2, "song")}),  # I- of another type: a new span
    (["B-city", "B-city"], {(0, 1, "city"), (1, 2, "city")}),  # B- after B-: two spans
    (["O", "B-x", "I-x"], {(1, 3, "x")}),  # a span that runs to the end of the sentence
    (["O", "I-x", "O", "I-x", "I-x"], {(1, 2, "x"), (3, 5, "x")}),
    (["O", "O"], set()),
])
def test_bio_spans_conlleval_rules(tags, spans):
    assert metrics.bio_spans(tags) == spans


def test_span_f1_hand_computed():
    gold = [["B-city", "I-city", "O", "B-song"], ["B-contact", "O", "B-city"]]
    assert metrics.span_f1(gold, gold) == 100.0
    # 4 gold spans; predicted: city right, song typed as artist, contact right, city missed -> 3 predicted,
    # 2 correct: F1 = 2 * 2 / (4 + 3)
    pred = [["B-city", "I-city", "O", "B-artist"], ["B-contact", "O", "O"]]
    assert metrics.span_f1(gold, pred) == pytest.approx(400 / 7)
    # a wrong boundary is a miss and a false alarm at once: 1 correct of 2 gold, 2 predicted -> 50
    assert metrics.span_f1([["B-a", "I-a", "B-b"]], [["B-a", "O", "B-b"]]) == pytest.approx(50.0)
    # micro, not macro: sentence 1 perfect (1 span), sentence 2 all 3 missed -> 2 * 1 / (4 + 1) = 40, not 50
    gold, pred = [["B-a"], ["B-a", "B-b", "B-c"]], [["B-a"], ["O", "O", "O"]]
    assert metrics.span_f1(gold, pred) == pytest.approx(40.0)
    # an I- start in the prediction matches a gold B- span with the same extent (conlleval's reading)
    assert metrics.span_f1([["B-a", "I-a"]], [["I-a", "I-a"]]) == 100.0
    # no spans anywhere: 0, not a division by zero
    assert metrics.span_f1([["O", "O"]], [["O", "O"]]) == 0.0
    with pytest.raises(ValueError):  # gold and predictions must pair up
        metrics.span_f1([["O"]], [["O"], ["O"]])


def test_cider_d_matches_pycocoevalcap():
    """data.metrics.cider_d against pycocoevalcap's CiderScorer (the oracle) on random word soups, with an
    exact match and a candidate that shares no word with its references."""
    import numpy as np
    from pycocoevalcap.cider.cider_scorer import CiderScorer
    rng = np.random.default_rng(0)
    vocab = "a red blue green circle square star on the left right top of large small two".split()
    cands, refs = [], []
    for _ in range(12):
        refs.append([" ".join(rng.choice(vocab, rng.integers(4, 12))) for _ in range(rng.integers(1, 5))])
        cands.append(" ".join(rng.choice(vocab, rng.integers(1, 12))))
    cands[0] = refs[0][0]  # an exact match
    cands[1] = "zebra"  # no overlap
    scorer = CiderScorer(n=4, sigma=6.0)
    for c, r in zip(cands, refs):
        scorer += (c, r)
    want_mean, want = scorer.compute_score()
    got_mean, got = metrics.cider_d(cands, refs)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    assert abs(got_mean - want_mean) < 1e-9 and got[0] > 1.0 and got[1] == 0.0


def test_sentences_keep_decimals_and_the_unfinished_tail():
    assert metrics.sentences("It costs 3.5 dollars. A red circle!\nA blue") == [
        "It costs 3.5 dollars.", "A red circle!", "A blue"]
    assert metrics.sentences("  ...  ") == [] and metrics.sentences("Yes. . No?") == ["Yes.", "No?"]
