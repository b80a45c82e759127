"""Dataset schema, loading with one-line validation errors, and prompt rendering.

A dataset folder holds ``train.jsonl``, ``valid.jsonl``, ``test.jsonl`` and ``dataset.json``
(rubrics in order with ranges, writing prompts, language). Records are
``{"id", "prompt_id", "essay", "scores": {rubric: int}, "feedback"}``; the original tool's
``{"instruction", "output"}`` records are accepted too.

Imports neither torch nor transformers (a tokenizer is only passed in), so reading a dataset
works where they are not installed (``self_consistency.py analyze``); training examples with
their label masks are built by :mod:`modules.encoding`.
"""
from __future__ import annotations

import logging
import random
import unicodedata
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from modules.jsonio import DataError, input_error, iter_jsonl, read_json_with_lines
from modules.score_lines import first_line, is_digit_string, parse_score_line, score_fields, score_line

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
PROMPT_FORMATS = ("chat", "plain")
# Rubric range the original tool used; applied when a folder of original records has no dataset.json.
ORIGINAL_RANGE = (1, 9)


@dataclass(frozen=True)
class Rubric:
    name: str
    min: int
    max: int
    description: str = ""
    levels: dict[str, str] | None = None

    @property
    def midpoint(self) -> int:
        return (self.min + self.max) // 2


@dataclass(frozen=True)
class DatasetInfo:
    rubrics: tuple[Rubric, ...]
    prompts: dict[str, str] = field(default_factory=dict)
    language: str = "en"
    name: str = ""
    # The chat system message of every prompt; None keeps the chat template's own default (SmolLM2's
    # names the assistant in 18 tokens, which every training step pays for).
    system_prompt: str | None = None

    @property
    def rubric_names(self) -> list[str]:
        return [r.name for r in self.rubrics]

    @property
    def ranges(self) -> list[tuple[int, int]]:
        return [(r.min, r.max) for r in self.rubrics]


@dataclass(frozen=True)
class EssayRecord:
    id: str
    prompt_id: str
    essay: str
    scores: tuple[int, ...] | None  # rubric order of DatasetInfo; None: an essay to score, without gold
    feedback: str = ""
    instruction: str | None = None  # set for the original tool's records: the prompt is used verbatim


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


# --------------------------------------------------------------------------- dataset.json

def load_dataset_info(data_dir: str | Path) -> DatasetInfo:
    """Read and validate ``dataset.json`` in ``data_dir``."""
    path = Path(data_dir) / "dataset.json"
    raw, line_of = read_json_with_lines(path)
    rubrics_raw = raw.get("rubrics")
    if not isinstance(rubrics_raw, list) or not rubrics_raw:
        raise input_error(path, line_of(raw, "rubrics"), "rubrics", "missing or empty list")
    rubrics = []
    for i, r in enumerate(rubrics_raw):
        for key in ("name", "min", "max"):
            if not isinstance(r, dict) or key not in r:
                raise input_error(path, line_of(r), f"rubrics[{i}].{key}", "missing")
        for key in ("min", "max"):
            if not isinstance(r[key], int) or isinstance(r[key], bool):
                raise input_error(path, line_of(r, key), f"rubrics[{i}].{key}", f"must be an integer, got {r[key]!r}")
        if r["min"] > r["max"]:
            raise input_error(path, line_of(r, "min"), f"rubrics[{i}]", f"min {r['min']} > max {r['max']}")
        if r["min"] < 0:
            # Score lines hold non-negative integers, and the sample bank marks an invalid sample
            # with -1: a rubric reaching -1 would fail only at analysis, after all the sampling.
            raise input_error(path, line_of(r, "min"), f"rubrics[{i}].min",
                              f"{r['min']} is negative; scores must be integers >= 0 (shift the scale, e.g. "
                              f"{r['min']}..{r['max']} to 0..{r['max'] - r['min']})")
        rubrics.append(Rubric(str(r["name"]), r["min"], r["max"], nfc(r.get("description", "")), r.get("levels")))
    names = [r.name for r in rubrics]
    if len(set(names)) != len(names):
        raise input_error(path, line_of(raw, "rubrics"), "rubrics", f"duplicate rubric names {names}")
    prompts = {str(p["id"]): nfc(p.get("text", "")) for p in raw.get("prompts", []) if isinstance(p, dict) and "id" in p}
    system_prompt = raw.get("system_prompt")
    if system_prompt is not None and not isinstance(system_prompt, str):
        raise input_error(path, line_of(raw, "system_prompt"), "system_prompt", f"must be a string, got {system_prompt!r}")
    return DatasetInfo(tuple(rubrics), prompts, raw.get("language", "en"), raw.get("name", ""),
                       None if system_prompt is None else nfc(system_prompt))


