"""Converters for real corpora (modules/convert/corpora.py) on small invented fixtures, and on the
shared ASAP set-7 file when it is there."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from modules.convert import cli as convert
from modules.convert import corpora as converters
from modules.data import DataError, load_splits

REPO = Path(__file__).resolve().parents[1]
ASAP7 = Path(__file__).resolve().parents[2] / "shared" / "data" / "asap" / "asap_set7.tsv"
C1 = re.compile("[\u0080-\u009f]")

# Invented sentences; fixtures combine them so every essay differs.
SENTENCES = ("My little brother waited two hours for the bakery to open.",
             "We stood in the rain and nobody complained.",
             "The line at the fair moved slower than a snail.",
             "I learned that waiting can be a gift.",
             "Grandma taught me to plant seeds and wait for spring.",
             "At the end, the bus finally came around the corner.")

SET7_HEADER = ["essay_id", "essay_set", "essay", "rater1_domain1", "rater2_domain1", "rater3_domain1", "domain1_score"]
FULL_HEADER = (["essay_id", "essay_set", "essay", "rater1_domain1", "rater2_domain1", "rater3_domain1",
                "domain1_score", "rater1_domain2", "rater2_domain2", "domain2_score"]
               + [f"rater{r}_trait{t}" for r in (1, 2, 3) for t in range(1, 7)])


def essay(i: int) -> str:
    return f"Essay number {i}. " + " ".join(SENTENCES[(i + k) % len(SENTENCES)] for k in range(3))


def tsv(rows: list[dict], header: list[str] = SET7_HEADER) -> str:
    """Tab-separated text in the ASAP layout; cells holding tabs, newlines or quotes are quoted."""
    def cell(v) -> str:
        v = "" if v is None else str(v)
        return '"' + v.replace('"', '""') + '"' if any(c in v for c in '\t\n"') else v
    return "".join("\t".join(cell(r.get(h)) for h in header) + "\n" for r in [dict(zip(header, header)), *rows])


def set7_rows(n: int, start: int = 1) -> list[dict]:
    return [{"essay_id": 1000 + i, "essay_set": 7, "essay": essay(i), "rater1_domain1": 3 + i % 9,
             "rater2_domain1": 4 + i % 8, "domain1_score": 7 + i % 9 + i % 8} for i in range(start, start + n)]


def write(tmp_path: Path, name: str, data: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def all_records(out: Path) -> list[dict]:
    return [json.loads(line) for s in ("train", "valid", "test")
            for line in (out / f"{s}.jsonl").read_text(encoding="utf-8").splitlines()]


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


# --------------------------------------------------------------------------- ASAP


def test_asap_utf8_loads_with_project_loader(tmp_path: Path) -> None:
    src = write(tmp_path, "asap.tsv", tsv(set7_rows(40)))
    report = converters.convert_asap(src, tmp_path / "out", seed=3)
    info, splits = load_splits(tmp_path / "out")
    assert info.rubric_names == ["holistic"] and info.ranges == [(0, 30)]
    assert report.encoding == "utf-8" and report.rows_read == 40 and report.kept == 40
    assert report.split_sizes == {"train": 28, "valid": 6, "test": 6}
    assert {k: len(v) for k, v in splits.items()} == report.split_sizes
    rec = splits["train"][0]
    assert rec.prompt_id == "7" and isinstance(rec.id, str) and rec.feedback == ""
    assert "patience" in info.prompts["7"].lower()
    raw = all_records(tmp_path / "out")
    assert sorted(r["id"] for r in raw) == sorted(str(1000 + i) for i in range(1, 41))
    assert all(list(r) == ["id", "prompt_id", "essay", "scores", "feedback"] for r in raw)
    by_id = {r["id"]: r for r in raw}
    assert by_id["1005"]["scores"] == {"holistic": 7 + 5 + 5} and by_id["1005"]["essay"] == essay(5)
    meta = json.loads((tmp_path / "out" / "dataset.json").read_text(encoding="utf-8"))
    assert meta["conversion"]["split_sizes"] == report.split_sizes and meta["conversion"]["seed"] == 3


def test_asap_split_is_seeded_and_deterministic(tmp_path: Path) -> None:
    src = write(tmp_path, "asap.tsv", tsv(set7_rows(40)))
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        converters.convert_asap(src, tmp_path / name, seed=seed)
    for f in ("train.jsonl", "valid.jsonl", "test.jsonl", "dataset.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert (tmp_path / "a" / "test.jsonl").read_bytes() != (tmp_path / "c" / "test.jsonl").read_bytes()
    ids = [line.split('"')[3] for line in (tmp_path / "a" / "train.jsonl").read_text().splitlines()]
    assert ids == sorted(ids, key=int)  # each split keeps file order


def test_asap_split_fractions(tmp_path: Path) -> None:
    src = write(tmp_path, "asap.tsv", tsv(set7_rows(40)))
    report = converters.convert_asap(src, tmp_path / "out", fractions=converters.parse_split("60,20,20"))
    assert report.split_sizes == {"train": 24, "valid": 8, "test": 8}
    with pytest.raises(ValueError):
        converters.parse_split("0.7,0.3")
    with pytest.raises(DataError, match="leaves valid, test empty"):
        converters.convert_asap(src, tmp_path / "o2", fractions=(1.0, 0.0, 0.0))


def test_asap_cp1252_bytes(tmp_path: Path) -> None:
    text = tsv(set7_rows(12)).replace("Essay number 3.", "Essay number 3. I didn\u2019t wait \u2013 caf\u00e9 \u20ac5.")
    src = write(tmp_path, "asap.tsv", text.encode("cp1252"))
    assert b"\x92" in src.read_bytes()
    report = converters.convert_asap(src, tmp_path / "out")
    assert report.encoding == "cp1252"
    rec = next(r for r in all_records(tmp_path / "out") if r["id"] == "1003")
    assert "didn\u2019t wait \u2013 caf\u00e9 \u20ac5." in rec["essay"]
    assert not any(C1.search(r["essay"]) for r in all_records(tmp_path / "out"))


def test_asap_latin1_fallback_maps_and_drops_c1(tmp_path: Path) -> None:
    data = tsv(set7_rows(12)).encode("latin-1")
    # 0x81 is undefined in cp1252, so strict cp1252 fails and Latin-1 is used; 0x92 and 0x85 are
    # then C1 characters that cp1252 maps (right quote, ellipsis); 0x81 and 0x9D have no mapping.
    data = data.replace(b"Essay number 4.", b"Essay number 4. It wasn\x92t over\x85 na\xefve \x81end\x9d.")
    src = write(tmp_path, "asap.tsv", data)
    report = converters.convert_asap(src, tmp_path / "out")
    assert report.encoding == "latin-1"
    assert (report.c1_mapped, report.c1_dropped) == (2, 2)
    rec = next(r for r in all_records(tmp_path / "out") if r["id"] == "1004")
    assert "It wasn\u2019t over\u2026 na\u00efve end." in rec["essay"]
    for r in all_records(tmp_path / "out"):
        assert not C1.search(r["essay"])


def test_asap_mojibake_repaired_unless_disabled(tmp_path: Path) -> None:
    # UTF-8 text whose quotes were once read as cp1252: "â€™" (U+2019) and "â€\x9d" (U+201D, whose
    # last byte cp1252 leaves undefined, so it survives as a C1 character), "Â½" (U+00BD).
    bad = "He said \u00e2\u20ac\u0153wait\u00e2\u20ac\x9d and didn\u00e2\u20ac\u2122t; 2 \u00c2\u00bd hours. CAF\u00c9\u2019s."
    src = write(tmp_path, "asap.tsv", tsv(set7_rows(12)).replace("Essay number 2.", "Essay number 2. " + bad))
    report = converters.convert_asap(src, tmp_path / "out")
    rec = next(r for r in all_records(tmp_path / "out") if r["id"] == "1002")
    assert "He said \u201cwait\u201d and didn\u2019t; 2 \u00bd hours. CAF\u00c9\u2019s." in rec["essay"]
    assert report.mojibake_repaired == 4 and report.encoding == "utf-8"
    converters.convert_asap(src, tmp_path / "raw", repair_mojibake=False)
    rec = next(r for r in all_records(tmp_path / "raw") if r["id"] == "1002")
    assert "didn\u00e2\u20ac\u2122t" in rec["essay"] and not C1.search(rec["essay"])


def test_asap_multiline_quoted_essay_keeps_line_numbers(tmp_path: Path) -> None:
    rows = set7_rows(12)
    rows[1]["essay"] = 'First paragraph with a\ttab and "quotes".\n\nSecond paragraph.'
    rows[5]["domain1_score"] = 31
    src = write(tmp_path, "asap.tsv", tsv(rows))
    with pytest.raises(DataError) as excinfo:
        converters.convert_asap(src, tmp_path / "out")
    # header on line 1, rows 1-5 on lines 2-8 (row 2 spans three lines), row 6 on line 9
    assert one_line_error(excinfo) == f"{src}:9: row 6, column 'domain1_score': score 31 outside 0-30"
    rows[5]["domain1_score"] = 12
    converters.convert_asap(write(tmp_path, "ok.tsv", tsv(rows)), tmp_path / "out")
    rec = next(r for r in all_records(tmp_path / "out") if r["id"] == "1002")
    assert rec["essay"] == 'First paragraph with a\ttab and "quotes".\n\nSecond paragraph.'


def test_asap_set7_traits(tmp_path: Path) -> None:
    rows = set7_rows(20)
    for i, r in enumerate(rows):
        r.update({f"rater1_trait{t}": (i + t) % 4 for t in range(1, 5)})
        r.update({f"rater2_trait{t}": (i + 2 * t) % 4 for t in range(1, 5)})
    src = write(tmp_path, "asap.tsv", tsv(rows, FULL_HEADER))
    report = converters.convert_asap(src, tmp_path / "out")
    info, _ = load_splits(tmp_path / "out")
    assert info.rubric_names == ["holistic", "ideas", "organization", "style", "conventions"]
    assert info.ranges == [(0, 30)] + [(0, 6)] * 4
    assert report.ranges["style"] == [0, 6]
    rec = next(r for r in all_records(tmp_path / "out") if r["id"] == "1003")
    i = 2  # rows[2] is essay 1003
    assert rec["scores"]["style"] == (i + 3) % 4 + (i + 6) % 4
    assert "rater 1 + rater 2" in info.rubrics[1].description
    converters.convert_asap(src, tmp_path / "holistic", traits=False)
    assert load_splits(tmp_path / "holistic")[0].rubric_names == ["holistic"]


def test_asap_set8_traits_and_missing_trait_dropped(tmp_path: Path) -> None:
    rows = []
    for i in range(20):
        r = {"essay_id": 2000 + i, "essay_set": 8, "essay": essay(i), "domain1_score": 10 + 2 * i}
        r.update({f"rater{k}_trait{t}": 1 + (i + t + k) % 6 for k in (1, 2) for t in range(1, 7)})
        rows.append(r)
    rows[4]["rater2_trait5"] = ""
    src = write(tmp_path, "asap.tsv", tsv(rows, FULL_HEADER))
    report = converters.convert_asap(src, tmp_path / "out")
    info, _ = load_splits(tmp_path / "out")
    assert info.rubric_names == ["holistic", "ideas_and_content", "organization", "voice", "word_choice",
                                 "sentence_fluency", "conventions"]
    assert info.ranges == [(0, 60)] + [(2, 12)] * 6
    assert report.dropped == {"missing score in 'rater2_trait5'": [6]}
    assert report.kept == 19
    assert any("rater3_trait" in n for n in report.notes)


def test_asap_set2_two_domains(tmp_path: Path) -> None:
    rows = [{"essay_id": 3000 + i, "essay_set": 2, "essay": essay(i), "domain1_score": 1 + i % 6,
             "domain2_score": 1 + i % 4} for i in range(20)]
    src = write(tmp_path, "asap.tsv", tsv(rows, FULL_HEADER))
    converters.convert_asap(src, tmp_path / "out")
    info, splits = load_splits(tmp_path / "out")
    assert info.rubric_names == ["writing_applications", "language_conventions"]
    assert info.ranges == [(1, 6), (1, 4)]
    rec = next(r for r in all_records(tmp_path / "out") if r["id"] == "3007")
    assert rec["scores"] == {"writing_applications": 2, "language_conventions": 4}
    rows[3]["domain2_score"] = 5
    with pytest.raises(DataError) as excinfo:
        converters.convert_asap(write(tmp_path, "bad.tsv", tsv(rows, FULL_HEADER)), tmp_path / "bad")
    assert one_line_error(excinfo).endswith("row 4, column 'domain2_score': score 5 outside 1-4")


def _sets_rows(sets: dict[int, int]) -> list[dict]:
    rows, i = [], 0
    for s, n in sets.items():
        lo, hi = converters.ASAP_RANGES[s]
        for _ in range(n):
            rows.append({"essay_id": 5000 + i, "essay_set": s, "essay": essay(i), "domain1_score": lo + i % (hi - lo + 1),
                         "domain2_score": 1 + i % 4})
            i += 1
    return rows


def test_asap_several_sets(tmp_path: Path) -> None:
    src = write(tmp_path, "asap.tsv", tsv(_sets_rows({3: 20, 4: 20, 1: 10}), FULL_HEADER))
    report = converters.convert_asap(src, tmp_path / "out", essay_sets=[3, 4])
    info, splits = load_splits(tmp_path / "out")
    assert set(info.prompts) == {"3", "4"} and info.ranges == [(0, 3)]
    for recs in splits.values():  # the split is made within each set
        assert {r.prompt_id for r in recs} == {"3", "4"}
    assert report.split_sizes == {"train": 28, "valid": 6, "test": 6}
    assert report.skipped == {"other essay sets (not selected)": 10}
    assert "skipped 10 rows" in report.format()
    # all sets in the file: 1 (2-12) and 3/4 (0-3) have different rubrics
    with pytest.raises(DataError) as excinfo:
        converters.convert_asap(src, tmp_path / "mixed")
    msg = one_line_error(excinfo)
    assert "essay sets 1 and 3 have different rubrics" in msg and "--essay_set" in msg
    with pytest.raises(DataError, match=r"no essays of set\(s\) 6"):
        converters.convert_asap(src, tmp_path / "absent", essay_sets=[6])


def test_asap_drops_are_reported(tmp_path: Path) -> None:
    rows = set7_rows(30)
    rows[2]["essay"] = "   "
    rows[6]["domain1_score"] = ""
    rows[7]["domain1_score"] = "NA"
    src = write(tmp_path, "asap.tsv", tsv(rows))
    report = converters.convert_asap(src, tmp_path / "out")
    assert report.rows_read == 30 and report.kept == 27
    assert report.dropped == {"empty essay": [4], "missing score in 'domain1_score'": [8, 9]}
    text = report.format()
    assert "kept 27, dropped 3" in text and "1 x empty essay (line 4)" in text
    assert "2 x missing score in 'domain1_score' (line 8, 9)" in text
    assert "score holistic: observed" in text and "(range 0-30)" in text


@pytest.mark.parametrize("change, expected", [
    ({"domain1_score": "seven"}, "row 3, column 'domain1_score': score 'seven' is not a number"),
    ({"domain1_score": "7.5"}, "row 3, column 'domain1_score': score 7.5 is not a whole number"),
    ({"domain1_score": "-1"}, "row 3, column 'domain1_score': score -1 outside 0-30"),
    ({"essay_set": "9"}, "row 3, column 'essay_set': essay set '9' is not one of 1-8"),
    ({"essay_id": "1001"}, "row 3: duplicate id '1001' (first on line 2)"),
    ({"essay_id": ""}, "row 3: empty id"),
])
def test_asap_bad_values_are_one_line_errors(tmp_path: Path, change: dict, expected: str) -> None:
    rows = set7_rows(12)
    rows[2].update(change)
    src = write(tmp_path, "asap.tsv", tsv(rows))
    with pytest.raises(DataError) as excinfo:
        converters.convert_asap(src, tmp_path / "out")
    assert one_line_error(excinfo).startswith(f"{src}:4: ") and one_line_error(excinfo).endswith(expected)
    assert not (tmp_path / "out").exists()  # nothing is written on error


def test_asap_missing_columns_and_file(tmp_path: Path) -> None:
    header = [h for h in SET7_HEADER if h not in ("essay", "domain1_score")]
    src = write(tmp_path, "asap.tsv", tsv(set7_rows(5), header))
    with pytest.raises(DataError) as excinfo:
        converters.convert_asap(src, tmp_path / "out")
    assert one_line_error(excinfo).startswith(f"{src}: missing column(s) 'essay', 'domain1_score'")
    with pytest.raises(DataError, match="file not found"):
        converters.convert_asap(tmp_path / "nope.tsv", tmp_path / "out")
    set2 = write(tmp_path, "set2.tsv", tsv(_sets_rows({2: 10}), SET7_HEADER))
    with pytest.raises(DataError, match="missing column\\(s\\) 'domain2_score'"):
        converters.convert_asap(set2, tmp_path / "out")


def test_existing_dataset_folder_needs_overwrite(tmp_path: Path) -> None:
    src = write(tmp_path, "asap.tsv", tsv(set7_rows(20)))
    converters.convert_asap(src, tmp_path / "out")
    with pytest.raises(DataError, match="already holds train.jsonl"):
        converters.convert_asap(src, tmp_path / "out", seed=5)
    converters.convert_asap(src, tmp_path / "out", seed=5, overwrite=True)
    assert json.loads((tmp_path / "out" / "dataset.json").read_text())["conversion"]["seed"] == 5


# --------------------------------------------------------------------------- ELLIPSE

ELLIPSE_HEADER = ["text_id", "full_text", "cohesion", "syntax", "vocabulary", "phraseology", "grammar", "conventions"]


def ellipse_csv(n: int, tweak: dict[int, dict] | None = None) -> str:
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(ELLIPSE_HEADER)
    for i in range(n):
        row = {"text_id": f"T{i:04d}", "full_text": essay(i) + "\nA second line, with a comma.",
               **{t: f"{1 + ((i + k) % 9) * 0.5:.1f}" for k, t in enumerate(ELLIPSE_HEADER[2:])}}
        row.update((tweak or {}).get(i, {}))
        w.writerow([row[h] for h in ELLIPSE_HEADER])
    return buf.getvalue()


def test_ellipse_maps_halves_to_integers(tmp_path: Path) -> None:
    src = write(tmp_path, "train.csv", ellipse_csv(20, {3: {"grammar": ""}}))
    report = converters.convert_ellipse(src, tmp_path / "out", seed=1)
    info, splits = load_splits(tmp_path / "out")
    assert info.rubric_names == list(converters.ELLIPSE_TRAITS)
    assert info.ranges == [(2, 10)] * 6
    assert report.dropped == {"missing score in 'grammar'": [8]}  # row 4 starts on line 8 (two lines per row)
    rec = next(r for r in all_records(tmp_path / "out") if r["id"] == "T0005")
    # row 5: trait k has 1 + ((5 + k) % 9) * 0.5 -> stored as twice that
    assert [rec["scores"][t] for t in info.rubric_names] == [2 + (5 + k) % 9 for k in range(6)]
    assert [converters.original_score(v, 2) for v in rec["scores"].values()] == \
        [1 + ((5 + k) % 9) * 0.5 for k in range(6)]
    meta = json.loads((tmp_path / "out" / "dataset.json").read_text())
    for rb in meta["rubrics"]:
        assert rb["scale"] == 2 and "divide by 2" in rb["description"] and "1-5 in steps of 0.5" in rb["description"]
    assert rec["essay"].endswith("\nA second line, with a comma.") and rec["feedback"] == ""
    assert sum(len(v) for v in splits.values()) == 19
    assert info.prompts == {"ellipse": converters.ELLIPSE_PROMPT}  # the competition file names no prompt
    assert meta["source"]["format"] == "ellipse-competition" and not report.notes


@pytest.mark.parametrize("value, expected", [("2.3", "score 2.3 is not a multiple of 0.5"),
                                             ("5.5", "score 5.5 outside 1-5"),
                                             ("0.5", "score 0.5 outside 1-5")])
def test_ellipse_bad_scores(tmp_path: Path, value: str, expected: str) -> None:
    src = write(tmp_path, "train.csv", ellipse_csv(10, {2: {"syntax": value}}))
    with pytest.raises(DataError) as excinfo:
        converters.convert_ellipse(src, tmp_path / "out")
    assert one_line_error(excinfo) == f"{src}:6: row 3, column 'syntax': {expected}"


def test_ellipse_missing_trait_column(tmp_path: Path) -> None:
    text = ellipse_csv(5).replace("phraseology", "phrasing", 1)
    with pytest.raises(DataError) as excinfo:
        converters.convert_ellipse(write(tmp_path, "train.csv", text), tmp_path / "out")
    assert "missing column(s) 'phraseology'" in one_line_error(excinfo)


RELEASE_HEADER = ["text_id_kaggle", "full_text", "Overall", "Cohesion", "Syntax", "Vocabulary", "Phraseology",
                  "Grammar", "Conventions", "prompt", "gender", "grade", "race_ethnicity", "num_words"]
RELEASE_PROMPTS = ("Distance learning", "Summer projects", "Cell phones at school")


def ellipse_release_csv(n: int, tweak: dict[int, dict] | None = None) -> str:
    """The ELLIPSE release layout: capitalised traits, Overall, prompt, demographics, text statistics."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(RELEASE_HEADER)
    for i in range(n):
        row = {"text_id_kaggle": f"K{i:04d}", "full_text": essay(i), "prompt": RELEASE_PROMPTS[i % 3],
               "gender": "F" if i % 2 else "M", "grade": 8 + i % 5, "race_ethnicity": "Hispanic/Latino",
               "num_words": len(essay(i).split()),
               **{t: f"{1 + ((i + k) % 9) * 0.5:.1f}" for k, t in enumerate(RELEASE_HEADER[2:9])}}
        row.update((tweak or {}).get(i, {}))
        w.writerow([row[h] for h in RELEASE_HEADER])
    return buf.getvalue()


