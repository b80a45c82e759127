"""main_pipeline.py --score_path end to end on tiny-random-llama: a trained run scores essays that
have no gold scores, without training, into a new run folder, prompting exactly as in training."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli_env, small_dataset

ROOT = Path(__file__).resolve().parents[1]
TRAIN_FLAGS = ["--base_model_name", "tiny-random-llama", "--mtl", "--per_device_train_batch_size", "2",
               "--gradient_accumulation_steps", "1", "--logging_steps", "1", "--eval_steps", "2",
               "--max_seq_length", "384", "--no_wandb"]
UNGRADED = (0, 2)  # the test essays whose scores are stripped


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "main_pipeline.py"), *args], cwd=ROOT,
                          env=cli_env(WANDB_MODE="disabled"), capture_output=True, text=True, timeout=600)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(run folder, data folder) of a two-step training run that scored its 4 test essays."""
    root = tmp_path_factory.mktemp("score_new")
    data = small_dataset(root / "data", train=8, valid=4, test=4)
    run_dir = root / "run"
    result = run_cli(*TRAIN_FLAGS, "--data_dir", str(data), "--output_dir", str(run_dir), "--max_steps", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, data


@pytest.fixture(scope="module")
def ungraded_file(trained, tmp_path_factory) -> Path:
    """The test essays in a folder of their own (no dataset.json there), two of them without scores."""
    _, data = trained
    records = read_jsonl(data / "test.jsonl")
    for i in UNGRADED:
        del records[i]["scores"]
    path = tmp_path_factory.mktemp("essays") / "new_essays.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_scores_ungraded_essays_as_the_training_run_scored_them(trained, ungraded_file, tmp_path):
    run_dir, data = trained
    adapter_before, essays_before = snapshot(run_dir), ungraded_file.read_bytes()
    out = tmp_path / "scored"
    result = run_cli("--base_model_name", "tiny-random-llama", "--adapter_dir", str(run_dir),
                     "--score_path", str(ungraded_file), "--output_dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "scored 4 essays (2 with gold scores" in result.stdout

    rows = read_jsonl(out / "predictions.jsonl")
    trained_rows = read_jsonl(run_dir / "predictions.jsonl")
    assert [r["id"] for r in rows] == [r["id"] for r in trained_rows]
    for i, (row, before) in enumerate(zip(rows, trained_rows)):
        # The same adapter and the same prompts (the run's mtl, format and essay budget, read from its
        # manifest): the training run's own test predictions, whether the essay has gold or not.
        assert row["gold"] == (None if i in UNGRADED else before["gold"])
        assert row["greedy"] == before["greedy"] and row["text"] == before["text"]
        assert row["weighted"] == before["weighted"]
        assert row["weighted_expected"] == pytest.approx(before["weighted_expected"], abs=1e-5)
        for name, probs in row["probabilities"].items():
            assert sum(probs) == pytest.approx(1.0, abs=1e-5) and len(probs) == 9  # rubrics 1-9
        confidence = row["confidence"]["essay"]
        assert confidence["length"] == len(json.loads(ungraded_file.read_text().splitlines()[i])["essay"].split())
        assert set(row["confidence"]["per_rubric"]) == set(row["probabilities"])
    assert not (out / "evaluation_results.json").exists()  # QWK needs every essay's gold
    manifest = json.loads((out / "run_manifest.json").read_text())
    assert manifest["mode"] == "score" and manifest["n_essays"] == 4 and manifest["n_with_gold"] == 2
    assert manifest["data_dir"] == str(data.resolve())  # dataset.json of the adapter's training data
    trained_manifest = json.loads((run_dir / "run_manifest.json").read_text())
    assert manifest["prompt_settings"] == {"mtl": True, "prompt_format": "chat",
                                           "max_prompt_tokens": trained_manifest["max_prompt_tokens"]}
    card = (out / "README.md").read_text()  # the scoring run's card names the adapter that scored
    assert f"by the LoRA adapter in `{run_dir}` on `tiny-random-llama`" in card and "4 essays, 2 with gold" in card
    assert f"--adapter_dir {run_dir} --score_path new_essays.jsonl" in card and "## Results" not in card
    assert snapshot(run_dir) == adapter_before and ungraded_file.read_bytes() == essays_before


def test_graded_essays_get_the_training_runs_qwk(trained, tmp_path):
    run_dir, data = trained
    out = tmp_path / "scored"
    result = run_cli("--base_model_name", "tiny-random-llama", "--adapter_dir", str(run_dir),
                     "--score_path", str(data / "test.jsonl"), "--output_dir", str(out), "--no_weighted")
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "evaluation_results.json").read_text())
    expected = json.loads((run_dir / "evaluation_results.json").read_text())
    assert results["token"] == expected["token"] and "weighted" not in results
    assert "average" in result.stdout and f"run folder: {out}" in result.stdout


def test_loader_takes_essays_without_scores_only_when_asked(tmp_path):
    from modules.data import load_split
    from modules.jsonio import DataError

    shipped = ROOT / "aes_dataset_mtl"
    records = read_jsonl(shipped / "test.jsonl")[:3]
    del records[0]["scores"]
    records[1]["scores"] = None
    path = tmp_path / "essays.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    info_dir = small_dataset(tmp_path / "data")  # dataset.json only
    from modules.data import load_dataset_info

    info = load_dataset_info(info_dir)
    loaded = load_split(path, info, scores_optional=True)
    assert [r.scores for r in loaded[:2]] == [None, None]
    assert loaded[2].scores == tuple(records[2]["scores"][name] for name in info.rubric_names)
    with pytest.raises(DataError, match=rf"^{path}:1: field 'scores': missing"):
        load_split(path, info)  # a training or evaluation split
    records[2]["scores"]["task"] = "nine"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{path}:3: field 'scores.task': score 'nine' is not a non-negative"):
        load_split(path, info, scores_optional=True)
