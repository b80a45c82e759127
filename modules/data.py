"""Dataset schema, loading with one-line validation errors, prompt rendering and label masks.

A dataset folder holds ``train.jsonl``, ``valid.jsonl``, ``test.jsonl`` and ``dataset.json``
(rubrics in order with ranges, writing prompts, language). Records are
``{"id", "prompt_id", "essay", "scores": {rubric: int}, "feedback"}``; the original tool's
``{"instruction", "output"}`` records are accepted too.

Training examples are built by tokenising the rendered prompt and the target separately and
concatenating the ids, so no prompt token can ever become a label. Inside the target, the
score-number tokens (``ntl_labels``) and the feedback tokens (``emo_labels``) are found from
character offsets, never from fixed token counts, so any tokenizer works.
"""
from __future__ import annotations

import codecs
import json
import logging
import random
import re
import unicodedata
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from modules.losses import IGNORE_INDEX, number_token_values
from modules.score_lines import first_line, is_digit_string, parse_score_line, score_fields, score_line, score_spans

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
PROMPT_FORMATS = ("chat", "plain")
# Rubric range the original tool used; applied when a folder of original records has no dataset.json.
ORIGINAL_RANGE = (1, 9)


class DataError(ValueError):
    """Bad input, reported as one line naming the file, the line and the field."""


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
    scores: tuple[int, ...]  # rubric order of DatasetInfo
    feedback: str = ""
    instruction: str | None = None  # set for the original tool's records: the prompt is used verbatim


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def _fail(path: Path, line: int | None, fieldname: str | None, problem: str) -> DataError:
    where = f"{path}:{line}" if line is not None else str(path)
    return DataError(f"{where}: field '{fieldname}': {problem}" if fieldname else f"{where}: {problem}")


# --------------------------------------------------------------------------- dataset.json

def load_dataset_info(data_dir: str | Path) -> DatasetInfo:
    """Read and validate ``dataset.json`` in ``data_dir``."""
    path = Path(data_dir) / "dataset.json"
    text = read_text_utf8(path)
    try:
        raw, line_of = loads_with_lines(text)
    except json.JSONDecodeError as err:
        raise _fail(path, err.lineno, None, f"invalid JSON ({err.msg})") from None
    if not isinstance(raw, dict):
        raise _fail(path, 1, None, "expected a JSON object")
    rubrics_raw = raw.get("rubrics")
    if not isinstance(rubrics_raw, list) or not rubrics_raw:
        raise _fail(path, line_of(raw, "rubrics"), "rubrics", "missing or empty list")
    rubrics = []
    for i, r in enumerate(rubrics_raw):
        for key in ("name", "min", "max"):
            if not isinstance(r, dict) or key not in r:
                raise _fail(path, line_of(r), f"rubrics[{i}].{key}", "missing")
        for key in ("min", "max"):
            if not isinstance(r[key], int) or isinstance(r[key], bool):
                raise _fail(path, line_of(r, key), f"rubrics[{i}].{key}", f"must be an integer, got {r[key]!r}")
        if r["min"] > r["max"]:
            raise _fail(path, line_of(r, "min"), f"rubrics[{i}]", f"min {r['min']} > max {r['max']}")
        if r["min"] < 0:
            # Score lines hold non-negative integers, and the sample bank marks an invalid sample
            # with -1: a rubric reaching -1 would fail only at analysis, after all the sampling.
            raise _fail(path, line_of(r, "min"), f"rubrics[{i}].min",
                        f"{r['min']} is negative; scores must be integers >= 0 (shift the scale, e.g. "
                        f"{r['min']}..{r['max']} to 0..{r['max'] - r['min']})")
        rubrics.append(Rubric(str(r["name"]), r["min"], r["max"], nfc(r.get("description", "")), r.get("levels")))
    names = [r.name for r in rubrics]
    if len(set(names)) != len(names):
        raise _fail(path, line_of(raw, "rubrics"), "rubrics", f"duplicate rubric names {names}")
    prompts = {str(p["id"]): nfc(p.get("text", "")) for p in raw.get("prompts", []) if isinstance(p, dict) and "id" in p}
    return DatasetInfo(tuple(rubrics), prompts, raw.get("language", "en"), raw.get("name", ""))