def test_ellipse_release_layout(tmp_path: Path) -> None:
    src = write(tmp_path, "ellipse_release.csv", ellipse_release_csv(30))
    report = converters.convert_ellipse(src, tmp_path / "out", seed=1)
    info, splits = load_splits(tmp_path / "out")
    assert info.rubric_names == [*converters.ELLIPSE_TRAITS, "overall"]
    assert info.ranges == [(2, 10)] * 7
    assert info.prompts == {p: f"{converters.ELLIPSE_PROMPT} Prompt: {p}." for p in RELEASE_PROMPTS}
    raw = all_records(tmp_path / "out")
    assert all(list(r) == ["id", "prompt_id", "essay", "scores", "feedback"] for r in raw)  # demographics ignored
    rec = next(r for r in raw if r["id"] == "K0007")
    # row 7: column k of Overall, Cohesion, ... holds 1 + ((7 + k) % 9) * 0.5, stored doubled
    stored = {name: 2 + (7 + k) % 9 for k, name in enumerate(["overall", *converters.ELLIPSE_TRAITS])}
    assert rec["scores"] == {name: stored[name] for name in info.rubric_names}
    assert rec["prompt_id"] == "Summer projects" and rec["essay"] == essay(7)
    assert {r.prompt_id for r in splits["test"]} == set(RELEASE_PROMPTS)  # split within each prompt
    meta = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert meta["source"]["format"] == "ellipse-release" and all(rb["scale"] == 2 for rb in meta["rubrics"])
    assert report.notes == ["ELLIPSE release layout: 4 other columns ignored"]


