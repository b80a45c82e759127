"""The frozen-feature probe (``main_pipeline.py --scorer probe``) and the baselines on the real-essay
benchmark's essays, recorded as a result file beside the LoRA runs': the same corpus, subset and
data seed (``bench_real_essays.py``'s flags; its LoRA flags do nothing here).

    python -m benchmarks.bench_probe --corpus asap|asap-traits|ell
    python -m benchmarks.real_essay_tables        # the probe's row in each corpus's table

Stages, each timed (run it alone): convert + subset (shared with the LoRA commands); the probe:
``main_pipeline.py --scorer probe`` as a subprocess on the subset whose validation split is every
validation essay the LoRA rows are picked on (the validation and pick essays), so the layer is
chosen on them and never on test; its rows on the pick essays by ``--score_path``; baselines.
The probe depends on the data alone, so a corpus needs one such result, not one per seed.
"""
from __future__ import annotations

import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks import bench_real_essays as bench
from benchmarks.result_files import RESULTS, ROOT, line_counts, result_path, write_result
from modules.convert.subset import read_records
from modules.jsonio import DataError, iter_jsonl, read_json, write_jsonl_atomic
from modules.runs import git_commit, git_dirty, machine

VARIANT = "probe"


def probe_data(data: Path, folder: Path) -> None:
    """The subset as the probe reads it: its training and test splits, and as validation split the
    validation essays followed by the pick essays."""
    folder.mkdir(parents=True)
    for name in ("dataset.json", "train.jsonl", "test.jsonl"):
        shutil.copy(data / name, folder / name)
    pick = read_records(data / "pick.jsonl") if (data / "pick.jsonl").is_file() else []
    write_jsonl_atomic(folder / "valid.jsonl", read_records(data / "valid.jsonl") + pick)


def rows_of(path: Path) -> dict[str, dict]:
    """A predictions file's rows by essay id."""
    return {row["id"]: row for _, row in iter_jsonl(path)}


def split_entry(data: Path, split: str, rows: dict[str, dict]) -> dict:
    """One split's probe row in the result file's layout, in the split file's essay order, with the
    ridge's unrounded outputs under ``continuous``."""
    ids = [r["id"] for r in read_records(data / f"{split}.jsonl")]
    ordered = [rows[i] for i in ids]
    return {"ids": ids, "gold": [r["gold"] for r in ordered], "rows": {"probe": [r["weighted"] for r in ordered]},
            "continuous": {"probe": [[round(v, 4) for v in r["weighted_expected"]] for r in ordered]},
            "line_counts": {"probe": line_counts(ordered)}}


def main(argv: list[str] | None = None) -> int:
    args = bench.parse_args(argv)
    if bench.shared_file_missing(Path(args.input)):
        return 0
    key = bench.corpus_key(args)
    out = Path(args.out_dir or ROOT / "runs" / "real_essays" / key)
    smoke = args.test_essays < bench.CORPORA[args.corpus].test_essays
    results_dir = Path(args.results_dir or (out / "results" if smoke else RESULTS))
    run_dir, folder = out / f"run_probe_data{args.data_seed}", out / f"data_seed{args.data_seed}_probe"
    if run_dir.exists() or folder.exists():
        print(f"error: {run_dir} or {folder} exists; pass another --out_dir for a new benchmark", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    python, pipeline = sys.executable, str(ROOT / "main_pipeline.py")
    tokens = str(bench.CORPORA[args.corpus].probe_tokens)
    try:
        with bench.stage("convert + subset", timings):
            full, data, sizes = bench.prepare_data(args, out)
        with bench.stage("probe", timings):
            probe_data(data, folder)
            bench.run_logged([python, pipeline, "--base_model_name", args.base_model, "--scorer", "probe", "--data_dir",
                              str(folder), "--output_dir", str(run_dir), "--no_wandb", "--probe_max_tokens", tokens],
                             out / "logs" / "probe.log")
            rows = {**rows_of(run_dir / "valid_predictions.jsonl"), **rows_of(run_dir / "predictions.jsonl")}
            splits = ["test", "valid", *(["pick"] if args.pick_essays else [])]
            entries = {split: split_entry(data, split, rows) for split in splits}
        with bench.stage("baselines", timings):
            full_train = read_records(full / "train.jsonl")
            for split in splits:
                bench.baselines(data, full_train, split, entries[split])
    except (DataError, bench.StageFailed) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    timings["total"] = round(time.perf_counter() - started, 1)
    manifest = read_json(run_dir / "run_manifest.json")
    state = {"commit": (git_commit() or "unknown")[:7], "dirty": git_dirty()}
    result = {"corpus": key, "variant": VARIANT, "seed": args.data_seed, "replicate": False, "rows": ["probe"],
              **bench.data_fields(args, read_json(data / "dataset.json"), sizes), "splits": entries,
              "confidence": None, "training": {"seconds": manifest["train"]["seconds"], **manifest["probe"]},
              "timings": timings, "machine": machine(), "git": state, **bench.command_fields(args, argv)}
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = write_result(result_path(results_dir, key, VARIANT, args.data_seed, state["commit"], stamp), result)
    print(f"results: {path}")
    print(f"probe: layer {manifest['probe']['layer']} of {manifest['probe']['layers']}, test average QWK "
          f"{read_json(run_dir / 'evaluation_results.json')['weighted']['average']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
