"""Which predicted scores to trust: per-essay confidence, selective scoring and conformal score sets (SPEC §6).

Plain numpy (no torch), so it runs in ``self_consistency.py analyze`` and on saved prediction rows.

Conventions
-----------
* A *signal* is one number per essay; **higher = more confident**. Every signal is built from
  per-rubric *measures* (raw quantities in their own units, stored per rubric in the prediction
  rows) and combined over the K rubrics by :func:`combine_rubrics`: the mean over rubrics of a
  range-normalised value. Normalising by the rubric's width (hi - lo) makes a 1-point spread on a
  0-60 rubric weigh as little as it is, instead of swamping the 1-6 rubrics next to it.

  ================  =========================================================  ==============
  signal            per-rubric value (essay value = mean over rubrics)         source
  ================  =========================================================  ==============
  ``p_pred``        p(predicted score) under the weighted distribution         distribution
  ``neg_std``       -std(distribution) / (hi - lo)                             distribution
  ``neg_entropy``   -H(distribution) / ln(hi - lo + 1)  (0 for a 1-value       distribution
                    rubric)
  ``sc_agreement``  share of the valid samples equal to the majority vote      sample bank
  ``neg_sc_std``    -std(valid samples) / (hi - lo)                            sample bank
  ``length``        essay length in words (one value per essay)                baseline
  ``random``        uniform draw, seeded (the floor any signal must beat)      baseline
  ================  =========================================================  ==============

* The *predicted score* is the prediction being judged: the rounded weighted score by default
  (``prediction="weighted"``), the greedy score where no distribution was computed, the majority
  vote for a sample bank's own analysis.
* Risk-coverage: essays are ranked by confidence, most confident first; **ties keep file order**
  (a stable sort), so a constant signal keeps the essays in file order. Coverage c keeps the
  ``max(1, floor(c * N + 0.5))`` most confident essays. Risk is the mean absolute error over the
  kept essay-rubric pairs, in score points. AURC is the discrete area
  ``(1/N) * sum_{k=1..N} MAE(k most confident essays)`` (no trapezoid).
* A *large error* on an essay: ``|pred - gold| >= 2`` on some rubric, or ``>= 0.1 * (hi - lo)``
  on a rubric whose range is wider than 20 points. AUROC measures how well low confidence ranks
  the large-error essays above the others (0.5 = random order, ties count one half).
* Conformal score sets are split-conformal LAC sets (least ambiguous set-valued classifier):
  nonconformity ``1 - p(gold)``, calibrated per rubric on the validation essays.
* Review: an essay is sent to a human when its confidence is below a threshold chosen on the
  validation essays only; ``None`` as threshold means every essay goes to review.
"""
from __future__ import annotations

import logging
import math
from typing import Sequence

import numpy as np

from modules.voting import INVALID, as_sample_bank, majority_vote, qwk, rubric_bounds

logger = logging.getLogger(__name__)

COVERAGES = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
N_BINS = 10
DISTRIBUTION_SIGNALS = ("p_pred", "neg_std", "neg_entropy")
SAMPLE_SIGNALS = ("sc_agreement", "neg_sc_std")
BASELINE_SIGNALS = ("length", "random")
SIGNALS = DISTRIBUTION_SIGNALS + SAMPLE_SIGNALS + BASELINE_SIGNALS
LARGE_ERROR_RULE = "|pred - gold| >= 2 on some rubric (>= 10% of the range for ranges wider than 20 points)"


# ----------------------------------------------------------------------------- per-rubric measures

def rubric_widths(ranges) -> np.ndarray:
    """float [K]: hi - lo of each rubric, at least 1 (a one-value rubric divides by 1, not 0)."""
    lo, hi = rubric_bounds(ranges)
    return np.maximum(hi - lo, 1).astype(np.float64)


def prob_of_score(probs: np.ndarray, scores: np.ndarray, lo: int) -> np.ndarray:
    """float [N]: p_i(s_i) = probs[i, s_i - lo], each essay's probability of the given score."""
    scores = np.asarray(scores, dtype=np.int64)
    return np.asarray(probs, dtype=np.float64)[np.arange(scores.size), scores - lo]