def infer_dataset_info(path: str | Path) -> DatasetInfo:
    """Rubrics of a folder of original ``{"instruction", "output"}`` records without dataset.json.

    The original tool scored K rubrics 1-9 and wrote no schema, so K comes from the first score line.
    """
    path = Path(path)
    first = _first_record(path)
    if first is None:
        raise input_error(path, None, None, "empty split (no records)")
    lineno, obj = first
    if not isinstance(obj, dict) or "output" not in obj:
        raise input_error(path, lineno, "output", "missing, and no dataset.json beside the file to name the rubrics")
    k = len(score_fields(first_line(str(obj["output"]).strip())))
    if k == 0:
        raise input_error(path, lineno, "output", "first line holds no score")
    logger.warning("%s: no dataset.json; inferred %d rubrics rubric_1..rubric_%d with range %d-%d",
                   path, k, k, *ORIGINAL_RANGE)
    return DatasetInfo(tuple(Rubric(f"rubric_{i + 1}", *ORIGINAL_RANGE) for i in range(k)))


def _first_record(path: Path) -> tuple[int, Any] | None:
    for lineno, obj in iter_jsonl(path):
        return lineno, obj
    return None


# --------------------------------------------------------------------------- records

def _check_score(path: Path, lineno: int, fieldname: str, value: Any, rubric: Rubric) -> int:
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and is_digit_string(value))):
        raise input_error(path, lineno, fieldname, f"score {value!r} is not a non-negative integer")
    value = int(value)
    if not rubric.min <= value <= rubric.max:
        raise input_error(path, lineno, fieldname, f"score {value} outside {rubric.min}-{rubric.max}")
    return value


def _parse_record(path: Path, lineno: int, obj: Any, info: DatasetInfo, scores_optional: bool = False) -> EssayRecord:
    if not isinstance(obj, dict):
        raise input_error(path, lineno, None, "expected a JSON object")
    if "instruction" in obj and "essay" not in obj:
        return _parse_original(path, lineno, obj, info)
    # An essay to score (scores_optional) may come without scores, or with "scores": null.
    ungraded = scores_optional and obj.get("scores") is None
    for key in ("id", "essay") if ungraded else ("id", "essay", "scores"):
        if key not in obj:
            raise input_error(path, lineno, key, "missing")
    if not isinstance(obj["essay"], str) or not obj["essay"].strip():
        raise input_error(path, lineno, "essay", "must be a non-empty string")
    values = None if ungraded else _parse_scores(path, lineno, obj["scores"], info)
    feedback = obj.get("feedback", "")
    if not isinstance(feedback, str):
        raise input_error(path, lineno, "feedback", "must be a string")
    prompt_id = str(obj.get("prompt_id", ""))
    if info.prompts and prompt_id not in info.prompts or not info.prompts and prompt_id:
        # The writing prompt is part of what the model is trained on: an id that names no prompt
        # would silently train this essay without it.
        known = ", ".join(map(repr, info.prompts)) or "none"
        problem = f"{prompt_id!r} is not a prompt id of dataset.json" if prompt_id else "missing"
        raise input_error(path, lineno, "prompt_id", f"{problem} (its prompts: {known})")
    return EssayRecord(str(obj["id"]), prompt_id, nfc(obj["essay"]), values, nfc(feedback))


