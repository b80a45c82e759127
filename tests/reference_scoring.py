"""Split scoring as it was before greedy decoding and the weighted scorer shared the prompt's
forward: the oracle that ``tests/test_scoring.py`` checks ``modules.evaluation.predict_split``
against, and the "old" side of ``benchmarks/bench_scoring.py``. Kept here once, for both.

Greedy decoding ran first, over padded batches (``modules.scoring.greedy_predict``: one
``generate`` from the prompts on), then ``weighted_predict`` ran each prompt again from its text.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence
from unittest import mock

import modules.evaluation as evaluation
from modules.scoring import greedy_predict


def two_pass(model, tokenizer, prompts: list[str], ranges: Sequence[tuple[int, int]],
             **greedy_kwargs) -> Iterator[tuple[dict, str]]:
    """Every prompt's greedy answer (all of them first, in padded batches), paired with the prompt's
    text instead of its forward, so that ``weighted_predict`` runs the prompt a second time."""
    yield from zip(greedy_predict(model, tokenizer, prompts, ranges, **greedy_kwargs), prompts)


@contextmanager
def two_pass_scoring() -> Iterator[None]:
    """Within the block, ``modules.evaluation.predict_split`` scores as before: each prompt runs
    through the model twice, once in greedy's padded batch and once alone for the weighted scorer."""
    with mock.patch.object(evaluation, "greedy_with_prompt_states", two_pass):
        yield