def distribution_std(probs: np.ndarray) -> np.ndarray:
    """float [N]: sqrt(sum_v p(v) (v - mu)^2) with mu = sum_v p(v) v, over the rubric's values v
    (an offset of all values does not change it, so v = 0..L-1 is used)."""
    p = np.asarray(probs, dtype=np.float64)
    values = np.arange(p.shape[1], dtype=np.float64)
    mean = p @ values
    return np.sqrt(np.maximum(p @ values ** 2 - mean ** 2, 0.0))


def distribution_entropy(probs: np.ndarray) -> np.ndarray:
    """float [N]: H = -sum_v p(v) ln p(v), in nats, with 0 ln 0 = 0."""
    p = np.asarray(probs, dtype=np.float64)
    logs = np.log(np.where(p > 0, p, 1.0))
    return -(p * logs).sum(axis=1)


def majority_agreement(samples: np.ndarray, votes: np.ndarray) -> np.ndarray:
    """float [N, K]: #{j: s_j = vote} / #{j: s_j valid} per essay and rubric; 0 where no sample
    is valid (nothing agrees, so the least confident value)."""
    s = as_sample_bank(samples)
    valid = s != INVALID
    agree = (valid & (s == np.asarray(votes)[:, None, :])).sum(axis=1)
    count = valid.sum(axis=1)
    return np.where(count > 0, agree / np.maximum(count, 1), 0.0)


def sample_std(samples: np.ndarray, ranges) -> np.ndarray:
    """float [N, K]: population std of the valid samples, sqrt(mean_j (s_j - mean)^2); where no
    sample is valid, (hi - lo) / 2, the largest std possible inside the range (least confident)."""
    s = as_sample_bank(samples)
    lo, hi = rubric_bounds(ranges, s.shape[2])
    valid = s != INVALID
    count = valid.sum(axis=1)
    values = np.where(valid, s, 0).astype(np.float64)
    mean = values.sum(axis=1) / np.maximum(count, 1)
    var = (np.where(valid, (values - mean[:, None, :]) ** 2, 0.0)).sum(axis=1) / np.maximum(count, 1)
    return np.where(count > 0, np.sqrt(var), (hi - lo)[None, :] / 2.0)


def essay_word_count(essay: str) -> int:
    """Words of an essay: whitespace-separated tokens."""
    return len(essay.split())


def random_confidence(n: int, seed: int) -> np.ndarray:
    """float [n]: uniform draws from numpy's default_rng(seed), the random-order baseline."""
    return np.random.default_rng(seed).random(n)


# ----------------------------------------------------------------------------- measures -> signals

def distribution_measures(probs: Sequence[np.ndarray], pred: np.ndarray, ranges) -> dict[str, np.ndarray]:
    """Raw measures [N, K] of the weighted distributions: ``p_pred`` (probability of the
    predicted score), ``std`` (score points) and ``entropy`` (nats). probs[k]: [N, hi_k - lo_k + 1]."""
    lo, _ = rubric_bounds(ranges, len(probs))
    pred = np.asarray(pred, dtype=np.int64)
    return {"p_pred": np.stack([prob_of_score(p, pred[:, k], lo[k]) for k, p in enumerate(probs)], axis=1),
            "std": np.stack([distribution_std(p) for p in probs], axis=1),
            "entropy": np.stack([distribution_entropy(p) for p in probs], axis=1)}


def sample_measures(samples: np.ndarray, ranges, fallback) -> dict[str, np.ndarray]:
    """Raw measures [N, K] of a sample bank: ``sc_vote`` (majority vote), ``sc_agreement`` (share of
    the valid samples equal to it) and ``sc_std`` (their std, score points)."""
    votes = majority_vote(samples, fallback)
    return {"sc_vote": votes, "sc_agreement": majority_agreement(samples, votes),
            "sc_std": sample_std(samples, ranges)}


