"""The real-essay tables (docs/results.md), printed from the result files that
``benchmarks/bench_real_essays.py`` records (one small JSON file per command, in the tracked
``benchmarks/results/<corpus>/`` folder, so runs from different days and machines accumulate).

    python -m benchmarks.real_essay_tables [--results benchmarks/results] [--bootstrap 2000]

Per corpus (and per data split and recipe: results are pooled only when their test essays and
their training and sampling options, ``RECIPE_KEYS``, are the same; one file per variant and seed),
per row: the test metric's mean, sd (n - 1) and min-max over seeds with the per-seed values, per
rubric and averaged over rubrics (QWK; for rescaled corpora such as ELL also MCRMSE in the
corpus's own units). The best LoRA row is the one with the highest mean *validation* average
QWK over its seeds (never chosen on the test essays). Differences (CE+NTL minus CE only, seed by
seed; each LoRA row minus each baseline) carry a hierarchical bootstrap interval:

    for b in 1..B:  draw S seeds with replacement from the S seeds both rows have,
                    draw N test essays with replacement (one draw, shared by every drawn seed:
                    all seeds score the same essays, so essay effects are crossed with seeds),
                    d_b = mean over the drawn seeds of  metric(A_s on the drawn essays) - metric(B_s on them)
    interval = 2.5th and 97.5th percentiles of d_1..d_B;  point = mean over seeds of the full-sample difference.

With one seed the seed draw is always that seed, so the interval covers the choice of test
essays only (the output says so).

"Which scores to trust" (results with a ``confidence`` study, per variant; the judged row is the
weighted one): per signal, on test, the AUROC for large errors, the average QWK of all essays
(QWK@100%) and of the 80% most confident (QWK@80%), and their difference with the same
hierarchical bootstrap, paired: each essay resample keeps its own 80% most confident essays by the
signal and compares their QWK with that of the whole resample. The signal is picked on the
validation essays only: the lowest validation AURC (modules.metrics.aurc), averaged over seeds,
among the signals every seed has (random order excluded). Then the picked signal minus random
order at 80% coverage (both kept sets from the same resample), each seed's conformal coverage and
set size and review outcome (calibrated on validation), and one plain sentence for users.

This module also holds what the benchmark writes with (``write_result``); the metrics are
:mod:`modules.metrics`'.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from modules import confidence as conf
from modules.confidence_report import LARGE_ERROR_RULE, kept_count, large_errors
from modules.jsonio import DataError, read_json, write_text_atomic
from modules.metrics import (aurc, auroc, batched_mean_qwk, hierarchical_bootstrap, mcrmse, mean_qwk, rubric_qwks,
                             seed_essay_interval)

RESULTS = ROOT / "benchmarks" / "results"
SCHEMA = 1
VARIANT_NAMES = {"ce+ntl": "LoRA CE+NTL", "ce": "LoRA CE only"}
LORA_ROWS = ("greedy", "weighted", "greedy, constrained", "SC majority", "SC average",
             "SC majority, constrained", "SC average, constrained")
REPLICATE_ROWS = ("greedy", "weighted")
TRUST_COVERAGE = 0.8  # the confidence study's coverage: the 80% most confident essays are auto-scored
BASELINE_ROWS = ("TF-IDF ridge, same essays", "TF-IDF ridge, all train essays", "essay-length ridge", "training mean")

# --------------------------------------------------------------------------- per-seed values

def spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample sd (n - 1; nan for one value), min and max of per-seed values."""
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "sd": float(arr.std(ddof=1)) if arr.size > 1 else math.nan,
            "min": float(arr.min()), "max": float(arr.max())}


# --------------------------------------------------------------------------- result files

def result_path(results_dir: Path, corpus: str, variant: str, seed: int, commit: str, stamp: str) -> Path:
    """``<results>/<corpus>/<variant>_seed<k>_<commit>_<stamp>.json`` (no two commands share one)."""
    safe_variant = variant.replace("+", "-")
    return Path(results_dir) / corpus / f"{safe_variant}_seed{seed}_{commit}_{stamp}.json"


def write_result(path: Path, result: dict) -> Path:
    """Write one command's result as compact JSON (refusing to overwrite an existing file, so
    results only accumulate); compact because it is tracked and holds every per-essay prediction."""
    if path.exists():
        raise DataError(f"{path} exists; results are never overwritten")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, result_text({"schema": SCHEMA, **result}))
    return path