def _parse_scores(path: Path, lineno: int, scores: Any, info: DatasetInfo) -> tuple[int, ...]:
    """A record's ``scores`` object as a tuple in rubric order; one-line error naming the field."""
    if not isinstance(scores, dict):
        raise input_error(path, lineno, "scores", "must be an object {rubric: int}")
    known = set(info.rubric_names)
    for name in scores:
        if name not in known:
            raise input_error(path, lineno, f"scores.{name}", f"unknown rubric (dataset.json names {info.rubric_names})")
    values = []
    for rubric in info.rubrics:
        if rubric.name not in scores:
            raise input_error(path, lineno, f"scores.{rubric.name}", "missing")
        values.append(_check_score(path, lineno, f"scores.{rubric.name}", scores[rubric.name], rubric))
    return tuple(values)


def _parse_original(path: Path, lineno: int, obj: dict, info: DatasetInfo) -> EssayRecord:
    if "output" not in obj:
        raise input_error(path, lineno, "output", "missing")
    if not isinstance(obj["instruction"], str) or not obj["instruction"].strip():
        raise input_error(path, lineno, "instruction", "must be a non-empty string")
    output = str(obj["output"]).strip()
    values = parse_score_line(output, info.ranges)
    if values is None:  # say which field is wrong
        fields = score_fields(first_line(output))
        if len(fields) != len(info.rubrics):
            raise input_error(path, lineno, "output", f"score line has {len(fields)} values, expected {len(info.rubrics)}")
        for i, (text, rubric) in enumerate(zip(fields, info.rubrics)):
            _check_score(path, lineno, f"output[{i}]", text, rubric)
    feedback = output.partition("\n")[2].strip()
    instruction = nfc(obj["instruction"])
    return EssayRecord(str(obj.get("id", f"{path.stem}-{lineno}")), str(obj.get("prompt_id", "")),
                       nfc(str(obj.get("essay", instruction))), tuple(values), nfc(feedback), instruction)


def dataset_info_for(path: str | Path) -> DatasetInfo:
    """The schema of a split file: dataset.json beside it, else inferred from original records."""
    path = Path(path)
    if (path.parent / "dataset.json").exists():
        return load_dataset_info(path.parent)
    return infer_dataset_info(path)


def load_split(path: str | Path, info: DatasetInfo | None = None, ratio: float = 1.0, seed: int = 42, *,
               scores_optional: bool = False) -> list[EssayRecord]:
    """Load and validate one jsonl split; ``ratio`` < 1 keeps a seeded random subset in file order.

    ``scores_optional``: essays to score may lack ``scores`` (their record's ``scores`` is None);
    scores that are present are still checked. Training and evaluation splits need them."""
    path = Path(path)
    info = info or dataset_info_for(path)
    records, seen = [], {}
    for lineno, obj in iter_jsonl(path):
        record = _parse_record(path, lineno, obj, info, scores_optional)
        if record.id in seen:
            raise input_error(path, lineno, "id", f"duplicate id {record.id!r} (first on line {seen[record.id]})")
        seen[record.id] = lineno
        records.append(record)
    if not records:
        raise input_error(path, None, None, "empty split (no records)")
    return subsample(records, ratio, seed)


def subsample(records: Sequence[EssayRecord], ratio: float, seed: int) -> list[EssayRecord]:
    """A seeded random ``ratio`` of the records (at least one), keeping their order."""
    if not 0 < ratio <= 1:
        raise ValueError(f"--ratio must be in (0, 1], got {ratio}")
    if ratio == 1:
        return list(records)
    keep = max(1, round(ratio * len(records)))
    chosen = sorted(random.Random(seed).sample(range(len(records)), keep))
    return [records[i] for i in chosen]


