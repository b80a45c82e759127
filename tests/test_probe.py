"""The frozen-feature probe (modules/probe.py): pooled features against the model's own forward on
each essay alone, the ridge and its cross-validated alpha against scikit-learn, a layer choice that
never sees test gold, and probe.json's round trip and one-line errors. Real tiny-random-llama, no mocks."""
from __future__ import annotations

import copy
import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import small_dataset
from modules import probe as P
from modules.data import load_dataset_info, load_split
from modules.jsonio import DataError
from modules.probe_run import load_probe, save_probe

pytestmark = pytest.mark.usefixtures("one_thread")

ESSAYS = [
    "Phones help students look up facts quickly.",
    "No.",
    "Uniforms make mornings easier, and they cost less than new clothes every season. " * 3,
    "I learned from my mistake.",
    "A long essay about homework, screens and sleep. " * 12,  # past max_tokens: cut
    "Short one here",
    "Schools should start later because teenagers need more sleep to learn well.",
]


def alone(model, tokenizer, essay: str, max_tokens: int, bos: bool = True) -> list[np.ndarray]:
    """Per hidden-state index, the mean over the essay's tokens (BOS left out) of the model run on
    this one essay, unpadded and without an attention mask."""
    ids = tokenizer(essay, add_special_tokens=False).input_ids[:max_tokens]
    prefix = [tokenizer.bos_token_id] if bos else []
    with torch.no_grad():
        hidden = model(torch.tensor([prefix + ids]), output_hidden_states=True).hidden_states
    start = 1 if len(prefix + ids) > 1 else 0
    return [h[0, start:].double().mean(dim=0).numpy() for h in hidden]


# ----------------------------------------------------------------------------- features

def test_pooled_features_equal_each_essay_run_alone(tiny) -> None:
    model, tokenizer = tiny
    max_tokens = 40
    lengths = [len(tokenizer(e, add_special_tokens=False).input_ids) for e in ESSAYS]
    assert len(set(lengths)) >= 5 and max(lengths) > max_tokens > min(lengths)  # padding and truncation both happen
    model.train()  # essay_features switches to eval and back
    feats = P.essay_features(model, tokenizer, ESSAYS, max_tokens=max_tokens, batch_size=3)
    assert model.training
    assert feats.dtype == np.float32
    assert feats.shape == (len(ESSAYS), model.config.num_hidden_layers + 1, model.config.hidden_size)
    model.eval()
    for i, essay in enumerate(ESSAYS):
        for layer, expected in enumerate(alone(model, tokenizer, essay, max_tokens)):
            np.testing.assert_allclose(feats[i, layer], expected, atol=1e-5, err_msg=f"essay {i}, layer {layer}")
    # The batch size changes nothing (other batches, other padding).
    np.testing.assert_allclose(P.essay_features(model, tokenizer, ESSAYS, max_tokens=max_tokens, batch_size=1),
                               feats, atol=1e-5)


def test_without_bos_the_first_essay_token_is_left_out(tiny) -> None:
    model, tokenizer = tiny
    plain = copy.deepcopy(tokenizer)
    plain.bos_token = None
    assert plain.bos_token_id is None
    essays = ["Phones help students.", "A", "Uniforms make mornings easier for everyone."]
    assert len(plain(essays[1], add_special_tokens=False).input_ids) == 1  # one token: pooled as is
    feats = P.essay_features(model, plain, essays, max_tokens=16, batch_size=2)
    for i, essay in enumerate(essays):
        for layer, expected in enumerate(alone(model, plain, essay, 16, bos=False)):
            np.testing.assert_allclose(feats[i, layer], expected, atol=1e-5)


def test_features_refuse_bad_arguments(tiny) -> None:
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="max_tokens"):
        P.essay_features(model, tokenizer, ESSAYS, max_tokens=0)
    with pytest.raises(ValueError, match="essay 1 has no tokens"):
        P.essay_features(model, tokenizer, ["fine", ""])


# ----------------------------------------------------------------------------- ridge

