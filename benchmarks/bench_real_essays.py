"""Real-essay benchmark: LoRA-fine-tune smollm2-135m on a real corpus with the product's commands and
compare every row it scores with baselines fit on the same essays, recording every per-essay
prediction in a tracked result file (fields: benchmarks/results/README.md; recipes, tables and
levers: docs/results.md). ``benchmarks/bench_probe.py`` adds the frozen probe on the same essays.

    python -m benchmarks.bench_real_essays --corpus asap|asap-traits|ell   # + --ablation: CE only
    python -m benchmarks.bench_real_essays --corpus asap --seed 1 --replicate  # greedy + weighted (+ head) only
    python -m benchmarks.real_essay_tables                                  # the tables of every result

The corpus files are shared data outside the repository (``../shared/data``); when one is absent the
script says so and exits 0. On every corpus the recipe trains a score head (asap layer 21,
asap-traits 20, ell 19) with the LoRA (``Corpus.head_layer``; ``--no_head`` trains without it, as the
recipe did before issue 46). Stages,
each timed (run it alone: the times are part of the result): convert + subset (``modules.convert``,
a seeded subset shared by every command on the corpus); train (``main_pipeline.py --skip_scoring``
as a subprocess); every LoRA row on the test, validation and pick essays from one prefill per prompt
(``modules.predict.predict_batch``, prompted as the run manifest says: greedy, weighted, constrained
greedy, ``--m`` self-consistency samples and their votes; the head's row where the run trained one;
``--replicate``: greedy, weighted and head only); baselines; the confidence study
(``modules.evaluation.evaluate_confidence``). It ends with ``best_lora_qwk=<x>``: the test average
QWK of the LoRA row best on the validation and pick essays, mean over seeds.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import numpy as np

from benchmarks import real_essay_tables as tables
from benchmarks.result_files import (DEFAULT_TARGET_MODULES, FROZEN_VARIANT, PATH_FLAGS, RESULTS, ROOT, data_key,
                                     group_key, line_counts, read_results, repo_relative, result_path, round_floats,
                                     rows_present, split_entry, write_result)
from modules.convert.baseline import baseline_rows
from modules.convert.corpora import ASAP_TRAITS, asap_specs, convert_asap, convert_ellipse
from modules.convert.pipeline import read_table
from modules.convert.subset import make_subset, read_records, subset_sizes
from modules.data import load_dataset_info
from modules.jsonio import DataError, read_json, read_text_utf8
from modules.metrics import mean_qwk
from modules.runs import git_commit, git_dirty, machine

SHARED = ROOT.parent / "shared" / "data"
ASAP7 = SHARED / "asap" / "asap_set7.tsv"
# dataset.json's system_prompt for the subset: a short system message in place of SmolLM2's default
# (18 tokens naming the assistant), which every training step would pay for.
SYSTEM_PROMPT = "You score essays."
# NTL weight of each command's LoRA: 0.2, the quickstart's scale; at the original tool's 2.0, NTL's
# gradients dwarf CE's and the hour's training learned far less (docs/guide.md, the quickstart's settings).
VARIANTS = {"ce+ntl": 0.2, "ce": 0.0}
SCORED_SPLITS = ("test", "valid")


@dataclass(frozen=True)
class Corpus:
    """A corpus's default file and the sizes that fit its default command in the hour (module docstring)."""

    default_input: Path
    train_essays: int | None  # None: every essay of the converted training split
    epochs: float
    test_essays: int  # also the minimum for a result to report
    pick_essays: int  # validation essays for the row pick beyond the 30 (module docstring)
    probe_tokens: int = 512  # the essay tokens the probe reads (benchmarks/bench_probe.py)
    # the score head the recipe trains with the LoRA (main_pipeline.py --head_layer), where it was kept
    # on validation essays (docs/results.md, "The score head"); None: no head
    head_layer: int | None = None
    head_learning_rate: float | None = None
    # self-consistency samples per essay (--m): ELL's six score lines make each sample dear (with the
    # head its command ran 60 min 33 s at 10 and 63 min 26 s at 5, over the hour; each sample,
    # unconstrained and constrained, costs about 0.2 s an essay: docs/results.md, ELL)
    m: int = 10


