"""Auxiliary losses (SPEC §5): Number Token Loss (MSE and Wasserstein) and EMO, plus the composite.

Every loss takes aligned (already shifted) ``logits [B, T, V]`` and ``labels [B, T]`` where
``IGNORE_INDEX`` (-100) marks positions without a target. The rows at the positions a loss uses
are gathered first (``logits[mask] -> [N, V]``) and all maths runs in float32 on those rows, so no
extra ``[B, T, V]`` tensor is ever created. Each loss is the mean over its positions; with no
position it is a zero still attached to ``logits`` (backward gives zero gradients), which keeps
DDP and gradient accumulation happy.

Each loss reads only a few columns of those rows (the number tokens for NTL, the top-k tokens for
EMO), so each also has a ``*_columns`` form that takes them already gathered: the trainer gathers
the columns of every term in one step and evaluates the same formulas on them.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from modules.score_lines import is_digit_string

IGNORE_INDEX = -100
SPACE_MARKERS = (" ", "\u0120", "\u2581")  # plain space, byte-level BPE "Ġ", SentencePiece "▁"
_EPS = 1e-12  # L2-normalisation floor, as in F.normalize
_F32_MAX = torch.finfo(torch.float32).max


def number_token_values(tokenizer) -> torch.FloatTensor:
    """Numeric value of every token id, NaN for tokens that are not numbers.

    value(t) = int(s) if s matches ``[0-9]+`` (ASCII digits only), where s is the token text with
    at most ONE leading space marker (" ", "Ġ", "▁") removed; otherwise NaN. Added and special
    tokens follow the same rule. Returns a float32 tensor of shape ``[len(tokenizer)]``.
    """
    n = len(tokenizer)
    values = torch.full((n,), float("nan"), dtype=torch.float32)
    for i, tok in enumerate(tokenizer.convert_ids_to_tokens(list(range(n)))):
        if not isinstance(tok, str):  # holes in the id space
            continue
        text = tok[1:] if tok[:1] in SPACE_MARKERS else tok
        if is_digit_string(text):
            value = float(text)  # a >38-digit string would overflow float32: not usable as a number
            if value <= _F32_MAX:
                values[i] = value
    return values


def _empty_safe_mean(per_position: Tensor) -> Tensor:
    """Mean of a 1-D tensor; 0 (still attached to the graph) when it is empty."""
    return per_position.sum() / max(per_position.numel(), 1)


def number_targets(labels: Tensor, values: Tensor, vocab: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Where NTL applies and what it compares, from the labels alone.

    Returns ``(mask, y, ids, v)``: ``mask`` (shape of ``labels``) marks positions whose label is a
    number token, ``y [N]`` their target values, ``ids [n]`` the number-token columns of a
    ``vocab``-wide row and ``v [n]`` their values. Columns past ``values`` (a padded vocabulary)
    are not numbers.
    """
    vals = values.to(device=labels.device, dtype=torch.float32).flatten()
    if vals.numel() > vocab:
        raise ValueError(f"values has {vals.numel()} entries but logits only {vocab} columns")
    vals = F.pad(vals, (0, vocab - vals.numel()), value=float("nan"))
    ids = torch.nonzero(~torch.isnan(vals)).squeeze(1)
    valid = labels != IGNORE_INDEX
    target = vals[labels.masked_fill(~valid, 0)]
    mask = valid & ~torch.isnan(target)
    return mask, target[mask], ids, vals[ids]


def number_logits(columns: Tensor) -> Tensor:
    """Number-token logits as NTL computes with them: float32, ±inf clamped to the float32 range,
    so a row whose number logits are all masked stays finite."""
    return columns.float().clamp(-_F32_MAX, _F32_MAX)


