"""Greedy and probability-weighted scoring of essays, and their evaluation (SPEC §6).

Greedy prediction generates the score line and parses it. The weighted prediction is the
expected score under the model's distribution over each rubric's valid values, computed
exactly by teacher-forcing every candidate number, whatever the tokenizer does with digits.
"""
from __future__ import annotations

import copy
import logging
import re
import weakref
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessorList

from modules.constrained import ScoreLineConstraint, ScoreLineLogitsProcessor, max_line_tokens, score_line_constraint
from modules.data import DatasetInfo, EssayRecord, build_prompt
from modules.score_lines import line_sample, score_line
from modules.voting import qwk

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

def _input_device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


class _EvalMode:
    """model.eval() for the block, restoring training mode after (the trainer scores mid-run)."""

    def __init__(self, model) -> None:
        self.model, self.was_training = model, model.training

    def __enter__(self):
        self.model.eval()
        return self.model

    def __exit__(self, *exc) -> None:
        self.model.train(self.was_training)


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
    """
    if max_new_tokens is None:
        max_new_tokens = score_line_budget(tokenizer, ranges, constrained) + (128 if generate_feedback else 0)
    constraint = line_constraint(tokenizer, ranges, model) if constrained else None
    stop = eos_token_ids(tokenizer, model) if generate_feedback else stop_token_ids(tokenizer, model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    device = _input_device(model)
    answers: list[dict] = []
    saved_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        with _EvalMode(model), torch.inference_mode():
            for start in tqdm(range(0, len(prompts), batch_size), desc="greedy", unit="batch", disable=None):
                batch = tokenizer(prompts[start:start + batch_size], add_special_tokens=False, padding=True,
                                  return_tensors="pt").to(device)
                # A processor per batch: it tracks the rows' states from this batch's prompt width on.
                processors = LogitsProcessorList(
                    [ScoreLineLogitsProcessor(constraint, batch["input_ids"].shape[1])] if constraint else [])
                out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                     do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stop,
                                     pad_token_id=pad_id, temperature=None, top_p=None, top_k=None,
                                     logits_processor=processors)
                new = out[:, batch["input_ids"].shape[1]:]
                texts = tokenizer.batch_decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)
                for row, text in zip(ended_rows(new, stop), texts):
                    answer = line_sample(text, ranges, truncated=not (row or "\n" in text))
                    if generate_feedback:
                        answer["text"] = text
                    answers.append(answer)
    finally:
        tokenizer.padding_side = saved_side
    return answers


def ended_rows(new_tokens: torch.Tensor, stop: Sequence[int]) -> list[bool]:
    """Per row of generated tokens, whether it holds a stop token (else ``generate`` ran it to the
    budget; rows that stopped early are padded after their stop token)."""
    return torch.isin(new_tokens, torch.tensor(list(stop), device=new_tokens.device)).any(dim=1).tolist()


# --------------------------------------------------------------------------- weighted

def _forward(model, ids: torch.Tensor, cache=None, attention_mask: torch.Tensor | None = None,
             last_only: bool = False):
    kwargs = {"logits_to_keep": 1} if last_only else {}
    return model(input_ids=ids, attention_mask=attention_mask, cache=cache, use_cache=True, **kwargs)


def _candidate_log_scores(model, tokenizer, prompt_cache, prompt_logits: torch.Tensor, line_so_far: str,
                          lo: int, hi: int) -> torch.Tensor:
    """Unnormalised log p(candidate tokens) + log p(number ends) for v = lo..hi (float32)."""
    vocab = _vocab_info(tokenizer)
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
        out = _forward(model, torch.tensor([cands[0][:common]], device=device), cache, last_only=True)
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
    logits = _forward(model, ids, batch_cache, attention_mask=mask).logits.float()
    # Position j of row i predicts suffix token j + 1; the prefix's last logits predict token 0.
    logprobs = torch.log_softmax(torch.cat([first_logits.expand(n, 1, -1), logits], dim=1), dim=-1)
    digit = torch.zeros(logprobs.shape[-1], dtype=torch.bool, device=device)
    size = min(vocab.size, digit.numel())
    digit[:size] = vocab.digit_start[:size].to(device)
    scores = torch.empty(n, dtype=torch.float32, device=device)
    for row, suffix in enumerate(suffixes):
        steps = len(suffix)
        token_lp = logprobs[row, torch.arange(steps, device=device), ids[row, :steps]].sum()
        end_lp = torch.logsumexp(logprobs[row, steps][~digit], dim=-1)  # log(1 - P(next token extends it))
        scores[row] = token_lp + end_lp
    return scores


def weighted_predict(model, tokenizer, prompt: str, ranges: Sequence[tuple[int, int]],
                     prefix_scores: Sequence[int] | None = None) -> tuple[list[float], list[list[float]]]:
    """Expected score per rubric under the model, and the probabilities over lo..hi.

    For rubric k, with ``line = "s_0 s_1 ... s_{k-1} "`` ("" for k = 0; ``s_j`` = ``prefix_scores[j]``,
    or rubric j's own argmax below when None), every candidate v in lo..hi is teacher-forced::

        score(v) = log P(tokens(line + str(v)) | prompt)             # all of its tokens
                 + log(1 - P(next token starts with an ASCII digit))  # the number ENDS after v
        p_v = exp(score(v) - logsumexp_u score(u)),   E_k = sum_v p_v * v

    The end term is what makes multi-token numbers exact: without it "1" would also collect
    the mass of "12", "13", ... With a tokenizer that has a "12" token, P("1") alone likewise
    includes continuations like "1" + "2". ``line + str(v)`` is tokenised as one text, as in
    training; the prompt is run once, the candidates' shared token prefix once per rubric, and
    all candidates' remaining tokens in one batched forward over a repeated KV cache. When the
    scores underflow (no finite mass), the rubric falls back to the uniform distribution.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not prompt_ids:
        raise ValueError("weighted_predict needs a non-empty prompt")
    if prefix_scores is not None and len(prefix_scores) < len(ranges) - 1:
        raise ValueError(f"prefix_scores needs {len(ranges) - 1} values, got {len(prefix_scores)}")
    expected: list[float] = []
    probabilities: list[list[float]] = []
    chosen: list[int] = []
    with _EvalMode(model), torch.inference_mode():
        out = _forward(model, torch.tensor([prompt_ids], device=_input_device(model)), last_only=True)
        prompt_cache, prompt_logits = out.cache, out.logits[0, -1].float()
        for k, (lo, hi) in enumerate(ranges):
            line = score_line(chosen) + " " if chosen else ""
            scores = _candidate_log_scores(model, tokenizer, prompt_cache, prompt_logits, line, lo, hi)
            total = torch.logsumexp(scores, dim=0)
            if torch.isfinite(total):
                p = torch.exp(scores - total)
            else:
                logger.warning("rubric %d: candidate probabilities underflow; using a uniform distribution", k)
                p = torch.full_like(scores, 1.0 / scores.numel())
            values = torch.arange(lo, hi + 1, dtype=torch.float32, device=p.device)
            expected.append(float((p * values).sum()))
            probabilities.append(p.cpu().tolist())
            chosen.append(int(prefix_scores[k]) if prefix_scores is not None and k < len(prefix_scores)
                          else lo + int(torch.argmax(p)))
    return expected, probabilities


# --------------------------------------------------------------------------- splits and evaluation

def _round_half_up(x: float, lo: int, hi: int) -> int:
    return int(min(max(np.floor(x + 0.5), lo), hi))


def predict_split(model, tokenizer, records: Sequence[EssayRecord], info: DatasetInfo, *, mtl: bool,
                  prompt_format: str = "chat", max_prompt_tokens: int | None = None, batch_size: int = 8,
                  weighted: bool = True, generate_feedback: bool = False, constrained: bool = False) -> list[dict]:
    """Greedy (and weighted) predictions for every record, one dict each.

    Prompts are built as in training (``max_prompt_tokens``: the run's essay shortening). An
    invalid or truncated generated line scores each rubric's midpoint and is marked ``valid: False``.
    The weighted prediction conditions later rubrics on the greedy scores when they are valid
    (what the model actually wrote), else on its own per-rubric argmax. Without ``weighted`` the
    weighted keys hold None. ``constrained``: greedy decoding restricted to valid score lines
    (``--constrained``); the weighted prediction is unchanged (it already only weighs valid values).
    """
    ranges = info.ranges
    prompts = [build_prompt(r, info, tokenizer, mtl, prompt_format, max_prompt_tokens) for r in records]
    answers = greedy_predict(model, tokenizer, prompts, ranges, batch_size=batch_size,
                             generate_feedback=generate_feedback, constrained=constrained)
    fallback = [r.midpoint for r in info.rubrics]
    predictions = []
    for record, prompt, answer in tqdm(list(zip(records, prompts, answers)), desc="weighted", unit="essay",
                                       disable=None if weighted else True):
        parsed = answer["scores"]
        pred = {"id": record.id, "gold": list(record.scores), "greedy": parsed or list(fallback),
                "weighted": None, "weighted_expected": None, "probabilities": None,
                "text": answer["text"], "valid": parsed is not None, "truncated": answer.get("truncated", False)}
        if weighted:
            expected, probs = weighted_predict(model, tokenizer, prompt, ranges, prefix_scores=parsed)
            pred["weighted"] = [_round_half_up(e, lo, hi) for e, (lo, hi) in zip(expected, ranges)]
            pred["weighted_expected"] = expected
            pred["probabilities"] = dict(zip(info.rubric_names, probs))
        predictions.append(pred)
    invalid = sum(not p["valid"] for p in predictions)
    if invalid:
        logger.warning("%d of %d generated score lines were invalid; scored with the rubric midpoints",
                       invalid, len(predictions))
    return predictions


def _score_block(predictions: list[dict], info: DatasetInfo, key: str) -> dict:
    gold = np.array([p["gold"] for p in predictions], dtype=int).reshape(len(predictions), -1)
    pred = np.array([p[key] for p in predictions], dtype=int).reshape(len(predictions), -1)
    block = {r.name: qwk(gold[:, k], pred[:, k], r.min, r.max) for k, r in enumerate(info.rubrics)}
    lo, hi = min(r.min for r in info.rubrics), max(r.max for r in info.rubrics)
    per_rubric = list(block.values())
    block["overall"] = qwk(gold.ravel(), pred.ravel(), lo, hi)
    block["average"] = float(np.mean(per_rubric))
    return block


def evaluate_predictions(predictions: list[dict], info: DatasetInfo) -> dict:
    """QWK per rubric, pooled over all essay-rubric pairs (``overall``) and averaged, for the
    greedy (``token``) and weighted predictions; ``weighted`` is left out when not computed."""
    if not predictions:
        raise ValueError("no predictions to evaluate")
    results = {"token": _score_block(predictions, info, "greedy")}
    results["token"]["invalid"] = sum(not p["valid"] for p in predictions)
    results["token"]["truncated"] = sum(bool(p.get("truncated")) for p in predictions)
    if all(p.get("weighted") is not None for p in predictions):
        results["weighted"] = _score_block(predictions, info, "weighted")
    return results


def format_results_table(results: dict, info: DatasetInfo, constrained: bool = False) -> str:
    """Plain-text QWK table: rubrics, overall and average down, token and weighted across, then
    the invalid and truncated counts and the decoding mode that produced the greedy answers."""
    rows = info.rubric_names + ["overall", "average"]
    counts = [key for key in ("invalid", "truncated") if key in results.get("token", {})]
    width = max(len(r) for r in rows + counts)

    def cell(block: str, row: str) -> str:
        value = results.get(block, {}).get(row)
        return f"{value:>9.4f}" if isinstance(value, float) else f"{'-':>9}"

    lines = [f"{'rubric':<{width}}  {'token':>9}  {'weighted':>9}"]
    lines += [f"{row:<{width}}  {cell('token', row)}  {cell('weighted', row)}" for row in rows]
    lines += [f"{key:<{width}}  {results['token'][key]:>9d}" for key in counts]
    lines.append(f"decoding: {decoding_mode(constrained)}")
    return "\n".join(lines)


def decoding_mode(constrained: bool) -> str:
    """How a results table names its decoding: ``constrained`` (``--constrained``) or ``unconstrained``."""
    return "constrained" if constrained else "unconstrained"
