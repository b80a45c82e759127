"""main_pipeline.py end to end as a subprocess on tiny-random-llama: files, resume, dry run, bad input."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli_env, small_dataset

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "aes_dataset_mtl"


def run_cli(*args: str, env_extra: dict | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "main_pipeline.py"), *args], cwd=ROOT,
                          env=cli_env(**(env_extra or {})), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """The shipped dataset cut to a few essays per split, so a run takes seconds."""
    return small_dataset(tmp_path_factory.mktemp("data"), train=8, valid=4, test=4)


def kappa(gold: list[int], pred: list[int]) -> float:
    """sklearn's quadratic kappa over the shipped rubrics' range 1-9; 0 where it is undefined (nan)."""
    import math

    from sklearn.metrics import cohen_kappa_score

    value = cohen_kappa_score(gold, pred, weights="quadratic", labels=list(range(1, 10)))
    return 0.0 if math.isnan(value) else float(value)


TRAIN_FLAGS = ["--base_model_name", "tiny-random-llama", "--mtl", "--per_device_train_batch_size", "2",
               "--gradient_accumulation_steps", "1", "--logging_steps", "1", "--eval_steps", "2",
               "--max_seq_length", "384"]


def dry_run_terms(stdout: str) -> dict[str, float]:
    """The loss terms of the dry run's one line, ``dry run: batch (B, T) on cpu; name=value, ...``."""
    [line] = [l for l in stdout.splitlines() if l.startswith("dry run:")]
    terms = dict(item.split("=") for item in line.split("; ", 1)[1].split(", "))
    return {name: float(value) for name, value in terms.items()}


def test_dry_run_prints_every_loss_term(small_data):
    import math

    # Static weights (the defaults, NTL 2.0 and EMO 0.1): total = CE + 2 NTL + 0.1 EMO (SPEC §5).
    result = run_cli(*TRAIN_FLAGS, "--data_dir", str(small_data), "--dry_run", "--no_wandb")
    assert result.returncode == 0, result.stderr
    terms = dry_run_terms(result.stdout)
    assert list(terms) == ["loss_ce", "loss_ntl", "loss_emo", "loss_total"]
    assert all(math.isfinite(v) and v > 0 for v in terms.values()), terms
    assert terms["loss_total"] == pytest.approx(terms["loss_ce"] + 2.0 * terms["loss_ntl"] + 0.1 * terms["loss_emo"],
                                                abs=2e-4)
    # A negative weight: lambda = CE / (NTL + EMO), the enabled terms unweighted, and total = (CE + lambda aux) / 2 = CE.
    dynamic = run_cli(*TRAIN_FLAGS, "--data_dir", str(small_data), "--dry_run", "--no_wandb", "--ntl_weights", "-1")
    assert dynamic.returncode == 0, dynamic.stderr
    terms = dry_run_terms(dynamic.stdout)
    assert list(terms) == ["loss_ce", "loss_ntl", "loss_emo", "dynamic_lambda", "loss_total"]
    assert all(math.isfinite(v) and v > 0 for v in terms.values()), terms
    assert terms["dynamic_lambda"] == pytest.approx(terms["loss_ce"] / (terms["loss_ntl"] + terms["loss_emo"]), rel=1e-3)
    assert terms["loss_total"] == pytest.approx(terms["loss_ce"], abs=2e-4)


# An evaluation and a checkpoint after every step, at a learning rate high enough that the eval
# loss goes up and down: the best checkpoint is not the last one, and early stopping ends the run.
EARLY_STOP_FLAGS = ["--eval_steps", "1", "--early_stopping_patience", "2", "--learning_rate", "0.05",
                    "--max_steps", "12"]


def early_stop_step(evals: list[tuple[int, float]], patience: int, resumed_at: int = 0) -> int | None:
    """The step whose evaluation is the ``patience``-th in a row without a lower eval loss than
    the best so far (where early stopping ends the run); None if no such step. A resume at step
    ``resumed_at`` keeps the best loss but counts afresh: the Trainer restores its state, not the
    callback's counter (restore_callback_states_from_checkpoint is off)."""
    best, worse = float("inf"), 0
    for step, loss in evals:
        better = loss < best
        best = min(best, loss)
        worse = 0 if better or step <= resumed_at else worse + 1
        if worse == patience:
            return step
    return None


