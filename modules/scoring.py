"""Greedy and probability-weighted scoring of prompts by the model (SPEC §6).

Greedy prediction generates the score line and parses it. The weighted prediction is the
expected score under the model's distribution over each rubric's valid values, computed
exactly by teacher-forcing every candidate number, whatever the tokenizer does with digits.
"""
from __future__ import annotations

import contextlib
import logging
import re
import weakref
from typing import Iterator, NamedTuple, Sequence

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessorList
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from modules.constrained import (ACCEPT, ScoreLineConstraint, ScoreLineLogitsProcessor, max_line_tokens,
                                 score_line_constraint)
from modules.score_lines import line_sample, score_line
from modules.tree_attention import require_tree_attention, tree_attention_mask

logger = logging.getLogger(__name__)

_BYTE_DIGIT_RE = re.compile(r"<0x3[0-9]>")  # SentencePiece byte-fallback tokens for "0".."9"


# --------------------------------------------------------------------------- vocabulary tables

class _VocabInfo:
    """Per-tokenizer tables, computed once: tokens with a newline, tokens continuing a number."""

    def __init__(self, tokenizer) -> None:
        ids = list(range(len(tokenizer)))
        texts = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False,
                                       clean_up_tokenization_spaces=False)
        self.size = len(ids)
        self.newline_ids = [i for i, text in enumerate(texts) if "\n" in text]
        # Raw token strings, not decoded ones: single-token decoding may drop a leading space
        # (SentencePiece decoders strip it), which would turn "▁5" into a digit continuation.
        self.digit_start = torch.tensor([_continues_number(tok) for tok in tokenizer.convert_ids_to_tokens(ids)],
                                        dtype=torch.bool)


def _continues_number(token: str | None) -> bool:
    """True when a token placed right after a number would extend it: its text starts with an
    ASCII digit. A token that starts with a space marker ("Ġ5", "▁5") starts a NEW number, so it
    ends the current one; this matters for GPT-2-style tokenizers that glue spaces to digits."""
    if not isinstance(token, str) or not token:
        return False
    return "0" <= token[0] <= "9" or bool(_BYTE_DIGIT_RE.fullmatch(token))


_VOCAB_CACHE: "weakref.WeakKeyDictionary[object, _VocabInfo]" = weakref.WeakKeyDictionary()


def _vocab_info(tokenizer) -> _VocabInfo:
    # Keyed on the tokenizer object (not id(), which is reused after garbage collection) and
    # rebuilt when tokens were added since.
    info = _VOCAB_CACHE.get(tokenizer)
    if info is None or info.size != len(tokenizer):
        info = _VOCAB_CACHE[tokenizer] = _VocabInfo(tokenizer)
    return info


def eos_token_ids(tokenizer, model=None) -> list[int]:
    """EOS of the tokenizer plus the model's generation-config EOS ids (chat end-of-turn tokens)."""
    ids = [tokenizer.eos_token_id]
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """EOS id(s) (the model's too, when given) and every token whose text contains a newline:
    generation stops at the end of the score line, whichever token carries the newline
    (``"\\n"``, ``".\\n\\n"``, ``"<0x0A>"``)."""
    return list(dict.fromkeys(eos_token_ids(tokenizer, model) + _vocab_info(tokenizer).newline_ids))


def line_constraint(tokenizer, ranges: Sequence[tuple[int, int]], model=None) -> ScoreLineConstraint:
    """The ``--constrained`` automaton for this tokenizer and these rubrics; the line ends at a
    newline or at any EOS id of :func:`eos_token_ids` (the model's own included), as generation does."""
    return score_line_constraint(tokenizer, ranges, eos_token_ids(tokenizer, model))


# --------------------------------------------------------------------------- greedy

def input_device(model) -> torch.device:
    """Where the model's input ids must go: the device of its input embeddings (with a
    ``device_map`` the layers may sit elsewhere)."""
    return model.get_input_embeddings().weight.device


