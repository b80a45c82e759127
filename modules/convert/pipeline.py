"""The pipeline every real-corpus converter runs (``corpora.py``): table in, dataset folder out.

Decode the file (``text.py``) -> parse the table with the ``csv`` module -> check the required
columns -> turn each row into a record or drop it with a reason -> seeded train/valid/test split
-> write ``{train,valid,test}.jsonl`` and ``dataset.json`` atomically -> reload the folder with
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

Split: records are grouped by prompt; within each prompt a ``random.Random(seed)`` shuffle gives
round(f_test * n) test and round(f_valid * n) valid essays, the rest train; each split keeps file
order. The fractions (``--split 0.7,0.15,0.15``, normalised by their sum) and the seed are written
into ``dataset.json`` with the rest of the report.
"""
from __future__ import annotations

import csv
import hashlib
import io
import logging
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from modules.convert.text import clean_text, decode_bytes
from modules.data import SPLITS, load_splits
from modules.jsonio import DataError, read_input_bytes, write_json_atomic, write_jsonl_atomic

logger = logging.getLogger(__name__)

DEFAULT_SPLIT = (0.7, 0.15, 0.15)
MISSING_VALUES = frozenset({"", "na", "n/a", "nan", "null", "none"})
DATASET_FILES = tuple(f"{s}.jsonl" for s in SPLITS) + ("dataset.json",)


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


# --------------------------------------------------------------------------- table reading

@dataclass
class Table:
    """A decoded, parsed table: header and rows as (first line, data row number, cells)."""

    path: Path
    header: list[str]
    rows: list[tuple[int, int, dict[str, str]]]
    encoding: str
    sha256: str

    def where(self, line: int, row: int, column: str) -> str:
        """``file:line: row N, column 'C'``: how an error names a cell."""
        return f"{self.path}:{line}: row {row}, column '{column}'"


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


def _parse_value(table: Table, line: int, row: int, column: str, raw: str, spec: ScoreSpec) -> int | None:
    """A cell as a whole number of scaled units; None when missing; DataError when bad."""
    text = raw.strip()
    if text.lower() in MISSING_VALUES:
        return None
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{table.where(line, row, column)}: score {text!r} is not a number") from None
    if not math.isfinite(value) or not spec.lo <= value <= spec.hi:
        raise DataError(f"{table.where(line, row, column)}: score {text} outside {spec.lo:g}-{spec.hi:g}")
    scaled = value * spec.scale
    if abs(scaled - round(scaled)) > 1e-9:
        grid = "a whole number" if spec.scale == 1 else f"a multiple of {1 / spec.scale:g}"
        raise DataError(f"{table.where(line, row, column)}: score {text} is not {grid}")
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
