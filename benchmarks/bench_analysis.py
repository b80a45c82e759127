"""Speed of the self-consistency analysis (SPEC §7: N=1000, m=50, K=8 in under 2 s).

Builds a seeded random sample bank shaped like a real run (each essay-rubric pair has a
model "opinion" near the gold score, samples scatter around it, ~3% of samples unparsable
and stored as -1 in every column), then times `qwk_curves` + `bootstrap_curves` (B orderings)
from modules.curves, best of --repeats runs.  For comparison it also times the direct way
(for every ordering and m: average_vote / majority_vote on the first m samples, then qwk per
rubric and pooled) on --baseline_orderings orderings, extrapolates that to B + 1 curves and
prints the ratio.  The last line is `seconds=<wall-clock seconds of the fast path>`.

    python -m benchmarks.bench_analysis [--essays 1000] [--max_m 50] [--rubrics 8]
                                        [--bootstrap 200] [--repeats 3] [--baseline_orderings 2]
"""
from __future__ import annotations

import argparse
import time

import numpy as np


from modules.curves import bootstrap_curves, qwk_curves
from modules.voting import average_vote, default_fallback, majority_vote, qwk


def make_bank(n_essays: int, m: int, k: int, lo: int = 1, hi: int = 9, invalid: float = 0.03,
              seed: int = 0):
    rng = np.random.default_rng(seed)
    gold = rng.integers(lo, hi + 1, size=(n_essays, k))
    opinion = gold + rng.normal(0.0, 1.0, size=(n_essays, k))
    draws = np.rint(opinion[:, None, :] + rng.normal(0.0, 1.0, size=(n_essays, m, k)))
    samples = np.clip(draws, lo, hi).astype(np.int64)
    samples[rng.random((n_essays, m)) < invalid] = -1
    return samples, gold, [(lo, hi)] * k


def direct_curves(samples, gold, ranges) -> None:
    """One ordering the straightforward way: votes and QWK recomputed for every m."""
    fb = default_fallback(ranges)
    lo_all = min(lo for lo, _ in ranges)
    hi_all = max(hi for _, hi in ranges)
    for m in range(1, samples.shape[1] + 1):
        for vote in (average_vote, majority_vote):
            v = vote(samples[:, :m], fb)
            for k, (lo, hi) in enumerate(ranges):
                qwk(gold[:, k], v[:, k], lo, hi)
            qwk(gold.ravel(), v.ravel(), lo_all, hi_all)


def main(argv=None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--essays", type=int, default=1000)
    ap.add_argument("--max_m", type=int, default=50)
    ap.add_argument("--rubrics", type=int, default=8)
    ap.add_argument("--bootstrap", type=int, default=200, help="number of random orderings")
    ap.add_argument("--repeats", type=int, default=3, help="report the fastest of this many runs")
    ap.add_argument("--baseline_orderings", type=int, default=2,
                    help="orderings timed for the direct baseline (0: skip the baseline)")
    args = ap.parse_args(argv)

    samples, gold, ranges = make_bank(args.essays, args.max_m, args.rubrics)
    print(f"bank: N={args.essays} m={args.max_m} K={args.rubrics} B={args.bootstrap} "
          f"invalid={np.mean(samples[:, :, 0] == -1):.3f}")
    times = []
    for _ in range(max(1, args.repeats)):
        t0 = time.perf_counter()
        c0 = time.process_time()
        curves = qwk_curves(samples, gold, ranges)
        t1 = time.perf_counter()
        boot = bootstrap_curves(samples, gold, ranges, n_orderings=args.bootstrap, seed=0)
        t2 = time.perf_counter()
        cpu = time.process_time() - c0
        times.append(t2 - t0)
        print(f"qwk_curves {t1 - t0:.3f} s  bootstrap_curves {t2 - t1:.3f} s  "
              f"total {t2 - t0:.3f} s (cpu {cpu:.3f} s)")
    m_last = len(curves["ms"])
    print(f"overall QWK avg m=1 {curves['overall_avg'][0]:.4f} m={m_last} {curves['overall_avg'][-1]:.4f}; "
          f"maj m={m_last} {curves['overall_maj'][-1]:.4f}; "
          f"bootstrap band at m=1 [{boot['overall_avg']['lo'][0]:.4f}, {boot['overall_avg']['hi'][0]:.4f}]")
    best = min(times)
    if args.baseline_orderings > 0:
        rng = np.random.default_rng(1)
        t0 = time.perf_counter()
        for _ in range(args.baseline_orderings):
            order = np.argsort(rng.random(samples.shape[:2]), axis=1)
            direct_curves(np.take_along_axis(samples, order[:, :, None], axis=1), gold, ranges)
        per_ordering = (time.perf_counter() - t0) / args.baseline_orderings
        direct = per_ordering * (args.bootstrap + 1)
        print(f"direct baseline: {per_ordering:.3f} s per ordering -> {direct:.1f} s for "
              f"{args.bootstrap + 1} curves; speed-up x{direct / best:.0f}")
    print(f"target < 2 s: {'met' if best < 2.0 else 'MISSED'}")
    print(f"seconds={best:.3f}")
    return best


if __name__ == "__main__":
    main()
