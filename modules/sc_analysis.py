"""A self-consistency sample bank's analysis (SPEC §6): the files ``self_consistency.py`` writes from it.

:func:`analyze_bank` turns a finished bank (:mod:`modules.bank`) into the QWK-vs-m curves and their
bootstrap bands (:mod:`modules.curves`), the best scores (:mod:`modules.voting`), the confidence of
the majority vote (:mod:`modules.confidence_report`) and the figures (:mod:`modules.plots`), written
into a folder: ``curves.json``, ``best_qwk_scores.json``, ``confidence.json``, ``confidence.jsonl``
and the PNGs. It prints nothing; the command line prints the summary.

Imports neither torch nor transformers: ``self_consistency.py analyze`` runs without them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from modules.bank import bank_samples
from modules.confidence import with_confidence
from modules.confidence_report import sample_bank_report
from modules.curves import bootstrap_curves, qwk_curves
from modules.data import DatasetInfo, EssayRecord
from modules.jsonio import write_json_atomic, write_jsonl_atomic
from modules.plots import plot_average, plot_overall, plot_per_rubric, plot_risk_coverage
from modules.voting import INVALID, best_scores


def make_title(config_args: dict, m: int) -> str:
    """Model, sampling settings and m for the figures; parts the config does not know are left out."""
    parts = []
    if config_args.get("adapter_dir"):
        parts.append(f"{Path(config_args['adapter_dir']).name} on {config_args.get('base_model_name', '?')}")
    parts += [f"{label}={config_args[key]}" for key, label in (("temperature", "T"), ("top_k", "top_k"), ("top_p", "top_p"))
              if config_args.get(key) is not None]
    if config_args.get("constrained"):
        parts.append("constrained")
    return ", ".join(parts + [f"max m={m}"])


def analyze_bank(bank_path: Path, test_path: str, records: Sequence[EssayRecord], info: DatasetInfo, out_dir: Path,
                 *, fallback: list[int], n_bootstrap: int, seed: int, baselines: dict | None,
                 config_args: dict) -> tuple[dict, dict]:
    """Votes, curves, bootstrap bands, best scores and figures of a bank; writes them into out_dir.

    Also the confidence of the majority vote over all samples (modules.confidence): per essay in
    ``confidence.jsonl``, the risk-coverage tables with AURC and AUROC of the self-consistency signals
    (agreement share, sample std) against essay length and random order in ``confidence.json``, and
    ``risk_coverage.png``.

    Essays are taken in test-file order, so the result does not depend on the bank's line order.
    """
    samples, truncated = bank_samples(bank_path, test_path, records, info)
    n, m, _ = samples.shape
    gold = np.array([r.scores for r in records], dtype=np.int64)

    curves = qwk_curves(samples, gold, info.ranges, fallback, rubric_names=info.rubric_names)
    if n_bootstrap:
        curves["bootstrap"] = bootstrap_curves(samples, gold, info.ranges, fallback, n_orderings=n_bootstrap,
                                               seed=seed, rubric_names=info.rubric_names)
    invalid = int((samples == INVALID).all(axis=2).sum())
    curves.update(invalid_rate=invalid / (n * m), invalid_samples=invalid, truncated_samples=truncated,
                  fallback=list(fallback))
    best = best_scores(curves)

    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "curves.json", curves)
    write_json_atomic(out_dir / "best_qwk_scores.json", best)
    title = make_title(config_args, m)
    plot_overall(curves, baselines, out_dir / "overall_qwk_vs_m.png", title)
    plot_average(curves, baselines, out_dir / "average_qwk_vs_m.png", title)
    plot_per_rubric(curves, baselines, out_dir / "per_rubric_qwk_vs_m.png", title)

    report, signals, measures = sample_bank_report(samples, gold, info.ranges, fallback,
                                                   essays=[r.essay for r in records], seed=seed)
    write_json_atomic(out_dir / "confidence.json", report)
    write_jsonl_atomic(out_dir / "confidence.jsonl",
                       with_confidence([{"id": r.id} for r in records], info.rubric_names, signals, measures))
    plot_risk_coverage(report["signals"], out_dir / "risk_coverage.png", title)
    return curves, best