def result_text(result: dict) -> str:
    """A result file's text: compact JSON, one line."""
    return json.dumps(result, separators=(",", ":"), ensure_ascii=False) + "\n"


def read_results(results_dir: Path) -> list[dict]:
    """Every result file under ``results_dir`` (recursively), with its path under ``_path``."""
    out = []
    for path in sorted(Path(results_dir).rglob("*.json")):
        result = read_json(path)
        if not isinstance(result, dict) or result.get("schema") != SCHEMA:
            raise DataError(f"{path}: not a real-essay result file (schema {SCHEMA})")
        for key in ("corpus", "variant", "seed", "rubrics", "data", "splits"):
            if key not in result:
                raise DataError(f"{path}: field {key!r} missing")
        out.append({**result, "_path": str(path)})
    return out


# bench_real_essays.py's options that change what a seed's training or sampling does. The checkpoint
# rule (--load_best_model_at_end) is left out: a run that kept its last checkpoint is the same run
# under either rule, and the runs table shows the checkpoint each result kept.
RECIPE_KEYS = ("base_model", "epochs", "max_steps", "batch_size", "grad_accum", "learning_rate", "top_layers",
               "target_modules", "group_by_length", "max_seq_length", "m")
DEFAULT_TARGET_MODULES = "q_proj,v_proj"
# Options added after results were recorded: an older file ran with the value its command had then.
RECIPE_DEFAULTS = {"target_modules": DEFAULT_TARGET_MODULES}


def recipe(result: dict) -> dict:
    """The result's recipe options (an option added later: the value older commands ran with; None
    where the config lacks any other)."""
    config = result.get("config") or {}
    return {key: config.get(key, RECIPE_DEFAULTS.get(key)) for key in RECIPE_KEYS}


def group_key(result: dict) -> tuple:
    """Results are pooled when they scored the same essays (corpus, data file and split, subset sizes)
    with the same recipe: a lever's run (another learning rate, say) is its own group, never a seed."""
    data = result["data"]
    return (result["corpus"], data.get("sha256"), data.get("data_seed"), json.dumps(data.get("sizes"), sort_keys=True),
            json.dumps(recipe(result), sort_keys=True))


def row_predictions(result: dict, split: str, row: str, continuous: bool = False) -> np.ndarray | None:
    """[N, K] predictions of ``row`` on ``split`` (None when that result lacks it); with
    ``continuous`` the weighted row is its unrounded expected score."""
    part = result["splits"].get(split)
    if part is None or row not in part["rows"]:
        return None
    if continuous and row == "weighted" and part.get("weighted_expected") is not None:
        return np.asarray(part["weighted_expected"], dtype=np.float64)
    return np.asarray(part["rows"][row])


# --------------------------------------------------------------------------- tables

