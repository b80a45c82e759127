"""Training examples: token ids with the label masks the composite loss reads, and their padding.

The rendered prompt and the target are tokenised separately and their ids concatenated, so no
prompt token can ever become a label. Inside the target, the score-number tokens
(``ntl_labels``) and the feedback tokens (``emo_labels``) are found from character offsets, never
from fixed token counts, so any tokenizer works. Kept apart from :mod:`modules.data`, which reads
datasets without torch.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch

from modules.data import DatasetInfo, EssayRecord, fit_prompt, target_text
from modules.losses import IGNORE_INDEX, number_token_values
from modules.score_lines import score_line, score_spans

logger = logging.getLogger(__name__)


def _target_ids(record: EssayRecord, tokenizer, mtl: bool) -> tuple[str, list[int], list[tuple[int, int]]]:
    """The target text, its token ids (+EOS) and each token's character span in the text."""
    target = target_text(record, mtl)
    enc = tokenizer(target, add_special_tokens=False, return_offsets_mapping=True)
    return (target, list(enc["input_ids"]) + [tokenizer.eos_token_id],
            list(enc["offset_mapping"]) + [(len(target), len(target))])


def prompt_token_budget(records: Sequence[EssayRecord], tokenizer, mtl: bool, max_seq_length: int | None) -> int | None:
    """Tokens a prompt may take in this run: ``max_seq_length`` minus the longest target (+EOS) among
    ``records`` (the training split), or None without a length limit.

    The budget depends on the training split only, never on the essay being scored, so training
    and inference shorten every essay the same way and no test target leaks into its prompt.
    """
    if max_seq_length is None:
        return None
    longest = max(len(_target_ids(r, tokenizer, mtl)[1]) for r in records)
    if longest >= max_seq_length:
        raise ValueError(f"--max_seq_length {max_seq_length} leaves no room for a prompt: the longest training "
                         f"target takes {longest} tokens")
    return max_seq_length - longest


def _overlaps(span: tuple[int, int], lo: int, hi: int) -> bool:
    return span[0] < hi and span[1] > lo and span[1] > span[0]


def encode_example(record: EssayRecord, info: DatasetInfo, tokenizer, *, mtl: bool = False,
                   prompt_format: str = "chat", max_seq_length: int | None = None,
                   max_prompt_tokens: int | None = None,
                   number_values: torch.Tensor | None = None) -> dict[str, list[int]]:
    """Token ids and the three label masks of one training example.

    ``labels`` = target + EOS; ``ntl_labels`` = the score-number tokens; ``emo_labels`` = the
    feedback tokens (MTL only); all other positions hold -100. The prompt is shortened (its essay,
    never the target) to ``max_prompt_tokens`` and, should that not suffice, until prompt and
    target fit in ``max_seq_length``.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("a fast tokenizer is required: label masks come from character offsets")
    if number_values is None:
        number_values = number_token_values(tokenizer)
    target, target_ids, offsets = _target_ids(record, tokenizer, mtl)
    limits = [n for n in (max_prompt_tokens, max_seq_length and max_seq_length - len(target_ids)) if n is not None]
    _, prompt_ids = fit_prompt(record, info, tokenizer, mtl, prompt_format, min(limits) if limits else None)

    line_len = len(score_line(record.scores))
    spans = score_spans(target[:line_len])
    ntl, emo = [], []
    for tok, span in zip(target_ids, offsets):
        is_number = tok < len(number_values) and not torch.isnan(number_values[tok])
        in_score = any(_overlaps(span, lo, hi) for lo, hi in spans)
        ntl.append(tok if in_score and is_number else IGNORE_INDEX)
        emo.append(tok if mtl and _overlaps(span, line_len + 1, len(target)) else IGNORE_INDEX)
    if sum(t != IGNORE_INDEX for t in ntl) < len(spans):
        logger.warning("%s: some score digits are not number tokens for this tokenizer; NTL skips them", record.id)

    pad = [IGNORE_INDEX] * len(prompt_ids)
    return {"input_ids": prompt_ids + target_ids, "labels": pad + target_ids,
            "ntl_labels": pad + ntl, "emo_labels": pad + emo}


class ScoringCollator:
    """Pads encoded examples into tensors; padding is ignored by every label mask.

    Left padding by default: every target then ends in the last column, so the trainer computes
    logits for the target span only (``modules.trainer.logits_to_keep``).
    """

    keys = ("labels", "ntl_labels", "emo_labels")

    def __init__(self, pad_token_id: int, padding_side: str = "left"):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        batch = {"input_ids": torch.full((len(features), width), self.pad_token_id, dtype=torch.long),
                 "attention_mask": torch.zeros((len(features), width), dtype=torch.long)}
        for key in self.keys:
            batch[key] = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        states = features[0].get("frozen_states")  # [T, D] per example (modules.frozen_cache), padded as the ids
        if states is not None:
            batch["frozen_states"] = torch.zeros((len(features), width, states.shape[-1]), dtype=states.dtype)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            cols = slice(width - n, width) if self.padding_side == "left" else slice(0, n)
            batch["input_ids"][row, cols] = torch.tensor(f["input_ids"])
            batch["attention_mask"][row, cols] = 1
            for key in self.keys:
                batch[key][row, cols] = torch.tensor(f[key])
            if states is not None:
                batch["frozen_states"][row, cols] = f["frozen_states"]
        if "scores" in features[0]:  # the gold scores a score head trains on (modules.score_head)
            batch["scores"] = torch.tensor([f["scores"] for f in features], dtype=torch.float32)
        return batch
