"""Every prediction row of a split, with one prefill per prompt (SPEC §6).

One decoder serves the product and the benchmark: ``main_pipeline.py`` scores its validation and
test splits and ``--score_path`` new essays with :func:`predict_split`, and the real-essay
benchmark draws every row it reports (greedy and weighted, constrained greedy, self-consistency
samples) with :func:`predict_batch`. Each prompt is rendered as in training (:class:`PromptSettings`,
read from the run's manifest) and runs through the model once; greedy decoding, the weighted
scorer and the trie sampler all continue from that forward.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from modules.data import DatasetInfo, EssayRecord
from modules.runs import PromptSettings
from modules.sampling import SamplerSettings, trie_sample
from modules.scoring import (PromptState, eval_mode, greedy_from_states, greedy_pair_from_states, greedy_predict,
                             prefill, score_line_budget)
from modules.weighted import check_tree_cache, weighted_predict

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class SampleDraws:
    """Self-consistency samples drawn beside the greedy rows, as ``self_consistency.py run`` draws
    them with the trie sampler: ``m`` per essay, essay i of the split from generator seed
    ``seed + i``, with ``sampler``'s temperature, top_k and top_p."""

    m: int
    seed: int
    sampler: SamplerSettings = SamplerSettings()


def greedy_row(record: EssayRecord, answer: dict, fallback: Sequence[int]) -> dict:
    """One essay's greedy prediction from its answer (:func:`~modules.scoring.greedy_predict`'s
    dicts): the parsed scores, or ``fallback`` (the rubric midpoints) for an invalid or truncated
    line, marked ``valid: False``."""
    parsed = answer["scores"]
    return {"id": record.id, "gold": None if record.scores is None else list(record.scores),
            "greedy": parsed or list(fallback), "text": answer["text"], "valid": parsed is not None,
            "truncated": answer.get("truncated", False)}


def _round_half_up(x: float, lo: int, hi: int) -> int:
    return int(min(max(np.floor(x + 0.5), lo), hi))


def head_keys(head, pooled: torch.Tensor) -> dict:
    """A row's ``head_expected`` (the score head's output clipped to each rubric's range) and
    ``head`` (it rounded half up) from the prompt's pooled states."""
    expected, rounded = head.expected_and_rounded(pooled[None].to(head.feature_mean.device))
    return {"head": rounded[0], "head_expected": expected[0]}


def prediction_row(model, tokenizer, record: EssayRecord, answer: dict, state, info: DatasetInfo,
                   head=None) -> dict:
    """One essay's prediction dict (:func:`predict_split`'s rows): its greedy row from ``answer``
    and, when ``state`` (its prompt's :class:`~modules.scoring.PromptState`) is given, the weighted
    prediction continuing from that state, conditioned on the greedy scores when they are valid;
    with ``head`` (:class:`~modules.score_head.ScoreHead`), its scores from the state's pooled states."""
    pred = {**greedy_row(record, answer, [r.midpoint for r in info.rubrics]), "weighted": None,
            "weighted_expected": None, "probabilities": None, "weighted_underflow": None,
            **(head_keys(head, state.pooled) if head is not None and state is not None else {})}
    if state is not None:
        ranges = info.ranges
        expected, probs, underflow = weighted_predict(model, tokenizer, state, ranges, prefix_scores=answer["scores"])
        pred["weighted"] = [_round_half_up(e, lo, hi) for e, (lo, hi) in zip(expected, ranges)]
        pred["weighted_expected"] = expected
        pred["probabilities"] = dict(zip(info.rubric_names, probs))
        pred["weighted_underflow"] = [info.rubric_names[k] for k in underflow]
    return pred


def decode_batch(model, tokenizer, prompts: Sequence[str], ranges: Sequence[tuple[int, int]], *,
                 constrained: bool = False, generate_feedback: bool = False,
                 both_decodings: bool = False,
                 pool_layer: int | None = None) -> tuple[list[PromptState], list[dict], list[dict] | None]:
    """Each prompt run through the model alone, once (unpadded: the state is exactly what the
    weighted scorer would compute itself), then the batch's greedy answers decoded together from
    those states. ``both_decodings``: the unconstrained and the ``--constrained`` answers
    (:func:`~modules.scoring.greedy_pair_from_states`), else the ones ``constrained`` asks for and
    None. ``pool_layer``: the states keep that layer's pooled prompt states (the score head's
    input). Returns (states, answers, constrained answers or None). The prompts' caches must be
    exactly cuttable back, as the weighted scorer needs (full attention, or a sliding window
    longer than the prompt): else ``ValueError``. Call under ``torch.inference_mode()``."""
    states = [prefill(model, tokenizer, prompt, pool_layer=pool_layer) for prompt in prompts]
    for state in states:
        check_tree_cache(state.cache, len(state.ids))
    if both_decodings:
        answers, bound = greedy_pair_from_states(model, tokenizer, states, ranges)
        return states, answers, bound
    return states, greedy_from_states(model, tokenizer, states, ranges, generate_feedback=generate_feedback,
                                      constrained=constrained), None


