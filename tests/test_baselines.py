"""The cross-validated TF-IDF ridge baseline (modules/convert/baseline.py, ``tuned_ridge``) against an
explicit KFold loop and scikit-learn's RidgeCV, on a cut of the shipped dataset."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from modules.convert.baseline import TUNED_ALPHAS, tuned_ridge

DATA = Path(__file__).resolve().parents[1] / "aes_dataset_mtl"


def records(split: str, n: int) -> list[dict]:
    return [json.loads(line) for line in (DATA / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()[:n]]


@pytest.fixture(scope="module")
def data() -> tuple[list[dict], list[dict], list[dict]]:
    rubrics = [{k: r[k] for k in ("name", "min", "max")} for r in json.loads((DATA / "dataset.json").read_text())["rubrics"]]
    return records("train", 90), records("test", 25), rubrics


@pytest.fixture(scope="module")
def tuned(data) -> dict:
    return tuned_ridge(*data)


def test_alpha_is_what_an_explicit_kfold_loop_picks(data, tuned) -> None:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import Ridge, RidgeCV
    from sklearn.model_selection import KFold

    train, _, rubrics = data
    x = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True).fit_transform([r["essay"] for r in train])
    folds = list(KFold(n_splits=5, shuffle=True, random_state=0).split(x))
    for rb in rubrics:
        y = np.array([r["scores"][rb["name"]] for r in train], dtype=np.float64)
        mse = [np.mean([np.mean((Ridge(alpha=a).fit(x[tr], y[tr]).predict(x[te]) - y[te]) ** 2) for tr, te in folds])
               for a in TUNED_ALPHAS]
        np.testing.assert_allclose(tuned["cv_mse"][rb["name"]], mse, rtol=1e-7)
        assert tuned["alpha"][rb["name"]] == TUNED_ALPHAS[int(np.argmin(mse))]
        ridge_cv = RidgeCV(alphas=TUNED_ALPHAS, cv=folds, scoring="neg_mean_squared_error").fit(x, y)
        assert tuned["alpha"][rb["name"]] == ridge_cv.alpha_
    # The choice matters here: the rubrics do not all sit at one alpha.
    assert len(set(tuned["alpha"].values())) > 1


def test_predictions_are_clipped_half_up_integers_in_range(data, tuned) -> None:
    train, test, rubrics = data
    for rb in rubrics:
        scores, continuous = tuned["scores"][rb["name"]], tuned["continuous"][rb["name"]]
        assert len(scores) == len(continuous) == len(test)
        assert all(type(s) is int and rb["min"] <= s <= rb["max"] for s in scores)
        assert all(rb["min"] <= c <= rb["max"] for c in continuous)
        assert scores == [math.floor(c + 0.5) for c in continuous]


def test_out_of_range_predictions_are_clipped(data) -> None:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import Ridge

    train, test, rubrics = data
    narrow = [{"name": rubrics[0]["name"], "min": 4, "max": 5}]  # most predictions fall outside 4..5
    out = tuned_ridge(train, test, narrow, alphas=(1.0,))
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    x = vec.fit_transform([r["essay"] for r in train])
    raw = Ridge(alpha=1.0).fit(x, [r["scores"][narrow[0]["name"]] for r in train]).predict(
        vec.transform([r["essay"] for r in test]))
    assert (raw < 4).any() and (raw > 5).any()
    np.testing.assert_allclose(out["continuous"][narrow[0]["name"]], np.clip(raw, 4, 5), rtol=1e-12)
    assert set(out["scores"][narrow[0]["name"]]) <= {4, 5}


def test_a_half_rounds_up() -> None:
    # Identical training essays: the ridge predicts the training mean, 4.5 exactly, for any essay.
    essay = "The same essay about phones in class, written twice and again."
    train = [{"essay": essay, "scores": {"a": 4 + i % 2}} for i in range(10)]
    test = [{"essay": "Another essay about phones."}]
    out = tuned_ridge(train, test, [{"name": "a", "min": 1, "max": 9}])
    assert out["continuous"] == {"a": [4.5]} and out["scores"] == {"a": [5]}
    assert out["alpha"] == {"a": TUNED_ALPHAS[0]}  # every alpha ties: the smallest