def regression_data(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Features with unequal scales and offsets; rubric 0 mostly signal, 1 weak signal, 2 noise."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * rng.uniform(0.1, 10, d) + rng.uniform(-5, 5, d)
    z = (x - x.mean(0)) / x.std(0)
    y = np.stack([z[:, :3].sum(1) + 0.3 * rng.normal(size=n),
                  0.3 * z[:, 3] + rng.normal(size=n),
                  rng.normal(size=n)], axis=1) + np.array([4.0, 2.0, 0.0])
    return x, y


@pytest.mark.parametrize("n,d", [(50, 8), (20, 45)])
def test_ridge_at_a_fixed_alpha_is_sklearns_on_standardised_features(n: int, d: int) -> None:
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler

    x, y = regression_data(n, d)
    x_new = regression_data(9, d, seed=1)[0]
    fit = P.fit_ridge(x, y, alphas=[3.0])
    assert fit.cv_mse is None and fit.alpha.tolist() == [3.0] * 3
    scaler = StandardScaler().fit(x)
    ridge = Ridge(alpha=3.0).fit(scaler.transform(x), y)
    np.testing.assert_allclose(fit.mean, scaler.mean_, rtol=1e-12)
    np.testing.assert_allclose(fit.scale, scaler.scale_, rtol=1e-12)
    np.testing.assert_allclose(fit.coef, ridge.coef_, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(fit.intercept, ridge.intercept_, rtol=1e-10)
    np.testing.assert_allclose(P.predict_ridge(fit, x_new), ridge.predict(scaler.transform(x_new)), rtol=1e-9)


@pytest.mark.parametrize("n,d", [(83, 30), (41, 70)])  # folds of 17 and 16 / 9 and 8; primal / dual form
def test_cv_alpha_is_what_an_explicit_sklearn_kfold_loop_picks(n: int, d: int) -> None:
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = regression_data(n, d)
    fit = P.fit_ridge(x, y, n_folds=5, seed=7)
    folds = P.cv_folds(n, 5, seed=7)
    assert sorted(np.concatenate(folds).tolist()) == list(range(n)) and {len(f) for f in folds} == {n // 5, n // 5 + 1}
    cv = [(np.setdiff1d(np.arange(n), held), held) for held in folds]
    for k in range(y.shape[1]):
        mse = [-cross_val_score(make_pipeline(StandardScaler(), Ridge(alpha=a)), x, y[:, k], cv=cv,
                                scoring="neg_mean_squared_error").mean() for a in P.DEFAULT_ALPHAS]
        np.testing.assert_allclose(fit.cv_mse[k], mse, rtol=1e-8)
        assert fit.alpha[k] == P.DEFAULT_ALPHAS[int(np.argmin(mse))]
    # The rubrics really differ: the strong signal wants less shrinkage than the weak one and the noise.
    assert fit.alpha[0] < min(fit.alpha[1], fit.alpha[2])
    # The final fit is the whole-training-set ridge at each rubric's chosen alpha.
    for k in range(3):
        np.testing.assert_allclose(fit.coef[k], P.fit_ridge(x, y[:, k], alphas=[fit.alpha[k]]).coef[0], rtol=1e-9)


def test_folds_are_seeded_and_deterministic() -> None:
    assert all(np.array_equal(a, b) for a, b in zip(P.cv_folds(30, 5, 1), P.cv_folds(30, 5, 1)))
    assert not all(np.array_equal(a, b) for a, b in zip(P.cv_folds(30, 5, 1), P.cv_folds(30, 5, 2)))
    assert len(P.cv_folds(3, 5)) == 3  # never more folds than essays
    with pytest.raises(ValueError, match="at least 2 essays"):
        P.cv_folds(1, 5)


def test_rounding_is_half_up_and_clipped() -> None:
    pred = np.array([[2.5, 3.49, -1.0], [0.5, 9.7, 12.0]])
    ranges = [(1, 5), (0, 9), (0, 10)]
    assert P.round_scores(pred, ranges).tolist() == [[3, 3, 0], [1, 9, 10]]
    np.testing.assert_array_equal(P.clip_scores(pred, ranges), [[2.5, 3.49, 0.0], [1.0, 9.0, 10.0]])


# ----------------------------------------------------------------------------- layer choice

def test_choose_layer_has_no_test_input() -> None:
    params = list(inspect.signature(P.choose_layer).parameters)
    assert params == ["train_feats", "train_gold", "valid_feats", "valid_gold", "ranges", "alphas", "n_folds", "seed"]
    assert not any("test" in name for name in inspect.signature(P.fit_probe).parameters)


def test_choose_layer_picks_the_informative_layer_and_ties_go_low() -> None:
    rng = np.random.default_rng(0)
    n_train, n_valid, d = 60, 30, 6
    feats = rng.normal(size=(n_train + n_valid, 4, d))
    gold = np.clip(np.rint(3 + 1.5 * feats[:, 2, :2]), 0, 6).astype(int)  # layer 2 holds the scores
    ranges = [(0, 6), (0, 6)]
    layer, scores, fit = P.choose_layer(feats[:n_train], gold[:n_train], feats[n_train:], gold[n_train:], ranges)
    assert layer == 2 and len(scores) == 4 and scores[2] == max(scores) > 0.8
    np.testing.assert_array_equal(fit.coef, P.fit_ridge(feats[:n_train, 2], gold[:n_train]).coef)
    same = np.repeat(feats[:, 2:3], 3, axis=1)  # three identical layers: the lowest wins
    assert P.choose_layer(same[:n_train], gold[:n_train], same[n_train:], gold[n_train:], ranges)[0] == 0


def probe_run(folder: Path, out: Path, *extra: str) -> list[dict]:
    """``main_pipeline.py --scorer probe`` on ``folder`` into ``out``, as a user runs it; its test rows."""
    import main_pipeline

    assert main_pipeline.main(["--base_model_name", "tiny-random-llama", "--scorer", "probe", "--no_wandb",
                               "--data_dir", str(folder), "--output_dir", str(out), "--probe_max_tokens", "48",
                               *extra]) == 0
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]


def test_scrambled_test_gold_changes_nothing_in_the_saved_probe(tmp_path: Path, capsys) -> None:
    folder = small_dataset(tmp_path / "data", train=16, valid=8, test=6)
    rows = probe_run(folder, tmp_path / "a")
    test_file = folder / "test.jsonl"
    records = [json.loads(line) for line in test_file.read_text(encoding="utf-8").splitlines()]
    info = load_dataset_info(folder)
    for i, rec in enumerate(records):  # every test score moved to another value of its range
        rec["scores"] = {r.name: r.min + (rec["scores"][r.name] - r.min + 1 + i) % (r.max - r.min + 1)
                         for r in info.rubrics}
    test_file.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    scrambled = probe_run(folder, tmp_path / "b")
    assert (tmp_path / "a" / "probe.json").read_bytes() == (tmp_path / "b" / "probe.json").read_bytes()
    assert [r["gold"] for r in rows] != [r["gold"] for r in scrambled]
    keep = ("id", "greedy", "weighted", "weighted_expected", "text")
    assert [{k: r[k] for k in keep} for r in rows] == [{k: r[k] for k in keep} for r in scrambled]


def test_a_probe_run_writes_what_a_lora_run_writes_and_score_path_reproduces_it(tmp_path: Path, capsys) -> None:
    """The run folder of ``--scorer probe``: probe.json, the manifest, predictions (the rows of the
    saved probe on the test essays), evaluation_results.json (sklearn's QWK), scores.csv, the
    confidence chosen on validation (no conformal sets: no distribution) and a card that says
    probe; ``--score_path`` with the run gives the same rows."""
    import csv

    from sklearn.metrics import cohen_kappa_score

    import main_pipeline
    from modules.probe_run import is_probe_run

    folder = small_dataset(tmp_path / "data", train=16, valid=8, test=6)
    run = tmp_path / "run"
    rows = probe_run(folder, run)
    printed = capsys.readouterr().out
    assert "average" in printed and f"run folder: {run}" in printed
    manifest = json.loads((run / "run_manifest.json").read_text())
    probe = load_probe(run)
    assert is_probe_run(run) and manifest["scorer"] == "probe" and manifest["probe"]["layer"] == probe.layer
    assert manifest["probe"]["valid_qwk_by_layer"] == [round(q, 4) for q in probe.layer_scores]
    info = load_dataset_info(folder)
    test = load_split(folder / "test.jsonl", info)
    assert [r["id"] for r in rows] == [r.id for r in test]
    # the rows are the saved probe's on the test essays' features
    model, tokenizer = __import__("modules.models", fromlist=["load_base_model"]).load_base_model("tiny-random-llama")
    feats = P.essay_features(model, tokenizer, [r.essay for r in test], max_tokens=48)
    again = P.probe_predictions(probe, feats, test, info)
    assert [r["weighted"] for r in rows] == [r["weighted"] for r in again]
    np.testing.assert_allclose([r["weighted_expected"] for r in rows], [r["weighted_expected"] for r in again],
                               rtol=0, atol=1e-9)
    results = json.loads((run / "evaluation_results.json").read_text())
    for k, rubric in enumerate(info.rubrics):
        want = cohen_kappa_score([r["gold"][k] for r in rows], [r["weighted"][k] for r in rows], weights="quadratic",
                                 labels=list(range(rubric.min, rubric.max + 1)))
        assert results["weighted"][rubric.name] == pytest.approx(want, abs=1e-12)
    assert results["confidence"]["conformal"] is None and results["confidence"]["review"]["signal"] in ("length", "random")
    with open(run / "scores.csv", newline="", encoding="utf-8") as handle:
        table = list(csv.reader(handle))
    signal = results["confidence"]["review"]["signal"]
    assert table[0] == ["id", *info.rubric_names, f"confidence ({signal})", "review"]
    assert [line[0] for line in table[1:]] == [r["id"] for r in rows]
    assert [[int(v) for v in line[1:-2]] for line in table[1:]] == [r["weighted"] for r in rows]
    assert [int(line[-1]) for line in table[1:]] == [int(r["review"]) for r in rows]
    card = (run / "README.md").read_text()
    assert "A probe for `tiny-random-llama`" in card and f"layer {probe.layer} of" in card and "LoRA" not in card
    # --score_path applies the probe run as it applies an adapter
    scored = tmp_path / "scored"
    assert main_pipeline.main(["--base_model_name", "tiny-random-llama", "--score_path", str(folder / "test.jsonl"),
                               "--adapter_dir", str(run), "--output_dir", str(scored), "--no_wandb"]) == 0
    new = [json.loads(line) for line in (scored / "predictions.jsonl").read_text().splitlines()]
    assert [r["weighted"] for r in new] == [r["weighted"] for r in rows]
    np.testing.assert_allclose([r["weighted_expected"] for r in new], [r["weighted_expected"] for r in rows],
                               rtol=0, atol=1e-9)
    assert [r["review"] for r in new] == [r["review"] for r in rows]  # the run's calibration applied
    assert json.loads((scored / "run_manifest.json").read_text())["scorer"] == "probe"
    assert (scored / "scores.csv").read_text() == (run / "scores.csv").read_text()
    # a probe run on another base model is refused in one line
    assert main_pipeline.main(["--base_model_name", "smollm2-135m", "--score_path", str(folder / "test.jsonl"),
                               "--adapter_dir", str(run), "--no_wandb"]) == 2
    assert "trained on base model 'tiny-random-llama'" in capsys.readouterr().err


def test_probe_flags_that_mean_lora_training_are_refused(capsys) -> None:
    import main_pipeline

    for flag in ("--dry_run", "--resume_checkpoint=runs/x"):
        with pytest.raises(SystemExit):
            main_pipeline.parse_args(["--base_model_name", "tiny-random-llama", "--scorer", "probe", flag])
        assert "--scorer probe trains no model" in capsys.readouterr().err


# ----------------------------------------------------------------------------- rows, save and load

def toy_probe(intercept=(2.5, 10.7, -3.0)) -> P.Probe:
    """A probe on 4 features whose predictions are ``intercept`` plus feature 0 on rubric 0."""
    coef = np.zeros((3, 4))
    coef[0, 0] = 1.0
    fit = P.RidgeFit(mean=np.zeros(4), scale=np.ones(4), coef=coef, intercept=np.array(intercept),
                     alpha=np.array([1.0, 10.0, 100.0]), alphas=np.array([1.0, 10.0, 100.0]), cv_mse=np.ones((3, 3)))
    return P.Probe(layer=1, fit=fit, rubric_names=("task", "content_1", "content_2"), ranges=((1, 9), (1, 9), (1, 9)),
                   max_tokens=64, layer_scores=(0.1, 0.5, 0.2), base_model="tiny-random-llama")


def toy_info(tmp_path: Path):
    folder = tmp_path / "info"
    folder.mkdir()
    raw = json.loads((Path(__file__).resolve().parents[1] / "aes_dataset_mtl" / "dataset.json").read_text())
    raw["rubrics"] = raw["rubrics"][:3]
    (folder / "dataset.json").write_text(json.dumps(raw))
    return load_dataset_info(folder)


def test_rows_have_the_lora_scorers_shape_and_evaluate(tmp_path: Path) -> None:
    from modules.data import EssayRecord
    from modules.evaluation import evaluate_predictions

    info = toy_info(tmp_path)
    probe = toy_probe()
    records = [EssayRecord(id=f"e{i}", prompt_id="p", essay="x", scores=(i + 1, 9, 1)) for i in range(3)]
    feats = np.zeros((3, 3, 4))
    feats[:, 1, 0] = [0.0, 1.0, 9.0]  # the probe's layer 1; layers 0 and 2 are never read
    feats[:, 0], feats[:, 2] = np.nan, np.nan
    rows = P.probe_predictions(probe, feats, records, info)
    assert set(rows[0]) == {"id", "gold", "greedy", "weighted", "weighted_expected", "valid", "truncated", "text",
                            "probabilities", "weighted_underflow"}
    assert [r["weighted_expected"] for r in rows] == [[2.5, 9.0, 1.0], [3.5, 9.0, 1.0], [9.0, 9.0, 1.0]]
    assert [r["weighted"] for r in rows] == [r["greedy"] for r in rows] == [[3, 9, 1], [4, 9, 1], [9, 9, 1]]
    assert rows[1] == {"id": "e1", "gold": [2, 9, 1], "greedy": [4, 9, 1], "weighted": [4, 9, 1], "text": "4 9 1",
                       "weighted_expected": [3.5, 9.0, 1.0], "valid": True, "truncated": False,
                       "probabilities": None, "weighted_underflow": []}
    assert P.probe_predictions(probe, feats[:, 1], records, info) == rows  # one layer's features
    results = evaluate_predictions(rows, info)
    assert results["token"]["invalid"] == 0 and results["weighted"]["underflow"] == 0
    assert results["token"]["task"] == results["weighted"]["task"]
    with pytest.raises(ValueError, match="the probe scores rubrics"):
        P.probe_predictions(probe, feats, records, load_dataset_info(Path(__file__).resolve().parents[1] / "aes_dataset_mtl"))


def test_save_load_round_trip_predicts_identically(tmp_path: Path) -> None:
    x, y = regression_data(40, 12)
    fit = P.fit_ridge(x, y)
    probe = P.Probe(layer=0, fit=fit, rubric_names=("a", "b", "c"), ranges=((0, 8), (0, 4), (-2, 2)), max_tokens=32,
                    layer_scores=(0.25,), bos_prefix=False)
    path = save_probe(tmp_path / "probe", probe)
    assert path == tmp_path / "probe" / "probe.json"
    raw = json.loads(path.read_text())
    assert raw["format"] == "aes-probe" and raw["pooling"] == "mean" and raw["base_model"] is None
    assert len(path.read_text().splitlines()) == len(raw) + 2  # one field per line
    loaded = load_probe(tmp_path / "probe")
    assert load_probe(path).fit.coef.tolist() == loaded.fit.coef.tolist()  # the file itself works too
    x_new = regression_data(7, 12, seed=3)[0]
    np.testing.assert_array_equal(P.predict_ridge(loaded.fit, x_new), P.predict_ridge(fit, x_new))
    for name in ("mean", "scale", "coef", "intercept", "alpha", "alphas", "cv_mse"):
        np.testing.assert_array_equal(getattr(loaded.fit, name), getattr(fit, name))
    assert (loaded.layer, loaded.rubric_names, loaded.ranges, loaded.max_tokens, loaded.layer_scores,
            loaded.bos_prefix) == (0, ("a", "b", "c"), ((0, 8), (0, 4), (-2, 2)), 32, (0.25,), False)


@pytest.mark.parametrize("field,value,message", [
    ("format", "adapter", "field 'format': must be 'aes-probe'"),
    ("layer", 7, "field 'layer': 7 is not one of the 3 scored layers"),
    ("layer", True, "field 'layer': must be an integer"),
    ("max_tokens", 0, "field 'max_tokens': must be an integer >= 1"),
    ("scale", [1.0, -1.0, 1.0, 1.0], "field 'scale[1]': must be > 0"),
    ("mean", [0.0, "x", 0.0, 0.0], "field 'mean[1]': must be a finite number"),
    ("coef", [[0.0] * 4, [0.0] * 3, [0.0] * 4], "field 'coef[1]': must be a list of 4, got 3 entries"),
    ("intercept", [1.0, 2.0], "field 'intercept': must be a list of 3, got 2 entries"),
    ("rubrics", [{"name": "a", "min": 1, "max": "9"}], "field 'rubrics[0].max': must be an integer"),
    ("alpha", None, "field 'alpha': must be a list of 3, got NoneType"),
])
def test_a_corrupted_field_is_a_one_line_error_naming_file_and_field(tmp_path: Path, field, value, message) -> None:
    path = save_probe(tmp_path, toy_probe())
    raw = json.loads(path.read_text())
    raw[field] = value
    path.write_text(json.dumps(raw, indent=2))
    with pytest.raises(DataError) as err:
        load_probe(tmp_path)
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"{path}: ") and message in text


def test_missing_or_invalid_probe_file_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="probe.json: file not found"):
        load_probe(tmp_path)
    (tmp_path / "probe.json").write_text('{"format": "aes-probe",\n "layer": }')
    with pytest.raises(DataError, match=r"probe.json:2: invalid JSON"):
        load_probe(tmp_path)
    (tmp_path / "probe.json").write_text('{"format": "aes-probe", "version": 1, "mean": [NaN]}')
    with pytest.raises(DataError, match="field 'pooling'"):
        load_probe(tmp_path)
