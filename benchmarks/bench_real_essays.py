"""Real-essay benchmark: LoRA-fine-tune smollm2-135m on ASAP essay set 7 with the CPU recipe and
compare its QWK (greedy, weighted, self-consistency votes; unconstrained and ``--constrained``)
with three baselines fit on the same essays, with paired bootstrap intervals.

    python benchmarks/bench_asap.py              # LoRA CE+NTL and the baselines
    python benchmarks/bench_asap.py --ablation   # LoRA CE only, same split and seed; adds its rows

Stages, each timed (wall seconds):

1. convert ``../shared/data/asap/asap_set7.tsv`` with ``modules.convert.corpora.convert_asap`` (seeded
   70/15/15 split; 1,569 essays, holistic score 0-30) and take a seeded sample of
   ``--train_essays`` / ``--valid_essays`` / ``--test_essays`` (>= 150 for a real run), written as
   one dataset folder that both commands and every method share (its dataset.json sets the short
   ``SYSTEM_PROMPT``). When the file is absent the script says so and exits 0: the shared data is
   not part of a fresh clone.
2. train + score: ``main_pipeline.py`` as a subprocess with the CPU recipe (``--bf16`` autocast,
   ``--group_by_length``: length-bucketed batches in random order; LoRA r 16 on q/v of every
   layer; no ``--mtl``: ASAP has no feedback), loss CE + 0.2 NTL (``--ablation``: CE only); greedy
   and weighted predictions from its run folder. ``--no-group_by_length`` trains on random batches.
3. constrained greedy: the saved adapter rescored with ``--constrained`` decoding.
4. self-consistency: ``self_consistency.py run`` with ``--max_m m``, once unconstrained and once
   ``--constrained``; majority and average votes over all m samples of each essay.
5. baselines: TF-IDF (1-2 grams) ridge fit on the same training essays and, for reference, on all
   essays of the converted train split; a ridge on the essay's length alone (words, log words).
6. paired bootstrap: for the best LoRA row (over both commands' rows so far) against each
   baseline, the 95% interval of the QWK difference over ``--bootstrap`` resamples of the test
   essays (the same resample for both methods).

Each command writes ``results_<variant>.json`` (every method's per-essay predictions included) in
the output folder (default ``runs/bench_asap``) and prints the table of every row there so far,
the bootstrap intervals and its stage times; it ends with ``best_lora_qwk=<x>``. QWK is the mean
over rubrics (here the one holistic rubric) on its full 0-30 range. Run it alone: the stage
times are part of the result (the README's budget is 60 minutes a command on two cores).
"""
from __future__ import annotations

import argparse
import random
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from modules.convert.baseline import length_predictions, ridge_predictions  # noqa: E402
from modules.convert.corpora import convert_asap  # noqa: E402
from modules.data import SPLITS  # noqa: E402
from modules.jsonio import DataError, iter_jsonl, read_json, write_json_atomic, write_jsonl_atomic  # noqa: E402