def combine_rubrics(values: np.ndarray) -> np.ndarray:
    """float [N]: mean over the K rubrics of range-normalised per-rubric confidences [N, K]."""
    return np.asarray(values, dtype=np.float64).mean(axis=1)


def signals_from_measures(measures: dict[str, np.ndarray], ranges) -> dict[str, np.ndarray]:
    """Essay signals [N] (higher = more confident) from the raw measures present in ``measures``:
    p_pred = mean p; neg_std = -mean std/(hi-lo); neg_entropy = -mean H/ln(hi-lo+1);
    sc_agreement = mean share; neg_sc_std = -mean sample std/(hi-lo)."""
    lo, hi = rubric_bounds(ranges)
    width = rubric_widths(ranges)
    log_levels = np.log(hi - lo + 1.0)
    normalised = {
        "p_pred": lambda m: m["p_pred"],
        "neg_std": lambda m: -m["std"] / width,
        "neg_entropy": lambda m: -np.divide(m["entropy"], log_levels, out=np.zeros_like(m["entropy"]),
                                            where=log_levels > 0),
        "sc_agreement": lambda m: m["sc_agreement"],
        "neg_sc_std": lambda m: -m["sc_std"] / width,
    }
    needs = {"p_pred": "p_pred", "neg_std": "std", "neg_entropy": "entropy", "sc_agreement": "sc_agreement",
             "neg_sc_std": "sc_std"}
    return {name: combine_rubrics(f(measures)) for name, f in normalised.items() if needs[name] in measures}


# ----------------------------------------------------------------------------- prediction rows

def prediction_key(rows: Sequence[dict]) -> str:
    """``"weighted"`` when every row has a weighted prediction, else ``"greedy"``."""
    return "weighted" if rows and all(r.get("weighted") is not None for r in rows) else "greedy"


def rows_scores(rows: Sequence[dict], key: str, k: int) -> np.ndarray:
    """int [N, K]: ``row[key]`` of every row; ValueError naming the row if one lacks it."""
    for row in rows:
        if row.get(key) is None or len(row[key]) != k:
            raise ValueError(f"prediction row {row.get('id')!r}: {key!r} must hold {k} scores, got {row.get(key)!r}")
    return np.array([row[key] for row in rows], dtype=np.int64).reshape(len(rows), k)


def has_gold(rows: Sequence[dict]) -> bool:
    """Whether every row carries gold scores (rows of new essays have none)."""
    return bool(rows) and all(row.get("gold") is not None for row in rows)


def rows_probabilities(rows: Sequence[dict], names: Sequence[str], ranges) -> list[np.ndarray] | None:
    """Per rubric, float [N, hi - lo + 1]: the rows' weighted distributions; None when a row has none."""
    if not rows or any(row.get("probabilities") is None for row in rows):
        return None
    lo, hi = rubric_bounds(ranges, len(names))
    out = []
    for k, name in enumerate(names):
        size = int(hi[k] - lo[k] + 1)
        for row in rows:
            if len(row["probabilities"].get(name) or ()) != size:
                raise ValueError(f"prediction row {row.get('id')!r}: probabilities[{name!r}] must hold {size} values")
        out.append(np.array([row["probabilities"][name] for row in rows], dtype=np.float64))
    return out


