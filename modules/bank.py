"""The sample bank file of a self-consistency run: writing, reading, resuming and merging it (SPEC §2, §9).

The bank (``samples.jsonl``) holds one JSON line per essay,
``{"id", "gold": [int] * K, "samples": [{"text", "scores", ["truncated"]}], "invalid": int}``. It is
appended and fsynced essay by essay, so a killed run loses at most the essay in flight; a torn
last line is detected on reading and dropped (and cut off the file when resuming). Under a
launcher each process appends to its own ``samples.rank<r>.jsonl``, merged into ``samples.jsonl``
in test-file order at the end. :func:`bank_samples` reads a finished bank back as the int array
``[N, m, K]`` of :mod:`modules.voting` (``-1`` = invalid sample), checked against its test file.

Imports neither torch nor transformers: ``self_consistency.py analyze`` reads banks without them.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import IO, Sequence

import numpy as np

from modules.data import DatasetInfo, EssayRecord
from modules.jsonio import DataError, input_error, iter_jsonl, read_input_bytes, write_jsonl_atomic
from modules.score_lines import parse_score_line
from modules.voting import INVALID

logger = logging.getLogger(__name__)

BANK = "samples.jsonl"
PARTIAL_BANK = "samples.rank{rank}.jsonl"  # one per process of a multi-process run, merged into BANK

Sample = dict  # {"text": str, "scores": list[int] | None, ["truncated": True]}


def own_bank_name(rank: int, world_size: int) -> str:
    """The bank a process appends to: one process writes samples.jsonl itself; under a launcher
    each has its own partial bank."""
    return BANK if world_size == 1 else PARTIAL_BANK.format(rank=rank)


def bank_line(essay_id: str, gold: Sequence[int], samples: list[Sample]) -> dict:
    """The bank line of one essay: its id, gold scores, samples and how many of them are invalid."""
    return {"id": essay_id, "gold": [int(g) for g in gold], "samples": samples,
            "invalid": sum(s["scores"] is None for s in samples)}


def append_bank_line(handle: IO[str], row: dict) -> None:
    """Append one essay and force it to disk: after this returns, a kill cannot lose it."""
    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    handle.flush()
    os.fsync(handle.fileno())


def _check_row(path: Path, lineno: int, row, ranges: Sequence[tuple[int, int]]) -> tuple[dict, int]:
    """A validated bank line, and how many of its samples' scores were re-read from their text."""
    def fail(fieldname: str, problem: str) -> DataError:
        return input_error(path, lineno, fieldname, problem)

    if not isinstance(row, dict):
        raise input_error(path, lineno, None, "expected a JSON object")
    for key in ("id", "gold", "samples"):
        if key not in row:
            raise fail(key, "missing")
    k, reparsed = len(ranges), 0

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
        if isinstance(sample.get("text"), str):
            # The text is what the model wrote: its scores are what the strict parser reads in it
            # (a bank written before parsing was strict may hold scores read from a sloppy line).
            strict = None if sample.get("truncated") else parse_score_line(sample["text"], ranges)
            if strict != sample["scores"]:
                sample["scores"] = strict
                reparsed += 1
    row["invalid"] = sum(s["scores"] is None for s in row["samples"])
    return row, reparsed


def read_bank(path: str | Path, ranges: Sequence[tuple[int, int]], *, repair: bool = False) -> list[dict]:
    """The essays of a bank, in file order, validated against the rubric ranges.

    A last line without its newline is what a kill mid-write leaves: it is dropped with a
    warning, and with ``repair`` also cut off the file so appending can continue. Any other bad
    line is a one-line :class:`DataError`, as are duplicate ids. A sample's scores are re-read from
    its text with :func:`~modules.score_lines.parse_score_line` (null when truncated), and each
    line's ``invalid`` count follows.
    """
    path = Path(path)
    data = read_input_bytes(path)
    # json.dumps escapes newlines, so a kill mid-write leaves bytes after the last newline.
    end = data.rfind(b"\n") + 1
    torn = data[end:]
    if torn:
        logger.warning("%s: dropping a torn last line (%d bytes) left by an interrupted run", path, len(torn))
        if repair:
            with path.open("r+b") as handle:
                handle.truncate(end)
                os.fsync(handle.fileno())
    rows, seen, reparsed = [], {}, 0
    for lineno, obj in iter_jsonl(path, data[:end]):
        row, changed = _check_row(path, lineno, obj, ranges)
        reparsed += changed
        row["id"] = str(row["id"])
        if row["id"] in seen:
            raise input_error(path, lineno, "id", f"duplicate id {row['id']!r} (first on line {seen[row['id']]})")
        seen[row["id"]] = lineno
        rows.append(row)
    if reparsed:
        logger.warning("%s: %d samples' stored scores differ from what the strict parser reads in their text "
                       "(a bank from before strict parsing?); counting the strict values", path, reparsed)
    return rows


