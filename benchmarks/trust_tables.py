"""The "Which scores to trust" section of the real-essay tables (results with a ``confidence``
study, per variant; the judged row is the weighted one): per signal, on test, the AUROC for large
errors, the average QWK of all essays (QWK@100%) and of the 80% most confident (QWK@80%), and their
difference with the hierarchical bootstrap of ``real_essay_tables.py``, paired: each essay resample
keeps its own 80% most confident essays by the signal and compares their QWK with that of the whole
resample. The signal is picked on the validation essays only: the lowest validation AURC
(modules.metrics.aurc), averaged over seeds, among the signals every seed has (random order
excluded). Then the picked signal minus random order at 80% coverage (both kept sets from the same
resample), each seed's conformal coverage and set size and review outcome (calibrated on
validation), and one plain sentence for users.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from benchmarks.result_files import format_spread, row_name, row_predictions
from modules import confidence as conf
from modules.confidence_report import LARGE_ERROR_RULE, kept_count, large_errors
from modules.metrics import aurc, auroc, batched_mean_qwk, seed_essay_interval

if TYPE_CHECKING:  # for annotations only: real_essay_tables imports this module
    from benchmarks.real_essay_tables import Group

TRUST_COVERAGE = 0.8  # the confidence study's coverage: the 80% most confident essays are auto-scored


def kept_qwk(confidence, gold: np.ndarray, pred: np.ndarray, idx: np.ndarray,
             coverage: float = TRUST_COVERAGE) -> np.ndarray:
    """[B]: average QWK of the ``coverage`` most confident essays of each resample ``idx[b]``
    (essay indices [B, N]); ``confidence`` None keeps every resampled essay. Within a resample the
    order is :func:`modules.metrics.confidence_order`'s (stable: ties keep resample order) and
    the kept count is :func:`modules.confidence_report.kept_count` of the resample's size."""
    if confidence is None:
        return batched_mean_qwk(gold[idx], pred[idx])
    order = np.argsort(-np.asarray(confidence, dtype=np.float64)[idx], axis=1, kind="stable")
    kept = np.take_along_axis(idx, order[:, :kept_count(coverage, idx.shape[1])], axis=1)
    return batched_mean_qwk(gold[kept], pred[kept])


def selective_gain(confidence, gold, pred, idx: np.ndarray, coverage: float = TRUST_COVERAGE,
                   reference=None) -> np.ndarray:
    """[B]: on each essay resample, QWK of the ``coverage`` most confident by ``confidence`` minus
    QWK of all resampled essays (``reference`` None) or of the ``coverage`` most confident by
    ``reference`` (e.g. random order). Paired: both sides see the same resample."""
    gold, pred = np.asarray(gold), np.asarray(pred)
    return kept_qwk(confidence, gold, pred, idx, coverage) - kept_qwk(reference, gold, pred, idx, coverage)


def gain_with_interval(gold, confidences: Sequence, preds: Sequence, n: int, seed: int,
                       references: Sequence | None = None) -> tuple[float, float, float]:
    """(point, lo, hi) of :func:`selective_gain` over seeds and essays: point = mean over seeds of
    the full-sample gain; the interval from :func:`seed_essay_interval` (seeds, then test essays)."""
    gold = np.asarray(gold)
    refs = list(references) if references is not None else [None] * len(confidences)
    whole = np.arange(gold.shape[0])[None, :]
    point = float(np.mean([selective_gain(c, gold, p, whole, reference=r)[0]
                           for c, p, r in zip(confidences, preds, refs)]))
    lo, hi = seed_essay_interval(lambda s, idx: selective_gain(confidences[s], gold, preds[s], idx, reference=refs[s]),
                                 len(confidences), gold.shape[0], n, seed)
    return point, lo, hi


def trust_seeds(group: Group, variant: str) -> dict[int, dict]:
    """seed -> the confidence study's inputs of ``variant``'s judged row: per split ``signals``
    {name: [N]} and ``pred`` [N, K], and the run's ``report`` (results without a study are left out)."""
    out = {}
    for r in group.results:
        study = r.get("confidence")
        if r["variant"] != variant or not study:
            continue
        out[r["seed"]] = {"prediction": study["prediction"], "report": study.get("report") or {},
                          **{split: {"signals": {k: np.asarray(v, dtype=np.float64) for k, v in sig.items()},
                                     "pred": row_predictions(r, split, study["prediction"])}
                             for split, sig in study["signals"].items()}}
    return out


def pick_signal(valid: Sequence[tuple[dict, np.ndarray, np.ndarray]]) -> tuple[str, dict[str, float]]:
    """The signal with the lowest validation AURC (:func:`modules.metrics.aurc`), averaged over
    seeds; ``valid``: per seed (signals, gold, pred) of the validation essays. Candidates: the signals
    every seed has, random order excluded; ties go to the earlier name in ``confidence.SIGNALS``
    (with one seed the same choice as ``confidence.choose_signal``). Returns (signal, mean AURCs)."""
    names = [s for s in conf.SIGNALS if s != "random" and all(s in signals for signals, _, _ in valid)]
    if not names:
        raise ValueError("no confidence signal other than random order to pick from")
    aurcs = {s: float(np.mean([aurc(signals[s], gold, pred) for signals, gold, pred in valid])) for s in names}
    return min(names, key=aurcs.__getitem__), aurcs


