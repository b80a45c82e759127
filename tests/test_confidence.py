"""Confidence signals, risk-coverage tables, conformal sets and the review rule, each against an
oracle: hand-computed values, sklearn's cohen_kappa_score (the metrics themselves: test_metrics.py)."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score, roc_auc_score

from modules import confidence as C
from modules import confidence_report as CR
from modules import review as R
from modules.metrics import agreement, auroc, expected_calibration_error
from modules.voting import INVALID

NAMES = ["content", "language"]
RANGES = [(1, 6), (0, 3)]


def synthetic_rows(n: int, seed: int, with_gold: bool = True) -> list[dict]:
    """Prediction rows as predict_split writes them; gold is drawn from the model's own distribution
    (a calibrated model), the weighted score is the rounded expected score."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        probs, weighted, expected, gold = {}, [], [], []
        for name, (lo, hi) in zip(NAMES, RANGES):
            p = rng.dirichlet(np.full(hi - lo + 1, 0.6))
            e = float(p @ np.arange(lo, hi + 1))
            probs[name], expected = p.tolist(), expected + [e]
            weighted.append(int(min(max(math.floor(e + 0.5), lo), hi)))
            gold.append(int(lo + rng.choice(hi - lo + 1, p=p)))
        rows.append({"id": f"e{i}", "gold": gold if with_gold else None, "greedy": list(weighted),
                     "weighted": weighted, "weighted_expected": expected, "probabilities": probs, "valid": True})
    return rows


def sklearn_qwk(gold, pred, lo, hi) -> float:
    return cohen_kappa_score(gold, pred, weights="quadratic", labels=list(range(lo, hi + 1)))


# ----------------------------------------------------------------------------- measures and signals

def test_distribution_measures_and_signals_by_hand():
    probs = [np.array([[0.1, 0.2, 0.7]]), np.array([[1.0, 0.0]])]
    measures = C.distribution_measures(probs, np.array([[3, 0]]), [(1, 3), (0, 1)])
    # mean 1.6 (on 0..2), E[v^2] = 0.2 + 4*0.7 = 3.0, var = 3.0 - 2.56 = 0.44
    np.testing.assert_allclose(measures["p_pred"], [[0.7, 1.0]])
    np.testing.assert_allclose(measures["std"], [[math.sqrt(0.44), 0.0]])
    h = -(0.1 * math.log(0.1) + 0.2 * math.log(0.2) + 0.7 * math.log(0.7))
    np.testing.assert_allclose(measures["entropy"], [[h, 0.0]])
    signals = C.signals_from_measures(measures, [(1, 3), (0, 1)])
    np.testing.assert_allclose(signals["p_pred"], [0.85])
    np.testing.assert_allclose(signals["neg_std"], [-(math.sqrt(0.44) / 2 + 0.0) / 2])
    np.testing.assert_allclose(signals["neg_entropy"], [-(h / math.log(3) + 0.0) / 2])


def test_sample_measures_by_hand():
    # essay 0: valid samples 2, 2, 3 (one invalid): vote 2, agreement 2/3, std of (2, 2, 3)
    # essay 1: no valid sample: agreement 0, std (6 - 1) / 2, vote the fallback
    samples = np.array([[[2], [2], [3], [INVALID]], [[INVALID]] * 4])
    measures = C.sample_measures(samples, [(1, 6)], 4)
    np.testing.assert_array_equal(measures["sc_vote"], [[2], [4]])
    np.testing.assert_allclose(measures["sc_agreement"], [[2 / 3], [0.0]])
    np.testing.assert_allclose(measures["sc_std"], [[math.sqrt(2 / 9)], [2.5]])
    signals = C.signals_from_measures(measures, [(1, 6)])
    np.testing.assert_allclose(signals["neg_sc_std"], [-math.sqrt(2 / 9) / 5, -0.5])


def test_attach_confidence_works_without_gold_and_stores_every_signal():
    rows = synthetic_rows(5, seed=1, with_gold=False)
    samples = np.random.default_rng(0).integers(0, 4, size=(5, 3, 2))
    essays = ["one two three", "a", "a b", "x y z w", ""]
    out = C.attach_confidence(rows, NAMES, RANGES, essays=essays, samples=samples, seed=3)
    assert "confidence" not in rows[0]  # copies, the input rows are left alone
    assert set(out[0]["confidence"]["essay"]) == set(C.SIGNALS)
    assert [r["confidence"]["essay"]["length"] for r in out] == [3, 1, 2, 4, 0]
    assert set(out[0]["confidence"]["per_rubric"]) == set(NAMES)
    p = out[2]["confidence"]["per_rubric"]["language"]["p_pred"]
    assert p == rows[2]["probabilities"]["language"][rows[2]["weighted"][1] - 0]
    randoms = [r["confidence"]["essay"]["random"] for r in out]
    assert randoms == C.random_confidence(5, 3).tolist()
    # without samples and essays only the distribution signals and random order remain
    plain = C.attach_confidence(rows, NAMES, RANGES)
    assert set(plain[0]["confidence"]["essay"]) == {"p_pred", "neg_std", "neg_entropy", "random"}


