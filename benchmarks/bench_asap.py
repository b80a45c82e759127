"""Real-essay benchmark: LoRA-fine-tune smollm2-135m on ASAP essay set 7 and compare its QWK
(greedy, weighted, self-consistency majority and average vote) with a TF-IDF ridge baseline.

    python benchmarks/bench_asap.py [--train_essays 500] [--test_essays 150] [--m 10] [--ablation]

Stages, each timed (wall seconds):

1. convert ``../shared/data/asap/asap_set7.tsv`` with ``modules.converters.convert_asap`` (seeded
   70/15/15 split; 1,569 essays, holistic score 0-30). When the file is absent the script says so
   and exits 0: the shared data is not part of a fresh clone.
2. subset: a seeded sample of ``--train_essays`` essays of the train split, ``--valid_essays`` of
   valid and ``--test_essays`` (>= 150 for a real run) of test, each kept in file order, written as
   one dataset folder. Every method below sees exactly these essays.
3. train + score: ``main_pipeline.py`` as a subprocess (no ``--mtl``: ASAP has no feedback, so EMO
   has nothing to train on; the loss is CE + 2.0 NTL); greedy and weighted QWK come from the run
   folder's ``evaluation_results.json``.
4. self-consistency: ``self_consistency.py run`` on the adapter with ``--max_m m --chunk_m m``;
   majority and average vote QWK at m from ``best_qwk_scores.json`` (``maj``/``avg`` -> ``max_m``).
5. ridge: ``modules.convert.ridge_baseline`` (TF-IDF 1-2 grams + ridge, rounded and clipped) fit on
   the same training subset, and, for reference, on the whole converted train split.
6. with ``--ablation``: the same training and scoring with CE only (``--ntl_weights 0``), same seed
   and split (no self-consistency for it).

Prints a markdown table (method | QWK), the stage times, writes ``results.json`` in the output folder
(default ``runs/bench_asap_<time>``, never overwritten), and ends with ``qwk_weighted=<x>``. QWK is
the mean over rubrics (here the one holistic rubric), on its full 0-30 range.

How the defaults were sized. The issue's budget is about 40 minutes of CPU for the fine-tuning, on
the project's 2-core machine. With the smollm2 tokenizer and chat template a set-7 training example
(holistic-only prompt, essay, score line) is 331 tokens on average (median 308, p90 507, max 981),
measured with ``modules.encoding.encode_example`` over the 1,099 essays of the converted train split.
The trainer pads each batch to its longest example: over random batches of 4 drawn from those
lengths that is 471 tokens per example. At the ~110 tokens/s the CPU quickstart trains at (42,610
tokens in 411 s, see the README) an example costs ~4.3 s, so 500 essays x 1 epoch (125 steps of 4)
take ~36 min, plus ~1 min to validate on 30 essays and ~1 min to load and encode: ~38 min.
Batch size 1 would avoid the padding, but a probe on the same CPU ran batch 4 at 1.6x the tokens/s
of batch 1 (measured while other jobs shared the machine, so only the ratio is used), which more
than pays for the padding.

The stages after training are outside that budget; estimated for the same CPU (the machine was
shared while this was written, so these come from the README's measured rates scaled to set 7's
prompt length, 320 tokens against the synthetic 243, and from ratios measured side by side).
Scoring the test essays (greedy, then weighted over the 31 values 0-30): ~3-4 s per essay, ~8-10
min for 150. Self-consistency at m=10: the ``generate`` sampler encodes the prompt once per sample,
~13 s per essay (README: 0.9 samples/s), ~33 min for 150; the ``trie`` sampler (the default of
``self_consistency.py``, used unless ``--sampler`` names another) encodes it once per essay and ran
2.9x faster than ``generate`` on 4 essays x 10 samples here, so ~4-5 s per essay, ~11 min. About
60 minutes in all (~80 with ``--sampler generate``); ``--ablation`` adds a second training and
scoring (~46 min).
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from modules.convert.baseline import ridge_baseline  # noqa: E402
from modules.convert.corpora import convert_asap  # noqa: E402
from modules.data import SPLITS, DataError, write_json_atomic, write_jsonl_atomic  # noqa: E402

ASAP7 = ROOT.parent / "shared" / "data" / "asap" / "asap_set7.tsv"
MIN_TEST = 150


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", default=str(ASAP7), help="ASAP set-7 file (training_set_rel3.tsv layout)")
    p.add_argument("--out_dir", default=None, help="output folder (default runs/bench_asap_<time>)")
    p.add_argument("--base_model", default="smollm2-135m")
    p.add_argument("--seed", type=int, default=0, help="split, subset, training and sampling seed")
    p.add_argument("--train_essays", type=int, default=500, help="sized for ~40 min of training (see above)")
    p.add_argument("--valid_essays", type=int, default=30)
    p.add_argument("--test_essays", type=int, default=MIN_TEST)
    p.add_argument("--epochs", type=float, default=1)
    p.add_argument("--max_steps", type=int, default=-1, help="overrides --epochs when > 0")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--grad_accum", type=int, default=1)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--max_seq_length", type=int, default=1024)
    p.add_argument("--m", type=int, default=10, help="self-consistency samples per essay")
    p.add_argument("--sampler", default=None, help="self_consistency.py --sampler (default: its own default)")
    p.add_argument("--ablation", action="store_true", help="also train and score CE-only on the same split")
    args = p.parse_args(argv)
    for key in ("train_essays", "valid_essays", "test_essays", "m", "batch_size", "grad_accum"):
        if getattr(args, key) < 1:
            p.error(f"--{key} must be >= 1")
    return args


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
    """Raw records (dicts), the shape ``ridge_baseline`` takes."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def make_subset(full_dir: Path, data_dir: Path, sizes: dict[str, int], seed: int) -> dict[str, list[dict]]:
    """A seeded sample of each split (file order kept), written as one dataset folder."""
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
    meta = json.loads((full_dir / "dataset.json").read_text(encoding="utf-8"))
    meta["subset"] = {"of": str(full_dir), "seed": seed, "sizes": sizes}
    for split, records in subset.items():
        write_jsonl_atomic(data_dir / f"{split}.jsonl", records)
    write_json_atomic(data_dir / "dataset.json", meta)
    return subset


