"""The real-essay tables (docs/results.md), printed from the result files that
``benchmarks/bench_real_essays.py`` records (one small JSON file per command, in the tracked
``benchmarks/results/<corpus>/`` folder, so runs from different days and machines accumulate).

    python -m benchmarks.real_essay_tables [--results benchmarks/results] [--bootstrap 2000]

Per corpus (and per data split and recipe: results are pooled only when their test essays and
their training and sampling options, ``result_files.RECIPE_KEYS``, are the same; one file per
variant and seed), per row: the test metric's mean, sd (n - 1) and min-max over seeds with the
per-seed values, per rubric and averaged over rubrics (QWK; for rescaled corpora such as ELL also
MCRMSE in the corpus's own units). The best LoRA row is the one with the highest mean *validation* average
QWK over its seeds (never chosen on the test essays). Differences (CE+NTL minus CE only, seed by
seed; each LoRA row minus each baseline) carry a hierarchical bootstrap interval:

    for b in 1..B:  draw S seeds with replacement from the S seeds both rows have,
                    draw N test essays with replacement (one draw, shared by every drawn seed:
                    all seeds score the same essays, so essay effects are crossed with seeds),
                    d_b = mean over the drawn seeds of  metric(A_s on the drawn essays) - metric(B_s on them)
    interval = 2.5th and 97.5th percentiles of d_1..d_B;  point = mean over seeds of the full-sample difference.

With one seed the seed draw is always that seed, so the interval covers the choice of test
essays only (the output says so).

"Which scores to trust" (results with a ``confidence`` study): ``trust_tables.py``. The result
files' schema and I/O are ``result_files.py``'s; the metrics are :mod:`modules.metrics`'.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

from benchmarks.result_files import (DATA_ROWS, FROZEN_VARIANT, LORA_ROWS, RESULTS, VARIANT_NAMES,
                                     data_key, format_spread, group_key, read_results, recipe, row_name,
                                     row_predictions)
from benchmarks.trust_tables import trust_lines
from modules.calibrate import apply_linear, fit_linear
from modules.convert.baseline import TUNED_RIDGE
from modules.jsonio import DataError
from modules.metrics import batched_mean_qwk, hierarchical_bootstrap, mcrmse, mean_qwk, rubric_qwks, seed_essay_interval

# --------------------------------------------------------------------------- tables

# Rows mapped from a LoRA run's weighted expectation on its validation essays (modules/calibrate.py),
# with the unrounded outputs they take: a per-rubric linear stretch, and a stack with the probe and
# the tuned ridge (results of benchmarks/bench_probe.py on the same essays).
DERIVED_ROWS = {"weighted, stretched on validation": ("weighted",),
                "weighted + probe + tuned ridge, stacked on validation": ("weighted", "probe", TUNED_RIDGE)}

class Group:
    """The results of one corpus and data split: their rows per seed, aligned on the test essays."""

    def __init__(self, results: list[dict], frozen: Sequence[dict] = ()) -> None:
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
        for r in frozen:
            if r["splits"]["test"]["ids"] != ids:
                raise DataError(f"{r['_path']}: test essays differ from {first['_path']}'s although the data key matches")
        self.results = results
        self.frozen = list(frozen)  # results on the same essays whose rows depend on the data alone (the probe)

    def lora(self, variant: str, row: str, split: str, continuous: bool = False) -> dict[int, np.ndarray]:
        """seed -> predictions of the LoRA ``row`` of ``variant`` (only the seeds that have it)."""
        if row in DERIVED_ROWS:
            return self.derived(variant, row, split, continuous)
        out = {}
        for r in self.results:
            pred = row_predictions(r, split, row, continuous) if r["variant"] == variant else None
            if pred is not None:
                out[r["seed"]] = pred
        return out

    def baseline(self, row: str, split: str = "test", continuous: bool = False) -> np.ndarray | None:
        """A data-only row's predictions (a baseline, the same in every result of the group, or the
        probe), unrounded with ``continuous`` where the file keeps them."""
        for r in [*self.frozen, *self.results]:
            pred = row_predictions(r, split, row, continuous)
            if pred is not None:
                return pred
        return None

    def derived(self, variant: str, row: str, split: str, continuous: bool = False) -> dict[int, np.ndarray]:
        """seed -> predictions of a row mapped from the weighted row's expectation (and the probe's and
        the tuned ridge's outputs: :data:`DERIVED_ROWS`) by :func:`modules.calibrate.fit_linear`,
        fitted on that seed's validation and pick essays, never on test."""
        splits = [s for s in self.validation_splits() if s in self.gold]
        out = {}
        for r in self.results:
            if r["variant"] != variant:
                continue
            inputs = {part: {name: row_predictions(r, part, name, True) if name == "weighted"
                             else self.baseline(name, part, continuous=True) for name in DERIVED_ROWS[row]}
                      for part in [*splits, split]}
            if any(x is None for part in inputs.values() for x in part.values()):
                continue
            fit = fit_linear({name: np.concatenate([inputs[part][name] for part in splits]) for name in DERIVED_ROWS[row]},
                             np.concatenate([self.gold[part] for part in splits]))
            unrounded, rounded = apply_linear(fit, inputs[split], self.ranges)
            out[r["seed"]] = unrounded if continuous else rounded
        return out

    def lora_rows(self, derived: bool = True) -> list[tuple[str, str]]:
        """(variant, row) pairs that at least one seed has, in table order; with ``derived`` also the
        rows mapped on validation (:meth:`derived`) where their inputs exist."""
        present = {(r["variant"], row) for r in self.results for row in r["splits"]["test"]["rows"]}
        rows = [(v, row) for v in VARIANT_NAMES for row in LORA_ROWS if (v, row) in present]
        if derived:
            rows += [(v, row) for v in VARIANT_NAMES for row in DERIVED_ROWS if self.derived(v, row, "test")]
        return rows

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
        # rows fitted on the validation essays would be judged on their own fit: left out
        for variant, row in self.lora_rows(derived=False):
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


