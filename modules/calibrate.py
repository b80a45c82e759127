"""Mapping a scorer's unrounded outputs to final scores, fitted on validation essays only.

Two maps, per rubric k, each a least-squares fit on the validation essays' gold scores:

* **stretch** of one scorer's output x (the LoRA scorer's weighted expectation, say)::

      y_k = a_k * x_k + b_k

  A fine-tuned scorer's expectations shrink toward the middle of the range (the distribution puts
  mass on both sides of the gold score); the stretch undoes the shrinkage it shows on validation.
* **stack** of several scorers' outputs x^(1..J) for the same essays (the LoRA scorer's
  expectation, the probe's ridge output, the tuned TF-IDF ridge's)::

      y_k = b_k + sum_j w_kj * x^(j)_k

Both are :func:`fit_linear` with one or J inputs. The result is clipped to the rubric's range and
rounded half up (floor(y + 0.5)). With fewer validation essays than inputs + 1 the fit is refused.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class LinearMap:
    """Per rubric k: ``intercept[k] + sum_j weights[k, j] * inputs[j][:, k]``, for ``names`` (the
    scorers' outputs it combines, in order)."""
    names: tuple[str, ...]
    weights: np.ndarray  # [K, J]
    intercept: np.ndarray  # [K]

    def as_dict(self) -> dict:
        return {"inputs": list(self.names), "weights": self.weights.tolist(), "intercept": self.intercept.tolist()}

    @classmethod
    def from_dict(cls, raw: dict) -> "LinearMap":
        return cls(tuple(raw["inputs"]), np.asarray(raw["weights"], dtype=np.float64),
                   np.asarray(raw["intercept"], dtype=np.float64))


def fit_linear(inputs: dict[str, np.ndarray], gold: np.ndarray) -> LinearMap:
    """The least-squares :class:`LinearMap` from the scorers' outputs ``inputs`` (name -> [N, K], the
    same N validation essays) to ``gold`` [N, K]: per rubric, ``lstsq([1, x^(1)_k, ..., x^(J)_k], y_k)``."""
    names = tuple(inputs)
    gold = np.asarray(gold, dtype=np.float64)
    xs = [np.asarray(inputs[name], dtype=np.float64) for name in names]
    n, k = gold.shape
    if any(x.shape != gold.shape for x in xs):
        raise ValueError(f"every input must be [{n}, {k}] like the gold scores, got {[x.shape for x in xs]}")
    if n < len(xs) + 1:
        raise ValueError(f"{n} validation essays cannot fit {len(xs) + 1} coefficients per rubric")
    weights, intercept = np.empty((k, len(xs))), np.empty(k)
    for r in range(k):
        design = np.column_stack([np.ones(n), *[x[:, r] for x in xs]])
        coef, *_ = np.linalg.lstsq(design, gold[:, r], rcond=None)
        intercept[r], weights[r] = coef[0], coef[1:]
    return LinearMap(names, weights, intercept)


def apply_linear(fit: LinearMap, inputs: dict[str, np.ndarray], ranges: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """(unrounded [N, K] clipped to each rubric's range, rounded half up [N, K] ints) of ``fit`` on
    ``inputs`` (the names it was fitted on)."""
    missing = [name for name in fit.names if name not in inputs]
    if missing:
        raise ValueError(f"the map combines {list(fit.names)}; missing {missing}")
    xs = np.stack([np.asarray(inputs[name], dtype=np.float64) for name in fit.names], axis=-1)  # [N, K, J]
    y = fit.intercept + np.einsum("nkj,kj->nk", xs, fit.weights)
    lo = np.array([r[0] for r in ranges], dtype=np.float64)
    hi = np.array([r[1] for r in ranges], dtype=np.float64)
    y = np.clip(y, lo, hi)
    return y, np.clip(np.floor(y + 0.5), lo, hi).astype(np.int64)


# --------------------------------------------------------------------------- in a run folder

SCORE_MAP = "score_map.json"


def with_final(rows: Sequence[dict], fit: LinearMap, inputs: dict[str, np.ndarray],
               ranges: Sequence[tuple[int, int]]) -> list[dict]:
    """Copies of prediction rows with the map's ``final_expected`` (unrounded, clipped) and ``final``
    (rounded half up) scores; ``inputs`` are the map's inputs for these rows, in their order."""
    unrounded, rounded = apply_linear(fit, inputs, ranges)
    return [{**row, "final_expected": [float(v) for v in e], "final": [int(v) for v in s]}
            for row, e, s in zip(rows, unrounded, rounded)]


def save_score_map(run_dir, kind: str, fit: LinearMap, probe_run: str | None) -> dict:
    """Write ``score_map.json`` (what ``--score_path`` applies) and return its record for the manifest."""
    from pathlib import Path

    from modules.jsonio import write_json_atomic

    record = {"kind": kind, **fit.as_dict(), "probe_run": probe_run,
              "fitted_on": "the validation essays (valid_predictions.jsonl), never the test essays"}
    write_json_atomic(Path(run_dir) / SCORE_MAP, record)
    return record


def load_score_map(run_dir) -> dict | None:
    """A run's ``score_map.json`` with its :class:`LinearMap` under ``"fit"``, None without one;
    a one-line DataError naming the file and field when it is malformed."""
    from pathlib import Path

    from modules.jsonio import DataError, read_json

    path = Path(run_dir) / SCORE_MAP
    if not path.is_file():
        return None
    raw = read_json(path)
    try:
        fit = LinearMap.from_dict(raw)
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"{path}: field {err}: missing or not numbers") from None
    if fit.weights.shape != (fit.intercept.size, len(fit.names)):
        raise DataError(f"{path}: field 'weights': expected {fit.intercept.size} x {len(fit.names)} numbers")
    return {**raw, "fit": fit}


def score_map_inputs(names: Sequence[str], rows: Sequence[dict], *, model=None, tokenizer=None, records=None,
                     info=None, probe=None, batch_size: int = 8) -> dict[str, np.ndarray]:
    """The map's inputs [N, K] for prediction rows: ``weighted``, their weighted expectation;
    ``probe``, the probe's output on the same essays (``records``), its features read from the
    LoRA model with the adapter switched off, which is the frozen base model the probe was fit on."""
    out = {}
    if "weighted" in names:
        out["weighted"] = np.array([r["weighted_expected"] for r in rows], dtype=np.float64)
    if "probe" in names:
        from modules.probe_run import probe_rows

        with model.disable_adapter():
            scored = probe_rows(model, tokenizer, probe, records, info, batch_size)
        out["probe"] = np.array([r["weighted_expected"] for r in scored], dtype=np.float64)
    return out


def map_rows(fit: LinearMap, rows: Sequence[dict], records: Sequence, info, *, model=None, tokenizer=None,
             probe=None, batch_size: int = 8) -> list[dict]:
    """:func:`with_final` of prediction rows under ``fit``, its inputs read for these rows and their
    essays (``records``) by :func:`score_map_inputs`."""
    inputs = score_map_inputs(fit.names, rows, model=model, tokenizer=tokenizer, records=records, info=info,
                              probe=probe, batch_size=batch_size)
    return with_final(rows, fit, inputs, info.ranges)
