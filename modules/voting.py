"""Votes over sampled scores, quadratic weighted kappa, and QWK-vs-m curves (SPEC §6, §10).

Everything here is plain numpy; no model or torch is needed, so a saved sample bank can be
re-analysed anywhere.

Conventions
-----------
* A sample bank is an integer array ``samples[N, m, K]``: N essays, m samples per essay, K
  rubrics.  An entry equal to ``-1`` (:data:`INVALID`) is invalid and ignored; the self-
  consistency tool stores an unparsable answer as ``-1`` in all K columns, but validity is
  decided per entry.
* ``fallback`` is an int (all rubrics) or an int sequence of length K (per rubric).  It is
  the vote of an essay-rubric pair with no valid sample.  :func:`default_fallback` gives the
  rubric midpoints rounded down.

Votes
-----
* Average vote: mean of the valid values, rounded half up (2.5 -> 3, 3.5 -> 4).  Computed
  exactly from integer sums: ``floor((2*sum + count) / (2*count))``.
* Majority vote: the most frequent valid value; a tie goes to the tied value nearest the mean
  of the valid values; a tie in that distance (mean exactly half-way) goes to the lower value.

QWK
---
:func:`qwk` is Cohen's quadratically weighted kappa over the explicit label range
``min_rating..max_rating``; it equals ``sklearn.metrics.cohen_kappa_score(y_true, y_pred,
weights="quadratic", labels=list(range(min_rating, max_rating + 1)))`` with two deliberate
differences:

* where sklearn returns ``nan`` (kappa is 0/0: both raters gave one and the same score to
  every item) this returns ``0.0``, so curves and averages stay finite;
* values outside ``min_rating..max_rating`` raise ``ValueError`` (sklearn silently drops
  them), and so does an empty input (as in sklearn).

Curves
------
:func:`qwk_curves` gives, for m = 1..max_m, the QWK of both votes over the first m samples
of every essay; :func:`bootstrap_curves` gives the mean and a 95% band (2.5 / 97.5
percentiles) of the same curves over random orderings of each essay's samples (one
independent permutation per essay and ordering, of all the samples in the bank, so with
``max_m < m`` the prefixes are random subsets of all samples).  Both return plain
JSON-ready dicts; per-rubric curves are keyed by rubric name (``rubric_names``; default
``rubric_1..rubric_K``) in rubric order.  Keys shared by both:

``ms``                  [1, ..., max_m]
``rubrics``             rubric names, in order
``ranges``              [[lo, hi], ...] per rubric
``n_essays``            N
``overall_avg/_maj``    QWK over all essay-rubric pairs pooled (labels: the union range
                        min(lo)..max(hi)) per m
``avgk_avg/_maj``       mean over rubrics of the per-rubric QWK, per m
``per_rubric_avg/_maj`` {rubric name: per-m QWK}

In :func:`qwk_curves` each value is a list over m; in :func:`bootstrap_curves` each is a
``{"mean": [...], "lo": [...], "hi": [...]}`` dict (per rubric: a dict of those), plus
``n_orderings``, ``seed`` and ``band`` ([2.5, 97.5]).  The self-consistency tool stores the
bootstrap next to the curves: ``curves["bootstrap"] = bootstrap_curves(...)``;
:func:`best_scores` ignores that key.

Speed: all m are computed in one pass from cumulative per-value counts (no loop over
essays), and QWK for every m comes from three moments per (ordering, m, rubric)
(sum p, sum p^2, sum gold*p), which determine quadratic kappa exactly.  N=1000, m=50, K=8
with 200 orderings takes about a second on two CPU cores (benchmarks/bench_analysis.py).
Orderings are processed in chunks on up to 4 threads ($AES_VOTING_THREADS overrides);
results do not depend on the number of threads.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "INVALID",
    "average_vote",
    "majority_vote",
    "qwk",
    "default_fallback",
    "qwk_curves",
    "bootstrap_curves",
    "best_scores",
]

INVALID = -1
BAND_PERCENTILES = (2.5, 97.5)

# Cells (ordering x essay x rubric) processed together per step in the curve engine: large
# enough to amortise numpy's per-call overhead, small enough for the work arrays to stay in
# cache (64K measured best for N=1000, K=8, scores 1..9).
_CHUNK_CELLS = 65536


# ----------------------------------------------------------------------------- helpers

def _as_int_array(x, name: str) -> np.ndarray:
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


def _as_samples(samples) -> np.ndarray:
    s = _as_int_array(samples, "samples")
    if s.ndim != 3:
        raise ValueError(f"samples must have shape [N, m, K], got shape {s.shape}")
    return s


def _fallback_vector(fallback, K: int, name: str = "fallback") -> np.ndarray:
    fb = _as_int_array(fallback, name)
    if fb.ndim == 0:
        return np.full(K, int(fb), dtype=np.int64)
    if fb.shape != (K,):
        raise ValueError(f"{name} must be an int or have length K={K}, got shape {fb.shape}")
    return fb.copy()


def default_fallback(rubric_ranges: Sequence[tuple[int, int]]) -> np.ndarray:
    """Per-rubric fallback score: the midpoint of each (lo, hi) range, rounded down."""
    lo, hi = _ranges_arrays(rubric_ranges)
    return (lo + hi) // 2


def _ranges_arrays(ranges, K: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    r = _as_int_array(ranges, "ranges")
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


def _rubric_names(rubric_names, K: int) -> list[str]:
    if rubric_names is None:
        return [f"rubric_{k + 1}" for k in range(K)]
    names = [str(n) for n in rubric_names]
    if len(names) != K:
        raise ValueError(f"rubric_names has {len(names)} names but the data has K={K} rubrics")
    if len(set(names)) != K:
        raise ValueError(f"rubric_names must be distinct, got {names}")
    return names


def _sums(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    valid = samples != INVALID
    count = valid.sum(axis=1)
    total = np.where(valid, samples, 0).sum(axis=1)
    return valid, total, count


# ----------------------------------------------------------------------------- votes

def average_vote(samples: np.ndarray, fallback) -> np.ndarray:
    """Mean of the valid samples of each essay and rubric, rounded half up.

    samples: int [N, m, K], -1 = invalid.  fallback: int or int[K], used where an essay has no
    valid sample for a rubric.  Returns int64 [N, K].
    """
    s = _as_samples(samples)
    N, _, K = s.shape
    fb = _fallback_vector(fallback, K)
    _, total, count = _sums(s)
    safe = np.maximum(count, 1)
    vote = np.floor_divide(2 * total + count, 2 * safe)
    return np.where(count > 0, vote, fb[None, :]).astype(np.int64)


def majority_vote(samples: np.ndarray, fallback) -> np.ndarray:
    """Most frequent valid sample of each essay and rubric.

    Ties go to the tied value nearest the mean of the valid samples, then to the lower one.
    samples: int [N, m, K], -1 = invalid.  fallback: int or int[K].  Returns int64 [N, K].
    """
    s = _as_samples(samples)
    N, _, K = s.shape
    fb = _fallback_vector(fallback, K)
    valid, total, count = _sums(s)
    if not valid.any():
        return np.broadcast_to(fb, (N, K)).astype(np.int64)
    values = np.unique(s[valid])                                   # sorted distinct values
    U = values.size
    pos = np.searchsorted(values, np.where(valid, s, values[0]))   # [N, m, K] in 0..U-1
    cell = (np.arange(N)[:, None, None] * K + np.arange(K)[None, None, :])
    counts = np.bincount((cell * U + pos)[valid], minlength=N * K * U).reshape(N, K, U)
    # Distance to the mean, in exact integers.  With mean = total/count and
    # q = 2*floor((2*total - 1)/count) + 1, |4*v - q| orders the values exactly as
    # |v - mean| does with ties sent to the lower value (q/4 lies strictly inside the same
    # half-unit interval as the mean, just below it), and never ties for distinct values.
    q = 2 * np.floor_divide(2 * total - 1, np.maximum(count, 1)) + 1
    dist = np.abs(4 * values[None, None, :] - q[:, :, None])
    key = counts * (int(dist.max()) + 1) - dist                     # count first, then nearness
    key = np.where(counts > 0, key, np.iinfo(np.int64).min)
    vote = values[np.argmax(key, axis=2)]
    return np.where(count > 0, vote, fb[None, :]).astype(np.int64)


# ----------------------------------------------------------------------------- QWK

def qwk(y_true, y_pred, min_rating: int, max_rating: int) -> float:
    """Quadratic weighted kappa over the labels min_rating..max_rating.

    Same value as sklearn's ``cohen_kappa_score(..., weights="quadratic", labels=range)``,
    except 0.0 instead of nan where kappa is undefined (every item got one and the same score
    from both raters).  Values outside the range, empty or mismatched inputs raise ValueError.
    """
    t = _as_int_array(y_true, "y_true").ravel()
    p = _as_int_array(y_pred, "y_pred").ravel()
    lo, hi = int(min_rating), int(max_rating)
    if lo > hi:
        raise ValueError(f"min_rating {lo} > max_rating {hi}")
    if t.size != p.size:
        raise ValueError(f"y_true and y_pred differ in length: {t.size} vs {p.size}")
    if t.size == 0:
        raise ValueError("qwk needs at least one rating pair")
    for name, a in (("y_true", t), ("y_pred", p)):
        out = (a < lo) | (a > hi)
        if out.any():
            i = int(np.flatnonzero(out)[0])
            raise ValueError(f"{name}[{i}] = {int(a[i])} is outside the rating range {lo}..{hi}")
    L = hi - lo + 1
    confusion = np.bincount((t - lo) * L + (p - lo), minlength=L * L).reshape(L, L).astype(np.float64)
    rows = confusion.sum(axis=1)   # y_true histogram
    cols = confusion.sum(axis=0)   # y_pred histogram
    expected = np.outer(rows, cols) / confusion.sum()
    grid = np.arange(L, dtype=np.float64)
    weights = (grid[:, None] - grid[None, :]) ** 2
    denominator = float((weights * expected).sum())
    if denominator == 0.0:
        return 0.0
    return float(1.0 - (weights * confusion).sum() / denominator)


def _kappa_from_moments(n, g1, g2, p1, p2, x):
    """Quadratic kappa from moments (exact integers held in float64).

    n pairs; g1 = sum gold, g2 = sum gold^2, p1 = sum pred, p2 = sum pred^2, x = sum gold*pred.
    sum_ij (i-j)^2 O_ij = g2 - 2x + p2 and sum_ij (i-j)^2 E_ij = g2 + p2 - 2 g1 p1 / n, so
    kappa = 1 - n (g2 - 2x + p2) / (n g2 + n p2 - 2 g1 p1); 0/0 -> 0.0 as in qwk().
    """
    num = n * (g2 - 2.0 * x + p2)
    den = n * (g2 + p2) - 2.0 * g1 * p1
    ok = den != 0
    kappa = 1.0 - num / np.where(ok, den, 1.0)
    return np.where(ok, kappa, 0.0)


# ----------------------------------------------------------------------------- validation

def _check_samples_in_range(s: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:
    bad = (s != INVALID) & ((s < lo[None, None, :]) | (s > hi[None, None, :]))
    if bad.any():
        n, i, k = (int(v[0]) for v in np.nonzero(bad))
        raise ValueError(
            f"samples[{n}, {i}, {k}] = {int(s[n, i, k])} is outside rubric {k}'s range "
            f"{lo[k]}..{hi[k]} (invalid samples must be {INVALID})")


def _prepare(samples, gold, ranges, fallback, max_m, rubric_names):
    s = _as_samples(samples)
    N, M, K = s.shape
    if N == 0 or M == 0 or K == 0:
        raise ValueError(f"samples must have N, m, K >= 1, got shape {s.shape}")
    g = _as_int_array(gold, "gold")
    if g.shape != (N, K):
        raise ValueError(f"gold must have shape [N, K] = [{N}, {K}], got {g.shape}")
    lo, hi = _ranges_arrays(ranges, K)
    clash = np.flatnonzero((lo <= INVALID) & (hi >= INVALID))
    if clash.size:
        k = int(clash[0])
        raise ValueError(f"rubric {k}: range {lo[k]}..{hi[k]} contains {INVALID}, the invalid-sample marker")
    bad = (g < lo[None, :]) | (g > hi[None, :])
    if bad.any():
        n, k = (int(v[0]) for v in np.nonzero(bad))
        raise ValueError(f"gold[{n}, {k}] = {int(g[n, k])} is outside rubric {k}'s range {lo[k]}..{hi[k]}")
    _check_samples_in_range(s, lo, hi)
    fb = default_fallback(np.stack([lo, hi], 1)) if fallback is None else _fallback_vector(fallback, K)
    bad = np.flatnonzero((fb < lo) | (fb > hi))
    if bad.size:
        k = int(bad[0])
        raise ValueError(f"fallback {int(fb[k])} for rubric {k} is outside its range {lo[k]}..{hi[k]}")
    if max_m is None:
        mm = M
    else:
        mm = int(max_m)
        if mm != max_m or not 1 <= mm <= M:
            raise ValueError(f"max_m must be an integer in 1..{M}, got {max_m!r}")
    names = _rubric_names(rubric_names, K)
    return s, g, lo, hi, fb, mm, names


# ----------------------------------------------------------------------------- curve engine

def _random_orderings(rng: np.random.Generator, rows: int, M: int, out: np.ndarray | None = None,
                      scratch: np.ndarray | None = None) -> np.ndarray:
    """Independent uniform permutations of 0..M-1, one per row: int [rows, M].

    Sorts random integer keys that carry their column index in the low bits (an in-place
    integer sort, no argsort).  The random parts have 31 - ceil(log2 M) bits (25 for M = 50,
    at least 24 up to M = 128, 52 beyond); two equal ones (probability about M^2 / 2^26 per
    row for M = 50) keep index order, a negligible deviation from uniform.  `out` (int32, or int64 for M > 128) and `scratch`
    (float64) are optional [rows, M] buffers.
    """
    bits = max(1, (M - 1).bit_length())
    wide = bits > 7
    key_dtype = np.int64 if wide else np.int32
    u = rng.random((rows, M)) if scratch is None else rng.random(out=scratch)
    u *= float(1 << (52 if wide else 31 - bits))
    keys = np.empty((rows, M), key_dtype) if out is None else out
    np.copyto(keys, u, casting="unsafe")              # floor: non-negative
    keys <<= bits
    keys |= np.arange(M, dtype=key_dtype)
    keys.sort(axis=1)
    keys &= (1 << bits) - 1
    return keys


def _ordering_generators(seed: int, n_orderings: int) -> list[np.random.Generator]:
    """One generator per ordering, derived from `seed`.

    Ordering b permutes every essay's samples with ``_random_orderings(gens[b], N, m)``, so the
    result depends only on (seed, b), not on how the work is chunked or threaded.
    """
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(n_orderings)]


def _n_threads() -> int:
    """Worker threads for the curve engine: $AES_VOTING_THREADS, else the usable cores (<= 4)."""
    env = os.environ.get("AES_VOTING_THREADS", "").strip()
    if env:
        return max(1, int(env))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


class _Workspace:
    """Reusable scratch buffers (fresh large allocations cost page faults on every chunk)."""

    def __init__(self):
        self._bufs: dict[str, np.ndarray] = {}

    def get(self, name: str, shape: tuple, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        buf = self._bufs.get(name)
        if buf is None or buf.size < nbytes:
            buf = self._bufs[name] = np.empty(max(nbytes, 1), np.uint8)
        return buf[:nbytes].view(dtype).reshape(shape)


class _Engine:
    """Votes for every prefix length of every ordering, reduced to QWK moments.

    Work arrays are laid out [orderings, rubric, essay] per step j (the j-th sample of each
    ordering); per-value arrays add a leading value axis.  For each step:

    * average vote: Y = running sum of the raw entries (-1 for invalid), NI = running number
      of invalid entries; with C = j + 1 - NI valid samples and S = Y + NI their sum,
      x1 = (S + C/2 + 1/4) / C and floor(x1) is the half-up mean (the 1/4 keeps float error
      away from integer boundaries: the exact fraction is >= 1/(4C) from them).
    * majority vote: cnt[r] = running count of value r; maxc = max count; among the values
      with cnt == maxc pick the smallest |4r - q| with q = 2*floor((2S - 1)/C) + 1 (see
      majority_vote).  Non-tied values are pushed out of the minimum by OR-ing the negative
      (cnt - maxc) into the unsigned key; the winner is decoded from (q, min key).
    * cells with no valid sample yet get the fallback.
    Then per (ordering, m, rubric) the moments sum p, sum p^2, sum gold*p.

    Chunks of orderings run on a few threads (numpy releases the GIL inside its loops); each
    chunk writes its own slice of the output, so the result does not depend on scheduling.
    """

    def __init__(self, s, g, lo, hi, fb, mm):
        N, M, K = s.shape
        self.N, self.M, self.K, self.mm = N, M, K, mm
        self.R = R = int((hi - lo).max()) + 1
        if R <= 31 and mm <= 127:
            self.it, self.ut = np.int8, np.uint8
        elif R <= 8000 and mm <= 32767:
            self.it, self.ut = np.int16, np.uint16
        else:
            raise ValueError(f"score range of {R} values with {mm} samples is too large for the curve engine")
        # float32 is exact here: every quantity is an integer or quarter below 2^24 and the
        # division error (< 2^-22 relative) is far below the 1/(4C) margin.
        exact32 = mm * R < (1 << 19) and N * (R - 1) ** 2 < (1 << 24)
        self.ft = np.float32 if exact32 else np.float64
        off = np.where(s == INVALID, INVALID, s - lo[None, None, :]).astype(self.it)
        self.off = np.ascontiguousarray(off)                       # [N, M, K]
        self.whole_row = bool(np.all((off == INVALID).all(axis=2) | (off != INVALID).all(axis=2)))
        row = np.dtype((np.void, K * off.itemsize))
        self.packed = self.off.reshape(N * M, K).view(row).reshape(N * M)
        self.row_base = np.arange(N, dtype=np.intp) * M
        self.gold = np.ascontiguousarray((g - lo[None, :]).T).astype(self.ft)   # [K, N]
        self.fb = (fb - lo).astype(self.ft)                                     # [K]
        nk = K * N
        self.bc = max(1, _CHUNK_CELLS // nk)
        self.nc = N if nk <= _CHUNK_CELLS else max(1, _CHUNK_CELLS // K)

    def moments(self, seed: int | None, n_orderings: int = 1) -> np.ndarray:
        """float64 [3, 2, B, mm, K]: (sum p, sum p^2, sum gold*p) x (avg, maj).

        seed None: the bank's own order (B = 1); else `n_orderings` random orderings.
        """
        N, M, mm = self.N, self.M, self.mm
        B = 1 if seed is None else int(n_orderings)
        out = np.zeros((3, 2, B, mm, self.K))
        gens = None if seed is None else _ordering_generators(seed, B)
        chunks = [(b0, min(B, b0 + self.bc)) for b0 in range(0, B, self.bc)]
        threads = min(_n_threads(), len(chunks))

        def worker(t: int) -> None:
            ws = _Workspace()
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                for b0, b1 in chunks[t::threads]:
                    perm = None
                    if gens is not None:
                        perm = ws.get("perm", (b1 - b0, N, M), np.int64 if M > 128 else np.int32)
                        for i, b in enumerate(range(b0, b1)):
                            _random_orderings(gens[b], N, M, out=perm[i], scratch=ws.get("u", (N, M), np.float64))
                    for n0 in range(0, N, self.nc):
                        n1 = min(N, n0 + self.nc)
                        G = self._gather(ws, perm, b1 - b0, n0, n1)
                        self._run_block(ws, G, n0, n1, out[:, :, b0:b1])

        if threads <= 1:
            worker(0)
        else:
            with ThreadPoolExecutor(max_workers=threads) as pool:
                for _ in pool.map(worker, range(threads)):
                    pass
        return out

    def _gather(self, ws, perm, bc, n0, n1):
        """int [bc, mm, K, nc]: the j-th sample of each ordering, per rubric and essay."""
        mm, K, nc = self.mm, self.K, n1 - n0
        G = ws.get("G", (bc, mm, K, nc), self.it)
        if perm is None:
            np.copyto(G[0], self.off[n0:n1, :mm, :].transpose(1, 2, 0))
            return G
        idx = ws.get("idx", (bc, mm, nc), np.intp)
        np.add(perm[:, n0:n1, :mm].transpose(0, 2, 1), self.row_base[n0:n1], out=idx)
        rows = ws.get("rows", (bc, mm, nc), self.packed.dtype)
        np.take(self.packed, idx, out=rows, mode="wrap")
        np.copyto(G, rows.view(self.it).reshape(bc, mm, nc, K).transpose(0, 1, 3, 2))
        return G

    def _run_block(self, ws, G, n0, n1, out):
        """Votes for every step of block G [bc, mm, K, nc]; writes/adds the moments into out."""
        it, ut, ft, R = self.it, self.ut, self.ft, self.R
        bc, mm, K, nc = G.shape
        shp = (bc, K, nc)
        rshp = (R,) + shp
        whole_row = self.whole_row
        byte = np.dtype(it).itemsize == 1
        dt16 = np.int32 if it is np.int16 else np.int16
        r_col = np.arange(R, dtype=it).reshape(R, 1, 1, 1)
        r4p1 = (4 * np.arange(R) + 1).astype(it).reshape(R, 1, 1, 1)
        cnt = ws.get("cnt", rshp, it)                   # running count of each value
        cnt.fill(0)
        eq = ws.get("eq", rshp, bool)                   # v == r; its bytes then hold cnt - maxc
        eq_int = eq.view(it) if byte else eq
        dif = eq.view(it) if byte else ws.get("dif", rshp, it)
        key = ws.get("key", rshp, it)
        ukey, udif = key.view(ut), dif.view(ut)
        maxc = ws.get("maxc", shp, it)
        best = ws.get("best", shp, ut)
        Y = ws.get("Y", shp, ft)                        # running sum of raw entries (-1 = invalid)
        Y.fill(0)
        x1 = ws.get("x1", shp, ft)
        votes = ws.get("votes", (2,) + shp, ft)        # [average, majority]
        avg, maj = votes[0], votes[1]
        h2 = ws.get("h2", shp, it)
        x16 = ws.get("x16", shp, dt16)
        t16 = ws.get("t16", shp, dt16)
        g = self.gold[:, n0:n1]
        ones = np.ones(nc, ft)
        fb = self.fb
        direct = nc == self.N                           # one essay chunk: write, don't add
        if whole_row:
            # invalid samples are whole rows: counts per (step, ordering, essay), shared by rubrics
            wshp = (mm, bc, nc)
            bad = ws.get("bad", wshp, bool)
            np.less(G[:, :, 0, :].transpose(1, 0, 2), 0, out=bad)
            ni = ws.get("ni", wshp, ft)
            np.copyto(ni[0], bad[0])
            for j in range(1, mm):
                np.add(ni[j - 1], bad[j], out=ni[j])
            steps = np.arange(1, mm + 1, dtype=ft)[:, None, None]
            inv_all = ws.get("inv_all", wshp, ft)
            np.subtract(steps, ni, out=inv_all)
            np.divide(1.0, inv_all, out=inv_all)                         # 1 / C (inf if C == 0)
            ct_all = ws.get("ct_all", wshp, ft)
            np.multiply(ni, 0.5, out=ct_all)
            np.add(ct_all, 0.5 * steps + 0.25, out=ct_all)               # S - Y + C/2 + 1/4
            np.equal(ni, steps, out=bad)                                 # no valid sample yet
            jz, bz, nz = np.unravel_index(np.flatnonzero(bad), wshp)
            zb = np.searchsorted(jz, np.arange(mm + 1))
        else:
            NI = ws.get("NI", shp, ft)
            NI.fill(0)
            neg = ws.get("neg", shp, bool)
            inv = ws.get("inv", shp, ft)
            ct = ws.get("ct", shp, ft)
            pending = np.flatnonzero(G[:, 0] < 0)
        for j in range(mm):
            v = G[:, j]
            # --- average vote and the tie-break centre
            np.add(Y, v, out=Y)
            if whole_row:
                inv = inv_all[j, :, None, :]
                ct = ct_all[j, :, None, :]
            else:
                np.less(v, 0, out=neg)
                np.add(NI, neg, out=NI)
                np.subtract(j + 1, NI, out=inv)
                np.divide(1.0, inv, out=inv)
                np.multiply(NI, 0.5, out=ct)
                np.add(ct, 0.5 * j + 0.75, out=ct)
            np.add(Y, ct, out=x1)                       # S + C/2 + 1/4
            np.multiply(x1, inv, out=x1)
            np.floor(x1, out=avg)                       # half-up mean
            np.add(x1, x1, out=x1)
            np.subtract(x1, inv, out=x1)                # (2S + C - 1/2) / C
            np.copyto(h2, x1, casting="unsafe")         # floor((2S - 1)/C) + 1
            np.add(h2, h2, out=h2)                      # q + 1
            # --- majority vote
            np.equal(v, r_col, out=eq)
            np.add(cnt, eq_int, out=cnt)
            np.maximum.reduce(cnt, axis=0, out=maxc)
            np.subtract(cnt, maxc, out=dif)             # 0 for tied values, < 0 otherwise
            np.subtract(r4p1, h2, out=key)
            np.abs(key, out=key)                        # |4r - q|
            np.bitwise_or(ukey, udif, out=ukey)         # non-tied: top bit set
            np.minimum.reduce(ukey, axis=0, out=best)
            # 4r = q + d or q - d (d = best), whichever is a multiple of 4
            np.add(h2, best, out=x16, casting="unsafe")
            np.subtract(x16, 1, out=x16)
            np.bitwise_and(x16, 2, out=t16)
            np.multiply(t16, best, out=t16, casting="unsafe")
            np.subtract(x16, t16, out=x16)
            np.right_shift(x16, 2, out=x16)
            np.copyto(maj, x16)
            # --- fallback where no valid sample has been seen yet
            if whole_row:
                if zb[j] < zb[j + 1]:
                    zi, zn = bz[zb[j]:zb[j + 1]], nz[zb[j]:zb[j + 1]]
                    avg[zi, :, zn] = fb
                    maj[zi, :, zn] = fb
            elif pending.size:
                pending = pending[NI.reshape(-1)[pending] == j + 1]
                if pending.size:
                    bi, ki, ni_ = np.unravel_index(pending, shp)
                    avg[bi, ki, ni_] = fb[ki]
                    maj[bi, ki, ni_] = fb[ki]
            # --- moments over essays
            o = out[:, :, :, j, :]                      # [3, 2, bc, K]
            if direct:
                np.vecdot(votes, ones, out=o[0])
                np.vecdot(votes, votes, out=o[1])
                np.vecdot(votes, g, out=o[2])
            else:
                o[0] += np.vecdot(votes, ones)
                o[1] += np.vecdot(votes, votes)
                o[2] += np.vecdot(votes, g)


def _kappas(engine: _Engine, mom: np.ndarray, lo: np.ndarray):
    """Per-rubric, overall (pooled) and rubric-average QWK from engine moments.

    Returns (per_rubric [2, B, mm, K], overall [2, B, mm], avgk [2, B, mm]).
    """
    N = float(engine.N)
    g = engine.gold.astype(np.float64)                      # [K, N] offsets
    g1, g2 = g.sum(axis=1), (g * g).sum(axis=1)             # [K]
    p1, p2, x = mom[0], mom[1], mom[2]                      # [2, B, mm, K]
    per = _kappa_from_moments(N, g1, g2, p1, p2, x)
    # pooled over rubrics: back to actual scores (QWK is shift invariant per rubric, but the
    # pooled one mixes rubrics with different offsets)
    L = lo.astype(np.float64)
    P1 = p1 + N * L
    P2 = p2 + 2 * L * p1 + N * L * L
    X = x + L * p1 + L * g1 + N * L * L
    G1 = g1 + N * L
    G2 = g2 + 2 * L * g1 + N * L * L
    overall = _kappa_from_moments(N * engine.K, G1.sum(), G2.sum(), P1.sum(-1), P2.sum(-1), X.sum(-1))
    return per, overall, per.mean(axis=-1)


def _tolist(a) -> list:
    return [float(v) for v in np.asarray(a, dtype=np.float64).ravel()]


def qwk_curves(samples, gold, ranges, fallback=None, max_m: int | None = None,
               rubric_names: Iterable[str] | None = None) -> dict:
    """QWK of the average and majority votes over the first m samples, for m = 1..max_m.

    samples: int [N, m, K] (-1 = invalid); gold: int [N, K]; ranges: K (lo, hi) pairs;
    fallback: None (rubric midpoints, :func:`default_fallback`), int or int[K]; max_m: default
    all samples; rubric_names: default rubric_1..rubric_K.  Returns the dict described in the
    module docstring (lists over m).
    """
    s, g, lo, hi, fb, mm, names = _prepare(samples, gold, ranges, fallback, max_m, rubric_names)
    eng = _Engine(s, g, lo, hi, fb, mm)
    per, overall, avgk = _kappas(eng, eng.moments(None), lo)
    res = _header(names, lo, hi, eng.N, mm)
    for vi, v in enumerate(("avg", "maj")):
        res[f"overall_{v}"] = _tolist(overall[vi, 0])
        res[f"avgk_{v}"] = _tolist(avgk[vi, 0])
        res[f"per_rubric_{v}"] = {name: _tolist(per[vi, 0, :, k]) for k, name in enumerate(names)}
    return res


def _header(names, lo, hi, N, mm) -> dict:
    return {
        "ms": list(range(1, mm + 1)),
        "rubrics": list(names),
        "ranges": [[int(a), int(b)] for a, b in zip(lo, hi)],
        "n_essays": int(N),
    }


def bootstrap_curves(samples, gold, ranges, fallback=None, n_orderings: int = 200, seed: int = 0,
                     max_m: int | None = None, rubric_names: Iterable[str] | None = None) -> dict:
    """Mean and 95% band of the QWK-vs-m curves over random orderings of each essay's samples.

    For each of ``n_orderings`` orderings every essay's samples are permuted independently
    (all m samples of the bank, also when ``max_m`` is smaller), the curves of
    :func:`qwk_curves` are computed on the permuted bank, and for every m the mean and the
    2.5 / 97.5 percentiles (numpy's linear interpolation) over orderings are reported.

    Randomness: ordering b uses ``np.random.default_rng(np.random.SeedSequence(seed).spawn(
    n_orderings)[b])``, so a seed always gives the same result (independent of threads and
    chunking), and the first orderings of a larger ``n_orderings`` are the same orderings.
    Keys: see the module docstring.
    """
    s, g, lo, hi, fb, mm, names = _prepare(samples, gold, ranges, fallback, max_m, rubric_names)
    B = int(n_orderings)
    if B != n_orderings or B < 1:
        raise ValueError(f"n_orderings must be a positive integer, got {n_orderings!r}")
    eng = _Engine(s, g, lo, hi, fb, mm)
    per, overall, avgk = _kappas(eng, eng.moments(int(seed), B), lo)
    res = _header(names, lo, hi, eng.N, mm)
    res.update({"n_orderings": B, "seed": int(seed), "band": list(BAND_PERCENTILES)})
    for vi, v in enumerate(("avg", "maj")):
        res[f"overall_{v}"] = _band(overall[vi])
        res[f"avgk_{v}"] = _band(avgk[vi])
        res[f"per_rubric_{v}"] = {name: _band(per[vi, :, :, k]) for k, name in enumerate(names)}
    return res


def _band(values: np.ndarray) -> dict:
    """values [B, mm] -> {"mean", "lo", "hi"} lists over m."""
    lo_q, hi_q = np.percentile(values, BAND_PERCENTILES, axis=0)
    # a mean of identical values can land one ulp outside them; keep lo <= mean <= hi exact
    mean = np.clip(values.mean(axis=0), values.min(axis=0), values.max(axis=0))
    return {"mean": _tolist(mean), "lo": _tolist(lo_q), "hi": _tolist(hi_q)}


# ----------------------------------------------------------------------------- summaries

def best_scores(curves: dict, rubric_names: Iterable[str] | None = None) -> dict:
    """Best m by overall QWK for each vote, with the values at that m, at m=1 and at max_m.

    curves: a :func:`qwk_curves` result.  rubric_names: which per-rubric curves to report
    (default ``curves["rubrics"]``).  Returns::

        {"avg": {"best":  {"m": int, "overall": float, "average": float,
                           "per_rubric": {name: float}},
                 "m1":    {...same keys, m = 1...},
                 "max_m": {...same keys, m = max_m...}},
         "maj": {...}}

    Ties in the overall QWK go to the smallest m.
    """
    ms = list(curves["ms"])
    names = list(curves.get("rubrics", [])) if rubric_names is None else [str(n) for n in rubric_names]

    def at(vote: str, i: int) -> dict:
        per = curves[f"per_rubric_{vote}"]
        missing = [n for n in names if n not in per]
        if missing:
            raise KeyError(f"no per-rubric curve for {missing} in curves['per_rubric_{vote}']")
        return {
            "m": int(ms[i]),
            "overall": float(curves[f"overall_{vote}"][i]),
            "average": float(curves[f"avgk_{vote}"][i]),
            "per_rubric": {n: float(per[n][i]) for n in names},
        }

    out = {}
    for vote in ("avg", "maj"):
        overall = np.asarray(curves[f"overall_{vote}"], dtype=np.float64)
        out[vote] = {"best": at(vote, int(np.argmax(overall))), "m1": at(vote, 0),
                     "max_m": at(vote, len(ms) - 1)}
    return out