def assert_adapter_is(run_dir: Path, checkpoint: str) -> None:
    """The adapter saved in ``run_dir`` holds exactly the LoRA tensors of ``run_dir/checkpoint``."""
    import torch
    from safetensors.torch import load_file

    saved = load_file(run_dir / "adapter_model.safetensors")
    kept = load_file(run_dir / checkpoint / "adapter_model.safetensors")
    assert saved.keys() == kept.keys() and all(torch.equal(saved[k], kept[k]) for k in saved), checkpoint


def check_training_record(run_dir: Path, max_steps: int, resumed_at: int = 0, kept: str = "best") -> dict:
    """The run's manifest, once the run is checked: every logged training loss is the
    composite total, the best checkpoint is the lowest eval loss's, early stopping ended the run
    at the step it should, and the saved adapter is the ``kept`` one: the best checkpoint's
    (default; not the last one's) or, for --no-load_best_model_at_end, the last step's."""
    manifest = json.loads((run_dir / "run_manifest.json").read_text())
    history = json.loads((run_dir / "log_history.json").read_text())
    logged = [h for h in history if "loss" in h]
    assert logged and all({"loss_ce", "loss_ntl", "loss_emo", "loss_total"} <= set(h) for h in logged)
    assert all(h["loss_total"] == pytest.approx(h["loss"], abs=1e-5) for h in logged), logged
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    best_step = min(evals, key=lambda e: e[1])[0]
    stop = early_stop_step(evals, patience=2, resumed_at=resumed_at)
    assert stop is not None and stop < max_steps and best_step < stop, evals  # the case this test is about
    assert manifest["train"]["global_step"] == stop and [step for step, _ in evals] == list(range(1, stop + 1))
    assert manifest["train"]["best_checkpoint"] == str(run_dir / f"checkpoint-{best_step}")
    assert manifest["train"]["best_eval_loss"] == min(loss for _, loss in evals)
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == sorted({f"checkpoint-{best_step}",
                                                                          f"checkpoint-{stop}"})
    kept_step = {"best": best_step, "last": stop}[kept]
    assert manifest["train"]["kept_checkpoint"] == str(run_dir / f"checkpoint-{kept_step}")
    assert_adapter_is(run_dir, f"checkpoint-{kept_step}")
    return manifest


def test_no_load_best_model_at_end_keeps_the_last_step(small_data, tmp_path):
    """The same run as below with --no-load_best_model_at_end: early stopping still ends it at the
    same step, but the saved adapter is that last step's, not the best checkpoint's."""
    run_dir = tmp_path / "run"
    result = run_cli(*TRAIN_FLAGS, *EARLY_STOP_FLAGS, "--data_dir", str(small_data), "--output_dir", str(run_dir),
                     "--no_wandb", "--no-load_best_model_at_end", "--test_limit", "1", "--no_weighted")
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = check_training_record(run_dir, max_steps=12, kept="last")
    assert manifest["config"]["load_best_model_at_end"] is False


def test_eval_strategy_no_trains_the_same_adapter_without_evaluating(small_data, tmp_path):
    """--eval_strategy no only drops the evaluations: with --no-load_best_model_at_end they choose
    nothing, so the adapter is the evaluated run's bit for bit, and the checkpoints are still saved."""
    import torch
    from safetensors.torch import load_file

    flags = [*TRAIN_FLAGS, "--data_dir", str(small_data), "--no_wandb", "--no-load_best_model_at_end", "--max_steps", "4",
             "--learning_rate", "0.05", "--skip_scoring"]
    runs = {}
    for name, extra in (("evaluated", []), ("not", ["--eval_strategy", "no"])):
        result = run_cli(*flags, *extra, "--output_dir", str(tmp_path / name))
        assert result.returncode == 0, result.stderr[-3000:]
        history = json.loads((tmp_path / name / "log_history.json").read_text())
        runs[name] = (load_file(tmp_path / name / "adapter_model.safetensors"),
                      [h["step"] for h in history if "eval_loss" in h],
                      sorted(p.name for p in (tmp_path / name).glob("checkpoint-*")))
    (evaluated, eval_steps, checkpoints), (plain, no_evals, plain_checkpoints) = runs["evaluated"], runs["not"]
    assert eval_steps == [2, 4] and no_evals == []
    assert checkpoints == plain_checkpoints == ["checkpoint-2", "checkpoint-4"]
    assert evaluated.keys() == plain.keys() and all(torch.equal(evaluated[k], plain[k]) for k in evaluated)
    refused = run_cli(*TRAIN_FLAGS, "--data_dir", str(small_data), "--eval_strategy", "no")
    assert refused.returncode == 2 and "add --no-load_best_model_at_end" in refused.stderr
    mismatched = run_cli(*TRAIN_FLAGS, "--data_dir", str(small_data), "--eval_strategy", "epoch")
    assert mismatched.returncode == 2 and "evaluates where it saves, every --eval_steps" in mismatched.stderr