@pytest.mark.parametrize("change, expected", [
    ({"Overall": "5.5"}, "row 3, column 'Overall': score 5.5 outside 1-5"),
    ({"Grammar": "2.25"}, "row 3, column 'Grammar': score 2.25 is not a multiple of 0.5"),
    ({"Cohesion": "good"}, "row 3, column 'Cohesion': score 'good' is not a number"),
    ({"text_id_kaggle": "K0000"}, "row 3: duplicate id 'K0000' (first on line 2)"),
])
def test_ellipse_release_bad_rows_are_one_line_errors(tmp_path: Path, change: dict, expected: str) -> None:
    src = write(tmp_path, "release.csv", ellipse_release_csv(10, {2: change}))
    with pytest.raises(DataError) as excinfo:
        converters.convert_ellipse(src, tmp_path / "out")
    assert one_line_error(excinfo) == f"{src}:4: {expected}"
    assert not (tmp_path / "out").exists()


def test_ellipse_release_empty_prompt_dropped_and_missing_columns(tmp_path: Path) -> None:
    src = write(tmp_path, "release.csv", ellipse_release_csv(20, {4: {"prompt": " "}}))
    report = converters.convert_ellipse(src, tmp_path / "out")
    assert report.dropped == {"empty prompt": [6]} and report.kept == 19
    text = ellipse_release_csv(5).replace(",prompt,", ",topic,", 1).replace("Overall", "overall_score", 1)
    with pytest.raises(DataError) as excinfo:
        converters.convert_ellipse(write(tmp_path, "cols.csv", text), tmp_path / "o2")
    assert one_line_error(excinfo).startswith(f"{tmp_path / 'cols.csv'}: missing column(s) 'Overall', 'prompt'")


