"""QWK-vs-m figures of a self-consistency run (SPEC §2, §6).

Every panel draws the two votes (average, majority). With a bootstrap in ``curves`` the solid
line is the mean over random orderings of each essay's samples and the shaded band its 95%
interval; the thin dotted line is the curve of the bank's own sample order (``qwk_curves``),
which is what a single real run of m samples would have given. Training baselines (greedy
``token`` and probability-weighted ``weighted`` QWK from ``evaluation_results.json``) are
horizontal lines. The Agg backend is used so plotting works on headless machines.

Degenerate runs must read as such: the QWK axis keeps a fixed range (-0.1 to 1, widened only to
show a value outside it), so flat curves of an untrained adapter are a flat line near 0, not a
zoomed-in axis with a 1e-17 offset; and every figure says how many samples were invalid.
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend choice)
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

VOTES = (("avg", "average vote", "tab:blue"), ("maj", "majority vote", "tab:orange"))
BASELINES = (("token", "greedy", "tab:green", "--"), ("weighted", "weighted", "tab:red", ":"))
QWK_RANGE = (-0.1, 1.0)
_MARGIN = 0.05  # room below a value that widens the axis, so its line does not sit on the frame


def _baseline(baselines: dict | None, table: str, key: str) -> float | None:
    block = (baselines or {}).get(table)
    value = block.get(key) if isinstance(block, dict) else None
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def qwk_ylim(values) -> tuple[float, float]:
    """The QWK axis: QWK_RANGE, widened (to a multiple of 0.1) only when a finite value falls outside."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    lo, hi = QWK_RANGE
    if finite and min(finite) < lo:
        lo = math.floor((min(finite) - _MARGIN) * 10) / 10
    if finite and max(finite) > hi:
        hi = math.ceil((max(finite) + _MARGIN) * 10) / 10
    return lo, hi


def invalid_note(curves: dict) -> str | None:
    """"invalid samples: X of Y (Z%)" for a run's curves; None when they do not say."""
    invalid = curves.get("invalid_samples")
    if invalid is None or not curves.get("n_essays") or not curves.get("ms"):
        return None
    total = curves["n_essays"] * curves["ms"][-1]
    note = f"invalid samples: {invalid} of {total} ({100 * invalid / total:.1f}%)"
    # Every vote is then the fallback score: the curves measure the fallback, not the model.
    return note + ", every vote is the fallback score" if invalid == total else note


def _panel(ax, curves: dict, kind: str, baselines: dict | None, baseline_key: str, rubric: str | None = None,
           legend: bool = True) -> list[float]:
    """One axes: both votes for curve family ``kind`` (overall / avgk / per_rubric); returns the
    values drawn, for the y range."""
    ms = curves["ms"]
    boot = curves.get("bootstrap")
    drawn: list[float] = []
    for vote, label, color in VOTES:
        observed = curves[f"{kind}_{vote}"]
        band = boot[f"{kind}_{vote}"] if boot else None
        if rubric is not None:
            observed = observed[rubric]
            band = band[rubric] if band else None
        drawn += observed
        if band:
            ax.plot(ms, band["mean"], color=color, lw=1.8, label=f"{label} (mean of {boot['n_orderings']} orderings)")
            ax.fill_between(ms, band["lo"], band["hi"], color=color, alpha=0.2, lw=0, label=f"{label} 95% band")
            ax.plot(ms, observed, color=color, lw=0.8, ls=":", label=f"{label} (bank order)")
            drawn += band["lo"] + band["hi"]
        else:
            ax.plot(ms, observed, color=color, lw=1.8, marker="o" if len(ms) <= 12 else None, ms=3, label=label)
    for table, label, color, style in BASELINES:
        value = _baseline(baselines, table, baseline_key)
        if value is not None:
            ax.axhline(value, color=color, ls=style, lw=1.2, label=f"{label} baseline ({value:.3f})")
            drawn.append(value)
    ax.set_xlabel("m (samples per essay)")
    ax.set_ylabel("QWK")
    ax.set_xlim(ms[0], max(ms[-1], ms[0] + 1))
    ax.set_ylim(*qwk_ylim(drawn))
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=7, loc="lower right")
    return drawn


def _wrap(title: str, width: int = 80) -> str:
    """Long adapter names would run off a single-panel figure; break the title into lines."""
    return "\n".join(textwrap.wrap(title, width)) or title


def _save(fig, path: str | Path) -> Figure:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)  # out of pyplot's registry; the Figure stays readable for the caller
    return fig


def _title(kind: str, curves: dict, title: str) -> str:
    note = invalid_note(curves)
    return f"{kind}\n{_wrap(title)}" + (f"\n{note}" if note else "")


def plot_overall(curves: dict, baselines: dict | None, path: str | Path, title: str) -> Figure:
    """QWK over all essay-rubric pairs pooled, against m."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _panel(ax, curves, "overall", baselines, "overall")
    ax.set_title(_title("Overall QWK vs m", curves, title), fontsize=10)
    return _save(fig, path)


def plot_average(curves: dict, baselines: dict | None, path: str | Path, title: str) -> Figure:
    """Mean of the per-rubric QWKs, against m."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _panel(ax, curves, "avgk", baselines, "average")
    ax.set_title(_title("Average per-rubric QWK vs m", curves, title), fontsize=10)
    return _save(fig, path)


