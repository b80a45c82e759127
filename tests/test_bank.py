"""The sample bank (modules/bank.py): what reading a bank re-checks, and the one-line errors of a bad one."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from conftest import small_dataset
from modules.bank import read_bank, sampled_ids
from modules.data import dataset_info_for, load_split
from modules.jsonio import DataError

RANGES = [(1, 9), (0, 3)]


def write_bank(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def row(essay_id: str, *samples: dict, invalid: int = 0) -> dict:
    return {"id": essay_id, "gold": [5, 2], "samples": list(samples), "invalid": invalid}


def test_stored_scores_that_disagree_with_their_text_are_read_from_the_text(tmp_path, caplog):
    # A bank written before parsing was strict: scores read from a sloppy line, or none where the
    # line parses. The text is what the model wrote, so its strict reading counts.
    bank = write_bank(tmp_path / "samples.jsonl", [
        row("a", {"text": "3 1", "scores": [7, 0]}, {"text": "Scores: 4 2", "scores": [4, 2]},
            {"text": "6 3", "scores": [6, 3]}),
        row("b", {"text": "2 2\n", "scores": None}, invalid=1),
    ])
    with caplog.at_level(logging.WARNING, logger="modules.bank"):
        rows = read_bank(bank, RANGES)
    assert [[s["scores"] for s in r["samples"]] for r in rows] == [[[3, 1], None, [6, 3]], [[2, 2]]]
    assert [r["invalid"] for r in rows] == [1, 0]  # the count follows the re-read scores
    assert f"{bank}: 3 samples' stored scores differ" in caplog.text


def test_truncated_samples_that_carry_scores_count_as_invalid(tmp_path):
    # A line the token budget cut is not an answer, even when its prefix parses ("3 1" of "3 1 ...").
    bank = write_bank(tmp_path / "samples.jsonl", [
        row("a", {"text": "3 1", "scores": [3, 1], "truncated": True}, {"text": "4 2", "scores": [4, 2]}),
    ])
    [only] = read_bank(bank, RANGES)
    assert [s["scores"] for s in only["samples"]] == [None, [4, 2]] and only["invalid"] == 1


@pytest.mark.parametrize("scores", [[10, 1], [0, 1], [5, 4], [5], [5, 2, 2], [5.0, 2], [True, 2], "5 2"])
def test_out_of_range_or_malformed_sample_scores_are_a_one_line_error(tmp_path, scores):
    bank = write_bank(tmp_path / "samples.jsonl", [
        row("a", {"text": "3 1", "scores": [3, 1]}),
        row("b", {"text": "4 2", "scores": [4, 2]}, {"text": "5 2", "scores": scores}),
    ])
    with pytest.raises(DataError) as error:
        read_bank(bank, RANGES)
    assert str(error.value) == (f"{bank}:2: field 'samples[1].scores': expected null or 2 in-range integers, "
                                f"got {scores!r}")


def test_a_duplicate_id_inside_a_bank_names_both_lines(tmp_path):
    bank = write_bank(tmp_path / "samples.jsonl", [
        row("a", {"text": "3 1", "scores": [3, 1]}), row("b", {"text": "4 2", "scores": [4, 2]}),
        row("a", {"text": "5 2", "scores": [5, 2]}),
    ])
    with pytest.raises(DataError, match=r"^.*samples\.jsonl:3: field 'id': duplicate id 'a' \(first on line 1\)$"):
        read_bank(bank, RANGES)


def test_sampled_ids_refuses_a_bank_with_essays_outside_the_test_file(tmp_path):
    test = small_dataset(tmp_path / "data", test=3) / "test.jsonl"
    info = dataset_info_for(test)
    records = load_split(test, info)
    gold = [lo for lo, _ in info.ranges]
    line = " ".join(map(str, gold))
    run = tmp_path / "run"
    run.mkdir()
    samples = [{"text": line, "scores": gold}]
    write_bank(run / "samples.jsonl", [{"id": records[0].id, "gold": gold, "samples": samples, "invalid": 0}])
    write_bank(run / "samples.rank1.jsonl", [{"id": records[2].id, "gold": gold, "samples": samples, "invalid": 0}])
    assert sampled_ids(run, records, info, "samples.jsonl") == {records[0].id, records[2].id}
    # Resumed with --limit 2: the partial bank holds the third essay, which is not among them.
    with pytest.raises(DataError) as error:
        sampled_ids(run, records[:2], info, "samples.jsonl")
    assert str(error.value) == (f"{run / 'samples.rank1.jsonl'}: holds essays that are not among the 2 test essays "
                                f"(e.g. {records[2].id!r}); resume with the run's --limit or none")