@contextlib.contextmanager
def eval_mode(model) -> Iterator[object]:
    """model.eval() for the block, restoring training mode after (the trainer scores mid-run)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def score_line_budget(tokenizer, ranges: Sequence[tuple[int, int]], constrained: bool = False) -> int:
    """Tokens a valid score line can take: each rubric's widest number plus its separator, plus
    the newline. An untrained model that never closes the line then costs no more than that.

    With ``constrained`` decoding, at least :func:`~modules.constrained.max_line_tokens`: the
    constraint may let a number through as several tokens ("1" "0" "0" where the tokenizer writes
    "100"), and a constrained line must never be cut by the budget.
    """
    widest = [max(len(tokenizer(str(v), add_special_tokens=False)["input_ids"]) for v in (lo, hi)) for lo, hi in ranges]
    budget = sum(widest) + len(ranges) + 1
    return max(budget, max_line_tokens(ranges)) if constrained else budget


class _GreedyDecoding(NamedTuple):
    """What every greedy ``generate`` call of one scoring run shares."""
    ranges: Sequence[tuple[int, int]]
    max_new_tokens: int
    stop: list[int]
    pad_id: int
    constraint: ScoreLineConstraint | None
    generate_feedback: bool


def _greedy_decoding(model, tokenizer, ranges: Sequence[tuple[int, int]], max_new_tokens: int | None,
                     generate_feedback: bool, constrained: bool) -> _GreedyDecoding:
    if max_new_tokens is None:
        max_new_tokens = score_line_budget(tokenizer, ranges, constrained) + (128 if generate_feedback else 0)
    stop = eos_token_ids(tokenizer, model) if generate_feedback else stop_token_ids(tokenizer, model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    constraint = line_constraint(tokenizer, ranges, model) if constrained else None
    return _GreedyDecoding(ranges, max_new_tokens, stop, pad_id, constraint, generate_feedback)


def _greedy_tokens(model, rows: Sequence[Sequence[int]], decoding: _GreedyDecoding, cache=None) -> torch.Tensor:
    """The generated tokens [B, n] of one batched greedy ``generate`` over tokenised prompts,
    left-padded to the longest; rows that stopped early are padded after their stop token.

    ``cache``: the batch's KV cache of every prompt token but the last, laid out as the padded ids
    are (:func:`left_padded_cache`); ``generate`` then runs only the last column. None: it runs
    the whole padded batch.
    """
    device = input_device(model)
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), decoding.pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, width - len(row):] = torch.tensor(row, dtype=torch.long)
        attention[r, width - len(row):] = 1
    # A processor per batch: it tracks the rows' states from this batch's prompt width on.
    processors = LogitsProcessorList(
        [ScoreLineLogitsProcessor(decoding.constraint, width)] if decoding.constraint else [])
    out = model.generate(input_ids=ids.to(device), attention_mask=attention.to(device), cache=cache, do_sample=False,
                         max_new_tokens=decoding.max_new_tokens, eos_token_id=decoding.stop,
                         pad_token_id=decoding.pad_id, temperature=None, top_p=None, top_k=None,
                         logits_processor=processors)
    return out[:, width:]


def _greedy_answers(tokenizer, new: torch.Tensor, decoding: _GreedyDecoding) -> list[dict]:
    """Each row of generated tokens as a sample (:func:`greedy_predict`'s answers)."""
    texts = tokenizer.batch_decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    answers = []
    for ended, text in zip(ended_rows(new, decoding.stop), texts):
        answer = line_sample(text, decoding.ranges, truncated=not (ended or "\n" in text))
        if decoding.generate_feedback:
            answer["text"] = text
        answers.append(answer)
    return answers


def _greedy_batch(model, tokenizer, rows: Sequence[Sequence[int]], decoding: _GreedyDecoding,
                  cache=None) -> list[dict]:
    """One batched greedy ``generate`` (:func:`_greedy_tokens`), its rows as answers."""
    return _greedy_answers(tokenizer, _greedy_tokens(model, rows, decoding, cache), decoding)


def greedy_predict(model, tokenizer, prompts: list[str], ranges: Sequence[tuple[int, int]], *,
                   batch_size: int = 8, max_new_tokens: int | None = None,
                   generate_feedback: bool = False, constrained: bool = False) -> list[dict]:
    """Greedy answers to ``prompts`` in batches, each as a sample: ``{"text", "scores"}`` plus
    ``"truncated": True`` when the budget ran out before the score line ended (its scores are then
    None, whatever the cut text would parse to).

    Left padding keeps every prompt's last token at the end of the row, which batched
    ``generate`` needs. Unless ``generate_feedback``, generation stops at the first token that
    carries a newline and ``text`` is the score line; with it, generation runs to EOS and ``text``
    holds the feedback too. The default budget is ``score_line_budget`` (plus 128 tokens with feedback).
    ``constrained``: every step is restricted to tokens that keep the answer a prefix of a valid
    score line (:mod:`modules.constrained`), so the argmax is over those; the feedback after the
    line is free.

    Each batch is one padded ``generate`` from the prompts on: the greedy-only path
    (``--no_weighted``). With weighted scoring, :func:`greedy_with_prompt_states` gives the same
    answers and keeps each prompt's forward for the weighted scorer.
    """
    decoding = _greedy_decoding(model, tokenizer, ranges, max_new_tokens, generate_feedback, constrained)
    answers: list[dict] = []
    with eval_mode(model), torch.inference_mode():
        for start in tqdm(range(0, len(prompts), batch_size), desc="greedy", unit="batch", disable=None):
            batch = prompts[start:start + batch_size]
            rows = [tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt in batch]
            answers += _greedy_batch(model, tokenizer, rows, decoding)
    return answers


class PromptState(NamedTuple):
    """A prompt run through the model once: its token ids, its KV cache, and the float32 logits of
    its last position (the first answer token's distribution)."""
    ids: list[int]
    cache: Cache
    logits: torch.Tensor


def prefill(model, tokenizer, prompt: str) -> PromptState:
    """Run ``prompt`` alone (no padding, no special tokens added) through the model once, keeping
    its cache and the last position's logits only. Call under ``torch.inference_mode()``."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("scoring needs a non-empty prompt")
    out = _forward(model, torch.tensor([ids], device=input_device(model)), last_only=True)
    return PromptState(ids, out.cache, out.logits[0, -1].float())


def left_padded_cache(model, states: Sequence[PromptState], *, last_token: bool = False) -> DynamicCache:
    """One batch cache of the prompts' keys and values, right-aligned as left-padded ids are: each
    prompt's every token but the last in ``max(len(ids)) - 1`` slots (``generate`` then runs the
    last column), or with ``last_token`` all of them in ``max(len(ids))`` slots (the caller starts
    from the states' logits). Padding slots hold zeros, which the attention mask hides. The
    prompts' own caches are copied, not changed, so the states serve several decodings."""
    drop = 0 if last_token else 1
    width = max(len(state.ids) for state in states) - drop

    def stacked(layer: int, name: str) -> torch.Tensor:
        # [batch, heads, width, head_dim]: each prompt's kept positions, zeros before them.
        return torch.cat([torch.nn.functional.pad(getattr(s.cache.layers[layer], name)[..., :len(s.ids) - drop, :],
                                                  (0, 0, width - (len(s.ids) - drop), 0)) for s in states])

    layers = range(len(states[0].cache.layers))
    return DynamicCache([(stacked(k, "keys"), stacked(k, "values")) for k in layers], config=model.config)


def greedy_from_states(model, tokenizer, states: Sequence[PromptState], ranges: Sequence[tuple[int, int]], *,
                       max_new_tokens: int | None = None, generate_feedback: bool = False,
                       constrained: bool = False) -> list[dict]:
    """:func:`greedy_predict`'s answers for prompts already run through the model (:func:`prefill`),
    decoded together in one ``generate`` from a left-padded copy of their caches
    (:func:`left_padded_cache`), which re-runs only each prompt's last token. The states are left
    as they were: one prefill serves unconstrained and constrained decoding, the weighted scorer
    and the trie sampler alike. Call under ``torch.inference_mode()``."""
    decoding = _greedy_decoding(model, tokenizer, ranges, max_new_tokens, generate_feedback, constrained)
    with eval_mode(model):
        return _greedy_batch(model, tokenizer, [s.ids for s in states], decoding, cache=left_padded_cache(model, states))


def greedy_pair_from_states(model, tokenizer, states: Sequence[PromptState],
                            ranges: Sequence[tuple[int, int]]) -> tuple[list[dict], list[dict]]:
    """:func:`greedy_from_states`'s answers unconstrained and ``constrained``, in that order, from
    one set of prompt states; the constrained ``generate`` runs only when its answers can differ.

    Constrained greedy takes the argmax over the allowed tokens, so at every step where the
    unconstrained argmax is allowed both pick the same token (ties go to the lowest id either
    way). When every row's unconstrained tokens are allowed up to the end of its line (the
    automaton reaches its end: the line is valid and ended, not cut by the budget), the constrained
    decode would write the same tokens, so it is skipped. Otherwise the whole batch is decoded
    again under the constraint, as :func:`greedy_from_states` does, so that every answer is bit for
    bit the one a separate call gives (a smaller batch could round differently).
    Call under ``torch.inference_mode()``.
    """
    free = _greedy_decoding(model, tokenizer, ranges, max_new_tokens=None, generate_feedback=False, constrained=False)
    bound = _greedy_decoding(model, tokenizer, ranges, max_new_tokens=None, generate_feedback=False, constrained=True)
    rows = [s.ids for s in states]
    with eval_mode(model):
        new = _greedy_tokens(model, rows, free, cache=left_padded_cache(model, states))
        answers = _greedy_answers(tokenizer, new, free)
        if all(bound.constraint.walk(row) == ACCEPT for row in new.tolist()):
            return answers, [dict(answer) for answer in answers]
        return answers, _greedy_batch(model, tokenizer, rows, bound, cache=left_padded_cache(model, states))


def greedy_with_prompt_states(model, tokenizer, prompts: list[str], ranges: Sequence[tuple[int, int]], *,
                              batch_size: int = 8, max_new_tokens: int | None = None,
                              generate_feedback: bool = False,
                              constrained: bool = False) -> Iterator[tuple[dict, PromptState]]:
    """:func:`greedy_predict`'s answers, in order, each with its prompt's :class:`PromptState`, so
    that the weighted scorer continues from the prompt's forward instead of running it again.

    Per batch, each prompt runs alone (unpadded: the state is exactly what
    :func:`weighted_predict` would compute itself); the batch then decodes together
    (:func:`greedy_from_states`). The batch's states live until its answers are consumed.
    The prompts' caches must be exactly cuttable back, as the weighted scorer needs (full
    attention, or a sliding window longer than the prompt): else ``ValueError``.
    """
    for start in range(0, len(prompts), batch_size):
        with eval_mode(model), torch.inference_mode():
            states = [prefill(model, tokenizer, prompt) for prompt in prompts[start:start + batch_size]]
            for state in states:
                _check_tree_cache(state.cache, len(state.ids))
            answers = greedy_from_states(model, tokenizer, states, ranges, max_new_tokens=max_new_tokens,
                                         generate_feedback=generate_feedback, constrained=constrained)
        yield from zip(answers, states)


def ended_rows(new_tokens: torch.Tensor, stop: Sequence[int]) -> list[bool]:
    """Per row of generated tokens, whether it holds a stop token (else ``generate`` ran it to the
    budget; rows that stopped early are padded after their stop token)."""
    return torch.isin(new_tokens, torch.tensor(list(stop), device=new_tokens.device)).any(dim=1).tolist()


# --------------------------------------------------------------------------- weighted

def _forward(model, ids: torch.Tensor, cache=None, attention_mask: torch.Tensor | None = None,
             last_only: bool = False, position_ids: torch.Tensor | None = None):
    kwargs = {"logits_to_keep": 1} if last_only else {}
    return model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                 use_cache=True, **kwargs)


def number_continuation_mask(tokenizer, size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool ``[size]``: token i, placed right after a number, would extend it (its text starts with
    an ASCII digit). ``size`` is the model's vocabulary, which may be padded past the tokenizer's:
    the padding ids are False."""
    table = _vocab_info(tokenizer).digit_start
    mask = torch.zeros(size, dtype=torch.bool)
    n = min(size, table.numel())
    mask[:n] = table[:n]
    return mask.to(device)


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


def _check_tree_cache(cache, length: int) -> None:
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
    _check_tree_cache(prompt_cache, past + n)
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
        logits = _forward(model, torch.tensor([tokens], device=device), prompt_cache, attention_mask=mask,
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
    (from :func:`greedy_with_prompt_states`: the cache greedy decoding started from, which comes back
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
        _, prompt_cache, prompt_logits = prefill(model, tokenizer, prompt) if isinstance(prompt, str) else prompt
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
