"""Non-neural baselines: TF-IDF (1-2 grams) + ridge regression per rubric, a ridge on the
essay's length alone, and the training mean.

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
