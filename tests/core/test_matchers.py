"""Task answer matchers on the answers small fine-tuned models actually write."""

from __future__ import annotations

from decimal import Decimal

import pytest

from asft_core.evaluation.matchers import (
    MatcherError,
    MatcherSpec,
    exact_label,
    final_number,
    last_number,
    make_matcher,
    regex_matcher,
)


@pytest.mark.parametrize(
    ("answer", "reference", "correct"),
    [
        ("positive", "positive", True),
        ("Positive.", "positive", True),
        (" NEGATIVE ", "negative", True),
        ("positive because the reviewer loved it", "positive", True),
        ("positive, because the reviewer loved it", "positive", True),
        ("Positive!", "Positive.", True),
        ("very   positive", "very positive", True),
        ("not positive", "positive", False),
        ("negative", "positive", False),
        ("positively", "positive", False),
        ("", "positive", False),
        ("anything", "", False),
        ("very positive", "very", True),
        ("positive", "very positive", False),
    ],
)
def test_exact_label(answer: str, reference: str, correct: bool) -> None:
    assert exact_label(answer, reference) is correct


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("The answer is 1,234.", Decimal(1234)),
        ("-3", Decimal(-3)),
        ("x = -3", Decimal(-3)),
        ("3.50", Decimal("3.5")),
        ("First 12, then 7 apples, so 19.", Decimal(19)),
        ("pages 3-4", Decimal(4)),
        ("1,000,000 dollars", Decimal(1_000_000)),
        ("1,2345", Decimal(2345)),
        ("\u22125 degrees", Decimal(-5)),
        ("no number here", None),
    ],
)
def test_last_number(answer: str, expected: Decimal | None) -> None:
    assert last_number(answer) == expected


@pytest.mark.parametrize(
    ("answer", "reference", "correct"),
    [
        ("The answer is 1,234.", "1234", True),
        ("So she has 42 apples.", "The answer is 42.", True),
        ("-3", "-3", True),
        ("-3", "3", False),
        ("3.50", "3.5", True),
        ("3.51", "3.5", False),
        ("It is 12, not 13", "12", False),
        ("I don't know", "42", False),
        ("42", "no number", False),
    ],
)
def test_final_number(answer: str, reference: str, correct: bool) -> None:
    assert final_number(answer, reference) is correct


def test_regex_with_a_group_compares_the_group() -> None:
    match = regex_matcher(r"Answer:\s*(\w+)")
    assert match("Reasoning... Answer: Paris.", " paris ")
    assert not match("Reasoning... Answer: Lyon", "Paris")
    assert not match("Paris", "Paris")  # no match at all


def test_regex_without_a_group_compares_the_whole_match() -> None:
    match = regex_matcher(r"[A-D]\b")
    assert match("The correct option is B because...", "b")
    assert not match("The correct option is C", "B")


def test_regex_takes_the_first_match() -> None:
    match = regex_matcher(r"\d+")
    assert match("7 then 8", "7")
    assert not match("7 then 8", "8")


def test_regex_optional_group_that_did_not_match_is_incorrect() -> None:
    match = regex_matcher(r"x(\d)?")
    assert not match("x", "")


def test_invalid_regex_is_an_error() -> None:
    with pytest.raises(MatcherError) as caught:
        regex_matcher("(unclosed")
    assert caught.value.code == "invalid_regex"


def test_make_matcher() -> None:
    assert make_matcher(MatcherSpec("exact_label"))("Positive.", "positive")
    assert make_matcher(MatcherSpec("final_number"))("It is 1,234.", "1234")
    assert make_matcher(MatcherSpec("regex", pattern=r"is (\w+)"))("It is Blue", "blue")
    with pytest.raises(MatcherError) as caught:
        make_matcher(MatcherSpec("regex"))
    assert caught.value.code == "invalid_matcher"
