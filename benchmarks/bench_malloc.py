"""What ``modules.cli.keep_freed_memory`` (the command lines' glibc setting) buys on the CPU,
side by side: the same work in fresh processes with the setting off and on, in turn.

    python benchmarks/bench_malloc.py [--corpus ell] [--essays 16] [--rounds 2] [--work_dir runs/real_essays/ell]

Each round runs two child processes of this script, off then on (on then off in even rounds, so
drift in the machine's speed hits both alike). A child:

* trains: the CPU recipe of ``bench_training.py`` (``CPU_RECIPE``) on ``--essays`` essays of the
  corpus's train split, length-grouped as ``main_pipeline.py --group_by_length`` batches them;
  seconds from the Trainer's ``train_runtime``;
* scores, with ``--work_dir`` (a ``bench_real_essays.py`` work folder whose ``run_ce+ntl_seed0``
  holds a saved adapter): every LoRA row of the test split's first ``--essays`` essays from one
  prefill each (``bench_real_essays.one_prefill_batch``, m = 10), after one untimed batch.

Prints each child's seconds and training loss (equal off and on: the setting changes where memory
comes from, not a value), the summed seconds per side, and last ``ratio=<off seconds / on
seconds>`` over both stages. Run it alone: two cores.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_real_essays  # noqa: E402
from bench_real_essays import shared_file_missing  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", choices=sorted(bench_real_essays.CORPORA), default="ell")
    p.add_argument("--input", default=None, help="corpus file in the corpus's layout (default: its file in ../shared/data)")
    p.add_argument("--essays", type=int, default=16, help="essays trained on, and scored, per child (a multiple of 8)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--work_dir", default=None, help="a bench_real_essays.py work folder: also time scoring")
    p.add_argument("--child", choices=["off", "on"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.essays < 8 or args.essays % 8:
        p.error("--essays must be a positive multiple of 8 (the batch of training and of scoring)")
    args.input = args.input or str(bench_real_essays.CORPORA[args.corpus].default_input)
    return args


def train_seconds(args: argparse.Namespace) -> dict:
    import bench_training

    examples, values, _ = bench_training.encode_train_split(args.corpus, args.input, 0, None,
                                                            bench_training.SYSTEM_PROMPT)
    batches = bench_training.sampled_batches(examples, bench_training.epoch_batches(examples, True, 0),
                                             args.essays // 4)
    result = bench_training.time_setting(examples, batches, values, 0, **bench_training.CPU_RECIPE)
    return {"train": result["seconds"], "loss": result["loss"]}


def score_seconds(args: argparse.Namespace) -> dict:
    import torch

    from modules.data import load_dataset_info, load_split
    from modules.jsonio import read_json
    from modules.models import load_adapter

    work = Path(args.work_dir)
    run_dir, data_dir = work / "run_ce+ntl_seed0", work / "data_seed0"
    info = load_dataset_info(data_dir)
    split = data_dir / "test.jsonl"
    sc = bench_real_essays.sc_settings(run_dir, "smollm2-135m", split)
    records = load_split(split, info)[:args.essays + 8]
    max_prompt_tokens = read_json(run_dir / "run_manifest.json")["max_prompt_tokens"]
    model, tokenizer = load_adapter("smollm2-135m", run_dir)
    seconds = 0.0
    with torch.inference_mode():
        for start in range(0, len(records), 8):
            began = time.perf_counter()
            bench_real_essays.one_prefill_batch(model, tokenizer, records[start:start + 8], info, max_prompt_tokens,
                                                start, 0, 10, sc)
            if start:  # the first batch warms up
                seconds += time.perf_counter() - began
    return {"score": seconds}


def child(args: argparse.Namespace) -> int:
    import transformers

    from modules.cli import keep_freed_memory

    transformers.logging.set_verbosity_error()
    applied = keep_freed_memory() if args.child == "on" else False
    result = {"applied": applied, **train_seconds(args)}
    if args.work_dir:
        result.update(score_seconds(args))
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args)
    if shared_file_missing(Path(args.input)):
        return 0
    if args.work_dir and not (Path(args.work_dir) / "run_ce+ntl_seed0" / "adapter_config.json").is_file():
        print(f"error: {args.work_dir}: no run_ce+ntl_seed0 adapter; run bench_real_essays.py first", file=sys.stderr)
        return 2
    stages = ["train"] + (["score"] if args.work_dir else [])
    totals = {side: {stage: 0.0 for stage in stages} for side in ("off", "on")}
    for number in range(args.rounds):
        for side in (("off", "on") if number % 2 == 0 else ("on", "off")):
            cmd = [sys.executable, __file__, "--child", side, "--corpus", args.corpus, "--input", args.input,
                   "--essays", str(args.essays)] + (["--work_dir", args.work_dir] if args.work_dir else [])
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode or not lines:
                print(f"error: child {side} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
                return 1
            result = json.loads(lines[-1][len("RESULT "):])
            if side == "on" and not result["applied"]:
                print("error: keep_freed_memory() did not apply here (not glibc Linux): nothing to compare",
                      file=sys.stderr)
                return 2
            for stage in stages:
                totals[side][stage] += result[stage]
            print(f"round {number + 1}, {side}: " + ", ".join(f"{stage} {result[stage]:.1f} s" for stage in stages)
                  + f", training loss {result['loss']:.4f}", flush=True)
    for side in totals:
        print(f"{side}: " + ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in totals[side].items()))
    for stage in stages:
        print(f"{stage}: off / on = {totals['off'][stage] / totals['on'][stage]:.2f}")
    print(f"ratio={sum(totals['off'].values()) / sum(totals['on'].values()):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
