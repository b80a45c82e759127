"""Which predicted scores to trust, part 3: the confidence report and its calibration (SPEC §6).

:func:`confidence_report` chooses everything on the validation essays (signal, review threshold,
conformal quantiles: :mod:`modules.review`) and measures it on the test essays; the calibration it
returns is what :func:`apply_calibration` applies to new essays. Plain numpy.

* Risk-coverage: essays are ranked by confidence, most confident first; **ties keep file order**
  (a stable sort), so a constant signal keeps the essays in file order. Coverage c keeps the
  ``max(1, floor(c * N + 0.5))`` most confident essays. Risk is the mean absolute error over the
  kept essay-rubric pairs, in score points. AURC is the discrete area
  ``(1/N) * sum_{k=1..N} MAE(k most confident essays)`` (no trapezoid): :mod:`modules.metrics`.
* A *large error* on an essay: ``|pred - gold| >= 2`` on some rubric, or ``>= 0.1 * (hi - lo)``
  on a rubric whose range is wider than 20 points. AUROC measures how well low confidence ranks
  the large-error essays above the others (0.5 = random order, ties count one half).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from modules.checks import rubric_bounds
from modules.confidence import (SAMPLE_SIGNALS, essay_signals, essay_word_count, has_gold, prediction_key,
                                random_confidence, rows_probabilities, rows_scores, sample_measures,
                                signals_from_measures, with_confidence)
from modules.metrics import agreement, auroc, confidence_order, expected_calibration_error, reliability_bins, risk_curve
from modules.review import (review_target, calibrate_conformal, choose_signal, review_flags, review_outcome,
                            rows_score_sets, set_coverage, threshold_for_min_qwk, threshold_for_review_fraction)

COVERAGES = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
LARGE_ERROR_RULE = "|pred - gold| >= 2 on some rubric (>= 10% of the range for ranges wider than 20 points)"


# ----------------------------------------------------------------------------- risk-coverage and large errors

def kept_count(coverage: float, n: int) -> int:
    """Essays kept at a coverage: max(1, floor(coverage * n + 0.5))."""
    return max(1, math.floor(coverage * n + 0.5))


def risk_coverage_table(confidence: np.ndarray, gold: np.ndarray, pred: np.ndarray, ranges,
                        coverages: Sequence[float] = COVERAGES) -> dict[str, list]:
    """At each coverage, :func:`modules.metrics.agreement` of the kept (most confident) essays:
    ``{"coverage", "n_kept", "qwk", "exact", "adjacent", "mae"}``, one list entry per coverage."""
    order = confidence_order(confidence)
    table: dict[str, list] = {"coverage": [float(c) for c in coverages], "n_kept": []}
    for c in coverages:
        kept = order[:kept_count(c, len(order))]
        table["n_kept"].append(int(kept.size))
        for name, value in agreement(gold[kept], pred[kept], ranges).items():
            table.setdefault(name, []).append(value)
    return table


def large_error_thresholds(ranges) -> np.ndarray:
    """float [K]: 2 points, or 0.1 * (hi - lo) for a rubric whose range is wider than 20 points."""
    lo, hi = rubric_bounds(ranges)
    width = (hi - lo).astype(np.float64)
    return np.where(width > 20, 0.1 * width, 2.0)


def large_errors(gold: np.ndarray, pred: np.ndarray, ranges) -> np.ndarray:
    """bool [N]: |pred - gold| >= the rubric's large-error threshold on some rubric."""
    return (np.abs(np.asarray(pred) - np.asarray(gold)) >= large_error_thresholds(ranges)[None, :]).any(axis=1)


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
    target = review_target(review_fraction, min_qwk)
    key = prediction_key(valid_rows) if prediction_key(valid_rows) == prediction_key(test_rows) else "greedy"
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
                         "test_qwk_all": agreement(gold_t, pred_t, ranges)["qwk"]}}
    probs_v, probs_t = rows_probabilities(valid_rows, names, ranges), rows_probabilities(test_rows, names, ranges)
    if key != "greedy" and probs_v is not None and probs_t is not None:
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
