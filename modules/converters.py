"""Converters from real essay corpora to the project's dataset folder (SPEC section 3).

    python -m modules.convert asap training_set_rel3.tsv --out_dir data/asap7 --essay_set 7
    python -m modules.convert ellipse train.csv --out_dir data/ellipse
    python -m modules.convert csv essays.csv --out_dir data/mine --text_col text \\
        --score_cols content,language --ranges 1-6,1-4

All three share one pipeline, so they behave alike: decode the file (encoding detected, see
below) -> parse the table with the ``csv`` module -> check the required columns -> turn each row
into a record or drop it with a reason -> seeded train/valid/test split -> write
``{train,valid,test}.jsonl`` and ``dataset.json`` atomically -> reload the folder with
``modules.data.load_splits``, so a written folder is one the training code accepts.

Row policy (the same for every converter):

* dropped, with the reason counted and the line numbers kept in the report: an empty essay, an
  empty score cell (also ``NA``, ``N/A``, ``nan``, ``null``, ``none``), an empty prompt cell. A
  corpus with a few unscored essays should still convert, and the report says which were left out.
* one-line ``DataError`` naming file, line, data row and column: a score that is not a number,
  outside its range, or not on the scale's grid (e.g. 2.3 on ELLIPSE's half-point scale); an
  empty or duplicate id; an ASAP essay set outside 1-8; a row with more fields than the header.
  Such a value means the file or the chosen ranges are wrong, and dropping it silently would
  hide that.
* a missing required column is a one-line ``DataError`` naming the file and the column(s).

Encodings: the bytes are decoded as UTF-8 (a BOM is allowed); failing that as cp1252; failing
that (cp1252 leaves 0x81, 0x8D, 0x8F, 0x90, 0x9D undefined) as Latin-1. Latin-1 would turn bytes
0x80-0x9F into C1 control characters, so after decoding every remaining character U+0080-U+009F
is mapped to the character cp1252 gives its byte (U+0092 -> right single quote) and dropped where
cp1252 defines none (the five bytes above); the output never holds a C1 control character.
Before that, mojibake is repaired: a run of characters that are the cp1252/Latin-1 reading of one
well-formed UTF-8 multi-byte sequence ("â€™", "â€\\x9d", "Â½") is replaced by the character it
encodes ("’", "”", "½"); only sequences led by "Â", "Ã", "â" or "ð" (Latin-1 letters and symbols,
punctuation, emoji), since other lead characters are capitals like "É" that real text may put
before a curly quote. ASAP's own file holds such runs (its essays went through UTF-8 and were
then read as cp1252); without the repair the closing quote "â€\\x9d" would lose its C1 byte and
leave "â€". Text is NFC-normalised, line endings become "\\n" and essays are stripped.

ASAP (``training_set_rel3.tsv`` layout: ``essay_id``, ``essay_set``, ``essay``, rater and domain
columns): ``id`` = ``essay_id``, ``prompt_id`` = the essay set ("7"). Rubrics per set:

* ``holistic`` = ``domain1_score`` (the resolved score) with the set's official range
  1: 2-12, 3: 0-3, 4: 0-3, 5: 0-4, 6: 0-4, 7: 0-30, 8: 0-60;
* set 2 has two domains: ``writing_applications`` = ``domain1_score`` (1-6) and
  ``language_conventions`` = ``domain2_score`` (1-4);
* traits, only for sets 7 and 8 and only when the header has the trait columns (``--no_traits``
  turns them off): each trait is the sum of the two raters, ``rater1_traitN + rater2_traitN``,
  the same way ASAP resolves the holistic scores of sets 1, 7 and 8. Set 7 has four traits scored
  0-3 per rater (ideas, organization, style, conventions), stored 0-6; set 8 has six traits
  scored 1-6 per rater (ideas_and_content, organization, voice, word_choice, sentence_fluency,
  conventions), stored 2-12. ``rater3_trait*`` (set 8's adjudication, filled for a minority of
  essays) is not used: summing it too would put those essays on a different scale.

Every record of a dataset must have the same rubrics, so several essay sets convert together
only when their rubrics are identical (3 with 4, 5 with 6); otherwise the converter stops with a
one-line error naming the sets. Each set becomes one prompt in ``dataset.json``, described in a
sentence written for this project (not the official prompt text). ASAP has no feedback: records
carry ``"feedback": ""`` (train without ``--mtl``).

ELLIPSE / Feedback Prize - English Language Learning (``text_id``, ``full_text`` and six traits
``cohesion``, ``syntax``, ``vocabulary``, ``phraseology``, ``grammar``, ``conventions``, each
1.0-5.0 in steps of 0.5): the rubrics need integers, so each score is stored as ``score * 2``,
range 2-10; divide by 2 (``original_score``) to get back the ELLIPSE value. The factor is stored
as ``"scale": 2`` on each rubric in ``dataset.json``.

Generic CSV: ``--text_col``, ``--score_cols A,B`` with ``--ranges 1-6,1-4`` (one range for all or
one per column, in the file's units), ``--id_col`` (default ``row-N``, the data row number),
``--prompt_col`` (default: one prompt), ``--scale`` (scores times S must be whole numbers; the
stored range is the given range times S), ``--delimiter`` (default tab for ``.tsv``/``.tab``,
else comma).

Split: records are grouped by prompt; within each prompt a ``random.Random(seed)`` shuffle gives
round(f_test * n) test and round(f_valid * n) valid essays, the rest train; each split keeps file
order. The fractions (``--split 0.7,0.15,0.15``, normalised by their sum) and the seed are written
into ``dataset.json`` with the rest of the report.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import logging
import math
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from modules.data import (SPLITS, DataError, load_splits, nfc, read_input_bytes, write_json_atomic,
                          write_jsonl_atomic)

logger = logging.getLogger(__name__)

DEFAULT_SPLIT = (0.7, 0.15, 0.15)
MISSING_VALUES = frozenset({"", "na", "n/a", "nan", "null", "none"})
DATASET_FILES = tuple(f"{s}.jsonl" for s in SPLITS) + ("dataset.json",)

# --------------------------------------------------------------------------- ASAP constants

ASAP_RANGES = {1: (2, 12), 2: (1, 6), 3: (0, 3), 4: (0, 3), 5: (0, 4), 6: (0, 4), 7: (0, 30), 8: (0, 60)}
ASAP_DOMAIN2_RANGE = (1, 4)  # set 2 only
# Per-rater trait range and trait names, in the order of the rater*_trait1.. columns.
ASAP_TRAITS: dict[int, tuple[tuple[int, int], tuple[str, ...]]] = {
    7: ((0, 3), ("ideas", "organization", "style", "conventions")),
    8: ((1, 6), ("ideas_and_content", "organization", "voice", "word_choice", "sentence_fluency", "conventions")),
}
ASAP_TRAIT_TEXT = {
    "ideas": "ideas: a clear, focused story with relevant detail",
    "ideas_and_content": "ideas and content: a clear, focused story with relevant detail",
    "organization": "organization: the order of events, an opening, transitions and an ending",
    "style": "style: word choice and sentence variety suited to the story",
    "voice": "voice: the writer's personality and engagement with the reader",
    "word_choice": "word choice: precise, vivid words",
    "sentence_fluency": "sentence fluency: varied sentences that read smoothly",
    "conventions": "conventions: spelling, punctuation, grammar and capitalisation",
}
# Short descriptions of each set's writing task, written for this project (not the official text).
ASAP_PROMPTS = {
    1: "Persuasive letter to a local newspaper: do computers do people more good or more harm? "
       "Argue a position with reasons.",
    2: "Persuasive essay on censorship: should library materials that some readers find offensive be "
       "taken off the shelves? Argue a position from experience, observation or reading.",
    3: "Response to a reading: a memoir of a long, hot bicycle ride through empty country on outdated "
       "directions. Explain how features of the setting affect the cyclist.",
    4: "Response to a reading: a story about a young immigrant, a plant she cares for and a test she "
       "failed. Explain why the story ends with her resolving to try again when the season turns.",
    5: "Response to a reading: a memoir by a designer about the home his immigrant parents made for the "
       "family. Describe the mood the author creates and how.",
    6: "Response to a reading: an article about the plan to let airships dock on top of the Empire "
       "State Building. Describe the obstacles its builders faced.",
    7: "Narrative: write a story about a time when you, or someone you know, showed patience.",
    8: "Narrative: tell a true story in which laughter played a part.",
}
ASAP_HOLISTIC_TEXT = {
    1: "sum of two raters' 1-6 holistic scores",
    3: "resolved score of two raters for a source-based response",
    4: "resolved score of two raters for a source-based response",
    5: "resolved score of two raters for a source-based response",
    6: "resolved score of two raters for a source-based response",
    7: "sum of the two raters' scores",
    8: "resolved from the raters' scores",
}

# --------------------------------------------------------------------------- ELLIPSE constants

ELLIPSE_TRAITS = {
    "cohesion": "text organisation, linking of ideas and use of cohesive devices",
    "syntax": "sentence structure and variety",
    "vocabulary": "range and precision of words",
    "phraseology": "phrases, idioms and collocations",
    "grammar": "grammatical accuracy",
    "conventions": "spelling, capitalisation and punctuation",
}
ELLIPSE_RANGE = (1.0, 5.0)
ELLIPSE_SCALE = 2
ELLIPSE_PROMPT = "An argumentative essay by an English-language learner in grades 6-12."


# --------------------------------------------------------------------------- report

@dataclass
class ConversionReport:
    """What a conversion read, dropped, observed and wrote; printed by the CLI and stored in
    ``dataset.json`` so a dataset folder says where it came from."""

    source: str
    sha256: str = ""
    encoding: str = ""
    rows_read: int = 0
    skipped: dict[str, int] = field(default_factory=dict)          # rows left out by choice (other essay sets)
    dropped: dict[str, list[int]] = field(default_factory=dict)    # reason -> line numbers
    mojibake_repaired: int = 0
    c1_mapped: int = 0
    c1_dropped: int = 0
    ranges: dict[str, list[int]] = field(default_factory=dict)     # rubric -> [min, max] allowed
    observed: dict[str, list[int]] = field(default_factory=dict)   # rubric -> [min, max] seen
    split_sizes: dict[str, int] = field(default_factory=dict)
    split_fractions: list[float] = field(default_factory=list)
    seed: int = 0
    out_dir: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def kept(self) -> int:
        return sum(self.split_sizes.values())

    def drop(self, reason: str, line: int) -> None:
        self.dropped.setdefault(reason, []).append(line)

    def to_dict(self) -> dict:
        """What ``dataset.json`` stores: everything but the output folder, so that converting the
        same file with the same settings gives the same bytes wherever the folder is."""
        out = asdict(self)
        del out["out_dir"]
        return out

    def format(self) -> str:
        """Human-readable multi-line summary (the CLI prints it)."""
        n_dropped = sum(len(v) for v in self.dropped.values())
        lines = [f"read {self.source} ({self.encoding}): {self.rows_read} rows"]
        lines += [f"  skipped {n} rows: {why}" for why, n in self.skipped.items()]
        lines.append(f"  kept {self.kept}, dropped {n_dropped}")
        for why, where in self.dropped.items():
            shown = ", ".join(map(str, where[:5])) + (", ..." if len(where) > 5 else "")
            lines.append(f"    {len(where)} x {why} (line {shown})")
        if self.mojibake_repaired or self.c1_mapped or self.c1_dropped:
            lines.append(f"  text repair: {self.mojibake_repaired} mojibake sequences, {self.c1_mapped} C1 characters "
                         f"mapped via cp1252, {self.c1_dropped} dropped")
        lines += [f"  note: {n}" for n in self.notes]
        for name, (lo, hi) in self.ranges.items():
            seen = self.observed.get(name)
            lines.append(f"  score {name}: observed {seen[0]}-{seen[1]} (range {lo}-{hi})")
        fractions = "/".join(f"{f:g}" for f in self.split_fractions)
        lines.append(f"  split (seed {self.seed}, {fractions}): "
                     + ", ".join(f"{k} {v}" for k, v in self.split_sizes.items()))
        lines.append(f"wrote {self.out_dir}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- decoding

def _byte_table() -> dict[int, str]:
    """Byte 0x80-0xFF -> character as cp1252 reads it, Latin-1 where cp1252 has none."""
    table = {}
    for b in range(0x80, 0x100):
        try:
            table[b] = bytes([b]).decode("cp1252")
        except UnicodeDecodeError:
            table[b] = chr(b)
    return table


_BYTE_CHAR = _byte_table()
_CHAR_BYTE = {c: b for b, c in _BYTE_CHAR.items()}


def _char_class(lo: int, hi: int) -> str:
    return "[" + "".join(re.escape(_BYTE_CHAR[b]) for b in range(lo, hi + 1)) + "]"


_CONT = _char_class(0x80, 0xBF)
# One UTF-8 multi-byte sequence as cp1252/Latin-1 shows it: a lead byte and its continuation bytes.
# Only the lead bytes of Latin-1 symbols and letters (0xC2 "Â", 0xC3 "Ã"), of punctuation, symbols
# and the euro sign (0xE2 "â") and of emoji (0xF0 "ð"): other leads are capitals such as "É" that
# real text does put before a curly quote or an ellipsis ("CAFÉ’s"), which must stay as written.
_MOJIBAKE_RE = re.compile(f"[ÂÃ]{_CONT}|â{_CONT}{{2}}|ð{_CONT}{{3}}")
_C1_RE = re.compile("[\u0080-\u009f]")


def clean_text(text: str, repair_mojibake: bool = True) -> tuple[str, dict[str, int]]:
    """Repair mojibake, map or drop C1 control characters, NFC-normalise, "\\n" line endings.

    Returns the text and counts (``mojibake_repaired``, ``c1_mapped``, ``c1_dropped``).
    """
    counts = {"mojibake_repaired": 0, "c1_mapped": 0, "c1_dropped": 0}

    def fix(match: re.Match) -> str:
        try:
            out = bytes(_CHAR_BYTE[c] for c in match.group(0)).decode("utf-8")
        except UnicodeDecodeError:  # overlong or surrogate forms: leave the text as it is
            return match.group(0)
        counts["mojibake_repaired"] += 1
        return out

    def c1(match: re.Match) -> str:
        mapped = _BYTE_CHAR[ord(match.group(0))]
        if _C1_RE.fullmatch(mapped):
            counts["c1_dropped"] += 1
            return ""
        counts["c1_mapped"] += 1
        return mapped

    if repair_mojibake:
        text = _MOJIBAKE_RE.sub(fix, text)
    text = _C1_RE.sub(c1, text)
    return nfc(text.replace("\r\n", "\n").replace("\r", "\n")), counts


def decode_bytes(data: bytes) -> tuple[str, str]:
    """Decode as UTF-8, else cp1252, else Latin-1; returns the text and the encoding used."""
    for encoding, name in (("utf-8-sig", "utf-8"), ("cp1252", "cp1252")):
        try:
            return data.decode(encoding), name
        except UnicodeDecodeError:
            continue
    return data.decode("latin-1"), "latin-1"


# --------------------------------------------------------------------------- table reading

@dataclass
class Table:
    """A decoded, parsed table: header and rows as (first line, data row number, cells)."""

    path: Path
    header: list[str]
    rows: list[tuple[int, int, dict[str, str]]]
    encoding: str
    sha256: str


def read_table(path: str | Path, delimiter: str | None = None) -> Table:
    """Read a delimited file with a header row; ``delimiter`` defaults to tab for .tsv/.tab."""
    path = Path(path)
    data = read_input_bytes(path)
    text, encoding = decode_bytes(data)
    if delimiter is None:
        delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header: list[str] | None = None
    rows, previous_line, row_number = [], 0, 0
    try:
        for cells in reader:
            first_line, previous_line = previous_line + 1, reader.line_num
            if not any(c.strip() for c in cells):
                continue  # blank line
            if header is None:
                header = [c.strip().lstrip("\ufeff") for c in cells]
                dupes = sorted({h for h in header if header.count(h) > 1})
                if dupes:
                    raise DataError(f"{path}:{first_line}: header repeats column(s) {', '.join(map(repr, dupes))}")
                continue
            row_number += 1
            if len(cells) > len(header) and any(c.strip() for c in cells[len(header):]):
                raise DataError(f"{path}:{first_line}: row {row_number}: {len(cells)} fields, the header has "
                                f"{len(header)} (delimiter {delimiter!r}; an unbalanced quote?)")
            cells = cells + [""] * (len(header) - len(cells))
            rows.append((first_line, row_number, dict(zip(header, cells))))
    except csv.Error as err:
        raise DataError(f"{path}:{reader.line_num}: malformed table ({err})") from None
    if header is None:
        raise DataError(f"{path}: empty file (no header row)")
    # debug: the report printed at the end says it, and an input error that follows is then the only line
    logger.debug("%s: %d rows, encoding %s", path, len(rows), encoding)
    return Table(path, header, rows, encoding, hashlib.sha256(data).hexdigest())


def require_columns(table: Table, columns: Sequence[str]) -> None:
    missing = [c for c in dict.fromkeys(columns) if c not in table.header]
    if missing:
        raise DataError(f"{table.path}: missing column(s) {', '.join(map(repr, missing))} "
                        f"(header: {', '.join(table.header)})")


# --------------------------------------------------------------------------- scores

@dataclass(frozen=True)
class ScoreSpec:
    """One output rubric: the sum of ``columns`` (each within lo..hi, in the file's units) times
    ``scale``; the stored score must be a whole number."""

    name: str
    columns: tuple[str, ...]
    lo: float
    hi: float
    scale: float = 1
    description: str = ""

    @property
    def out_range(self) -> tuple[int, int]:
        n = len(self.columns)
        return round(self.lo * n * self.scale), round(self.hi * n * self.scale)

    def rubric(self) -> dict:
        lo, hi = self.out_range
        out = {"name": self.name, "min": lo, "max": hi, "description": self.description}
        if self.scale != 1:
            out["scale"] = self.scale
        return out


def original_score(score: int, scale: float) -> float:
    """Back-map a stored score to the corpus's units (ELLIPSE: ``score / 2``)."""
    return score / scale


def _where(table: Table, line: int, row: int, column: str) -> str:
    return f"{table.path}:{line}: row {row}, column '{column}'"


def _parse_value(table: Table, line: int, row: int, column: str, raw: str, spec: ScoreSpec) -> int | None:
    """A cell as a whole number of scaled units; None when missing; DataError when bad."""
    text = raw.strip()
    if text.lower() in MISSING_VALUES:
        return None
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{_where(table, line, row, column)}: score {text!r} is not a number") from None
    if not math.isfinite(value) or not spec.lo <= value <= spec.hi:
        raise DataError(f"{_where(table, line, row, column)}: score {text} outside {spec.lo:g}-{spec.hi:g}")
    scaled = value * spec.scale
    if abs(scaled - round(scaled)) > 1e-9:
        grid = "a whole number" if spec.scale == 1 else f"a multiple of {1 / spec.scale:g}"
        raise DataError(f"{_where(table, line, row, column)}: score {text} is not {grid}")
    return round(scaled)


def build_records(table: Table, rows: Sequence[tuple[int, int, dict[str, str]]], specs: Sequence[ScoreSpec], *,
                  text_col: str, id_of: Callable[[int, dict[str, str]], str],
                  prompt_of: Callable[[dict[str, str]], str], report: ConversionReport,
                  repair_mojibake: bool = True) -> list[dict]:
    """Records of the rows that have an essay and every score; the others are dropped (reported)."""
    records, seen = [], {}
    for line, row, cells in rows:
        essay, counts = clean_text(cells[text_col], repair_mojibake)
        essay = essay.strip()
        if not essay:
            report.drop("empty essay", line)
            continue
        prompt_id = prompt_of(cells).strip()
        if not prompt_id:
            report.drop("empty prompt", line)
            continue
        scores, missing = {}, None
        for spec in specs:
            values = [_parse_value(table, line, row, c, cells[c], spec) for c in spec.columns]
            if None in values:
                missing = spec.columns[values.index(None)]
                break
            scores[spec.name] = sum(values)
        if missing is not None:
            report.drop(f"missing score in '{missing}'", line)
            continue
        essay_id = id_of(row, cells).strip()
        if not essay_id:
            raise DataError(f"{table.path}:{line}: row {row}: empty id")
        if essay_id in seen:
            raise DataError(f"{table.path}:{line}: row {row}: duplicate id {essay_id!r} (first on line {seen[essay_id]})")
        seen[essay_id] = line
        for key, n in counts.items():
            setattr(report, key, getattr(report, key) + n)
        records.append({"id": essay_id, "prompt_id": prompt_id, "essay": essay, "scores": scores, "feedback": ""})
    for reason, lines in report.dropped.items():  # listed by the printed report too
        logger.debug("%s: dropped %d row(s): %s (first on line %d)", table.path, len(lines), reason, lines[0])
    return records


# --------------------------------------------------------------------------- split and write

def parse_split(text: str) -> tuple[float, float, float]:
    """``"0.7,0.15,0.15"`` (or ``"70,15,15"``) -> train/valid/test fractions summing to 1."""
    try:
        parts = [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--split expects three numbers train,valid,test, got {text!r}") from None
    if len(parts) != 3 or any(not math.isfinite(v) or v < 0 for v in parts) or not sum(parts) > 0 \
            or parts[0] == 0:
        raise ValueError(f"--split expects three non-negative numbers train,valid,test with train > 0, got {text!r}")
    total = sum(parts)
    return tuple(v / total for v in parts)  # type: ignore[return-value]


def split_records(records: Sequence[dict], fractions: Sequence[float] = DEFAULT_SPLIT,
                  seed: int = 0) -> dict[str, list[dict]]:
    """Seeded split within each prompt (so every prompt is in every split); file order kept."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(r["prompt_id"], []).append(i)
    rng = random.Random(seed)
    chosen: dict[str, list[int]] = {s: [] for s in SPLITS}
    for prompt in sorted(groups):
        idx = list(groups[prompt])
        rng.shuffle(idx)
        n_test = round(fractions[2] * len(idx))
        n_valid = round(fractions[1] * len(idx))
        chosen["test"] += idx[:n_test]
        chosen["valid"] += idx[n_test:n_test + n_valid]
        chosen["train"] += idx[n_test + n_valid:]
    return {s: [records[i] for i in sorted(chosen[s])] for s in SPLITS}


def write_dataset(out_dir: str | Path, meta: dict, records: Sequence[dict], report: ConversionReport, *,
                  fractions: Sequence[float] = DEFAULT_SPLIT, seed: int = 0, overwrite: bool = False) -> ConversionReport:
    """Split, write the folder and reload it with the project's loader; fills in the report."""
    out = Path(out_dir)
    if not records:
        raise DataError(f"{report.source}: no usable rows (read {report.rows_read}, dropped "
                        f"{sum(len(v) for v in report.dropped.values())})")
    existing = [f for f in DATASET_FILES if (out / f).exists()]
    if existing and not overwrite:
        raise DataError(f"{out}: already holds {', '.join(existing)} (pass --overwrite to replace them)")
    splits = split_records(records, fractions, seed)
    empty = [s for s, recs in splits.items() if not recs]
    if empty:
        raise DataError(f"{report.source}: split {'/'.join(f'{f:g}' for f in fractions)} of {len(records)} essays "
                        f"leaves {', '.join(empty)} empty; give more rows or a larger fraction")
    for rubric in meta["rubrics"]:
        values = [r["scores"][rubric["name"]] for r in records]
        report.ranges[rubric["name"]] = [rubric["min"], rubric["max"]]
        report.observed[rubric["name"]] = [min(values), max(values)]
    report.split_sizes = {s: len(v) for s, v in splits.items()}
    report.split_fractions = [round(f, 6) for f in fractions]
    report.seed = seed
    report.out_dir = str(out)
    out.mkdir(parents=True, exist_ok=True)
    for split, recs in splits.items():
        write_jsonl_atomic(out / f"{split}.jsonl", recs)
    write_json_atomic(out / "dataset.json", {**meta, "conversion": report.to_dict()})
    load_splits(out)  # the folder must load with the training code's own validation
    logger.info("wrote %s: %s", out, report.split_sizes)
    return report


def _new_report(table: Table) -> ConversionReport:
    return ConversionReport(source=str(table.path), sha256=table.sha256, encoding=table.encoding,
                            rows_read=len(table.rows))


# --------------------------------------------------------------------------- ASAP

def asap_specs(essay_set: int, header: Sequence[str], traits: bool = True) -> list[ScoreSpec]:
    """Rubrics of one ASAP essay set, given the file's columns (traits only when present)."""
    lo, hi = ASAP_RANGES[essay_set]
    if essay_set == 2:
        return [ScoreSpec("writing_applications", ("domain1_score",), lo, hi,
                          description="Writing applications (ideas, organisation, style, voice): domain1_score, "
                                      f"range {lo}-{hi}."),
                ScoreSpec("language_conventions", ("domain2_score",), *ASAP_DOMAIN2_RANGE,
                          description="Language conventions (grammar, usage, spelling, punctuation): domain2_score, "
                                      f"range {ASAP_DOMAIN2_RANGE[0]}-{ASAP_DOMAIN2_RANGE[1]}.")]
    specs = [ScoreSpec("holistic", ("domain1_score",), lo, hi,
                       description=f"Holistic score (domain1_score, {ASAP_HOLISTIC_TEXT[essay_set]}), "
                                   f"range {lo}-{hi}.")]
    if traits and essay_set in ASAP_TRAITS:
        (t_lo, t_hi), names = ASAP_TRAITS[essay_set]
        columns = [(f"rater1_trait{i}", f"rater2_trait{i}") for i in range(1, len(names) + 1)]
        if all(c in header for pair in columns for c in pair):
            specs += [ScoreSpec(name, pair, t_lo, t_hi,
                                description=f"Trait {ASAP_TRAIT_TEXT[name]}; rater 1 + rater 2, each {t_lo}-{t_hi}, "
                                            f"range {2 * t_lo}-{2 * t_hi}.")
                      for name, pair in zip(names, columns)]
    return specs


def _asap_set(table: Table, line: int, row: int, raw: str) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        value = None
    if value not in ASAP_RANGES:
        raise DataError(f"{_where(table, line, row, 'essay_set')}: essay set {raw.strip()!r} is not one of 1-8")
    return value


def convert_asap(path: str | Path, out_dir: str | Path, *, essay_sets: Sequence[int] | None = None, seed: int = 0,
                 fractions: Sequence[float] = DEFAULT_SPLIT, traits: bool = True, repair_mojibake: bool = True,
                 overwrite: bool = False, name: str | None = None) -> ConversionReport:
    """Convert an ASAP ``training_set_rel3.tsv``-layout file (see the module docstring)."""
    table = read_table(path, "\t")
    require_columns(table, ("essay_id", "essay_set", "essay", "domain1_score"))
    report = _new_report(table)
    by_set: dict[int, list] = {}
    for line, row, cells in table.rows:
        by_set.setdefault(_asap_set(table, line, row, cells["essay_set"]), []).append((line, row, cells))
    wanted = sorted(set(essay_sets)) if essay_sets else sorted(by_set)
    for s in wanted:
        if s not in ASAP_RANGES:
            raise DataError(f"--essay_set {s}: ASAP essay sets are 1-8")
    absent = [s for s in wanted if s not in by_set]
    if absent:
        raise DataError(f"{table.path}: no essays of set(s) {', '.join(map(str, absent))} "
                        f"(the file holds {', '.join(map(str, sorted(by_set))) or 'none'})")
    if 2 in wanted:
        require_columns(table, ("domain2_score",))
    layouts = {s: asap_specs(s, table.header, traits) for s in wanted}
    reference = [(sp.name, sp.out_range) for sp in layouts[wanted[0]]]
    for s in wanted[1:]:
        other = [(sp.name, sp.out_range) for sp in layouts[s]]
        if other != reference:
            def show(layout):
                return ", ".join(f"{n} {lo}-{hi}" for n, (lo, hi) in layout)
            raise DataError(f"{table.path}: essay sets {wanted[0]} and {s} have different rubrics ({show(reference)} "
                            f"vs {show(other)}); convert them separately with --essay_set")
    other_rows = sum(len(v) for s, v in by_set.items() if s not in wanted)
    if other_rows:
        report.skipped["other essay sets (not selected)"] = other_rows
    if traits and any(s in ASAP_TRAITS for s in wanted) and len(layouts[wanted[0]]) == 1:
        report.notes.append("no rater trait columns in the file: holistic score only")
    if any(s == 8 for s in wanted) and any(c.startswith("rater3_trait") for c in table.header):
        report.notes.append("rater3_trait* (adjudication) columns are not used")
    rows = [r for s in wanted for r in by_set[s]]
    rows.sort(key=lambda r: r[0])
    specs = layouts[wanted[0]]
    records = build_records(table, rows, specs, text_col="essay", report=report, repair_mojibake=repair_mojibake,
                            id_of=lambda row, cells: cells["essay_id"],
                            prompt_of=lambda cells: str(int(cells["essay_set"])))
    meta = {"name": name or "asap-set" + "-".join(map(str, wanted)), "language": "en",
            "source": {"corpus": "ASAP-AES (Hewlett Foundation, 2012)", "file": table.path.name, "format": "asap"},
            "prompts": [{"id": str(s), "title": f"ASAP essay set {s}", "text": ASAP_PROMPTS[s]} for s in wanted],
            "rubrics": [sp.rubric() for sp in specs]}
    return write_dataset(out_dir, meta, records, report, fractions=fractions, seed=seed, overwrite=overwrite)


# --------------------------------------------------------------------------- ELLIPSE and generic CSV

def convert_csv(path: str | Path, out_dir: str | Path, *, text_col: str, score_cols: Sequence[str],
                ranges: Sequence[tuple[float, float]], id_col: str | None = None, prompt_col: str | None = None,
                scale: float = 1, delimiter: str | None = None, seed: int = 0,
                fractions: Sequence[float] = DEFAULT_SPLIT, name: str | None = None, language: str = "en",
                prompt_text: str = "", descriptions: dict[str, str] | None = None, source_format: str = "csv",
                repair_mojibake: bool = True, overwrite: bool = False) -> ConversionReport:
    """Convert any table: one rubric per score column (see the module docstring)."""
    if len(ranges) == 1:
        ranges = list(ranges) * len(score_cols)
    if len(ranges) != len(score_cols):
        raise DataError(f"--ranges has {len(ranges)} ranges for {len(score_cols)} score columns; give 1 or "
                        f"{len(score_cols)}")
    if len(set(score_cols)) != len(score_cols):
        raise DataError(f"--score_cols repeats a column: {', '.join(score_cols)}")
    if not scale > 0:
        raise DataError(f"--scale must be > 0, got {scale:g}")
    for col, (lo, hi) in zip(score_cols, ranges):
        if lo > hi or any(abs(v * scale - round(v * scale)) > 1e-9 for v in (lo, hi)):
            raise DataError(f"range {lo:g}-{hi:g} of column '{col}' must have min <= max and be whole numbers "
                            f"after --scale {scale:g}")
        if lo < 0:  # the loader refuses it too (scores are integers >= 0; -1 marks invalid samples)
            raise DataError(f"range {lo:g}-{hi:g} of column '{col}': scores must be >= 0; shift the column "
                            f"to 0-{hi - lo:g} first")
    table = read_table(path, delimiter)
    require_columns(table, [text_col, *score_cols] + [c for c in (id_col, prompt_col) if c])
    report = _new_report(table)
    descriptions = descriptions or {}
    specs = []
    for col, (lo, hi) in zip(score_cols, ranges):
        text = descriptions.get(col) or f"Column '{col}' of {table.path.name}, range {lo:g}-{hi:g}"
        if scale != 1:
            text += f"; stored as score * {scale:g} ({round(lo * scale)}-{round(hi * scale)}), divide by {scale:g} " \
                    "for the original value"
        specs.append(ScoreSpec(col, (col,), lo, hi, scale, text + "."))
    single = name or table.path.stem
    records = build_records(table, table.rows, specs, text_col=text_col, report=report, repair_mojibake=repair_mojibake,
                            id_of=(lambda row, cells: cells[id_col]) if id_col else (lambda row, cells: f"row-{row}"),
                            prompt_of=(lambda cells: cells[prompt_col]) if prompt_col else (lambda cells: single))
    prompt_ids = list(dict.fromkeys(r["prompt_id"] for r in records))
    meta = {"name": single, "language": language,
            "source": {"file": table.path.name, "format": source_format},
            "prompts": [{"id": p, "title": p, "text": "" if prompt_col else prompt_text} for p in prompt_ids],
            "rubrics": [sp.rubric() for sp in specs]}
    return write_dataset(out_dir, meta, records, report, fractions=fractions, seed=seed, overwrite=overwrite)


def convert_ellipse(path: str | Path, out_dir: str | Path, *, seed: int = 0,
                    fractions: Sequence[float] = DEFAULT_SPLIT, name: str | None = None,
                    repair_mojibake: bool = True, overwrite: bool = False) -> ConversionReport:
    """ELLIPSE / Feedback Prize - ELL: six traits 1.0-5.0 in halves, stored as score * 2 (2-10)."""
    lo, hi = ELLIPSE_RANGE
    descriptions = {t: f"{t.capitalize()}: {text}. ELLIPSE score {lo:g}-{hi:g} in steps of 0.5, stored as score * "
                       f"{ELLIPSE_SCALE} ({round(lo * ELLIPSE_SCALE)}-{round(hi * ELLIPSE_SCALE)}); divide by "
                       f"{ELLIPSE_SCALE} for the ELLIPSE value"
                    for t, text in ELLIPSE_TRAITS.items()}
    return convert_csv(path, out_dir, text_col="full_text", score_cols=list(ELLIPSE_TRAITS), ranges=[ELLIPSE_RANGE],
                       id_col="text_id", scale=ELLIPSE_SCALE, delimiter=",", seed=seed, fractions=fractions,
                       name=name or "ellipse", prompt_text=ELLIPSE_PROMPT, descriptions=descriptions,
                       source_format="ellipse", repair_mojibake=repair_mojibake, overwrite=overwrite)


# --------------------------------------------------------------------------- CLI

def _range(text: str) -> tuple[float, float]:
    match = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*-\s*(-?\d+(?:\.\d+)?)\s*", text)
    if not match:
        raise ValueError(f"range {text!r} is not LO-HI (e.g. 1-6)")
    return float(match.group(1)), float(match.group(2))


def _list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _split_arg(text: str) -> tuple[float, float, float]:
    try:
        return parse_split(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _ranges_arg(text: str) -> list[tuple[float, float]]:
    try:
        return [_range(v) for v in text.split(",")]
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out_dir", required=True, help="dataset folder to write")
    p.add_argument("--seed", type=int, default=0, help="split seed")
    p.add_argument("--split", type=_split_arg, default=DEFAULT_SPLIT, metavar="TRAIN,VALID,TEST",
                   help="split fractions, normalised by their sum (default 0.7,0.15,0.15)")
    p.add_argument("--name", default=None, help="dataset name in dataset.json")
    p.add_argument("--no_mojibake_repair", action="store_true",
                   help="keep cp1252-read UTF-8 sequences such as 'â€™' as they are")
    p.add_argument("--overwrite", action="store_true", help="replace the dataset files in an existing --out_dir")


def add_parsers(sub) -> None:
    """Register the ``asap``, ``ellipse`` and ``csv`` subcommands on ``modules.convert``'s parser."""
    p = sub.add_parser("asap", help="ASAP training_set_rel3.tsv layout")
    p.add_argument("input", help="tab-separated ASAP file (UTF-8, cp1252 or Latin-1)")
    p.add_argument("--essay_set", type=int, nargs="+", default=None,
                   help="essay set(s) to convert (default: every set in the file; rubrics must match)")
    p.add_argument("--no_traits", action="store_true", help="holistic score only, even when trait columns exist")
    _common(p)
    p.set_defaults(func=_cmd_asap)

    p = sub.add_parser("ellipse", help="ELLIPSE / Feedback Prize - ELL CSV (six traits, 1.0-5.0 -> 2..10)")
    p.add_argument("input")
    _common(p)
    p.set_defaults(func=_cmd_ellipse)

    p = sub.add_parser("csv", help="any table with a text column and integer score columns")
    p.add_argument("input")
    p.add_argument("--text_col", required=True)
    p.add_argument("--score_cols", type=_list, required=True, help="comma-separated score columns (rubric order)")
    p.add_argument("--ranges", type=_ranges_arg, required=True,
                   help="LO-HI per score column, comma-separated, or one for all (e.g. 1-6,1-4)")
    p.add_argument("--id_col", default=None, help="id column (default: row-N)")
    p.add_argument("--prompt_col", default=None, help="prompt column (default: one prompt)")
    p.add_argument("--prompt_text", default="", help="writing prompt text when there is no --prompt_col")
    p.add_argument("--scale", type=float, default=1, help="multiply scores by this before storing (e.g. 2 for halves)")
    p.add_argument("--delimiter", default=None, help="field delimiter (default: tab for .tsv, else comma)")
    p.add_argument("--language", default="en")
    _common(p)
    p.set_defaults(func=_cmd_csv)


def _shared_kwargs(args: argparse.Namespace) -> dict:
    return dict(seed=args.seed, fractions=args.split, name=args.name, repair_mojibake=not args.no_mojibake_repair,
                overwrite=args.overwrite)


def _cmd_asap(args: argparse.Namespace) -> int:
    report = convert_asap(args.input, args.out_dir, essay_sets=args.essay_set, traits=not args.no_traits,
                          **_shared_kwargs(args))
    print(report.format())
    return 0


def _cmd_ellipse(args: argparse.Namespace) -> int:
    report = convert_ellipse(args.input, args.out_dir, **_shared_kwargs(args))
    print(report.format())
    return 0


def _cmd_csv(args: argparse.Namespace) -> int:
    delimiter = {"\\t": "\t", "tab": "\t"}.get(args.delimiter, args.delimiter)
    report = convert_csv(args.input, args.out_dir, text_col=args.text_col, score_cols=args.score_cols,
                         ranges=args.ranges, id_col=args.id_col, prompt_col=args.prompt_col, scale=args.scale,
                         delimiter=delimiter, language=args.language, prompt_text=args.prompt_text,
                         **_shared_kwargs(args))
    print(report.format())
    return 0