# ----------------------------------------------------------------------------- risk-coverage

def test_risk_coverage_by_hand_with_the_tie_rule():
    conf = np.array([0.9, 0.1, 0.5, 0.5])
    gold = np.array([[3], [1], [2], [4]])
    pred = np.array([[3], [4], [3], [4]])  # |errors| 0, 3, 1, 0; order 0, 2, 3, 1 (ties keep file order)
    table = CR.risk_coverage_table(conf, gold, pred, [(1, 6)])
    assert table["n_kept"] == [4, 4, 3, 3, 2, 2]  # floor(c * 4 + 0.5)
    assert table["mae"][4] == 0.5 and table["exact"][4] == 0.5 and table["adjacent"][4] == 1.0
    assert table["mae"][2] == pytest.approx(1 / 3) and table["adjacent"][0] == 0.75


def test_risk_coverage_qwk_matches_sklearn_on_the_kept_essays():
    rows = synthetic_rows(40, seed=2)
    gold = C.rows_scores(rows, "gold", 2)
    pred = C.rows_scores(rows, "weighted", 2)
    conf = np.random.default_rng(5).random(40)
    table = CR.risk_coverage_table(conf, gold, pred, RANGES)
    for i, c in enumerate(CR.COVERAGES):
        kept = np.argsort(-conf)[:round(c * 40)]
        expected = np.mean([sklearn_qwk(gold[kept, k], pred[kept, k], lo, hi) for k, (lo, hi) in enumerate(RANGES)])
        assert table["qwk"][i] == pytest.approx(expected, abs=1e-12), c
        assert table["mae"][i] == pytest.approx(np.abs(gold[kept] - pred[kept]).mean())


# ----------------------------------------------------------------------------- large errors and AUROC

def test_large_errors_by_hand():
    assert CR.large_error_thresholds([(1, 6), (0, 60), (0, 20)]).tolist() == [2.0, 6.0, 2.0]
    gold = np.array([[3, 30], [3, 30], [3, 30], [3, 30]])
    pred = np.array([[4, 35], [5, 30], [3, 36], [2, 24]])
    np.testing.assert_array_equal(CR.large_errors(gold, pred, [(1, 6), (0, 60)]), [False, True, True, True])


# ----------------------------------------------------------------------------- conformal sets

def test_conformal_quantile_and_sets_by_hand():
    assert R.conformal_quantile(np.arange(1, 20) / 20, 0.9) == 0.9   # rank ceil(20 * 0.9) = 18 of 19
    assert R.conformal_quantile(np.arange(1, 11) / 10, 0.9) == 1.0   # rank ceil(11 * 0.9) = 10 of 10
    assert R.conformal_quantile(np.arange(1, 6) / 10, 0.9) == 1.0    # rank 6 > 5: every score
    probs = np.array([[0.5, 0.3, 0.15, 0.05], [0.05, 0.05, 0.1, 0.8]])
    assert R.score_sets(probs, 0.75, 1) == [[1, 2], [4]]
    assert R.score_sets(probs, 0.1, 1) == [[1], [4]]  # nothing reaches p >= 0.9: the argmax alone
    assert R.score_sets(np.array([[0.25, 0.75]]), 0.75, 0) == [[0, 1]]  # 1 - p = quantile is inside
    assert R.set_coverage([[1, 2], [4]], np.array([2, 3])) == (0.5, 1.5)


def test_conformal_sets_keep_their_coverage_guarantee():
    """Gold drawn from the model's own distribution; calibrated on 20 essays, coverage on 200 fresh ones,
    averaged over 300 trials: at least the target (the finite-sample correction: ceil(21 * 0.9) / 21 =
    0.905 expected; without it 18/21 = 0.857), and not far above."""
    rng = np.random.default_rng(0)
    reached = []
    for _ in range(300):
        probs = rng.dirichlet(np.full(6, 0.5), size=220)
        gold = np.array([rng.choice(6, p=p) for p in probs])
        q = R.conformal_quantile(R.lac_scores(probs[:20], gold[:20], 0), 0.9)
        reached.append(R.set_coverage(R.score_sets(probs[20:], q, 0), gold[20:])[0])
    assert 0.9 - 0.01 <= np.mean(reached) <= 0.93


# ----------------------------------------------------------------------------- review threshold