def average_interval(gold: np.ndarray, per_seed: dict[int, np.ndarray], n: int, seed: int) -> str:
    """The 95% interval of a row's average QWK over seeds, then test essays (essays only for one seed)."""
    preds = [per_seed[s] for s in sorted(per_seed)]
    lo, hi = seed_essay_interval(lambda s, idx: batched_mean_qwk(gold[idx], preds[s][idx]), len(preds), len(gold),
                                 n, seed)
    return f"[{lo:.3f}, {hi:.3f}]"


def metric_table(group: Group, n: int = 2000, seed: int = 0) -> list[str]:
    """Markdown lines: one row per method, columns per rubric QWK, average QWK with its bootstrap
    interval (``n`` resamples), and MCRMSE on unrounded scores where kept."""
    names = [r["name"] for r in group.rubrics]
    head = names + ["average QWK", "95% interval"] + (["MCRMSE"] if group.rescaled else [])
    lines = ["| method | seeds | " + " | ".join(head) + " |", "|---|---|" + "---|" * len(head)]
    gold = group.gold["test"]
    rows = [(v, row, group.lora(v, row, "test"), group.lora(v, row, "test", continuous=True))
            for v, row in group.lora_rows()]
    for row in DATA_ROWS:
        pred = group.baseline(row)
        if pred is not None:
            rows.append((None, row, {0: pred}, {0: group.baseline(row, continuous=True)}))
    for variant, row, per_seed, continuous in rows:
        # a data-only row: one value, no spread over seeds
        cell = format_spread if variant else (lambda values: f"{values[0]:.3f}")
        qwks = {s: rubric_qwks(gold, p, group.ranges) for s, p in per_seed.items()}
        cells = [cell({s: q[k] for s, q in qwks.items()}) for k in range(len(names))]
        cells.append(cell({s: float(np.mean(q)) for s, q in qwks.items()}))
        cells.append(average_interval(gold, per_seed, n, seed))
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
        losses = ", ".join(f"{loss:.3f}" for _, loss in train.get("eval_loss", [])) or "not evaluated"
        machine, git = r.get("machine", {}), r.get("git", {})
        rows = "all" if not r.get("replicate") else ", ".join(r["rows"])
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
        for base in DATA_ROWS:
            pred = group.baseline(base)
            if pred is not None:
                add(f"{row_name(variant, row)} minus {row_name(None, base)}", per_seed, {s: pred for s in per_seed})
    return lines


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
    for r in group.frozen:
        train = r.get("training") or {}
        out += [f"probe: layer {train.get('layer')} of {train.get('layers')}, chosen on the validation and pick "
                f"essays (validation average QWK {max(train.get('valid_qwk_by_layer') or [float('nan')]):.3f}); "
                f"features of the first {train.get('max_tokens')} tokens, fitted in {minutes(train.get('seconds'))}, "
                f"{minutes(r.get('timings', {}).get('total'))} in all; {r.get('machine', {}).get('cpu')}; "
                f"`{r.get('command')}`", ""]
    out += metric_table(group, n, seed)
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
        frozen: dict[tuple, list[dict]] = defaultdict(list)
        for r in results:
            if r["variant"] == FROZEN_VARIANT:
                frozen[data_key(r)].append(r)
            else:
                groups[group_key(r)].append(r)
        if not groups:
            print(f"no LoRA result files under {args.results}")
            return 0
        built = [Group(members, frozen[data_key(members[0])]) for members in groups.values()]
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