def essay_signals(rows: Sequence[dict], names: Sequence[str], ranges, *, prediction: str | None = None,
                  essays: Sequence[str] | None = None, samples: np.ndarray | None = None,
                  fallback=None, seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(signals {name: float [N]}, measures {name: [N, K]}) for prediction rows.

    Distribution signals need the rows' ``probabilities``; the sample signals need ``samples``
    (int [N, m, K] aligned with rows, -1 invalid; ``fallback`` default: rubric midpoints); length
    needs ``essays`` (the essay texts aligned with rows); random is always there. Gold is not used.
    """
    key = prediction or prediction_key(rows)
    k = len(names)
    pred = rows_scores(rows, key, k)
    measures: dict[str, np.ndarray] = {}
    probs = rows_probabilities(rows, names, ranges)
    if probs is not None:
        measures.update(distribution_measures(probs, pred, ranges))
    if samples is not None:
        s = as_sample_bank(samples)
        if s.shape[0] != len(rows) or s.shape[2] != k:
            raise ValueError(f"samples have shape {s.shape}, expected [{len(rows)}, m, {k}]")
        lo, hi = rubric_bounds(ranges, k)
        measures.update(sample_measures(s, ranges, (lo + hi) // 2 if fallback is None else fallback))
    signals = signals_from_measures(measures, ranges)
    if essays is not None:
        if len(essays) != len(rows):
            raise ValueError(f"{len(essays)} essays for {len(rows)} prediction rows")
        signals["length"] = np.array([essay_word_count(e) for e in essays], dtype=np.float64)
    signals["random"] = random_confidence(len(rows), seed)
    return signals, measures


def attach_confidence(rows: Sequence[dict], names: Sequence[str], ranges, **signal_options) -> list[dict]:
    """Copies of the rows with ``row["confidence"] = {"essay": {signal: float}, "per_rubric":
    {rubric: {measure: float}}}`` (essay signals: higher = more confident; per-rubric measures raw:
    p_pred, std, entropy, sc_agreement, sc_std, sc_vote). Works without gold; options as
    :func:`essay_signals`."""
    return with_confidence(rows, names, *essay_signals(rows, names, ranges, **signal_options))


def with_confidence(rows: Sequence[dict], names: Sequence[str], signals: dict[str, np.ndarray],
                    measures: dict[str, np.ndarray]) -> list[dict]:
    """Copies of the rows with ``row["confidence"]`` built from computed signals [N] and measures
    [N, K] (the layout of :func:`attach_confidence`)."""
    out = []
    for i, row in enumerate(rows):
        per_rubric = {name: {m: _plain(v[i, k]) for m, v in measures.items()} for k, name in enumerate(names)}
        out.append({**row, "confidence": {"essay": {s: float(v[i]) for s, v in signals.items()},
                                          "per_rubric": per_rubric}})
    return out


def _plain(value) -> int | float:
    return int(value) if np.issubdtype(np.asarray(value).dtype, np.integer) else float(value)


# ----------------------------------------------------------------------------- agreement and risk-coverage

def agreement_metrics(gold: np.ndarray, pred: np.ndarray, ranges) -> dict[str, float]:
    """QWK (mean over rubrics of voting.qwk over each full range), exact (share of essay-rubric
    pairs with pred = gold), adjacent (|pred - gold| <= 1) and MAE (mean |pred - gold|)."""
    gold, pred = np.asarray(gold), np.asarray(pred)
    lo, hi = rubric_bounds(ranges, gold.shape[1])
    diff = np.abs(pred - gold)
    return {"qwk": float(np.mean([qwk(gold[:, k], pred[:, k], lo[k], hi[k]) for k in range(gold.shape[1])])),
            "exact": float((diff == 0).mean()), "adjacent": float((diff <= 1).mean()), "mae": float(diff.mean())}


def confidence_order(confidence: np.ndarray) -> np.ndarray:
    """Essay indices, most confident first; ties keep file order (stable sort)."""
    return np.argsort(-np.asarray(confidence, dtype=np.float64), kind="stable")


def kept_count(coverage: float, n: int) -> int:
    """Essays kept at a coverage: max(1, floor(coverage * n + 0.5))."""
    return max(1, math.floor(coverage * n + 0.5))


def risk_curve(confidence: np.ndarray, gold: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """float [N]: entry k-1 is the MAE over the essay-rubric pairs of the k most confident essays."""
    per_essay = np.abs(np.asarray(pred) - np.asarray(gold)).mean(axis=1)[confidence_order(confidence)]
    return np.cumsum(per_essay) / np.arange(1, per_essay.size + 1)


def aurc(confidence: np.ndarray, gold: np.ndarray, pred: np.ndarray) -> float:
    """Area under the risk-coverage curve: (1/N) sum_{k=1..N} MAE(k most confident essays)."""
    return float(risk_curve(confidence, gold, pred).mean())


def risk_coverage_table(confidence: np.ndarray, gold: np.ndarray, pred: np.ndarray, ranges,
                        coverages: Sequence[float] = COVERAGES) -> dict[str, list]:
    """At each coverage, :func:`agreement_metrics` of the kept (most confident) essays:
    ``{"coverage", "n_kept", "qwk", "exact", "adjacent", "mae"}``, one list entry per coverage."""
    order = confidence_order(confidence)
    table: dict[str, list] = {"coverage": [float(c) for c in coverages], "n_kept": []}
    for c in coverages:
        kept = order[:kept_count(c, len(order))]
        table["n_kept"].append(int(kept.size))
        for name, value in agreement_metrics(gold[kept], pred[kept], ranges).items():
            table.setdefault(name, []).append(value)
    return table


# ----------------------------------------------------------------------------- large errors

def large_error_thresholds(ranges) -> np.ndarray:
    """float [K]: 2 points, or 0.1 * (hi - lo) for a rubric whose range is wider than 20 points."""
    lo, hi = rubric_bounds(ranges)
    width = (hi - lo).astype(np.float64)
    return np.where(width > 20, 0.1 * width, 2.0)


def large_errors(gold: np.ndarray, pred: np.ndarray, ranges) -> np.ndarray:
    """bool [N]: |pred - gold| >= the rubric's large-error threshold on some rubric."""
    return (np.abs(np.asarray(pred) - np.asarray(gold)) >= large_error_thresholds(ranges)[None, :]).any(axis=1)


def average_ranks(x: np.ndarray) -> np.ndarray:
    """float [N]: 1-based ranks of x ascending, tied values sharing the mean of their ranks."""
    _, inverse, counts = np.unique(np.asarray(x, dtype=np.float64), return_inverse=True, return_counts=True)
    last = np.cumsum(counts)
    return (last - (counts - 1) / 2.0)[inverse.ravel()]


def auroc(confidence: np.ndarray, errors: np.ndarray) -> float | None:
    """AUROC of -confidence for the positive class ``errors`` (Mann-Whitney):
    (sum of the errors' ranks - P(P+1)/2) / (P * Q), P errors, Q others; None if either is 0."""
    errors = np.asarray(errors, dtype=bool)
    positives, negatives = int(errors.sum()), int((~errors).sum())
    if positives == 0 or negatives == 0:
        return None
    ranks = average_ranks(-np.asarray(confidence, dtype=np.float64))
    return float((ranks[errors].sum() - positives * (positives + 1) / 2.0) / (positives * negatives))


# ----------------------------------------------------------------------------- calibration

def reliability_bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int = N_BINS) -> list[dict]:
    """Equal-width bins over [0, 1] (bin b holds b/n <= p < (b+1)/n, the last one also p = 1):
    per bin ``lower``, ``upper``, ``count``, mean ``confidence`` and ``accuracy`` (None when empty)."""
    p = np.asarray(confidence, dtype=np.float64).ravel()
    hit = np.asarray(correct, dtype=np.float64).ravel()
    index = np.minimum(np.floor(p * n_bins).astype(np.int64), n_bins - 1)
    bins = []
    for b in range(n_bins):
        inside = index == b
        count = int(inside.sum())
        bins.append({"lower": b / n_bins, "upper": (b + 1) / n_bins, "count": count,
                     "confidence": float(p[inside].mean()) if count else None,
                     "accuracy": float(hit[inside].mean()) if count else None})
    return bins


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, n_bins: int = N_BINS) -> float:
    """ECE = sum_b (n_b / n) * |accuracy_b - mean confidence_b| over the equal-width bins."""
    bins = reliability_bins(confidence, correct, n_bins)
    n = sum(b["count"] for b in bins)
    return float(sum(b["count"] / n * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]))


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


