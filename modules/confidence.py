"""Which predicted scores to trust, part 1: the per-essay confidence signals (SPEC §6).

Plain numpy (no torch), so it runs in ``self_consistency.py analyze`` and on saved prediction rows.
The conformal score sets and the review rule are :mod:`modules.review`; the report that measures
every signal on test essays is :mod:`modules.confidence_report`.

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
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from modules.checks import rubric_bounds
from modules.voting import INVALID, as_sample_bank, majority_vote

logger = logging.getLogger(__name__)

DISTRIBUTION_SIGNALS = ("p_pred", "neg_std", "neg_entropy")
SAMPLE_SIGNALS = ("sc_agreement", "neg_sc_std")
BASELINE_SIGNALS = ("length", "random")
SIGNALS = DISTRIBUTION_SIGNALS + SAMPLE_SIGNALS + BASELINE_SIGNALS


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
    """The rows' final prediction: ``"final"`` when every row has one (a run's score map,
    :mod:`modules.calibrate`), else ``"weighted"`` when every row has a weighted prediction, else
    ``"greedy"``."""
    for key in ("final", "weighted"):
        if rows and all(r.get(key) is not None for r in rows):
            return key
    return "greedy"


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
