"""Real-essay benchmark: LoRA-fine-tune smollm2-135m on a real corpus and compare every row it
scores with baselines fit on the same essays, recording every per-essay prediction in a tracked
result file. The recipes, their tables and the levers tried are in docs/results.md.

    python -m benchmarks.bench_real_essays --corpus asap          # ASAP set 7, holistic 0-30
    python -m benchmarks.bench_real_essays --corpus asap-traits   # ASAP set 7, holistic + 4 traits
    python -m benchmarks.bench_real_essays --corpus ell           # ELL, six traits 1.0-5.0
    python -m benchmarks.bench_real_essays --corpus asap --ablation            # LoRA CE only
    python -m benchmarks.bench_real_essays --corpus asap --seed 1 --replicate  # greedy + weighted only
    python -m benchmarks.real_essay_tables                          # the tables from every result

Corpora (``--input`` takes any file in the corpus's layout; ``--essay_set N`` any ASAP set):
``asap`` is ``../shared/data/asap/asap_set7.tsv`` (holistic score), ``asap-traits`` the same set
with its traits in one line, ``ell`` ``../shared/data/ell/ell_train.csv`` (six traits stored doubled,
``"scale": 2``; its table adds MCRMSE in 1.0-5.0 units). When the file is absent the script says
so and exits 0: the shared data is not part of a clone.

Stages, each timed:

1. convert + subset: the corpus's converter (seeded split, ``--data_seed``), then a seeded sample
   of ``--train_essays`` / ``--valid_essays`` / ``--test_essays`` and ``--pick_essays`` more
   validation essays (drawn last, so they change no other sample), written as one dataset folder
   that every command on this corpus and data seed shares (``"system_prompt": SYSTEM_PROMPT``).
2. train: ``main_pipeline.py`` as a subprocess, as a user runs it, with ``--skip_scoring``: CE +
   0.2 NTL (``--ablation``: CE only), LoRA on ``--target_modules`` of every layer, length-bucketed
   batches, the last step's weights, and its default ``--precision auto`` (recorded per result).
3. every LoRA row on the test, validation and pick essays from the saved adapter on the training
   prompts, each prompt prefilled once: greedy and weighted as ``main_pipeline.py`` scores them,
   ``--constrained`` greedy, and ``--m`` self-consistency samples as ``self_consistency.py run``
   draws them (unconstrained and constrained; banks written in its format), majority and average
   votes. ``--replicate``: greedy and weighted only.
4. baselines: TF-IDF (1-2 grams) ridge on the same training essays and on every training essay,
   an essay-length ridge, the training mean.
5. confidence: the weighted row's signals (``modules.confidence.essay_signals``) on test and
   validation, the conformal sets and review rule calibrated on validation, and the figures.

Each command writes one result file into ``--results_dir`` (default ``benchmarks/results/<corpus>/``;
a smoke run with fewer test essays than the corpus's minimum writes under ``<out_dir>/results``;
fields: ``benchmarks/results/README.md``), prints the tables of every result of its group
(``real_essay_tables.py``) and ends with ``best_lora_qwk=<x>``: the test average QWK of the LoRA
row best on the validation and pick essays, mean over seeds. Run it alone: the stage times are
part of the result.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]

from benchmarks import real_essay_tables as tables

from modules.convert.baseline import length_predictions, mean_predictions, ridge_predictions
from modules.convert.corpora import ASAP_TRAITS, asap_specs, convert_asap, convert_ellipse
from modules.convert.pipeline import read_table
from modules.data import SPLITS, load_dataset_info
from modules.jsonio import (DataError, iter_jsonl, read_json, read_text_utf8, write_json_atomic,
                           write_jsonl_atomic)
from modules.metrics import mean_qwk

SHARED = ROOT.parent / "shared" / "data"
ASAP7 = SHARED / "asap" / "asap_set7.tsv"
# dataset.json's system_prompt for the subset: a short system message in place of SmolLM2's default
# (18 tokens naming the assistant), which every training step would pay for.
SYSTEM_PROMPT = "You score essays."
# NTL weight of each command's LoRA: 0.2, the quickstart's scale; at the original tool's 2.0, NTL's
# gradients dwarf CE's and the hour's training learned far less (docs/guide.md, the quickstart's settings).
VARIANTS = {"ce+ntl": 0.2, "ce": 0.0}
SCORED_SPLITS = ("test", "valid")
SIGNAL_DIGITS = 6  # decimals of the stored confidence signals: the study is recomputed from these values


@dataclass(frozen=True)
class Corpus:
    """A corpus's default file and the sizes that fit its default command in the hour (module docstring)."""

    default_input: Path
    train_essays: int | None  # None: every essay of the converted training split
    epochs: float
    test_essays: int  # also the minimum for a result to report
    pick_essays: int  # validation essays for the row pick beyond the 30 (module docstring)