def bank_files(out_dir: Path) -> list[Path]:
    """The merged bank and the per-process partial banks present in a run folder, merged one first."""
    return [p for p in (out_dir / BANK, *sorted(out_dir.glob(PARTIAL_BANK.format(rank="*")))) if p.is_file()]


def sampled_ids(out_dir: Path, records: Sequence[EssayRecord], info: DatasetInfo, own_bank: str) -> set[str]:
    """The essays a run folder already holds: every essay in the merged bank or in any process's
    partial bank (a killed run may have had another number of processes). Only ``own_bank``, the
    calling process's, has a torn last line cut off, as only that process appends to it."""
    done: set[str] = set()
    for bank in bank_files(out_dir):
        ids = {row["id"] for row in read_bank(bank, info.ranges, repair=bank.name == own_bank)}
        extra = ids - {r.id for r in records}
        if extra:
            raise DataError(f"{bank}: holds essays that are not among the {len(records)} test essays "
                            f"(e.g. {sorted(extra)[0]!r}); resume with the run's --limit or none")
        done |= ids
    return done


def merge_banks(out_dir: Path, records: Sequence[EssayRecord], info: DatasetInfo) -> Path:
    """Write every essay of the run folder's banks into ``samples.jsonl`` in test-file order (one
    atomic write), then delete the partial banks. An essay found twice (a resumed run with another
    number of processes) was drawn with the same seed both times; the first copy is kept."""
    files = bank_files(out_dir)
    rows: dict[str, dict] = {}
    for path in files:
        for row in read_bank(path, info.ranges):
            rows.setdefault(row["id"], row)
    merged = out_dir / BANK
    write_jsonl_atomic(merged, (rows[r.id] for r in records if r.id in rows))
    for path in files:
        if path != merged:
            path.unlink()
    return merged


def bank_samples(bank_path: Path, test_path: str, records: Sequence[EssayRecord],
                 info: DatasetInfo) -> tuple[np.ndarray, int]:
    """The bank's scores as int [N, m, K] in test-file order (-1 = invalid sample) and its number of
    truncated samples; a DataError (one line) when its essays, sample counts or gold scores do not
    match the test file's."""
    rows = {row["id"]: row for row in read_bank(bank_path, info.ranges)}
    expected = [r.id for r in records]
    missing = [i for i in expected if i not in rows]
    unknown = sorted(set(rows) - set(expected))
    if missing or unknown:
        detail = [f"{len(missing)} essays missing (first {missing[0]!r}; an unfinished run? continue it with "
                  f"--resume)"] if missing else []
        detail += [f"{len(unknown)} not among the {len(expected)} test essays (first {unknown[0]!r})"] if unknown else []
        raise DataError(f"{bank_path}: essay ids do not match {test_path}: " + ", ".join(detail))
    counts = sorted({len(rows[i]["samples"]) for i in expected})
    if len(counts) > 1:
        raise DataError(f"{bank_path}: essays hold different numbers of samples {counts}; finish the run with --resume")
    n, m, k = len(records), counts[0], len(info.rubrics)
    samples = np.full((n, m, k), INVALID, dtype=np.int64)
    for e, record in enumerate(records):
        row = rows[record.id]
        if row["gold"] != list(record.scores):
            raise DataError(f"{bank_path}: essay {record.id!r}: gold {row['gold']} differs from {test_path} "
                            f"({list(record.scores)})")
        for j, sample in enumerate(row["samples"]):
            if sample["scores"] is not None:
                samples[e, j] = sample["scores"]
    truncated = sum(bool(sample.get("truncated")) for r in records for sample in rows[r.id]["samples"])
    return samples, truncated
