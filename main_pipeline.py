"""Train a LoRA essay scorer with CE + NTL + EMO, then score the test split and report QWK.

    python main_pipeline.py --base_model_name smollm2-135m --mtl --no_wandb

Stages: load data -> base model + tokenizer -> LoRA -> CustomTrainer (eval each epoch, best
checkpoint by eval loss, early stopping) -> save adapter, tokenizer, run manifest -> greedy and
probability-weighted inference on the test split -> evaluation_results.json + a printed table.

With ``--score_path FILE --adapter_dir RUN`` it trains nothing: the run's adapter scores the essays
of FILE (gold scores optional) with the training run's prompts into a new run folder.

Runs unchanged under ``torchrun --nproc_per_node N`` or ``accelerate launch``: the Trainer trains
with DDP (or DeepSpeed/FSDP from an accelerate config), each process scores every N-th test essay,
and rank 0 alone writes the run folder and prints.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable

from modules.runs import (MANIFEST, PromptSettings, create_run_dir, occupied_dir_error, plan_and_load_adapter,
                          provenance, resume_entry, setup_logging, stop, timestamp, uncreatable_dir_error)

ROOT = Path(__file__).resolve().parent
logger = logging.getLogger("main_pipeline")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from modules.cli import ArgumentParser

    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base_model_name", required=True, help="hub id, local dir, tiny-random-llama or smollm2-135m")
    p.add_argument("--score_path", default=None,
                   help="score the essays of this JSONL file with --adapter_dir's adapter, without training; records "
                        "may lack scores (QWK is reported when every record has them)")
    p.add_argument("--adapter_dir", default=None, help="with --score_path: the trained run folder (runs/<name>)")
    _add_training_flags(p)
    args = p.parse_args(argv)
    if args.score_path:
        _check_scoring_flags(p, args)
    elif args.adapter_dir:
        p.error("--adapter_dir goes with --score_path")
    args.data_dir = args.data_dir or (None if args.score_path else str(ROOT / "aes_dataset_mtl"))
    if args.resume_checkpoint and args.output_dir and Path(args.output_dir) != Path(args.resume_checkpoint):
        p.error("--resume_checkpoint names the run folder; do not also give a different --output_dir")
    if args.force_resume and not args.resume_checkpoint:
        p.error("--force_resume goes with --resume_checkpoint")
    if args.emo_topk < 1:
        p.error(f"--emo_topk must be >= 1, got {args.emo_topk}")
    if args.scorer == "probe" and (args.resume_checkpoint or args.dry_run):
        p.error(f"--{'resume_checkpoint' if args.resume_checkpoint else 'dry_run'} is for LoRA training; "
                "--scorer probe trains no model")
    if (args.score_map == "stack") != bool(args.stack_probe):
        p.error("--score_map stack and --stack_probe go together")
    if args.score_map != "none" and (args.scorer == "probe" or args.no_weighted):
        p.error(f"--score_map maps the LoRA scorer's weighted expectation; not with "
                f"{'--scorer probe' if args.scorer == 'probe' else '--no_weighted'}")
    if args.head_layer is not None and (args.scorer == "probe" or args.head_layer < 0 or args.head_weight < 0):
        p.error("--head_layer trains with the LoRA scorer (not --scorer probe), needs an index >= 0 and a "
                "--head_weight >= 0")
    if args.probe_max_tokens < 1:
        p.error(f"--probe_max_tokens must be >= 1, got {args.probe_max_tokens}")
    if args.lora_top_layers < 0:
        p.error(f"--lora_top_layers must be >= 0, got {args.lora_top_layers}")
    if args.cache_frozen_layers and not args.lora_top_layers:
        p.error("--cache_frozen_layers needs --lora_top_layers N: only layers below the adapted ones can be cached")
    if args.bf16:
        if args.precision == "fp32":
            p.error("--bf16 asks for --precision bf16; do not also give --precision fp32")
        args.precision = "bf16"
    if args.eval_strategy == "no" and args.load_best_model_at_end:
        p.error("--eval_strategy no leaves no eval loss to pick the best checkpoint by: add --no-load_best_model_at_end")
    if args.eval_strategy in ("epoch", "steps") and args.eval_strategy != checkpoint_strategy(args):
        p.error(f"--eval_strategy {args.eval_strategy}: the run evaluates where it saves, "
                f"{'every --eval_steps' if args.eval_steps else 'each epoch'}; drop the flag or give --eval_strategy no")
    _check_confidence_flags(p, args)
    return args


def checkpoint_strategy(args: argparse.Namespace) -> str:
    """When checkpoints are saved: ``steps`` with --eval_steps, else ``epoch``."""
    return "steps" if args.eval_steps else "epoch"


def _check_confidence_flags(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.review_fraction is not None and args.review_min_qwk is not None:
        p.error("give --review_fraction or --review_min_qwk, not both")
    if args.review_fraction is not None and not 0 <= args.review_fraction < 1:
        p.error(f"--review_fraction must be in [0, 1), got {args.review_fraction}")
    if args.review_min_qwk is not None and not -1 <= args.review_min_qwk <= 1:
        p.error(f"--review_min_qwk must be in [-1, 1], got {args.review_min_qwk}")
    if not 0 < args.conformal_coverage < 1:
        p.error(f"--conformal_coverage must be in (0, 1), got {args.conformal_coverage}")


# What scoring with --score_path reads from the command line; every other flag decides a training
# run, and the prompt settings (--mtl, --prompt_format, --max_seq_length's budget) are the adapter's.
SCORING_FLAGS = ("base_model_name", "score_path", "adapter_dir", "data_dir", "output_dir", "device_id", "no_wandb",
                 "per_device_eval_batch_size", "test_limit", "no_weighted", "generate_feedback", "constrained")


def _check_scoring_flags(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """With --score_path: --adapter_dir is needed, and a flag of training only is refused."""
    if not args.adapter_dir:
        p.error("--score_path needs --adapter_dir, the trained run folder whose adapter scores the essays")
    training = [k for k, v in vars(args).items() if k not in SCORING_FLAGS and v != p.get_default(k)]
    if training:
        p.error(f"--{training[0]} is a training flag; scoring with --score_path takes the adapter's settings from "
                f"its run_manifest.json")


def _add_training_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scorer", choices=("lora", "probe"), default="lora",
                   help="lora: fine-tune the model to write the score line (default); probe: a ridge per rubric on "
                        "the frozen model's pooled hidden states, the layer chosen on the validation essays "
                        "(modules/probe.py); --score_path applies either kind of run")
    p.add_argument("--probe_max_tokens", type=int, default=512, help="--scorer probe: the essay tokens it reads")
    p.add_argument("--score_map", choices=("none", "stretch", "stack"), default="none",
                   help="final scores mapped per rubric from the weighted expectation, fitted on the validation "
                        "essays: stretch = a linear map of it; stack = of it and --stack_probe's output "
                        "(modules/calibrate.py); saved in the run and applied by --score_path")
    p.add_argument("--stack_probe", default=None, help="--score_map stack: a --scorer probe run on the same base model")
    p.add_argument("--head_layer", type=int, default=None,
                   help="train a score head with the LoRA: a linear read-out per rubric on this hidden-state index's "
                        "pooled prompt states (0 = embeddings), started from the ridge on the untrained model; saved "
                        "in the run folder, its scores are the 'head' row (modules/score_head.py)")
    p.add_argument("--head_weight", type=float, default=1.0, help="--head_layer: the head loss's weight in the total")
    p.add_argument("--head_learning_rate", type=float, default=None,
                   help="--head_layer: the head's learning rate (default --learning_rate), on the same schedule")
    p.add_argument("--device_id", default=None,
                   help="GPU index among the visible GPUs (CUDA_VISIBLE_DEVICES order), or cpu (default: the "
                        "first GPU, else the CPU); a GPU that is not there is an error")
    p.add_argument("--mtl", action="store_true", help="targets are score line + feedback; EMO on the feedback")
    p.add_argument("--no_wandb", action="store_true")
    p.add_argument("--dry_run", action="store_true", help="one forward pass on one batch, print every loss term, exit")
    p.add_argument("--ratio", type=float, default=1.0, help="seeded random fraction of the training split")
    p.add_argument("--ntl_weights", type=float, default=2.0, help="NTL weight; 0 disables, negative = dynamic")
    p.add_argument("--emo_weights", type=float, default=0.1, help="EMO weight; 0 disables, negative = dynamic")
    p.add_argument("--loss_type", choices=("mse", "was"), default="mse", help="NTL variant")
    p.add_argument("--resume_checkpoint", default=None, help="run folder whose newest checkpoint-* to resume")
    p.add_argument("--force_resume", action="store_true",
                   help="resume even though flags that decide the training differ from the run's (recorded in "
                        "run_manifest.json)")
    p.add_argument("--data_dir", default=None,
                   help="dataset folder (default: aes_dataset_mtl; with --score_path: the folder holding the "
                        "dataset.json of the essays, default the adapter's training data folder, else the file's own)")
    p.add_argument("--output_dir", default=None, help="run folder (default runs/<auto-name>)")
    p.add_argument("--num_train_epochs", type=float, default=10)
    p.add_argument("--max_steps", type=int, default=-1)
    p.add_argument("--learning_rate", type=float, default=3e-4)
    p.add_argument("--per_device_train_batch_size", type=int, default=4)
    p.add_argument("--per_device_eval_batch_size", type=int, default=8)
    p.add_argument("--gradient_accumulation_steps", type=int, default=8)
    p.add_argument("--max_seq_length", type=int, default=1024)
    p.add_argument("--lora_r", type=int, default=16)
    p.add_argument("--lora_alpha", type=int, default=32)
    p.add_argument("--lora_dropout", type=float, default=0.05)
    p.add_argument("--lora_target_modules", default="q_proj,v_proj")
    p.add_argument("--lora_top_layers", type=int, default=0,
                   help="adapt only the last N decoder layers (0 = all); the backward pass stops below them")
    p.add_argument("--cache_frozen_layers", action="store_true",
                   help="with --lora_top_layers N: compute each example's input to the first adapted layer once, "
                        "and train from there (modules/frozen_cache.py)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="training precision: auto = bf16 autocast on a GPU with bf16 or a CPU with native bf16 "
                        "matmuls (AVX512-BF16, AMX; checked and timed), float32 elsewhere; bf16 / fp32 force it "
                        "(modules/precision.py). Weights, optimizer state and scoring stay in the model's dtype")
    p.add_argument("--bf16", action="store_true", help="the same as --precision bf16 (older commands)")
    p.add_argument("--group_by_length", action="store_true",
                   help="batch essays of similar length together, the batches in random order "
                        "(modules.trainer.ShuffledLengthBuckets), so less of each batch is padding")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--early_stopping_patience", type=int, default=3)
    p.add_argument("--load_best_model_at_end", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the checkpoint with the lowest eval loss; --no-load_best_model_at_end keeps the last "
                        "step's weights (evaluations still logged, early stopping still ends the run)")
    p.add_argument("--emo_topk", type=int, default=64)
    p.add_argument("--load_in_4bit", action="store_true", help="QLoRA (CUDA only)")
    p.add_argument("--prompt_format", choices=("chat", "plain"), default="chat")
    p.add_argument("--eval_steps", type=int, default=None, help="evaluate/save every N steps instead of each epoch")
    p.add_argument("--eval_strategy", choices=("epoch", "steps", "no"), default=None,
                   help="when the validation loss is computed during training (TrainingArguments' name): by default "
                        "at each checkpoint (each epoch, or every --eval_steps); no: never, which saves its time "
                        "where it chooses nothing (needs --no-load_best_model_at_end; no early stopping; "
                        "checkpoints are still saved)")
    p.add_argument("--logging_steps", type=int, default=10)
    p.add_argument("--warmup_steps", type=float, default=0.03, help="int = steps, float in [0, 1) = ratio of all steps")
    p.add_argument("--test_limit", type=int, default=None, help="score only the first N test essays")
    p.add_argument("--skip_scoring", action="store_true",
                   help="train and save the adapter only; no test or validation scoring (the caller scores the "
                        "saved adapter itself, e.g. the real-essay benchmark from one prefill per essay)")
    p.add_argument("--no_weighted", action="store_true", help="skip the probability-weighted prediction")
    p.add_argument("--generate_feedback", action="store_true", help="let greedy inference write the feedback too")
    p.add_argument("--constrained", action="store_true",
                   help="greedy scoring may only write tokens that keep the answer a prefix of a valid score line")
    p.add_argument("--review_fraction", type=float, default=None,
                   help="share of essays to send to a human, as a threshold on the confidence chosen on the "
                        "validation essays (default 0.2)")
    p.add_argument("--review_min_qwk", type=float, default=None,
                   help="instead: the threshold whose auto-scored validation essays reach this average QWK")
    p.add_argument("--conformal_coverage", type=float, default=0.9, help="target coverage of the score sets")


def run_name(args: argparse.Namespace) -> str:
    model = re.sub(r"[^A-Za-z0-9.-]+", "-", Path(args.base_model_name).name)
    if args.scorer == "probe":
        return f"{model}_probe_{timestamp()}"
    mode = "mtl" if args.mtl else "stl"
    return f"{model}_{mode}_{args.loss_type}_ntl{args.ntl_weights:g}_emo{args.emo_weights:g}_{timestamp()}"


def newest_checkpoint(run_dir: Path) -> Path:
    """The newest complete ``checkpoint-N`` of a run folder. The Trainer writes trainer_state.json
    last, so a checkpoint without it was cut off by a kill and is passed over."""
    from modules.jsonio import DataError

    numbered = [p for p in run_dir.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name) and p.is_dir()]
    numbered.sort(key=lambda p: int(p.name.split("-")[-1]))
    complete = [p for p in numbered if (p / "trainer_state.json").is_file()]
    if not complete:
        detail = f" ({', '.join(p.name for p in numbered)}: no trainer_state.json, cut off while saving)" if numbered else ""
        raise DataError(f"{run_dir}: no complete checkpoint-* folder to resume from{detail}")
    for partial in numbered[numbered.index(complete[-1]) + 1:]:
        logger.warning("%s lacks trainer_state.json (cut off while saving); resuming from %s", partial, complete[-1])
    return complete[-1]


# The flags that decide what a training run computes: a resumed run must use the run's values, or it
# would continue one model with another run's data or settings. How long to train (--max_steps,
# --num_train_epochs), when to evaluate, save and log, and how to score the test split may change.
RESUME_KEYS = ("base_model_name", "data_dir", "mtl", "ratio", "seed", "ntl_weights", "emo_weights", "loss_type",
               "emo_topk", "learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps",
               "warmup_steps", "max_seq_length", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
               "lora_top_layers", "group_by_length", "load_in_4bit", "prompt_format", "head_layer", "head_weight",
               "head_learning_rate")


def run_config(args: argparse.Namespace) -> dict:
    """The flags as recorded in the manifest; the data folder as an absolute path, so that a resume
    from another working directory compares the same folder."""
    return {**vars(args), "data_dir": str(Path(args.data_dir).resolve())}


def check_resume(args: argparse.Namespace) -> tuple[Path, dict, dict]:
    """The checkpoint a --resume_checkpoint run continues, the run's manifest, and the RESUME_KEYS
    whose values differ from the run's ({flag: {"run": old, "now": new}}); a DataError (one line)
    when there is nothing to resume or flags differ without --force_resume."""
    from modules.jsonio import DataError, read_json

    run_dir = Path(args.resume_checkpoint)
    if not run_dir.is_dir():
        raise DataError(f"--resume_checkpoint {run_dir}: run folder not found")
    checkpoint = newest_checkpoint(run_dir)
    manifest = read_json(run_dir / MANIFEST) if (run_dir / MANIFEST).is_file() else None
    if manifest is None and not args.force_resume:
        raise DataError(f"{run_dir}: no {MANIFEST}, so the run's flags cannot be checked; pass --force_resume "
                        f"to continue it with these flags")
    before = dict((manifest or {}).get("config") or {})
    if before.get("data_dir"):
        before["data_dir"] = str(Path(before["data_dir"]).resolve())
    now = run_config(args)
    diffs = {k: {"run": before.get(k), "now": now[k]} for k in RESUME_KEYS if manifest and before.get(k) != now[k]}
    if diffs and not args.force_resume:
        listed = "; ".join(f"--{k} {d['now']!r} (run used {d['run']!r})" for k, d in diffs.items())
        raise DataError(f"{run_dir}: cannot resume with different flags: {listed}; use the run's values, or "
                        f"--force_resume to continue anyway")
    return checkpoint, manifest or {}, diffs


def setup_wandb(args: argparse.Namespace, run_dir: Path) -> list[str]:
    """Report to wandb unless --no_wandb; without an API key, run offline and say where the files go."""
    if args.no_wandb:
        return []
    os.environ.setdefault("WANDB_PROJECT", "aes-lora")
    os.environ["WANDB_DIR"] = str(run_dir)
    has_key = bool(os.environ.get("WANDB_API_KEY")) or "api.wandb.ai" in _read_netrc()
    if not has_key and os.environ.get("WANDB_MODE") not in ("offline", "disabled"):
        os.environ["WANDB_MODE"] = "offline"
    from modules import dist

    if os.environ.get("WANDB_MODE") == "offline" and dist.is_main():  # only rank 0 reports to wandb
        print(f"wandb: offline mode; run files in {run_dir / 'wandb'} (upload later with `wandb sync`)")
    return ["wandb"]


def _read_netrc() -> str:
    try:
        return (Path.home() / ".netrc").read_text()
    except OSError:
        return ""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    from modules import dist

    # Under a launcher each process takes its LOCAL_RANK's GPU (--device_id is ignored) and joins the
    # process group first; alone, the device is chosen after the input checks.
    device = dist.join(args.device_id)
    try:
        return score_main(args, device) if args.score_path else train_main(args, device)
    finally:
        dist.finish()


def train_main(args: argparse.Namespace, device) -> int:
    """Validate every split (and what --resume_checkpoint continues) before any model is loaded, so
    bad input fails in a second, not after minutes; then :func:`run`. Every process checks; they
    agree on the verdict and rank 0 reports it."""
    from modules import dist
    from modules.data import load_splits

    error, resume = None, None
    try:
        info, splits = load_splits(args.data_dir, ratio=args.ratio, seed=args.seed)
        if args.resume_checkpoint:
            resume = check_resume(args)
        if args.score_map != "none" and dist.world_size() > 1:
            raise ValueError("--score_map fits on the validation rows in one process; train without a launcher")
        if args.stack_probe:
            from modules.probe_run import load_probe

            probe = load_probe(args.stack_probe)
            if probe.base_model not in (None, args.base_model_name):
                raise ValueError(f"--stack_probe {args.stack_probe}: a probe of base model '{probe.base_model}', "
                                 f"not '{args.base_model_name}'")
        if device is None:
            from modules.models import isolate_gpu

            # Only this GPU visible (CUDA_VISIBLE_DEVICES), as cuda:0: the Trainer trains on cuda:0.
            device = isolate_gpu(args.device_id)
        if args.load_in_4bit:
            from modules.models import check_4bit

            check_4bit(device)
    except ValueError as err:  # DataError is a ValueError
        error = str(err)
    error = dist.first_error(error)
    if error:
        return stop(error)
    return run_probe(args, info, splits, device) if args.scorer == "probe" else run(args, info, splits, device, resume)


def run(args: argparse.Namespace, info, splits, device, resume: tuple[Path, dict, dict] | None = None) -> int:
    """A training run, stage by stage: claim the run folder -> load the tokenizer and encode the
    examples -> load the base model -> create the folder -> LoRA -> (dry run: one forward pass, exit) -> train and save ->
    (--skip_scoring: exit) -> score the test split -> write and print the results. Each stage that can fail on bad input
    fails on every process before anything is written."""
    from transformers import set_seed

    from modules import dist
    from modules.losses import number_token_values
    from modules.models import load_base_model, load_tokenizer
    from modules.precision import choose_precision

    set_seed(args.seed)
    run_dir, error = claim_run_dir(args, resume)
    if error:
        return stop(error)
    error = None
    try:
        # The tokenizer alone first: an essay that cannot be encoded fails before the model loads.
        tokenizer = load_tokenizer(args.base_model_name)
        number_values = number_token_values(tokenizer)
        encoded, max_prompt_tokens = encode_splits(args, info, splits, tokenizer, number_values)
        precision = choose_precision(args.precision, device)
        model, _ = load_base_model(args.base_model_name, device=device, dtype=weights_dtype(precision, device),
                                   load_in_4bit=args.load_in_4bit)
        if creates_run_dir(args, resume) and dist.is_main():
            create_run_dir(run_dir)
    except (OSError, ValueError) as err:  # the loader's messages can span lines; the first says what
        error = str(err).strip().splitlines()[0]
    error = dist.first_error(error)
    if error:
        return stop(error)
    precision = report_precision(dist.broadcast(precision), device)  # rank 0's timing decides for all
    try:
        model = attach_lora(args, model)
    except ValueError as err:  # e.g. --lora_top_layers beyond the model's depth: every rank meets it
        return stop(f"--lora_top_layers {args.lora_top_layers}: {err}")
    loss_config = loss_config_for(args, number_values)
    settings = PromptSettings(args.mtl, args.prompt_format, max_prompt_tokens)
    frozen_start, error = cache_frozen_layers(args, model, encoded, precision, device)
    if error:
        return stop(error)
    # a dry run caches one batch only, so its starting ridge reads every training essay the uncached way
    head, error = score_head_for(args, model, tokenizer, info, splits["train"], settings, resume, precision,
                                 cached=encoded["train"] if frozen_start and not args.dry_run else None,
                                 frozen_start=frozen_start)
    if error:
        return stop(error)
    if args.dry_run:
        return dry_run_forward(model, tokenizer, encoded["train"][: args.per_device_train_batch_size], loss_config,
                               device, head, args.head_weight, frozen_start)
    trainer = build_trainer(args, model, tokenizer, encoded, loss_config, run_dir, device, precision, head,
                            frozen_start)
    manifest = start_manifest(args, run_dir, device, model, info, splits, max_prompt_tokens, resume, precision)
    train_and_save(args, trainer, tokenizer, run_dir, manifest, resume)
    if args.skip_scoring:
        if dist.is_main():
            from modules.run_card import write_run_card

            write_run_card(run_dir, manifest, info)
            print(f"adapter saved in {run_dir}; scoring skipped (--skip_scoring)")
        return 0
    model = scoring_model(args, trainer, model, run_dir, device)
    head = load_score_head(run_dir, info, device)
    test_records = splits["test"][: args.test_limit] if args.test_limit else splits["test"]
    annotate, mapped = None, None
    if not args.no_weighted:
        valid_rows = score_valid(args, model, tokenizer, splits["valid"], info, run_dir, settings, head)
        if args.score_map != "none":
            mapped, valid_rows = fit_score_map(args, model, tokenizer, valid_rows, splits["valid"], info, run_dir,
                                               manifest)
        annotate = lambda rows: calibrated_rows(rows, valid_rows, splits["valid"], test_records, info, run_dir, args)

    def predict(records: list) -> list[dict]:
        rows = predict_records(args, model, tokenizer, records, info, settings, head)
        return mapped(rows, records) if mapped and rows is not None else rows

    return score_and_report(args, test_records, info, run_dir, manifest, predict, annotate=annotate)


def fit_score_map(args: argparse.Namespace, model, tokenizer, valid_rows: list[dict], records: list, info,
                  run_dir: Path, manifest: dict) -> tuple[Callable[[list[dict], list], list[dict]], list[dict]]:
    """--score_map: the per-rubric linear map from the weighted expectation (and with ``stack`` the
    probe's output) to the gold scores of the validation essays; saved as score_map.json, recorded in
    the manifest and in valid_predictions.jsonl. Returns what maps the rows of given records, and the
    validation rows mapped."""
    import numpy as np

    from modules.calibrate import fit_linear, map_rows, save_score_map, score_map_inputs, with_final
    from modules.jsonio import write_jsonl_atomic
    from modules.probe_run import load_probe

    # One process only (train_main refuses a launcher with --score_map): no rank checks here.
    probe = load_probe(args.stack_probe) if args.stack_probe else None
    names = ("weighted", "probe") if probe else ("weighted",)
    options = dict(model=model, tokenizer=tokenizer, probe=probe, batch_size=args.per_device_eval_batch_size)
    inputs = score_map_inputs(names, valid_rows, records=records, info=info, **options)
    fit = fit_linear(inputs, np.array([r["gold"] for r in valid_rows], dtype=np.float64))
    valid_rows = with_final(valid_rows, fit, inputs, info.ranges)
    manifest["score_map"] = save_score_map(run_dir, args.score_map, fit, args.stack_probe)
    write_jsonl_atomic(run_dir / "valid_predictions.jsonl", valid_rows)
    return (lambda rows, scored: map_rows(fit, rows, scored, info, **options)), valid_rows


# --------------------------------------------------------------------------- the stages of run

def creates_run_dir(args: argparse.Namespace, resume) -> bool:
    """Whether this run makes a new run folder: not when it resumes one, nor on a dry run."""
    return resume is None and not args.dry_run


def claim_run_dir(args: argparse.Namespace, resume) -> tuple[Path, str | None]:
    """The run folder (resumed, named, or runs/<auto-name>) and the error that refuses it, the same
    on every process. Rank 0 picks the name (it holds rank 0's clock) and checks that a new folder
    is free and could be made; the folder is created only once the model has loaded, so a bad
    model name leaves no folder behind. A dry run checks the same and creates nothing."""
    from modules import dist

    run_dir = Path(args.resume_checkpoint or args.output_dir or ROOT / "runs" / run_name(args))
    if resume is not None:
        return run_dir, None
    error = (occupied_dir_error(run_dir, "run folder", "use --resume_checkpoint to continue it")
             or uncreatable_dir_error(run_dir)) if dist.is_main() else None
    return dist.broadcast((run_dir, error))


def encode_splits(args: argparse.Namespace, info, splits, tokenizer, number_values) -> tuple[dict[str, list], int]:
    """Training examples of the train and valid splits, and the prompt budget every essay is
    shortened to, in training and in scoring alike (SPEC §7).

    Every example is encoded before the run folder exists (on a dry run too), so an essay that
    cannot fit is a one-line error (ValueError) that leaves nothing behind."""
    from modules.encoding import encode_example, prompt_token_budget

    wanted = {"train": splits["train"], "valid": splits["valid"]}
    max_prompt_tokens = prompt_token_budget(splits["train"], tokenizer, args.mtl, args.max_seq_length)
    encoded = {name: [encode_example(r, info, tokenizer, mtl=args.mtl, prompt_format=args.prompt_format,
                                     max_seq_length=args.max_seq_length, max_prompt_tokens=max_prompt_tokens,
                                     number_values=number_values) for r in records]
               for name, records in wanted.items()}
    if args.head_layer is not None:  # the gold scores the score head trains on
        encoded = {name: [{**ex, "scores": list(r.scores)} for ex, r in zip(encoded[name], wanted[name])]
                   for name in encoded}
    return encoded, max_prompt_tokens


def score_head_for(args: argparse.Namespace, model, tokenizer, info, train_records: list, settings: PromptSettings,
                   resume, precision, cached: list[dict] | None = None,
                   frozen_start: int = 0) -> tuple[object, str | None]:
    """--head_layer: (the score head, None) attached to the model as ``score_head`` (so the optimizer
    trains it): the resumed checkpoint's head, else the ridge on the untrained model's pooled prompt
    states of the training essays, computed under the training autocast (the states the head then
    trains on), from ``cached`` (the training examples with their frozen-layer cache entering layer
    ``frozen_start``) where given; (None, None) without the flag; (None, error) when refused."""
    from modules import dist
    from modules.precision import training_autocast
    from modules.score_head import cached_prompt_features, initial_head, load_head

    if args.head_layer is None:
        return None, None
    if dist.world_size() > 1:
        return None, "--head_layer trains in one process; start it without torchrun / accelerate launch"
    device = model.get_input_embeddings().weight.device
    try:
        if resume is None:
            with training_autocast(precision, device):
                features = (None if cached is None
                            else cached_prompt_features(model, cached, frozen_start, args.head_layer))
                head = initial_head(model, tokenizer, train_records, info, settings, args.head_layer, seed=args.seed,
                                    features=features)
        else:
            head = load_head(resume[0], device)
            if head is None:
                return None, f"{resume[0]}: no score head to resume (the run was started with --head_layer?)"
    except ValueError as err:
        return None, str(err)
    model.score_head = head
    return head, None


def cache_frozen_layers(args: argparse.Namespace, model, encoded: dict, precision, device) -> tuple[int, str | None]:
    """--cache_frozen_layers: every training and validation example gains its states entering the
    first adapted layer (computed once, under the training autocast), after a check that the cached
    path gives a full forward's logits; the score head's starting ridge then reads them too. Returns
    (that layer or 0, error)."""
    from modules.frozen_cache import check_cached_forward, first_adapted_layer, with_frozen_states
    from modules.precision import training_autocast

    if not args.cache_frozen_layers:
        return 0, None
    start = first_adapted_layer(model)
    if args.head_layer is not None and args.head_layer < start:
        return 0, (f"--head_layer {args.head_layer} reads below the first adapted layer {start}; with "
                   f"--cache_frozen_layers it must be {start} or more")
    try:
        gap = check_cached_forward(model, encoded["train"][0], start)
    except ValueError as err:
        return 0, str(err)
    logger.info("frozen-layer cache: layers 0..%d computed once (cached logits within %.2g of a full forward)",
                start - 1, gap)
    if args.dry_run:  # the one batch it runs
        encoded["train"] = encoded["train"][: args.per_device_train_batch_size]
        encoded.pop("valid", None)
    with training_autocast(precision, device):
        for name in encoded:
            if name == "valid" and args.eval_strategy == "no":  # never evaluated: nothing to cache
                continue
            encoded[name] = with_frozen_states(model, encoded[name], start)
    return start, None


def load_score_head(run_dir, info, device):
    """The score head saved in a run folder, checked against the dataset's rubrics (None: no head)."""
    from modules.score_head import check_head_rubrics, load_head

    head = load_head(run_dir, device)
    if head is not None:
        check_head_rubrics(head, info, run_dir)
        head.eval()
    return head


def weights_dtype(precision, device):
    """The dtype the base model loads in: on a GPU bf16 or float32 as the precision says; on the
    CPU float32 always (bf16 there is autocast around float32 weights)."""
    import torch

    return (torch.bfloat16 if precision.bf16 else torch.float32) if device.type == "cuda" else None


def report_precision(precision, device):
    """Log the training precision once and why; warn when a forced bf16 will be slow (rank 0)."""
    from modules import dist
    from modules.precision import slow_bf16_warning

    if dist.is_main():
        logger.info("precision: %s (%s)", "bf16 autocast" if precision.bf16 else "float32", precision.reason)
        warning = slow_bf16_warning(precision, device)
        if warning:
            logger.warning(warning)
    return precision


def attach_lora(args: argparse.Namespace, model):
    """The base model with LoRA adapters on --lora_target_modules (of the top --lora_top_layers)."""
    from modules.models import add_lora

    return add_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                    target_modules=[m.strip() for m in args.lora_target_modules.split(",") if m.strip()],
                    top_layers=args.lora_top_layers)


def loss_config_for(args: argparse.Namespace, number_values):
    """CE + w_ntl * NTL + w_emo * EMO as the flags set it (EMO only on MTL targets)."""
    from modules.trainer import LossConfig

    return LossConfig(number_values, ntl_weight=args.ntl_weights,
                      emo_weight=args.emo_weights if args.mtl else 0.0, loss_type=args.loss_type,
                      emo_topk=args.emo_topk)


def dry_run_forward(model, tokenizer, examples: list, loss_config, device, head=None, head_weight: float = 0.0,
                    frozen_start: int = 0) -> int:
    """One forward pass on one batch; rank 0 prints the batch shape and every loss term."""
    import torch

    from modules import dist
    from modules.encoding import ScoringCollator
    from modules.trainer import compute_loss_terms

    batch = {k: v.to(device) for k, v in ScoringCollator(tokenizer.pad_token_id)(examples).items()}
    with torch.no_grad():
        _, terms, _ = compute_loss_terms(model, batch, loss_config, head, head_weight, frozen_start)
    if dist.is_main():
        print(f"dry run: batch {tuple(batch['input_ids'].shape)} on {device}; "
              + ", ".join(f"{k}={v:.4f}" for k, v in terms.items()))
    return 0


def build_trainer(args: argparse.Namespace, model, tokenizer, encoded: dict, loss_config, run_dir: Path, device,
                  precision, head=None, frozen_start: int = 0):
    """The CustomTrainer: evaluation and a checkpoint each epoch (or --eval_steps), the best
    checkpoint by eval loss loaded at the end (unless --no-load_best_model_at_end), early stopping
    (with --eval_strategy no: the checkpoints only);
    bf16 autocast as ``precision`` (modules.precision) chose."""
    from transformers import EarlyStoppingCallback, TrainingArguments

    from modules import dist
    from modules.encoding import ScoringCollator
    from modules.trainer import LABEL_NAMES, CustomTrainer

    strategy = checkpoint_strategy(args)
    evaluate = args.eval_strategy != "no"
    training_args = TrainingArguments(
        output_dir=str(run_dir), run_name=run_dir.name, seed=args.seed,
        num_train_epochs=args.num_train_epochs, max_steps=args.max_steps, learning_rate=args.learning_rate,
        per_device_train_batch_size=args.per_device_train_batch_size,
        per_device_eval_batch_size=args.per_device_eval_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, warmup_steps=args.warmup_steps,
        train_sampling_strategy="group_by_length" if args.group_by_length else "random",
        eval_strategy=strategy if evaluate else "no", save_strategy=strategy, eval_steps=args.eval_steps, save_steps=args.eval_steps,
        load_best_model_at_end=args.load_best_model_at_end, metric_for_best_model="eval_loss", greater_is_better=False,
        save_total_limit=2, logging_steps=args.logging_steps, report_to=setup_wandb(args, run_dir),
        label_names=LABEL_NAMES, remove_unused_columns=False, prediction_loss_only=True,
        bf16=precision.bf16, use_cpu=device.type == "cpu", dataloader_num_workers=0,
        # Multi-process: the process group dist.init made (gloo/NCCL); every LoRA weight gets a
        # gradient each step, so DDP need not search the graph for unused parameters.
        ddp_backend=dist.backend(), ddp_find_unused_parameters=False)
    return CustomTrainer(model=model, args=training_args, train_dataset=encoded["train"],
                         eval_dataset=encoded["valid"], data_collator=ScoringCollator(tokenizer.pad_token_id),
                         loss_config=loss_config, score_head=head, head_weight=args.head_weight,
                         head_learning_rate=args.head_learning_rate, frozen_start=frozen_start,
                         callbacks=[EarlyStoppingCallback(early_stopping_patience=args.early_stopping_patience)]
                         if evaluate else [])


def start_manifest(args: argparse.Namespace, run_dir: Path, device, model, info, splits, max_prompt_tokens: int,
                   resume, precision) -> dict:
    """The run manifest, written before training too: a killed run's flags are then on record, and
    a resume of it is checked against them (check_resume). A resumed run keeps its creation time
    and adds an entry to ``resumes``."""
    from modules import dist
    from modules.jsonio import write_json_atomic

    manifest = {
        **provenance(), "config": run_config(args), "run_dir": str(run_dir), "seed": args.seed, "device": str(device),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "world_size": dist.world_size(), "ddp_backend": dist.backend(),
        "dtype": str(model.dtype), "precision": precision.record(), "rubrics": info.rubric_names,
        "max_prompt_tokens": max_prompt_tokens, "split_sizes": {k: len(v) for k, v in splits.items()},
    }
    if resume is not None:
        checkpoint, before, forced = resume
        manifest["created"] = before.get("created", manifest["created"])
        manifest["resumes"] = [*before.get("resumes", []), resume_entry({"from": str(checkpoint), "forced": forced})]
    if dist.is_main():
        write_json_atomic(run_dir / MANIFEST, manifest)
        if resume is not None:
            step = json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]
            forced_note = f"; --force_resume over {', '.join('--' + k for k in forced)}" if forced else ""
            print(f"resuming from {checkpoint} (global step {step}){forced_note}")
    return manifest


