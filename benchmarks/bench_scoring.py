"""Whole test-split scoring time: each prompt run twice (greedy, then weighted) vs once (shared), in one process.

    python benchmarks/bench_scoring.py [--limit N] [--adapter_dir DIR] [--batch_size 8] [--threads N]

Both sides call ``modules.evaluation.predict_split`` (greedy and weighted predictions, the CLI's
defaults: unconstrained, no feedback, batches of ``--batch_size`` essays) on ``smollm2-135m``
(with the LoRA adapter in ``--adapter_dir`` when given). The old side runs it inside
``benchmarks/reference_scoring.two_pass_scoring``: greedy decoding over padded batches, then the
weighted scorer running each prompt again. The new side is the library's: each prompt runs once,
and greedy decoding and the weighted scorer both continue from its cache. Two workloads, the
whole test split of each (its first ``--limit`` essays when given):

* ``asap7``: ``../shared/data/asap/asap_set7.tsv`` converted with ``modules.convert asap``
  (seed 0) into a temporary folder: real essays, one holistic rubric 0-30. Skipped, saying so,
  when the file is absent.
* ``mtl``: the shipped ``aes_dataset_mtl`` test split (synthetic essays, 8 rubrics 1-9).

The saving is one prompt forward per essay; what else an essay costs bounds the ratio. Without
an adapter the instruct model's lines are rarely valid score lines, so the weighted scorer runs
one candidate forward per rubric (8 on ``mtl``) instead of one for all: pass a trained adapter
(``--adapter_dir runs/quickstart``) to measure what a trained run's scoring costs.

Seconds: wall time of ``predict_split``, summed over chunks of ``--batch_size`` essays that the
two sides score in turn (old first on even chunks, new first on odd ones), so drift in the
machine's speed hits both alike; one untimed warm-up call per side first. The process's CPU
seconds are printed too. Also printed, as the check that both sides score alike: how many greedy
lines are identical and the largest differences of the weighted expected scores and
probabilities. The last line is ``ratio=<old seconds / new seconds>``, the smaller of the
workloads' ratios.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_sampling import ASAP_SET7, MODEL  # noqa: E402
from benchmarks.reference_scoring import two_pass_scoring  # noqa: E402
from modules.convert.corpora import convert_asap  # noqa: E402
from modules.data import build_prompt, load_splits  # noqa: E402
from modules.evaluation import predict_split  # noqa: E402
from modules.models import load_adapter, load_base_model  # noqa: E402

SHIPPED = ROOT / "aes_dataset_mtl"
SIDES = {"old": two_pass_scoring, "new": nullcontext}


def workloads(workdir: Path, limit: int | None) -> list[tuple[str, object, list, bool, str]]:
    """(name, info, test essays, mtl prompt, where the essays come from); asap7 only when its file exists."""
    loads = []
    if ASAP_SET7.is_file():
        convert_asap(ASAP_SET7, workdir / "asap7", seed=0)
        info, splits = load_splits(workdir / "asap7")
        loads.append(("asap7", info, splits["test"][:limit], False, f"{ASAP_SET7} (ASAP set 7, converted with seed 0)"))
    else:
        print(f"[asap7] skipped: {ASAP_SET7} not found")
    info, splits = load_splits(SHIPPED)
    loads.append(("mtl", info, splits["test"][:limit], True, f"{SHIPPED} test split (synthetic essays)"))
    return loads


def largest_differences(old: list[dict], new: list[dict]) -> tuple[int, float, float]:
    """Identical greedy answers (text and scores), max |expected_old - expected_new|, max |p_old - p_new|."""
    same = sum(o["text"] == n["text"] and o["greedy"] == n["greedy"] for o, n in zip(old, new))
    expected = max(abs(a - b) for o, n in zip(old, new) for a, b in zip(o["weighted_expected"], n["weighted_expected"]))
    probs = max(abs(a - b) for o, n in zip(old, new) for name in o["probabilities"]
                for a, b in zip(o["probabilities"][name], n["probabilities"][name]))
    return same, expected, probs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--limit", type=int, default=None, help="score only the first N test essays of each workload")
    p.add_argument("--batch_size", type=int, default=8, help="essays per greedy batch (the CLI's default)")
    p.add_argument("--adapter_dir", default=None, help=f"a LoRA adapter trained on {MODEL} (default: none)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's); 1 on a CPU shared with other jobs")
    args = p.parse_args()
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be >= 1")
    if args.batch_size < 1:
        p.error("--batch_size must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        loads = workloads(Path(tmp), args.limit)
    if args.adapter_dir:
        model, tokenizer = load_adapter(MODEL, args.adapter_dir)
    else:
        model, tokenizer = load_base_model(MODEL)
    print(f"{MODEL}{' + ' + args.adapter_dir if args.adapter_dir else ''}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {next(model.parameters()).device}, {next(model.parameters()).dtype}; "
          f"batches of {args.batch_size}")

    ratios = []
    for name, info, records, mtl, source in loads:
        lengths = [len(tokenizer(build_prompt(r, info, tokenizer, mtl), add_special_tokens=False)["input_ids"])
                   for r in records]
        print(f"\n[{name}] essays: {source}")
        print(f"{len(records)} essays, prompts of {min(lengths)}-{max(lengths)} tokens "
              f"(mean {sum(lengths) / len(lengths):.0f}); {len(info.ranges)} rubric(s)")

        def score(side: str, chunk: list) -> list[dict]:
            with SIDES[side]():
                return predict_split(model, tokenizer, chunk, info, mtl=mtl, batch_size=args.batch_size)

        for side in SIDES:  # warm-up: first-call costs (vocabulary tables, constraint, kernels) out of the timing
            score(side, records[:1])
        seconds, cpu_seconds = dict.fromkeys(SIDES, 0.0), dict.fromkeys(SIDES, 0.0)
        predictions: dict[str, list[dict]] = {side: [] for side in SIDES}
        for j, start in enumerate(range(0, len(records), args.batch_size)):
            chunk = records[start:start + args.batch_size]
            for side in (("old", "new") if j % 2 == 0 else ("new", "old")):
                started, cpu_started = time.perf_counter(), time.process_time()
                predictions[side] += score(side, chunk)
                seconds[side] += time.perf_counter() - started
                cpu_seconds[side] += time.process_time() - cpu_started
        for side in SIDES:
            print(f"{side:4s} {seconds[side]:9.1f} s  ({seconds[side] / len(records):.3f} s/essay, "
                  f"{cpu_seconds[side]:.1f} CPU s)")
        same, expected, probs = largest_differences(predictions["old"], predictions["new"])
        print(f"identical greedy lines {same}/{len(records)}; max |E_old - E_new| = {expected:.2e}, "
              f"max |p_old - p_new| = {probs:.2e}")
        ratios.append(seconds["old"] / seconds["new"])
        print(f"[{name}] old/new whole-split scoring time: {ratios[-1]:.2f}x")
    print(f"ratio={min(ratios):.2f}")


if __name__ == "__main__":
    main()
