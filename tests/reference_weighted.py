"""The weighted scorer's candidate step as it was before the tree-attention rewrite: the oracle
that ``tests/test_scoring.py`` checks ``modules.weighted._candidate_log_scores`` against, and the
"old" side of ``benchmarks/bench_weighted.py``. Kept here once, for both.

It copies the prompt's KV cache, runs the candidates' shared token prefix on the copy, then
copies that cache again and repeats it once per candidate (``batch_repeat_interleave``), so its
memory grows as (number of candidates) x (prompt length): 31 copies for a 0-30 rubric.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator
from unittest import mock

import torch

import modules.weighted as weighted
from modules.scoring import number_continuation_mask


def reference_candidate_log_scores(model, tokenizer, prompt_cache, prompt_logits: torch.Tensor, line_so_far: str,
                                   lo: int, hi: int) -> torch.Tensor:
    """Unnormalised log p(candidate tokens) + log p(number ends) for v = lo..hi (float32), with one
    padded batch row per candidate over a repeated copy of the prompt cache."""
    device = prompt_logits.device
    cands = [tokenizer(line_so_far + str(v), add_special_tokens=False)["input_ids"] for v in range(lo, hi + 1)]
    # Shared token prefix, capped so every candidate keeps at least one token to score.
    common = min(len(c) for c in cands) - 1
    for i in range(common):
        if any(c[i] != cands[0][i] for c in cands):
            common = i
            break
    cache, first_logits = prompt_cache, prompt_logits
    if common > 0:
        cache = copy.deepcopy(prompt_cache)
        out = model(input_ids=torch.tensor([cands[0][:common]], device=device), cache=cache, use_cache=True,
                    logits_to_keep=1)
        cache, first_logits = out.cache, out.logits[0, -1].float()
    past = cache.get_seq_length()
    suffixes = [c[common:] for c in cands]
    n, width = len(suffixes), max(len(s) for s in suffixes)
    ids = torch.zeros((n, width), dtype=torch.long, device=device)
    mask = torch.zeros((n, past + width), dtype=torch.long, device=device)
    mask[:, :past] = 1
    for row, suffix in enumerate(suffixes):
        ids[row, :len(suffix)] = torch.tensor(suffix, device=device)
        mask[row, past:past + len(suffix)] = 1
    batch_cache = copy.deepcopy(cache)  # forward and repeat both mutate the cache
    batch_cache.batch_repeat_interleave(n)
    logits = model(input_ids=ids, attention_mask=mask, cache=batch_cache, use_cache=True).logits.float()
    # Position j of row i predicts suffix token j + 1; the prefix's last logits predict token 0.
    logprobs = torch.log_softmax(torch.cat([first_logits.expand(n, 1, -1), logits], dim=1), dim=-1)
    digit = number_continuation_mask(tokenizer, logprobs.shape[-1], device)
    scores = torch.empty(n, dtype=torch.float32, device=device)
    for row, suffix in enumerate(suffixes):
        steps = len(suffix)
        token_lp = logprobs[row, torch.arange(steps, device=device), ids[row, :steps]].sum()
        end_lp = torch.logsumexp(logprobs[row, steps][~digit], dim=-1)  # log(1 - P(next token extends it))
        scores[row] = token_lp + end_lp
    return scores


def _reference_rubrics(model, tokenizer, prompt_cache, prompt_logits: torch.Tensor,
                       rubrics) -> list[torch.Tensor]:
    # The library's scorer takes several rubrics at once; the old one scored them one by one.
    return [reference_candidate_log_scores(model, tokenizer, prompt_cache, prompt_logits, line, lo, hi)
            for line, lo, hi in rubrics]


@contextmanager
def reference_scorer() -> Iterator[None]:
    """Within the block, ``modules.weighted.weighted_predict`` (and ``modules.predict.predict_split``,
    which calls it) score candidates with the reference above, one rubric per call as before, so old
    and new differ in the candidate step only."""
    with mock.patch.object(weighted, "_candidate_log_scores", _reference_rubrics):
        yield
