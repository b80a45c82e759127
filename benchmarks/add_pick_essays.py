"""Add the pick essays to a real-essay result file recorded before ``--pick_essays`` existed.

    python benchmarks/add_pick_essays.py RESULT.json --out_dir RUNS [--pick_essays N]

``RUNS`` is the work folder of the benchmark command that wrote RESULT.json (its
``runs/real_essays/<corpus>``): it holds the converted corpus, the subset and the run's saved
adapter. The pick essays are drawn as ``bench_real_essays.subset_draws`` draws them (the same RNG
stream, after the train, validation and test samples, which it checks against the file's ids) and
scored with the benchmark's own stages: greedy and weighted from the adapter and, unless the
result is a replicate, constrained greedy and self-consistency (unconstrained and constrained,
the result's m, sampler and seed); the baselines predict them too. Before scoring them, the
adapter rescores the validation essays and the script stops unless the greedy and weighted rows
equal the recorded ones: the adapter is the result's, and scoring reproduces it.

The file gains ``splits.pick``, ``data.pick_essays`` and ``pick_scoring`` (stage times, machine,
commit, command); nothing it recorded is changed.
"""
from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_real_essays as bench  # noqa: E402
import real_essay_tables as tables  # noqa: E402

from modules.data import load_dataset_info  # noqa: E402
from modules.jsonio import DataError, read_json, write_jsonl_atomic, write_text_atomic  # noqa: E402

EXPECTED_TOLERANCE = 1e-3  # the file keeps expected scores to 4 decimals


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("result", help="a result file without pick essays")
    p.add_argument("--out_dir", required=True, help="the work folder of the command that wrote it")
    p.add_argument("--pick_essays", type=int, default=None, help="default: the corpus's (bench_real_essays.py)")
    return p.parse_args(argv)


def check_draws(result: dict, draws: dict[str, list[dict]], path: Path) -> None:
    """The replayed draw must give the file's own validation and test essays."""
    for split in bench.SCORED_SPLITS:
        if [r["id"] for r in draws[split]] != result["splits"][split]["ids"]:
            raise DataError(f"{path}: its {split} essays are not the ones drawn from this --out_dir's converted data")


def check_reproduces(result: dict, again: dict, path: Path, run_dir: Path) -> None:
    """The adapter's validation rows must equal the recorded ones."""
    recorded = result["splits"]["valid"]
    for row in tables.REPLICATE_ROWS:
        if again["rows"][row] != recorded["rows"][row]:
            differ = sum(a != b for a, b in zip(again["rows"][row], recorded["rows"][row]))
            raise DataError(f"{path}: {run_dir} rescores {differ} of {len(again['rows'][row])} validation essays' "
                            f"{row} row differently; not this result's adapter")
    gap = max(abs(a - b) for x, y in zip(again["weighted_expected"], recorded["weighted_expected"])
              for a, b in zip(x, y))
    if gap > EXPECTED_TOLERANCE:
        raise DataError(f"{path}: {run_dir} rescores the validation expected scores up to {gap:.4f} away")


def add_pick(path: Path, out: Path, pick: int | None, argv: list[str]) -> dict:
    """Score the pick essays for the result at ``path`` from ``out``; returns the updated result (written)."""
    result = read_json(path)
    if "pick" in result["splits"]:
        raise DataError(f"{path}: it already has pick essays")
    config = result["config"]
    args = argparse.Namespace(**{**config, "pick_essays": bench.CORPORA[config["corpus"]].pick_essays
                                 if pick is None else pick})
    if args.pick_essays < 1:
        raise DataError(f"--pick_essays {args.pick_essays}: nothing to add")
    data_seed = result["data"]["data_seed"]
    full, data = out / f"full_seed{data_seed}", out / f"data_seed{data_seed}"
    run_dir = out / f"run_{result['variant']}_seed{result['seed']}"
    if not (run_dir / "adapter_config.json").is_file():
        raise DataError(f"{run_dir}: no saved adapter")
    draws = bench.subset_draws(full, result["data"]["sizes"], args.pick_essays, data_seed)
    check_draws(result, draws, path)
    pick_file = data / "pick.jsonl"
    if pick_file.exists() and [r["id"] for r in bench.read_jsonl(pick_file)] != [r["id"] for r in draws["pick"]]:
        raise DataError(f"{pick_file}: other pick essays than --pick_essays {args.pick_essays} draws")
    write_jsonl_atomic(pick_file, draws["pick"])

    timings: dict[str, float] = {}
    started = time.perf_counter()
    max_prompt_tokens = result["data"]["max_prompt_tokens"]
    with bench.stage("validation essays again (the adapter reproduces the file)", timings):
        valid = bench.greedy_weighted(args, data, run_dir, max_prompt_tokens, ["valid"])["valid"]
        check_reproduces(result, bench.split_entry(valid), path, run_dir)
    run: dict = {}
    if result["replicate"]:
        with bench.stage("pick essays: greedy + weighted", timings):
            run["pick"] = bench.split_entry(bench.greedy_weighted(args, data, run_dir, max_prompt_tokens, ["pick"])["pick"])
    else:
        bench.one_prefill_rows(args, data, run_dir, out, result["variant"], load_dataset_info(data), max_prompt_tokens,
                               run, timings, ["pick"])
        if run["sampler"] != result["sampler"]:
            raise DataError(f"{path}: sampled with {result['sampler']}, the pick essays with {run['sampler']}")
    with bench.stage("baselines", timings):
        run["pick"]["rows"].update(bench.baselines(data, bench.read_jsonl(full / "train.jsonl"), "pick"))
    timings["total"] = round(time.perf_counter() - started, 1)

    result["splits"]["pick"] = run["pick"]
    result["data"]["pick_essays"] = args.pick_essays
    result["pick_scoring"] = {"timings": timings, "machine": bench.machine(), "git": bench.git_state(),
                              "stamp": datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ"),
                              "command": " ".join([Path(sys.argv[0]).name, *argv])}
    write_text_atomic(path, tables.result_text(result))
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    opts = parse_args(argv)
    try:
        result = add_pick(Path(opts.result), Path(opts.out_dir), opts.pick_essays, argv)
    except (DataError, bench.StageFailed) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{opts.result}: {len(result['splits']['pick']['ids'])} pick essays added "
          f"({result['pick_scoring']['timings']['total']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