def train_and_save(args: argparse.Namespace, trainer, tokenizer, run_dir: Path, manifest: dict, resume) -> None:
    """Train (from the resumed checkpoint, if any), save the best adapter and the tokenizer, the log
    history, and the training summary in the manifest."""
    from modules import dist
    from modules.jsonio import write_json_atomic

    started = time.time()
    train_result = trainer.train(resume_from_checkpoint=str(resume[0]) if resume is not None else None)
    train_seconds = time.time() - started
    # The saved weights: the best checkpoint's, or with --no-load_best_model_at_end the last step's
    # (every run ends with a save: at its last epoch, eval step or early stop).
    kept = (trainer.state.best_model_checkpoint if args.load_best_model_at_end
            else str(run_dir / f"checkpoint-{trainer.state.global_step}"))
    if trainer.score_head is not None and kept:  # the Trainer reloads the best adapter; its head goes with it
        from modules.score_head import load_head

        trainer.score_head.load_state_dict(load_head(kept).state_dict())
    trainer.save_model(str(run_dir))  # every rank: FSDP/ZeRO-3 gather the weights; rank 0 writes
    manifest["train"] = {"seconds": round(train_seconds, 1), "global_step": trainer.state.global_step,
                         "best_checkpoint": trainer.state.best_model_checkpoint, "kept_checkpoint": kept,
                         "best_eval_loss": trainer.state.best_metric, **train_result.metrics}
    if dist.is_main():
        tokenizer.save_pretrained(str(run_dir))
        write_json_atomic(run_dir / "log_history.json", trainer.state.log_history)
        write_json_atomic(run_dir / MANIFEST, manifest)


