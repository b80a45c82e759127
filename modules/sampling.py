"""Samplers for self-consistency, and the sample bank they fill (SPEC §2, §6, §9).

A sampler draws ``max_m`` answers for one essay prompt and returns them as
``[{"text": str, "scores": [int] * K or None}]``. Samplers are registered by name in
:data:`SAMPLERS` (the ``--sampler`` choices); every sampler must be seeded and reproducible
from ``generator_seed`` alone, so that a resumed run redraws nothing differently.

The bank (``samples.jsonl``) holds one JSON line per essay,
``{"id", "gold": [int] * K, "samples": [{"text", "scores"}], "invalid": int}``. It is appended
and fsynced essay by essay, so a killed run loses at most the essay in flight; a torn last
line is detected on reading and dropped (and cut off the file when resuming).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import torch

from modules.data import DataError
from modules.scoring import parse_score_line, stop_token_ids

logger = logging.getLogger(__name__)

Sample = dict  # {"text": str, "scores": list[int] | None}


def generate_sampler(model, tokenizer, prompt: str, ranges: Sequence[tuple[int, int]], *, max_m: int,
                     chunk_m: int, temperature: float, top_k: int, top_p: float | None = None,
                     max_new_tokens: int, generator_seed: int) -> list[Sample]:
    """The original tool's sampler: HF ``generate`` with ``num_return_sequences=chunk_m``, repeated.

    Every ``generate`` call recomputes the prompt's prefill, exactly as the original did (the
    fast samplers exist to avoid that). Dropout is off while sampling. Generation stops at the end of the score line (any token that
    carries a newline) or at EOS; the text is cut at the first newline, so what is stored is
    the score line the sample was parsed from. ``top_p=None`` is not passed to ``generate``
    at all, so the model's own generation config applies, as it did in the original (passing
    ``None`` would switch a configured nucleus filter off).
    """
    if max_m < 1 or chunk_m < 1:
        raise ValueError(f"max_m and chunk_m must be >= 1, got {max_m} and {chunk_m}")
    stop = stop_token_ids(tokenizer, model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    device = model.get_input_embeddings().weight.device
    enc = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(device)
    extra = {} if top_p is None else {"top_p": top_p}
    training = getattr(model, "training", False)
    if training:
        model.eval()
    torch.manual_seed(generator_seed)
    samples: list[Sample] = []
    try:
        with torch.inference_mode():
            while len(samples) < max_m:
                n = min(chunk_m, max_m - len(samples))
                out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                     do_sample=True, num_return_sequences=n, temperature=temperature, top_k=top_k,
                                     max_new_tokens=max_new_tokens, eos_token_id=stop, pad_token_id=pad_id, **extra)
                texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True,
                                               clean_up_tokenization_spaces=False)
                for text in texts:
                    line = text.split("\n", 1)[0]
                    samples.append({"text": line, "scores": parse_score_line(line, ranges)})
    finally:
        if training:
            model.train(True)
    return samples


SamplerFn = Callable[..., list[Sample]]
# Name -> sampler with generate_sampler's signature; the CLI's --sampler choices.
SAMPLERS: dict[str, SamplerFn] = {"generate": generate_sampler}


# --------------------------------------------------------------------------- the bank

def bank_line(essay_id: str, gold: Sequence[int], samples: list[Sample]) -> dict:
    return {"id": essay_id, "gold": [int(g) for g in gold], "samples": samples,
            "invalid": sum(s["scores"] is None for s in samples)}


def append_bank_line(handle, row: dict) -> None:
    """Append one essay and force it to disk: after this returns, a kill cannot lose it."""
    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    handle.flush()
    os.fsync(handle.fileno())


def _check_row(path: Path, lineno: int, row, ranges: Sequence[tuple[int, int]]) -> dict:
    def fail(fieldname: str, problem: str) -> DataError:
        return DataError(f"{path}:{lineno}: field '{fieldname}': {problem}")

    if not isinstance(row, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object")
    for key in ("id", "gold", "samples"):
        if key not in row:
            raise fail(key, "missing")
    k = len(ranges)

    def valid_scores(values) -> bool:
        return (isinstance(values, list) and len(values) == k
                and all(isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi
                        for v, (lo, hi) in zip(values, ranges)))

    if not valid_scores(row["gold"]):
        raise fail("gold", f"expected {k} integers inside the rubric ranges, got {row['gold']!r}")
    if not isinstance(row["samples"], list) or not row["samples"]:
        raise fail("samples", "must be a non-empty list")
    for i, sample in enumerate(row["samples"]):
        if not isinstance(sample, dict) or "scores" not in sample:
            raise fail(f"samples[{i}].scores", "missing")
        if sample["scores"] is not None and not valid_scores(sample["scores"]):
            raise fail(f"samples[{i}].scores", f"expected null or {k} in-range integers, got {sample['scores']!r}")
    return row


def read_bank(path: str | Path, ranges: Sequence[tuple[int, int]], *, repair: bool = False) -> list[dict]:
    """The essays of a bank, in file order, validated against the rubric ranges.

    A last line without its newline is what a kill mid-write leaves: it is dropped with a
    warning, and with ``repair`` also cut off the file so appending can continue. Any other bad line is a one-line :class:`DataError`, as are duplicate ids.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    # json.dumps escapes newlines, so a kill mid-write leaves bytes after the last newline.
    end = data.rfind(b"\n") + 1
    torn = data[end:]
    if torn:
        logger.warning("%s: dropping a torn last line (%d bytes) left by an interrupted run", path, len(torn))
        if repair:
            with path.open("r+b") as handle:
                handle.truncate(end)
                os.fsync(handle.fileno())
    try:
        lines = data[:end].decode("utf-8").split("\n")[:-1]
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    rows, seen = [], {}
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
        row = _check_row(path, lineno, obj, ranges)
        row["id"] = str(row["id"])
        if row["id"] in seen:
            raise DataError(f"{path}:{lineno}: field 'id': duplicate id {row['id']!r} (first on line {seen[row['id']]})")
        seen[row["id"]] = lineno
        rows.append(row)
    return rows