ASAP7 = ROOT.parent / "shared" / "data" / "asap" / "asap_set7.tsv"
MIN_TEST = 150
# dataset.json's system_prompt for the subset: a short system message in place of SmolLM2's default
# (18 tokens naming the assistant), which every training step would pay for.
SYSTEM_PROMPT = "You score essays."
# NTL weight of each command's LoRA: 0.2, the quickstart's scale; at the original tool's 2.0, NTL's
# gradients dwarf CE's and the hour's training learned far less (README).
VARIANTS = {"ce+ntl": 0.2, "ce": 0.0}
LORA_ROWS = ("greedy", "greedy, constrained", "weighted", "SC majority", "SC average",
             "SC majority, constrained", "SC average, constrained")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", default=str(ASAP7), help="ASAP set-7 file (training_set_rel3.tsv layout)")
    p.add_argument("--out_dir", default=str(ROOT / "runs" / "bench_asap"),
                   help="output folder, shared by the default command and --ablation")
    p.add_argument("--ablation", action="store_true", help="train and score LoRA with CE only (--ntl_weights 0)")
    p.add_argument("--base_model", default="smollm2-135m")
    p.add_argument("--seed", type=int, default=0, help="split, subset, training, sampling and bootstrap seed")
    p.add_argument("--train_essays", type=int, default=800, help="sized for the 60-minute budget (README)")
    p.add_argument("--valid_essays", type=int, default=30)
    p.add_argument("--test_essays", type=int, default=MIN_TEST)
    p.add_argument("--epochs", type=float, default=2.5, help="sized for the 60-minute budget (README)")
    p.add_argument("--max_steps", type=int, default=-1, help="overrides --epochs when > 0")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--grad_accum", type=int, default=1)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--top_layers", type=int, default=0, help="main_pipeline.py --lora_top_layers (0: every layer)")
    p.add_argument("--group_by_length", action=argparse.BooleanOptionalAction, default=True,
                   help="main_pipeline.py --group_by_length: length-bucketed batches in random order (default on)")
    p.add_argument("--max_seq_length", type=int, default=1024)
    p.add_argument("--m", type=int, default=10, help="self-consistency samples per essay")
    p.add_argument("--sampler", default=None, help="self_consistency.py --sampler (default: its own default)")
    p.add_argument("--bootstrap", type=int, default=2000, help="paired bootstrap resamples")
    args = p.parse_args(argv)
    for key in ("train_essays", "valid_essays", "test_essays", "m", "batch_size", "grad_accum", "bootstrap"):
        if getattr(args, key) < 1:
            p.error(f"--{key} must be >= 1")
    return args


def shared_file_missing(source: Path) -> bool:
    """Say so when the ASAP file is absent: it is shared data, not part of a fresh clone."""
    if source.is_file():
        return False
    print(f"{source} not found: the ASAP set-7 file is shared data outside the repository "
          "(../shared/data/asap/); nothing to benchmark.")
    return True


class StageFailed(RuntimeError):
    """A subprocess stage failed; the message carries the tail of its log."""


@contextmanager
def stage(name: str, timings: dict[str, float]) -> Iterator[None]:
    """Print the stage's name, run it, and record its wall seconds (the table reports them)."""
    print(f"== {name}", flush=True)
    started = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - started, 1)
    print(f"   {name}: {timings[name]:.1f} s", flush=True)