CORPORA = {
    "asap": Corpus(ASAP7, 800, 2.5, 150, 120),
    "asap-traits": Corpus(SHARED / "asap" / "asap_set7_traits.tsv", None, 2.0, 150, 60),
    "ell": Corpus(SHARED / "ell" / "ell_train.csv", 800, 1.5, 200, 0),
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
    p.add_argument("--top_layers", type=int, default=0, help="main_pipeline.py --lora_top_layers (0: every layer)")
    p.add_argument("--target_modules", default=tables.DEFAULT_TARGET_MODULES,
                   help="main_pipeline.py --lora_target_modules: the projections LoRA adapts")
    p.add_argument("--group_by_length", action=argparse.BooleanOptionalAction, default=True,
                   help="main_pipeline.py --group_by_length: length-bucketed batches in random order (default on)")
    p.add_argument("--max_seq_length", type=int, default=1024, help="prompt + target tokens (the essay budget)")
    p.add_argument("--m", type=int, default=10, help="self-consistency samples per essay")
    p.add_argument("--bootstrap", type=int, default=2000, help="hierarchical bootstrap resamples of the printed tables")
    args = p.parse_args(argv)
    corpus = CORPORA[args.corpus]
    args.input = args.input or str(corpus.default_input)
    args.epochs = args.epochs or corpus.epochs
    # None, not 0, means "the corpus's": an explicit 0 reaches the checks below
    for key in ("train_essays", "test_essays", "pick_essays"):
        if getattr(args, key) is None:
            setattr(args, key, getattr(corpus, key))
    if args.pick_essays < 0:
        p.error("--pick_essays must be >= 0")
    for key in ("train_essays", "valid_essays", "test_essays", "m", "batch_size", "grad_accum", "bootstrap"):
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


def read_jsonl(path: Path) -> list[dict]:
    """Raw records (dicts), the shape the baselines take."""
    return [record for _, record in iter_jsonl(path)]


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


def subset_draws(full_dir: Path, sizes: dict[str, int], pick: int, seed: int) -> dict[str, list[dict]]:
    """The subset's records per split (file order kept): a seeded sample of each converted split, then
    ``pick`` more validation essays (the pick essays) from those the validation sample left. One RNG
    draws them in this order, so the train, valid and test samples do not depend on ``pick``."""
    rng = random.Random(seed)
    records, chosen = {}, {}
    for split in SPLITS:
        records[split] = read_jsonl(full_dir / f"{split}.jsonl")
        if sizes[split] > len(records[split]):
            raise DataError(f"--{split}_essays {sizes[split]} is more than the {len(records[split])} essays of the "
                            f"converted {split} split")
        chosen[split] = sorted(rng.sample(range(len(records[split])), sizes[split]))
    taken = set(chosen["valid"])
    left = [i for i in range(len(records["valid"])) if i not in taken]
    if pick > len(left):
        raise DataError(f"--pick_essays {pick} is more than the {len(left)} validation essays the "
                        f"--valid_essays sample leaves in {full_dir / 'valid.jsonl'}")
    draws = {split: [records[split][i] for i in chosen[split]] for split in SPLITS}
    draws["pick"] = [records["valid"][i] for i in sorted(rng.sample(left, pick))]
    return draws


def subset_sizes(args: argparse.Namespace, full_dir: Path) -> dict[str, int]:
    """Essays per split of the subset: ``--train_essays`` (None: every essay of the converted
    training split in ``full_dir``), ``--valid_essays``, ``--test_essays``."""
    train = args.train_essays if args.train_essays is not None else len(read_jsonl(full_dir / "train.jsonl"))
    return {"train": train, "valid": args.valid_essays, "test": args.test_essays}


def make_subset(full_dir: Path, data_dir: Path, sizes: dict[str, int], pick: int, seed: int) -> None:
    """:func:`subset_draws` written as one dataset folder (``pick.jsonl`` beside the three splits, which
    main_pipeline.py does not read); an existing folder (another command's) is reused when it was made
    with the same seed, sizes and pick count."""
    if (data_dir / "dataset.json").is_file():
        meta = read_json(data_dir / "dataset.json")
        made = meta.get("subset", {})
        if (made.get("seed") != seed or made.get("sizes") != sizes or made.get("pick", 0) != pick
                or meta.get("system_prompt") != SYSTEM_PROMPT):
            raise DataError(f"{data_dir}: made with seed {made.get('seed')}, sizes {made.get('sizes')}, "
                            f"{made.get('pick', 0)} pick essays and system prompt {meta.get('system_prompt')!r}, not "
                            f"{seed}, {sizes}, {pick} and {SYSTEM_PROMPT!r}; use another --out_dir")
        return
    draws = subset_draws(full_dir, sizes, pick, seed)
    data_dir.mkdir(parents=True)
    meta = read_json(full_dir / "dataset.json")
    meta["subset"] = {"of": str(full_dir), "seed": seed, "sizes": sizes, "pick": pick}
    meta["system_prompt"] = SYSTEM_PROMPT
    for split, records in draws.items():
        if records or split != "pick":
            write_jsonl_atomic(data_dir / f"{split}.jsonl", records)
    write_json_atomic(data_dir / "dataset.json", meta)


def line_counts(predictions: list[dict]) -> dict[str, int]:
    """Invalid and truncated generated lines among ``predictions`` (predict_split's dicts)."""
    return {"lines": len(predictions), "invalid": sum(not p["valid"] for p in predictions),
            "truncated": sum(bool(p["truncated"]) for p in predictions)}


def expected_scores(predictions: list[dict]) -> list[list[float]]:
    """The weighted row's unrounded expected scores, rounded to 4 decimals to keep the file small."""
    return [[round(float(e), 4) for e in p["weighted_expected"]] for p in predictions]


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
           "--load_best_model_at_end" if args.load_best_model_at_end else "--no-load_best_model_at_end",
           "--max_seq_length", str(args.max_seq_length), "--ntl_weights", str(ntl_weight), "--emo_weights", "0",
           "--skip_scoring"]
    cmd += ["--group_by_length"] if args.group_by_length else []
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


