"""The probability-weighted score (SPEC §6): the expected score under the model's distribution over
each rubric's valid values, computed exactly by teacher-forcing every candidate number in one
forward over the prompt's cache, whatever the tokenizer does with digits."""
from __future__ import annotations

import logging
from typing import NamedTuple, Sequence

import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from modules.score_lines import score_line
from modules.scoring import PromptState, eval_mode, model_forward, number_continuation_mask, prefill
from modules.tree_attention import require_tree_attention, tree_attention_mask

logger = logging.getLogger(__name__)


def _token_trie(sequences: Sequence[Sequence[int]]) -> tuple[list[int], list[int], list[int], list[int]]:
    """The trie of token sequences, one node per distinct non-empty prefix, parents before children:
    each node's token, parent (-1: the prompt), depth (0 = first token), and each sequence's last node."""
    index: dict[tuple[int, ...], int] = {}
    tokens: list[int] = []
    parents: list[int] = []
    depths: list[int] = []
    last: list[int] = []
    for seq in sequences:
        node = -1
        for depth in range(len(seq)):
            prefix = tuple(seq[:depth + 1])
            if prefix not in index:
                index[prefix] = len(tokens)
                tokens.append(int(seq[depth]))
                parents.append(node)
                depths.append(depth)
            node = index[prefix]
        last.append(node)
    return tokens, parents, depths, last


def check_tree_cache(cache, length: int) -> None:
    """Refuse a cache that cannot hold ``length`` tokens and be cut back exactly afterwards.

    Full-attention layers keep every token and crop by slicing. A sliding-window layer is the same
    while everything fits in its window (nothing slides out, and the tree mask, which the model
    applies to every layer as given, is then also the sliding mask); past that, and for quantised
    or recurrent layers, the prompt's states cannot be restored from the cache alone.
    """
    for layer in cache.layers:
        if type(layer) is DynamicLayer:
            continue
        if type(layer) is DynamicSlidingWindowLayer and length < layer.sliding_window:
            continue
        raise ValueError(f"weighted_predict scores candidates in the prompt's own cache and needs full-attention "
                         f"layers (or a sliding window longer than prompt + candidates, {length} tokens); this "
                         f"model's cache has a {type(layer).__name__}: use --no_weighted")


def _crop_cache(cache, length: int) -> None:
    # Layer by layer, so that a forward that failed half-way (some layers grown, some not) is
    # also undone exactly.
    for layer in cache.layers:
        extra = layer.get_seq_length() - length
        if extra > 0:
            layer.crop(-extra)


def _candidate_log_scores(model, tokenizer, prompt_cache, prompt_logits: torch.Tensor,
                          rubrics: Sequence[tuple[str, int, int]]) -> list[torch.Tensor]:
    """Unnormalised ``score(v)`` of ``weighted_predict`` for v = lo..hi of each ``(line_so_far, lo, hi)``
    (float32, one tensor per rubric)::

        score(v) = sum_j log p(t_j | prompt, t_<j) + log sum_{u not continuing a number} p(u | prompt, t)

    with ``t = tokens(line_so_far + str(v))``, less the log-probability of the tokens that every
    candidate of that rubric shares (a constant, so p_v is unchanged).

    All candidates of all the given rubrics go through the model in ONE forward, as a trie of their
    token sequences in one batch row after the prompt: a node per distinct token prefix (a line
    and the first digits shared by many candidates are computed once), at position
    ``len(prompt) + depth``, seeing the prompt and its ancestors only (tree attention mask), so
    its logits are those of its path run as a plain sequence. The trie is appended to
    ``prompt_cache`` itself and cropped off again, so the prompt's keys and values are never copied
    per candidate, and the cache comes back as it was.
    """
    device = prompt_logits.device
    groups = [[tokenizer(line + str(v), add_special_tokens=False)["input_ids"] for v in range(lo, hi + 1)]
              for line, lo, hi in rubrics]
    tokens, parents, depths, last = _token_trie([cand for group in groups for cand in group])
    n = len(tokens)
    past = prompt_cache.get_seq_length()
    check_tree_cache(prompt_cache, past + n)
    # seen[i, j]: node i attends to node j, i.e. j is i or one of its ancestors (parents come first).
    seen = torch.zeros((n, n), dtype=torch.bool)
    for node, parent in enumerate(parents):
        if parent >= 0:
            seen[node] = seen[parent]
        seen[node, node] = True
    visible = torch.cat([torch.ones((n, past), dtype=torch.bool), seen], dim=1).to(device)
    mask = tree_attention_mask(visible[None], model.get_input_embeddings().weight.dtype)
    positions = torch.tensor([depths], device=device) + past
    try:
        logits = model_forward(model, torch.tensor([tokens], device=device), prompt_cache, attention_mask=mask,
                          position_ids=positions).logits[0].float()
    finally:
        _crop_cache(prompt_cache, past)
    # Row 0 is the prompt's next-token distribution, row i + 1 node i's: node i's token is
    # predicted by row parents[i] + 1.
    logprobs = torch.log_softmax(torch.cat([prompt_logits[None].float(), logits]), dim=-1)
    token_lp = logprobs[torch.tensor(parents, device=device) + 1, torch.tensor(tokens, device=device)]
    digit = number_continuation_mask(tokenizer, logprobs.shape[-1], device)
    end_lp = torch.logsumexp(logprobs[torch.tensor(last, device=device) + 1][:, ~digit], dim=-1)
    # A candidate's tokens are its last node and that node's ancestors: row `last` of `seen`.
    paths = seen[last].to(device)
    scores, start = [], 0
    for group in groups:
        path = paths[start:start + len(group)]
        # Nodes on every candidate's path (the line so far, a shared first digit) add the same
        # constant to the rubric's scores, which cancels in p_v; leaving it out keeps the scores
        # small, and float32 precise. where(), not a matmul: 0 * -inf would be NaN where a
        # token's probability underflows.
        path = path & ~path.all(dim=0)
        token_sum = torch.where(path, token_lp[None], torch.zeros((), device=device)).sum(dim=1)
        scores.append(token_sum + end_lp[start:start + len(group)])
        start += len(group)
    return scores