def run_logged(cmd: list[str], log: Path) -> None:
    """Run a subprocess with its output in ``log``; on failure show the log's tail and stop."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print("   $ " + " ".join(cmd[1:]), flush=True)
    with log.open("w", encoding="utf-8") as handle:
        done = subprocess.run(cmd, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-20:]
        raise StageFailed(f"{cmd[1]} exited with {done.returncode}; last lines of {log}:\n" + "\n".join(tail))


def read_jsonl(path: Path) -> list[dict]:
    """Raw records (dicts), the shape the baselines take."""
    return [record for _, record in iter_jsonl(path)]


def make_subset(full_dir: Path, data_dir: Path, sizes: dict[str, int], seed: int) -> None:
    """A seeded sample of each split (file order kept), written as one dataset folder; an existing
    folder (the other command's) is reused when it was made with the same seed and sizes."""
    if (data_dir / "dataset.json").is_file():
        meta = read_json(data_dir / "dataset.json")
        made = meta.get("subset", {})
        if made.get("seed") != seed or made.get("sizes") != sizes or meta.get("system_prompt") != SYSTEM_PROMPT:
            raise DataError(f"{data_dir}: made with seed {made.get('seed')}, sizes {made.get('sizes')} and system prompt "
                            f"{meta.get('system_prompt')!r}, not {seed}, {sizes} and {SYSTEM_PROMPT!r}; use another --out_dir")
        return
    rng = random.Random(seed)
    subset = {}
    for split in SPLITS:
        records = read_jsonl(full_dir / f"{split}.jsonl")
        if sizes[split] > len(records):
            raise DataError(f"--{split}_essays {sizes[split]} is more than the {len(records)} essays of the "
                            f"converted {split} split")
        keep = sorted(rng.sample(range(len(records)), sizes[split]))
        subset[split] = [records[i] for i in keep]
    data_dir.mkdir(parents=True)
    meta = read_json(full_dir / "dataset.json")
    meta["subset"] = {"of": str(full_dir), "seed": seed, "sizes": sizes}
    meta["system_prompt"] = SYSTEM_PROMPT
    for split, records in subset.items():
        write_jsonl_atomic(data_dir / f"{split}.jsonl", records)
    write_json_atomic(data_dir / "dataset.json", meta)


def train_and_score(args: argparse.Namespace, data_dir: Path, run_dir: Path, ntl_weight: float, log: Path) -> dict:
    """main_pipeline.py in a subprocess (as a user runs it); its per-essay greedy and weighted scores."""
    cmd = [sys.executable, str(ROOT / "main_pipeline.py"), "--base_model_name", args.base_model,
           "--data_dir", str(data_dir), "--output_dir", str(run_dir), "--no_wandb", "--seed", str(args.seed),
           "--num_train_epochs", str(args.epochs), "--max_steps", str(args.max_steps),
           "--per_device_train_batch_size", str(args.batch_size),
           "--gradient_accumulation_steps", str(args.grad_accum), "--learning_rate", str(args.learning_rate),
           "--lora_top_layers", str(args.top_layers), "--bf16",
           "--max_seq_length", str(args.max_seq_length), "--ntl_weights", str(ntl_weight), "--emo_weights", "0"]
    cmd += ["--group_by_length"] if args.group_by_length else []
    run_logged(cmd, log)
    predictions = read_jsonl(run_dir / "predictions.jsonl")
    manifest = read_json(run_dir / "run_manifest.json")
    return {"ids": [p["id"] for p in predictions], "gold": [p["gold"] for p in predictions],
            "greedy": [p["greedy"] for p in predictions], "weighted": [p["weighted"] for p in predictions],
            "greedy_invalid": sum(not p["valid"] for p in predictions),
            "train_seconds": manifest.get("train", {}).get("seconds"),
            "global_step": manifest.get("train", {}).get("global_step"),
            "inference_seconds": manifest.get("inference_seconds"), "max_prompt_tokens": manifest["max_prompt_tokens"]}


def constrained_greedy(args: argparse.Namespace, data_dir: Path, run_dir: Path, max_prompt_tokens: int) -> dict:
    """The adapter's greedy scores with --constrained decoding, on the prompts it was trained with."""
    from modules.data import load_splits
    from modules.models import load_adapter
    from modules.evaluation import predict_split

    info, splits = load_splits(data_dir)
    model, tokenizer = load_adapter(args.base_model, run_dir)
    predictions = predict_split(model, tokenizer, splits["test"], info, mtl=False, max_prompt_tokens=max_prompt_tokens,
                                weighted=False, constrained=True)
    return {"greedy, constrained": [p["greedy"] for p in predictions],
            "constrained_invalid": sum(not p["valid"] for p in predictions)}


def self_consistency(args: argparse.Namespace, run_dir: Path, test_path: Path, out_dir: Path, log: Path,
                     constrained: bool, ranges: list[tuple[int, int]]) -> dict:
    """self_consistency.py run on the adapter; per-essay majority and average votes over all m samples."""
    import numpy as np

    from modules.bank import read_bank
    from modules.voting import INVALID, average_vote, default_fallback, majority_vote

    cmd = [sys.executable, str(ROOT / "self_consistency.py"), "run", "--adapter_dir", str(run_dir),
           "--base_model_name", args.base_model, "--test_path", str(test_path), "--max_m", str(args.m),
           "--chunk_m", str(args.m), "--seed", str(args.seed), "--output_dir", str(out_dir), "--bootstrap", "0"]
    cmd += ["--sampler", args.sampler] if args.sampler else []
    cmd += ["--constrained"] if constrained else []
    run_logged(cmd, log)
    rows = {row["id"]: row for row in read_bank(out_dir / "samples.jsonl", ranges)}
    ids = [r["id"] for r in read_jsonl(test_path)]
    samples = np.full((len(ids), args.m, len(ranges)), INVALID, dtype=np.int64)
    for e, essay_id in enumerate(ids):
        for j, sample in enumerate(rows[essay_id]["samples"][: args.m]):
            if sample["scores"] is not None:
                samples[e, j] = sample["scores"]
    fallback = default_fallback(ranges)  # self_consistency.py's default: the rubric midpoints
    suffix = ", constrained" if constrained else ""
    return {f"SC majority{suffix}": majority_vote(samples, fallback).tolist(),
            f"SC average{suffix}": average_vote(samples, fallback).tolist(),
            f"sc_invalid_rate{suffix}": float((samples == INVALID).all(axis=2).mean()),
            "sampler": read_json(out_dir / "run_config.json")["args"]["sampler"]}


def baselines(data_dir: Path, full_train: list[dict]) -> dict[str, list[list[int]]]:
    """Per-essay predictions ([N][K]) of the three baselines on the test subset."""
    rubrics = read_json(data_dir / "dataset.json")["rubrics"]
    train, test = read_jsonl(data_dir / "train.jsonl"), read_jsonl(data_dir / "test.jsonl")

    def rows(per_rubric: dict[str, list[int]]) -> list[list[int]]:
        return [list(scores) for scores in zip(*(per_rubric[r["name"]] for r in rubrics))]

    return {f"TF-IDF ridge, same {len(train)} essays": rows(ridge_predictions(train, test, rubrics)),
            f"TF-IDF ridge, all {len(full_train)} train essays": rows(ridge_predictions(full_train, test, rubrics)),
            f"essay-length ridge, same {len(train)} essays": rows(length_predictions(train, test, rubrics))}


def mean_qwk(gold, pred, ranges: list[tuple[int, int]]) -> float:
    """QWK averaged over rubrics (the README's "average")."""
    import numpy as np

    from modules.voting import qwk

    gold, pred = np.asarray(gold), np.asarray(pred)
    return float(np.mean([qwk(gold[:, k], pred[:, k], lo, hi) for k, (lo, hi) in enumerate(ranges)]))


def paired_bootstrap(gold, best, other, ranges: list[tuple[int, int]], n: int, seed: int) -> tuple[float, float, float]:
    """QWK(best) - QWK(other) and its 95% percentile interval over ``n`` resamples of the essays,
    each resample scoring both methods on the same essays."""
    import numpy as np

    gold, best, other = np.asarray(gold), np.asarray(best), np.asarray(other)
    rng = np.random.default_rng(seed)
    diffs = np.empty(n)
    for i in range(n):
        idx = rng.integers(0, len(gold), len(gold))
        diffs[i] = mean_qwk(gold[idx], best[idx], ranges) - mean_qwk(gold[idx], other[idx], ranges)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return mean_qwk(gold, best, ranges) - mean_qwk(gold, other, ranges), float(lo), float(hi)


def report(out: Path, ranges: list[tuple[int, int]], args: argparse.Namespace) -> float:
    """Print every row of every command run so far in ``out``, and the bootstrap intervals of the
    best LoRA row against each baseline; returns the best LoRA QWK."""
    results = {v: read_json(out / f"results_{v}.json") for v in VARIANTS if (out / f"results_{v}.json").is_file()}
    first = next(iter(results.values()))
    gold, n_train = first["gold"], first["sizes"]["train"]
    lora = {f"LoRA {'CE+NTL' if v == 'ce+ntl' else 'CE only'}, {row}": r["predictions"][row]
            for v, r in results.items() for row in LORA_ROWS}
    base = first["baselines"]
    qwks = {name: mean_qwk(gold, pred, ranges) for name, pred in {**lora, **base}.items()}
    print(f"\nASAP set 7, holistic 0-30: {n_train} training essays, {len(gold)} test essays, seed {args.seed}, "
          f"SC m={args.m}\n")
    print("| method | QWK |\n|---|---|")
    for name, value in qwks.items():
        print(f"| {name} | {value:.3f} |")
    best = max(lora, key=qwks.get)
    print(f"\nbest LoRA row: {best}; paired bootstrap ({args.bootstrap} resamples of the test essays):\n")
    print("| best LoRA row minus | QWK difference | 95% interval |\n|---|---|---|")
    for name, pred in base.items():
        diff, lo, hi = paired_bootstrap(gold, lora[best], pred, ranges, args.bootstrap, args.seed)
        print(f"| {name} | {diff:+.3f} | [{lo:+.3f}, {hi:+.3f}] |")
    for v, r in results.items():
        counts = r["invalid"]
        print(f"\n{v}: invalid greedy lines {counts['greedy']} (constrained {counts['greedy, constrained']}) of "
              f"{len(gold)}; invalid samples {100 * counts['SC']:.1f}% (constrained {100 * counts['SC, constrained']:.1f}%), "
              f"{r['sampler']} sampler; {r['global_step']} training steps")
        print("| stage | seconds |\n|---|---|\n" + "\n".join(f"| {k} | {s:.1f} |" for k, s in r["timings"].items()))
    return qwks[best]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    source = Path(args.input)
    if shared_file_missing(source):
        return 0
    variant = "ce" if args.ablation else "ce+ntl"
    out = Path(args.out_dir)
    result_path = out / f"results_{variant}.json"
    if result_path.exists():
        print(f"error: {result_path} exists; pass another --out_dir for a new benchmark", file=sys.stderr)
        return 2
    if args.test_essays < MIN_TEST:
        print(f"note: --test_essays {args.test_essays} < {MIN_TEST}: a smoke run, not a result to report")
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    try:
        with stage("convert + subset", timings):
            if not (out / "asap7_full" / "dataset.json").is_file():  # the other command's conversion is reused
                print("   " + convert_asap(source, out / "asap7_full", seed=args.seed).format().replace("\n", "\n   "))
            sizes = {"train": args.train_essays, "valid": args.valid_essays, "test": args.test_essays}
            make_subset(out / "asap7_full", out / "data", sizes, args.seed)
        data, run_dir = out / "data", out / f"run_{variant}"
        ranges = [(r["min"], r["max"]) for r in read_json(data / "dataset.json")["rubrics"]]
        with stage("train + score", timings):
            run = train_and_score(args, data, run_dir, VARIANTS[variant], out / "logs" / f"train_{variant}.log")
        with stage("greedy, constrained", timings):
            run.update(constrained_greedy(args, data, run_dir, run["max_prompt_tokens"]))
        for constrained in (False, True):
            name = "self-consistency" + (", constrained" if constrained else "")
            with stage(name, timings):
                folder = f"sc_{variant}" + ("_constrained" if constrained else "")
                run.update(self_consistency(args, run_dir, data / "test.jsonl", out / folder,
                                            out / "logs" / f"{folder}.log", constrained, ranges))
        with stage("baselines", timings):
            base = baselines(data, read_jsonl(out / "asap7_full" / "train.jsonl"))
    except (DataError, StageFailed) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    timings["total"] = round(time.perf_counter() - started, 1)
    write_json_atomic(result_path, {
        "config": vars(args), "sizes": sizes, "ids": run["ids"], "gold": run["gold"], "timings": timings,
        "predictions": {row: run[row] for row in LORA_ROWS}, "baselines": base, "sampler": run["sampler"],
        "invalid": {"greedy": run["greedy_invalid"], "greedy, constrained": run["constrained_invalid"],
                    "SC": run["sc_invalid_rate"], "SC, constrained": run["sc_invalid_rate, constrained"]},
        "global_step": run["global_step"], "train_seconds": run["train_seconds"]})
    best = report(out, ranges, args)
    print(f"results: {result_path}")
    print(f"best_lora_qwk={best:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
