"""Greedy and constrained greedy from one prefill: two decodes vs the second skipped when it cannot differ.

    python benchmarks/bench_constrained_skip.py --work_dir runs/real_essays/ell [--essays 48]

The flags and the essays are ``bench_one_prefill.py``'s (``--m`` aside, which is not used here):
the saved adapter of a ``bench_real_essays.py`` work folder scores the first ``--essays`` essays of
its ``--split`` with the prompts it was trained on, in batches of ``self_consistency.py``'s essay
batch (8), each prompt prefilled once (not timed).

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

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_one_prefill import load_work, parse_args  # noqa: E402

from modules.data import build_prompt  # noqa: E402
from modules.scoring import greedy_from_states, greedy_pair_from_states, prefill  # noqa: E402


def both(model, tokenizer, states, ranges) -> tuple[list[dict], list[dict]]:
    return (greedy_from_states(model, tokenizer, states, ranges),
            greedy_from_states(model, tokenizer, states, ranges, constrained=True))


SIDES = {"both": both, "pair": greedy_pair_from_states}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)  # bench_one_prefill.py's flags; --m is not used here
    loaded = load_work(args)
    if loaded is None:
        return 2
    model, tokenizer, info, records, max_prompt_tokens, sc = loaded
    batch_size = sc.essay_batch
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
    print(f"{Path(args.work_dir).name}: {essays} essays in {len(batches) - 1} timed batches")
    for side in SIDES:
        print(f"  {side}: {seconds[side]:.1f} s ({seconds[side] / essays:.3f} s an essay)")
    print(f"  identical answers (greedy and constrained greedy): {identical}/{essays}; constrained decode "
          f"skipped in {skipped} of {len(batches) - 1} batches")
    print(f"  saved: {(seconds['both'] - seconds['pair']) / essays:.3f} s an essay")
    print(f"ratio={seconds['both'] / seconds['pair']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
