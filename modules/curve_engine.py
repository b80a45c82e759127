"""The curve engine: average and majority votes for every prefix length m of every sample
ordering, reduced to the three QWK moments per (ordering, m, rubric).

It computes exactly what :func:`modules.voting.average_vote` and
:func:`modules.voting.majority_vote` give on ``samples[:, :m]``, for all m at once, fast
enough for SPEC §7 (N=1000, m=50, K=8 with 200 orderings in under 2 s); :mod:`modules.curves`
turns its moments into QWK curves.  The tricks that buy the speed, and why each is exact, are
in :class:`CurveEngine`'s docstring.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from modules.voting import INVALID

__all__ = ["CHUNK_CELLS", "CurveEngine", "engine_dtypes", "ordering_generators", "random_orderings"]

# Cells (ordering x essay x rubric) processed together per step: large enough to amortise
# numpy's per-call overhead, small enough for the work arrays to stay in cache (64K measured
# best for N=1000, K=8, scores 1..9).  Results do not depend on it.
CHUNK_CELLS = 65536


def random_orderings(rng: np.random.Generator, rows: int, M: int, out: np.ndarray | None = None,
                     scratch: np.ndarray | None = None) -> np.ndarray:
    """Independent uniform permutations of 0..M-1, one per row: int [rows, M].

    Sorts random integer keys that carry their column index in the low bits (an in-place
    integer sort, no argsort).  The random parts have 31 - ceil(log2 M) bits (25 for M = 50,
    at least 24 up to M = 128, 52 beyond); two equal ones (probability about M^2 / 2^26 per
    row for M = 50) keep index order, a negligible deviation from uniform.  `out` (int32, or
    int64 for M > 128) and `scratch` (float64) are optional [rows, M] buffers.
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