def scoring_model(args: argparse.Namespace, trainer, model, run_dir: Path, device):
    """The model that scores the test split: the trained one (without its training autocast), or
    under FSDP and ZeRO-3 (which leave each process a shard of the weights, while every process
    scores its own essays with the whole model) the saved adapter loaded again once rank 0 has
    written it."""
    if not (trainer.is_fsdp_enabled or (trainer.is_deepspeed_enabled
                                        and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3)):
        from accelerate.utils import extract_model_from_parallel

        # With --bf16 accelerate wrapped the model's forward in autocast for training; scoring runs in
        # the model's own dtype, as a reloaded adapter (--score_path, self_consistency.py) scores.
        return extract_model_from_parallel(model, keep_fp32_wrapper=False)
    import torch
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from modules import dist
    from modules.models import load_adapter

    del trainer, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    unset_hf_deepspeed_config()  # or from_pretrained would partition the reloaded model again
    dist.barrier()
    model, _ = load_adapter(args.base_model_name, run_dir, device=device)
    return model


def predict_records(args: argparse.Namespace, model, tokenizer, records: list, info,
                    settings: PromptSettings, head=None) -> list[dict]:
    """Greedy and weighted predictions of ``records``, prompted exactly as in training (``settings``):
    each process scores every world_size-th essay and rank 0 gets them all back in file order."""
    from modules import dist
    from modules.predict import predict_split

    return dist.gather(predict_split(
        model, tokenizer, dist.shard(records), info, settings, batch_size=args.per_device_eval_batch_size,
        weighted=not args.no_weighted, generate_feedback=args.generate_feedback, constrained=args.constrained,
        head=head))