# --------------------------------------------------------------------------- generic CSV


def generic_rows(n: int) -> list[str]:
    return [f"e{i};{'alpha' if i % 2 else 'beta'};\"{essay(i)}\";{1 + i % 6};{1 + i % 4}" for i in range(n)]


def test_generic_csv(tmp_path: Path) -> None:
    src = write(tmp_path, "mine.csv", "\n".join(["key;topic;text;content;language", *generic_rows(40)]) + "\n")
    report = converters.convert_csv(src, tmp_path / "out", text_col="text", score_cols=["content", "language"],
                                    ranges=[(1, 6), (1, 4)], id_col="key", prompt_col="topic", delimiter=";", seed=2)
    info, splits = load_splits(tmp_path / "out")
    assert info.rubric_names == ["content", "language"] and info.ranges == [(1, 6), (1, 4)]
    assert set(info.prompts) == {"alpha", "beta"}
    assert report.observed == {"content": [1, 6], "language": [1, 4]}
    assert {r.prompt_id for r in splits["test"]} == {"alpha", "beta"}
    rec = next(r for r in all_records(tmp_path / "out") if r["id"] == "e9")
    assert rec == {"id": "e9", "prompt_id": "alpha", "essay": essay(9), "scores": {"content": 4, "language": 2},
                   "feedback": ""}


