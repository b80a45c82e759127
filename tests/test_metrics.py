"""modules.metrics against independent oracles: sklearn (cohen_kappa_score, roc_auc_score,
mean_squared_error) and hand-computed cases."""
from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score, mean_squared_error, roc_auc_score

from modules import metrics as M

RANGES = [(0, 4), (0, 4)]
GOLD_TEST = [[0, 1], [1, 1], [2, 2], [3, 3], [4, 4], [2, 3], [1, 0], [3, 4]]


def shifted(gold, k: int, step: int = 1, lo: int = 0, hi: int = 4) -> list[list[int]]:
    """gold with every `step`-th essay's first rubric moved by k (clipped): a controlled error."""
    return [[min(max(g[0] + (k if i % step == 0 else 0), lo), hi), g[1]] for i, g in enumerate(gold)]


# ----------------------------------------------------------------------------- agreement


def test_agreement_by_hand():
    gold = np.array([[3, 0], [1, 2], [2, 2], [4, 3]])
    pred = np.array([[3, 1], [4, 2], [3, 2], [4, 3]])  # |errors| 0 1 / 3 0 / 1 0 / 0 0
    got = M.agreement(gold, pred, [(1, 6), (0, 3)])
    assert got["exact"] == 5 / 8 and got["adjacent"] == 7 / 8 and got["mae"] == 5 / 8
    expected = np.mean([cohen_kappa_score(gold[:, 0], pred[:, 0], weights="quadratic", labels=list(range(1, 7))),
                        cohen_kappa_score(gold[:, 1], pred[:, 1], weights="quadratic", labels=list(range(0, 4)))])
    assert got["qwk"] == pytest.approx(expected, abs=1e-12)


def test_rubric_qwks_match_sklearn() -> None:
    pred = shifted(GOLD_TEST, 1, step=2)
    expected = [cohen_kappa_score(np.array(GOLD_TEST)[:, k], np.array(pred)[:, k], weights="quadratic",
                                  labels=list(range(0, 5))) for k in range(2)]
    assert M.rubric_qwks(GOLD_TEST, pred, RANGES) == pytest.approx(expected)
    assert M.mean_qwk(GOLD_TEST, pred, RANGES) == pytest.approx(np.mean(expected))


def test_batched_qwk_matches_qwk_on_resamples() -> None:
    rng = np.random.default_rng(3)
    gold = rng.integers(0, 5, (40, 2))
    pred = np.clip(gold + rng.integers(-1, 2, (40, 2)), 0, 4)
    idx = rng.integers(0, 40, (25, 40))
    batched = M.batched_mean_qwk(gold[idx], pred[idx])
    assert batched == pytest.approx([M.mean_qwk(gold[i], pred[i], RANGES) for i in idx])
    constant = np.full((1, 5, 1), 2)  # kappa undefined: 0, as modules.voting.qwk
    assert M.batched_mean_qwk(constant, constant).tolist() == [0.0]


def test_mcrmse_by_hand_and_sklearn() -> None:
    gold = [[2, 4], [6, 10]]           # stored doubled: 1.0 2.0 / 3.0 5.0
    pred = [[3.0, 4.0], [6.0, 7.0]]    # 1.5 2.0 / 3.0 3.5
    # column 0: errors 0.5, 0 -> sqrt(0.125); column 1: 0, -1.5 -> sqrt(1.125)
    by_hand = (math.sqrt(0.125) + math.sqrt(1.125)) / 2
    assert M.mcrmse(gold, pred, [2, 2]) == pytest.approx(by_hand)
    oracle = np.mean([math.sqrt(mean_squared_error(np.array(gold)[:, k] / 2, np.array(pred)[:, k] / 2)) for k in range(2)])
    assert M.mcrmse(gold, pred, [2, 2]) == pytest.approx(oracle)
    assert M.mcrmse(gold, pred, [1, 1]) == pytest.approx(2 * by_hand)  # scale 1: stored units


# ----------------------------------------------------------------------------- selective scoring

