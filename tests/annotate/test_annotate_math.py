"""Answers, aggregation and agreement on fixed examples (no database)."""

import pytest

from preftune.annotate.aggregate import majority
from preftune.annotate.agreement import cohen_kappa, krippendorff_alpha
from preftune.annotate.answers import AnswerError, comparisons, form_values, parse_answer, summary


def test_pairwise_answer_is_stored_in_canonical_order_with_the_shown_order_beside_it():
    shown = [1, 0]  # the annotator saw candidate 1 as "A"
    answer = parse_answer("pairwise", {"choice": "A", "strength": "2"}, shown)
    assert answer == {"winner": 1, "strength": 2}
    assert comparisons("pairwise", answer, 2) == [(0, 1, -1, 2.0)]
    assert form_values("pairwise", answer, shown) == {"choice": "A", "strength": "2"}
    assert summary("pairwise", answer, shown) == "A > B (clearly)"
    assert parse_answer("pairwise", {"choice": "tie"}, shown) == {"winner": None, "strength": None}


def test_ranking_and_rating_answers_expand_to_every_pair():
    shown = [2, 0, 1]
    ranking = parse_answer("ranking", {"rank_A": "1", "rank_B": "3", "rank_C": "2"}, shown)
    assert ranking == {"ranking": [2, 1, 0]}
    assert parse_answer("ranking", {"ranking": ["A", "C", "B"]}, shown) == ranking
    assert comparisons("ranking", ranking, 3) == [(0, 1, -1, 1.0), (0, 2, -1, 2.0), (1, 2, -1, 1.0)]
    rating = parse_answer("rating", {"score_A": "7", "score_B": "2", "score_C": "2"}, shown)
    assert rating == {"scores": [2, 2, 7]}
    assert comparisons("rating", rating, 3) == [(0, 1, 0, 0.0), (0, 2, -1, 5.0), (1, 2, -1, 5.0)]
    assert form_values("rating", rating, shown) == {"score_A": "7", "score_B": "2", "score_C": "2"}


@pytest.mark.parametrize("kind, fields, message", [
    ("pairwise", {}, "choose A, B or tie"),
    ("pairwise", {"choice": "C"}, "expected one of A, B"),
    ("pairwise", {"choice": "A", "strength": "9"}, "strength: must be from 1 to 3"),
    ("ranking", {"rank_A": "1", "rank_B": "1"}, "different rank"),
    ("rating", {"score_A": "8", "score_B": "1"}, "score of A: must be from 1 to 7"),
    ("rating", {"score_A": "x", "score_B": "1"}, "expected a whole number"),
])
def test_bad_answers_say_what_is_wrong(kind, fields, message):
    with pytest.raises(AnswerError, match=message):
        parse_answer(kind, fields, [0, 1])


def test_majority_gives_the_share_of_agreeing_annotators_and_handles_ties():
    votes = [("a", 1, 1.0), ("b", 1, 1.0), ("c", -1, 1.0)]
    assert majority(votes) == (1, pytest.approx(2 / 3), 3)
    with_tie = votes + [("d", 0, 0.0)]
    assert majority(with_tie, "drop") == (1, pytest.approx(2 / 3), 3)
    assert majority(with_tie, "keep") == (1, pytest.approx(2.5 / 4), 4)
    split = [("a", 1, 1.0), ("b", -1, 1.0)]
    assert majority(split, "drop") is None
    assert majority(split, "keep") == (1, 0.5, 2)
    assert majority([("a", 0, 0.0)], "drop") is None


def test_cohen_kappa_matches_the_textbook_example():
    # 50 items: both yes 20, yes/no 5, no/yes 10, both no 15 -> p_o = 0.7, p_e = 0.5, kappa = 0.4
    a = ["yes"] * 25 + ["no"] * 25
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    assert cohen_kappa([1, 2, 3], [1, 2, 3], "quadratic") == pytest.approx(1.0)
    assert cohen_kappa(["x", "x"], ["x", "x"]) is None  # undefined: no variation at all


def test_krippendorff_alpha_matches_krippendorffs_published_example():
    # Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability": 4 coders, 12 units, missing values
    missing = None
    coders = [[1, 2, 3, 3, 2, 1, 4, 1, 2, missing, missing, missing],
              [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, missing, 3],
              [missing, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, missing],
              [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, missing]]
    units = [[c[u] for c in coders if c[u] is not None] for u in range(12)]
    assert krippendorff_alpha(units, "nominal") == pytest.approx(0.743, abs=5e-4)
    assert krippendorff_alpha(units, "interval") == pytest.approx(0.849, abs=5e-4)
    assert krippendorff_alpha([[1], [2]]) is None  # no unit with two values


def test_two_raters_alpha_and_kappa_agree_closely_on_large_samples():
    a = [1, 1, 2, 2, 1, 2, 1, 1, 2, 2] * 20
    b = [1, 2, 2, 2, 1, 2, 1, 2, 2, 1] * 20
    kappa = cohen_kappa(a, b)
    alpha = krippendorff_alpha([[x, y] for x, y in zip(a, b)])
    assert abs(kappa - alpha) < 0.01


def test_missing_services_skip_with_a_reason_but_fail_under_ci(monkeypatch):
    from annotate_services import unavailable

    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match="Chromium is not installed"):
        unavailable("Chromium is not installed")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true requires this test to run"):
        unavailable("Chromium is not installed")