def test_generic_csv_defaults_and_one_range(tmp_path: Path) -> None:
    src = write(tmp_path, "mine.csv", "text,a,b\n" + "".join(f"\"{essay(i)}\",{i % 5},{4 - i % 5}.0\n"
                                                             for i in range(20)))
    converters.convert_csv(src, tmp_path / "out", text_col="text", score_cols=["a", "b"], ranges=[(0, 4)],
                           prompt_text="Describe a time you waited.")
    info, splits = load_splits(tmp_path / "out")
    assert info.ranges == [(0, 4), (0, 4)] and info.prompts == {"mine": "Describe a time you waited."}
    assert sorted(r.id for recs in splits.values() for r in recs) == sorted(f"row-{i}" for i in range(1, 21))


def test_generic_csv_errors(tmp_path: Path) -> None:
    src = write(tmp_path, "mine.csv", "text,a\n\"one essay\",3\n\"two essay\",9\n")
    with pytest.raises(DataError) as excinfo:
        converters.convert_csv(src, tmp_path / "out", text_col="text", score_cols=["a"], ranges=[(1, 6)])
    assert one_line_error(excinfo) == f"{src}:3: row 2, column 'a': score 9 outside 1-6"
    with pytest.raises(DataError, match="2 ranges for 1 score columns"):
        converters.convert_csv(src, tmp_path / "out", text_col="text", score_cols=["a"], ranges=[(1, 6), (1, 6)])
    with pytest.raises(DataError) as excinfo:
        converters.convert_csv(src, tmp_path / "out", text_col="body", score_cols=["a", "z"], ranges=[(1, 9)])
    assert one_line_error(excinfo).startswith(f"{src}: missing column(s) 'body', 'z'")
    with pytest.raises(DataError) as excinfo:  # -1 is the sample bank's invalid marker
        converters.convert_csv(src, tmp_path / "out", text_col="text", score_cols=["a"], ranges=[(-1, 9)])
    assert one_line_error(excinfo) == "range -1-9 of column 'a': scores must be >= 0; shift the column to 0-10 first"
    assert not (tmp_path / "out").exists()
    ragged = write(tmp_path, "ragged.csv", "text,a\n\"one\",3,extra\n")
    with pytest.raises(DataError, match=r"ragged.csv:2: row 1: 3 fields, the header has 2"):
        converters.convert_csv(ragged, tmp_path / "out", text_col="text", score_cols=["a"], ranges=[(1, 6)])


