"""Learnability baseline: TF-IDF (1-2 grams) + ridge regression per rubric, scored by test QWK.

The synthetic dataset's card reports it as a learnability check, and ``benchmarks/bench_asap.py``
as the non-neural reference row.
"""
from __future__ import annotations


def ridge_baseline(train: list[dict], test: list[dict], rubrics: list[dict]) -> dict[str, float]:
    """TF-IDF (1-2 grams) + Ridge per rubric; test QWK over each rubric's full range."""
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import Ridge
    from sklearn.metrics import cohen_kappa_score

    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    xtr, xte = vec.fit_transform([r["essay"] for r in train]), vec.transform([r["essay"] for r in test])
    res = {}
    for rb in rubrics:
        lo, hi, n = rb["min"], rb["max"], rb["name"]
        pred = Ridge(alpha=1.0).fit(xtr, [r["scores"][n] for r in train]).predict(xte)
        pred = np.clip(np.rint(pred), lo, hi).astype(int)
        res[n] = float(cohen_kappa_score([r["scores"][n] for r in test], pred,
                                         weights="quadratic", labels=list(range(lo, hi + 1))))
    return res
