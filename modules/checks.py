"""Input checks for integer score arrays, shared by the votes, the curves and the metrics: one
place that says what counts as an integer score and a rubric range, with one-line errors."""
from __future__ import annotations

import numpy as np

__all__ = ["as_int_array", "rubric_bounds"]


def as_int_array(x, name: str) -> np.ndarray:
    """Integer ndarray from `x`; integral floats are accepted, anything else raises."""
    a = np.asarray(x)
    if a.dtype == bool:
        raise TypeError(f"{name}: expected integers, got booleans")
    if np.issubdtype(a.dtype, np.integer):
        return a.astype(np.int64, copy=False)
    if a.size == 0:
        return a.astype(np.int64)
    if not np.issubdtype(a.dtype, np.floating):
        raise TypeError(f"{name}: expected integers, got dtype {a.dtype}")
    if not np.all(np.isfinite(a)) or not np.all(a == np.round(a)):
        bad = a[~(np.isfinite(a) & (a == np.round(a)))].ravel()[0]
        raise ValueError(f"{name}: expected integer values, got {bad!r}")
    return a.astype(np.int64)


def rubric_bounds(ranges, K: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(lo [K], hi [K]) int64 from K (lo, hi) pairs; K, when given, must match."""
    r = as_int_array(ranges, "ranges")
    if r.ndim != 2 or r.shape[1] != 2 or r.shape[0] == 0:
        raise ValueError(f"ranges must be a non-empty sequence of (lo, hi) pairs, got shape {r.shape}")
    if K is not None and r.shape[0] != K:
        raise ValueError(f"ranges has {r.shape[0]} rubrics but the data has K={K}")
    lo, hi = r[:, 0].copy(), r[:, 1].copy()
    bad = np.flatnonzero(lo > hi)
    if bad.size:
        k = int(bad[0])
        raise ValueError(f"rubric {k}: range ({lo[k]}, {hi[k]}) has lo > hi")
    return lo, hi
