"""Non-neural baselines: TF-IDF (1-2 grams) + ridge regression per rubric (at alpha 1, or with alpha
tuned by cross-validation), a ridge on the essay's length alone, and the training mean.

The synthetic dataset's card reports the TF-IDF ridge as a learnability check, and
``benchmarks/bench_real_essays.py`` reports both (and the training mean) as the rows a fine-tuned LLM has to beat.
"""
from __future__ import annotations


def _ridge_scores(x_train, x_test, train: list[dict], rubrics: list[dict]) -> dict[str, list[int]]:
    """A ridge per rubric on the given features: each test essay's score, rounded and clipped."""
    import numpy as np
    from sklearn.linear_model import Ridge

    out = {}
    for rb in rubrics:
        pred = Ridge(alpha=1.0).fit(x_train, [r["scores"][rb["name"]] for r in train]).predict(x_test)
        out[rb["name"]] = np.clip(np.rint(pred), rb["min"], rb["max"]).astype(int).tolist()
    return out


def ridge_predictions(train: list[dict], test: list[dict], rubrics: list[dict]) -> dict[str, list[int]]:
    """TF-IDF (1-2 grams, sublinear tf) + ridge per rubric, fit on ``train``."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    return _ridge_scores(vec.fit_transform([r["essay"] for r in train]), vec.transform([r["essay"] for r in test]),
                         train, rubrics)


# The tuned ridge's alpha grid: 10^-2 .. 10^2 in half decades (9 values); TF-IDF rows have unit length.
TUNED_ALPHAS: tuple[float, ...] = tuple(float(10.0 ** (e / 2)) for e in range(-4, 5))


def tuned_ridge(train: list[dict], test: list[dict], rubrics: list[dict], *,
                alphas: tuple[float, ...] = TUNED_ALPHAS, n_folds: int = 5, seed: int = 0) -> dict[str, dict]:
    """TF-IDF (1-2 grams, sublinear tf, min_df 2, fit on ``train``) + a ridge per rubric whose alpha
    is chosen by K-fold cross-validation on the training essays only.

    Per rubric, alpha is the value of ``alphas`` with the lowest mean over the folds of the held-out
    fold's mean squared error (ties: the smaller alpha), folds ``KFold(min(n_folds, N),
    shuffle=True, random_state=seed)`` over the training essays; this is
    ``RidgeCV(alphas, cv=folds, scoring="neg_mean_squared_error")``, written as the grid search it
    runs so the curve is kept. The TF-IDF vocabulary and weights are fit on all training essays
    once, before the folds. The ridge at that alpha is then refit on all training essays.

    Returns ``{"scores": {rubric: [int]}, "continuous": {rubric: [float]}, "alpha": {rubric: float},
    "cv_mse": {rubric: [float] per alpha}}``: ``continuous`` is each test essay's prediction clipped
    to the rubric's range (for MCRMSE on unrounded scores), ``scores`` it rounded half up
    (floor(x + 0.5)).
    """
    import math

    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import GridSearchCV, KFold

    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    x_train = vec.fit_transform([r["essay"] for r in train])
    x_test = vec.transform([r["essay"] for r in test])
    folds = KFold(n_splits=min(n_folds, len(train)), shuffle=True, random_state=seed)
    out: dict[str, dict] = {"scores": {}, "continuous": {}, "alpha": {}, "cv_mse": {}}
    for rb in rubrics:
        y = np.array([r["scores"][rb["name"]] for r in train], dtype=np.float64)
        search = GridSearchCV(Ridge(), {"alpha": list(alphas)}, cv=folds, scoring="neg_mean_squared_error").fit(x_train, y)
        pred = np.clip(search.best_estimator_.predict(x_test), rb["min"], rb["max"])
        out["continuous"][rb["name"]] = [float(p) for p in pred]
        out["scores"][rb["name"]] = [int(math.floor(p + 0.5)) for p in pred]
        out["alpha"][rb["name"]] = float(search.best_params_["alpha"])
        out["cv_mse"][rb["name"]] = [float(-v) for v in search.cv_results_["mean_test_score"]]
    return out


def length_predictions(train: list[dict], test: list[dict], rubrics: list[dict]) -> dict[str, list[int]]:
    """Ridge per rubric on the essay's length alone: words and log(1 + words)."""
    import numpy as np

    def features(records: list[dict]) -> np.ndarray:
        words = np.array([len(r["essay"].split()) for r in records], dtype=np.float64)
        return np.stack([words, np.log1p(words)], axis=1)

    return _ridge_scores(features(train), features(test), train, rubrics)


def mean_predictions(train: list[dict], test: list[dict], rubrics: list[dict]) -> dict[str, list[int]]:
    """Per rubric the mean training score, rounded half up (floor(mean + 0.5)) and clipped to the
    rubric's range, for every test essay: what a scorer that ignores the essay gets."""
    import math

    out = {}
    for rb in rubrics:
        mean = sum(r["scores"][rb["name"]] for r in train) / len(train)
        out[rb["name"]] = [min(max(math.floor(mean + 0.5), rb["min"]), rb["max"])] * len(test)
    return out


def ridge_baseline(train: list[dict], test: list[dict], rubrics: list[dict]) -> dict[str, float]:
    """Test QWK of :func:`ridge_predictions` per rubric, over each rubric's full range."""
    from sklearn.metrics import cohen_kappa_score

    predictions = ridge_predictions(train, test, rubrics)
    return {rb["name"]: float(cohen_kappa_score([r["scores"][rb["name"]] for r in test], predictions[rb["name"]],
                                                weights="quadratic", labels=list(range(rb["min"], rb["max"] + 1))))
            for rb in rubrics}


TUNED_RIDGE = "TF-IDF ridge, alpha by CV"  # the row name of the tuned ridge in the real-essay benchmark


def baseline_rows(train: list[dict], scored: list[dict], rubrics: list[dict],
                  full_train: list[dict] | None = None) -> tuple[dict[str, list[list[int]]], dict[str, list[list[float]]]]:
    """Per-essay predictions ([N][K]) of ``scored`` by every baseline fit on ``train``: the TF-IDF ridge
    with alpha by cross-validation (:func:`tuned_ridge`), the untuned one at alpha 1 (also fit on
    ``full_train``, every training essay, when given), the essay-length ridge and the training mean;
    and the tuned ridge's unrounded predictions (clipped to range), for MCRMSE on unrounded scores."""
    def rows(per_rubric: dict[str, list]) -> list[list]:
        return [list(scores) for scores in zip(*(per_rubric[r["name"]] for r in rubrics))]

    tuned = tuned_ridge(train, scored, rubrics)
    out = {TUNED_RIDGE: rows(tuned["scores"]), "TF-IDF ridge, same essays": rows(ridge_predictions(train, scored, rubrics))}
    if full_train is not None:
        out["TF-IDF ridge, all train essays"] = rows(ridge_predictions(full_train, scored, rubrics))
    out["essay-length ridge"] = rows(length_predictions(train, scored, rubrics))
    out["training mean"] = rows(mean_predictions(train, scored, rubrics))
    return out, {TUNED_RIDGE: [[round(v, 4) for v in row] for row in rows(tuned["continuous"])]}