def load_splits(data_dir: str | Path, ratio: float = 1.0, seed: int = 42) -> tuple[DatasetInfo, dict[str, list[EssayRecord]]]:
    """All three splits of a dataset folder; ``ratio`` subsamples the training split only."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data folder not found")
    info = dataset_info_for(data_dir / "train.jsonl")
    splits = {name: load_split(data_dir / f"{name}.jsonl", info, ratio if name == "train" else 1.0, seed)
              for name in SPLITS}
    return info, splits


# --------------------------------------------------------------------------- rendering

def render_instruction(record: EssayRecord, info: DatasetInfo, mtl: bool = False) -> str:
    """The user message: task, rubric names and ranges, writing prompt and essay."""
    if record.instruction is not None:
        return record.instruction
    # Names and ranges only, on one line: every prompt token is paid for in every training step.
    if len(set(info.ranges)) == 1:
        lo, hi = info.ranges[0]
        rubric_text = f"in order, each scored {lo}-{hi}: " + ", ".join(info.rubric_names)
    else:
        rubric_text = "in order: " + ", ".join(f"{r.name} ({r.min}-{r.max})" for r in info.rubrics)
    answer = (f"Answer with one line of {len(info.rubrics)} integer scores in this order, separated by spaces"
              + (", then a new line with short feedback." if mtl else ", and nothing else."))
    parts = [f"Score the essay on each rubric. {answer}", f"Rubrics {rubric_text}."]
    writing_prompt = info.prompts.get(record.prompt_id)
    if writing_prompt:
        parts.append(f"Writing prompt: {writing_prompt}")
    parts.append(f"Essay:\n{record.essay}")
    return "\n\n".join(parts)


def render_prompt(tokenizer, instruction: str, prompt_format: str = "chat", system_prompt: str | None = None) -> str:
    """Wrap the instruction in the chat template (after ``system_prompt`` as the system message, when
    given), or the original tool's plain concatenation (which has no system message)."""
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
    if prompt_format == "chat" and getattr(tokenizer, "chat_template", None):
        system = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
        return tokenizer.apply_chat_template([*system, {"role": "user", "content": instruction}],
                                             tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token or ""
    return f"{bos}{instruction}\n"


def target_text(record: EssayRecord, mtl: bool) -> str:
    line = score_line(record.scores)
    return f"{line}\n{record.feedback}" if mtl and record.feedback else line


def build_prompt(record: EssayRecord, info: DatasetInfo, tokenizer, mtl: bool = False, prompt_format: str = "chat",
                 max_prompt_tokens: int | None = None) -> str:
    """The rendered prompt of a record; with ``max_prompt_tokens``, the essay (the instruction, for
    original records) is cut from its end until the prompt takes at most that many tokens.

    Training and inference both call this with the run's ``max_prompt_tokens`` (see
    :func:`modules.encoding.prompt_token_budget`), so the model is scored on exactly the prompt it
    was trained on.
    """
    if max_prompt_tokens is None:
        return render_prompt(tokenizer, render_instruction(record, info, mtl), prompt_format, info.system_prompt)
    return fit_prompt(record, info, tokenizer, mtl, prompt_format, max_prompt_tokens)[0]


def fit_prompt(record: EssayRecord, info: DatasetInfo, tokenizer, mtl: bool, prompt_format: str,
               max_prompt_tokens: int | None) -> tuple[str, list[int]]:
    """:func:`build_prompt`'s text and its token ids (tokenised once, as the cut needs them anyway);
    :func:`modules.encoding.encode_example` builds training examples from the ids."""
    prompt = render_prompt(tokenizer, render_instruction(record, info, mtl), prompt_format, info.system_prompt)
    # Chat templates write their own BOS text; the plain format writes it too (render_prompt).
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if max_prompt_tokens is None:
        return prompt, list(ids)
    text = record.instruction if record.instruction is not None else record.essay
    for _ in range(8):  # decode/re-encode can merge tokens differently; a few rounds converge
        excess = len(ids) - max_prompt_tokens
        if excess <= 0:
            return prompt, list(ids)
        text_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        keep = len(text_ids) - excess
        # A cut inside a multi-byte character decodes to U+FFFD, which re-encodes to as many byte
        # tokens as were cut: drop it, and cut further until the text really gets shorter.
        while keep > 0:
            shorter_text = tokenizer.decode(text_ids[:keep]).rstrip("\ufffd")
            if len(shorter_text) < len(text):
                break
            keep -= 1
        if keep <= 0:
            break
        text = shorter_text
        shorter = replace(record, instruction=text) if record.instruction is not None else replace(record, essay=text)
        prompt = render_prompt(tokenizer, render_instruction(shorter, info, mtl), prompt_format, info.system_prompt)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if len(ids) > max_prompt_tokens:
        raise ValueError(f"{record.id}: the prompt without its essay takes more than {max_prompt_tokens} tokens "
                         "(raise --max_seq_length)")
    return prompt, list(ids)
