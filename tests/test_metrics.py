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