# --------------------------------------------------------------------------- CLI


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "modules.convert", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_asap_prints_report_and_errors(tmp_path: Path) -> None:
    rows = set7_rows(30)
    rows[0]["essay"] = ""
    src = write(tmp_path, "asap.tsv", tsv(rows))
    done = _run_cli("asap", str(src), "--out_dir", str(tmp_path / "out"), "--seed", "4", "--split", "0.8,0.1,0.1")
    assert done.returncode == 0, done.stderr
    assert f"read {src} (utf-8): 30 rows" in done.stdout
    assert "kept 29, dropped 1" in done.stdout and "1 x empty essay (line 2)" in done.stdout
    assert "split (seed 4, 0.8/0.1/0.1): train 23, valid 3, test 3" in done.stdout
    assert load_splits(tmp_path / "out")[0].rubric_names == ["holistic"]

    rows[4]["domain1_score"] = 40
    bad = _run_cli("asap", str(write(tmp_path, "bad.tsv", tsv(rows))), "--out_dir", str(tmp_path / "bad"))
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.splitlines()[-1] == f"error: {tmp_path / 'bad.tsv'}:6: row 5, column 'domain1_score': score 40 outside 0-30"
    assert "Traceback" not in bad.stderr


def test_cli_csv_and_ellipse(tmp_path: Path, capsys) -> None:
    src = write(tmp_path, "mine.tsv", "id\ttext\tscore\n" + "".join(f"x{i}\t{essay(i)}\t{i % 3}\n" for i in range(20)))
    done = _run_cli("csv", str(src), "--out_dir", str(tmp_path / "out"), "--text_col", "text", "--score_cols", "score",
                    "--ranges", "0-2", "--id_col", "id")
    assert done.returncode == 0, done.stderr
    assert "score score: observed 0-2 (range 0-2)" in done.stdout
    el = _run_cli("ellipse", str(write(tmp_path, "e.csv", ellipse_csv(20))), "--out_dir", str(tmp_path / "el"))
    assert el.returncode == 0, el.stderr
    assert "score cohesion: observed 2-10 (range 2-10)" in el.stdout
    release = _run_cli("ellipse", str(write(tmp_path, "r.csv", ellipse_release_csv(20))), "--out_dir", str(tmp_path / "rel"))
    assert release.returncode == 0, release.stderr
    assert "score overall: observed 2-10 (range 2-10)" in release.stdout
    bad = _run_cli("ellipse", str(write(tmp_path, "b.csv", ellipse_release_csv(8, {1: {"Syntax": "7"}}))),
                   "--out_dir", str(tmp_path / "bad"))
    assert bad.returncode == 2 and bad.stderr.splitlines()[-1] == \
        f"error: {tmp_path / 'b.csv'}:3: row 2, column 'Syntax': score 7 outside 1-5"
    parse = convert.build_parser()
    with pytest.raises(SystemExit) as exit_info:
        parse.parse_args(["csv", "f.csv", "--out_dir", "o", "--text_col", "t", "--score_cols", "a", "--ranges", "1..6"])
    assert exit_info.value.code == 2
    # One line, not argparse's usage block first (modules.cli.ArgumentParser).
    assert capsys.readouterr().err == ("error: argument --ranges: range '1..6' is not LO-HI (e.g. 1-6) "
                                       "(see python -m modules.convert csv --help)\n")


# --------------------------------------------------------------------------- the shared ASAP file


def test_shared_asap_set7(tmp_path: Path) -> None:
    if not ASAP7.is_file():
        pytest.skip(f"{ASAP7} not present (shared data is not part of a fresh clone)")
    report = converters.convert_asap(ASAP7, tmp_path / "asap7", seed=0)
    assert report.rows_read == 1569 and report.kept == 1569 and not report.dropped
    assert report.ranges == {"holistic": [0, 30]}
    lo, hi = report.observed["holistic"]
    assert 0 <= lo <= hi <= 30
    assert report.split_sizes == {"train": 1099, "valid": 235, "test": 235}
    info, splits = load_splits(tmp_path / "asap7")
    assert info.ranges == [(0, 30)] and {k: len(v) for k, v in splits.items()} == report.split_sizes
    assert {r.prompt_id for recs in splits.values() for r in recs} == {"7"}
    for recs in splits.values():
        for r in recs:
            assert not C1.search(r.essay) and "\u00e2\u20ac" not in r.essay
