"""The score map (modules/calibrate.py and main_pipeline.py --score_map): the least-squares fit
against scikit-learn, clipping and rounding by hand, and a real tiny run whose final scores are
fitted on validation, saved, and applied again by --score_path."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LinearRegression
from sklearn.metrics import cohen_kappa_score

from conftest import small_dataset
from modules.calibrate import LinearMap, apply_linear, fit_linear, load_score_map
from modules.jsonio import DataError

RANGES = [(0, 30), (1, 6)]


def test_fit_is_sklearns_least_squares_per_rubric() -> None:
    rng = np.random.default_rng(3)
    gold = np.stack([rng.integers(0, 31, 40), rng.integers(1, 7, 40)], axis=1).astype(float)
    inputs = {"weighted": gold * 0.6 + rng.normal(0, 2, gold.shape), "probe": gold + rng.normal(0, 3, gold.shape)}
    fit = fit_linear(inputs, gold)
    assert fit.names == ("weighted", "probe") and fit.weights.shape == (2, 2)
    for k in range(2):
        want = LinearRegression().fit(np.column_stack([inputs["weighted"][:, k], inputs["probe"][:, k]]), gold[:, k])
        np.testing.assert_allclose(fit.weights[k], want.coef_, atol=1e-9)
        assert fit.intercept[k] == pytest.approx(want.intercept_, abs=1e-9)
    assert LinearMap.from_dict(json.loads(json.dumps(fit.as_dict()))).weights.tolist() == fit.weights.tolist()


def test_apply_clips_to_the_range_and_rounds_half_up() -> None:
    fit = LinearMap(("weighted",), np.array([[2.0], [1.0]]), np.array([-1.0, 0.5]))
    unrounded, rounded = apply_linear(fit, {"weighted": np.array([[1.25, 2.0], [20.0, 9.0], [0.1, 0.2]])}, RANGES)
    # 2 * 1.25 - 1 = 1.5 -> 2 (half up); 2.0 + 0.5 = 2.5 -> 3; 39 -> 30; 9.5 -> 6; -0.8 -> 0; 0.7 -> 1 (clipped)
    assert unrounded.tolist() == [[1.5, 2.5], [30.0, 6.0], [0.0, 1.0]]
    assert rounded.tolist() == [[2, 3], [30, 6], [0, 1]]
    with pytest.raises(ValueError, match="missing"):
        apply_linear(fit, {"probe": np.zeros((1, 2))}, RANGES)


def test_too_few_validation_essays_are_refused() -> None:
    with pytest.raises(ValueError, match="2 validation essays cannot fit 3 coefficients"):
        fit_linear({"a": np.zeros((2, 1)), "b": np.zeros((2, 1))}, np.zeros((2, 1)))


def test_a_malformed_score_map_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "score_map.json").write_text(json.dumps({"kind": "stretch", "inputs": ["weighted"], "weights": [[1.0]],
                                                         "intercept": [0.0, 1.0]}))
    with pytest.raises(DataError, match=r"score_map.json: field 'weights': expected 2 x 1 numbers"):
        load_score_map(tmp_path)
    assert load_score_map(tmp_path / "absent") is None


@pytest.mark.parametrize("kind", ["stretch", "stack"])
def test_score_map_run_fits_on_validation_and_score_path_applies_it(kind: str, tmp_path: Path, capsys) -> None:
    import main_pipeline

    data = small_dataset(tmp_path / "data", train=8, valid=6, test=5)
    base = ["--base_model_name", "tiny-random-llama", "--no_wandb", "--data_dir", str(data)]
    extra = []
    if kind == "stack":
        assert main_pipeline.main([*base, "--scorer", "probe", "--output_dir", str(tmp_path / "probe"),
                                   "--probe_max_tokens", "48"]) == 0
        extra = ["--stack_probe", str(tmp_path / "probe")]
    run = tmp_path / "run"
    assert main_pipeline.main([*base, "--max_steps", "1", "--output_dir", str(run), "--score_map", kind, *extra]) == 0
    saved = load_score_map(run)
    assert saved["kind"] == kind and saved["fit"].names == (("weighted", "probe") if kind == "stack" else ("weighted",))
    manifest = json.loads((run / "run_manifest.json").read_text())
    assert manifest["score_map"]["weights"] == saved["weights"]
    # fitted on the validation rows: refitting them gives the saved map
    valid = [json.loads(line) for line in (run / "valid_predictions.jsonl").read_text().splitlines()]
    inputs = {"weighted": np.array([r["weighted_expected"] for r in valid])}
    if kind == "stack":
        probe_valid = {r["id"]: r for r in map(json.loads, (tmp_path / "probe" / "valid_predictions.jsonl").read_text().splitlines())}
        inputs["probe"] = np.array([probe_valid[r["id"]]["weighted_expected"] for r in valid])
    refit = fit_linear(inputs, np.array([r["gold"] for r in valid], dtype=float))
    np.testing.assert_allclose(refit.weights, saved["fit"].weights, atol=1e-6)
    # the test rows' final scores, their QWK, the confidence judged on them, scores.csv
    rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    results = json.loads((run / "evaluation_results.json").read_text())
    info_ranges = [(1, 9)] * len(rows[0]["gold"])
    for k, name in enumerate(results["final"]):
        if name in ("overall", "average"):
            break
        want = cohen_kappa_score([r["gold"][k] for r in rows], [r["final"][k] for r in rows], weights="quadratic",
                                 labels=list(range(info_ranges[k][0], info_ranges[k][1] + 1)))
        assert results["final"][name] == pytest.approx(want, abs=1e-12)
    assert results["confidence"]["prediction"] == "final"
    assert json.loads((run / "confidence_calibration.json").read_text())["prediction"] == "final"
    assert "final" in capsys.readouterr().out
    csv_rows = (run / "scores.csv").read_text().splitlines()[1:]
    assert [[int(v) for v in line.split(",")[1:1 + len(rows[0]["final"])]] for line in csv_rows] == [r["final"] for r in rows]
    # --score_path applies the same map to the same essays
    scored = tmp_path / "scored"
    assert main_pipeline.main(["--base_model_name", "tiny-random-llama", "--score_path", str(data / "test.jsonl"),
                               "--adapter_dir", str(run), "--output_dir", str(scored), "--no_wandb"]) == 0
    again = [json.loads(line) for line in (scored / "predictions.jsonl").read_text().splitlines()]
    assert [r["final"] for r in again] == [r["final"] for r in rows]
    np.testing.assert_allclose([r["final_expected"] for r in again], [r["final_expected"] for r in rows], atol=1e-6)
    assert json.loads((scored / "run_manifest.json").read_text())["score_map"]["kind"] == kind


def test_score_map_flags_are_checked(capsys) -> None:
    import main_pipeline

    for flags, message in ((["--score_map", "stack"], "--score_map stack and --stack_probe go together"),
                           (["--stack_probe", "runs/p"], "--score_map stack and --stack_probe go together"),
                           (["--score_map", "stretch", "--no_weighted"], "not with --no_weighted"),
                           (["--score_map", "stretch", "--scorer", "probe"], "not with --scorer probe")):
        with pytest.raises(SystemExit):
            main_pipeline.parse_args(["--base_model_name", "tiny-random-llama", *flags])
        assert message in capsys.readouterr().err
