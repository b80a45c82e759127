"""The strict score-line parser: one table of lines with what each must parse to."""
from __future__ import annotations

import pytest

from modules.score_lines import line_sample, parse_score_line, score_line, score_spans

RANGES = [(0, 30), (1, 9), (0, 30)]

PARSE_TABLE = [
    # valid
    ("12 7 3", [12, 7, 3]),
    ("0 1 30", [0, 1, 30]),
    ("12 7 3\nGood essay, 4 5 6 more numbers", [12, 7, 3]),  # feedback after the newline is ignored
    ("  0 1 30  ", [0, 1, 30]),  # leading/trailing spaces
    ("12\t7\t3", [12, 7, 3]),  # tabs separate too
    ("12  7   3", [12, 7, 3]),  # runs of spaces
    ("12 7 3\r\nfeedback", [12, 7, 3]),  # CRLF: the \r is trailing whitespace
    ("012 07 3", [12, 7, 3]),  # leading zeros still write an integer
    ("30 9 0\n", [30, 9, 0]),
    # decimals
    ("3.5 4 5", None),
    ("12 7.0 3", None),
    ("3.5 4 5 6 7 8 9", None),
    # words and labels
    ("Essay 7: 3 4", None),
    ("Scores: 12 7 3", None),
    ("12 7 3 points", None),
    ("twelve 7 3", None),
    # punctuation
    ("12, 7, 3", None),
    ("12 7 3.", None),
    ("(12) 7 3", None),
    ("12/30 7 3", None),
    # signs
    ("+12 7 3", None),
    ("12 -7 3", None),
    # too few / too many
    ("12 7", None),
    ("12 7 3 4", None),
    # out of range
    ("31 7 3", None),
    ("12 0 3", None),
    ("12 10 3", None),
    # not ASCII digits
    ("１２ 7 3", None),  # full-width digits
    ("12 ٧ 3", None),  # Arabic-Indic seven
    ("12 7 ³", None),  # superscript three
    # empty and blank first lines
    ("", None),
    ("   ", None),
    ("\n12 7 3", None),  # the score line must be the first line
    ("\t\n12 7 3", None),
]


@pytest.mark.parametrize("text, expected", PARSE_TABLE)
def test_parse_score_line(text, expected):
    assert parse_score_line(text, RANGES) == expected


def test_parse_table_is_large_and_mixed():
    assert len(PARSE_TABLE) >= 25
    assert sum(e is None for _, e in PARSE_TABLE) > 15 and sum(e is not None for _, e in PARSE_TABLE) >= 8


def test_score_line_round_trips_and_spans():
    for scores in ([12, 7, 3], [0, 9, 30]):
        line = score_line(scores)
        assert parse_score_line(line, RANGES) == scores
        assert [line[a:b] for a, b in score_spans(line)] == [str(s) for s in scores]
    assert score_spans(" 3\t45  6") == [(1, 2), (3, 5), (7, 8)]


def test_line_sample_keeps_the_first_line_and_flags_truncation():
    assert line_sample("12 7 3\nfeedback", RANGES) == {"text": "12 7 3", "scores": [12, 7, 3]}
    # A cut line is invalid whatever it parses to: "12 7 3" may have been "12 7 30".
    assert line_sample("12 7 3", RANGES, truncated=True) == {"text": "12 7 3", "scores": None, "truncated": True}
    assert line_sample("Essay 7: 3 4", RANGES) == {"text": "Essay 7: 3 4", "scores": None}
