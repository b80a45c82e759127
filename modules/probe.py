"""The frozen-feature probe scorer (issue 45): mean-pooled hidden states of the base model, a ridge
regression per rubric on one layer, the layer chosen on the validation essays.

No training of the language model: each essay runs through the frozen base model once, each
layer's hidden states are averaged over the essay's tokens, and a closed-form ridge maps one
layer's average to the K rubric scores. Plain functions in the style of ``sklearn.metrics``.

Features (:func:`essay_features`)
    The input is the essay text alone: no writing prompt, no rubric, no chat template. It is the
    tokenizer's plain encoding (``add_special_tokens=False``) cut to its first ``max_tokens``
    tokens, with the tokenizer's BOS token put in front when it has one. Position 0 of a causal LM
    is an attention sink whose hidden state is orders of magnitude larger than the others
    (SmolLM2-135M: norm about 2e4 against about 150 in the middle layers) and nearly independent of
    the text, so it is left out of the average; the BOS token takes that place so that every essay
    token is averaged. (Without a BOS token the first essay token is left out, unless it is the
    only one.) For hidden-state index l (0: the embeddings, l: after decoder layer l)::

        feature[i, l, :] = (1 / |T_i|) * sum_{t in T_i} h_l[i, t, :]

    with T_i the essay positions 1..n_i - 1 of essay i (n_i tokens with BOS). Batches are padded on
    the right, so padding changes no real token's state (causal attention, positions 0..n_i - 1);
    the result equals the model run on each essay alone.

Ridge (:func:`fit_ridge`, :func:`predict_ridge`)
    Features are standardised with the training mean and standard deviation (population, ddof 0;
    a feature whose deviation is at most ``1e-6 * max(1, |mean|)`` counts as constant: scale 1).
    Per rubric k, on the standardised training features Z (zero mean) and scores y_k::

        w_k = argmin ||y_k - mean(y_k) - Z w||^2 + alpha_k ||w||^2
            = V diag(s / (s^2 + alpha_k)) U^T (y_k - mean(y_k)),   Z = U diag(s) V^T,
        b_k = mean(y_k),    prediction = ((x - mean) / scale) . w_k + b_k

    which is ``Pipeline(StandardScaler(), Ridge(alpha_k))`` of scikit-learn. One eigendecomposition
    (of Z Z^T or Z^T Z, whichever is smaller) gives every alpha. alpha_k is the value of ``alphas``
    (default :data:`DEFAULT_ALPHAS`, 10^-2 .. 10^6 in half decades) with the lowest K-fold
    cross-validated mean squared error on the training essays: the mean over the folds of each
    held-out fold's MSE, the features re-standardised on each fold's training part; ties go to the
    smaller alpha. The folds (:func:`cv_folds`) are a seeded permutation of the essays cut into
    ``n_folds`` near-equal parts. (SmolLM2-135M on the shipped 200 training essays picks 30..1000.)

Layer (:func:`choose_layer`)
    A ridge per hidden-state index on the training essays; the index with the highest mean
    validation QWK of the rounded predictions (:func:`modules.metrics.mean_qwk`) wins, ties to the
    lower index. It has no test argument: test essays never choose anything.

Rows (:func:`probe_predictions`)
    Shaped like the LoRA scorer's prediction rows, so evaluation and the confidence code read them
    unchanged: ``weighted_expected`` is the continuous ridge output clipped to each rubric's range,
    ``weighted`` and ``greedy`` are it rounded half up (floor(x + 0.5)), ``text`` their score line,
    ``valid`` True, ``truncated`` False, ``probabilities`` None (no distribution, so the
    distribution signals of the confidence code are skipped), ``weighted_underflow`` [].

The probe's file, ``probe.json``: :mod:`modules.probe_run`.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from modules.metrics import mean_qwk
from modules.score_lines import score_line

logger = logging.getLogger(__name__)

# 10^-2 .. 10^6 in half decades (17 values). Standardised hidden states have D = 576 (SmolLM2-135M)
# to 4096 (8B) strongly correlated columns, so useful alphas run far above sklearn's default 1.
DEFAULT_ALPHAS: tuple[float, ...] = tuple(float(10.0 ** (e / 2)) for e in range(-4, 13))
_CONSTANT_STD = 1e-6  # relative: a feature with std <= 1e-6 * max(1, |mean|) is constant


# ----------------------------------------------------------------------------- features

def _forward_kwargs(model) -> dict:
    """``logits_to_keep=1`` where the model takes it: only the hidden states are needed, and an
    8B model's logits for 8 x 512 tokens over 128k words would take a gigabyte."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        takes = "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        takes = False
    return {"logits_to_keep": 1} if takes else {}