def score_valid(args: argparse.Namespace, model, tokenizer, records: list, info, run_dir: Path,
                settings: PromptSettings, head=None) -> list[dict]:
    """The validation essays' predictions (valid_predictions.jsonl): what the confidence signal, the
    conformal quantiles and the review threshold are chosen on, so that test gold never is."""
    from modules import dist
    from modules.jsonio import write_jsonl_atomic

    rows = predict_records(args, model, tokenizer, records, info, settings, head)
    if dist.is_main():
        write_jsonl_atomic(run_dir / "valid_predictions.jsonl", rows)
    return rows


def calibrated_rows(test_rows: list[dict], valid_rows: list[dict], valid_records: list, test_records: list, info,
                    run_dir: Path, args: argparse.Namespace) -> tuple[list[dict], dict]:
    """Rank 0: the test rows with confidence, conformal score sets and review flags, all chosen on the
    validation rows; the confidence report for evaluation_results.json. Writes
    confidence_calibration.json (what --score_path applies to new essays) and the two figures."""
    from modules.evaluation import evaluate_confidence

    rows, report, _ = evaluate_confidence(
        valid_rows, test_rows, info, run_dir, valid_essays=[r.essay for r in valid_records],
        test_essays=[r.essay for r in test_records], title=run_dir.name, target_coverage=args.conformal_coverage,
        review_fraction=args.review_fraction, min_qwk=args.review_min_qwk, seed=args.seed)
    return rows, report