CORPORA = {
    "asap": Corpus(ASAP7, 800, 2.5, 150, 120, head_layer=21, head_learning_rate=1e-4),
    "asap-traits": Corpus(SHARED / "asap" / "asap_set7_traits.tsv", None, 2.0, 150, 60, head_layer=20,
                          head_learning_rate=1e-4),
    "ell": Corpus(SHARED / "ell" / "ell_train.csv", 800, 1.5, 200, 0, 768, head_layer=19, head_learning_rate=1e-4,
                  m=3),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", choices=sorted(CORPORA), default="asap")
    p.add_argument("--input", default=None, help="corpus file in the corpus's layout (default: its file in ../shared/data)")
    p.add_argument("--essay_set", type=int, default=7, help="ASAP essay set (asap, asap-traits)")
    p.add_argument("--out_dir", default=None,
                   help="work folder shared by every command on this corpus (default runs/real_essays/<corpus>)")
    p.add_argument("--results_dir", default=None,
                   help="where the result file goes (default benchmarks/results; smoke runs: <out_dir>/results)")
    p.add_argument("--ablation", action="store_true", help="train and score LoRA with CE only (--ntl_weights 0)")
    p.add_argument("--replicate", action="store_true",
                   help="a replicate seed: skip the constrained and self-consistency stages (greedy + weighted rows)")
    p.add_argument("--base_model", default="smollm2-135m")
    p.add_argument("--seed", type=int, default=0, help="training, sampling and bootstrap seed")
    p.add_argument("--data_seed", type=int, default=0, help="conversion split and subset seed (same essays across seeds)")
    p.add_argument("--train_essays", type=int, default=None, help="default: the corpus's (module docstring)")
    p.add_argument("--valid_essays", type=int, default=30)
    p.add_argument("--test_essays", type=int, default=None, help="default: the corpus's minimum (150; ELL 200)")
    p.add_argument("--pick_essays", type=int, default=None,
                   help="more validation essays, scored after training for the row pick only (default: the "
                        "corpus's: asap 120, asap-traits 60, ell 0)")
    p.add_argument("--epochs", type=float, default=None, help="default: the corpus's (module docstring)")
    p.add_argument("--max_steps", type=int, default=-1, help="overrides --epochs when > 0")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--grad_accum", type=int, default=1, help="micro-batches of --batch_size per optimizer step")
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--load_best_model_at_end", action=argparse.BooleanOptionalAction, default=False,
                   help="main_pipeline.py's flag; the recipe keeps the last step's weights (docs/results.md, levers)")
    p.add_argument("--top_layers", type=int, default=0, help="main_pipeline.py --lora_top_layers (0: every layer); N > 0 also caches the frozen layers "
                        "below (--cache_frozen_layers)")
    p.add_argument("--head_layer", type=int, default=None,
                   help="main_pipeline.py --head_layer: a score head trained with the LoRA (its 'head' row); "
                        "default: the corpus's (asap: 21, asap-traits: 20, ell: 19)")
    p.add_argument("--head_weight", type=float, default=None, help="main_pipeline.py --head_weight (default 1)")
    p.add_argument("--head_learning_rate", type=float, default=None,
                   help="main_pipeline.py --head_learning_rate (default: the corpus's, else --learning_rate)")
    p.add_argument("--no_head", action="store_true",
                   help="train without the corpus's score head (asap's recipe before the head was kept)")
    p.add_argument("--target_modules", default=DEFAULT_TARGET_MODULES,
                   help="main_pipeline.py --lora_target_modules: the projections LoRA adapts")
    p.add_argument("--group_by_length", action=argparse.BooleanOptionalAction, default=True,
                   help="main_pipeline.py --group_by_length: length-bucketed batches in random order (default on)")
    p.add_argument("--max_seq_length", type=int, default=1024, help="prompt + target tokens (the essay budget)")
    p.add_argument("--m", type=int, default=None, help="self-consistency samples per essay (default: the corpus's: "
                                                       "asap and asap-traits 10, ell 5)")
    p.add_argument("--batch_essays", type=int, default=8,
                   help="essays decoded together (main_pipeline.py's --per_device_eval_batch_size default)")
    p.add_argument("--bootstrap", type=int, default=2000, help="hierarchical bootstrap resamples of the printed tables")
    args = p.parse_args(argv)
    corpus = CORPORA[args.corpus]
    args.input = args.input or str(corpus.default_input)
    args.epochs = args.epochs or corpus.epochs
    # None, not 0, means "the corpus's": an explicit 0 reaches the checks below
    for key in ("train_essays", "test_essays", "pick_essays", "m"):
        if getattr(args, key) is None:
            setattr(args, key, getattr(corpus, key))
    head_flags = [f"--{key}" for key in ("head_layer", "head_weight", "head_learning_rate")
                  if getattr(args, key) is not None]
    if args.no_head and head_flags:
        p.error(f"--no_head with {', '.join(head_flags)}: choose one")
    if not args.no_head and args.head_layer is None:
        args.head_layer = corpus.head_layer
    if args.head_layer is not None and args.head_learning_rate is None:
        args.head_learning_rate = corpus.head_learning_rate
    if args.pick_essays < 0:
        p.error("--pick_essays must be >= 0")
    for key in ("train_essays", "valid_essays", "test_essays", "m", "batch_size", "grad_accum", "bootstrap",
                "batch_essays"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            p.error(f"--{key} must be >= 1")
    return args


def corpus_key(args: argparse.Namespace) -> str:
    """The results folder's name: ``asap-set7``, ``asap-set7-traits``, ``ell``."""
    if args.corpus == "ell":
        return "ell"
    return f"asap-set{args.essay_set}" + ("-traits" if args.corpus == "asap-traits" else "")


def shared_file_missing(source: Path) -> bool:
    """Say so when the corpus file is absent: it is shared data, not part of a fresh clone."""
    if source.is_file():
        return False
    print(f"{source} not found: the corpus file is shared data outside the repository "
          "(../shared/data/); nothing to benchmark.")
    return True


class StageFailed(RuntimeError):
    """A subprocess stage failed; the message carries the tail of its log."""


@contextmanager
def stage(name: str, timings: dict[str, float]) -> Iterator[None]:
    """Print the stage's name, run it, and record its wall seconds (the result file keeps them)."""
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


def convert(args: argparse.Namespace, out: Path) -> None:
    """The corpus's converter into ``out`` (seeded split); prints its report."""
    if args.corpus == "asap-traits" and (args.essay_set not in ASAP_TRAITS
                                         or len(asap_specs(args.essay_set, read_table(args.input, "\t").header)) < 2):
        # checked before anything is written: a holistic-only folder would be reused as the traits' data
        raise DataError(f"{args.input}: no trait columns for essay set {args.essay_set} (ASAP publishes traits "
                        "for sets 7 and 8); use --corpus asap")
    if args.corpus == "ell":
        report = convert_ellipse(args.input, out, seed=args.data_seed)
    else:
        report = convert_asap(args.input, out, essay_sets=[args.essay_set], seed=args.data_seed,
                              traits=args.corpus == "asap-traits")
    print("   " + report.format().replace("\n", "\n   "))


def prepare_data(args: argparse.Namespace, out: Path) -> tuple[Path, Path, dict[str, int]]:
    """The corpus converted into ``out/full_seed<k>`` (another command's conversion is reused) and its
    subset ``out/data_seed<k>``; returns both folders and the subset's sizes."""
    full = out / f"full_seed{args.data_seed}"
    if not (full / "dataset.json").is_file():
        convert(args, full)
    sizes = subset_sizes(full, args.train_essays, args.valid_essays, args.test_essays)
    args.train_essays = sizes["train"]  # recorded as a number, also where the default means all
    data = out / f"data_seed{args.data_seed}"
    make_subset(full, data, sizes, args.pick_essays, args.data_seed, SYSTEM_PROMPT)
    return full, data, sizes


def data_fields(args: argparse.Namespace, meta: dict, sizes: dict[str, int]) -> dict:
    """A result file's ``rubrics`` and ``data``: which essays it scored (the input by name and sha256)."""
    key = corpus_key(args)
    return {"rubrics": [{k: r[k] for k in ("name", "min", "max", "scale") if k in r} for r in meta["rubrics"]],
            "data": {"input": Path(args.input).name, "sha256": meta.get("conversion", {}).get("sha256"),
                     "essay_set": None if key == "ell" else args.essay_set, "data_seed": args.data_seed,
                     "sizes": sizes, "pick_essays": args.pick_essays}}


def command_fields(args: argparse.Namespace, argv: list[str] | None) -> dict:
    """A result file's ``command`` as typed and ``config`` (every flag), paths relative to the repository."""
    typed = argv if argv is not None else sys.argv[1:]
    return {"command": " ".join([Path(sys.argv[0]).name, *map(repo_relative, typed)]),
            "config": {**vars(args), **{key: repo_relative(getattr(args, key)) for key in PATH_FLAGS}}}


def train(args: argparse.Namespace, data_dir: Path, run_dir: Path, ntl_weight: float, log: Path) -> dict:
    """main_pipeline.py in a subprocess (as a user runs it), training and saving the adapter only
    (``--skip_scoring``: the benchmark scores every row itself, from one prefill per essay); its
    training summary and the prompt budget it trained on (``max_prompt_tokens``)."""
    cmd = [sys.executable, str(ROOT / "main_pipeline.py"), "--base_model_name", args.base_model,
           "--data_dir", str(data_dir), "--output_dir", str(run_dir), "--no_wandb", "--seed", str(args.seed),
           "--num_train_epochs", str(args.epochs), "--max_steps", str(args.max_steps),
           "--per_device_train_batch_size", str(args.batch_size),
           "--gradient_accumulation_steps", str(args.grad_accum), "--learning_rate", str(args.learning_rate),
           "--lora_top_layers", str(args.top_layers), "--lora_target_modules", args.target_modules,
           # LoRA on the top layers only: the frozen ones below run once per essay (the same training,
           # tested to 1e-5), and the head's starting ridge reads that pass too
           *(["--cache_frozen_layers"] if args.top_layers else []),
           # keeping the last step, the in-training evaluations would choose nothing: skip their time
           *(["--load_best_model_at_end"] if args.load_best_model_at_end
             else ["--no-load_best_model_at_end", "--eval_strategy", "no"]),
           "--max_seq_length", str(args.max_seq_length), "--ntl_weights", str(ntl_weight), "--emo_weights", "0",
           "--skip_scoring"]
    cmd += ["--group_by_length"] if args.group_by_length else []
    for flag in ("head_layer", "head_weight", "head_learning_rate"):
        cmd += [f"--{flag}", str(getattr(args, flag))] if getattr(args, flag) is not None else []
    run_logged(cmd, log)
    manifest = read_json(run_dir / "run_manifest.json")
    history = json.loads(read_text_utf8(run_dir / "log_history.json"))  # a list: the Trainer's log entries
    train = manifest.get("train", {})
    return {"training": {"seconds": train.get("seconds"), "global_step": train.get("global_step"),
                         "best_checkpoint": Path(train["best_checkpoint"]).name if train.get("best_checkpoint") else None,
                         "best_eval_loss": train.get("best_eval_loss"),
                         "kept_checkpoint": Path(train["kept_checkpoint"]).name if train.get("kept_checkpoint") else None,
                         "eval_loss": [[h.get("epoch"), h["eval_loss"]] for h in history if "eval_loss" in h],
                         "precision": manifest.get("precision")},
            "max_prompt_tokens": manifest["max_prompt_tokens"]}


def sc_votes(bank_path: Path, split_path: Path, records, info, suffix: str) -> tuple[dict, dict, np.ndarray]:
    """A written sample bank's per-essay majority and average votes over all its samples (rows
    ``SC majority<suffix>``, ``SC average<suffix>``; self_consistency.py's default fallback, the
    rubric midpoints), its invalid/truncated sample counts, and the bank as int [N, m, K] in the
    split file's order (-1 invalid)."""
    from modules.bank import bank_samples
    from modules.voting import INVALID, average_vote, default_fallback, majority_vote

    samples, truncated = bank_samples(bank_path, str(split_path), records, info)
    fallback = default_fallback(info.ranges)
    votes = {f"SC majority{suffix}": majority_vote(samples, fallback).tolist(),
             f"SC average{suffix}": average_vote(samples, fallback).tolist()}
    counts = {"lines": int(samples.shape[0] * samples.shape[1]), "invalid": int((samples == INVALID).all(axis=2).sum()),
              "truncated": truncated}
    return votes, counts, samples


def lora_rows(args: argparse.Namespace, data_dir: Path, run_dir: Path, out: Path, variant: str, run: dict,
              splits: list[str]) -> dict[str, np.ndarray]:
    """Every LoRA row on ``splits`` from the saved adapter, prompted as its run manifest records,
    batch by batch with :func:`modules.predict.predict_batch`: greedy and weighted, constrained
    greedy, and self-consistency, unconstrained and ``--constrained``, all from one prefill of each
    prompt (at ELL's prompt lengths the prompt is most of an essay's cost). With ``--replicate``,
    greedy and weighted only (:func:`modules.predict.predict_split`).

    Self-consistency is ``self_consistency.py run``'s at its defaults (``SamplerSettings``) with
    ``--max_m m`` and ``--seed seed``; each bank is written in its format (``sc_<variant>_seed<k>_
    <split>[_constrained]/samples.jsonl`` under ``out``), essay by essay as its batch ends. Each
    split's entry (:func:`split_entry` plus the other rows and their line counts) goes into
    ``run[split]``, its prediction dicts into ``run["predictions"][split]``; returns the unconstrained
    sample bank of each split (the SC confidence signals judge its spread).
    """
    from contextlib import ExitStack

    from tqdm.auto import tqdm

    from modules.bank import append_bank_line, bank_line
    from modules.data import load_split
    from modules.models import load_adapter
    from modules.predict import SampleDraws, predict_batch, predict_split
    from modules.runs import PromptSettings
    from modules.score_head import load_head

    info = load_dataset_info(data_dir)
    settings = PromptSettings.from_run(run_dir)
    model, tokenizer = load_adapter(args.base_model, run_dir)
    head = load_head(run_dir)  # None without --head_layer
    records = {split: load_split(data_dir / f"{split}.jsonl", info) for split in splits}
    run["predictions"] = {}
    if args.replicate:
        for split in splits:
            run["predictions"][split] = predict_split(model, tokenizer, records[split], info, settings,
                                                      batch_size=args.batch_essays, head=head)
            run[split] = split_entry(run["predictions"][split])
        return {}
    banks = {}
    for split in splits:
        folders = {constrained: out / (f"sc_{variant}_seed{args.seed}_{split}" + ("_constrained" if constrained else ""))
                   for constrained in (False, True)}
        predictions, constrained_greedy = [], []
        with ExitStack() as files:
            handles = {}
            for constrained, folder in folders.items():
                folder.mkdir(parents=True, exist_ok=True)
                handles[constrained] = files.enter_context((folder / "samples.jsonl").open("w", encoding="utf-8"))
            for start in tqdm(range(0, len(records[split]), args.batch_essays), desc=f"{split}, one prefill",
                              unit="batch", disable=None):
                batch = records[split][start:start + args.batch_essays]
                rows = predict_batch(model, tokenizer, batch, info, settings, both_decodings=True,
                                     draws=SampleDraws(args.m, args.seed), first_index=start, head=head)
                predictions += rows.predictions
                constrained_greedy += rows.constrained
                for constrained, handle in handles.items():
                    for record, samples in zip(batch, rows.samples[constrained]):
                        append_bank_line(handle, bank_line(record.id, record.scores, samples))
        run["predictions"][split] = predictions
        run[split] = split_entry(predictions)
        run[split]["rows"]["greedy, constrained"] = [p["greedy"] for p in constrained_greedy]
        run[split]["line_counts"]["greedy, constrained"] = line_counts(constrained_greedy)
        for constrained, folder in folders.items():
            suffix = ", constrained" if constrained else ""
            votes, counts, samples = sc_votes(folder / "samples.jsonl", data_dir / f"{split}.jsonl", records[split],
                                              info, suffix)
            run[split]["rows"].update(votes)
            run[split]["line_counts"]["SC samples" + suffix] = counts
            if not constrained:
                banks[split] = samples
    run["sampler"] = "trie"
    return banks


def confidence_study(data_dir: Path, predictions: dict[str, list[dict]], banks: dict, seed: int, out: Path,
                     title: str) -> dict:
    """The confidence study's record for the judged weighted row: the compact report of
    :func:`modules.evaluation.evaluate_confidence` (conformal sets and the review rule calibrated on
    validation, measured on test; its calibration and figures go to ``out``), and per split the essay
    signals of :func:`modules.confidence.essay_signals` it judged (valid seeded ``seed + 1``, test
    ``seed``, as ``confidence_report`` seeds them; SC signals only when ``banks`` holds the split's
    sample bank), rounded to 6 decimals, in the rows' order."""
    from modules.confidence import essay_signals
    from modules.evaluation import evaluate_confidence

    info = load_dataset_info(data_dir)
    essays, samples = {}, {}
    for split in SCORED_SPLITS:
        ids = [p["id"] for p in predictions[split]]
        records = read_records(data_dir / f"{split}.jsonl")
        essays[split] = [{r["id"]: r["essay"] for r in records}[i] for i in ids]  # in the rows' order
        if split in banks:
            bank = dict(zip([r["id"] for r in records], banks[split]))
            samples[split] = np.stack([bank[i] for i in ids])
    signals = {}
    for split, offset in (("valid", 1), ("test", 0)):
        values, _ = essay_signals(predictions[split], info.rubric_names, info.ranges, prediction="weighted",
                                  essays=essays[split], samples=samples.get(split), seed=seed + offset)
        signals[split] = {name: round_floats(v.tolist()) for name, v in values.items()}
    _, report, _ = evaluate_confidence(predictions["valid"], predictions["test"], info, out,
                                       valid_essays=essays["valid"], test_essays=essays["test"], title=title,
                                       valid_samples=samples.get("valid"), test_samples=samples.get("test"), seed=seed)
    print(f"   calibration and figures: {out}")
    kept = {"large_errors": report["large_errors"],
            "ece": report["calibration"]["ece"] if report["calibration"] else None,
            "conformal": {k: report["conformal"][k] for k in ("method", "target_coverage", "average_coverage",
                                                             "average_set_size")} if report["conformal"] else None,
            "review": report["review"]}
    return {"prediction": report["prediction"], "signals": signals, "report": round_floats(kept, 4)}


def baselines(data_dir: Path, full_train: list[dict], split: str, entry: dict) -> None:
    """The baselines' rows on ``split`` of the subset (:func:`modules.convert.baseline.baseline_rows`)
    into its result entry: rows, and the tuned ridge's unrounded predictions under ``continuous``."""
    rubrics = read_json(data_dir / "dataset.json")["rubrics"]
    rows, continuous = baseline_rows(read_records(data_dir / "train.jsonl"), read_records(data_dir / f"{split}.jsonl"),
                                     rubrics, full_train)
    entry["rows"].update(rows)
    entry.setdefault("continuous", {}).update(continuous)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    source = Path(args.input)
    if shared_file_missing(source):
        return 0
    variant = "ce" if args.ablation else "ce+ntl"
    key = corpus_key(args)
    out = Path(args.out_dir or ROOT / "runs" / "real_essays" / key)
    smoke = args.test_essays < CORPORA[args.corpus].test_essays
    results_dir = Path(args.results_dir or (out / "results" if smoke else RESULTS))
    run_dir = out / f"run_{variant}_seed{args.seed}"
    if run_dir.exists():
        print(f"error: {run_dir} exists; pass another --out_dir or --seed for a new benchmark", file=sys.stderr)
        return 2
    if smoke:
        print(f"note: --test_essays {args.test_essays} < {CORPORA[args.corpus].test_essays}: a smoke run, not a "
              f"result to report (recorded under {results_dir})")
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    try:
        with stage("convert + subset", timings):
            full, data, sizes = prepare_data(args, out)
        meta = read_json(data / "dataset.json")
        with stage("train", timings):
            run = train(args, data, run_dir, VARIANTS[variant], out / "logs" / f"train_{variant}_seed{args.seed}.log")
        splits = [*SCORED_SPLITS, *(["pick"] if args.pick_essays else [])]
        with stage("greedy + weighted" if args.replicate else "every LoRA row (one prefill)", timings):
            banks = lora_rows(args, data, run_dir, out, variant, run, splits)
        with stage("baselines", timings):
            full_train = read_records(full / "train.jsonl")
            for split in splits:
                baselines(data, full_train, split, run[split])
        with stage("confidence", timings):
            study = confidence_study(data, run["predictions"], banks, args.seed, out / f"confidence_{variant}_seed{args.seed}",
                                     f"{key}, LoRA {variant}, seed {args.seed}: weighted row")
    except (DataError, StageFailed) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    timings["total"] = round(time.perf_counter() - started, 1)
    state = {"commit": (git_commit() or "unknown")[:7], "dirty": git_dirty()}
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    result = {
        "corpus": key, "variant": variant, "seed": args.seed, "replicate": args.replicate,
        "rows": rows_present(run["test"]), **data_fields(args, meta, sizes),
        "splits": {split: run[split] for split in splits}, "confidence": study,
        "training": run["training"], "timings": timings, "sampler": run.get("sampler"), "machine": machine(), "git": state,
        **command_fields(args, argv)}
    result["data"]["max_prompt_tokens"] = run["max_prompt_tokens"]
    path = write_result(result_path(results_dir, key, variant, args.seed, state["commit"], stamp), result)
    print(f"results: {path}")
    try:
        results = read_results(results_dir)
        group = tables.Group([r for r in results if r["variant"] != FROZEN_VARIANT and group_key(r) == group_key(result)],
                             [r for r in results if r["variant"] == FROZEN_VARIANT and data_key(r) == data_key(result)])
    except DataError as err:  # the result file is written; only the printed tables are missing
        print(f"error: {err}", file=sys.stderr)
        return 1
    print("\n" + tables.group_report(group, args.bootstrap, args.seed))
    best = group.best_on_validation()
    if best:
        per_seed = group.lora(best[0], best[1], "test")
        score = sum(mean_qwk(group.gold["test"], p, group.ranges) for p in per_seed.values()) / len(per_seed)
        print(f"best_lora_qwk={score:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