def essay_token_ids(tokenizer, essays: Sequence[str], max_tokens: int) -> list[list[int]]:
    """Each essay's model input: [BOS] (when the tokenizer has one) + its first ``max_tokens``
    tokens of the plain encoding (``add_special_tokens=False``)."""
    prefix = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    ids = []
    for i, essay in enumerate(essays):
        tokens = tokenizer(essay, add_special_tokens=False, truncation=True, max_length=max_tokens)["input_ids"]
        if not tokens:
            raise ValueError(f"essay {i} has no tokens")
        ids.append(prefix + list(tokens))
    return ids


def essay_features(model, tokenizer, essays: Sequence[str], *, max_tokens: int = 512,
                   batch_size: int = 8) -> np.ndarray:
    """float32 [N, L + 1, D]: per essay and hidden-state index (0 = embeddings, L decoder layers),
    the mean of the hidden states over the essay's tokens (see the module docstring: BOS in front
    when the tokenizer has one, position 0 left out, the first ``max_tokens`` essay tokens).

    One forward pass per batch of ``batch_size`` essays (``output_hidden_states=True``), padded on
    the right and masked, in eval mode under ``torch.inference_mode()`` on the model's device; the
    essays are batched longest first (less padding) and returned in input order. Pooling is in
    float32 whatever the model's dtype.
    """
    import torch

    if max_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_tokens and batch_size must be >= 1, got {max_tokens} and {batch_size}")
    ids = essay_token_ids(tokenizer, essays, max_tokens)
    if not ids:
        raise ValueError("no essays")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = model.get_input_embeddings().weight.device
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    extra = _forward_kwargs(model)
    out: np.ndarray | None = None
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in tqdm(batches, desc="features", unit="batch", disable=None):
                lengths = torch.tensor([len(ids[i]) for i in batch])
                width = int(lengths.max())
                input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
                for row, i in enumerate(batch):
                    input_ids[row, :len(ids[i])] = torch.tensor(ids[i], dtype=torch.long)
                attention = (torch.arange(width)[None, :] < lengths[:, None]).long()
                hidden = model(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                               output_hidden_states=True, use_cache=False, **extra).hidden_states
                weights = attention.clone()
                weights[lengths > 1, 0] = 0  # position 0 (the sink) unless it is all there is
                weights = weights.to(device=device, dtype=torch.float32)[:, :, None]
                count = weights.sum(dim=1)  # [B, 1]
                pooled = torch.stack([(h.float() * weights).sum(dim=1) / count for h in hidden], dim=1)
                if out is None:
                    out = np.empty((len(ids), *pooled.shape[1:]), dtype=np.float32)
                out[batch] = pooled.cpu().numpy()
    finally:
        model.train(was_training)
    return out


# ----------------------------------------------------------------------------- ridge

@dataclass(frozen=True, eq=False)
class RidgeFit:
    """A ridge per rubric on standardised features: ``predict = ((x - mean) / scale) @ coef.T + intercept``.

    ``mean``, ``scale`` [D]; ``coef`` [K, D]; ``intercept``, ``alpha`` [K]; ``alphas`` the grid
    searched [A]; ``cv_mse`` [K, A] the cross-validated MSE (None when the grid is one alpha)."""
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray
    alpha: np.ndarray
    alphas: np.ndarray
    cv_mse: np.ndarray | None = None


def cv_folds(n: int, n_folds: int = 5, seed: int = 0) -> list[np.ndarray]:
    """The held-out indices of each fold, sorted: ``np.random.default_rng(seed).permutation(n)``
    cut by ``np.array_split`` into ``min(n_folds, n)`` parts (sizes differ by at most one)."""
    if n < 2 or n_folds < 2:
        raise ValueError(f"cross-validation needs at least 2 essays and 2 folds, got {n} and {n_folds}")
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(perm, min(n_folds, n))]


def standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, scale) [D] of the rows of ``x`` in float64: the column means and population standard
    deviations, a deviation <= 1e-6 * max(1, |mean|) replaced by 1 (a constant feature)."""
    x = np.asarray(x, dtype=np.float64)
    mean, std = x.mean(axis=0), x.std(axis=0)
    return mean, np.where(std > _CONSTANT_STD * np.maximum(1.0, np.abs(mean)), std, 1.0)


def _ridge_path(x: np.ndarray, y: np.ndarray):
    """Standardise ``x`` [N, D] and centre ``y`` [N, K]; returns (mean, scale, y_mean, B, lam, t)
    such that the coefficients at alpha a are ``B @ (t / (lam + a)[:, None])`` [D, K].

    One symmetric eigendecomposition serves every alpha (much faster than an SVD of Z, same
    result): with N <= D the dual form, ``Z Z^T = U diag(lam) U^T``, ``w = Z^T U diag(1 / (lam + a))
    U^T y`` (B = Z^T U, t = U^T y); else the primal form, ``Z^T Z = V diag(lam) V^T``,
    ``w = V diag(1 / (lam + a)) V^T Z^T y`` (B = V, t = V^T Z^T y). Both are the SVD formula
    ``V diag(s / (s^2 + a)) U^T y`` of the module docstring, lam = s^2."""
    mean, scale = standardise(x)
    z = (x - mean) / scale
    y_mean = y.mean(axis=0)
    yc = y - y_mean
    if z.shape[0] <= z.shape[1]:
        lam, u = np.linalg.eigh(z @ z.T)
        basis, t = z.T @ u, u.T @ yc
    else:
        lam, basis = np.linalg.eigh(z.T @ z)
        t = basis.T @ (z.T @ yc)
    return mean, scale, y_mean, basis, np.maximum(lam, 0.0), t


def fit_ridge(x: np.ndarray, y: np.ndarray, *, alphas: Sequence[float] = DEFAULT_ALPHAS, n_folds: int = 5,
              seed: int = 0) -> RidgeFit:
    """A ridge per column of ``y`` [N, K] on ``x`` [N, D] (see the module docstring for the
    formulas), each column's alpha chosen from ``alphas`` by ``n_folds``-fold cross-validation
    (folds :func:`cv_folds` ``(N, n_folds, seed)``) on these rows only; one alpha: no CV."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    y = y[:, None] if y.ndim == 1 else y
    grid = np.asarray(alphas, dtype=np.float64).ravel()
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[0] < 1:
        raise ValueError(f"need x [N, D] and y [N, K] with the same N >= 1, got {x.shape} and {y.shape}")
    if grid.size == 0 or not np.all(np.isfinite(grid)) or np.any(grid <= 0):
        raise ValueError(f"alphas must be positive numbers, got {list(grid)}")
    cv_mse = None
    if grid.size > 1:
        folds = cv_folds(x.shape[0], n_folds, seed)
        mse = np.zeros((len(folds), grid.size, y.shape[1]))
        for f, held in enumerate(folds):
            keep = np.setdiff1d(np.arange(x.shape[0]), held)
            mean, scale, y_mean, basis, lam, t = _ridge_path(x[keep], y[keep])
            projected = ((x[held] - mean) / scale) @ basis  # [m, r]
            shrunk = t[None] / (lam[None, :, None] + grid[:, None, None])  # [A, r, K]
            pred = np.einsum("mr,ark->amk", projected, shrunk) + y_mean  # [A, m, K]
            mse[f] = ((pred - y[held][None]) ** 2).mean(axis=1)
        cv_mse = mse.mean(axis=0).T  # [K, A]
        chosen = grid[np.argmin(cv_mse, axis=1)]  # argmin: the first (smallest) alpha of ties
    else:
        chosen = np.repeat(grid, y.shape[1])
    mean, scale, y_mean, basis, lam, t = _ridge_path(x, y)
    coef = (basis @ (t / (lam[:, None] + chosen[None, :]))).T  # [K, D]: rubric k at its alpha
    return RidgeFit(mean=mean, scale=scale, coef=coef, intercept=y_mean, alpha=chosen, alphas=grid, cv_mse=cv_mse)