def test_review_threshold_for_a_fraction_by_hand():
    conf = np.array([0.9, 0.1, 0.5, 0.7, 0.3])
    t = R.threshold_for_review_fraction(conf, 0.4)  # keep 3: the 3rd highest is 0.5
    assert t == 0.5
    np.testing.assert_array_equal(R.review_flags(conf, t), [False, True, False, False, True])
    assert R.threshold_for_review_fraction(conf, 1.0) is None
    assert R.review_flags(conf, None).all()


def test_review_threshold_for_a_minimum_qwk_keeps_the_most_essays_that_reach_it():
    rows = synthetic_rows(60, seed=4)
    gold, pred = C.rows_scores(rows, "gold", 2), C.rows_scores(rows, "weighted", 2)
    conf = -np.abs(gold - pred).sum(axis=1) + np.random.default_rng(1).random(60) * 0.5  # informative
    qwk_all = agreement(gold, pred, RANGES)["qwk"]
    t = R.threshold_for_min_qwk(conf, gold, pred, RANGES, qwk_all + 0.05)
    kept = conf >= t
    assert 0 < kept.sum() < 60
    assert agreement(gold[kept], pred[kept], RANGES)["qwk"] >= qwk_all + 0.05
    lower = np.unique(conf)[np.unique(conf) < t]  # every threshold keeping more essays fails
    assert all(agreement(gold[conf >= u], pred[conf >= u], RANGES)["qwk"] < qwk_all + 0.05 for u in lower)
    assert R.threshold_for_min_qwk(conf, gold, pred, RANGES, 1.01) is None


@pytest.mark.parametrize("target", [{"review_fraction": 0.3}, {"min_qwk": 0.5}])
def test_review_threshold_never_looks_at_test_gold(target):
    valid, test = synthetic_rows(50, seed=6), synthetic_rows(40, seed=7)
    report, calibration = CR.confidence_report(valid, test, NAMES, RANGES, **target)
    flags = [r["review"] for r in CR.apply_calibration(test, calibration)]
    scrambled = copy.deepcopy(test)
    rng = np.random.default_rng(0)
    for row in scrambled:
        row["gold"] = [int(rng.integers(lo, hi + 1)) for lo, hi in RANGES]
    report2, calibration2 = CR.confidence_report(valid, scrambled, NAMES, RANGES, **target)
    assert calibration2 == calibration
    assert [r["review"] for r in CR.apply_calibration(scrambled, calibration2)] == flags
    assert report2["review"]["test"]["review_share"] == report["review"]["test"]["review_share"]
    assert report2["signals"] != report["signals"]  # the test gold did change what is measured


# ----------------------------------------------------------------------------- the report

def test_confidence_report_end_to_end():
    valid, test = synthetic_rows(80, seed=8), synthetic_rows(60, seed=9)
    essays = [" ".join(["w"] * (i + 1)) for i in range(60)]
    samples = np.random.default_rng(2).integers(-1, 4, size=(60, 4, 2))
    report, calibration = CR.confidence_report(valid, test, NAMES, RANGES, test_essays=essays,
                                              valid_essays=essays[:50] + essays[:30], test_samples=samples)
    assert set(report["signals"]) == set(C.SIGNALS)
    assert calibration["signal"] in {"p_pred", "neg_std", "neg_entropy", "length"}  # picked on validation
    gold, pred = C.rows_scores(test, "gold", 2), C.rows_scores(test, "weighted", 2)
    qwk_all = np.mean([sklearn_qwk(gold[:, k], pred[:, k], lo, hi) for k, (lo, hi) in enumerate(RANGES)])
    for s in report["signals"].values():
        assert s["qwk"][0] == pytest.approx(qwk_all) and len(s["curve_mae"]) == 60
    assert report["review"]["test_qwk_all"] == pytest.approx(qwk_all)
    # conformal: the quantiles come from validation, the coverage is measured on test
    gold_v = C.rows_scores(valid, "gold", 2)
    for k, (name, (lo, hi)) in enumerate(zip(NAMES, RANGES)):
        p_v = np.array([r["probabilities"][name] for r in valid])
        q = calibration["conformal"]["quantiles"][name]
        assert q == R.conformal_quantile(1 - p_v[np.arange(80), gold_v[:, k] - lo], 0.9)
        p_t = np.array([r["probabilities"][name] for r in test])
        inside = [(1 - p_t[i, gold[i, k] - lo] <= q) or p_t[i].argmax() == gold[i, k] - lo for i in range(60)]
        assert report["conformal"]["coverage"][name] == pytest.approx(np.mean(inside))
    p_pred = np.array([[r["probabilities"][n][r["weighted"][k] - RANGES[k][0]] for k, n in enumerate(NAMES)]
                       for r in test])
    assert report["calibration"]["ece"] == pytest.approx(expected_calibration_error(p_pred, pred == gold))
    text = CR.format_confidence_report(report)
    for needle in ("p_pred: AURC", "sc_agreement: AURC", "ECE of p(predicted score)", "conformal score sets (LAC",
                   "review (review 20% on validation"):
        assert needle in text, needle
    applied = CR.apply_calibration(synthetic_rows(7, seed=10, with_gold=False), calibration,
                                  essays=essays[:7])
    assert all(isinstance(r["review"], bool) and set(r["score_sets"]) == set(NAMES) for r in applied)