# ----------------------------------------------------------------------------- review threshold

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
        if agreement_metrics(gold[kept], pred[kept], ranges)["qwk"] >= min_qwk:
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
            "qwk_auto": agreement_metrics(gold[kept], pred[kept], ranges)["qwk"] if kept.any() else None}


def choose_signal(signals: dict[str, np.ndarray], gold: np.ndarray, pred: np.ndarray,
                  allowed: Sequence[str]) -> str:
    """The signal (among ``allowed``, random excluded) with the lowest AURC on these essays; ties go
    to the earlier name in :data:`SIGNALS`."""
    candidates = [s for s in SIGNALS if s in signals and s in allowed and s != "random"]
    if not candidates:
        raise ValueError("no confidence signal other than random order to choose from")
    return min(candidates, key=lambda s: aurc(signals[s], gold, pred))


# ----------------------------------------------------------------------------- report and calibration

def signal_summaries(signals: dict[str, np.ndarray], gold: np.ndarray, pred: np.ndarray, ranges) -> dict:
    """Per signal: the risk-coverage table, its AURC, the AUROC for large errors, and the full
    risk curve (``curve_coverage`` k/N and ``curve_mae`` for k = 1..N, for the figure)."""
    errors = large_errors(gold, pred, ranges)
    out = {}
    for name, conf in signals.items():
        curve = risk_curve(conf, gold, pred)
        out[name] = {**risk_coverage_table(conf, gold, pred, ranges), "aurc": float(curve.mean()),
                     "auroc": auroc(conf, errors),
                     "curve_coverage": (np.arange(1, curve.size + 1) / curve.size).tolist(),
                     "curve_mae": curve.tolist()}
    return out