class WeightedPrediction(NamedTuple):
    """What :func:`weighted_predict` returns: per rubric the expected score, the probabilities over
    lo..hi, and the indices of the rubrics whose scores underflowed (given a uniform distribution)."""
    expected: list[float]
    probabilities: list[list[float]]
    underflow: list[int]


def weighted_predict(model, tokenizer, prompt: str | PromptState, ranges: Sequence[tuple[int, int]],
                     prefix_scores: Sequence[int] | None = None) -> WeightedPrediction:
    """Expected score per rubric under the model, the probabilities over lo..hi, and the rubrics
    that underflowed.

    For rubric k, with ``line = "s_0 s_1 ... s_{k-1} "`` ("" for k = 0; ``s_j`` = ``prefix_scores[j]``,
    or rubric j's own argmax below when None), every candidate v in lo..hi is teacher-forced::

        score(v) = log P(tokens(line + str(v)) | prompt)             # all of its tokens
                 + log(1 - P(next token starts with an ASCII digit))  # the number ENDS after v
        p_v = exp(score(v) - logsumexp_u score(u)),   E_k = sum_v p_v * v

    The end term is what makes multi-token numbers exact: without it "1" would also collect
    the mass of "12", "13", ... With a tokenizer that has a "12" token, P("1") alone likewise
    includes continuations like "1" + "2". ``line + str(v)`` is tokenised as one text, as in
    training. The prompt is run once, here, or not at all when ``prompt`` is its :class:`PromptState`
    (from :func:`modules.predict.decode_batch`: the cache greedy decoding started from, which comes back
    unchanged); the candidates go through the model as a token trie over the
    prompt's cache (see ``_candidate_log_scores``; it needs sdpa or eager attention): all rubrics'
    in one forward when ``prefix_scores`` gives every line, else one forward per rubric, each
    after the previous rubric's argmax.
    When the scores underflow (no finite mass), the rubric falls back to the uniform distribution
    and its index is listed in ``underflow``.
    """
    if prefix_scores is not None and len(prefix_scores) < len(ranges) - 1:
        raise ValueError(f"prefix_scores needs {len(ranges) - 1} values, got {len(prefix_scores)}")
    require_tree_attention(model, "weighted_predict", "load the model with sdpa or eager attention, or use --no_weighted")
    expected: list[float] = []
    probabilities: list[list[float]] = []
    underflow: list[int] = []
    chosen: list[int] = []
    with eval_mode(model), torch.inference_mode():
        state = prefill(model, tokenizer, prompt) if isinstance(prompt, str) else prompt
        prompt_cache, prompt_logits = state.cache, state.logits
        if prefix_scores is not None:  # every line is known: one trie for all rubrics
            lines = [score_line(prefix_scores[:k]) + " " if k else "" for k in range(len(ranges))]
            known = _candidate_log_scores(model, tokenizer, prompt_cache, prompt_logits,
                                          [(line, lo, hi) for line, (lo, hi) in zip(lines, ranges)])
        for k, (lo, hi) in enumerate(ranges):
            if prefix_scores is not None:
                scores = known[k]
            else:
                line = score_line(chosen) + " " if chosen else ""
                scores = _candidate_log_scores(model, tokenizer, prompt_cache, prompt_logits, [(line, lo, hi)])[0]
            total = torch.logsumexp(scores, dim=0)
            if torch.isfinite(total):
                p = torch.exp(scores - total)
            else:
                logger.warning("rubric %d: candidate probabilities underflow; using a uniform distribution", k)
                p = torch.full_like(scores, 1.0 / scores.numel())
                underflow.append(k)
            values = torch.arange(lo, hi + 1, dtype=torch.float32, device=p.device)
            expected.append(float((p * values).sum()))
            probabilities.append(p.cpu().tolist())
            chosen.append(int(prefix_scores[k]) if prefix_scores is not None and k < len(prefix_scores)
                          else lo + int(torch.argmax(p)))
    return WeightedPrediction(expected, probabilities, underflow)