def score_and_report(args: argparse.Namespace, records: list, info, run_dir: Path, manifest: dict,
                     predict: Callable[[list], list[dict]], *,
                     annotate: Callable[[list[dict]], tuple[list[dict], dict | None]] | None = None) -> int:
    """The scores of ``records`` (``predict``: the LoRA scorer's greedy and weighted rows, or the
    probe's); on rank 0, ``annotate`` adds the confidence to the rows (and may return a confidence
    report), then it writes predictions.jsonl, scores.csv (an essay a line: its final scores,
    confidence and review flag), the manifest and, when every essay has gold scores,
    evaluation_results.json (QWK, and the report under "confidence") and the printed tables."""
    from modules import dist
    from modules.confidence_report import format_confidence_report
    from modules.evaluation import evaluate_predictions, format_results_table, write_scores_csv
    from modules.jsonio import write_json_atomic, write_jsonl_atomic
    from modules.run_card import write_run_card

    started = time.time()
    predictions = predict(records)
    if dist.is_main():
        predictions, report = annotate(predictions) if annotate else (predictions, None)
        if report is not None and report.get("review"):
            manifest["confidence_signal"] = report["review"]["signal"]
        write_jsonl_atomic(run_dir / "predictions.jsonl", predictions)
        write_scores_csv(run_dir / "scores.csv", predictions, info, manifest.get("confidence_signal"))
        manifest["inference_seconds"] = round(time.time() - started, 1)
        write_json_atomic(run_dir / MANIFEST, manifest)
        graded = sum(p["gold"] is not None for p in predictions)
        results = None
        if graded == len(predictions):
            results = evaluate_predictions(predictions, info)
            if report is not None:
                results["confidence"] = report
            write_json_atomic(run_dir / "evaluation_results.json", results)
            print(format_results_table(results, info, constrained=args.constrained))
            if report is not None:
                print(format_confidence_report(report))
        else:
            print(f"scored {len(predictions)} essays ({graded} with gold scores; QWK is reported when every essay "
                  f"has them): {run_dir / 'predictions.jsonl'}")
        write_run_card(run_dir, manifest, info, results, n_essays=len(predictions))
        print(f"run folder: {run_dir}")
    dist.barrier()
    return 0


