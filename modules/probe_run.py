"""The probe scorer as a run of ``main_pipeline.py --scorer probe``: train it on a dataset's training
and validation essays, save it in the run folder, and score essays with a saved one
(``--score_path``), on the frozen base model the features come from.

What confidence applies to its rows: the probe has no distribution over scores, so the confidence
signals are the essay's length and the random baseline (:func:`modules.confidence.essay_signals`),
and the review rule chooses between them on validation; split-conformal score sets need the
weighted distribution and are not made (the report says ``conformal: null``).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from modules.probe import Probe, essay_features, fit_probe, load_probe, probe_predictions

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
    from modules.probe import PROBE_FILE

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
