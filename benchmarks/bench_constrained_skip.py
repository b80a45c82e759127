"""Greedy and constrained greedy from one prefill: two decodes vs the second skipped when it cannot differ.

    python benchmarks/bench_constrained_skip.py --work_dir runs/real_essays/ell [--essays 48]

``--work_dir`` is the work folder of a ``bench_real_essays.py`` command (its
``runs/real_essays/<corpus>``): the saved adapter of ``run_<variant>_seed<k>`` scores the first
``--essays`` essays of ``data_seed0/<--split>.jsonl`` with the prompts it was trained on, in
batches of ``self_consistency.py``'s essay batch (8), each prompt prefilled once (not timed).

* both: :func:`modules.scoring.greedy_from_states` unconstrained, then ``constrained=True``: two
  ``generate`` calls per batch, as the benchmark's one-prefill stage made them before;
* pair: :func:`modules.scoring.greedy_pair_from_states`, which runs the constrained ``generate`` only
  for a batch where some unconstrained line leaves the grammar.

The sides run in turn on each batch (both first on even batches, pair first on odd ones) after
one untimed warm-up batch per side. Printed: seconds per side, the batches whose constrained decode
was skipped, whether every answer of both sides is identical, and last ``ratio=<both / pair>``.
Run it alone: two cores.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_real_essays as bench  # noqa: E402

from modules.data import build_prompt, load_dataset_info, load_split  # noqa: E402
from modules.jsonio import read_json  # noqa: E402
from modules.models import load_adapter  # noqa: E402
from modules.scoring import greedy_from_states, greedy_pair_from_states, prefill  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work_dir", required=True, help="a bench_real_essays.py work folder (runs/real_essays/<corpus>)")
    p.add_argument("--variant", default="ce+ntl", choices=sorted(bench.VARIANTS))
    p.add_argument("--seed", type=int, default=0, help="the run's training seed")
    p.add_argument("--split", default="test")
    p.add_argument("--essays", type=int, default=48, help="the split's first N essays (plus one warm-up batch)")
    p.add_argument("--base_model", default="smollm2-135m")
    return p.parse_args(argv)


def both(model, tokenizer, states, ranges) -> tuple[list[dict], list[dict]]:
    return (greedy_from_states(model, tokenizer, states, ranges),
            greedy_from_states(model, tokenizer, states, ranges, constrained=True))


SIDES = {"both": both, "pair": greedy_pair_from_states}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(args.work_dir)
    run_dir, data_dir = work / f"run_{args.variant}_seed{args.seed}", work / "data_seed0"
    if not (run_dir / "adapter_config.json").is_file():
        print(f"error: {run_dir}: no saved adapter; run bench_real_essays.py first", file=sys.stderr)
        return 2
    info = load_dataset_info(data_dir)
    split_path = data_dir / f"{args.split}.jsonl"
    batch_size = bench.sc_settings(run_dir, args.base_model, split_path).essay_batch
    records = load_split(split_path, info)[:args.essays + batch_size]
    max_prompt_tokens = read_json(run_dir / "run_manifest.json")["max_prompt_tokens"]
    model, tokenizer = load_adapter(args.base_model, run_dir)
    calls, real_generate = [], model.generate

    def counted_generate(**kwargs):
        calls.append(1)
        return real_generate(**kwargs)

    model.generate = counted_generate  # counts the pair's decodes: one where it skipped the constrained one
    seconds = {side: 0.0 for side in SIDES}
    identical = skipped = essays = 0
    batches = range(0, len(records), batch_size)
    for number, start in enumerate(batches):
        prompts = [build_prompt(r, info, tokenizer, False, "chat", max_prompt_tokens)
                   for r in records[start:start + batch_size]]
        with torch.inference_mode():
            states = [prefill(model, tokenizer, prompt) for prompt in prompts]
            answers, generates = {}, {}
            for side in list(SIDES) if number % 2 == 0 else list(SIDES)[::-1]:
                began, before = time.perf_counter(), len(calls)
                answers[side] = SIDES[side](model, tokenizer, states, info.ranges)
                generates[side] = len(calls) - before
                if number:  # batch 0 warms both sides up
                    seconds[side] += time.perf_counter() - began
        if number:
            essays += len(prompts)
            identical += sum(a == b for a, b in zip(zip(*answers["both"]), zip(*answers["pair"])))
            skipped += generates["pair"] == 1
        print(f"batch {number}/{len(batches) - 1}: both {seconds['both']:.1f} s, pair {seconds['pair']:.1f} s",
              flush=True)
    print(f"{work.name}: {essays} essays in {len(batches) - 1} timed batches")
    for side in SIDES:
        print(f"  {side}: {seconds[side]:.1f} s ({seconds[side] / essays:.3f} s an essay)")
    print(f"  identical answers (greedy and constrained greedy): {identical}/{essays}; constrained decode "
          f"skipped in {skipped} of {len(batches) - 1} batches")
    print(f"  saved: {(seconds['both'] - seconds['pair']) / essays:.3f} s an essay")
    print(f"ratio={seconds['both'] / seconds['pair']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