def split_entry(predictions: list[dict]) -> dict:
    """One split's greedy and weighted rows as the result file keeps them."""
    return {"ids": [p["id"] for p in predictions], "gold": [p["gold"] for p in predictions],
            "rows": {"greedy": [p["greedy"] for p in predictions], "weighted": [p["weighted"] for p in predictions]},
            "weighted_expected": expected_scores(predictions), "line_counts": {"greedy": line_counts(predictions)}}


def greedy_weighted(args: argparse.Namespace, data_dir: Path, run_dir: Path, max_prompt_tokens: int,
                    splits: list[str]) -> dict[str, list[dict]]:
    """Greedy and weighted prediction dicts (``predict_split``'s) of ``<data_dir>/<split>.jsonl`` for
    each of ``splits`` from the saved adapter, on the training prompts, as ``main_pipeline.py`` scores
    test and validation (the replicate's rows; without the other rows one prefill serves both anyway)."""
    from modules.data import load_split
    from modules.evaluation import predict_split
    from modules.models import load_adapter

    info = load_dataset_info(data_dir)
    model, tokenizer = load_adapter(args.base_model, run_dir)
    return {split: predict_split(model, tokenizer, load_split(data_dir / f"{split}.jsonl", info), info, mtl=False,
                                 max_prompt_tokens=max_prompt_tokens) for split in splits}