class BatchRows(NamedTuple):
    """:func:`predict_batch`'s rows: the prediction dicts; the constrained greedy rows (with
    ``both_decodings``); the samples per essay, unconstrained (key False) and constrained (key
    True), with ``draws``."""
    predictions: list[dict]
    constrained: list[dict] | None
    samples: dict[bool, list[list[dict]]] | None


def predict_batch(model, tokenizer, records: Sequence[EssayRecord], info: DatasetInfo, settings: PromptSettings, *,
                  constrained: bool = False, generate_feedback: bool = False, both_decodings: bool = False,
                  draws: SampleDraws | None = None, first_index: int = 0, head=None) -> BatchRows:
    """Every row of one batch of essays (``first_index``, ``first_index + 1``, ... of their split)
    from one prefill of each prompt: greedy and weighted predictions (and the score head's, with
    ``head``), and on request the
    constrained greedy rows and ``draws.m`` self-consistency samples per essay, unconstrained and
    constrained (:func:`~modules.sampling.trie_sample`, from the same prompt states)."""
    prompts = [settings.prompt(r, info, tokenizer) for r in records]
    with eval_mode(model), torch.inference_mode():
        states, answers, bound = decode_batch(model, tokenizer, prompts, info.ranges, constrained=constrained,
                                              generate_feedback=generate_feedback, both_decodings=both_decodings,
                                              pool_layer=None if head is None else head.layer)
        predictions = [prediction_row(model, tokenizer, r, answer, state, info, head)
                       for r, answer, state in zip(records, answers, states)]
        samples = None if draws is None else {
            c: trie_sample(model, tokenizer, prompts, info.ranges,
                           generator_seeds=[draws.seed + first_index + i for i in range(len(records))],
                           max_m=draws.m, temperature=draws.sampler.temperature, top_k=draws.sampler.top_k,
                           top_p=draws.sampler.top_p,
                           max_new_tokens=score_line_budget(tokenizer, info.ranges, c), constrained=c,
                           prompt_states=states)
            for c in (False, True)}
    fallback = [r.midpoint for r in info.rubrics]
    constrained_rows = None if bound is None else [greedy_row(r, a, fallback) for r, a in zip(records, bound)]
    return BatchRows(predictions, constrained_rows, samples)


def predict_split(model, tokenizer, records: Sequence[EssayRecord], info: DatasetInfo, settings: PromptSettings, *,
                  batch_size: int = 8, weighted: bool = True, generate_feedback: bool = False,
                  constrained: bool = False, head=None) -> list[dict]:
    """Greedy (and weighted, and the score head's) predictions for every record, one dict each, in batches of
    ``batch_size`` (:func:`predict_batch`).

    An invalid or truncated generated line scores each rubric's midpoint and is marked
    ``valid: False``. The weighted prediction conditions later rubrics on the greedy scores when
    they are valid (what the model actually wrote), else on its own per-rubric argmax.
    ``weighted_underflow`` names the rubrics whose candidate probabilities underflowed and were
    replaced by the uniform distribution (usually none). Without ``weighted`` the weighted keys
    hold None and each batch is one padded ``generate`` (:func:`~modules.scoring.greedy_predict`).
    ``constrained``: greedy decoding restricted to valid score lines (``--constrained``); the
    weighted prediction is unchanged (it already only weighs valid values). ``head``: the run's
    :class:`~modules.score_head.ScoreHead`, whose ``head`` and ``head_expected`` keys join each row.
    """
    if weighted:
        predictions = []
        with tqdm(total=len(records), desc="scoring", unit="essay", disable=None) as bar:
            for start in range(0, len(records), batch_size):
                batch = records[start:start + batch_size]
                predictions += predict_batch(model, tokenizer, batch, info, settings, constrained=constrained,
                                             generate_feedback=generate_feedback, head=head).predictions
                bar.update(len(batch))
    else:
        prompts = [settings.prompt(r, info, tokenizer) for r in records]
        answers = greedy_predict(model, tokenizer, prompts, info.ranges, batch_size=batch_size,
                                 generate_feedback=generate_feedback, constrained=constrained)
        predictions = [prediction_row(model, tokenizer, r, answer, None, info) for r, answer in zip(records, answers)]
        if head is not None:
            from modules.score_head import prompt_features

            pooled = prompt_features(model, tokenizer, prompts, head.layer)
            predictions = [{**row, **head_keys(head, torch.from_numpy(p))} for row, p in zip(predictions, pooled)]
    invalid = sum(not p["valid"] for p in predictions)
    if invalid:
        logger.warning("%d of %d generated score lines were invalid; scored with the rubric midpoints",
                       invalid, len(predictions))
    underflow = underflow_count(predictions)
    if underflow:
        logger.warning("%d essay-rubric weighted predictions underflowed and used a uniform distribution", underflow)
    return predictions


def underflow_count(predictions: list[dict]) -> int:
    """Essay-rubric pairs whose weighted distribution underflowed to uniform."""
    # .get(): rows written before the key existed count as no underflow.
    return sum(len(p.get("weighted_underflow") or ()) for p in predictions)
