"""QWK-vs-m figures read as a person expects, degenerate runs included."""
from __future__ import annotations

import numpy as np
import pytest

from modules.curves import bootstrap_curves, qwk_curves
from modules.plots import plot_average, plot_overall, plot_per_rubric, qwk_ylim
from modules.voting import INVALID

RANGES = [(1, 6), (1, 4), (0, 3)]
NAMES = ["content", "style", "mechanics"]


def curves_of(samples: np.ndarray, gold: np.ndarray, bootstrap: bool = True) -> dict:
    """Curves as self_consistency.analyze_bank builds them, invalid-sample count included."""
    curves = qwk_curves(samples, gold, RANGES, None, rubric_names=NAMES)
    if bootstrap:
        curves["bootstrap"] = bootstrap_curves(samples, gold, RANGES, None, n_orderings=10, seed=0, rubric_names=NAMES)
    invalid = int((samples == INVALID).all(axis=2).sum())
    curves.update(invalid_rate=invalid / samples.shape[0] / samples.shape[1], invalid_samples=invalid)
    return curves


@pytest.fixture
def gold() -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.stack([rng.integers(lo, hi + 1, 12) for lo, hi in RANGES], axis=1)


def y_axes(fig) -> list:
    return [ax for ax in fig.axes if ax.get_visible()]


def test_all_invalid_run_has_a_readable_axis_and_says_so(gold, tmp_path):
    # An untrained adapter: no sample parses, every vote is the fallback (the midpoints), and every
    # curve is flat (each rubric's at 0). Autoscaling made that a 1e-17 offset axis from -5 to 0.
    samples = np.full((12, 5, 3), INVALID)
    curves = curves_of(samples, gold)
    assert len(set(curves["overall_avg"])) == 1 and set(curves["avgk_maj"]) == {0.0}
    for plot in (plot_overall, plot_average, plot_per_rubric):
        fig = plot(curves, None, tmp_path / f"{plot.__name__}.png", "adapter on tiny-random-llama")
        assert (tmp_path / f"{plot.__name__}.png").stat().st_size > 0
        fig.canvas.draw()
        for ax in y_axes(fig):
            assert ax.get_ylim() == (-0.1, 1.0)
            assert ax.yaxis.get_major_formatter().get_offset() == ""
        titles = [ax.get_title() for ax in fig.axes] + [fig._suptitle.get_text() if fig._suptitle else ""]
        assert any("invalid samples: 60 of 60 (100.0%), every vote is the fallback score" in t for t in titles), titles


def test_axis_widens_only_for_values_outside_and_counts_invalid(gold, tmp_path):
    rng = np.random.default_rng(1)
    samples = np.stack([rng.integers(lo, hi + 1, (12, 5)) for lo, hi in RANGES], axis=2)
    samples[0, :2] = INVALID
    samples[3, 4] = INVALID
    curves = curves_of(samples, gold, bootstrap=False)
    # Overall curves lie in [0.06, 0.31]: only the -0.28 baseline is outside. The margin takes it
    # to -0.33, whose next 0.1 below is -0.4 (without the margin the axis would end at -0.3).
    baselines = {"token": {"overall": -0.28, "average": -0.26}, "weighted": {"overall": 0.5}}
    assert -0.21 < min(curves["avgk_avg"] + curves["avgk_maj"]) < -0.2 and min(curves["overall_maj"]) > 0
    fig = plot_overall(curves, baselines, tmp_path / "o.png", "t")
    assert fig.axes[0].get_ylim() == (-0.4, 1.0)
    assert "invalid samples: 3 of 60 (5.0%)" in fig.axes[0].get_title()
    assert "fallback" not in fig.axes[0].get_title()
    # Average-QWK curves reach -0.209; the -0.26 baseline (-0.31 with the margin) sets -0.4.
    fig = plot_average(curves, baselines, tmp_path / "a.png", "t")
    assert fig.axes[0].get_ylim() == (-0.4, 1.0)
    # Without the baselines the curves' own -0.209 (-0.259 with the margin) sets -0.3.
    fig = plot_average(curves, None, tmp_path / "a.png", "t")
    assert fig.axes[0].get_ylim() == (-0.3, 1.0)


def test_qwk_ylim():
    assert qwk_ylim([]) == (-0.1, 1.0)
    assert qwk_ylim([0.0, 1e-17, None, float("nan")]) == (-0.1, 1.0)
    assert qwk_ylim([-0.1, 1.0]) == (-0.1, 1.0)
    assert qwk_ylim([-0.52, 0.3]) == (-0.6, 1.0)
    assert qwk_ylim([1.0000001]) == (-0.1, 1.1)
    # Within the 0.05 margin of a tenth, the axis goes one tenth further.
    assert qwk_ylim([-0.18]) == (-0.3, 1.0)
    assert qwk_ylim([1.06]) == (-0.1, 1.2)