def read_input_bytes(path: Path) -> bytes:
    """The bytes of an input file; a missing file or a folder in its place is a one-line DataError."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, expected a file") from None


def read_text_utf8(path: Path) -> str:
    """A whole UTF-8 file (a leading BOM dropped); a missing file or a byte that is not UTF-8 is a
    one-line DataError naming the file and line."""
    return decode_utf8(path, read_input_bytes(path))


def read_json(path: str | Path) -> dict:
    """A JSON object from a UTF-8 file (run configs, manifests, baselines); any problem with it is a
    one-line DataError naming the file (and the line)."""
    path = Path(path)
    try:
        obj = json.loads(read_text_utf8(path))
    except json.JSONDecodeError as err:
        raise _fail(path, err.lineno, None, f"invalid JSON ({err.msg})") from None
    if not isinstance(obj, dict):
        raise _fail(path, None, None, "expected a JSON object")
    return obj


def decode_utf8(path: Path, data: bytes, first_line: int = 1) -> str:
    """``data`` (the text of ``path`` from line ``first_line`` on) as UTF-8, a BOM at the start of
    the file dropped. A byte that is not UTF-8 is a DataError naming the file, line and column:
    the codec's own message names only a byte position."""
    bom = first_line == 1 and data.startswith(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8-sig" if first_line == 1 else "utf-8")
    except UnicodeDecodeError as err:
        offset = err.start + (len(codecs.BOM_UTF8) if bom else 0)  # utf-8-sig counts after the BOM
        line_start = data.rfind(b"\n", 0, offset) + 1 or (len(codecs.BOM_UTF8) if bom else 0)
        column = len(data[line_start:offset].decode("utf-8", errors="replace")) + 1
        raise _fail(path, first_line + data.count(b"\n", 0, offset), None,
                    f"byte 0x{data[offset]:02x} at column {column} is not UTF-8 (save the file as UTF-8; "
                    f"`python -m modules.convert csv` reads cp1252 and Latin-1 tables)") from None


def loads_with_lines(text: str) -> tuple[Any, Callable[..., int | None]]:
    """``json.loads`` that also returns ``line_of(obj, key=None)``: the line where a decoded object
    (a dict of the result) starts, or where its ``key`` is written; None for anything else.

    The pure-Python scanner is used because the C one does not report where objects start; the
    files read this way (dataset.json) are small.
    """
    spans: dict[int, tuple[int, int]] = {}
    decoder = json.JSONDecoder()

    def parse_object(s_and_end, *args):
        obj, end = json.decoder.JSONObject(s_and_end, *args)
        spans[id(obj)] = (s_and_end[1] - 1, end)
        return obj, end

    decoder.parse_object = parse_object
    decoder.scan_once = json.scanner.py_make_scanner(decoder)
    obj = decoder.decode(text)

    def line_of(item: Any, key: str | None = None) -> int | None:
        span = spans.get(id(item))
        if span is None:
            return None
        start, end = span
        if key is not None:
            # The key at this object's own level: skip matches inside nested objects.
            inner = [spans[id(v)] for v in item.values() if id(v) in spans]
            inner += [spans[id(x)] for v in item.values() if isinstance(v, list) for x in v if id(x) in spans]
            for match in re.finditer(re.escape(json.dumps(key)) + r"\s*:", text[start:end]):
                pos = start + match.start()
                if not any(lo <= pos < hi for lo, hi in inner):
                    start = pos
                    break
        return text.count("\n", 0, start) + 1

    return obj, line_of


def infer_dataset_info(path: str | Path) -> DatasetInfo:
    """Rubrics of a folder of original ``{"instruction", "output"}`` records without dataset.json.

    The original tool scored K rubrics 1-9 and wrote no schema, so K comes from the first score line.
    """
    path = Path(path)
    first = _first_record(path)
    if first is None:
        raise _fail(path, None, None, "empty split (no records)")
    lineno, obj = first
    if not isinstance(obj, dict) or "output" not in obj:
        raise _fail(path, lineno, "output", "missing, and no dataset.json beside the file to name the rubrics")
    k = len(score_fields(first_line(str(obj["output"]).strip())))
    if k == 0:
        raise _fail(path, lineno, "output", "first line holds no score")
    logger.warning("%s: no dataset.json; inferred %d rubrics rubric_1..rubric_%d with range %d-%d",
                   path, k, k, *ORIGINAL_RANGE)
    return DatasetInfo(tuple(Rubric(f"rubric_{i + 1}", *ORIGINAL_RANGE) for i in range(k)))


def _first_record(path: Path) -> tuple[int, Any] | None:
    for lineno, obj in _iter_jsonl(path):
        return lineno, obj
    return None


# --------------------------------------------------------------------------- records

def _iter_jsonl(path: Path):
    # Bytes, decoded line by line: a byte that is not UTF-8 is then reported with its line.
    for lineno, raw in enumerate(read_input_bytes(path).split(b"\n"), start=1):
        line = decode_utf8(path, raw, first_line=lineno)
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as err:
            raise _fail(path, lineno, None, f"invalid JSON ({err.msg} at column {err.colno})") from None


def _check_score(path: Path, lineno: int, fieldname: str, value: Any, rubric: Rubric) -> int:
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and is_digit_string(value))):
        raise _fail(path, lineno, fieldname, f"score {value!r} is not a non-negative integer")
    value = int(value)
    if not rubric.min <= value <= rubric.max:
        raise _fail(path, lineno, fieldname, f"score {value} outside {rubric.min}-{rubric.max}")
    return value


