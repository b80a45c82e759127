"""The QWK evaluation of a split's prediction rows (SPEC §6), its printed table, and the confidence
study chosen on validation rows.

The rows themselves (greedy and weighted, per essay) come from :mod:`modules.predict`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from modules.data import DatasetInfo
from modules.metrics import mean_qwk, qwk, rubric_qwks
from modules.predict import underflow_count
from modules.score_lines import decoding_mode


def _score_block(predictions: list[dict], info: DatasetInfo, key: str) -> dict:
    gold = np.array([p["gold"] for p in predictions], dtype=int).reshape(len(predictions), -1)
    pred = np.array([p[key] for p in predictions], dtype=int).reshape(len(predictions), -1)
    block = dict(zip(info.rubric_names, rubric_qwks(gold, pred, info.ranges)))
    lo, hi = min(r.min for r in info.rubrics), max(r.max for r in info.rubrics)
    block["overall"] = qwk(gold.ravel(), pred.ravel(), lo, hi)
    block["average"] = mean_qwk(gold, pred, info.ranges)
    return block


def evaluate_predictions(predictions: list[dict], info: DatasetInfo) -> dict:
    """QWK per rubric, pooled over all essay-rubric pairs (``overall``) and averaged, for the
    greedy (``token``) and weighted predictions, and the score head's (``head``) and the score map's
    (``final``) where every row has them; ``weighted`` is left out when not computed.
    ``token.invalid`` counts essays whose score line was invalid, ``weighted.underflow`` the
    essay-rubric pairs whose weighted distribution underflowed to uniform."""
    if not predictions:
        raise ValueError("no predictions to evaluate")
    results = {"token": _score_block(predictions, info, "greedy")}
    results["token"]["invalid"] = sum(not p["valid"] for p in predictions)
    results["token"]["truncated"] = sum(bool(p.get("truncated")) for p in predictions)
    if all(p.get("weighted") is not None for p in predictions):
        results["weighted"] = _score_block(predictions, info, "weighted")
        results["weighted"]["underflow"] = underflow_count(predictions)
    for key in ("head", "final"):
        if all(p.get(key) is not None for p in predictions):
            results[key] = _score_block(predictions, info, key)
    return results


def format_results_table(results: dict, info: DatasetInfo, constrained: bool = False) -> str:
    """Plain-text QWK table: rubrics, overall and average down, token and weighted (and the score
    head's and the score map's final) across, then the invalid and truncated counts and the
    decoding mode that produced the greedy answers."""
    rows = info.rubric_names + ["overall", "average"]
    blocks = ["token", "weighted", *(b for b in ("head", "final") if b in results)]
    counts = [row for row in ("invalid", "truncated", "underflow") if any(row in results.get(b, {}) for b in blocks)]
    width = max(len(r) for r in rows + counts)

    def cell(block: str, row: str) -> str:
        value = results.get(block, {}).get(row)
        if isinstance(value, float):
            return f"{value:>9.4f}"
        return f"{value:>9d}" if isinstance(value, int) else f"{'-':>9}"

    lines = [f"{'rubric':<{width}}  " + "  ".join(f"{b:>9}" for b in blocks)]
    lines += [f"{row:<{width}}  " + "  ".join(cell(b, row) for b in blocks) for row in rows + counts]
    lines.append(f"decoding: {decoding_mode(constrained)}")
    return "\n".join(lines)


CONFIDENCE_CALIBRATION = "confidence_calibration.json"
RISK_COVERAGE_PNG = "risk_coverage.png"
RELIABILITY_PNG = "reliability_diagram.png"


def evaluate_confidence(valid_predictions: list[dict], test_predictions: list[dict], info: DatasetInfo,
                        out_dir: Path, *, valid_essays: Sequence[str], test_essays: Sequence[str], title: str,
                        valid_samples=None, test_samples=None, target_coverage: float = 0.9, review_fraction: float | None = None,
                        min_qwk: float | None = None, seed: int = 0) -> tuple[list[dict], dict, dict]:
    """Which test predictions to trust (issue 20), with everything chosen on the validation rows.

    Returns (the test rows with ``confidence``, conformal ``score_sets`` and ``review`` flag, as
    predictions.jsonl stores them; the report for ``evaluation_results.json["confidence"]``; the
    calibration). Writes the calibration to ``out_dir/confidence_calibration.json``, to be applied to
    new essays with :func:`modules.confidence_report.apply_calibration`, and the figures
    ``risk_coverage.png`` and (with weighted distributions) ``reliability_diagram.png``.
    ``valid_samples``, ``test_samples``: optional sample banks [N, m, K] in the rows' order for the
    SC signals.
    """
    from modules.confidence_report import apply_calibration, confidence_report
    from modules.jsonio import write_json_atomic
    from modules.plots import plot_reliability, plot_risk_coverage

    report, calibration = confidence_report(
        valid_predictions, test_predictions, info.rubric_names, info.ranges, valid_essays=valid_essays,
        test_essays=test_essays, valid_samples=valid_samples, test_samples=test_samples, target_coverage=target_coverage,
        review_fraction=review_fraction, min_qwk=min_qwk, seed=seed)
    rows = apply_calibration(test_predictions, calibration, essays=test_essays, samples=test_samples)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / CONFIDENCE_CALIBRATION, calibration)
    plot_risk_coverage(report["signals"], out_dir / RISK_COVERAGE_PNG, title)
    if report["calibration"]:
        plot_reliability(report["calibration"], out_dir / RELIABILITY_PNG, title)
    return rows, report, calibration


def write_scores_csv(path: Path, rows: Sequence[dict], info: DatasetInfo, signal: str | None) -> None:
    """``scores.csv``, the file a teacher or an analyst opens first: one line per essay with its id,
    each rubric's final score (the score map's where the run has one, else the weighted prediction
    where it was computed, else the greedy one),
    its confidence (the essay's value of ``signal``, the review signal chosen on validation essays;
    empty without one) and its review flag (empty without a calibration)."""
    import csv
    import io

    from modules.jsonio import write_text_atomic

    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["id", *info.rubric_names, f"confidence ({signal})" if signal else "confidence", "review"])
    for row in rows:
        scores = next(row[key] for key in ("final", "weighted", "greedy") if row.get(key) is not None)
        confidence = (row.get("confidence") or {}).get("essay", {}).get(signal) if signal else None
        review = row.get("review")
        writer.writerow([row["id"], *scores, "" if confidence is None else f"{confidence:.6g}",
                         "" if review is None else int(review)])
    write_text_atomic(path, out.getvalue())