def test_risk_curve_and_aurc_by_hand_with_the_tie_rule():
    conf = np.array([0.9, 0.1, 0.5, 0.5])
    gold = np.array([[3], [1], [2], [4]])
    pred = np.array([[3], [4], [3], [4]])  # |errors| 0, 3, 1, 0
    # order 0, 2, 3, 1 (tie 2/3 keeps file order); MAE of the top k: 0, 1/2, 1/3, 1
    np.testing.assert_array_equal(M.confidence_order(conf), [0, 2, 3, 1])
    np.testing.assert_allclose(M.risk_curve(conf, gold, pred), [0, 0.5, 1 / 3, 1.0])
    assert M.aurc(conf, gold, pred) == pytest.approx((0 + 0.5 + 1 / 3 + 1) / 4)


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    conf = rng.integers(0, 6, 50).astype(float)  # many ties
    errors = rng.random(50) < 0.3
    assert M.auroc(conf, errors) == pytest.approx(roc_auc_score(errors, -conf), abs=1e-12)


def test_auroc_by_hand_and_undefined():
    # errors at confidences 0.1 and 0.5; correct at 0.5 and 0.9: pairs (0.1<0.5 win, 0.1<0.9 win,
    # 0.5=0.5 half, 0.5<0.9 win) -> 3.5 / 4
    assert M.auroc(np.array([0.1, 0.5, 0.5, 0.9]), np.array([True, True, False, False])) == 0.875
    assert M.auroc(np.array([0.1, 0.2]), np.array([False, False])) is None


# ----------------------------------------------------------------------------- calibration

def test_ece_and_reliability_bins_by_hand():
    p = np.array([0.05, 0.15, 0.95, 1.0, 0.92])
    correct = np.array([0, 1, 1, 1, 0])
    # bins: [0, .1): .05 vs 0; [.1, .2): .15 vs 1; [.9, 1]: mean .95667 vs 2/3
    assert M.expected_calibration_error(p, correct) == pytest.approx(0.2 * 0.05 + 0.2 * 0.85 + 0.6 * 0.29)
    bins = M.reliability_bins(p, correct)
    assert [b["count"] for b in bins] == [1, 1, 0, 0, 0, 0, 0, 0, 0, 3]
    assert bins[9]["accuracy"] == pytest.approx(2 / 3) and bins[2]["accuracy"] is None


# ----------------------------------------------------------------------------- hierarchical bootstrap


def mean_pred(gold, pred) -> np.ndarray:
    """A batched metric whose differences are known by hand: the mean prediction of each resample."""
    return np.asarray(pred, dtype=np.float64).mean(axis=(1, 2))


def test_bootstrap_identical_methods_give_zero() -> None:
    preds = [shifted(GOLD_TEST, 1, step=2), shifted(GOLD_TEST, -1, step=3)]

    assert M.hierarchical_bootstrap(GOLD_TEST, preds, preds, M.batched_mean_qwk, 200) == (0.0, 0.0, 0.0)


def test_bootstrap_constant_offset_gives_it_with_zero_width() -> None:
    b = [np.array(GOLD_TEST, dtype=float), np.array(GOLD_TEST, dtype=float) + 1.0]
    a = [x + 0.25 for x in b]
    point, lo, hi = M.hierarchical_bootstrap(GOLD_TEST, a, b, mean_pred, 300)
    assert point == pytest.approx(0.25) and lo == pytest.approx(0.25) and hi == pytest.approx(0.25)


def test_bootstrap_interval_covers_the_seeds() -> None:
    # Two seeds whose differences are constant over essays, 0.2 and 0.6: the seed draw gives
    # 0.2 (p 1/4), 0.4 (1/2) or 0.6 (1/4), so the 95% interval is [0.2, 0.6] around the mean 0.4.
    b = [np.zeros((8, 2)), np.zeros((8, 2))]
    a = [np.full((8, 2), 0.2), np.full((8, 2), 0.6)]
    point, lo, hi = M.hierarchical_bootstrap(GOLD_TEST, a, b, mean_pred, 2000, seed=1)
    assert point == pytest.approx(0.4) and lo == pytest.approx(0.2) and hi == pytest.approx(0.6)


def test_bootstrap_one_seed_covers_essays() -> None:
    b = [np.zeros((8, 1))]
    a = [np.arange(8, dtype=float).reshape(8, 1)]  # per-essay differences 0..7, mean 3.5
    point, lo, hi = M.hierarchical_bootstrap(np.zeros((8, 1)), a, b, mean_pred, 2000)
    assert point == pytest.approx(3.5) and 0 <= lo < 3.5 < hi <= 7 and hi - lo > 1
    with pytest.raises(ValueError, match="same, non-zero number of seeds"):
        M.hierarchical_bootstrap(GOLD_TEST, a, [], mean_pred, 10)