def _number_rows(logits: Tensor, labels: Tensor, values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(z [N, n], y [N], v [n])`` of :func:`ntl_mse_columns` taken from full logits: the number
    columns first, so only a ``[B, T, n]`` copy is made."""
    mask, y, ids, v = number_targets(labels.to(logits.device), values, logits.shape[-1])
    return number_logits(logits.index_select(-1, ids)[mask]), y, v


def ntl_mse(logits: Tensor, labels: Tensor, values: Tensor) -> Tensor:
    """Number Token Loss, dot-product/MSE variant (NTL-MSE).

    At every position whose label y_tok is a number token (``values[y_tok]`` not NaN):
        p_i   = softmax_i(logits[number tokens])         (softmax over the number tokens only)
        y_hat = sum_i p_i * v_i                          (v_i = values of the number tokens)
        l     = (y_hat - y)^2                            (y = values[y_tok])
    Returns mean(l) over those positions (other positions are ignored), 0 if there are none.
    """
    return ntl_mse_columns(*_number_rows(logits, labels, values))


def ntl_mse_columns(z: Tensor, y: Tensor, v: Tensor) -> Tensor:
    """:func:`ntl_mse` on gathered columns: ``z [N, n]`` number-token logits of the N positions,
    ``y [N]`` their target values, ``v [n]`` the columns' values (see :func:`number_targets`)."""
    y_hat = torch.softmax(z, dim=-1) @ v
    return _empty_safe_mean((y_hat - y) ** 2)


def ntl_was(logits: Tensor, labels: Tensor, values: Tensor) -> Tensor:
    """Number Token Loss, Wasserstein-1 variant (NTL-WAS).

    At every position whose label is a number token, with p the softmax over the number tokens,
    u_1 < ... < u_m the distinct number values (tokens of equal value, e.g. "5" and "Ġ5", merged
    into one bin), F_p and F_y the CDFs of p and of the one-hot target at y:
        l = sum_{k=1}^{m-1} |F_p(u_k) - F_y(u_k)| * (u_{k+1} - u_k)
    (F_y(u_k) = 1[u_k >= y], so the term is F_p(u_k) below y and the mass above u_k from y on,
    which is how it is evaluated, without cancellation). Returns the mean over those positions.
    Equal to E_p|v - y|, the form used by the ``ntloss`` package.
    """
    return ntl_was_columns(*_number_rows(logits, labels, values))


def ntl_was_columns(z: Tensor, y: Tensor, v: Tensor) -> Tensor:
    """:func:`ntl_was` on gathered columns (arguments as in :func:`ntl_mse_columns`)."""
    u, bin_of = torch.unique(v, sorted=True, return_inverse=True)
    p = torch.softmax(z, dim=-1)
    mass = p.new_zeros(p.shape[0], u.numel()).index_add(1, bin_of, p)  # [N, m] merged bins
    below = mass.cumsum(1)[:, :-1]                          # F_p(u_k), k = 1..m-1
    above = mass.flip(1).cumsum(1).flip(1)[:, 1:]           # 1 - F_p(u_k) = mass on u_{k+1..m}
    gaps = u.diff()
    dist = torch.where(u[:-1] < y[:, None], below, above)   # |F_p - F_y|
    return _empty_safe_mean((dist * gaps).sum(1))


def emo_loss(logits: Tensor, labels: Tensor, embedding_weight: Tensor, top_k: int = 64) -> Tensor:
    """EMO loss (embedding-space distance between the prediction and the gold token).

    At every labeled position, with p = softmax over the full vocabulary, J the top_k tokens by
    logit, y the gold token, E = embedding_weight [V, D] and n(x) = x / max(||x||_2, eps):
        w_j = p_j for j in J, j != y;  w_y = 0                 (no renormalisation)
        q   = n(sum_{j in J} w_j n(E_j))
        l   = 1 - cos(n(E_y), q) = 1 - <n(E_y), q>
    Returns the mean over labeled positions, 0 if there are none.

    Degenerate case: when every w_j is 0 (all top-k mass on the gold token, or underflow), q = 0
    and l = 1 - 0 = 1. This is the value of the eps-normalised formula itself (which tends to 1
    as ||sum w_j n(E_j)|| -> 0), it is constant there (zero gradient), and never NaN.

    E is treated as a fixed cost geometry (it is detached: gradients flow to the logits only, as
    in the EMO paper).
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    vocab = logits.shape[-1]
    if embedding_weight.shape[0] < vocab:
        raise ValueError(f"embedding_weight has {embedding_weight.shape[0]} rows but logits {vocab} columns")
    labels = labels.to(logits.device)
    mask = labels != IGNORE_INDEX
    rows = logits[mask].float()                                          # [N, V]
    top_logits, top_ids = rows.topk(min(top_k, vocab), dim=-1)           # [N, k]
    top_log_probs = top_logits - torch.logsumexp(rows, dim=-1, keepdim=True)  # log p_j without [N, V] softmax
    return emo_columns(top_log_probs, top_ids, labels[mask], embedding_weight)


def emo_columns(top_log_probs: Tensor, top_ids: Tensor, gold: Tensor, embedding_weight: Tensor) -> Tensor:
    """:func:`emo_loss` on gathered columns: ``top_log_probs [N, k]`` = log p_j of each position's
    top-k tokens ``top_ids [N, k]``, ``gold [N]`` its gold token.

    Evaluated with Gram matrices, <n(E_y), sum w n(E)> = w . s and ||sum w n(E)||^2 = w^T G w, so
    only [N, k] and [N, k, k] tensors are kept for backward.
    """
    w = top_log_probs.float().exp()
    w = w.masked_fill(top_ids == gold[:, None], 0.0)
    with torch.no_grad():
        emb = embedding_weight.detach().to(top_log_probs.device)
        e_top = F.normalize(emb[top_ids].float(), dim=-1, eps=_EPS)     # [N, k, D]
        e_gold = F.normalize(emb[gold].float(), dim=-1, eps=_EPS)        # [N, D]
        sim = torch.einsum("nkd,nd->nk", e_top, e_gold)                  # s_j = <n(E_j), n(E_y)>
        gram = e_top @ e_top.transpose(1, 2)                             # G_jl = <n(E_j), n(E_l)>
        del e_top
    dot = (w * sim).sum(-1)
    norm = torch.einsum("nj,njl,nl->n", w, gram, w).clamp_min(_EPS**2).sqrt()  # max(||.||, eps)
    return _empty_safe_mean(1.0 - dot / norm)


def composite_loss(ce: Tensor, ntl: Optional[Tensor], emo: Optional[Tensor],
                   ntl_weight: Optional[float], emo_weight: Optional[float]) -> tuple[Tensor, dict[str, float]]:
    """Combine CE with the auxiliary losses (SPEC §5).

    A term whose weight is None or 0 is disabled (not added). Static mode (no negative weight):
        total = CE + w_ntl * NTL + w_emo * EMO
    Dynamic mode (any enabled weight < 0): aux = sum of the enabled terms (unweighted),
        lambda = detach(CE / aux)  (0 when aux == 0),   total = 0.5 * (CE + lambda * aux)
    Returns ``(total, logs)`` with logs = {"loss_ce", "loss_ntl", "loss_emo", "loss_total"} as
    floats (unweighted terms; 0.0 for a term that was not computed) plus "dynamic_lambda" in
    dynamic mode.
    """
    enabled: list[tuple[Tensor, float]] = []
    for name, term, weight in (("ntl", ntl, ntl_weight), ("emo", emo, emo_weight)):
        if weight is None or weight == 0:
            continue
        if term is None:
            raise ValueError(f"{name}_weight={weight} enables the {name} loss but no {name} term was given")
        enabled.append((term, float(weight)))
    logs = {"loss_ce": float(ce.detach()),
            "loss_ntl": float(ntl.detach()) if ntl is not None else 0.0,
            "loss_emo": float(emo.detach()) if emo is not None else 0.0}
    if any(weight < 0 for _, weight in enabled):
        aux = sum(term for term, _ in enabled)
        aux_value = float(aux.detach())
        lam = ce.detach() / aux.detach() if aux_value > 0 else torch.zeros_like(ce)
        total = 0.5 * (ce + lam * aux)
        logs["dynamic_lambda"] = float(lam)
    else:
        total = ce + sum(weight * term for term, weight in enabled)
    logs["loss_total"] = float(total.detach())
    return total, logs