def _interval(point: float, lo: float, hi: float) -> str:
    return f"{point:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def trust_lines(group: Group, variant: str, n: int, seed: int) -> list[str]:
    """The "Which scores to trust" section of one variant (the module docstring says what it holds)."""
    by_seed = trust_seeds(group, variant)
    if not by_seed or "valid" not in group.gold:
        return []
    seeds = sorted(by_seed)
    gold_t, gold_v = group.gold["test"], group.gold["valid"]
    prediction = by_seed[seeds[0]]["prediction"]
    picked, aurcs = pick_signal([(by_seed[s]["valid"]["signals"], gold_v, by_seed[s]["valid"]["pred"]) for s in seeds])
    n_test = gold_t.shape[0]
    n_kept = kept_count(TRUST_COVERAGE, n_test)
    cover = f"{100 * TRUST_COVERAGE:.0f}%"
    lines = [f"### Which scores to trust: {row_name(variant, prediction)} (seeds {','.join(map(str, seeds))})", "",
             f"Signals per essay (higher = more confident; modules/confidence.py); at {cover} coverage the {n_kept} "
             f"most confident of {n_test} test essays are kept. Large error: {LARGE_ERROR_RULE}.", "",
             f"| signal | seeds | AUROC (large error) | QWK@100% | QWK@{cover} | QWK@{cover} - QWK@100% | 95% interval |",
             "|---|---|---|---|---|---|---|"]
    whole = np.arange(n_test)[None, :]
    summary = {}
    for name in [s for s in conf.SIGNALS if any(s in by_seed[k]["test"]["signals"] for k in seeds)]:
        have = [k for k in seeds if name in by_seed[k]["test"]["signals"]]
        sig = {k: by_seed[k]["test"]["signals"][name] for k in have}
        pred = {k: by_seed[k]["test"]["pred"] for k in have}
        auc = {k: auroc(sig[k], large_errors(gold_t, pred[k], group.ranges)) for k in have}
        q100 = {k: float(kept_qwk(None, gold_t, pred[k], whole)[0]) for k in have}
        q80 = {k: float(kept_qwk(sig[k], gold_t, pred[k], whole)[0]) for k in have}
        point, lo, hi = gain_with_interval(gold_t, [sig[k] for k in have], [pred[k] for k in have], n, seed)
        summary[name] = {"q100": float(np.mean(list(q100.values()))), "q80": float(np.mean(list(q80.values()))),
                         "gain": (point, lo, hi)}
        auc_cell = ("-" if any(v is None for v in auc.values()) else format_spread(auc))
        mark = " (picked)" if name == picked else ""
        lines.append(f"| {name}{mark} | {','.join(map(str, have))} | {auc_cell} | {format_spread(q100)} | "
                     f"{format_spread(q80)} | {format_spread({k: q80[k] - q100[k] for k in have})} | "
                     f"[{lo:+.3f}, {hi:+.3f}] |")
    covers = "seeds and test essays" if len(seeds) > 1 else "test essays only (one seed)"
    lines += ["", f"picked on the validation essays, never on test: {picked}, the lowest mean validation AURC "
                  "(area under the risk-coverage curve, risk = MAE; it scores the whole ranking, so it is less "
                  f"noisy on {gold_v.shape[0]} essays than one {cover} cut, and it is the tool's own review rule), "
                  "among the signals every seed has: "
              + ", ".join(f"{s} {v:.3f}" for s, v in aurcs.items())]
    versus = [k for k in seeds if "random" in by_seed[k]["test"]["signals"]]
    beat = None
    if versus:
        beat = gain_with_interval(gold_t, [by_seed[k]["test"]["signals"][picked] for k in versus],
                                  [by_seed[k]["test"]["pred"] for k in versus], n, seed,
                                  references=[by_seed[k]["test"]["signals"]["random"] for k in versus])
        lines.append(f"{picked} minus random order, QWK at {cover} coverage (paired bootstrap, {n} resamples, "
                     f"{covers}): {_interval(*beat)}")
    for k in seeds:
        report = by_seed[k]["report"]
        if report.get("conformal"):
            c = report["conformal"]
            lines.append(f"seed {k}: conformal score sets (LAC, target {100 * c['target_coverage']:.0f}%, calibrated "
                         f"on validation): test coverage {100 * c['average_coverage']:.1f}%, mean set size "
                         f"{c['average_set_size']:.2f}")
        if report.get("review"):
            r, t = report["review"], report["review"]["test"]
            lines.append(f"seed {k}: review rule ({100 * r['review_fraction']:.0f}% of validation essays below the "
                         f"{r['signal']} threshold): {100 * t['review_share']:.1f}% of test essays to review, QWK "
                         f"auto-scored {'-' if t['qwk_auto'] is None else format(t['qwk_auto'], '.3f')} "
                         f"(all {r['test_qwk_all']:.3f})")
    lines += ["", trust_sentence(picked, summary[picked], beat, n_test, n_kept)]
    return lines


def trust_sentence(signal: str, figures: dict, beat: tuple[float, float, float] | None, n_test: int,
                   n_kept: int) -> str:
    """The plain reading for users: which signal, how many essays go to a human, the QWK on the rest."""
    point, lo, hi = figures["gain"]
    human = (f"sending the {n_test - n_kept} least confident of {n_test} test essays to a human leaves QWK "
             f"{figures['q80']:.3f} on the {n_kept} others, against {figures['q100']:.3f} on all "
             f"({_interval(point, lo, hi)})")
    if beat is not None and beat[1] > 0:
        return f"Trust {signal}: {human}; it beats random order at that coverage by {_interval(*beat)}."
    against = f" and {_interval(*beat)} against random order" if beat is not None else ""
    return (f"No signal to trust on these essays: with {signal}, picked on validation, {human}{against}; the "
            "interval against random order does not lie above zero, so review by this signal buys no QWK that "
            "sending a random choice of essays would not.")