def predict_ridge(fit: RidgeFit, x: np.ndarray) -> np.ndarray:
    """float64 [N, K]: ``((x - fit.mean) / fit.scale) @ fit.coef.T + fit.intercept``, unrounded."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != fit.mean.size:
        raise ValueError(f"features must be [N, {fit.mean.size}], got {list(x.shape)}")
    return ((x - fit.mean) / fit.scale) @ fit.coef.T + fit.intercept


def clip_scores(pred: np.ndarray, ranges: Sequence[tuple[int, int]]) -> np.ndarray:
    """float64 [N, K]: column k of ``pred`` clipped to ``ranges[k]``."""
    lo, hi = np.asarray(ranges, dtype=np.float64).T
    return np.clip(np.asarray(pred, dtype=np.float64), lo, hi)


def round_scores(pred: np.ndarray, ranges: Sequence[tuple[int, int]]) -> np.ndarray:
    """int64 [N, K]: column k of ``pred`` rounded half up, floor(x + 0.5), and clipped to ``ranges[k]``."""
    return np.floor(clip_scores(pred, ranges) + 0.5).astype(np.int64)


# ----------------------------------------------------------------------------- layer choice

def choose_layer(train_feats: np.ndarray, train_gold: np.ndarray, valid_feats: np.ndarray, valid_gold: np.ndarray,
                 ranges: Sequence[tuple[int, int]], *, alphas: Sequence[float] = DEFAULT_ALPHAS, n_folds: int = 5,
                 seed: int = 0) -> tuple[int, list[float], RidgeFit]:
    """(layer, validation score of every layer, that layer's fit).

    For each hidden-state index l of ``train_feats`` [N, L + 1, D], :func:`fit_ridge` on
    ``train_feats[:, l]`` and ``train_gold`` [N, K]; its score is :func:`~modules.metrics.mean_qwk`
    of ``valid_gold`` against :func:`round_scores` of its predictions on ``valid_feats[:, l]``.
    The best score wins, ties to the lower index. The fit returned is on the training essays only.
    """
    train_feats, valid_feats = np.asarray(train_feats), np.asarray(valid_feats)
    if train_feats.ndim != 3 or valid_feats.ndim != 3 or train_feats.shape[1:] != valid_feats.shape[1:]:
        raise ValueError(f"need features [N, L + 1, D] of one shape, got {train_feats.shape} and {valid_feats.shape}")
    valid_gold = np.asarray(valid_gold)
    scores: list[float] = []
    best: tuple[int, RidgeFit] | None = None
    for layer in tqdm(range(train_feats.shape[1]), desc="layers", unit="layer", disable=None):
        fit = fit_ridge(train_feats[:, layer], train_gold, alphas=alphas, n_folds=n_folds, seed=seed)
        scores.append(mean_qwk(valid_gold, round_scores(predict_ridge(fit, valid_feats[:, layer]), ranges), ranges))
        if best is None or scores[-1] > scores[best[0]]:
            best = (layer, fit)
    return best[0], scores, best[1]


# ----------------------------------------------------------------------------- the probe

@dataclass(frozen=True, eq=False)
class Probe:
    """A trained probe: the layer, its ridge, and what the features must be (``max_tokens``,
    ``bos_prefix``, mean pooling) for the rubrics ``rubric_names`` with ``ranges``."""
    layer: int
    fit: RidgeFit
    rubric_names: tuple[str, ...]
    ranges: tuple[tuple[int, int], ...]
    max_tokens: int
    layer_scores: tuple[float, ...]
    bos_prefix: bool = True
    base_model: str | None = None
    pooling: str = "mean"


def fit_probe(train_feats: np.ndarray, train_gold: np.ndarray, valid_feats: np.ndarray, valid_gold: np.ndarray,
              info, *, max_tokens: int, bos_prefix: bool, base_model: str | None = None,
              alphas: Sequence[float] = DEFAULT_ALPHAS, n_folds: int = 5, seed: int = 0) -> Probe:
    """:func:`choose_layer` as a :class:`Probe` for the rubrics of ``info`` (a DatasetInfo);
    ``max_tokens`` and ``bos_prefix`` (``tokenizer.bos_token_id is not None``) describe how the
    features were made. Warns when a chosen alpha is at an end of the grid."""
    layer, scores, fit = choose_layer(train_feats, train_gold, valid_feats, valid_gold, info.ranges,
                                      alphas=alphas, n_folds=n_folds, seed=seed)
    if fit.alphas.size > 1:
        edge = [name for name, a in zip(info.rubric_names, fit.alpha) if a in (fit.alphas.min(), fit.alphas.max())]
        if edge:
            logger.warning("probe: the alpha of %s is at an end of the grid %.3g..%.3g", ", ".join(edge),
                           fit.alphas.min(), fit.alphas.max())
    return Probe(layer=layer, fit=fit, rubric_names=tuple(info.rubric_names), ranges=tuple(map(tuple, info.ranges)),
                 max_tokens=max_tokens, layer_scores=tuple(scores), bos_prefix=bos_prefix, base_model=base_model)


def probe_predictions(probe: Probe, feats: np.ndarray, records: Sequence, info) -> list[dict]:
    """One prediction row per record (EssayRecord: ``id``, ``scores``), in the LoRA scorer's shape
    (see the module docstring for the mapping). ``feats``: [N, L + 1, D] from
    :func:`essay_features` (the probe's layer is taken) or [N, D] already that layer."""
    if list(info.rubric_names) != list(probe.rubric_names) or [tuple(r) for r in info.ranges] != list(probe.ranges):
        raise ValueError(f"the probe scores rubrics {list(probe.rubric_names)} with ranges {list(probe.ranges)}, "
                         f"the dataset has {info.rubric_names} with {info.ranges}")
    feats = np.asarray(feats)
    x = feats[:, probe.layer] if feats.ndim == 3 else feats
    if x.shape[0] != len(records):
        raise ValueError(f"{x.shape[0]} feature rows for {len(records)} records")
    expected = clip_scores(predict_ridge(probe.fit, x), probe.ranges)
    scores = round_scores(expected, probe.ranges)
    rows = []
    for record, e, s in zip(records, expected, scores):
        ints = [int(v) for v in s]
        rows.append({"id": record.id, "gold": None if record.scores is None else list(record.scores),
                     "greedy": ints, "text": score_line(ints), "valid": True, "truncated": False,
                     "weighted": list(ints), "weighted_expected": [float(v) for v in e],
                     "probabilities": None, "weighted_underflow": []})
    return rows
