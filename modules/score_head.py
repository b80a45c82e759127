"""A read-out head trained with the LM loss (issue 46, ``main_pipeline.py --head_layer L``): a
linear regression per rubric on one layer's mean-pooled prompt states, trained jointly with the
LoRA and kept in the adapter folder, where ``--score_path`` finds it.

Pooling (:func:`prompt_positions`, :func:`pool_states`)
    The prompt as training and scoring render it (chat template, instructions, the shortened
    essay), never the target: for hidden-state index l (0 = embeddings, l = after decoder layer l,
    the probe's convention) and the prompt positions P_i of example i, without its first token (the
    attention sink, whose state is orders of magnitude larger and nearly constant)::

        pooled[i, :] = (1 / |P_i|) * sum_{t in P_i} h_l[i, t, :]

    Causal attention makes the prompt's states independent of the target after it and of the
    padding before it, so a training batch and a prompt run alone (scoring's prefill) pool the same
    vector for the same essay.

Head (:class:`ScoreHead`)
    ``scores = score_mean + score_scale * (((pooled - feature_mean) / feature_scale) @ W^T + b)``,
    the standardisations fixed buffers, W [K, D] and b [K] trained. It starts as the ridge of
    :func:`modules.probe.fit_ridge` (alpha by cross-validation) on the frozen model's pooled prompt
    states of the training essays (:func:`initial_head`), so step 0 scores as a probe on the same
    layer and pooling, and training moves both the LoRA and the head from there.

Loss (:func:`head_loss`)
    The mean squared error in units of each rubric's training standard deviation s_k, added to the
    composite LM loss with ``--head_weight`` w::

        head = (1 / (B K)) * sum_{i, k} ((pred[i, k] - gold[i, k]) / s_k)^2
        total = CE + w_ntl * NTL + w_emo * EMO + w * head

File (:func:`save_head`, :func:`load_head`)
    ``score_head.safetensors`` in the run folder and in each checkpoint-*: the tensors
    ``weight``, ``bias``, ``feature_mean``, ``feature_scale``, ``score_mean``, ``score_scale``
    (float32) and, in the metadata, ``format`` "aes-score-head", ``version`` "1", ``layer`` and
    ``rubrics`` (JSON: name, min, max per rubric).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from modules.losses import IGNORE_INDEX

HEAD_FILE = "score_head.safetensors"
FORMAT, VERSION = "aes-score-head", "1"

logger = logging.getLogger(__name__)


def prompt_positions(attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """bool [B, T]: the positions each row's pooling reads: real tokens (``attention_mask`` 1) with
    no label (the prompt), without the row's first real token."""
    real = attention_mask.bool()
    first = real & (real.long().cumsum(dim=1) == 1)
    return real & (labels == IGNORE_INDEX) & ~first


