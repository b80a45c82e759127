"""Predictions for a whole split (greedy and weighted, per essay) and their QWK evaluation (SPEC §6).

The model queries themselves (greedy score lines, weighted expected scores) are in
:mod:`modules.scoring`; this module turns them into per-essay prediction rows, scores the rows
against the gold scores, and formats the results table.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from modules.data import DatasetInfo, EssayRecord, build_prompt
from modules.score_lines import decoding_mode
from modules.scoring import greedy_predict, greedy_with_prompt_states, weighted_predict
from modules.metrics import mean_qwk, qwk, rubric_qwks

logger = logging.getLogger(__name__)


def _round_half_up(x: float, lo: int, hi: int) -> int:
    return int(min(max(np.floor(x + 0.5), lo), hi))


def greedy_row(record: EssayRecord, answer: dict, fallback: Sequence[int]) -> dict:
    """One essay's greedy prediction from its answer (:func:`~modules.scoring.greedy_predict`'s
    dicts): the parsed scores, or ``fallback`` (the rubric midpoints) for an invalid or truncated
    line, marked ``valid: False``."""
    parsed = answer["scores"]
    return {"id": record.id, "gold": None if record.scores is None else list(record.scores),
            "greedy": parsed or list(fallback), "text": answer["text"], "valid": parsed is not None,
            "truncated": answer.get("truncated", False)}


def prediction_row(model, tokenizer, record: EssayRecord, answer: dict, state, info: DatasetInfo) -> dict:
    """One essay's prediction dict (:func:`predict_split`'s rows): its greedy row from ``answer``
    and, when ``state`` (its prompt's :class:`~modules.scoring.PromptState`) is given, the weighted
    prediction continuing from that state, conditioned on the greedy scores when they are valid."""
    pred = {**greedy_row(record, answer, [r.midpoint for r in info.rubrics]), "weighted": None,
            "weighted_expected": None, "probabilities": None, "weighted_underflow": None}
    if state is not None:
        ranges = info.ranges
        expected, probs, underflow = weighted_predict(model, tokenizer, state, ranges, prefix_scores=answer["scores"])
        pred["weighted"] = [_round_half_up(e, lo, hi) for e, (lo, hi) in zip(expected, ranges)]
        pred["weighted_expected"] = expected
        pred["probabilities"] = dict(zip(info.rubric_names, probs))
        pred["weighted_underflow"] = [info.rubric_names[k] for k in underflow]
    return pred


def predict_split(model, tokenizer, records: Sequence[EssayRecord], info: DatasetInfo, *, mtl: bool,
                  prompt_format: str = "chat", max_prompt_tokens: int | None = None, batch_size: int = 8,
                  weighted: bool = True, generate_feedback: bool = False, constrained: bool = False) -> list[dict]:
    """Greedy (and weighted) predictions for every record, one dict each.

    Prompts are built as in training (``max_prompt_tokens``: the run's essay shortening). An
    invalid or truncated generated line scores each rubric's midpoint and is marked ``valid: False``.
    The weighted prediction conditions later rubrics on the greedy scores when they are valid
    (what the model actually wrote), else on its own per-rubric argmax. ``weighted_underflow``
    names the rubrics whose candidate probabilities underflowed and were replaced by the uniform
    distribution (usually none). Without ``weighted`` the weighted keys hold None. ``constrained``:
    greedy decoding restricted to valid score lines (``--constrained``); the weighted prediction is
    unchanged (it already only weighs valid values).

    With ``weighted``, each prompt runs through the model once: greedy decoding and the weighted
    scorer both continue from its forward (:func:`~modules.scoring.greedy_with_prompt_states`).
    """
    ranges = info.ranges
    prompts = [build_prompt(r, info, tokenizer, mtl, prompt_format, max_prompt_tokens) for r in records]
    greedy = {"batch_size": batch_size, "generate_feedback": generate_feedback, "constrained": constrained}
    if weighted:
        scored = tqdm(greedy_with_prompt_states(model, tokenizer, prompts, ranges, **greedy), total=len(prompts),
                      desc="scoring", unit="essay", disable=None)
    else:
        scored = ((answer, None) for answer in greedy_predict(model, tokenizer, prompts, ranges, **greedy))
    predictions = [prediction_row(model, tokenizer, record, answer, state, info) for record, (answer, state) in
                   zip(records, scored)]
    invalid = sum(not p["valid"] for p in predictions)
    if invalid:
        logger.warning("%d of %d generated score lines were invalid; scored with the rubric midpoints",
                       invalid, len(predictions))
    underflow = _underflow_count(predictions)
    if underflow:
        logger.warning("%d essay-rubric weighted predictions underflowed and used a uniform distribution", underflow)
    return predictions


def _underflow_count(predictions: list[dict]) -> int:
    # .get(): rows written before the key existed count as no underflow.
    return sum(len(p.get("weighted_underflow") or ()) for p in predictions)


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
    greedy (``token``) and weighted predictions; ``weighted`` is left out when not computed.
    ``token.invalid`` counts essays whose score line was invalid, ``weighted.underflow`` the
    essay-rubric pairs whose weighted distribution underflowed to uniform."""
    if not predictions:
        raise ValueError("no predictions to evaluate")
    results = {"token": _score_block(predictions, info, "greedy")}
    results["token"]["invalid"] = sum(not p["valid"] for p in predictions)
    results["token"]["truncated"] = sum(bool(p.get("truncated")) for p in predictions)
    if all(p.get("weighted") is not None for p in predictions):
        results["weighted"] = _score_block(predictions, info, "weighted")
        results["weighted"]["underflow"] = _underflow_count(predictions)
    return results


def format_results_table(results: dict, info: DatasetInfo, constrained: bool = False) -> str:
    """Plain-text QWK table: rubrics, overall and average down, token and weighted across, then
    the invalid and truncated counts and the decoding mode that produced the greedy answers."""
    rows = info.rubric_names + ["overall", "average"]
    counts = [row for row in ("invalid", "truncated", "underflow")
              if any(row in results.get(b, {}) for b in ("token", "weighted"))]
    width = max(len(r) for r in rows + counts)

    def cell(block: str, row: str) -> str:
        value = results.get(block, {}).get(row)
        if isinstance(value, float):
            return f"{value:>9.4f}"
        return f"{value:>9d}" if isinstance(value, int) else f"{'-':>9}"

    lines = [f"{'rubric':<{width}}  {'token':>9}  {'weighted':>9}"]
    lines += [f"{row:<{width}}  {cell('token', row)}  {cell('weighted', row)}" for row in rows + counts]
    lines.append(f"decoding: {decoding_mode(constrained)}")
    return "\n".join(lines)


CONFIDENCE_CALIBRATION = "confidence_calibration.json"
RISK_COVERAGE_PNG = "risk_coverage.png"
RELIABILITY_PNG = "reliability_diagram.png"


def evaluate_confidence(valid_predictions: list[dict], test_predictions: list[dict], info: DatasetInfo,
                        out_dir: Path, *, valid_essays: Sequence[str], test_essays: Sequence[str], title: str,
                        test_samples=None, target_coverage: float = 0.9, review_fraction: float | None = None,
                        min_qwk: float | None = None, seed: int = 0) -> tuple[list[dict], dict, dict]:
    """Which test predictions to trust (issue 20), with everything chosen on the validation rows.

    Returns (the test rows with ``confidence``, conformal ``score_sets`` and ``review`` flag, as
    predictions.jsonl stores them; the report for ``evaluation_results.json["confidence"]``; the
    calibration). Writes the calibration to ``out_dir/confidence_calibration.json``, to be applied to
    new essays with :func:`modules.confidence_report.apply_calibration`, and the figures
    ``risk_coverage.png`` and (with weighted distributions) ``reliability_diagram.png``.
    ``test_samples``: an optional sample bank [N, m, K] in test-row order for the SC signals.
    """
    from modules.confidence_report import apply_calibration, confidence_report
    from modules.jsonio import write_json_atomic
    from modules.plots import plot_reliability, plot_risk_coverage

    report, calibration = confidence_report(
        valid_predictions, test_predictions, info.rubric_names, info.ranges, valid_essays=valid_essays,
        test_essays=test_essays, test_samples=test_samples, target_coverage=target_coverage,
        review_fraction=review_fraction, min_qwk=min_qwk, seed=seed)
    rows = apply_calibration(test_predictions, calibration, essays=test_essays, samples=test_samples)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / CONFIDENCE_CALIBRATION, calibration)
    plot_risk_coverage(report["signals"], out_dir / RISK_COVERAGE_PNG, title)
    if report["calibration"]:
        plot_reliability(report["calibration"], out_dir / RELIABILITY_PNG, title)
    return rows, report, calibration
