"""Rewards: normalization (case, punctuation, articles, white space), several golden answers,
missing/empty/truncated answers scoring 0, token F1."""

from __future__ import annotations

import pytest

from megatron_recycle.agent.reward import exact_match, f1_score, normalize_answer, score_response


@pytest.mark.parametrize(
    "text, want",
    [
        ("The Eiffel Tower", "eiffel tower"),
        ("  a   Tale of  TWO cities. ", "tale of two cities"),
        ("U.S.A.", "usa"),
        ("an apple, the pear", "apple pear"),
        ("Theatre", "theatre"),  # 'the' only as a whole word
        ("\u201cParis\u201d", "\u201cparis\u201d"),  # ASCII punctuation only, as SQuAD/FlashRAG/Search-R1
        ("", ""),
    ],
)
def test_normalize_answer(text, want):
    assert normalize_answer(text) == want


def test_exact_match_any_of_several_golds():
    assert exact_match("the Beatles!", ["Rolling Stones", "Beatles"]) == 1.0
    assert exact_match("Beatles band", ["Beatles"]) == 0.0
    assert exact_match("1879", ["1879"]) == 1.0 and exact_match("1879.", ["1879"]) == 1.0


def test_f1_partial_overlap_and_best_gold():
    # pred "william shakespeare" vs gold "shakespeare": P = 1/2, R = 1 -> F1 = 2/3
    assert f1_score("William Shakespeare", ["Shakespeare"]) == pytest.approx(2 / 3)
    assert f1_score("William Shakespeare", ["Marlowe", "William Shakespeare"]) == 1.0
    assert f1_score("Paris", ["London"]) == 0.0
    assert f1_score("", ["London"]) == 0.0
    assert f1_score("the the", ["the"]) == 1.0  # both normalize to nothing: equal (SQuAD 2.0), as EM says
    # repeated tokens count once per occurrence: pred "x y y", gold "y": P = 1/3, R = 1
    assert f1_score("x y y", ["y"]) == pytest.approx(2 * (1 / 3) / (1 / 3 + 1))


def test_f1_closed_answers_follow_hotpotqas_rule():
    """FlashRAG's F1 on HotpotQA/2Wiki comparison questions: yes/no/noanswer earn nothing unless equal."""
    assert f1_score("yes they are", ["yes"]) == 0.0  # 0.5 by plain token overlap
    assert f1_score("yes", ["yes sir"]) == 0.0
    assert f1_score("Yes.", ["yes"]) == 1.0 and f1_score("no", ["No", "yes"]) == 1.0
    assert f1_score("no answer", ["noanswer"]) == 0.0
    assert f1_score("yes", ["no", "yes indeed"]) == 0.0
    assert f1_score("the yes men", ["Yes Men"]) == 1.0  # not a closed answer: plain overlap


def test_score_response_em_and_f1():
    r = score_response("<think>...</think><answer> The Paris </answer>", ["paris", "Paris, France"])
    assert (r.reward, r.em, r.f1, r.answer, r.malformed) == (1.0, 1.0, 1.0, "The Paris", False)
    r = score_response("<answer>William Shakespeare</answer>", ["Shakespeare"], metric="f1")
    assert r.em == 0.0 and r.reward == pytest.approx(2 / 3)
    assert score_response("<answer>Paris</answer>", "Paris").reward == 1.0  # one gold as a string


def test_last_answer_counts():
    r = score_response("<answer>London</answer> no wait <answer>Paris</answer>", ["Paris"])
    assert r.answer == "Paris" and r.reward == 1.0


@pytest.mark.parametrize(
    "response, malformed",
    [
        ("Paris", True),  # no tag
        ("<answer>Paris", True),  # unclosed
        ("<answer>   </answer>", True),  # empty
        ("<answer> the </answer>", False),  # empty after normalization: an answer, and a wrong one
        ("<answer>London</answer>", False),  # wrong
    ],
)
def test_missing_malformed_or_wrong_answers_score_zero(response, malformed):
    r = score_response(response, ["Paris"])
    assert r.reward == 0.0 and r.em == 0.0 and r.f1 == 0.0 and r.malformed is malformed


def test_golds_that_normalize_to_nothing_can_be_matched():
    """SQuAD's rule: "The The" (the band) or "A" (the letter) normalize to ""; they were unmatchable."""
    for gold in ("The The", "A", "!!!"):
        r = score_response(f"<answer>{gold}</answer>", [gold])
        assert (r.reward, r.em, r.f1, r.malformed) == (1.0, 1.0, 1.0, False), gold
    r = score_response("<answer>the</answer>", ["Paris"], metric="f1")
    assert r.reward == r.em == r.f1 == 0.0
    assert f1_score("Paris", ["The The"]) == 0.0 and f1_score("the", ["The The", "Paris"]) == 1.0


def test_an_answer_pair_across_a_search_is_no_answer():
    """The trajectory ended without a closed answer tag; the joined turns hold an <answer>...</answer>
    pair around a search (turn 1 opened it, the last turn closed it): that is not an answer."""
    text = "<answer> Paris <search> capital of France </search> France </answer>"
    assert score_response(text, ["Paris France"], metric="f1").reward > 0  # read as one response
    r = score_response(text, ["Paris France"], metric="f1", answered=False)
    assert (r.reward, r.em, r.f1, r.answer, r.malformed) == (0.0, 0.0, 0.0, None, True)


def test_truncated_trajectory_scores_zero_even_when_right():
    r = score_response("<answer>Paris</answer>", ["Paris"], truncated=True)
    assert r.reward == r.em == r.f1 == 0.0 and r.answer == "Paris" and not r.malformed


def test_custom_reward_from_a_file(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text(
        "def length_bonus(response, golds, truncated):\n"
        "    return 0.0 if truncated else len(golds) + 0.5\n"
        "def nan(response, golds, truncated):\n"
        "    return float('nan')\n"
    )
    r = score_response("<answer>Paris</answer>", ["Paris", "paris"], metric=f"{path}:length_bonus")
    assert (r.reward, r.em, r.f1) == (2.5, 1.0, 1.0)  # EM/F1 still computed for the metrics
    assert score_response("<answer>x</answer>", ["y"], metric=f"{path}:length_bonus", truncated=True).reward == 0.0
    with pytest.raises(ValueError, match="finite"):
        score_response("<answer>x</answer>", ["x"], metric=f"{path}:nan")
    with pytest.raises(ValueError, match="cannot load"):
        score_response("<answer>x</answer>", ["x"], metric=f"{path}:missing")


def test_bad_arguments():
    with pytest.raises(ValueError, match="'em', 'f1'"):
        score_response("<answer>x</answer>", ["x"], metric="acc")
    with pytest.raises(ValueError, match="at least one golden answer"):
        score_response("<answer>x</answer>", [])