def pool_states(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """float32 [B, D]: the mean of ``hidden`` [B, T, D] over each row's ``positions`` [B, T]."""
    weights = positions.to(dtype=torch.float32)[:, :, None]
    count = weights.sum(dim=1)
    if bool((count == 0).any()):
        raise ValueError("a row has no prompt position to pool (a prompt of one token?)")
    return (hidden.float() * weights).sum(dim=1) / count


def head_loss(pred: torch.Tensor, gold: torch.Tensor, score_scale: torch.Tensor) -> torch.Tensor:
    """``mean(((pred - gold) / score_scale)^2)`` over essays and rubrics; ``pred``, ``gold`` [B, K],
    ``score_scale`` [K] (each rubric's training standard deviation)."""
    return (((pred.float() - gold.float()) / score_scale) ** 2).mean()


class ScoreHead(nn.Module):
    """Scores in rubric units from pooled states of hidden-state index ``layer`` (module docstring)."""

    def __init__(self, layer: int, dim: int, rubric_names: Sequence[str], ranges: Sequence[tuple[int, int]]):
        super().__init__()
        if len(rubric_names) != len(ranges) or not rubric_names:
            raise ValueError(f"need one range per rubric, got {list(rubric_names)} and {list(ranges)}")
        self.layer = int(layer)
        self.rubric_names = tuple(rubric_names)
        self.ranges = tuple((int(lo), int(hi)) for lo, hi in ranges)
        k = len(self.rubric_names)
        self.linear = nn.Linear(dim, k)
        for name, size in (("feature_mean", dim), ("feature_scale", dim), ("score_mean", k), ("score_scale", k)):
            self.register_buffer(name, torch.zeros(size) if "mean" in name else torch.ones(size))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        z = (pooled.float() - self.feature_mean) / self.feature_scale
        return self.score_mean + self.score_scale * self.linear(z.to(self.linear.weight.dtype)).float()

    def expected_and_rounded(self, pooled: torch.Tensor) -> tuple[list[list[float]], list[list[int]]]:
        """Per row: the scores clipped to each rubric's range, and those rounded half up."""
        from modules.probe import clip_scores, round_scores

        with torch.no_grad():
            raw = self(pooled).double().cpu().numpy()
        return clip_scores(raw, self.ranges).tolist(), round_scores(raw, self.ranges).tolist()


def head_from_ridge(fit, layer: int, gold: np.ndarray, rubric_names: Sequence[str],
                    ranges: Sequence[tuple[int, int]]) -> ScoreHead:
    """The head that predicts exactly as ``fit`` (a :class:`modules.probe.RidgeFit` on pooled states
    of ``layer``): the ridge's standardisation as the feature buffers, the training scores' mean and
    standard deviation (``gold`` [N, K]; a constant rubric: 1) as the score buffers."""
    gold = np.asarray(gold, dtype=np.float64)
    std = gold.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    head = ScoreHead(layer, fit.mean.size, rubric_names, ranges)
    with torch.no_grad():
        head.feature_mean.copy_(torch.from_numpy(fit.mean))
        head.feature_scale.copy_(torch.from_numpy(fit.scale))
        head.score_mean.copy_(torch.from_numpy(fit.intercept))
        head.score_scale.copy_(torch.from_numpy(std))
        head.linear.weight.copy_(torch.from_numpy(fit.coef / std[:, None]))
        head.linear.bias.zero_()
    return head


def stack_stop(model, layer: int) -> int | None:
    """Where a pass that reads hidden-state index ``layer`` may cut the decoder stack: one layer more
    than it reads, since the model normalises its last layer's output (hidden-state index n is
    norm(L_{n-1}(...))), so a cut stack's last index is not the full pass's; None for the last index."""
    return layer + 1 if layer < model.config.num_hidden_layers else None


def prompt_features(model, tokenizer, prompts: Sequence[str], layer: int) -> np.ndarray:
    """float32 [N, D]: each prompt run alone through ``model`` (:func:`modules.scoring.prefill`, as
    scoring runs it), its states of ``layer`` pooled (module docstring). Only the decoder layers up
    to ``layer`` run: the ones above it cannot change its states, so the features are those of the
    whole model's pass, bit for bit, at about ``(layer + 1) / num_hidden_layers`` of its cost."""
    from modules.frozen_cache import layers_from
    from modules.scoring import eval_mode, prefill

    stop = stack_stop(model, layer)
    rows = []
    with eval_mode(model), torch.inference_mode(), layers_from(model, 0, stop):
        for prompt in tqdm(prompts, desc="head features", unit="essay", disable=None):
            rows.append(prefill(model, tokenizer, prompt, pool_layer=layer).pooled.cpu().numpy())
    return np.stack(rows)


def cached_prompt_features(model, examples: Sequence[dict], start: int, layer: int) -> np.ndarray:
    """float32 [N, D]: :func:`prompt_features` of the training ``examples`` read from their
    frozen-layer cache (``frozen_states``, the states entering decoder layer ``start`` <= ``layer``;
    :mod:`modules.frozen_cache`): only layers ``start`` .. ``layer`` run, so the starting ridge
    costs no pass of its own through the frozen layers. Each example holds its prompt and then its
    target; a prompt position's states never see the target after it, so these are the prompt's
    own pooled states, to float rounding."""
    from modules.frozen_cache import STATES_KEY, cached_forward, decoder
    from modules.scoring import eval_mode

    if layer < start:
        raise ValueError(f"--head_layer {layer} reads below the first adapted layer {start}")
    stop = stack_stop(model, layer)
    device = decoder(model).norm.weight.device
    rows = []
    with eval_mode(model), torch.inference_mode():
        for example in tqdm(examples, desc="head features (cached)", unit="essay", disable=None):
            states = example[STATES_KEY][None].to(device)
            mask = torch.ones(states.shape[:2], dtype=torch.long, device=device)
            if layer == start:
                hidden = states
            else:
                hidden = cached_forward(model, states, start, stop=stop, attention_mask=mask, logits_to_keep=1,
                                        use_cache=False, output_hidden_states=True).hidden_states[layer - start]
            positions = prompt_positions(mask, torch.tensor([example["labels"]], device=device))
            rows.append(pool_states(hidden, positions)[0].cpu().numpy())
    return np.stack(rows)


def initial_head(model, tokenizer, records: Sequence, info, settings, layer: int, seed: int = 0,
                 features: np.ndarray | None = None) -> ScoreHead:
    """The head before training: the ridge on the (still untrained) model's pooled prompt states of
    the training ``records`` (:func:`head_from_ridge`), in float32 on the model's device.
    ``features``: those states already pooled, one row per record (:func:`cached_prompt_features`);
    else :func:`prompt_features` computes them."""
    from modules.probe import fit_ridge

    n_states = model.config.num_hidden_layers + 1
    if not 0 <= layer < n_states:
        raise ValueError(f"--head_layer {layer}: the model has hidden-state indices 0..{n_states - 1}")
    feats = features if features is not None else prompt_features(
        model, tokenizer, [settings.prompt(r, info, tokenizer) for r in records], layer)
    gold = np.array([r.scores for r in records], dtype=np.float64)
    fit = fit_ridge(feats, gold, seed=seed)
    logger.info("score head: layer %d, initial ridge alpha %s", layer, ", ".join(f"{a:g}" for a in fit.alpha))
    head = head_from_ridge(fit, layer, gold, info.rubric_names, info.ranges)
    return head.to(model.get_input_embeddings().weight.device)


# ----------------------------------------------------------------------------- score_head.safetensors

def save_head(path_dir: str | Path, head: ScoreHead) -> Path:
    """Write ``path_dir/score_head.safetensors`` (format in the module docstring); returns its path."""
    from safetensors.torch import save_file

    tensors = {"weight": head.linear.weight, "bias": head.linear.bias, "feature_mean": head.feature_mean,
               "feature_scale": head.feature_scale, "score_mean": head.score_mean, "score_scale": head.score_scale}
    rubrics = [{"name": n, "min": lo, "max": hi} for n, (lo, hi) in zip(head.rubric_names, head.ranges)]
    path = Path(path_dir) / HEAD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(path),
              metadata={"format": FORMAT, "version": VERSION, "layer": str(head.layer), "rubrics": json.dumps(rubrics)})
    return path


