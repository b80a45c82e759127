"""Converters from real essay corpora (ASAP, ELLIPSE, any CSV) to the project's dataset folder
(SPEC section 3).

    python -m modules.convert asap training_set_rel3.tsv --out_dir data/asap7 --essay_set 7
    python -m modules.convert ellipse train.csv --out_dir data/ellipse
    python -m modules.convert csv essays.csv --out_dir data/mine --text_col text \\
        --score_cols content,language --ranges 1-6,1-4

All three run the same pipeline (``pipeline.py``), so they share its row policy, split and
report; this module holds what differs per corpus (columns, rubrics and their ranges) and two
helpers for callers: ``parse_split`` (the ``fractions`` argument from "70,15,15") and
``original_score`` (a stored, scaled score back in the corpus's units).

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

ELLIPSE, in either of its two layouts, told apart by the header:

* the Feedback Prize - English Language Learning competition's (``text_id``, ``full_text`` and six
  traits ``cohesion``, ``syntax``, ``vocabulary``, ``phraseology``, ``grammar``, ``conventions``):
  one prompt for every essay (the file does not say which prompt an essay answers);
* the corpus's own release (``text_id_kaggle``, ``full_text``, the traits capitalised
  ``Cohesion`` .. ``Conventions``, ``Overall``, ``prompt``, and demographic and text-statistics
  columns, which are ignored): a seventh rubric ``overall``, and ``prompt_id`` = the ``prompt``
  cell, each distinct prompt one entry of ``dataset.json``'s prompts.

Each score is 1.0-5.0 in steps of 0.5; the rubrics need integers, so each is stored as
``score * 2``, range 2-10; divide by 2 (``original_score``) to get back the ELLIPSE value. The
factor is stored as ``"scale": 2`` on each rubric in ``dataset.json``.

Generic CSV: ``--text_col``, ``--score_cols A,B`` with ``--ranges 1-6,1-4`` (one range for all or
one per column, in the file's units), ``--id_col`` (default ``row-N``, the data row number),
``--prompt_col`` (default: one prompt), ``--scale`` (scores times S must be whole numbers; the
stored range is the given range times S), ``--delimiter`` (default tab for ``.tsv``/``.tab``,
else comma).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from modules.convert.pipeline import (DEFAULT_SPLIT, ConversionReport, ScoreSpec, Table, build_records,
                                      read_table, require_columns, write_dataset)
from modules.jsonio import DataError

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
ELLIPSE_OVERALL = ("overall", "holistic proficiency of the essay as a whole")
ELLIPSE_RANGE = (1.0, 5.0)
ELLIPSE_SCALE = 2
ELLIPSE_PROMPT = "An argumentative essay by an English-language learner in grades 6-12."


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
        raise DataError(f"{table.where(line, row, 'essay_set')}: essay set {raw.strip()!r} is not one of 1-8")
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
                prompt_text: str = "", repair_mojibake: bool = True, overwrite: bool = False) -> ConversionReport:
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
    specs = []
    for col, (lo, hi) in zip(score_cols, ranges):
        text = f"Column '{col}' of {table.path.name}, range {lo:g}-{hi:g}"
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
            "source": {"file": table.path.name, "format": "csv"},
            "prompts": [{"id": p, "title": p, "text": "" if prompt_col else prompt_text} for p in prompt_ids],
            "rubrics": [sp.rubric() for sp in specs]}
    return write_dataset(out_dir, meta, records, report, fractions=fractions, seed=seed, overwrite=overwrite)


def ellipse_layout(table: Table) -> str:
    """``"release"`` when the header has the ELLIPSE release's ``text_id_kaggle``, else
    ``"competition"`` (whose columns are then required)."""
    return "release" if "text_id_kaggle" in table.header else "competition"


def ellipse_specs(layout: str) -> list[ScoreSpec]:
    """The rubrics of an ELLIPSE file: the six traits (and ``overall`` in the release layout), each
    1.0-5.0 in halves stored times ``ELLIPSE_SCALE``; the column is the trait's name in the layout."""
    lo, hi = ELLIPSE_RANGE
    traits = list(ELLIPSE_TRAITS.items()) + ([ELLIPSE_OVERALL] if layout == "release" else [])
    return [ScoreSpec(name, (name.capitalize() if layout == "release" else name,), lo, hi, ELLIPSE_SCALE,
                      f"{name.capitalize()}: {text}. ELLIPSE score {lo:g}-{hi:g} in steps of 0.5, stored as score * "
                      f"{ELLIPSE_SCALE} ({round(lo * ELLIPSE_SCALE)}-{round(hi * ELLIPSE_SCALE)}); divide by "
                      f"{ELLIPSE_SCALE} for the ELLIPSE value.")
            for name, text in traits]


def convert_ellipse(path: str | Path, out_dir: str | Path, *, seed: int = 0,
                    fractions: Sequence[float] = DEFAULT_SPLIT, name: str | None = None,
                    repair_mojibake: bool = True, overwrite: bool = False) -> ConversionReport:
    """ELLIPSE, competition or release layout (module docstring): traits 1.0-5.0 in halves, stored
    as score * 2 (2-10)."""
    table = read_table(path, ",")
    layout = ellipse_layout(table)
    specs = ellipse_specs(layout)
    id_col, prompt_col = ("text_id_kaggle", "prompt") if layout == "release" else ("text_id", None)
    require_columns(table, [id_col, "full_text", *(sp.columns[0] for sp in specs)] + ([prompt_col] if prompt_col else []))
    report = _new_report(table)
    if layout == "release":
        used = {id_col, "full_text", prompt_col, *(sp.columns[0] for sp in specs)}
        report.notes.append(f"ELLIPSE release layout: {len(table.header) - len(used)} other columns ignored")
    single = name or "ellipse"
    records = build_records(table, table.rows, specs, text_col="full_text", report=report,
                            repair_mojibake=repair_mojibake, id_of=lambda row, cells: cells[id_col],
                            prompt_of=(lambda cells: cells[prompt_col]) if prompt_col else (lambda cells: single))
    prompt_ids = list(dict.fromkeys(r["prompt_id"] for r in records))
    prompts = ([{"id": p, "title": p, "text": f"{ELLIPSE_PROMPT} Prompt: {p}."} for p in prompt_ids]
               if prompt_col else [{"id": single, "title": single, "text": ELLIPSE_PROMPT}])
    meta = {"name": single, "language": "en",
            "source": {"corpus": "ELLIPSE (Crossley et al.)", "file": table.path.name, "format": f"ellipse-{layout}"},
            "prompts": prompts, "rubrics": [sp.rubric() for sp in specs]}
    return write_dataset(out_dir, meta, records, report, fractions=fractions, seed=seed, overwrite=overwrite)


# --------------------------------------------------------------------------- helpers for callers

def original_score(score: int, scale: float) -> float:
    """Back-map a stored score to the corpus's units (ELLIPSE: ``score / 2``)."""
    return score / scale


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
