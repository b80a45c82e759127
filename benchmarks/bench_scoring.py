"""Whole test-split scoring time: each prompt run twice (greedy, then weighted) vs once (shared), in one process.

    python -m benchmarks.bench_scoring [--limit N] [--adapter_dir DIR] [--asap_adapter_dir DIR] [--batch_size 8]

Both sides call ``modules.predict.predict_split`` (greedy and weighted predictions, the CLI's
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
(``--adapter_dir runs/quickstart``) to measure what a trained run's scoring costs. A run folder
of ``main_pipeline.py`` given as ``--adapter_dir`` (shipped data) or ``--asap_adapter_dir`` (a
``bench_real_essays.py`` run on ASAP) scores that run's own test split with its own prompts
(its manifest's data folder, ``mtl`` flag and prompt budget), as a user's scoring would.

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
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from benchmarks.bench_sampling import ASAP_SET7, MODEL
from tests.reference_scoring import two_pass_scoring
from modules.convert.corpora import convert_asap
from modules.data import build_prompt, load_splits
from modules.jsonio import read_json
from modules.models import load_adapter, load_base_model
from modules.predict import predict_split
from modules.runs import PromptSettings

SHIPPED = ROOT / "aes_dataset_mtl"
SIDES = {"old": two_pass_scoring, "new": nullcontext}


@dataclass
class Workload:
    name: str
    info: object
    records: list
    mtl: bool
    source: str
    adapter_dir: str | None  # None: the base model
    max_prompt_tokens: int | None = None  # the adapter's training budget (run_manifest.json)


def adapter_workload(name: str, adapter_dir: str, limit: int | None) -> Workload:
    """The test split the adapter's run was trained next to, prompted as in that run (its manifest's
    data folder, mtl flag and prompt budget): the essays and prompts a user's scoring sees."""
    manifest = read_json(Path(adapter_dir) / "run_manifest.json")
    config = manifest["config"]
    info, splits = load_splits(config["data_dir"])
    return Workload(name, info, splits["test"][:limit], config["mtl"], f"test split of {config['data_dir']}",
                    adapter_dir, manifest["max_prompt_tokens"])


def workloads(workdir: Path, args: argparse.Namespace) -> list[Workload]:
    """asap7 (only when its file exists, or from --asap_adapter_dir's run) and the shipped data."""
    loads = []
    if args.asap_adapter_dir:
        loads.append(adapter_workload("asap7", args.asap_adapter_dir, args.limit))
    elif ASAP_SET7.is_file():
        convert_asap(ASAP_SET7, workdir / "asap7", seed=0)
        info, splits = load_splits(workdir / "asap7")
        loads.append(Workload("asap7", info, splits["test"][:args.limit], False,
                              f"{ASAP_SET7} (ASAP set 7, converted with seed 0)", args.adapter_dir))
    else:
        print(f"[asap7] skipped: {ASAP_SET7} not found")
    if args.adapter_dir and (Path(args.adapter_dir) / "run_manifest.json").is_file():
        loads.append(adapter_workload("mtl", args.adapter_dir, args.limit))
    else:
        info, splits = load_splits(SHIPPED)
        loads.append(Workload("mtl", info, splits["test"][:args.limit], True, f"{SHIPPED} test split (synthetic essays)",
                              args.adapter_dir))
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
    p.add_argument("--adapter_dir", default=None,
                   help=f"a LoRA adapter trained on {MODEL} (default: none); a run folder of main_pipeline.py "
                        "scores its own test split with its own prompts, else the shipped test split")
    p.add_argument("--asap_adapter_dir", default=None,
                   help="a run folder trained on ASAP essays (bench_real_essays.py): the asap7 workload is its "
                        "test split, prompted as it was trained")
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
        loads = workloads(Path(tmp), args)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batches of {args.batch_size}")

    ratios = []
    for load in loads:
        model, tokenizer = load_adapter(MODEL, load.adapter_dir) if load.adapter_dir else load_base_model(MODEL)
        info, records, mtl = load.info, load.records, load.mtl
        lengths = [len(tokenizer(build_prompt(r, info, tokenizer, mtl, "chat", load.max_prompt_tokens),
                                 add_special_tokens=False)["input_ids"]) for r in records]
        print(f"\n[{load.name}] essays: {load.source}; {MODEL}{' + ' + load.adapter_dir if load.adapter_dir else ''}, "
              f"{next(model.parameters()).dtype}")
        print(f"{len(records)} essays, prompts of {min(lengths)}-{max(lengths)} tokens "
              f"(mean {sum(lengths) / len(lengths):.0f}); {len(info.ranges)} rubric(s)")

        def score(side: str, chunk: list) -> list[dict]:
            with SIDES[side]():
                return predict_split(model, tokenizer, chunk, info, PromptSettings(mtl, "chat", load.max_prompt_tokens),
                                     batch_size=args.batch_size)

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
        print(f"[{load.name}] old/new whole-split scoring time: {ratios[-1]:.2f}x")
    print(f"ratio={min(ratios):.2f}")


if __name__ == "__main__":
    main()
