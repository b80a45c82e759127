"""The real-essay result files: their schema, how they are written and read, and how the tables
name a result's rows and summarise their per-seed values.

A result file is what one ``python -m benchmarks.bench_real_essays`` command records: one compact
JSON file per corpus, variant and seed, at ``benchmarks/results/<corpus>/<variant>_seed<k>_<commit>_<stamp>.json``
(tracked, never overwritten, so runs from different days and machines accumulate). It holds the
corpus, variant, seed and rubrics, the data it scored (input file and sha256, data seed, sizes),
per split (``test``, ``valid``, ``pick``) the essay ids, gold scores and every row's per-essay
predictions (LoRA rows and baselines), the confidence study, training and stage times, machine,
commit, command and every flag, with paths relative to the repository. The fields are listed in
``benchmarks/results/README.md``; the tables printed from these files are ``real_essay_tables.py``'s.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from modules.convert.baseline import TUNED_RIDGE
from modules.jsonio import DataError, read_json, write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SCHEMA = 1
VARIANT_NAMES = {"ce+ntl": "LoRA CE+NTL", "ce": "LoRA CE only"}
LORA_ROWS = ("greedy", "weighted", "head", "greedy, constrained", "SC majority", "SC average",
             "SC majority, constrained", "SC average, constrained")
BASELINE_ROWS = ("TF-IDF ridge, same essays", "TF-IDF ridge, all train essays", "essay-length ridge", "training mean")
# Rows that depend on the data alone, one value per corpus, in table order: the frozen probe
# (benchmarks/bench_probe.py's result files, variant "probe"), the tuned ridge, the other baselines.
FROZEN_VARIANT = "probe"
DATA_ROWS = ("probe", TUNED_RIDGE, *BASELINE_ROWS)
# The untuned ridges keep their recorded names; the tables say what they are.
ROW_LABELS = {"TF-IDF ridge, same essays": "TF-IDF ridge (untuned, alpha 1), same essays",
              "TF-IDF ridge, all train essays": "TF-IDF ridge (untuned, alpha 1), all train essays",
              "probe": "probe (frozen base model, ridge on one layer)"}

# bench_real_essays.py's options that change what a seed's training or sampling does. The checkpoint
# rule (--load_best_model_at_end) is left out: a run that kept its last checkpoint is the same run
# under either rule, and the runs table shows the checkpoint each result kept.
RECIPE_KEYS = ("base_model", "epochs", "max_steps", "batch_size", "grad_accum", "learning_rate", "top_layers",
               "target_modules", "group_by_length", "max_seq_length", "m", "head_layer", "head_weight",
               "head_learning_rate")
DEFAULT_TARGET_MODULES = "q_proj,v_proj"
# Options added after results were recorded: an older file ran with the value its command had then.
RECIPE_DEFAULTS = {"target_modules": DEFAULT_TARGET_MODULES, "head_layer": None, "head_weight": None,
                   "head_learning_rate": None}

# The flags that name files or folders: a result file records them relative to the repository, so
# that it holds no machine's absolute paths (the input is also named, with its sha256, under "data").
PATH_FLAGS = ("input", "out_dir", "results_dir")


def repo_relative(value: str | None) -> str | None:
    """An absolute path as the path relative to the repository; anything else as it is."""
    if value is None or not os.path.isabs(value):
        return value
    return os.path.relpath(value, ROOT)


# --------------------------------------------------------------------------- writing and reading

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


# --------------------------------------------------------------------------- what a result holds

def recipe(result: dict) -> dict:
    """The result's recipe options (an option added later: the value older commands ran with; None
    where the config lacks any other)."""
    config = result.get("config") or {}
    return {key: config.get(key, RECIPE_DEFAULTS.get(key)) for key in RECIPE_KEYS}


def data_key(result: dict) -> tuple:
    """Which essays a result scored: corpus, data file, split seed and subset sizes."""
    data = result["data"]
    return result["corpus"], data.get("sha256"), data.get("data_seed"), json.dumps(data.get("sizes"), sort_keys=True)


def group_key(result: dict) -> tuple:
    """Results are pooled when they scored the same essays (:func:`data_key`) with the same recipe: a
    lever's run (another learning rate, say) is its own group, never a seed."""
    return (*data_key(result), json.dumps(recipe(result), sort_keys=True))


