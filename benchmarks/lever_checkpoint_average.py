"""Lever study (issue 19): does the checkpoint a real-essay run keeps make its QWK vary across seeds,
and does averaging the saved checkpoints' LoRA weights lower that spread without lowering the mean?
Post hoc, no retraining.

    python benchmarks/lever_checkpoint_average.py RUN_DIR [RUN_DIR ...]

Each RUN_DIR is a ``bench_real_essays.py`` training run folder (``run_<variant>_seed<k>``). The
Trainer keeps two checkpoints (``save_total_limit``: the one with the lowest validation loss and the
last), and the run's adapter is the one it picked on validation loss over 30 essays. Scored per run,
greedy + weighted on the run's validation and test essays with its own prompt settings, float32:

* ``picked``: the run's own adapter (its predictions.jsonl / valid_predictions.jsonl);
* ``last``: the last checkpoint, whatever the validation loss said (no pick);
* ``averaged``: the base model plus the mean of the kept checkpoints' LoRA deltas,
  ``W + (1/n) sum_i (alpha/r) B_i A_i`` (exact: averaging A and B separately would not average the
  deltas).

Prints the test average QWK over rubrics per run and model, then the mean and sd over the runs of
each variant; the figures go to ``--out`` (JSON). Run it alone: it records its scoring seconds.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import real_essay_tables as tables  # noqa: E402
from bench_real_essays import read_jsonl  # noqa: E402
from modules.data import load_dataset_info, load_split  # noqa: E402
from modules.evaluation import predict_split  # noqa: E402
from modules.jsonio import read_json, write_json_atomic  # noqa: E402
from modules.models import load_base_model  # noqa: E402
from modules.runs import git_commit, manifest_prompt_settings  # noqa: E402

SPLIT_FILES = {"valid": "valid_predictions.jsonl", "test": "predictions.jsonl"}


def lora_deltas(checkpoint: Path) -> dict[str, torch.Tensor]:
    """``{base weight name: (alpha / r) B A}`` of one saved adapter folder."""
    config = read_json(checkpoint / "adapter_config.json")
    scaling = config["lora_alpha"] / config["r"]
    state = load_file(str(checkpoint / "adapter_model.safetensors"))
    deltas = {}
    for key, a in state.items():
        if ".lora_A." not in key:
            continue
        b = state[key.replace(".lora_A.", ".lora_B.")]
        # base_model.model.<module path>.lora_A.weight -> <module path>.weight
        name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        deltas[name] = scaling * (b.float() @ a.float())
    return deltas


def averaged_model(base_model: str, checkpoints: list[Path]):
    """The base model with the mean LoRA delta of ``checkpoints`` added to its weights (float32)."""
    model, tokenizer = load_base_model(base_model, device=torch.device("cpu"), dtype=torch.float32)
    per_checkpoint = [lora_deltas(c) for c in checkpoints]
    if any(d.keys() != per_checkpoint[0].keys() for d in per_checkpoint):
        raise ValueError(f"{checkpoints}: the checkpoints adapt different modules")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in per_checkpoint[0]:
            params[name].add_(sum(d[name] for d in per_checkpoint) / len(per_checkpoint))
    model.eval()
    return model, tokenizer


def qwk_of(rows: list[dict], gold: list[list[int]], key: str, ranges) -> float:
    return tables.mean_qwk(gold, [r[key] for r in rows], ranges)


def study_run(run_dir: Path, base_model: str) -> dict:
    manifest = read_json(run_dir / "run_manifest.json")
    mtl, prompt_format, max_prompt_tokens = manifest_prompt_settings(manifest, run_dir / "run_manifest.json")
    data_dir = Path(manifest["config"]["data_dir"])
    info = load_dataset_info(data_dir)
    checkpoints = sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    if len(checkpoints) < 2:
        raise ValueError(f"{run_dir}: {len(checkpoints)} checkpoint(s) kept; averaging needs 2 or more")
    picked = Path(manifest["train"]["best_checkpoint"]).name
    out = {"run": run_dir.name, "checkpoints": [c.name for c in checkpoints], "picked": picked, "qwk": {}, "seconds": {}}
    splits = {split: load_split(data_dir / f"{split}.jsonl", info) for split in SPLIT_FILES}
    rows = {"picked": {split: read_jsonl(run_dir / own) for split, own in SPLIT_FILES.items()}}
    models = {"averaged": checkpoints} | ({} if checkpoints[-1].name == picked else {"last": checkpoints[-1:]})
    for name, members in models.items():
        model, tokenizer = averaged_model(base_model, members)
        started = time.perf_counter()
        rows[name] = {split: predict_split(model, tokenizer, records, info, mtl=bool(mtl),
                                           prompt_format=prompt_format or "chat", max_prompt_tokens=max_prompt_tokens)
                      for split, records in splits.items()}
        out["seconds"][name] = round(time.perf_counter() - started, 1)
    rows.setdefault("last", rows["picked"])  # the last checkpoint was the pick
    for split, records in splits.items():
        gold = [list(r.scores) for r in records]
        out["qwk"][split] = {f"{name} {key}": round(qwk_of(rows[name][split], gold, key, info.ranges), 4)
                             for name in ("picked", "last", "averaged") for key in ("greedy", "weighted")}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dirs", nargs="+", type=Path)
    p.add_argument("--base_model", default="smollm2-135m")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "levers" / "checkpoint_average.json")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    runs = []
    for run_dir in args.run_dirs:
        result = study_run(run_dir, args.base_model)
        runs.append(result)
        print(f"{result['run']}: picked {result['picked']}, last {result['checkpoints'][-1]}, averaged "
              f"{'+'.join(result['checkpoints'])}: "
              + ", ".join(f"{k} {v:.3f}" for k, v in result["qwk"]["test"].items()) + " (test)", flush=True)
    summary = {}
    for variant in sorted({r["run"].rsplit("_seed", 1)[0] for r in runs}):
        members = [r for r in runs if r["run"].rsplit("_seed", 1)[0] == variant]
        for column in members[0]["qwk"]["test"]:
            values = [r["qwk"]["test"][column] for r in members]
            summary[f"{variant}: {column}"] = tables.spread(values)
            s = summary[f"{variant}: {column}"]
            sd = "n/a" if math.isnan(s["sd"]) else f"{s['sd']:.3f}"
            print(f"{variant:>14}  {column:<17} mean {s['mean']:.3f}  sd {sd}  ({', '.join(f'{v:.3f}' for v in values)})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, {"runs": runs, "summary": summary,
                                 "torch": torch.__version__, "commit": git_commit()})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