def load_head(path_dir: str | Path, device=None) -> ScoreHead | None:
    """The head saved in ``path_dir`` (None when the run has none); ValueError naming the file when
    it is not a score head this version reads."""
    from safetensors import safe_open

    path = Path(path_dir) / HEAD_FILE
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{path}: not a score head of format {FORMAT} version {VERSION} "
                         f"(format {meta.get('format')!r}, version {meta.get('version')!r})")
    rubrics = json.loads(meta["rubrics"])
    head = ScoreHead(int(meta["layer"]), tensors["weight"].shape[1], [r["name"] for r in rubrics],
                     [(r["min"], r["max"]) for r in rubrics])
    with torch.no_grad():
        head.linear.weight.copy_(tensors["weight"])
        head.linear.bias.copy_(tensors["bias"])
        for name in ("feature_mean", "feature_scale", "score_mean", "score_scale"):
            getattr(head, name).copy_(tensors[name])
    return head.to(device) if device is not None else head


def check_head_rubrics(head: ScoreHead, info, where: str | Path) -> None:
    """ValueError unless the head scores the dataset's rubrics, with the same ranges, in order."""
    if list(head.rubric_names) != list(info.rubric_names) or list(head.ranges) != [tuple(r) for r in info.ranges]:
        raise ValueError(f"{where}: the score head scores {list(head.rubric_names)} with ranges {list(head.ranges)}, "
                         f"the dataset has {list(info.rubric_names)} with {[tuple(r) for r in info.ranges]}")