def _parse_record(path: Path, lineno: int, obj: Any, info: DatasetInfo) -> EssayRecord:
    if not isinstance(obj, dict):
        raise _fail(path, lineno, None, "expected a JSON object")
    if "instruction" in obj and "essay" not in obj:
        return _parse_original(path, lineno, obj, info)
    for key in ("id", "essay", "scores"):
        if key not in obj:
            raise _fail(path, lineno, key, "missing")
    if not isinstance(obj["essay"], str) or not obj["essay"].strip():
        raise _fail(path, lineno, "essay", "must be a non-empty string")
    scores = obj["scores"]
    if not isinstance(scores, dict):
        raise _fail(path, lineno, "scores", "must be an object {rubric: int}")
    known = set(info.rubric_names)
    for name in scores:
        if name not in known:
            raise _fail(path, lineno, f"scores.{name}", f"unknown rubric (dataset.json names {info.rubric_names})")
    values = []
    for rubric in info.rubrics:
        if rubric.name not in scores:
            raise _fail(path, lineno, f"scores.{rubric.name}", "missing")
        values.append(_check_score(path, lineno, f"scores.{rubric.name}", scores[rubric.name], rubric))
    feedback = obj.get("feedback", "")
    if not isinstance(feedback, str):
        raise _fail(path, lineno, "feedback", "must be a string")
    prompt_id = str(obj.get("prompt_id", ""))
    if info.prompts and prompt_id not in info.prompts or not info.prompts and prompt_id:
        # The writing prompt is part of what the model is trained on: an id that names no prompt
        # would silently train this essay without it.
        known = ", ".join(map(repr, info.prompts)) or "none"
        problem = f"{prompt_id!r} is not a prompt id of dataset.json" if prompt_id else "missing"
        raise _fail(path, lineno, "prompt_id", f"{problem} (its prompts: {known})")
    return EssayRecord(str(obj["id"]), prompt_id, nfc(obj["essay"]), tuple(values), nfc(feedback))


def _parse_original(path: Path, lineno: int, obj: dict, info: DatasetInfo) -> EssayRecord:
    if "output" not in obj:
        raise _fail(path, lineno, "output", "missing")
    if not isinstance(obj["instruction"], str) or not obj["instruction"].strip():
        raise _fail(path, lineno, "instruction", "must be a non-empty string")
    output = str(obj["output"]).strip()
    values = parse_score_line(output, info.ranges)
    if values is None:  # say which field is wrong
        fields = score_fields(first_line(output))
        if len(fields) != len(info.rubrics):
            raise _fail(path, lineno, "output", f"score line has {len(fields)} values, expected {len(info.rubrics)}")
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


def load_split(path: str | Path, info: DatasetInfo | None = None, ratio: float = 1.0, seed: int = 42) -> list[EssayRecord]:
    """Load and validate one jsonl split; ``ratio`` < 1 keeps a seeded random subset in file order."""
    path = Path(path)
    info = info or dataset_info_for(path)
    records, seen = [], {}
    for lineno, obj in _iter_jsonl(path):
        record = _parse_record(path, lineno, obj, info)
        if record.id in seen:
            raise _fail(path, lineno, "id", f"duplicate id {record.id!r} (first on line {seen[record.id]})")
        seen[record.id] = lineno
        records.append(record)
    if not records:
        raise _fail(path, None, None, "empty split (no records)")
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


def render_prompt(tokenizer, instruction: str, prompt_format: str = "chat") -> str:
    """Wrap the instruction in the chat template, or the original tool's plain concatenation."""
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
    if prompt_format == "chat" and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": instruction}],
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
    :func:`prompt_token_budget`), so the model is scored on exactly the prompt it was trained on.
    """
    if max_prompt_tokens is None:
        return render_prompt(tokenizer, render_instruction(record, info, mtl), prompt_format)
    return _fit_prompt(record, info, tokenizer, mtl, prompt_format, max_prompt_tokens)[0]


def _fit_prompt(record: EssayRecord, info: DatasetInfo, tokenizer, mtl: bool, prompt_format: str,
                max_prompt_tokens: int | None) -> tuple[str, list[int]]:
    """:func:`build_prompt`'s text and its token ids (tokenised once, as the cut needs them anyway)."""
    prompt = render_prompt(tokenizer, render_instruction(record, info, mtl), prompt_format)
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
        prompt = render_prompt(tokenizer, render_instruction(shorter, info, mtl), prompt_format)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if len(ids) > max_prompt_tokens:
        raise ValueError(f"{record.id}: the prompt without its essay takes more than {max_prompt_tokens} tokens "
                         "(raise --max_seq_length)")
    return prompt, list(ids)