class Group:
    """The results of one corpus and data split: their rows per seed, aligned on the test essays."""

    def __init__(self, results: list[dict]) -> None:
        first = results[0]
        self.corpus = first["corpus"]
        self.rubrics = first["rubrics"]
        self.ranges = [(r["min"], r["max"]) for r in self.rubrics]
        self.scales = [r.get("scale", 1) for r in self.rubrics]
        self.rescaled = any(s != 1 for s in self.scales)
        self.gold = {split: np.asarray(first["splits"][split]["gold"]) for split in first["splits"]}
        ids = first["splits"]["test"]["ids"]
        seen: dict[tuple, str] = {}
        for r in results:
            if r["splits"]["test"]["ids"] != ids:
                raise DataError(f"{r['_path']}: test essays differ from {first['_path']}'s although the data key matches")
            run = (r["variant"], r["seed"])
            if run in seen:  # one seed's rows would silently replace the other's
                raise DataError(f"{r['_path']}: a second result for {VARIANT_NAMES.get(r['variant'], r['variant'])} "
                                f"seed {r['seed']} with the same essays and recipe (the other: {seen[run]}); keep one")
            seen[run] = r["_path"]
        self.results = results

    def lora(self, variant: str, row: str, split: str, continuous: bool = False) -> dict[int, np.ndarray]:
        """seed -> predictions of the LoRA ``row`` of ``variant`` (only the seeds that have it)."""
        out = {}
        for r in self.results:
            pred = row_predictions(r, split, row, continuous) if r["variant"] == variant else None
            if pred is not None:
                out[r["seed"]] = pred
        return out

    def baseline(self, row: str, split: str = "test") -> np.ndarray | None:
        """A baseline's predictions (the same in every result of the group: it depends on the data only)."""
        for r in self.results:
            pred = row_predictions(r, split, row)
            if pred is not None:
                return pred
        return None

    def lora_rows(self) -> list[tuple[str, str]]:
        """(variant, row) pairs that at least one seed has, in table order."""
        present = {(r["variant"], row) for r in self.results for row in r["splits"]["test"]["rows"]}
        return [(v, row) for v in VARIANT_NAMES for row in LORA_ROWS if (v, row) in present]

    def validation_splits(self) -> list[str]:
        """The splits the row pick reads: the validation essays, and the pick essays when every result
        of the group has the same ones (older files lack them: then the validation essays alone)."""
        pick = [r["splits"].get("pick", {}).get("ids") for r in self.results]
        return ["valid", "pick"] if pick[0] and all(ids == pick[0] for ids in pick) else ["valid"]

    def validation_means(self) -> dict[tuple[str, str], float]:
        """(variant, row) -> mean over its seeds of the average QWK on every validation essay (the
        validation and pick essays together); rows some seed lacks on a validation split are left out."""
        splits = [s for s in self.validation_splits() if s in self.gold]
        if "valid" not in splits:
            return {}
        gold = np.concatenate([self.gold[s] for s in splits])
        means = {}
        for variant, row in self.lora_rows():
            parts = [self.lora(variant, row, s) for s in splits]
            seeds = set(parts[0]).intersection(*parts[1:])
            if seeds:
                means[(variant, row)] = float(np.mean([mean_qwk(gold, np.concatenate([p[k] for p in parts]), self.ranges)
                                                       for k in sorted(seeds)]))
        return means

    def best_on_validation(self) -> tuple[str, str, float] | None:
        """The LoRA row with the highest mean validation average QWK over its seeds (ties: table order)."""
        best = None
        for (variant, row), value in self.validation_means().items():
            if best is None or value > best[2]:
                best = (variant, row, value)
        return best


def row_name(variant: str | None, row: str) -> str:
    return f"{VARIANT_NAMES[variant]}, {row}" if variant else row


def format_spread(values: dict[int, float]) -> str:
    """``mean (sd, min-max) [seed: value, ...]`` of per-seed values."""
    s = spread(list(values.values()))
    per_seed = ", ".join(f"s{k}: {v:.3f}" for k, v in sorted(values.items()))
    if len(values) == 1:
        return f"{s['mean']:.3f} (1 seed) [{per_seed}]"
    return f"{s['mean']:.3f} (sd {s['sd']:.3f}, {s['min']:.3f}-{s['max']:.3f}) [{per_seed}]"


def metric_table(group: Group) -> list[str]:
    """Markdown lines: one row per method, columns per rubric QWK, average QWK (and MCRMSE)."""
    names = [r["name"] for r in group.rubrics]
    head = names + ["average QWK"] + (["MCRMSE"] if group.rescaled else [])
    lines = ["| method | seeds | " + " | ".join(head) + " |", "|---|---|" + "---|" * len(head)]
    gold = group.gold["test"]
    rows = [(v, row, group.lora(v, row, "test"), group.lora(v, row, "test", continuous=True))
            for v, row in group.lora_rows()]
    for row in BASELINE_ROWS:
        pred = group.baseline(row)
        if pred is not None:
            rows.append((None, row, {0: pred}, {0: pred}))
    for variant, row, per_seed, continuous in rows:
        # a baseline depends on the data only: one value, no spread over seeds
        cell = format_spread if variant else (lambda values: f"{values[0]:.3f}")
        qwks = {s: rubric_qwks(gold, p, group.ranges) for s, p in per_seed.items()}
        cells = [cell({s: q[k] for s, q in qwks.items()}) for k in range(len(names))]
        cells.append(cell({s: float(np.mean(q)) for s, q in qwks.items()}))
        if group.rescaled:
            cells.append(cell({s: mcrmse(gold, p, group.scales) for s, p in continuous.items()}))
        seeds = ",".join(map(str, sorted(per_seed))) if variant else "-"
        lines.append(f"| {row_name(variant, row)} | {seeds} | " + " | ".join(cells) + " |")
    return lines


