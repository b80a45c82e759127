"""The probe scorer as a run of ``main_pipeline.py --scorer probe``: train it on a dataset's training
and validation essays, save it in the run folder (``probe.json``), and score essays with a saved one
(``--score_path``), on the frozen base model the features come from.

File (:func:`save_probe`, :func:`load_probe`)
    ``probe.json`` in the probe folder, plain JSON (no pickle), one field per line, arrays inline;
    floats are written with Python's shortest round-trip repr, so loading gives the same float64
    numbers and the same predictions. Fields::

        format        "aes-probe"          version   1
        base_model    the model the features came from (str or null)
        pooling       "mean"               max_tokens  the essay token limit of the features
        bos_prefix    whether the features had the tokenizer's BOS in front (as above)
        layer         the chosen hidden-state index (0 = embeddings)
        layer_scores  mean validation QWK of every hidden-state index, [L + 1]
        rubrics       [{"name", "min", "max"}] in score-line order (K)
        mean, scale   the standardisation, [D] each
        coef          [K][D], on standardised features     intercept  [K]
        alpha         the chosen alpha per rubric, [K]      alphas     the grid, [A]
        cv_mse        [K][A] cross-validated MSE per rubric and alpha, or null (one alpha: no CV)

What confidence applies to its rows: the probe has no distribution over scores, so the confidence
signals are the essay's length and the random baseline (:func:`modules.confidence.essay_signals`),
and the review rule chooses between them on validation; split-conformal score sets need the
weighted distribution and are not made (the report says ``conformal: null``).
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from modules.jsonio import DataError, input_error, read_json, write_text_atomic
from modules.probe import Probe, RidgeFit, essay_features, fit_probe, probe_predictions

PROBE_FILE = "probe.json"
FORMAT, VERSION = "aes-probe", 1

logger = logging.getLogger(__name__)


def record_features(model, tokenizer, records: Sequence, max_tokens: int, batch_size: int) -> np.ndarray:
    """:func:`modules.probe.essay_features` of the records' essays."""
    return essay_features(model, tokenizer, [r.essay for r in records], max_tokens=max_tokens, batch_size=batch_size)


def train_probe(model, tokenizer, info, splits: dict, *, max_tokens: int, batch_size: int, base_model: str,
                seed: int) -> Probe:
    """The probe of a dataset: the training and validation essays' pooled features (every layer, one
    forward each), a ridge per rubric with alpha by cross-validation on the training essays, the layer
    by the validation essays' average QWK. The test split is not read."""
    feats = {split: record_features(model, tokenizer, splits[split], max_tokens, batch_size)
             for split in ("train", "valid")}
    gold = {split: np.array([r.scores for r in splits[split]], dtype=float) for split in ("train", "valid")}
    probe = fit_probe(feats["train"], gold["train"], feats["valid"], gold["valid"], info, max_tokens=max_tokens,
                      bos_prefix=tokenizer.bos_token_id is not None, base_model=base_model, seed=seed)
    logger.info("probe: layer %d of %d (validation average QWK %.4f), alpha %s", probe.layer,
                len(probe.layer_scores) - 1, probe.layer_scores[probe.layer],
                ", ".join(f"{a:g}" for a in probe.fit.alpha))
    return probe


def probe_rows(model, tokenizer, probe: Probe, records: Sequence, info, batch_size: int) -> list[dict]:
    """Prediction rows of ``records`` (:func:`modules.probe.probe_predictions`), the features made as
    the probe's were."""
    if probe.bos_prefix != (tokenizer.bos_token_id is not None):
        raise ValueError(f"the probe's features {'had' if probe.bos_prefix else 'had no'} a BOS token in front; "
                         f"this tokenizer {'has none' if probe.bos_prefix else 'has one'}")
    feats = record_features(model, tokenizer, records, probe.max_tokens, batch_size)
    return probe_predictions(probe, feats, records, info)


def is_probe_run(run_dir: str | Path) -> bool:
    """Whether a run folder holds a probe (``probe.json``) rather than a LoRA adapter."""
    return (Path(run_dir) / PROBE_FILE).is_file()


def load_probe_run(run_dir: str | Path, base_model_name: str, device=None):
    """(probe, model, tokenizer) of a probe run: its probe.json and the frozen base model it was
    trained on; ValueError when ``base_model_name`` is another model."""
    from modules.models import load_base_model

    probe = load_probe(run_dir)
    if probe.base_model is not None and probe.base_model != base_model_name:
        raise ValueError(f"{run_dir}: the probe was trained on base model '{probe.base_model}', not "
                         f"'{base_model_name}'; pass --base_model_name {probe.base_model}")
    model, tokenizer = load_base_model(base_model_name, device=device)
    return probe, model, tokenizer


# ----------------------------------------------------------------------------- probe.json

def _probe_path(path: str | Path) -> Path:
    path = Path(path)
    return path if path.name == PROBE_FILE and not path.is_dir() else path / PROBE_FILE