def plot_per_rubric(curves: dict, baselines: dict | None, path: str | Path, title: str) -> Figure:
    """Small multiples, one panel per rubric on a shared y axis; the legend once, below."""
    names = list(curves["rubrics"])
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows + 0.9), sharex=True, sharey=True,
                             squeeze=False)
    drawn = []
    for i, (ax, name) in enumerate(zip(axes.flat, names)):
        drawn += _panel(ax, curves, "per_rubric", baselines, name, rubric=name, legend=False)
        ax.set_title(name, fontsize=9)
        if i % cols:  # y labels on the left column only (shared y axis)
            ax.set_ylabel("")
        below = i + cols < len(names)  # x labels only where no panel sits below
        ax.tick_params(labelbottom=not below)
        if below:
            ax.set_xlabel("")
    axes.flat[0].set_ylim(*qwk_ylim(drawn))  # shared: the range of every panel's values
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    note = invalid_note(curves)
    fig.suptitle(f"Per-rubric QWK vs m\n{title}" + (f"\n{note}" if note else ""), fontsize=10)
    fig.tight_layout(rect=(0, 0.7 / (2.9 * rows + 0.9), 1, 1))
    fig.legend(handles, [l.split(" (")[0] if "baseline" in l else l for l in labels], loc="lower center",
               ncol=min(4, len(labels)), fontsize=7, frameon=False)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig


# ----------------------------------------------------------------------------- confidence figures

SIGNAL_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink")


def plot_risk_coverage(signals: dict, path: str | Path, title: str) -> Figure:
    """Left: risk (MAE of the kept essays) against coverage, one line per signal, from each
    signal's ``curve_coverage`` / ``curve_mae`` (modules.confidence_report.signal_summaries); random order
    is the dashed grey reference. Right: average QWK of the kept essays at the table's coverages."""
    fig, (risk_ax, qwk_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    colors = iter(SIGNAL_COLORS)
    drawn = []
    for name, s in signals.items():
        style = dict(color="grey", ls="--", lw=1.2) if name == "random" else dict(color=next(colors), lw=1.6)
        risk_ax.plot(s["curve_coverage"], s["curve_mae"], label=f"{name} (AURC {s['aurc']:.3f})", **style)
        qwk_ax.plot([100 * c for c in s["coverage"]], s["qwk"], marker="o", ms=3, label=name, **style)
        drawn += s["qwk"]
    risk_ax.set_xlabel("coverage (share of essays kept, most confident first)")
    risk_ax.set_ylabel("MAE of the kept essays (score points)")
    risk_ax.set_xlim(0, 1)
    risk_ax.set_ylim(bottom=0)
    qwk_ax.set_xlabel("coverage (%)")
    qwk_ax.set_ylabel("average QWK of the kept essays")
    qwk_ax.invert_xaxis()  # from all essays kept to half of them
    qwk_ax.set_ylim(*qwk_ylim(drawn))
    for ax in (risk_ax, qwk_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Risk-coverage of the confidence signals\n{_wrap(title, 110)}", fontsize=10)
    return _save(fig, path)


def plot_reliability(calibration: dict, path: str | Path, title: str) -> Figure:
    """Reliability diagram of p(predicted score): per bin, the share of exact predictions against
    the bin's mean probability (bars at the bin, dots at the mean), the diagonal as perfect
    calibration, the pairs per bin below and the ECE in the title (modules.confidence_report.calibration_summary)."""
    bins = calibration["bins"]
    fig, (ax, count_ax) = plt.subplots(2, 1, figsize=(6, 6), sharex=True, gridspec_kw={"height_ratios": (3, 1)})
    filled = [b for b in bins if b["count"]]
    width = bins[0]["upper"] - bins[0]["lower"]
    ax.bar([b["lower"] for b in filled], [b["accuracy"] for b in filled], width=width, align="edge",
           color="tab:blue", alpha=0.6, edgecolor="tab:blue", label="share exact")
    ax.plot([b["confidence"] for b in filled], [b["accuracy"] for b in filled], "o", color="tab:red", ms=4,
            label="at the bin's mean probability")
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.03)  # a bin at accuracy 1 keeps its dot inside the frame
    ax.set_ylabel("share of exact predictions")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    count_ax.bar([b["lower"] for b in bins], [b["count"] for b in bins], width=width, align="edge", color="grey")
    count_ax.set_xlabel("probability of the predicted score")
    count_ax.set_ylabel("pairs")
    count_ax.grid(alpha=0.3)
    ax.set_title(f"Reliability diagram, ECE {calibration['ece']:.3f} ({calibration['n_pairs']} essay-rubric pairs)"
                 f"\n{_wrap(title)}", fontsize=10)
    return _save(fig, path)
