"""Which predicted scores to trust, part 2: conformal score sets and the review rule (SPEC §6).

Everything here is chosen on validation essays and then applied to others; plain numpy.

* Conformal score sets are split-conformal LAC sets (least ambiguous set-valued classifier):
  nonconformity ``1 - p(gold)``, calibrated per rubric on the validation essays.
* Review: an essay is sent to a human when its confidence (a signal of :mod:`modules.confidence`)
  is below a threshold chosen on the validation essays only; ``None`` as threshold means every
  essay goes to review. The signal itself is the one with the lowest AURC on validation.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from modules.checks import rubric_bounds
from modules.confidence import SIGNALS, prob_of_score
from modules.metrics import agreement, aurc


# ----------------------------------------------------------------------------- conformal score sets

def lac_scores(probs: np.ndarray, gold: np.ndarray, lo: int) -> np.ndarray:
    """float [N]: LAC nonconformity 1 - p(gold score)."""
    return 1.0 - prob_of_score(probs, gold, lo)


def conformal_quantile(scores: np.ndarray, target_coverage: float) -> float:
    """The ceil((n+1) * target)-th smallest calibration score (the finite-sample corrected
    quantile at level ceil((n+1)(1-alpha))/n); 1.0 (every score in the set) when that rank exceeds n."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    if s.size == 0:
        raise ValueError("conformal calibration needs at least one essay")
    rank = math.ceil((s.size + 1) * target_coverage - 1e-12)  # guards 0.9 * 10 = 9.000000000000002
    return 1.0 if rank > s.size else float(s[rank - 1])


def score_sets(probs: np.ndarray, quantile: float, lo: int) -> list[list[int]]:
    """Per essay, the scores v with 1 - p(v) <= quantile, plus the most probable score so that no
    set is empty (adding it only widens a set: coverage cannot drop)."""
    p = np.asarray(probs, dtype=np.float64)
    inside = 1.0 - p <= quantile
    inside[np.arange(p.shape[0]), p.argmax(axis=1)] = True
    return [[int(lo + v) for v in np.flatnonzero(row)] for row in inside]


def set_coverage(sets: Sequence[Sequence[int]], gold: np.ndarray) -> tuple[float, float]:
    """(share of essays whose gold score is in their set, mean set size)."""
    hits = [int(g) in s for s, g in zip(sets, np.asarray(gold))]
    return float(np.mean(hits)), float(np.mean([len(s) for s in sets]))


def calibrate_conformal(probs: Sequence[np.ndarray], gold: np.ndarray, ranges, names: Sequence[str],
                        target_coverage: float) -> dict[str, float]:
    """Per rubric, the LAC quantile of the calibration (validation) essays."""
    lo, _ = rubric_bounds(ranges, len(names))
    return {name: conformal_quantile(lac_scores(probs[k], gold[:, k], lo[k]), target_coverage)
            for k, name in enumerate(names)}


def rows_score_sets(probs: Sequence[np.ndarray], quantiles: dict[str, float], ranges,
                    names: Sequence[str]) -> dict[str, list[list[int]]]:
    """Per rubric, the conformal score set of every essay."""
    lo, _ = rubric_bounds(ranges, len(names))
    return {name: score_sets(probs[k], quantiles[name], lo[k]) for k, name in enumerate(names)}


# ----------------------------------------------------------------------------- review rule

def threshold_for_review_fraction(confidence: np.ndarray, fraction: float) -> float | None:
    """Threshold t sending about ``fraction`` of these essays to review (those with confidence < t):
    keep = N - floor(fraction * N + 0.5) essays, t = the keep-th highest confidence; None (review
    all) when keep = 0. Tied confidences at t are all kept."""
    c = np.sort(np.asarray(confidence, dtype=np.float64))[::-1]
    keep = c.size - math.floor(fraction * c.size + 0.5)
    return None if keep <= 0 else float(c[keep - 1])


def threshold_for_min_qwk(confidence: np.ndarray, gold: np.ndarray, pred: np.ndarray, ranges,
                          min_qwk: float) -> float | None:
    """The lowest threshold t (fewest essays to review) whose kept essays (confidence >= t) reach
    an average QWK >= min_qwk; None (review all) when no threshold does."""
    c = np.asarray(confidence, dtype=np.float64)
    for t in np.unique(c):  # ascending: the first that passes keeps the most essays
        kept = c >= t
        if agreement(gold[kept], pred[kept], ranges)["qwk"] >= min_qwk:
            return float(t)
    return None


def review_flags(confidence: np.ndarray, threshold: float | None) -> np.ndarray:
    """bool [N]: True = send to review, i.e. confidence < threshold (all when threshold is None)."""
    c = np.asarray(confidence, dtype=np.float64)
    return np.ones(c.size, dtype=bool) if threshold is None else c < threshold


def review_outcome(flags: np.ndarray, gold: np.ndarray, pred: np.ndarray, ranges) -> dict:
    """Share sent to review and the average QWK of the auto-scored rest (None when nothing is kept)."""
    kept = ~np.asarray(flags, dtype=bool)
    return {"review_share": float((~kept).mean()), "n_auto": int(kept.sum()),
            "qwk_auto": agreement(gold[kept], pred[kept], ranges)["qwk"] if kept.any() else None}


def choose_signal(signals: dict[str, np.ndarray], gold: np.ndarray, pred: np.ndarray,
                  allowed: Sequence[str]) -> str:
    """The signal (among ``allowed``, random excluded) with the lowest AURC on these essays; ties go
    to the earlier name in :data:`SIGNALS`."""
    candidates = [s for s in SIGNALS if s in signals and s in allowed and s != "random"]
    if not candidates:
        raise ValueError("no confidence signal other than random order to choose from")
    return min(candidates, key=lambda s: aurc(signals[s], gold, pred))


def review_target(review_fraction: float | None, min_qwk: float | None) -> dict:
    """The review rule's target: ``{"review_fraction": f}`` (default 0.2) or ``{"min_qwk": q}``."""
    if review_fraction is not None and min_qwk is not None:
        raise ValueError("give a review fraction or a minimum QWK, not both")
    if min_qwk is not None:
        return {"min_qwk": float(min_qwk)}
    fraction = 0.2 if review_fraction is None else float(review_fraction)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"review fraction must lie in [0, 1], got {fraction}")
    return {"review_fraction": fraction}