def run_probe(args: argparse.Namespace, info, splits, device) -> int:
    """--scorer probe, stage by stage: claim the run folder -> load the frozen base model -> the
    training and validation essays' pooled hidden states -> a ridge per rubric, alpha by
    cross-validation on the training essays, the layer by the validation essays' QWK -> save
    probe.json and the manifest -> score validation (the confidence is chosen on it) and test ->
    write and print the results, as a LoRA run does (modules/probe_run.py says which confidence
    applies). One process: the features of a few thousand essays need no launcher."""
    from transformers import set_seed

    from modules import dist
    from modules.jsonio import write_json_atomic, write_jsonl_atomic
    from modules.models import load_base_model
    from modules.probe_run import probe_rows, save_probe, train_probe

    if dist.world_size() > 1:
        return stop("--scorer probe runs in one process; start it without torchrun / accelerate launch")
    set_seed(args.seed)
    run_dir, error = claim_run_dir(args, None)
    if error:
        return stop(error)
    try:
        model, tokenizer = load_base_model(args.base_model_name, device=device)
        create_run_dir(run_dir)
    except (OSError, ValueError) as err:
        return stop(str(err).strip().splitlines()[0])
    started = time.time()
    probe = train_probe(model, tokenizer, info, splits, max_tokens=args.probe_max_tokens,
                        batch_size=args.per_device_eval_batch_size, base_model=args.base_model_name, seed=args.seed)
    save_probe(run_dir, probe)
    manifest = {**provenance(), "scorer": "probe", "config": run_config(args), "run_dir": str(run_dir),
                "seed": args.seed, "device": str(device), "dtype": str(model.dtype), "rubrics": info.rubric_names,
                "split_sizes": {k: len(v) for k, v in splits.items()},
                "probe": {"layer": probe.layer, "layers": len(probe.layer_scores) - 1, "pooling": probe.pooling,
                          "max_tokens": probe.max_tokens, "alpha": dict(zip(info.rubric_names, map(float, probe.fit.alpha))),
                          "valid_qwk_by_layer": [round(q, 4) for q in probe.layer_scores]},
                "train": {"seconds": round(time.time() - started, 1)}}
    write_json_atomic(run_dir / MANIFEST, manifest)
    if args.skip_scoring:
        print(f"probe saved in {run_dir}; scoring skipped (--skip_scoring)")
        return 0

    def predict(records: list) -> list[dict]:
        return probe_rows(model, tokenizer, probe, records, info, args.per_device_eval_batch_size)

    valid_rows = predict(splits["valid"])
    write_jsonl_atomic(run_dir / "valid_predictions.jsonl", valid_rows)
    test_records = splits["test"][: args.test_limit] if args.test_limit else splits["test"]
    return score_and_report(args, test_records, info, run_dir, manifest, predict,
                            annotate=lambda rows: calibrated_rows(rows, valid_rows, splits["valid"], test_records,
                                                                  info, run_dir, args))