def save_probe(path_dir: str | Path, probe: Probe) -> Path:
    """Write ``path_dir/probe.json`` (the folder is made; format in the module docstring) atomically;
    returns its path."""
    fit = probe.fit
    fields: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "base_model": probe.base_model, "pooling": probe.pooling,
        "max_tokens": int(probe.max_tokens), "bos_prefix": bool(probe.bos_prefix), "layer": int(probe.layer),
        "layer_scores": [float(v) for v in probe.layer_scores],
        "rubrics": [{"name": n, "min": int(lo), "max": int(hi)} for n, (lo, hi) in zip(probe.rubric_names, probe.ranges)],
        "alpha": fit.alpha.tolist(), "alphas": fit.alphas.tolist(),
        "cv_mse": None if fit.cv_mse is None else fit.cv_mse.tolist(),
        "intercept": fit.intercept.tolist(), "mean": fit.mean.tolist(), "scale": fit.scale.tolist(),
        "coef": fit.coef.tolist()}
    # One field per line, arrays inline: the small fields stay readable above the long arrays.
    text = "{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False, allow_nan=False)}"
                              for k, v in fields.items()) + "\n}\n"
    path = Path(path_dir)
    path.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path / PROBE_FILE, text)
    return path / PROBE_FILE


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _numbers(path: Path, raw: dict, name: str, shape: tuple[int | None, ...], positive: bool = False) -> np.ndarray:
    """Field ``name`` as a float64 array of ``shape`` (None: any length >= 1), every entry a finite
    JSON number (> 0 with ``positive``); anything else is a one-line DataError naming the field."""
    value = raw.get(name)

    def walk(v: Any, depth: int, where: str) -> None:
        if depth == len(shape):
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)):
                raise input_error(path, None, where, f"must be a finite number, got {json.dumps(v)[:40]}")
            if positive and v <= 0:
                raise input_error(path, None, where, f"must be > 0, got {v}")
            return
        if not isinstance(v, list) or not v or (shape[depth] is not None and len(v) != shape[depth]):
            want = "a non-empty list" if shape[depth] is None else f"a list of {shape[depth]}"
            got = f"{len(v)} entries" if isinstance(v, list) else type(v).__name__
            raise input_error(path, None, where, f"must be {want}, got {got}")
        for i, item in enumerate(v):
            walk(item, depth + 1, f"{where}[{i}]")

    walk(value, 0, name)
    return np.asarray(value, dtype=np.float64)


def load_probe(path_dir: str | Path) -> Probe:
    """The probe in ``path_dir/probe.json`` (or that file itself). Any problem with the file (missing,
    not JSON, a missing or bad field, arrays that do not fit together) is a one-line
    :class:`~modules.jsonio.DataError` naming the file and the field."""
    path = _probe_path(path_dir)
    raw = read_json(path)

    def fail(name: str, problem: str) -> DataError:
        return input_error(path, None, name, problem)

    if raw.get("format") != FORMAT:
        raise fail("format", f"must be {FORMAT!r}, got {raw.get('format')!r} (not a probe file)")
    if raw.get("version") != VERSION:
        raise fail("version", f"this tool reads version {VERSION}, got {raw.get('version')!r}")
    if raw.get("pooling") != "mean":
        raise fail("pooling", f"must be 'mean', got {raw.get('pooling')!r}")
    for name in ("max_tokens", "layer"):
        if not _is_int(raw.get(name)) or raw[name] < (1 if name == "max_tokens" else 0):
            raise fail(name, f"must be an integer >= {1 if name == 'max_tokens' else 0}, got {raw.get(name)!r}")
    if not isinstance(raw.get("bos_prefix"), bool):
        raise fail("bos_prefix", f"must be true or false, got {raw.get('bos_prefix')!r}")
    if raw.get("base_model") is not None and not isinstance(raw["base_model"], str):
        raise fail("base_model", f"must be a string or null, got {raw['base_model']!r}")
    rubrics = raw.get("rubrics")
    if not isinstance(rubrics, list) or not rubrics:
        raise fail("rubrics", "must be a non-empty list")
    for i, r in enumerate(rubrics):
        if not isinstance(r, dict) or not isinstance(r.get("name"), str):
            raise fail(f"rubrics[{i}].name", "missing or not a string")
        for key in ("min", "max"):
            if not _is_int(r.get(key)):
                raise fail(f"rubrics[{i}].{key}", f"must be an integer, got {r.get(key)!r}")
        if r["min"] > r["max"]:
            raise fail(f"rubrics[{i}]", f"min {r['min']} > max {r['max']}")
    k = len(rubrics)
    layer_scores = _numbers(path, raw, "layer_scores", (None,))
    if raw["layer"] >= layer_scores.size:
        raise fail("layer", f"{raw['layer']} is not one of the {layer_scores.size} scored layers")
    mean = _numbers(path, raw, "mean", (None,))
    d = mean.size
    alphas = _numbers(path, raw, "alphas", (None,), positive=True)
    cv_mse = None if raw.get("cv_mse") is None else _numbers(path, raw, "cv_mse", (k, alphas.size))
    fit = RidgeFit(mean=mean, scale=_numbers(path, raw, "scale", (d,), positive=True),
                   coef=_numbers(path, raw, "coef", (k, d)), intercept=_numbers(path, raw, "intercept", (k,)),
                   alpha=_numbers(path, raw, "alpha", (k,), positive=True), alphas=alphas, cv_mse=cv_mse)
    return Probe(layer=raw["layer"], fit=fit, rubric_names=tuple(r["name"] for r in rubrics),
                 ranges=tuple((r["min"], r["max"]) for r in rubrics), max_tokens=raw["max_tokens"],
                 layer_scores=tuple(layer_scores.tolist()), bos_prefix=raw["bos_prefix"],
                 base_model=raw.get("base_model"), pooling="mean")