def ordering_generators(seed: int, n_orderings: int) -> list[np.random.Generator]:
    """One generator per ordering, derived from `seed`.

    Ordering b permutes every essay's samples with ``random_orderings(gens[b], N, m)``, so the
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


def engine_dtypes(n_values: int, max_m: int, n_essays: int) -> tuple[type, type]:
    """(integer dtype for counts and keys, float dtype for sums and votes) of the engine.

    n_values: R, the widest rubric's number of scores; max_m: the longest prefix; n_essays: N.
    The integer type must hold every count (<= max_m) and every key |4r - q| (< 4R) with its
    top bit clear, see :class:`CurveEngine`.  float32 is exact here: every quantity is an integer or
    quarter below 2^24 and the division error (< 2^-22 relative) is far below the 1/(4C)
    margin; otherwise float64.
    """
    R, mm, N = int(n_values), int(max_m), int(n_essays)
    if R <= 31 and mm <= 127:
        it = np.int8
    elif R <= 8000 and mm <= 32767:
        it = np.int16
    else:
        raise ValueError(f"score range of {R} values with {mm} samples is too large for the curve engine")
    exact32 = mm * R < (1 << 19) and N * (R - 1) ** 2 < (1 << 24)
    return it, np.float32 if exact32 else np.float64


class CurveEngine:
    """Votes for every prefix length of every ordering, reduced to QWK moments.

    Build it from checked inputs (:mod:`modules.curves` checks them): s int [N, M, K] with -1
    invalid, gold g [N, K], rubric bounds lo/hi [K], fallback fb [K], prefixes 1..mm.
    ``moments(...)`` returns, per (vote, ordering, m, rubric), sum p, sum p^2 and sum gold*p
    over essays of the vote p as an offset from lo (QWK is shift invariant per rubric);
    ``gold`` [K, N] holds the gold offsets.

    Work arrays are laid out [orderings, rubric, essay] per step j (the j-th sample of each
    ordering); per-value arrays add a leading value axis r = 0..R-1 (score lo + r).  Each step
    updates running state in place, so all prefixes cost one pass.  Why each trick is exact:

    * Average vote.  Y = running sum of the raw entries (-1 for invalid), NI = running number
      of invalid entries; with C = j + 1 - NI valid samples and S = Y + NI their sum,
      x1 = (S + C/2 + 1/4) / C and floor(x1) is the half-up mean.  (S + C/2)/C =
      (2S + C)/(2C) is a multiple of 1/(2C), so the 1/4 (1/(4C) after dividing) puts x1 at
      least 1/(4C) from any integer and float rounding (see :func:`engine_dtypes`) cannot
      cross one.  2*x1 - 1/C =
      (2S + C - 1/2)/C is non-negative, so truncating it to an integer is a floor and gives
      floor((2S - 1)/C) + 1 = (q + 1)/2 with majority_vote's tie centre q, again with a margin
      of 1/(2C).
    * Majority vote.  cnt[r] = running count of value r; maxc = max over r.  dif = cnt - maxc
      is 0 for the tied values and negative for the others.  key = |4r - q| is below 4R - 2, so
      below 2^(bits-1) of the integer type (engine_dtypes): its top bit is clear, while every
      negative dif has it set (two's complement).  OR-ing dif into key viewed as unsigned
      therefore leaves the tied values' keys unchanged and lifts every other key above all
      of them, so the unsigned minimum over r is the tied value nearest the mean, as in
      majority_vote (with a valid sample, some value has cnt == maxc).  q is odd, so distinct r
      give distinct keys and the minimum d names one value: 4r is q + d or q - d, and as d is
      odd those two differ by 2 mod 4, so exactly one is a multiple of 4; ((q + d) & 2) says
      which.  That decoding needs up to 8R, hence its wider type (x16).
    * Small integer types.  Counts (<= mm) and keys (< 4R) fit int8 for R <= 31 and mm <= 127
      (int16 up to 8000 / 32767), so the per-value arrays move 1 byte per cell instead of 8.
      With int8 the boolean ``v == r`` array is read as int8 0/1 to add it to cnt without a
      cast, and its bytes are then reused for dif: eq is rewritten before it is read again.
    * Bit-packed gathering.  The offsets are stored C-contiguous [N*M, K] and each sample's K
      bytes are viewed as one opaque np.void item, so one np.take moves a whole sample (all
      rubrics) per index; viewing the gathered items back as ints gives the same K values,
      because a void view only reinterprets contiguous bytes.  mode="wrap" only skips the
      bounds check: every index is row_base + a permutation entry < N*M.
    * Two paths for invalid samples.  When every sample is valid in all K rubrics or in none
      (the self-consistency tool's banks), the invalid counts per (step, ordering, essay) are
      shared by the rubrics and are computed for all steps up front; otherwise NI is kept per
      cell.  Both give the same C and S, hence the same votes.
    * Fallback.  A cell whose prefix has no valid sample (C = 0) computes garbage (1/C = inf)
      that is overwritten with the fallback; once a cell has a valid sample it keeps one, so
      the cells still waiting only shrink.
    Then per (ordering, m, rubric) the moments sum p, sum p^2, sum gold*p.

    Chunks of orderings run on a few threads (numpy releases the GIL inside its loops); each
    chunk writes its own slice of the output, so the result does not depend on scheduling.
    """

    def __init__(self, s, g, lo, hi, fb, mm):
        N, M, K = s.shape
        self.N, self.M, self.K, self.mm = N, M, K, mm
        self.R = R = int((hi - lo).max()) + 1
        self.it, self.ft = engine_dtypes(R, mm, N)
        self.ut = np.uint8 if self.it is np.int8 else np.uint16
        off = np.where(s == INVALID, INVALID, s - lo[None, None, :]).astype(self.it)
        self.off = np.ascontiguousarray(off)                       # [N, M, K]
        self.whole_row = bool(np.all((off == INVALID).all(axis=2) | (off != INVALID).all(axis=2)))
        row = np.dtype((np.void, K * off.itemsize))
        self.packed = self.off.reshape(N * M, K).view(row).reshape(N * M)
        self.row_base = np.arange(N, dtype=np.intp) * M
        self.gold = np.ascontiguousarray((g - lo[None, :]).T).astype(self.ft)   # [K, N]
        self.fb = (fb - lo).astype(self.ft)                                     # [K]
        nk = K * N
        self.bc = max(1, CHUNK_CELLS // nk)
        self.nc = N if nk <= CHUNK_CELLS else max(1, CHUNK_CELLS // K)

    def moments(self, seed: int | None, n_orderings: int = 1) -> np.ndarray:
        """float64 [3, 2, B, mm, K]: (sum p, sum p^2, sum gold*p) x (avg, maj).

        seed None: the bank's own order (B = 1); else `n_orderings` random orderings.
        """
        N, M, mm = self.N, self.M, self.mm
        B = 1 if seed is None else int(n_orderings)
        out = np.zeros((3, 2, B, mm, self.K))
        gens = None if seed is None else ordering_generators(seed, B)
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
                            random_orderings(gens[b], N, M, out=perm[i], scratch=ws.get("u", (N, M), np.float64))
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
