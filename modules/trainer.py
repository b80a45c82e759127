"""CustomTrainer: the HF Trainer with the composite loss CE + w_ntl * NTL + w_emo * EMO, and its
length-bucketed sampler for --group_by_length."""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor
from torch.utils.data import Sampler
from transformers import Trainer

from modules import dist
from modules.losses import (IGNORE_INDEX, composite_loss, emo_columns, ntl_mse_columns, ntl_was_columns, number_logits,
                            number_targets)

logger = logging.getLogger(__name__)

NTL_COLUMNS = {"mse": ntl_mse_columns, "was": ntl_was_columns}
LABEL_NAMES = ["labels", "ntl_labels", "emo_labels"]


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Align labels with logits: position t predicts token t+1, so labels move left by one.

    Shifting the labels instead of slicing the logits keeps the [B,T,V] logits untouched (no copy).
    """
    pad = torch.full_like(labels[:, :1], IGNORE_INDEX)
    return torch.cat([labels[:, 1:], pad], dim=1)


def logits_to_keep(labels: torch.Tensor) -> int:
    """How many trailing positions need logits: from the one before the earliest label to the end.

    With left padding every target ends at the last column, so this is the longest target + 1 and
    the LM head never runs over the (much longer) prompts.
    """
    labeled = (labels != IGNORE_INDEX).any(0).nonzero()
    if labeled.numel() == 0:
        return 1
    return labels.shape[1] - max(int(labeled[0]) - 1, 0)


def labeled_log_probs(logits: torch.Tensor, labels: torch.Tensor, *aux_labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """log_softmax of the labeled rows of ``logits [B, T, V]`` as ``[N, V]``, and each label tensor
    cut to the same N rows.

    Every loss reads only labeled rows, and NTL and EMO give the same value on log-probabilities
    as on logits (softmax is shift-invariant per row), so the rows are gathered, upcast and
    normalised once for all terms. Auxiliary labels must lie inside the labeled rows.
    """
    target = labels != IGNORE_INDEX
    for aux in aux_labels:
        if bool(((aux != IGNORE_INDEX) & ~target).any()):
            raise ValueError("ntl_labels/emo_labels mark a position that labels does not")
    rows = torch.log_softmax(logits[target].float(), dim=-1)
    return (rows, labels[target], *(aux[target] for aux in aux_labels))


def loss_terms(log_probs: torch.Tensor, labels: torch.Tensor, ntl_labels: torch.Tensor, emo_labels: torch.Tensor,
               config: LossConfig, embedding: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """CE, NTL and EMO (None when its weight is 0) of ``[N, V]`` log-probabilities.

    Each term reads a few columns of each row: CE the gold token, NTL the number tokens, EMO the
    row's top-k tokens (chosen without gradient; top-k of log-probabilities = top-k of logits). All
    of them are taken with one ``gather``, whose backward writes a single ``[N, V]`` gradient, and
    the losses' ``*_columns`` formulas run on them. Gathering per term instead costs one dense
    ``[N, V]`` gradient per term plus their sum, which dominates when the vocabulary is large.
    """
    n_rows, vocab = log_probs.shape
    columns = [labels[:, None]]
    if config.ntl_weight:
        number_rows, targets, number_ids, number_values = number_targets(
            ntl_labels, config.number_values.to(log_probs.device), vocab)
        columns.append(number_ids.expand(n_rows, -1))
    if config.emo_weight:
        emo_rows = emo_labels != IGNORE_INDEX
        top_k = min(config.emo_topk, vocab)
        with torch.no_grad():  # over every row: copying out the EMO rows first costs more than it saves
            top_ids = log_probs.topk(top_k, dim=-1).indices
        columns.append(top_ids)
    picked = log_probs.gather(1, torch.cat(columns, dim=1))  # [N, 1 + n_numbers + k]
    ce = -picked[:, 0].sum() / max(n_rows, 1)
    ntl = emo = None
    if config.ntl_weight:
        z = number_logits(picked[number_rows, 1:1 + number_ids.numel()])
        ntl = NTL_COLUMNS[config.loss_type](z, targets, number_values)
    if config.emo_weight:
        emo = emo_columns(picked[emo_rows, -top_k:], top_ids[emo_rows], emo_labels[emo_rows], embedding)
    return ce, ntl, emo


@dataclass(frozen=True)
class LossConfig:
    """Which auxiliary terms apply and how they are weighted (a weight of 0 disables its term)."""

    number_values: torch.Tensor
    ntl_weight: float = 2.0
    emo_weight: float = 0.1
    loss_type: str = "mse"
    emo_topk: int = 64

    def __post_init__(self):
        if self.loss_type not in NTL_COLUMNS:
            raise ValueError(f"loss_type must be one of {sorted(NTL_COLUMNS)}, got {self.loss_type!r}")
        if self.emo_topk < 1:
            raise ValueError(f"emo_topk must be >= 1, got {self.emo_topk}")


def output_embedding(model) -> torch.Tensor:
    """The whole output embedding matrix E of a model, also inside the Trainer's wrappers.

    DDP and DeepSpeed hold the model as ``.module``; FSDP2 shards E as a DTensor and ZeRO-3
    partitions it, so those two are gathered (a collective: every rank computes the loss at the
    same step). E is frozen under LoRA; the gathered copy carries no gradient.
    """
    while not hasattr(model, "get_output_embeddings") and hasattr(model, "module"):
        model = model.module
    weight = model.get_output_embeddings().weight
    if isinstance(weight, DTensor):
        with torch.no_grad():
            return weight.full_tensor()
    if hasattr(weight, "ds_id"):  # a DeepSpeed ZeRO-3 partitioned parameter
        import deepspeed

        with deepspeed.zero.GatheredParameters([weight]):
            return weight.detach().clone()
    return weight


def compute_loss_terms(model, inputs: dict[str, torch.Tensor], config: LossConfig, head=None,
                       head_weight: float = 0.0, frozen_start: int = 0) -> tuple[torch.Tensor, dict[str, float], object]:
    """One forward pass and every loss term: the composite loss, its logged parts and the model outputs.

    With a score head (:class:`modules.score_head.ScoreHead`) the same forward also returns the
    hidden states; the head reads its layer's pooled prompt states, and ``head_weight`` times
    :func:`modules.score_head.head_loss` against ``inputs["scores"]`` joins the total (logged as
    ``loss_head``, unweighted). A batch carrying ``frozen_states`` (the states entering decoder
    layer ``frozen_start``, :mod:`modules.frozen_cache`) runs from that layer on."""
    attention_mask = inputs["attention_mask"]
    keep = logits_to_keep(inputs["labels"])
    # Positions from the mask, so left padding (the collator's default) does not shift them.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    kwargs = dict(attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=keep, use_cache=False,
                  output_hidden_states=head is not None)
    start = 0
    if "frozen_states" in inputs:
        from modules.frozen_cache import cached_forward

        start = frozen_start
        outputs = cached_forward(model, inputs["frozen_states"], start, **kwargs)
    else:
        outputs = model(input_ids=inputs["input_ids"], **kwargs)
    logits = outputs.logits  # [B, keep, V]: only the positions that predict a target token
    rows = labeled_log_probs(logits, *(shift_labels(inputs[k])[:, -keep:] for k in LABEL_NAMES))
    ce, ntl, emo = loss_terms(*rows, config, output_embedding(model) if config.emo_weight else None)
    total, logged = composite_loss(ce, ntl, emo, config.ntl_weight, config.emo_weight)
    if head is not None:
        from modules.score_head import head_loss, pool_states, prompt_positions

        pooled = pool_states(outputs.hidden_states[head.layer - start],
                             prompt_positions(attention_mask, inputs["labels"]))
        term = head_loss(head(pooled), inputs["scores"], head.score_scale)
        total = total + head_weight * term
        logged = {**logged, "loss_head": float(term.detach()), "loss_total": float(total.detach())}
    return total, logged, outputs


class ShuffledLengthBuckets(Sampler[int]):
    """Indices whose every run of ``batch_size`` is a batch of similar-length examples, the batches
    in random order.

    Each epoch: a random permutation, cut into pools of ``pool_batches * batch_size`` examples; each
    pool sorted by length and cut into batches; every batch of the epoch then shuffled (a short last
    batch stays last, so the runs stay aligned). Padding falls almost as much as with the Trainer's
    ``LengthGroupedSampler``, but that sampler reads each megabatch long to short, and on essays
    length tracks the score: its steps sweep from high to low scores and the last ones see only
    short, low-scoring essays. Here no stretch of steps is biased by length.
    """

    def __init__(self, lengths: list[int], batch_size: int, *, pool_batches: int = 16, seed: int = 0):
        if batch_size < 1 or pool_batches < 1:
            raise ValueError(f"batch_size and pool_batches must be >= 1, got {batch_size} and {pool_batches}")
        self.lengths, self.batch_size, self.pool_batches, self.seed = list(lengths), batch_size, pool_batches, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The Trainer calls this before each epoch: every epoch draws its own batches."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def batches(self) -> list[list[int]]:
        """This epoch's batches, in the order they are read."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        pool = self.batch_size * self.pool_batches
        batches = []
        for start in range(0, len(order), pool):
            ranked = sorted(order[start:start + pool], key=self.lengths.__getitem__)
            batches += [ranked[i:i + self.batch_size] for i in range(0, len(ranked), self.batch_size)]
        # Pools hold whole batches, so only the very last batch can be short.
        short = [batches.pop()] if batches and len(batches[-1]) < self.batch_size else []
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()] + short

    def __iter__(self):
        for batch in self.batches():
            yield from batch