def test_train_infer_evaluate_and_resume(small_data, tmp_path):
    run_dir = tmp_path / "run"
    # The first run scores with --constrained, the resumed one without: both modes end to end.
    result = run_cli(*TRAIN_FLAGS, *EARLY_STOP_FLAGS, "--data_dir", str(small_data), "--output_dir", str(run_dir),
                     "--constrained", "--lora_top_layers", "1", "--group_by_length", "--bf16",
                     "--review_fraction", "0.5", "--conformal_coverage", "0.8",
                     env_extra={"WANDB_MODE": "offline", "WANDB_API_KEY": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wandb: offline mode" in result.stdout
    assert list((run_dir / "wandb").glob("offline-run-*")), "real wandb wrote no offline run"
    for name in ("adapter_config.json", "adapter_model.safetensors", "run_manifest.json", "predictions.jsonl",
                 "evaluation_results.json", "tokenizer.json", "tokenizer_config.json"):
        assert (run_dir / name).exists(), name
    adapter_config = json.loads((run_dir / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "tiny-random-llama"
    assert adapter_config["layers_to_transform"] == [1]  # the tiny model's top layer of 2
    manifest = check_training_record(run_dir, max_steps=12)
    last = manifest["train"]["global_step"]
    assert manifest["seed"] == 42
    assert {"torch", "transformers", "peft"} <= set(manifest["packages"])
    assert manifest["config"]["mtl"] is True and manifest["config"]["constrained"] is True
    assert manifest["config"]["bf16"] is True and manifest["config"]["group_by_length"] is True
    assert manifest["precision"]["requested"] == "bf16" and manifest["precision"]["chosen"] == "bf16"  # --bf16 forces it

    rubrics = [r["name"] for r in json.loads((small_data / "dataset.json").read_text())["rubrics"]]
    results = json.loads((run_dir / "evaluation_results.json").read_text())
    assert set(results) == {"token", "weighted", "confidence"}
    rows = [json.loads(l) for l in (run_dir / "predictions.jsonl").read_text().splitlines()]
    test_lines = (small_data / "test.jsonl").read_text(encoding="utf-8").splitlines()
    assert [r["gold"] for r in rows] == [[json.loads(l)["scores"][n] for n in rubrics] for l in test_lines]
    # The predictions are the saved adapter's: scoring the test split again with it gives them back.
    from modules.data import dataset_info_for, load_split
    from modules.models import load_adapter
    from modules.predict import predict_split
    from modules.runs import PromptSettings

    info = dataset_info_for(small_data / "test.jsonl")
    model, tokenizer = load_adapter("tiny-random-llama", run_dir)
    again = predict_split(model, tokenizer, load_split(small_data / "test.jsonl", info), info,
                          PromptSettings(mtl=True, max_prompt_tokens=manifest["max_prompt_tokens"]), batch_size=8,
                          constrained=True)
    assert [(p["greedy"], p["weighted"], p["text"]) for p in again] == [(r["greedy"], r["weighted"], r["text"]) for r in rows]
    # to float32 precision: the run trained under bf16 autocast (--bf16), and scoring must not inherit it
    assert [p["weighted_expected"] for p in again] == [pytest.approx(r["weighted_expected"], abs=1e-5) for r in rows]
    # The confidence outputs are chosen on the validation essays' predictions, which the run keeps:
    # recomputed from those files they give the report, the calibration and the test rows' flags.
    from modules.confidence_report import apply_calibration, confidence_report

    valid_rows = [json.loads(l) for l in (run_dir / "valid_predictions.jsonl").read_text().splitlines()]
    valid = load_split(small_data / "valid.jsonl", info)
    test = load_split(small_data / "test.jsonl", info)
    assert [r["id"] for r in valid_rows] == [r.id for r in valid]
    plain = [{k: v for k, v in r.items() if k not in ("confidence", "score_sets", "review")} for r in rows]
    report, calibration = confidence_report(valid_rows, plain, info.rubric_names, info.ranges,
                                            valid_essays=[r.essay for r in valid], test_essays=[r.essay for r in test],
                                            target_coverage=0.8, review_fraction=0.5, seed=42)
    assert results["confidence"] == json.loads(json.dumps(report))
    assert json.loads((run_dir / "confidence_calibration.json").read_text()) == json.loads(json.dumps(calibration))
    flagged = apply_calibration(plain, calibration, essays=[r.essay for r in test])
    assert [(r["review"], r["score_sets"]) for r in rows] == [(r["review"], r["score_sets"]) for r in flagged]
    assert (run_dir / "risk_coverage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "confidence (4 essays" in result.stdout
    # And each QWK is sklearn's quadratic kappa of those predictions (0 where kappa is undefined).
    for table, key in (("token", "greedy"), ("weighted", "weighted")):
        kappas = [kappa([r["gold"][k] for r in rows], [r[key][k] for r in rows]) for k in range(len(rubrics))]
        assert [results[table][name] for name in rubrics] == pytest.approx(kappas, abs=1e-9)
        pooled = kappa([g for r in rows for g in r["gold"]], [v for r in rows for v in r[key]])
        assert results[table]["overall"] == pytest.approx(pooled, abs=1e-9)
        assert results[table]["average"] == pytest.approx(sum(kappas) / len(kappas), abs=1e-9)
    assert results["token"]["invalid"] == sum(not r["valid"] for r in rows)
    assert len(rows) == 4
    for row in rows:
        assert len(row["gold"]) == len(row["greedy"]) == len(row["weighted"]) == len(rubrics)
        assert set(row["probabilities"]) == set(rubrics)
        assert all(abs(sum(p) - 1) < 1e-4 and len(p) == 9 for p in row["probabilities"].values())
        assert "text" in row and row["valid"] is True  # constrained: always a valid score line
    assert "overall" in result.stdout and "average" in result.stdout and "decoding: constrained" in result.stdout
    # The run folder explains itself: its README.md is a filled model card, not PEFT's empty one.
    card = (run_dir / "README.md").read_text()
    assert "[More Information Needed]" not in card and "base_model: tiny-random-llama" in card
    assert all(f"| {name} | 1-9 |" in card for name in rubrics) and "Essays: train 8, valid 4, test 4." in card
    assert f"| average | {results['token']['average']:.3f} | {results['weighted']['average']:.3f} |" in card
    assert "Loss: CE + 2 NTL-MSE (score tokens) + 0.1 EMO (feedback tokens)." in card
    assert "Precision: bf16 autocast (`--precision bf16`" in card
    assert f"Signal chosen on the 4 validation essays: `{results['confidence']['review']['signal']}`" in card
    assert (f"python main_pipeline.py --base_model_name tiny-random-llama --adapter_dir {run_dir} "
            f"--score_path new_essays.jsonl") in card

    # Resume from the newest checkpoint (where early stopping ended the run) up to 12 steps: step
    # count, log history, optimizer state and the best checkpoint so far come back, and the
    # resumed run stops early again, its patience counted from the resume.
    state_before = json.loads((run_dir / f"checkpoint-{last}" / "trainer_state.json").read_text())
    assert state_before["global_step"] == last
    resumed = run_cli(*TRAIN_FLAGS, *EARLY_STOP_FLAGS, "--data_dir", str(small_data), "--resume_checkpoint",
                      str(run_dir), "--no_wandb", "--lora_top_layers", "1", "--group_by_length")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {run_dir / f'checkpoint-{last}'} (global step {last})" in resumed.stdout
    resumed_manifest = check_training_record(run_dir, max_steps=12, resumed_at=last)
    now = resumed_manifest["train"]["global_step"]
    assert now > last
    state_after = json.loads((run_dir / f"checkpoint-{now}" / "trainer_state.json").read_text())
    assert [h["step"] for h in state_after["log_history"] if "loss" in h] == list(range(1, now + 1))
    # The first run's records come from the restored state, not from a new run.
    assert state_after["log_history"][:len(state_before["log_history"])] == state_before["log_history"]
    assert (run_dir / f"checkpoint-{now}" / "optimizer.pt").exists()
    assert resumed_manifest["created"] == manifest["created"]
    [entry] = resumed_manifest["resumes"]
    assert entry["from"] == str(run_dir / f"checkpoint-{last}") and entry["forced"] == {}
    assert resumed_manifest["config"]["constrained"] is False and "decoding: unconstrained" in resumed.stdout


# Bad input (broken records, an existing run folder, a bad resume) is in tests/test_cli_inputs.py.