def row_predictions(result: dict, split: str, row: str, continuous: bool = False) -> np.ndarray | None:
    """[N, K] predictions of ``row`` on ``split`` (None when that result lacks it); with
    ``continuous`` the row's unrounded scores where the file keeps them (the weighted row's
    expected score, the probe's and the tuned ridge's outputs under ``continuous``)."""
    part = result["splits"].get(split)
    if part is None or row not in part["rows"]:
        return None
    if continuous and row == "weighted" and part.get("weighted_expected") is not None:
        return np.asarray(part["weighted_expected"], dtype=np.float64)
    if continuous and row in part.get("continuous", {}):
        return np.asarray(part["continuous"][row], dtype=np.float64)
    return np.asarray(part["rows"][row])


# --------------------------------------------------------------------------- names and per-seed values in the tables

def row_name(variant: str | None, row: str) -> str:
    """A row's name in the tables: ``LoRA CE+NTL, greedy`` for a LoRA row, a data-only row's label."""
    return f"{VARIANT_NAMES[variant]}, {row}" if variant else ROW_LABELS.get(row, row)


def spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample sd (n - 1; nan for one value), min and max of per-seed values."""
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "sd": float(arr.std(ddof=1)) if arr.size > 1 else math.nan,
            "min": float(arr.min()), "max": float(arr.max())}


def format_spread(values: dict[int, float]) -> str:
    """``mean (sd, min-max) [seed: value, ...]`` of per-seed values."""
    s = spread(list(values.values()))
    per_seed = ", ".join(f"s{k}: {v:.3f}" for k, v in sorted(values.items()))
    if len(values) == 1:
        return f"{s['mean']:.3f} (1 seed) [{per_seed}]"
    return f"{s['mean']:.3f} (sd {s['sd']:.3f}, {s['min']:.3f}-{s['max']:.3f}) [{per_seed}]"


# --------------------------------------------------------------------------- what a command writes

SIGNAL_DIGITS = 6  # decimals of the stored confidence signals: the study is recomputed from these values


def line_counts(predictions: list[dict]) -> dict[str, int]:
    """Invalid and truncated generated lines among ``predictions`` (predict_split's dicts)."""
    return {"lines": len(predictions), "invalid": sum(not p["valid"] for p in predictions),
            "truncated": sum(bool(p["truncated"]) for p in predictions)}


def expected_scores(predictions: list[dict], key: str = "weighted_expected") -> list[list[float]]:
    """A row's unrounded scores (the weighted row's expected scores; the head's ``head_expected``),
    rounded to 4 decimals to keep the file small."""
    return [[round(float(e), 4) for e in p[key]] for p in predictions]


def split_entry(predictions: list[dict]) -> dict:
    """One split's greedy and weighted rows (and the score head's, its unrounded output under
    ``continuous``) as the result file keeps them."""
    entry = {"ids": [p["id"] for p in predictions], "gold": [p["gold"] for p in predictions],
             "rows": {"greedy": [p["greedy"] for p in predictions], "weighted": [p["weighted"] for p in predictions]},
             "weighted_expected": expected_scores(predictions), "line_counts": {"greedy": line_counts(predictions)}}
    if predictions and all(p.get("head") is not None for p in predictions):
        entry["rows"]["head"] = [p["head"] for p in predictions]
        entry["continuous"] = {"head": expected_scores(predictions, "head_expected")}
    return entry


def round_floats(value, digits: int = SIGNAL_DIGITS):
    """Floats in nested dicts and lists rounded to ``digits`` decimals (the tracked file stays small)."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: round_floats(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [round_floats(v, digits) for v in value]
    return value


def rows_present(split: dict) -> list[str]:
    """The LoRA rows a command produced, in table order."""
    return [row for row in LORA_ROWS if row in split["rows"]]