def sc_votes(bank_path: Path, split_path: Path, records, info, suffix: str) -> tuple[dict, dict, "np.ndarray"]:
    """A written sample bank's per-essay majority and average votes over all its samples (rows
    ``SC majority<suffix>``, ``SC average<suffix>``; self_consistency.py's default fallback, the
    rubric midpoints), its invalid/truncated sample counts, and the bank as int [N, m, K] in the
    split file's order (-1 invalid)."""
    from modules.voting import INVALID, average_vote, default_fallback, majority_vote
    from self_consistency import bank_samples

    samples, truncated = bank_samples(bank_path, str(split_path), records, info)
    fallback = default_fallback(info.ranges)
    votes = {f"SC majority{suffix}": majority_vote(samples, fallback).tolist(),
             f"SC average{suffix}": average_vote(samples, fallback).tolist()}
    counts = {"lines": int(samples.shape[0] * samples.shape[1]), "invalid": int((samples == INVALID).all(axis=2).sum()),
              "truncated": truncated}
    return votes, counts, samples


def one_prefill_batch(model, tokenizer, records, info, max_prompt_tokens: int, first_index: int, seed: int, m: int,
                      sc: argparse.Namespace) -> tuple[list[dict], list[dict], dict[bool, list[list[dict]]]]:
    """Every LoRA row's raw output for ``records``, the essays ``first_index``, ``first_index + 1``,
    ... of their split, from one prefill of each prompt (:func:`modules.scoring.prefill`): greedy
    and weighted predictions as ``main_pipeline.py`` scores them (:func:`modules.evaluation.
    prediction_row`), constrained greedy rows (:func:`modules.evaluation.greedy_row`) and m
    self-consistency samples per essay, unconstrained (key False) and ``--constrained`` (key True).
    The batch decodes greedy together as ``predict_split`` does its batches (``sc.essay_batch`` =
    main_pipeline's eval batch, 8), so the greedy and weighted rows are the ones it writes.
    Sampling follows ``self_consistency.py run`` with the settings ``sc`` (its parsed flags):
    essay i draws from seed + i, so the samples are the ones the CLI draws."""
    import torch

    from modules.data import build_prompt
    from modules.evaluation import greedy_row, prediction_row
    from modules.sampling import trie_sample
    from modules.scoring import greedy_pair_from_states, prefill, score_line_budget

    prompts = [build_prompt(r, info, tokenizer, False, "chat", max_prompt_tokens) for r in records]
    fallback = [r.midpoint for r in info.rubrics]
    with torch.inference_mode():
        states = [prefill(model, tokenizer, prompt) for prompt in prompts]
        answers, constrained_answers = greedy_pair_from_states(model, tokenizer, states, info.ranges)
        predictions = [prediction_row(model, tokenizer, r, answer, state, info)
                       for r, answer, state in zip(records, answers, states)]
        drawn = {constrained: trie_sample(model, tokenizer, prompts, info.ranges,
                                          generator_seeds=[seed + first_index + i for i in range(len(records))],
                                          max_m=m, temperature=sc.temperature, top_k=sc.top_k, top_p=sc.top_p,
                                          max_new_tokens=score_line_budget(tokenizer, info.ranges, constrained),
                                          constrained=constrained, prompt_states=states)
                 for constrained in (False, True)}
    return predictions, [greedy_row(r, answer, fallback) for r, answer in zip(records, constrained_answers)], drawn


def sc_settings(run_dir: Path, base_model: str, split_path: Path) -> argparse.Namespace:
    """``self_consistency.py run``'s flags at their defaults for this adapter and split."""
    from self_consistency import parse_args as sc_parse_args

    return sc_parse_args(["run", "--adapter_dir", str(run_dir), "--base_model_name", base_model,
                          "--test_path", str(split_path)])


