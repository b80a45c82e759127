"""Voting rules over sampled scores (SPEC §6, §10).

This module is the place to check what a vote or a best m means (a QWK value:
:mod:`modules.metrics`); the QWK-vs-m curves and their bootstrap, computed fast from these same
rules, are in :mod:`modules.curves` (engine: :mod:`modules.curve_engine`).
Everything here is plain numpy; no model or torch is needed, so a saved sample bank can be
re-analysed anywhere.

Conventions
-----------
* A sample bank is an integer array ``samples[N, m, K]``: N essays, m samples per essay, K
  rubrics.  An entry equal to ``-1`` (:data:`INVALID`) is invalid and ignored; the self-
  consistency tool stores an unparsable answer as ``-1`` in all K columns, but validity is
  decided per entry.
* ``fallback`` is an int (all rubrics) or an int sequence of length K (per rubric).  It is
  the vote of an essay-rubric pair with no valid sample.  :func:`default_fallback` gives the
  rubric midpoints rounded down.

Votes
-----
* Average vote: mean of the valid values, rounded half up (2.5 -> 3, 3.5 -> 4).  Computed
  exactly from integer sums: ``floor((2*sum + count) / (2*count))``.
* Majority vote: the most frequent valid value; a tie goes to the tied value nearest the mean
  of the valid values; a tie in that distance (mean exactly half-way) goes to the lower value.

QWK
---
:func:`qwk` is :func:`modules.metrics.qwk`, kept here as part of the pinned API (SPEC §10):
Cohen's quadratic kappa over the full range, 0.0 where it is undefined (sklearn: nan).

Best m
------
:func:`best_scores` picks the m with the highest overall QWK on a curve; a tie goes to the
smallest m.

The sample-bank checks (:func:`as_sample_bank`, :func:`fallback_vector`) are public because
:mod:`modules.curves` applies the same ones; the integer and range checks live in
:mod:`modules.checks`.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from modules.checks import as_int_array, rubric_bounds
from modules.metrics import qwk

__all__ = [
    "INVALID",
    "average_vote",
    "majority_vote",
    "qwk",
    "default_fallback",
    "best_scores",
    "as_int_array",
    "as_sample_bank",
    "fallback_vector",
    "rubric_bounds",
]

INVALID = -1


# ----------------------------------------------------------------------------- input checks

def as_sample_bank(samples) -> np.ndarray:
    """int64 [N, m, K] from `samples`; anything else (wrong rank, non-integers) raises."""
    s = as_int_array(samples, "samples")
    if s.ndim != 3:
        raise ValueError(f"samples must have shape [N, m, K], got shape {s.shape}")
    return s


def fallback_vector(fallback, K: int) -> np.ndarray:
    """int64 [K] from a fallback given as one int (all rubrics) or K ints (one per rubric)."""
    fb = as_int_array(fallback, "fallback")
    if fb.ndim == 0:
        return np.full(K, int(fb), dtype=np.int64)
    if fb.shape != (K,):
        raise ValueError(f"fallback must be an int or have length K={K}, got shape {fb.shape}")
    return fb.copy()


def _sums(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(valid [N, m, K], sum of the valid values [N, K], their count [N, K])."""
    valid = samples != INVALID
    count = valid.sum(axis=1)
    total = np.where(valid, samples, 0).sum(axis=1)
    return valid, total, count


# ----------------------------------------------------------------------------- votes

def default_fallback(rubric_ranges: Sequence[tuple[int, int]]) -> np.ndarray:
    """Per-rubric fallback score: the midpoint of each (lo, hi) range, rounded down."""
    lo, hi = rubric_bounds(rubric_ranges)
    return (lo + hi) // 2


def average_vote(samples: np.ndarray, fallback) -> np.ndarray:
    """Mean of the valid samples of each essay and rubric, rounded half up.

    samples: int [N, m, K], -1 = invalid.  fallback: int or int[K], used where an essay has no
    valid sample for a rubric.  Returns int64 [N, K].
    """
    s = as_sample_bank(samples)
    N, _, K = s.shape
    fb = fallback_vector(fallback, K)
    _, total, count = _sums(s)
    safe = np.maximum(count, 1)
    vote = np.floor_divide(2 * total + count, 2 * safe)
    return np.where(count > 0, vote, fb[None, :]).astype(np.int64)


def majority_vote(samples: np.ndarray, fallback) -> np.ndarray:
    """Most frequent valid sample of each essay and rubric.

    Ties go to the tied value nearest the mean of the valid samples, then to the lower one.
    samples: int [N, m, K], -1 = invalid.  fallback: int or int[K].  Returns int64 [N, K].
    """
    s = as_sample_bank(samples)
    N, _, K = s.shape
    fb = fallback_vector(fallback, K)
    valid, total, count = _sums(s)
    if not valid.any():
        return np.broadcast_to(fb, (N, K)).astype(np.int64)
    values = np.unique(s[valid])                                   # sorted distinct values
    U = values.size
    pos = np.searchsorted(values, np.where(valid, s, values[0]))   # [N, m, K] in 0..U-1
    cell = (np.arange(N)[:, None, None] * K + np.arange(K)[None, None, :])
    counts = np.bincount((cell * U + pos)[valid], minlength=N * K * U).reshape(N, K, U)
    # Distance to the mean, in exact integers.  With mean = total/count and
    # q = 2*floor((2*total - 1)/count) + 1, |4*v - q| orders the values exactly as
    # |v - mean| does with ties sent to the lower value (q/4 lies strictly inside the same
    # half-unit interval as the mean, just below it), and never ties for distinct values.
    q = 2 * np.floor_divide(2 * total - 1, np.maximum(count, 1)) + 1
    dist = np.abs(4 * values[None, None, :] - q[:, :, None])
    key = counts * (int(dist.max()) + 1) - dist                     # count first, then nearness
    key = np.where(counts > 0, key, np.iinfo(np.int64).min)
    vote = values[np.argmax(key, axis=2)]
    return np.where(count > 0, vote, fb[None, :]).astype(np.int64)


# ----------------------------------------------------------------------------- summaries

def best_scores(curves: dict, rubric_names: Iterable[str] | None = None) -> dict:
    """Best m by overall QWK for each vote, with the values at that m, at m=1 and at max_m.

    curves: a :func:`modules.curves.qwk_curves` result.  rubric_names: which per-rubric
    curves to report (default ``curves["rubrics"]``).  Returns::

        {"avg": {"best":  {"m": int, "overall": float, "average": float,
                           "per_rubric": {name: float}},
                 "m1":    {...same keys, m = 1...},
                 "max_m": {...same keys, m = max_m...}},
         "maj": {...}}

    Ties in the overall QWK go to the smallest m.
    """
    ms = list(curves["ms"])
    names = list(curves.get("rubrics", [])) if rubric_names is None else [str(n) for n in rubric_names]

    def at(vote: str, i: int) -> dict:
        per = curves[f"per_rubric_{vote}"]
        missing = [n for n in names if n not in per]
        if missing:
            raise KeyError(f"no per-rubric curve for {missing} in curves['per_rubric_{vote}']")
        return {
            "m": int(ms[i]),
            "overall": float(curves[f"overall_{vote}"][i]),
            "average": float(curves[f"avgk_{vote}"][i]),
            "per_rubric": {n: float(per[n][i]) for n in names},
        }

    out = {}
    for vote in ("avg", "maj"):
        overall = np.asarray(curves[f"overall_{vote}"], dtype=np.float64)
        out[vote] = {"best": at(vote, int(np.argmax(overall))), "m1": at(vote, 0),
                     "max_m": at(vote, len(ms) - 1)}
    return out