def test_report_refuses_rows_without_gold_and_apply_needs_its_signal_inputs():
    valid, test = synthetic_rows(10, seed=1), synthetic_rows(10, seed=2, with_gold=False)
    with pytest.raises(ValueError, match="needs gold"):
        CR.confidence_report(valid, test, NAMES, RANGES)
    calibration = CR.confidence_report(valid, synthetic_rows(10, seed=3), NAMES, RANGES)[1]
    with pytest.raises(ValueError, match="sample bank"):
        CR.apply_calibration(test, {**calibration, "signal": "sc_agreement"})
    with pytest.raises(ValueError, match="weighted distributions"):
        CR.apply_calibration([{**r, "probabilities": None} for r in test], {**calibration, "signal": "neg_std"})


def test_sample_bank_report_judges_the_majority_vote():
    rng = np.random.default_rng(3)
    gold = np.stack([rng.integers(lo, hi + 1, 30) for lo, hi in RANGES], axis=1)
    samples = np.clip(gold[:, None, :] + rng.integers(-2, 3, size=(30, 5, 2)), [1, 0], [6, 3])
    report, signals, measures = CR.sample_bank_report(samples, gold, RANGES, [3, 1], essays=["a b"] * 30, seed=0)
    assert set(report["signals"]) == {"sc_agreement", "neg_sc_std", "length", "random"}
    vote = measures["sc_vote"]
    assert report["signals"]["random"]["mae"][0] == pytest.approx(np.abs(vote - gold).mean())
    errors = CR.large_errors(gold, vote, RANGES)
    assert report["signals"]["sc_agreement"]["auroc"] == pytest.approx(
        roc_auc_score(errors, -signals["sc_agreement"]))


# ----------------------------------------------------------------------------- figures

def test_confidence_figures_are_real_pngs(tmp_path):
    import matplotlib.image

    from modules.plots import plot_reliability, plot_risk_coverage

    report, _ = CR.confidence_report(synthetic_rows(40, seed=11), synthetic_rows(30, seed=12), NAMES, RANGES)
    for name, draw, data in (("risk.png", plot_risk_coverage, report["signals"]),
                             ("reliability.png", plot_reliability, report["calibration"])):
        fig = draw(data, tmp_path / name, "synthetic")
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = matplotlib.image.imread(tmp_path / name)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
        lines = [line for ax in fig.axes for line in ax.get_lines()]
        assert lines, name
    risk_fig = plot_risk_coverage(report["signals"], tmp_path / "again.png", "synthetic")
    labels = risk_fig.axes[0].get_legend_handles_labels()[1]
    assert len(labels) == len(report["signals"]) and any(l.startswith("random") for l in labels)


def test_evaluate_confidence_writes_the_calibration_and_figures(tmp_path):
    import json

    from modules.data import DatasetInfo, Rubric
    from modules.evaluation import evaluate_confidence

    info = DatasetInfo(rubrics=tuple(Rubric(n, lo, hi) for n, (lo, hi) in zip(NAMES, RANGES)))
    valid, test = synthetic_rows(40, seed=13), synthetic_rows(30, seed=14)
    essays = [" ".join(["w"] * (i % 7 + 1)) for i in range(40)]
    rows, report, calibration = evaluate_confidence(valid, test, info, tmp_path / "run", valid_essays=essays,
                                                    test_essays=essays[:30], title="synthetic", review_fraction=0.25)
    saved = json.loads((tmp_path / "run" / "confidence_calibration.json").read_text())
    assert saved == json.loads(json.dumps(calibration)) and saved["review"]["review_fraction"] == 0.25
    for name in ("risk_coverage.png", "reliability_diagram.png"):
        assert (tmp_path / "run" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    # the stored rows are what applying the saved calibration to the test essays gives, gold unused
    no_gold = [{**r, "gold": None} for r in test]
    again = CR.apply_calibration(no_gold, saved, essays=essays[:30])
    assert [r["review"] for r in rows] == [r["review"] for r in again]
    assert [r["score_sets"] for r in rows] == [r["score_sets"] for r in again]
    assert sum(r["review"] for r in rows) / 30 == report["review"]["test"]["review_share"]
    # the stored random order is the one the report measured
    random_auroc = auroc(np.array([r["confidence"]["essay"]["random"] for r in rows]),
                           CR.large_errors(C.rows_scores(test, "gold", 2), C.rows_scores(test, "weighted", 2), RANGES))
    assert random_auroc == report["signals"]["random"]["auroc"]
