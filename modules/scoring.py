"""Greedy scoring of prompts by the model (SPEC §6), and the prompt states it shares.

Greedy prediction generates the score line and parses it. A prompt run through the model once
(:func:`prefill`) serves greedy decoding, the weighted scorer (:mod:`modules.weighted`) and the
trie sampler (:mod:`modules.sampling`) alike.
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
from transformers.cache_utils import Cache, DynamicCache

from modules.constrained import (ACCEPT, ScoreLineConstraint, ScoreLineLogitsProcessor, max_line_tokens,
                                 score_line_constraint)
from modules.score_lines import line_sample

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


def number_continuation_mask(tokenizer, size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool ``[size]``: token i, placed right after a number, would extend it (its text starts with
    an ASCII digit). ``size`` is the model's vocabulary, which may be padded past the tokenizer's:
    the padding ids are False."""
    table = _vocab_info(tokenizer).digit_start
    mask = torch.zeros(size, dtype=torch.bool)
    n = min(size, table.numel())
    mask[:n] = table[:n]
    return mask.to(device)


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


# --------------------------------------------------------------------------- greedy and prompt states

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
    (``--no_weighted``). With weighted scoring, :func:`modules.predict.decode_batch` gives the
    same answers from each prompt's own forward, which the weighted scorer then continues.
    """
    decoding = _greedy_decoding(model, tokenizer, ranges, max_new_tokens, generate_feedback, constrained)
    answers: list[dict] = []
    with eval_mode(model), torch.inference_mode():
        for start in tqdm(range(0, len(prompts), batch_size), desc="greedy", unit="batch", disable=None):
            batch = prompts[start:start + batch_size]
            rows = [tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt in batch]
            answers += _greedy_batch(model, tokenizer, rows, decoding)
    return answers


def model_forward(model, ids: torch.Tensor, cache=None, attention_mask: torch.Tensor | None = None,
                  last_only: bool = False, position_ids: torch.Tensor | None = None, hidden_states: bool = False):
    """One forward that grows ``cache``; ``last_only`` keeps the last position's logits only;
    ``hidden_states`` returns every layer's states too."""
    kwargs = {"logits_to_keep": 1} if last_only else {}
    if hidden_states:
        kwargs["output_hidden_states"] = True
    return model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                 use_cache=True, **kwargs)


class PromptState(NamedTuple):
    """A prompt run through the model once: its token ids, its KV cache, the float32 logits of
    its last position (the first answer token's distribution) and, when asked for, one layer's
    states pooled as the score head reads them (float32 [D])."""
    ids: list[int]
    cache: Cache
    logits: torch.Tensor
    pooled: torch.Tensor | None = None


def prefill(model, tokenizer, prompt: str, pool_layer: int | None = None) -> PromptState:
    """Run ``prompt`` alone (no padding, no special tokens added) through the model once, keeping
    its cache and the last position's logits only; with ``pool_layer``, also the mean of that
    hidden-state index over the prompt without its first token (:mod:`modules.score_head`). Call
    under ``torch.inference_mode()``."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("scoring needs a non-empty prompt")
    out = model_forward(model, torch.tensor([ids], device=input_device(model)), last_only=True,
                        hidden_states=pool_layer is not None)
    pooled = None
    if pool_layer is not None:
        from modules.score_head import pool_states

        positions = torch.arange(len(ids), device=out.logits.device)[None, :] > 0
        pooled = pool_states(out.hidden_states[pool_layer], positions)[0]
    return PromptState(ids, out.cache, out.logits[0, -1].float(), pooled)


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


def ended_rows(new_tokens: torch.Tensor, stop: Sequence[int]) -> list[bool]:
    """Per row of generated tokens, whether it holds a stop token (else ``generate`` ran it to the
    budget; rows that stopped early are padded after their stop token)."""
    return torch.isin(new_tokens, torch.tensor(list(stop), device=new_tokens.device)).any(dim=1).tolist()