def calibration_summary(p_pred: np.ndarray, gold: np.ndarray, pred: np.ndarray) -> dict:
    """ECE and reliability bins of p(predicted score) over all essay-rubric pairs (correct = exact)."""
    correct = np.asarray(pred) == np.asarray(gold)
    return {"ece": expected_calibration_error(p_pred, correct), "n_pairs": int(correct.size),
            "bins": reliability_bins(p_pred, correct)}


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


def _review_target(review_fraction: float | None, min_qwk: float | None) -> dict:
    if review_fraction is not None and min_qwk is not None:
        raise ValueError("give a review fraction or a minimum QWK, not both")
    if min_qwk is not None:
        return {"min_qwk": float(min_qwk)}
    fraction = 0.2 if review_fraction is None else float(review_fraction)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"review fraction must lie in [0, 1], got {fraction}")
    return {"review_fraction": fraction}


def confidence_report(valid_rows: Sequence[dict], test_rows: Sequence[dict], names: Sequence[str], ranges, *,
                      valid_essays: Sequence[str] | None = None, test_essays: Sequence[str] | None = None,
                      valid_samples: np.ndarray | None = None, test_samples: np.ndarray | None = None,
                      target_coverage: float = 0.9, review_fraction: float | None = None,
                      min_qwk: float | None = None, seed: int = 0) -> tuple[dict, dict]:
    """(report, calibration) from validation and test prediction rows, both with gold.

    The report (for ``evaluation_results.json["confidence"]``) is measured on test: per signal the
    risk-coverage table, AURC and AUROC (``signals``); ECE and reliability bins (``calibration``);
    the conformal sets' coverage and size (``conformal``); and the review rule's outcome
    (``review``). Everything chosen (conformal quantiles, review signal and threshold) comes from the
    validation rows alone; that is the ``calibration`` dict, which :func:`apply_calibration` applies
    to new essays. Review target: ``review_fraction`` (default 0.2) or ``min_qwk``.
    """
    if not (has_gold(valid_rows) and has_gold(test_rows)):
        raise ValueError("the confidence report needs gold scores on every validation and test row")
    target = _review_target(review_fraction, min_qwk)
    key = "weighted" if prediction_key(valid_rows) == prediction_key(test_rows) == "weighted" else "greedy"
    k = len(names)
    gold_v, pred_v = rows_scores(valid_rows, "gold", k), rows_scores(valid_rows, key, k)
    gold_t, pred_t = rows_scores(test_rows, "gold", k), rows_scores(test_rows, key, k)
    # Test rows get the calibration's seed: apply_calibration then stores the same random order.
    sig_v, _ = essay_signals(valid_rows, names, ranges, prediction=key, essays=valid_essays,
                             samples=valid_samples, seed=seed + 1)
    sig_t, meas_t = essay_signals(test_rows, names, ranges, prediction=key, essays=test_essays,
                                  samples=test_samples, seed=seed)
    signal = choose_signal(sig_v, gold_v, pred_v, allowed=list(sig_t))
    threshold = (threshold_for_min_qwk(sig_v[signal], gold_v, pred_v, ranges, target["min_qwk"])
                 if "min_qwk" in target else threshold_for_review_fraction(sig_v[signal], target["review_fraction"]))
    calibration = {"prediction": key, "rubrics": list(names), "ranges": [list(r) for r in ranges],
                   "signal": signal, "selected_by": "lowest AURC on the validation essays",
                   "review": {**target, "threshold": threshold}, "seed": seed, "conformal": None}
    report = {"prediction": key, "n_valid": len(valid_rows), "n_test": len(test_rows),
              "large_error_rule": LARGE_ERROR_RULE,
              "large_errors": int(large_errors(gold_t, pred_t, ranges).sum()),
              "signals": signal_summaries(sig_t, gold_t, pred_t, ranges), "calibration": None, "conformal": None,
              "review": {"signal": signal, "selected_by": calibration["selected_by"], **target,
                         "threshold": threshold,
                         "valid": review_outcome(review_flags(sig_v[signal], threshold), gold_v, pred_v, ranges),
                         "test": review_outcome(review_flags(sig_t[signal], threshold), gold_t, pred_t, ranges),
                         "test_qwk_all": agreement_metrics(gold_t, pred_t, ranges)["qwk"]}}
    probs_v, probs_t = rows_probabilities(valid_rows, names, ranges), rows_probabilities(test_rows, names, ranges)
    if key == "weighted" and probs_v is not None and probs_t is not None:
        report["calibration"] = calibration_summary(meas_t["p_pred"], gold_t, pred_t)
        quantiles = calibrate_conformal(probs_v, gold_v, ranges, names, target_coverage)
        calibration["conformal"] = {"method": "LAC", "target_coverage": target_coverage, "quantiles": quantiles}
        sets = rows_score_sets(probs_t, quantiles, ranges, names)
        reached = {name: set_coverage(sets[name], gold_t[:, j]) for j, name in enumerate(names)}
        report["conformal"] = {**calibration["conformal"],
                               "coverage": {n: c for n, (c, _) in reached.items()},
                               "mean_set_size": {n: s for n, (_, s) in reached.items()},
                               "average_coverage": float(np.mean([c for c, _ in reached.values()])),
                               "average_set_size": float(np.mean([s for _, s in reached.values()]))}
    return report, calibration


