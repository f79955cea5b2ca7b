"""Task answer matchers: is a generated answer correct for its reference?

Fine-tuning accuracy is measured by generating an answer and comparing it with the
reference. A :data:`Matcher` is a plain function ``(answer, reference) -> correct``; pick one
with a :class:`MatcherSpec` and :func:`make_matcher`. Stdlib only.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from asft_core.spec import Matcher as MatcherName

Matcher = Callable[[str, str], bool]
"""``matcher(answer, reference) -> correct``."""

_TRAILING_PUNCTUATION = ".,!?;:"

# A number: optional sign (only where it cannot be a hyphen, as in "3-4"), digits with
# optional thousands separators ("1,234" but not the "1,234" of "1,2345"), optional decimals.
# A trailing full stop is left out because "\.\d+" needs a digit after the point.
_NUMBER = re.compile(r"(?:(?<![\w.])-)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")


class MatcherError(ValueError):
    """A matcher could not be built.

    Attributes:
        code: machine-readable reason (``invalid_regex``, ``invalid_matcher``).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.detail = message


def normalise_label(text: str) -> str:
    """Casefold, collapse whitespace and strip surrounding space and trailing punctuation."""
    collapsed = " ".join(text.casefold().split())
    return collapsed.rstrip(_TRAILING_PUNCTUATION).strip()


def exact_label(answer: str, reference: str) -> bool:
    """Correct iff the answer is the reference label, or starts with it as its first word.

    Both sides are normalised (:func:`normalise_label`): " Positive. " equals "positive".
    The first-word rule accepts what small chat models do after fine-tuning, "positive,
    because the reviewer liked it", while still rejecting "not positive". A reference of
    several words must match the whole answer.
    """
    expected = normalise_label(reference)
    given = normalise_label(answer)
    if not expected:
        return False
    if given == expected:
        return True
    words = given.split(maxsplit=1)
    return bool(words) and normalise_label(words[0]) == expected


def regex_matcher(pattern: str) -> Matcher:
    """A matcher that extracts the answer with ``pattern`` and compares it with the reference.

    The pattern is compiled once. The answer's first match is taken (group 1 if the pattern
    has a group, else the whole match), stripped and casefolded, and must equal the stripped,
    casefolded reference. No match is incorrect. Raises ``invalid_regex`` for a bad pattern.
    """
    try:
        compiled = re.compile(pattern)
    except re.error as error:
        raise MatcherError("invalid_regex", f"invalid regex {pattern!r}: {error}") from None
    group = 1 if compiled.groups else 0

    def match(answer: str, reference: str) -> bool:
        found = compiled.search(answer)
        if found is None:
            return False
        extracted = found.group(group)
        # An optional group that did not take part extracts nothing.
        if extracted is None:
            return False
        return extracted.strip().casefold() == reference.strip().casefold()

    return match


def last_number(text: str) -> Decimal | None:
    """The last number written in ``text`` ("The answer is 1,234." -> 1234), or None."""
    # Models sometimes write the Unicode minus sign.
    matches = _NUMBER.findall(text.replace("\u2212", "-"))
    if not matches:
        return None
    try:
        return Decimal(matches[-1].replace(",", ""))
    except InvalidOperation:
        return None


def final_number(answer: str, reference: str) -> bool:
    """Correct iff the answer's last number equals the reference's, numerically.

    The GSM8K convention: reasoning comes first and the result last, so the last number is
    the answer. Values compare as decimals, so "3.50" equals "3.5" and "1,234" equals "1234".
    The reference may be a bare number or a sentence ("The answer is 42."). No number in
    either is incorrect.
    """
    expected = last_number(reference)
    given = last_number(answer)
    return expected is not None and given is not None and given == expected


@dataclass(frozen=True)
class MatcherSpec:
    """Which matcher scores a task, as a job spec names it."""

    kind: MatcherName
    """``exact_label`` (classification), ``regex`` (extract then compare), ``final_number``."""
    pattern: str | None = None
    """The extraction pattern; required for ``regex``."""


def make_matcher(spec: MatcherSpec) -> Matcher:
    """Build the matcher a spec names; raises ``invalid_matcher`` for an incomplete spec."""
    if spec.kind == "exact_label":
        return exact_label
    if spec.kind == "final_number":
        return final_number
    if spec.kind == "regex":
        if not spec.pattern:
            raise MatcherError("invalid_matcher", "a regex matcher needs a pattern")
        return regex_matcher(spec.pattern)
    raise MatcherError("invalid_matcher", f"unknown matcher kind {spec.kind!r}")