def _target_ids(record: EssayRecord, tokenizer, mtl: bool) -> tuple[str, list[int], list[tuple[int, int]]]:
    """The target text, its token ids (+EOS) and each token's character span in the text."""
    target = target_text(record, mtl)
    enc = tokenizer(target, add_special_tokens=False, return_offsets_mapping=True)
    return (target, list(enc["input_ids"]) + [tokenizer.eos_token_id],
            list(enc["offset_mapping"]) + [(len(target), len(target))])


def prompt_token_budget(records: Sequence[EssayRecord], tokenizer, mtl: bool, max_seq_length: int | None) -> int | None:
    """Tokens a prompt may take in this run: ``max_seq_length`` minus the longest target (+EOS) among
    ``records`` (the training split), or None without a length limit.

    The budget depends on the training split only, never on the essay being scored, so training
    and inference shorten every essay the same way and no test target leaks into its prompt.
    """
    if max_seq_length is None:
        return None
    longest = max(len(_target_ids(r, tokenizer, mtl)[1]) for r in records)
    if longest >= max_seq_length:
        raise ValueError(f"--max_seq_length {max_seq_length} leaves no room for a prompt: the longest training "
                         f"target takes {longest} tokens")
    return max_seq_length - longest


# --------------------------------------------------------------------------- label masks

def _overlaps(span: tuple[int, int], lo: int, hi: int) -> bool:
    return span[0] < hi and span[1] > lo and span[1] > span[0]


def encode_example(record: EssayRecord, info: DatasetInfo, tokenizer, *, mtl: bool = False,
                   prompt_format: str = "chat", max_seq_length: int | None = None,
                   max_prompt_tokens: int | None = None,
                   number_values: torch.Tensor | None = None) -> dict[str, list[int]]:
    """Token ids and the three label masks of one training example.

    ``labels`` = target + EOS; ``ntl_labels`` = the score-number tokens; ``emo_labels`` = the
    feedback tokens (MTL only); all other positions hold -100. The prompt is shortened (its essay,
    never the target) to ``max_prompt_tokens`` and, should that not suffice, until prompt and
    target fit in ``max_seq_length``.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("a fast tokenizer is required: label masks come from character offsets")
    if number_values is None:
        number_values = number_token_values(tokenizer)
    target, target_ids, offsets = _target_ids(record, tokenizer, mtl)
    limits = [n for n in (max_prompt_tokens, max_seq_length and max_seq_length - len(target_ids)) if n is not None]
    _, prompt_ids = _fit_prompt(record, info, tokenizer, mtl, prompt_format, min(limits) if limits else None)

    line_len = len(score_line(record.scores))
    spans = score_spans(target[:line_len])
    ntl, emo = [], []
    for tok, span in zip(target_ids, offsets):
        is_number = tok < len(number_values) and not torch.isnan(number_values[tok])
        in_score = any(_overlaps(span, lo, hi) for lo, hi in spans)
        ntl.append(tok if in_score and is_number else IGNORE_INDEX)
        emo.append(tok if mtl and _overlaps(span, line_len + 1, len(target)) else IGNORE_INDEX)
    if sum(t != IGNORE_INDEX for t in ntl) < len(spans):
        logger.warning("%s: some score digits are not number tokens for this tokenizer; NTL skips them", record.id)

    pad = [IGNORE_INDEX] * len(prompt_ids)
    return {"input_ids": prompt_ids + target_ids, "labels": pad + target_ids,
            "ntl_labels": pad + ntl, "emo_labels": pad + emo}


class ScoringCollator:
    """Pads encoded examples into tensors; padding is ignored by every label mask.

    Left padding by default: every target then ends in the last column, so the trainer computes
    logits for the target span only (``modules.trainer.logits_to_keep``).
    """

    keys = ("labels", "ntl_labels", "emo_labels")

    def __init__(self, pad_token_id: int, padding_side: str = "left"):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        batch = {"input_ids": torch.full((len(features), width), self.pad_token_id, dtype=torch.long),
                 "attention_mask": torch.zeros((len(features), width), dtype=torch.long)}
        for key in self.keys:
            batch[key] = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            cols = slice(width - n, width) if self.padding_side == "left" else slice(0, n)
            batch["input_ids"][row, cols] = torch.tensor(f["input_ids"])
            batch["attention_mask"][row, cols] = 1
            for key in self.keys:
                batch[key][row, cols] = torch.tensor(f[key])
        return batch


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write UTF-8 with "\\n" newlines through a temporary file and a rename, so a killed run
    never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as handle:
        handle.write(text)
    tmp.replace(path)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_jsonl_atomic(path: str | Path, rows: Iterable[Any]) -> None:
    """One JSON object per line (UTF-8, unescaped), written atomically like write_text_atomic."""
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