def apply_calibration(rows: Sequence[dict], calibration: dict, *, essays: Sequence[str] | None = None,
                      samples: np.ndarray | None = None) -> list[dict]:
    """Copies of new essays' prediction rows (gold not needed) with their ``confidence``
    (:func:`attach_confidence`), conformal ``score_sets`` {rubric: [scores]} (None without
    distributions or conformal calibration) and ``review`` flag under the saved calibration."""
    names, ranges = calibration["rubrics"], [tuple(r) for r in calibration["ranges"]]
    options = dict(prediction=calibration["prediction"], essays=essays, samples=samples, seed=calibration["seed"])
    signals, measures = essay_signals(rows, names, ranges, **options)
    signal = calibration["signal"]
    if signal not in signals:
        needs = ("the essay texts" if signal == "length" else "a sample bank" if signal in SAMPLE_SIGNALS
                 else "weighted distributions (probabilities)")
        raise ValueError(f"the calibration's review signal {signal!r} needs {needs} for these essays")
    flags = review_flags(signals[signal], calibration["review"]["threshold"])
    probs = rows_probabilities(rows, names, ranges)
    conformal = calibration.get("conformal")
    sets = rows_score_sets(probs, conformal["quantiles"], ranges, names) if conformal and probs else None
    out = with_confidence(rows, names, signals, measures)
    for i, row in enumerate(out):
        row["score_sets"] = {n: sets[n][i] for n in names} if sets else None
        row["review"] = bool(flags[i])
    return out


