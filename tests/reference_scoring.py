"""Split scoring as it was before greedy decoding and the weighted scorer shared the prompt's
forward: the oracle that ``tests/test_scoring.py`` checks ``modules.predict.predict_split``
against, and the "old" side of ``benchmarks/bench_scoring.py``. Kept here once, for both.

Greedy decoding ran first, over padded batches (``modules.scoring.greedy_predict``: one
``generate`` from the prompts on), then ``weighted_predict`` ran each prompt again from its text.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence
from unittest import mock

import modules.predict as predict
from modules.scoring import greedy_predict


def two_pass(model, tokenizer, prompts: Sequence[str], ranges: Sequence[tuple[int, int]], *, constrained: bool = False,
             generate_feedback: bool = False, both_decodings: bool = False,
             pool_layer: int | None = None) -> tuple[list[str], list[dict], None]:
    """``decode_batch`` as it was: the batch's greedy answers from one padded ``generate``, with the
    prompts' texts in place of their states, so that ``weighted_predict`` runs each prompt again."""
    assert not both_decodings, "the two-pass path decoded one way at a time"
    assert pool_layer is None, "the two-pass path had no score head"
    return list(prompts), greedy_predict(model, tokenizer, list(prompts), ranges, batch_size=len(prompts),
                                         constrained=constrained, generate_feedback=generate_feedback), None


@contextmanager
def two_pass_scoring() -> Iterator[None]:
    """Within the block, ``modules.predict.predict_split`` scores as before: each prompt runs
    through the model twice, once in greedy's padded batch and once alone for the weighted scorer."""
    with mock.patch.object(predict, "decode_batch", two_pass):
        yield