def one_prefill_rows(args: argparse.Namespace, data_dir: Path, run_dir: Path, out: Path, variant: str, info,
                     max_prompt_tokens: int, run: dict, timings: dict[str, float],
                     splits: list[str]) -> dict[str, "np.ndarray"]:
    """Every LoRA row on ``splits`` from the saved adapter, on the training prompts, batch by batch
    with :func:`one_prefill_batch`: greedy and weighted, constrained greedy, and self-consistency,
    unconstrained and ``--constrained``. Each essay's prompt runs through the model once for all
    of them; separately each would pay it again, and at ELL's prompt lengths the prompt is most of
    an essay's cost.

    Self-consistency is ``self_consistency.py run``'s at its defaults with ``--max_m m`` and
    ``--seed seed``; each bank is written in its format (``sc_<variant>_seed<k>_<split>
    [_constrained]/samples.jsonl`` under ``out``), essay by essay as its batch ends. Each split's
    entry (:func:`split_entry` plus the other rows and their line counts) goes into ``run[split]``,
    its greedy and weighted prediction dicts into ``run["predictions"][split]``, the sampler's name
    into ``run["sampler"]``; returns the unconstrained sample bank of each split (the SC confidence
    signals judge its spread).
    """
    from contextlib import ExitStack

    from tqdm.auto import tqdm

    from modules.bank import append_bank_line, bank_line
    from modules.data import load_split
    from modules.models import load_adapter

    model, tokenizer = load_adapter(args.base_model, run_dir)
    banks = {}
    with stage("every LoRA row (one prefill)", timings):
        for split in splits:
            split_path = data_dir / f"{split}.jsonl"
            sc = sc_settings(run_dir, args.base_model, split_path)
            records = load_split(split_path, info)
            folders = {constrained: out / (f"sc_{variant}_seed{args.seed}_{split}" + ("_constrained" if constrained else ""))
                       for constrained in (False, True)}
            predictions, constrained_greedy = [], []
            with ExitStack() as files:
                handles = {}
                for constrained, folder in folders.items():
                    folder.mkdir(parents=True, exist_ok=True)
                    handles[constrained] = files.enter_context((folder / "samples.jsonl").open("w", encoding="utf-8"))
                for start in tqdm(range(0, len(records), sc.essay_batch), desc=f"{split}, one prefill", unit="batch",
                                  disable=None):
                    batch = records[start:start + sc.essay_batch]
                    rows, constrained_rows, drawn = one_prefill_batch(model, tokenizer, batch, info, max_prompt_tokens,
                                                                      start, args.seed, args.m, sc)
                    predictions += rows
                    constrained_greedy += constrained_rows
                    for constrained, handle in handles.items():
                        for record, samples in zip(batch, drawn[constrained]):
                            append_bank_line(handle, bank_line(record.id, record.scores, samples))
            run.setdefault("predictions", {})[split] = predictions
            run[split] = split_entry(predictions)
            run[split]["rows"]["greedy, constrained"] = [p["greedy"] for p in constrained_greedy]
            run[split]["line_counts"]["greedy, constrained"] = line_counts(constrained_greedy)
            for constrained, folder in folders.items():
                suffix = ", constrained" if constrained else ""
                votes, counts, samples = sc_votes(folder / "samples.jsonl", split_path, records, info, suffix)
                run[split]["rows"].update(votes)
                run[split]["line_counts"]["SC samples" + suffix] = counts
                if not constrained:
                    banks[split] = samples
    run["sampler"] = "trie"
    return banks


def aligned(values_by_id: dict, ids: list[str]) -> list:
    """``values_by_id[id]`` for each id, in the prediction rows' order."""
    return [values_by_id[i] for i in ids]


