"""The score line: how scores are written, and the one strict parser that reads them back.

A score line is the model's answer and the first line of every training target: one integer per
rubric, in rubric order, separated by whitespace, e.g. ``"3 4 5 2"``. Every place that reads a
score line (training records in the original ``{"instruction", "output"}`` form, greedy answers,
samples of both samplers, banks being re-read) goes through :func:`parse_score_line`, so a score
the tool counts is a score the model really wrote.
"""
from __future__ import annotations

from typing import Sequence


def score_line(scores: Sequence[int]) -> str:
    """The canonical text of a score line: ``"3 4 5"`` (single spaces, no sign, no padding)."""
    return " ".join(str(int(s)) for s in scores)


def first_line(text: str) -> str:
    """Everything before the first newline (the score line of a target or an answer)."""
    return text.split("\n", 1)[0]


def is_digit_string(text: str) -> bool:
    """True for a non-empty string of ASCII digits only (``str.isdigit`` alone also takes "²", "٣")."""
    return text.isascii() and text.isdigit()


def score_fields(line: str) -> list[str]:
    """The whitespace-separated fields of a line, leading and trailing whitespace ignored."""
    return line.split()


def parse_score_line(text: str, ranges: Sequence[tuple[int, int]]) -> list[int] | None:
    """The K scores of the text's first line, or None when it is not a valid score line.

    Valid: the first line, with leading and trailing whitespace removed, is exactly K = len(ranges)
    fields separated by whitespace, each a non-negative integer written in ASCII digits only (no
    sign, no decimal point, nothing else), and field k lies in ``ranges[k]``. Anything after the
    first newline (feedback) is ignored. So ``"3.5 4 5"``, ``"Essay 7: 3 4"``, ``"3, 4, 5"`` and
    ``"+3 4 5"`` are all invalid.
    """
    fields = score_fields(first_line(text))
    if len(fields) != len(ranges) or not all(is_digit_string(f) for f in fields):
        return None
    numbers = [int(f) for f in fields]
    if not all(lo <= v <= hi for v, (lo, hi) in zip(numbers, ranges)):
        return None
    return numbers


def score_spans(line: str) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of the fields of a score line (where its numbers are)."""
    spans, start = [], None
    for i, ch in enumerate(line + " "):
        if ch.isspace():
            if start is not None:
                spans.append((start, i))
                start = None
        elif start is None:
            start = i
    return spans


def line_sample(text: str, ranges: Sequence[tuple[int, int]], truncated: bool = False) -> dict:
    """A generated answer as the bank stores it: its first line and that line's scores.

    ``truncated``: the token budget ran out before the line ended (no newline or EOS). Such a
    sample is invalid whatever the cut text would parse to (``"10 10 1"`` may be ``"10 10 10"``
    cut short), and says so with ``"truncated": True``.
    """
    sample = {"text": first_line(text), "scores": None if truncated else parse_score_line(text, ranges)}
    if truncated:
        sample["truncated"] = True
    return sample


def decoding_mode(constrained: bool) -> str:
    """How results name the decoding of score lines: ``constrained`` (``--constrained``) or
    ``unconstrained``."""
    return "constrained" if constrained else "unconstrained"