def train_and_score(args: argparse.Namespace, data_dir: Path, run_dir: Path, ntl_weight: float, log: Path) -> dict:
    """main_pipeline.py in a subprocess (as a user runs it), then its greedy/weighted QWK and timings."""
    cmd = [sys.executable, str(ROOT / "main_pipeline.py"), "--base_model_name", args.base_model,
           "--data_dir", str(data_dir), "--output_dir", str(run_dir), "--no_wandb", "--seed", str(args.seed),
           "--num_train_epochs", str(args.epochs), "--max_steps", str(args.max_steps),
           "--per_device_train_batch_size", str(args.batch_size),
           "--gradient_accumulation_steps", str(args.grad_accum), "--learning_rate", str(args.learning_rate),
           "--max_seq_length", str(args.max_seq_length), "--ntl_weights", str(ntl_weight), "--emo_weights", "0"]
    run_logged(cmd, log)
    results = json.loads((run_dir / "evaluation_results.json").read_text(encoding="utf-8"))
    manifest = json.loads((run_dir / "run_manifest.json").read_text(encoding="utf-8"))
    return {"greedy": results["token"]["average"], "weighted": results["weighted"]["average"],
            "greedy_invalid": results["token"].get("invalid"), "evaluation_results": results,
            "train_seconds": manifest.get("train", {}).get("seconds"),
            "inference_seconds": manifest.get("inference_seconds"),
            "global_step": manifest.get("train", {}).get("global_step")}


def self_consistency(args: argparse.Namespace, run_dir: Path, test_path: Path, out_dir: Path, log: Path) -> dict:
    """self_consistency.py run on the adapter; majority and average vote QWK over all m samples."""
    cmd = [sys.executable, str(ROOT / "self_consistency.py"), "run", "--adapter_dir", str(run_dir),
           "--base_model_name", args.base_model, "--test_path", str(test_path), "--max_m", str(args.m),
           "--chunk_m", str(args.m), "--seed", str(args.seed), "--output_dir", str(out_dir)]
    if args.sampler:
        cmd += ["--sampler", args.sampler]
    run_logged(cmd, log)
    sampler = json.loads((out_dir / "run_config.json").read_text(encoding="utf-8"))["args"]["sampler"]
    best = json.loads((out_dir / "best_qwk_scores.json").read_text(encoding="utf-8"))
    curves = json.loads((out_dir / "curves.json").read_text(encoding="utf-8"))
    at_m = {vote: best[vote]["max_m"] for vote in ("maj", "avg")}
    if any(v["m"] != args.m for v in at_m.values()):
        raise StageFailed(f"{out_dir}: best_qwk_scores.json reports m={at_m['maj']['m']}, expected {args.m}")
    return {"majority": at_m["maj"]["average"], "average": at_m["avg"]["average"], "sampler": sampler,
            "invalid_rate": curves.get("invalid_rate"), "best": best}


def ridge(subset: dict[str, list[dict]], full_train: list[dict], rubrics: list[dict]) -> dict[str, float]:
    """Mean-over-rubrics QWK of the TF-IDF ridge baseline, fit on the subset and on all of train."""
    out = {}
    for name, train in (("subset", subset["train"]), ("full_train", full_train)):
        qwks = ridge_baseline(train, subset["test"], rubrics)
        out[name] = sum(qwks.values()) / len(qwks)
    return out