def round_floats(value, digits: int = SIGNAL_DIGITS):
    """Floats in nested dicts and lists rounded to ``digits`` decimals (the tracked file stays small)."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: round_floats(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [round_floats(v, digits) for v in value]
    return value


def confidence_study(data_dir: Path, predictions: dict[str, list[dict]], banks: dict, meta: dict, seed: int,
                     out: Path, tag: str, title: str) -> dict:
    """The confidence study's record for the judged weighted row: per split the essay signals of
    :func:`modules.confidence.essay_signals` (valid seeded ``seed + 1``, test ``seed``, as
    ``confidence_report`` seeds them; SC signals only when ``banks`` holds the split's sample bank),
    rounded to 6 decimals, in the rows' order; and the compact report of
    :func:`modules.confidence_report.confidence_report` (conformal sets and the review rule calibrated on
    validation, measured on test). Saves the risk-coverage PNG and the reliability diagram in ``out``."""
    import numpy as np

    from modules.confidence import essay_signals
    from modules.confidence_report import confidence_report
    from modules.plots import plot_reliability, plot_risk_coverage

    names = [r["name"] for r in meta["rubrics"]]
    ranges = [(r["min"], r["max"]) for r in meta["rubrics"]]
    essays, samples = {}, {}
    for split in SCORED_SPLITS:
        ids = [p["id"] for p in predictions[split]]
        records = read_jsonl(data_dir / f"{split}.jsonl")
        essays[split] = aligned({r["id"]: r["essay"] for r in records}, ids)
        if split in banks:
            samples[split] = np.stack(aligned(dict(zip([r["id"] for r in records], banks[split])), ids))
    signals = {}
    for split, offset in (("valid", 1), ("test", 0)):
        values, _ = essay_signals(predictions[split], names, ranges, prediction="weighted", essays=essays[split],
                                  samples=samples.get(split), seed=seed + offset)
        signals[split] = {name: round_floats(v.tolist()) for name, v in values.items()}
    report, _ = confidence_report(predictions["valid"], predictions["test"], names, ranges,
                                  valid_essays=essays["valid"], test_essays=essays["test"],
                                  valid_samples=samples.get("valid"), test_samples=samples.get("test"), seed=seed)
    figure = out / f"risk_coverage_{tag}.png"
    plot_risk_coverage(report["signals"], figure, title)
    if report["calibration"]:
        plot_reliability(report["calibration"], out / f"reliability_{tag}.png", title)
    print(f"   figures: {figure}" + (f", {out / f'reliability_{tag}.png'}" if report["calibration"] else ""))
    kept = {"large_errors": report["large_errors"],
            "ece": report["calibration"]["ece"] if report["calibration"] else None,
            "conformal": {k: report["conformal"][k] for k in ("method", "target_coverage", "average_coverage",
                                                             "average_set_size")} if report["conformal"] else None,
            "review": report["review"]}
    return {"prediction": report["prediction"], "signals": signals, "report": round_floats(kept, 4)}


def baselines(data_dir: Path, full_train: list[dict], split: str) -> dict[str, list[list[int]]]:
    """Per-essay predictions ([N][K]) of the four baselines on ``split`` of the subset."""
    rubrics = read_json(data_dir / "dataset.json")["rubrics"]
    train, scored = read_jsonl(data_dir / "train.jsonl"), read_jsonl(data_dir / f"{split}.jsonl")

    def rows(per_rubric: dict[str, list[int]]) -> list[list[int]]:
        return [list(scores) for scores in zip(*(per_rubric[r["name"]] for r in rubrics))]

    return {"TF-IDF ridge, same essays": rows(ridge_predictions(train, scored, rubrics)),
            "TF-IDF ridge, all train essays": rows(ridge_predictions(full_train, scored, rubrics)),
            "essay-length ridge": rows(length_predictions(train, scored, rubrics)),
            "training mean": rows(mean_predictions(train, scored, rubrics))}


# The flags that name files or folders: a result file records them relative to the repository, so
# that it holds no machine's absolute paths (the input is also named, with its sha256, under "data").
PATH_FLAGS = ("input", "out_dir", "results_dir")


def repo_relative(value: str | None) -> str | None:
    """An absolute path as the path relative to the repository; anything else as it is."""
    if value is None or not os.path.isabs(value):
        return value
    return os.path.relpath(value, ROOT)


def git_state() -> dict:
    """The commit the benchmark ran at, and whether tracked files differed from it."""
    def git(*cmd: str) -> str:
        done = subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    return {"commit": git("rev-parse", "--short", "HEAD") or "unknown",
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def cpu_model() -> str:
    """``model name`` of /proc/cpuinfo (the CPU's arithmetic is part of what a run measures)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    import torch

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "host": platform.node()}


def rows_present(split: dict) -> list[str]:
    """The LoRA rows a command produced, in table order."""
    return [row for row in tables.LORA_ROWS if row in split["rows"]]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    source = Path(args.input)
    if shared_file_missing(source):
        return 0
    variant = "ce" if args.ablation else "ce+ntl"
    key = corpus_key(args)
    out = Path(args.out_dir or ROOT / "runs" / "real_essays" / key)
    smoke = args.test_essays < CORPORA[args.corpus].test_essays
    results_dir = Path(args.results_dir or (out / "results" if smoke else tables.RESULTS))
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
    banks: dict[str, object] = {}  # split -> unconstrained sample bank [N, m, K] (not with --replicate)
    try:
        with stage("convert + subset", timings):
            full = out / f"full_seed{args.data_seed}"
            if not (full / "dataset.json").is_file():  # another command's conversion is reused
                convert(args, full)
            sizes = subset_sizes(args, full)
            args.train_essays = sizes["train"]  # recorded as a number, also where the default means all
            data = out / f"data_seed{args.data_seed}"
            make_subset(full, data, sizes, args.pick_essays, args.data_seed)
        meta = read_json(data / "dataset.json")
        info = load_dataset_info(data)
        with stage("train", timings):
            run = train(args, data, run_dir, VARIANTS[variant], out / "logs" / f"train_{variant}_seed{args.seed}.log")
        splits = [*SCORED_SPLITS, *(["pick"] if args.pick_essays else [])]
        if args.replicate:
            with stage("greedy + weighted", timings):
                run["predictions"] = greedy_weighted(args, data, run_dir, run["max_prompt_tokens"], splits)
                run.update({split: split_entry(rows) for split, rows in run["predictions"].items()})
        else:
            banks = one_prefill_rows(args, data, run_dir, out, variant, info, run["max_prompt_tokens"], run, timings,
                                     splits)
        with stage("baselines", timings):
            full_train = read_jsonl(full / "train.jsonl")
            for split in splits:
                run[split]["rows"].update(baselines(data, full_train, split))
        with stage("confidence", timings):
            study = confidence_study(data, run["predictions"], banks, meta, args.seed, out,
                                     f"{variant}_seed{args.seed}", f"{key}, LoRA {variant}, seed {args.seed}: weighted row")
    except (DataError, StageFailed) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    timings["total"] = round(time.perf_counter() - started, 1)
    state = git_state()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    conversion = meta.get("conversion", {})
    result = {
        "corpus": key, "variant": variant, "seed": args.seed, "replicate": args.replicate,
        "rows": rows_present(run["test"]),
        "rubrics": [{k: r[k] for k in ("name", "min", "max", "scale") if k in r} for r in meta["rubrics"]],
        "data": {"input": source.name, "sha256": conversion.get("sha256"), "essay_set": None if key == "ell" else args.essay_set,
                 "data_seed": args.data_seed, "sizes": sizes, "pick_essays": args.pick_essays,
                 "max_prompt_tokens": run["max_prompt_tokens"]},
        "splits": {split: run[split] for split in splits}, "confidence": study,
        "training": run["training"], "timings": timings, "sampler": run.get("sampler"), "machine": machine(), "git": state,
        "command": " ".join([Path(sys.argv[0]).name, *map(repo_relative, argv if argv is not None else sys.argv[1:])]),
        "config": {**vars(args), **{key: repo_relative(getattr(args, key)) for key in PATH_FLAGS}}}
    path = tables.write_result(tables.result_path(results_dir, key, variant, args.seed, state["commit"], stamp), result)
    print(f"results: {path}")
    try:
        this_group = tables.group_key(result)
        members = [r for r in tables.read_results(results_dir) if tables.group_key(r) == this_group]
        group = tables.Group(members)
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