# --------------------------------------------------------------------------- scoring without training

def score_main(args: argparse.Namespace, device) -> int:
    """Score the essays of --score_path with a trained adapter, without training, stage by stage:
    check the adapter's run manifest, the essays' schema and records, and the output folder ->
    load the adapter -> create a new run folder -> score greedily and weighted, with the
    training run's prompts -> attach the confidence -> write the predictions (and the QWK when
    every essay has gold scores)."""
    from modules import dist
    from modules.scoring_job import confidence_rows, mapped_rows, new_scoring_dir, plan_scoring, scoring_manifest

    from modules.probe_run import is_probe_run, load_probe_run, probe_rows

    probe = {}  # a probe run's probe.json, loaded with its base model

    def load(device):
        from modules.models import load_adapter

        if not is_probe_run(args.adapter_dir):
            return load_adapter(args.base_model_name, args.adapter_dir, device=device)
        probe["probe"], model, tokenizer = load_probe_run(args.adapter_dir, args.base_model_name, device)
        return model, tokenizer

    job, model, tokenizer, error = plan_and_load_adapter(lambda: plan_scoring(args), args, device, load=load)
    if error:
        return stop(error)
    run_dir, error = dist.broadcast(new_scoring_dir(args, job) if dist.is_main() else (None, None))
    if error:
        return stop(error)
    manifest = scoring_manifest(args, job, run_dir, model)
    if probe:
        manifest["scorer"] = "probe"
        predict = lambda records: dist.gather(probe_rows(model, tokenizer, probe["probe"], dist.shard(records),
                                                         job.info, args.per_device_eval_batch_size))
    else:
        try:
            head = load_score_head(args.adapter_dir, job.info, device)
        except ValueError as err:
            return stop(str(err))
        predict = lambda records: mapped_rows(job, model, tokenizer, records,
                                              predict_records(args, model, tokenizer, records, job.info, job.settings,
                                                              head))
    return score_and_report(args, job.records, job.info, run_dir, manifest, predict,
                            annotate=lambda rows: confidence_rows(rows, job))


if __name__ == "__main__":
    sys.exit(main())
