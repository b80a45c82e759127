"""Samplers for self-consistency (SPEC §2, §6, §9).

A sampler draws ``max_m`` answers for each of a batch of essay prompts and returns, per prompt,
``[{"text": str, "scores": [int] * K or None}]`` (the first line of the answer, and its scores under
the strict parser of :mod:`modules.score_lines`); a sample cut by ``max_new_tokens`` before its
line ended also carries ``"truncated": True`` and has no scores. Samplers are registered by name in
:data:`SAMPLERS` (the ``--sampler`` choices); every sampler must be seeded and reproducible
from each prompt's generator seed alone, so that a resumed run redraws nothing differently.

``generate`` is the original tool's sampler. ``trie`` (the default) draws from the same
distribution with far less compute: see :func:`trie_sample`. What they draw is stored in the
sample bank, whose file format is :mod:`modules.bank`; :func:`draw_bank_lines` draws a test
file's essays batch by batch into bank lines. :class:`SamplerSettings` holds the sampling settings
and their defaults (``self_consistency.py run``'s flags default to them).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from modules.bank import Sample, bank_line
from modules.constrained import START, ScoreLineLogitsProcessor
from modules.data import EssayRecord
from modules.score_lines import line_sample
from modules.scoring import (PromptState, ended_rows, eval_mode, input_device, left_padded_cache, line_constraint,
                             score_line_budget, stop_token_ids)
from modules.tree_attention import require_tree_attention, tree_attention_mask

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplerSettings:
    """How self-consistency samples are drawn, with the defaults of ``self_consistency.py run``
    (its flags of the same names default to these fields)."""
    sampler: str = "trie"  # a key of SAMPLERS
    max_m: int = 50  # samples per essay
    chunk_m: int = 10  # samples per generate call (generate sampler only)
    temperature: float = 0.7
    top_k: int = 9
    top_p: float | None = None  # None: the model's generation config
    max_new_tokens: int | None = None  # None: what a valid score line can take (token_budget)
    constrained: bool = False  # only tokens that keep each sample a prefix of a valid score line
    essay_batch: int = 8  # essays sampled together (trie sampler; generate goes essay by essay)

    def token_budget(self, tokenizer, ranges: Sequence[tuple[int, int]]) -> int:
        """Tokens per sample: ``max_new_tokens``, else what a valid score line can take for this
        tokenizer and these rubrics (:func:`~modules.scoring.score_line_budget`)."""
        return self.max_new_tokens or score_line_budget(tokenizer, ranges, self.constrained)


def generate_sample(model, tokenizer, prompts: Sequence[str], ranges: Sequence[tuple[int, int]], *,
                    generator_seeds: Sequence[int], max_m: int, chunk_m: int, temperature: float, top_k: int,
                    top_p: float | None = None, max_new_tokens: int,
                    constrained: bool = False) -> list[list[Sample]]:
    """The original tool's sampler: per prompt, HF ``generate`` with ``num_return_sequences=chunk_m``,
    repeated until ``max_m``; prompt e is seeded with ``torch.manual_seed(generator_seeds[e])``.

    Every ``generate`` call recomputes the prompt's prefill, exactly as the original did (the
    trie sampler exists to avoid that). Dropout is off while sampling. Generation stops at the end of the score line (any token that
    carries a newline) or at EOS; the text is cut at the first newline, so what is stored is
    the score line the sample was parsed from. ``top_p=None`` is not passed to ``generate``
    at all, so the model's own generation config applies, as it did in the original (passing
    ``None`` would switch a configured nucleus filter off). ``constrained``: a
    :class:`~modules.constrained.ScoreLineLogitsProcessor` restricts every step to tokens that keep
    the answer a prefix of a valid score line; ``generate`` runs it before its warpers, so the
    distribution is the model's restricted and renormalised, then warped.
    """
    if len(generator_seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(generator_seeds)} generator seeds")
    return [_generate_one(model, tokenizer, prompt, ranges, generator_seed=seed, max_m=max_m, chunk_m=chunk_m,
                          temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens,
                          constrained=constrained)
            for prompt, seed in zip(prompts, generator_seeds)]


def _generate_one(model, tokenizer, prompt: str, ranges: Sequence[tuple[int, int]], *, generator_seed: int,
                  max_m: int, chunk_m: int, temperature: float, top_k: int, top_p: float | None,
                  max_new_tokens: int, constrained: bool) -> list[Sample]:
    if max_m < 1 or chunk_m < 1:
        raise ValueError(f"max_m and chunk_m must be >= 1, got {max_m} and {chunk_m}")
    stop = stop_token_ids(tokenizer, model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    device = input_device(model)
    enc = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(device)
    extra = {} if top_p is None else {"top_p": top_p}
    constraint = line_constraint(tokenizer, ranges, model) if constrained else None
    training = getattr(model, "training", False)
    if training:
        model.eval()
    torch.manual_seed(generator_seed)
    samples: list[Sample] = []
    try:
        with torch.inference_mode():
            while len(samples) < max_m:
                n = min(chunk_m, max_m - len(samples))
                # A fresh processor per call: it tracks each row's state from the prompt's end on.
                processors = LogitsProcessorList(
                    [ScoreLineLogitsProcessor(constraint, enc["input_ids"].shape[1])] if constraint else [])
                out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                     do_sample=True, num_return_sequences=n, temperature=temperature, top_k=top_k,
                                     max_new_tokens=max_new_tokens, eos_token_id=stop, pad_token_id=pad_id,
                                     logits_processor=processors, **extra)
                new = out[:, enc["input_ids"].shape[1]:]
                texts = tokenizer.batch_decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)
                samples += [line_sample(text, ranges, truncated=not ended)
                            for text, ended in zip(texts, ended_rows(new, stop))]
    finally:
        if training:
            model.train(True)
    return samples


# --------------------------------------------------------------------------- the trie sampler

# generate() settings that change the sampling distribution beyond temperature, top-k and top-p,
# with the value that leaves it unchanged. The trie sampler refuses a model whose generation
# config sets any of them, rather than silently drawing from a different distribution.
_NEUTRAL_GENERATION_SETTINGS = {
    "repetition_penalty": (None, 1.0), "encoder_repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0),
    "min_length": (None, 0), "min_new_tokens": (None, 0), "bad_words_ids": (None,), "sequence_bias": (None,),
    "suppress_tokens": (None,), "begin_suppress_tokens": (None,), "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,), "exponential_decay_length_penalty": (None,), "guidance_scale": (None, 1.0),
    "min_p": (None,), "typical_p": (None, 1.0), "epsilon_cutoff": (None, 0.0), "eta_cutoff": (None, 0.0),
    "top_h": (None,), "renormalize_logits": (None, False), "watermarking_config": (None,),
}


def sampling_processors(model, temperature: float, top_k: int, top_p: float | None) -> LogitsProcessorList:
    """The logits warpers ``generate(do_sample=True, ...)`` applies, in its order:
    temperature, top-k, top-p (``top_p=None`` = the model's generation config, as in ``generate``).

    Raises ``ValueError`` when the model's generation config sets anything else that changes
    the distribution (a repetition penalty, min-p, ...), which only ``--sampler generate`` honours.
    """
    config = getattr(model, "generation_config", None)
    changed = [f"{name}={getattr(config, name)!r}" for name, neutral in _NEUTRAL_GENERATION_SETTINGS.items()
               if getattr(config, name, None) not in neutral]
    if changed:
        raise ValueError("the model's generation config sets " + ", ".join(changed) +
                         "; the trie sampler implements temperature, top_k and top_p only: use --sampler generate")
    if top_p is None:
        top_p = getattr(config, "top_p", None)
    processors = LogitsProcessorList()
    if temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if top_k:
        processors.append(TopKLogitsWarper(top_k=top_k))
    if top_p is not None and top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p=top_p))
    return processors


def trie_sample(model, tokenizer, prompts: Sequence[str], ranges: Sequence[tuple[int, int]], *,
                generator_seeds: Sequence[int], max_m: int, temperature: float, top_k: int,
                top_p: float | None = None, max_new_tokens: int, chunk_m: int | None = None,
                constrained: bool = False, prompt_states: Sequence[PromptState] | None = None) -> list[list[Sample]]:
    """``max_m`` samples for each prompt, from the distribution of :func:`generate_sample`.

    Exactness: a sample is a chain of draws ``t_i ~ q(. | prompt, t_<i)`` with ``q`` the model's
    next-token distribution after the same warpers (:func:`sampling_processors`), ending at the
    same stop tokens or after ``max_new_tokens``. Drawing ``c`` i.i.d. chains that share a prefix
    is drawing ``c`` i.i.d. next tokens from ``q(. | prefix)`` and splitting the chains by token,
    so the samples form a trie, and each distinct prefix goes through the model once, however
    many samples pass through it. Identical samples leave the trie next to each other, so each
    essay's samples are finally put in a uniformly random order (m i.i.d. draws in random order
    are again i.i.d.).

    Compute: one prefill per prompt; then one forward per depth for all prompts' new trie nodes,
    in one batch row per prompt. The trie lives in that row's KV cache after the prompt, and a
    4D attention mask lets each node see only the prompt and its own ancestors, at the position
    its depth gives, so its logits are those of its path as a plain sequence, while the prompt's
    keys and values are stored once rather than once per sample.

    Essay ``e`` draws only from ``torch.Generator().manual_seed(generator_seeds[e])``, so its
    samples do not depend on which other essays share its batch (up to float rounding of
    batched matmuls, which can only matter for a draw within ~1e-7 of a bucket edge).
    ``chunk_m`` is accepted for the samplers' common signature and has no effect: all ``max_m``
    samples of an essay share one trie.

    ``constrained``: each trie node carries its state in the score-line automaton, and its logits
    are masked to the tokens that state allows before the warpers (restrict, renormalise, warp), as
    :func:`generate_sample`'s logits processor does; a child's state follows from its token.

    ``prompt_states``: the prompts already run through the model, one :class:`PromptState` each
    (:func:`~modules.scoring.prefill`); the trie then grows from a left-padded copy of their caches
    and their last logits instead of a prefill of its own, so one prefill per essay serves greedy,
    weighted, constrained and sampled scoring. The states are left as they were.
    """
    if max_m < 1 or max_new_tokens < 1:
        raise ValueError(f"max_m and max_new_tokens must be >= 1, got {max_m} and {max_new_tokens}")
    if len(generator_seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(generator_seeds)} generator seeds")
    if not prompts:
        return []
    require_tree_attention(model, "the trie sampler", "use --sampler generate")
    processors = sampling_processors(model, temperature, top_k, top_p)
    constraint = line_constraint(tokenizer, ranges, model) if constrained else None
    stop = set(stop_token_ids(tokenizer, model))
    device = input_device(model)
    dtype = model.get_input_embeddings().weight.dtype
    if prompt_states is not None and len(prompt_states) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(prompt_states)} prompt states")
    prompt_ids = ([list(s.ids) for s in prompt_states] if prompt_states is not None else
                  [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts])
    if not all(prompt_ids):
        raise ValueError("trie_sample needs non-empty prompts")
    generators = [torch.Generator().manual_seed(int(seed)) for seed in generator_seeds]
    lengths = [len(ids) for ids in prompt_ids]
    width = max(lengths)
    # Left padding, with positions counted from each prompt's first real token, gives every
    # row the logits it would have alone.
    input_ids = torch.zeros((len(prompts), width), dtype=torch.long, device=device)
    seen = torch.zeros((len(prompts), width), dtype=torch.bool, device=device)
    for row, ids in enumerate(prompt_ids):
        input_ids[row, width - len(ids):] = torch.tensor(ids, device=device)
        seen[row, width - len(ids):] = True
    positions = (seen.long().cumsum(-1) - 1).clamp(min=0)

    # Live trie nodes: (essay, samples passing through, path, automaton state or None when
    # unconstrained); seen[n] = the cache slots node n attends to (its prompt and its ancestors);
    # rows[b] = the essay of cache batch row b.
    root = START if constraint else None
    live: list[tuple[int, int, tuple[int, ...], int | None]] = [(e, max_m, (), root) for e in range(len(prompts))]
    rows = list(range(len(prompts)))
    ended: list[list[tuple[tuple[int, ...], int]]] = [[] for _ in prompts]  # (path, count) per essay
    with eval_mode(model), torch.inference_mode():
        if prompt_states is None:
            out = model(input_ids=input_ids, attention_mask=seen.long(), position_ids=positions, use_cache=True,
                        logits_to_keep=1)
            cache, logits = out.cache, out.logits[:, -1]
        else:
            cache = left_padded_cache(model, prompt_states, last_token=True)
            logits = torch.stack([state.logits for state in prompt_states]).to(device)
        for depth in range(max_new_tokens):
            logits = logits.float()
            if constraint:
                logits = constraint.mask_logits(logits, [state for *_, state in live])
            probs = torch.softmax(processors(input_ids[:, :0], logits), dim=-1).cpu()
            grown, parents = [], []
            for node, (essay, count, path, state) in enumerate(live):
                draws = torch.multinomial(probs[node], count, replacement=True, generator=generators[essay])
                tokens, counts = torch.unique(draws, return_counts=True)
                for token, n in zip(tokens.tolist(), counts.tolist()):
                    if token in stop or depth + 1 == max_new_tokens:
                        ended[essay].append((path + (token,), n))
                    else:
                        child = constraint.advance(state, token) if constraint else None
                        grown.append((essay, n, path + (token,), child))
                        parents.append(node)
            if not grown:
                break
            active = sorted({essay for essay, *_ in grown})
            if active != rows:  # essays whose samples all ended leave the batch
                cache.batch_select_indices(torch.tensor([rows.index(e) for e in active], device=device))
                rows = active
            # Node i of essay row b takes query slot j (cache slot base + j); rows with fewer new
            # nodes get padding queries that see only themselves (a fully masked row would be NaN).
            slot = {e: 0 for e in rows}
            where = []
            for essay, *_ in grown:
                where.append((rows.index(essay), slot[essay]))
                slot[essay] += 1
            queries = max(slot.values())
            base = seen.shape[1]
            b_idx = torch.tensor([b for b, _ in where], device=device)
            j_idx = torch.tensor([j for _, j in where], device=device)
            seen = torch.cat([seen[torch.tensor(parents, device=device)],
                              seen.new_zeros((len(grown), queries))], dim=1)
            seen[torch.arange(len(grown), device=device), base + j_idx] = True
            visible = torch.zeros((len(rows), queries, base + queries), dtype=torch.bool, device=device)
            visible[:, torch.arange(queries), base + torch.arange(queries)] = True
            visible[b_idx, j_idx] = seen
            step_ids = torch.zeros((len(rows), queries), dtype=torch.long, device=device)
            step_ids[b_idx, j_idx] = torch.tensor([path[-1] for _, _, path, _ in grown], device=device)
            step_positions = torch.zeros_like(step_ids)
            step_positions[b_idx, j_idx] = torch.tensor([lengths[e] + depth for e, *_ in grown], device=device)
            out = model(input_ids=step_ids, attention_mask=tree_attention_mask(visible, dtype),
                        position_ids=step_positions, cache=cache, use_cache=True)
            cache, logits, live = out.cache, out.logits[b_idx, j_idx], grown

    results = []
    for essay, paths in enumerate(ended):
        texts = tokenizer.batch_decode([list(path) for path, _ in paths], skip_special_tokens=True,
                                       clean_up_tokenization_spaces=False)
        samples = []
        for text, (path, n) in zip(texts, paths):
            # Parsed once per distinct path, copied per draw; a path whose last token is no stop
            # token was cut by the budget.
            sample = line_sample(text, ranges, truncated=path[-1] not in stop)
            samples += [dict(sample) for _ in range(n)]
        order = torch.randperm(len(samples), generator=generators[essay]).tolist()
        results.append([samples[i] for i in order])
    return results


SamplerFn = Callable[..., list[list[Sample]]]
# Name -> sampler with generate_sample's signature (a batch of prompts, one seed each); the
# CLI's --sampler choices. The default is SamplerSettings.sampler.
SAMPLERS: dict[str, SamplerFn] = {"trie": trie_sample, "generate": generate_sample}


def draw_bank_lines(model, tokenizer, essays: Sequence[tuple[int, EssayRecord]],
                    prompt_of: Callable[[EssayRecord], str], ranges: Sequence[tuple[int, int]],
                    settings: SamplerSettings, *, seed: int) -> Iterator[list[dict]]:
    """The bank lines (:func:`~modules.bank.bank_line`) of ``essays``, pairs of (index in the test
    file, record), one list per batch of essays as each batch ends: ``settings.max_m`` samples of
    each essay's prompt (``prompt_of``) from ``settings.sampler``. The trie sampler draws
    ``settings.essay_batch`` essays together; the generate sampler runs essay by essay as the
    original did.

    Essay i is seeded with ``seed + i`` (its position in the test file), so a resumed, sharded or
    shortened run draws exactly the samples a full uninterrupted run would."""
    sampler = SAMPLERS[settings.sampler]
    batch_size = settings.essay_batch if settings.sampler == "trie" else 1
    sample_args = dict(max_m=settings.max_m, chunk_m=settings.chunk_m, temperature=settings.temperature,
                       top_k=settings.top_k, top_p=settings.top_p,
                       max_new_tokens=settings.token_budget(tokenizer, ranges), constrained=settings.constrained)
    for start in range(0, len(essays), batch_size):
        batch = essays[start:start + batch_size]
        prompts = [prompt_of(record) for _, record in batch]
        drawn = sampler(model, tokenizer, prompts, ranges, generator_seeds=[seed + index for index, _ in batch],
                        **sample_args)
        yield [bank_line(record.id, record.scores, samples) for (_, record), samples in zip(batch, drawn)]