def minutes(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    whole = round(seconds)  # round first: 1139.5 s is 19 min 0 s, not 18 min 60 s
    return f"{whole // 60} min {whole % 60} s"


def training_precision(result: dict) -> str:
    """How a result's LoRA trained: ``bf16 (auto)``, ``fp32 (auto)``, or a forced choice. Files from
    before main_pipeline.py's --precision trained with the --bf16 the benchmark then passed."""
    record = (result.get("training") or {}).get("precision")
    if not record:
        return "bf16 (--bf16)"
    return f"{record['chosen']} ({record['requested'] if record['requested'] == 'auto' else 'forced'})"


def runs_table(group: Group) -> list[str]:
    """Markdown lines: one row per result file, what it ran (rows, wall time, training, checkpoint
    kept), where (CPU, torch, precision, commit) and the command."""
    lines = ["| run | rows | wall | training | eval loss per epoch (kept) | CPU, torch | precision | commit | command |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(group.results, key=lambda r: (list(VARIANT_NAMES).index(r["variant"]), r["seed"])):
        train = r.get("training", {})
        losses = ", ".join(f"{loss:.3f}" for _, loss in train.get("eval_loss", []))
        machine, git = r.get("machine", {}), r.get("git", {})
        rows = "all" if not r.get("replicate") else "greedy, weighted"
        lines.append(f"| {VARIANT_NAMES[r['variant']]}, seed {r['seed']} | {rows} | {minutes(r.get('timings', {}).get('total'))} "
                     f"| {minutes(train.get('seconds'))}, {train.get('global_step')} steps | {losses} "
                     f"({train.get('kept_checkpoint') or train.get('best_checkpoint')}) | {machine.get('cpu')}, {machine.get('torch')} "
                     f"| {training_precision(r)} | {git.get('commit')}{' (dirty)' if git.get('dirty') else ''} | `{r.get('command')}` |")
    return lines


def difference_lines(group: Group, n: int, seed: int) -> list[str]:
    """Hierarchical-bootstrap intervals of average-QWK differences: CE+NTL minus CE only per row,
    and each LoRA row minus each baseline."""
    gold = group.gold["test"]
    lines = ["| difference (average QWK) | seeds | point | 95% interval | covers |", "|---|---|---|---|---|"]

    def add(name: str, a: dict[int, np.ndarray], b: dict[int, np.ndarray]) -> None:
        seeds = sorted(set(a) & set(b))
        if not seeds:
            return
        point, lo, hi = hierarchical_bootstrap(gold, [a[s] for s in seeds], [b[s] for s in seeds], batched_mean_qwk,
                                               n, seed)
        covers = "seeds and essays" if len(seeds) > 1 else "essays only (one seed)"
        lines.append(f"| {name} | {','.join(map(str, seeds))} | {point:+.3f} | [{lo:+.3f}, {hi:+.3f}] | {covers} |")

    for row in LORA_ROWS:
        add(f"CE+NTL minus CE only, {row}", group.lora("ce+ntl", row, "test"), group.lora("ce", row, "test"))
    for variant, row in group.lora_rows():
        per_seed = group.lora(variant, row, "test")
        for base in BASELINE_ROWS:
            pred = group.baseline(base)
            if pred is not None:
                add(f"{row_name(variant, row)} minus {base}", per_seed, {s: pred for s in per_seed})
    return lines


# --------------------------------------------------------------------------- which scores to trust

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
    """The "Which scores to trust" section of one variant (module docstring of bench_real_essays)."""
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


def group_report(group: Group, n: int, seed: int) -> str:
    """Everything docs/results.md shows for one corpus: sizes, the metric table, the best row, the differences."""
    first = group.results[0]
    sizes = first["data"].get("sizes", {})
    seeds = defaultdict(list)
    for r in group.results:
        seeds[r["variant"]].append(r["seed"])
    out = [f"## {group.corpus}: {sizes.get('train')} training, {sizes.get('valid')} validation, "
           f"{sizes.get('test')} test essays; rubrics "
           + ", ".join(f"{r['name']} {r['min']}-{r['max']}" for r in group.rubrics)
           + "; seeds " + "; ".join(f"{VARIANT_NAMES.get(v, v)}: {sorted(s)}" for v, s in seeds.items()),
           "recipe: " + (", ".join(f"{k} {v}" for k, v in recipe(first).items() if v is not None) or "not recorded"), ""]
    out += runs_table(group) + [""]
    out += metric_table(group)
    best = group.best_on_validation()
    if best:
        variant, row, value = best
        splits = group.validation_splits()
        counts = " + ".join(f"{len(group.gold[s])} {'pick' if s == 'pick' else 'validation'}" for s in splits)
        out += ["", f"best LoRA row on the validation essays ({counts}): {row_name(variant, row)} "
                    f"(mean validation average QWK {value:.3f})",
                "validation average QWK per LoRA row (mean over seeds): "
                + "; ".join(f"{row_name(v, r)} {q:.3f}" for (v, r), q in group.validation_means().items())]
    out += ["", f"hierarchical bootstrap ({n} resamples of seeds, then test essays; with one seed it covers "
                "the test essays only):", ""]
    out += difference_lines(group, n, seed)
    invalid = [f"{row_name(r['variant'], row)} seed {r['seed']}: {count['invalid']} invalid, "
               f"{count['truncated']} truncated of {count['lines']}"
               for r in group.results for row, count in r["splits"]["test"].get("line_counts", {}).items()
               if count["invalid"]]
    out += ["", "invalid lines (test): " + ("; ".join(invalid) if invalid else "none")]
    for variant in VARIANT_NAMES:
        trust = trust_lines(group, variant, n, seed)
        out += ["", *trust] if trust else []
    return "\n".join(out)


def shared_rubric_lines(groups: list[Group], n: int, seed: int) -> list[str]:
    """What a rubric gains or loses when other rubrics share its score line: for each group whose
    rubrics are a proper subset of another group's, on the same test essays, per LoRA row and
    variant, the rubric's QWK alone minus its QWK in the longer line, seed paired with seed
    (hierarchical bootstrap over the seeds both have, then the test essays)."""
    lines = []
    for short in groups:
        names = [r["name"] for r in short.rubrics]
        for long in groups:
            long_names = [r["name"] for r in long.rubrics]
            if long is short or not set(names) < set(long_names):
                continue
            if short.results[0]["splits"]["test"]["ids"] != long.results[0]["splits"]["test"]["ids"]:
                continue
            for name in names:
                k_short, k_long = names.index(name), long_names.index(name)
                gold = short.gold["test"][:, [k_short]]
                if not np.array_equal(gold, long.gold["test"][:, [k_long]]):
                    continue  # another score under the same name: nothing to compare
                for variant, row in short.lora_rows():
                    a, b = short.lora(variant, row, "test"), long.lora(variant, row, "test")
                    both = sorted(set(a) & set(b))
                    if not both:
                        continue
                    alone = [a[s][:, [k_short]] for s in both]
                    shared = [b[s][:, [k_long]] for s in both]
                    point, lo, hi = hierarchical_bootstrap(gold, alone, shared, batched_mean_qwk, n, seed)
                    golds = np.stack([gold] * len(both))
                    mean_alone, mean_shared = (np.mean(batched_mean_qwk(golds, np.stack(p))) for p in (alone, shared))
                    lines.append(f"| {name}: {short.corpus} minus {long.corpus} | {row_name(variant, row)} | "
                                 f"{','.join(map(str, both))} | {mean_alone:.3f} | {mean_shared:.3f} | "
                                 f"{point:+.3f} | [{lo:+.3f}, {hi:+.3f}] |")
    if not lines:
        return []
    return ["| rubric QWK, alone minus sharing the line | rows | seeds | alone | shared | point | 95% interval |",
            "|---|---|---|---|---|---|---|"] + lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", default=str(RESULTS), help="folder of result files (searched recursively)")
    p.add_argument("--bootstrap", type=int, default=2000, help="hierarchical bootstrap resamples")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        results = read_results(Path(args.results))
        groups: dict[tuple, list[dict]] = defaultdict(list)
        for r in results:
            groups[group_key(r)].append(r)
        if not groups:
            print(f"no result files under {args.results}")
            return 0
        built = [Group(members) for members in groups.values()]
        for group in built:
            print(group_report(group, args.bootstrap, args.seed) + "\n")
        shared = shared_rubric_lines(built, args.bootstrap, args.seed)
        if shared:
            print("## A rubric alone and sharing its line with other rubrics (same test essays)\n")
            print("\n".join(shared) + "\n")
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