def format_table(rows: list[tuple[str, float]]) -> str:
    """Markdown, so the table can go into the README as printed."""
    return "\n".join(["| method | QWK |", "|---|---|", *[f"| {name} | {value:.3f} |" for name, value in rows]])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    source = Path(args.input)
    if not source.is_file():
        print(f"{source} not found: the ASAP set-7 file is shared data outside the repository "
              "(../shared/data/asap/); nothing to benchmark.")
        return 0
    out = Path(args.out_dir) if args.out_dir else ROOT / "runs" / f"bench_asap_{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and any(out.iterdir()):
        print(f"error: {out}: output folder exists and is not empty", file=sys.stderr)
        return 2
    if args.test_essays < MIN_TEST:
        print(f"note: --test_essays {args.test_essays} < {MIN_TEST}: a smoke run, not a result to report")
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    results: dict = {"config": vars(args), "out_dir": str(out), "timings": timings}
    started = time.perf_counter()
    try:
        with stage("convert", timings):
            report = convert_asap(source, out / "asap7_full", seed=args.seed)
            print("   " + report.format().replace("\n", "\n   "))
        with stage("subset", timings):
            sizes = {"train": args.train_essays, "valid": args.valid_essays, "test": args.test_essays}
            subset = make_subset(out / "asap7_full", out / "data", sizes, args.seed)
            results["sizes"] = sizes
        variants = [("ce+ntl", 2.0)] + ([("ce", 0.0)] if args.ablation else [])
        runs = {}
        for name, ntl in variants:
            with stage(f"train+score {name}", timings):
                runs[name] = train_and_score(args, out / "data", out / f"run_{name}", ntl, out / "logs" / f"train_{name}.log")
                print(f"   greedy {runs[name]['greedy']:.3f}, weighted {runs[name]['weighted']:.3f}, "
                      f"invalid greedy lines {runs[name]['greedy_invalid']}")
        with stage(f"self-consistency m={args.m}", timings):
            sc = self_consistency(args, out / "run_ce+ntl", out / "data" / "test.jsonl", out / "sc_ce+ntl",
                                  out / "logs" / "self_consistency.log")
        with stage("ridge", timings):
            rubrics = json.loads((out / "data" / "dataset.json").read_text(encoding="utf-8"))["rubrics"]
            ridge_qwk = ridge(subset, read_jsonl(out / "asap7_full" / "train.jsonl"), rubrics)
    except (DataError, StageFailed) as err:
        print(f"error: {err}", file=sys.stderr)
        write_json_atomic(out / "results.json", {**results, "error": str(err)})
        return 1
    timings["total"] = round(time.perf_counter() - started, 1)

    model = f"{args.base_model} LoRA"
    rows = [(f"{model} CE+NTL, greedy", runs["ce+ntl"]["greedy"]),
            (f"{model} CE+NTL, weighted", runs["ce+ntl"]["weighted"]),
            (f"{model} CE+NTL, self-consistency majority (m={args.m}, {sc['sampler']} sampler)", sc["majority"]),
            (f"{model} CE+NTL, self-consistency average (m={args.m}, {sc['sampler']} sampler)", sc["average"])]
    if "ce" in runs:
        rows += [(f"{model} CE only, greedy", runs["ce"]["greedy"]),
                 (f"{model} CE only, weighted", runs["ce"]["weighted"])]
    n_full = len(read_jsonl(out / "asap7_full" / "train.jsonl"))
    rows += [(f"TF-IDF + ridge ({args.train_essays} training essays, same subset)", ridge_qwk["subset"]),
             (f"TF-IDF + ridge (all {n_full} essays of the train split)", ridge_qwk["full_train"])]
    results.update(methods=dict(rows), runs=runs, self_consistency=sc, ridge=ridge_qwk,
                   conversion=report.to_dict())
    write_json_atomic(out / "results.json", results)

    print()
    print(f"ASAP set 7, holistic 0-30: {args.train_essays} training essays, {args.test_essays} test essays, "
          f"seed {args.seed}")
    print()
    print(format_table(rows))
    print()
    print("| stage | seconds |")
    print("|---|---|")
    for name, seconds in timings.items():
        print(f"| {name} | {seconds:.1f} |")
    print()
    print(f"invalid greedy lines: {runs['ce+ntl']['greedy_invalid']} of {args.test_essays}; invalid samples: "
          f"{100 * sc['invalid_rate']:.1f}% ({sc['sampler']} sampler)")
    print(f"results: {out / 'results.json'}")
    print(f"qwk_weighted={runs['ce+ntl']['weighted']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