def sample_bank_report(samples: np.ndarray, gold: np.ndarray, ranges, fallback, *,
                       essays: Sequence[str] | None = None, seed: int = 0) -> tuple[dict, dict, dict]:
    """(report, signals, measures) of a sample bank judged on its own majority vote: risk-coverage
    tables, AURC and AUROC for sc_agreement, neg_sc_std, length (with ``essays``) and random;
    signals {name: [N]}, measures the per-rubric ``sc_vote``, ``sc_agreement`` and ``sc_std`` [N, K]."""
    measures = sample_measures(samples, ranges, fallback)
    signals = signals_from_measures(measures, ranges)
    if essays is not None:
        signals["length"] = np.array([essay_word_count(e) for e in essays], dtype=np.float64)
    signals["random"] = random_confidence(len(gold), seed)
    gold = np.asarray(gold, dtype=np.int64)
    pred = measures["sc_vote"]
    report = {"prediction": "majority vote of all samples", "n_essays": int(gold.shape[0]),
              "large_error_rule": LARGE_ERROR_RULE, "large_errors": int(large_errors(gold, pred, ranges).sum()),
              "signals": signal_summaries(signals, gold, pred, ranges)}
    return report, signals, measures


# ----------------------------------------------------------------------------- printed tables

def _num(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_signal_tables(signals: dict) -> str:
    """One risk-coverage block per signal: coverage rows with kept essays, QWK, exact, adjacent,
    MAE; then the AURC and the AUROC for large errors."""
    lines = []
    for name, s in signals.items():
        lines.append(f"{name}: AURC {_num(s['aurc'])}  AUROC(large error) {_num(s['auroc'])}")
        lines.append(f"  {'coverage':>8} {'n':>5} {'QWK':>7} {'exact':>7} {'adjac.':>7} {'MAE':>7}")
        for i, c in enumerate(s["coverage"]):
            lines.append(f"  {100 * c:>7.0f}% {s['n_kept'][i]:>5d} {s['qwk'][i]:>7.3f} {s['exact'][i]:>7.3f} "
                         f"{s['adjacent'][i]:>7.3f} {s['mae'][i]:>7.3f}")
    return "\n".join(lines)


def format_confidence_report(report: dict) -> str:
    """The printed confidence section: signal tables, ECE, conformal coverage and set size, and the
    review rule's outcome on test."""
    n = report.get("n_test", report.get("n_essays"))
    lines = [f"confidence ({n} essays; prediction judged: {report['prediction']}; higher = more confident)",
             f"large error: {report['large_error_rule']}: {report['large_errors']} of {n} essays",
             format_signal_tables(report["signals"])]
    if report.get("calibration"):
        lines.append(f"ECE of p(predicted score), 10 bins: {report['calibration']['ece']:.4f}")
    if report.get("conformal"):
        c = report["conformal"]
        lines.append(f"conformal score sets ({c['method']}, target {100 * c['target_coverage']:.0f}%): coverage "
                     f"{100 * c['average_coverage']:.1f}%, mean set size {c['average_set_size']:.2f}")
    if report.get("review"):
        r = report["review"]
        target = (f"min QWK {r['min_qwk']:.3f}" if "min_qwk" in r else f"review {100 * r['review_fraction']:.0f}%")
        lines.append(f"review ({target} on validation, signal {r['signal']}): test share to review "
                     f"{100 * r['test']['review_share']:.1f}%, QWK auto-scored {_num(r['test']['qwk_auto'])} "
                     f"(all essays {r['test_qwk_all']:.3f})")
    return "\n".join(lines)