class CustomTrainer(Trainer):
    """Trainer whose ``compute_loss`` adds Number Token Loss and EMO to the cross-entropy.

    Weights follow the original tool: a weight of 0 disables its term, a negative weight selects
    dynamic weighting (``modules.losses.composite_loss``). Every term is averaged over the steps
    since the last log and logged as ``loss_ce``, ``loss_ntl``, ``loss_emo``, ``loss_total``
    (and ``dynamic_lambda``, and ``loss_head`` with a score head) into ``state.log_history`` and every reporter (wandb).
    """

    # compute_loss returns a per-micro-batch mean; the Trainer divides it for gradient accumulation.
    loss_is_scaled_for_ga = False

    def __init__(self, *args, loss_config: LossConfig, score_head=None, head_weight: float = 0.0,
                 head_learning_rate: float | None = None, frozen_start: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_config = loss_config
        # The head is a submodule of the model (so the optimizer trains it) and saved beside each
        # adapter, which save_pretrained alone would leave out.
        self.score_head, self.head_weight, self.head_learning_rate = score_head, head_weight, head_learning_rate
        self.frozen_start = frozen_start  # the layer cached examples' frozen_states enter (--cache_frozen_layers)
        self._term_sums: dict[str, float] = defaultdict(float)
        self._term_count = 0

    def create_optimizer(self, model=None):
        had_one = self.optimizer is not None
        optimizer = super().create_optimizer(model)
        if had_one or self.score_head is None or self.head_learning_rate is None:
            return optimizer
        # The head in a group of its own at its own learning rate (the schedule scales every group).
        head_ids = {id(p) for p in self.score_head.parameters()}
        moved = [p for group in optimizer.param_groups for p in group["params"] if id(p) in head_ids]
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in head_ids]
        optimizer.add_param_group({"params": moved, "lr": self.head_learning_rate, "weight_decay": 0.0})
        return optimizer

    def _get_train_sampler(self, train_dataset=None):
        # "group_by_length" means ShuffledLengthBuckets here: the Trainer's own grouped order
        # collapsed QWK on real essays (see ShuffledLengthBuckets).
        train_dataset = self.train_dataset if train_dataset is None else train_dataset
        if self.args.train_sampling_strategy != "group_by_length" or not hasattr(train_dataset, "__len__"):
            return super()._get_train_sampler(train_dataset)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return ShuffledLengthBuckets([len(example["input_ids"]) for example in train_dataset],
                                     self.args.train_batch_size, seed=seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        total, logged, outputs = compute_loss_terms(model, inputs, self.loss_config, self.score_head, self.head_weight,
                                                    self.frozen_start)
        if model.training:
            for key, value in logged.items():
                self._term_sums[key] += value
            self._term_count += 1
        return (total, outputs) if return_outputs else total

    def evaluate(self, *args, **kwargs):
        # An evaluation draws from the global RNG (each DataLoader iterator takes a base seed), which
        # would shift the LoRA dropout masks of every later step: forked, it leaves the training, and
        # so the adapter, the same whether and however often the run evaluates (--eval_strategy).
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            return super().evaluate(*args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        if self.score_head is not None and self.args.should_save:
            from modules.score_head import save_head

            save_head(output_dir or self.args.output_dir, self.score_head)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._term_count:
            # Every rank logs the training loss at the same step, so the terms can be averaged over
            # ranks here, like the Trainer's own "loss" (under one process this is the local mean).
            keys = sorted(self._term_sums)
            means = dist.mean([self._term_sums[k] / self._term_count for k in keys], self.args.device)
            logs.update({k: round(v, 6) for k, v in zip(keys, means)})
            self._term_sums.clear()
            self._term_count = 0
        super().log(logs, *args, **kwargs)
