"""Self-consistency of a LoRA essay scorer: sample m answers per essay, vote, plot QWK vs m.

    python self_consistency.py run --adapter_dir runs/NAME --base_model_name smollm2-135m \\
        --test_path aes_dataset_mtl/test.jsonl --max_m 50
    python self_consistency.py analyze --bank_path consistency_results/RUN/samples.jsonl \\
        --test_path aes_dataset_mtl/test.jsonl

``run`` = ``sample`` + ``analyze``. ``sample`` writes the sample bank (``samples.jsonl``, one
line per essay, fsynced as it goes; ``--resume`` continues a killed run). ``analyze``
recomputes curves, best scores and figures from a bank without a model; its options default to
the ``run_config.json`` beside the bank, so it reproduces ``run``'s outputs exactly.

Under ``torchrun --nproc_per_node N`` the essays are shared out over the N processes; each one
appends to its own ``samples.rank<r>.jsonl``, and rank 0 merges them into ``samples.jsonl`` in
test-file order and analyses. Essay i is seeded with seed + i whichever process draws it, so the
merged bank is the one a single process would write.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

# Only torch-free modules at the top: analyze runs where torch and transformers are not installed.
from modules.bank import BANK, append_bank_line, bank_files, merge_banks
from modules.jsonio import DataError, read_json, write_json_atomic
from modules.runs import RunDirError, create_run_dir, plan_and_load_adapter, setup_logging, stop
from modules.sc_run import (ANALYSIS_DEFAULTS, CONFIG, SamplingPlan, UsageError, load_records, plan_sampling,
                            resolve_fallback, run_prefix)

if TYPE_CHECKING:
    from modules.sampling import SamplerSettings

ROOT = Path(__file__).resolve().parent
logger = logging.getLogger("self_consistency")

DRY_RUN_LINES = 40


# --------------------------------------------------------------------------- arguments

def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int or comma-separated ints, got {text!r}") from None


def _add_analysis_flags(p: argparse.ArgumentParser, from_config: bool) -> None:
    """Flags that only shape the analysis; ``analyze`` takes unset ones from the run's config."""
    default = (lambda key: None) if from_config else ANALYSIS_DEFAULTS.get
    note = " (default: the run's value from run_config.json)" if from_config else ""
    p.add_argument("--fallback_score", type=_int_list, default=None,
                   help="vote of an essay-rubric with no valid sample: int or one per rubric" +
                        (note or " (default: the rubric midpoints)"))
    p.add_argument("--bootstrap", type=int, default=default("bootstrap"),
                   help="random orderings for the 95%% bands; 0 = no bands" + (note or " (default 200)"))
    p.add_argument("--seed", type=int, default=default("seed"),
                   help="sampling seed (essay i uses seed + i) and bootstrap seed" + (note or " (default 42)"))
    p.add_argument("--baselines_json", default=None,
                   help="evaluation_results.json whose greedy/weighted QWKs are drawn as lines" +
                        (note or " (default: <adapter_dir>/evaluation_results.json when present)"))
    p.add_argument("--limit", type=int, default=None, help="only the first N essays of the test file" + note)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from modules.cli import ArgumentParser

    argv = sys.argv[1:] if argv is None else argv
    # The sampler registry imports torch, which analyze must not need; an analyze command line (the
    # subcommand comes first) is never parsed by the sampling flags, which alone use the registry.
    if argv[:1] == ["analyze"]:
        samplers, defaults = [], None
    else:
        from modules.sampling import SAMPLERS, SamplerSettings

        samplers, defaults = list(SAMPLERS), SamplerSettings()

    parser = ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sampling = _sampling_flags(samplers, defaults)
    sub.add_parser("run", parents=[sampling], help="sample, then analyze")
    sub.add_parser("sample", parents=[sampling], help="write the sample bank only")
    analyze = sub.add_parser("analyze", help="recompute curves, best scores and figures from a bank")
    analyze.add_argument("--bank_path", required=True)
    analyze.add_argument("--test_path", required=True)
    analyze.add_argument("--output_dir", default=None, help="where to write (default: the bank's folder)")
    _add_analysis_flags(analyze, from_config=True)
    args = parser.parse_args(argv)

    sampling_checks = [("max_m", 1), ("chunk_m", 1), ("top_k", 1), ("max_new_tokens", 1), ("essay_batch", 1)]
    checks = [("limit", 1), ("bootstrap", 0)] + (sampling_checks if args.command != "analyze" else [])
    for key, low in checks:
        if getattr(args, key) is not None and getattr(args, key) < low:
            parser.error(f"--{key} must be >= {low}, got {getattr(args, key)}")
    if args.command != "analyze":
        if args.temperature <= 0:
            parser.error(f"--temperature must be > 0, got {args.temperature}")
        if args.top_p is not None and not 0 < args.top_p <= 1:
            parser.error(f"--top_p must be in (0, 1], got {args.top_p}")
    return args


def _sampling_flags(samplers: list[str], defaults: SamplerSettings | None) -> argparse.ArgumentParser:
    """The flags of ``run`` and ``sample`` (a parent parser): adapter, test file, sampling settings
    (defaulting to ``defaults``' fields; None for an analyze command line, which never parses them),
    run folder, prompt settings and the analysis flags."""
    def default(name: str):
        return getattr(defaults, name, None)

    sampling = argparse.ArgumentParser(add_help=False)
    sampling.add_argument("--adapter_dir", required=True, help="trained LoRA adapter folder (runs/<name>)")
    sampling.add_argument("--base_model_name", required=True, help="the adapter's base: hub id, local dir or built-in")
    sampling.add_argument("--test_path", required=True, help="test jsonl; dataset.json is read from its folder")
    sampling.add_argument("--device_id", default=None,
                          help="GPU index among the visible GPUs (CUDA_VISIBLE_DEVICES order), or cpu (default: the "
                               "first GPU, else the CPU); a GPU that is not there is an error")
    sampling.add_argument("--dry_run", action="store_true", help="load everything, print one prompt, exit")
    sampling.add_argument("--max_m", type=int, default=default("max_m"), help="samples per essay")
    sampling.add_argument("--chunk_m", type=int, default=default("chunk_m"), help="samples per generate call")
    sampling.add_argument("--temperature", type=float, default=default("temperature"))
    sampling.add_argument("--top_k", type=int, default=default("top_k"))
    sampling.add_argument("--top_p", type=float, default=default("top_p"),
                          help="nucleus filter (default: the model's generation config)")
    sampling.add_argument("--max_new_tokens", type=int, default=default("max_new_tokens"),
                          help="token budget per sample (default: what a valid score line can take for this "
                               "tokenizer and these rubrics); a sample cut by it is invalid")
    sampling.add_argument("--sampler", choices=samplers, default=default("sampler"),
                          help="trie: exact and fast (default); generate: the original's HF generate loop")
    sampling.add_argument("--constrained", action="store_true", default=default("constrained"),
                          help="allow only tokens that keep each sample a prefix of a valid score line "
                               "(the model's distribution restricted and renormalised, then the warpers)")
    sampling.add_argument("--essay_batch", type=int, default=default("essay_batch"),
                          help="essays sampled together (trie sampler); lower it when memory is short")
    sampling.add_argument("--output_root", default="./consistency_results")
    sampling.add_argument("--output_dir", default=None, help="run folder (default <output_root>/<tag or adapter>_<time>)")
    sampling.add_argument("--tag", default=None, help="run folder name prefix instead of the adapter's name")
    sampling.add_argument("--resume", action="store_true", help="continue the run in --output_dir, skipping finished essays")
    sampling.add_argument("--mtl", action=argparse.BooleanOptionalAction, default=None,
                          help="prompt as in MTL training (default: the adapter's run_manifest.json)")
    sampling.add_argument("--prompt_format", choices=("chat", "plain"), default=None,
                          help="prompt rendering used in training (default: the adapter's run_manifest.json, else chat)")
    _add_analysis_flags(sampling, from_config=False)
    return sampling


# --------------------------------------------------------------------------- analysis

def load_baselines(path: str | None) -> dict | None:
    return read_json(Path(path)) if path else None


def print_summary(curves: dict, best: dict, out_dir: Path, decoding: str) -> None:
    """The results table of a run: best QWKs per vote, invalid samples, and the decoding mode."""
    print(f"overall QWK ({curves['n_essays']} essays, m = 1..{curves['ms'][-1]}):")
    for vote, label in (("avg", "average vote"), ("maj", "majority vote")):
        b = best[vote]
        print(f"  {label:<14} m=1 {b['m1']['overall']:.4f}   best {b['best']['overall']:.4f} (m={b['best']['m']})"
              f"   m={b['max_m']['m']} {b['max_m']['overall']:.4f}")
    print(f"invalid samples: {curves['invalid_samples']} ({100 * curves['invalid_rate']:.1f}%), "
          f"{curves.get('truncated_samples', 0)} of them cut by the token budget")
    print(f"decoding: {decoding}")
    if (out_dir / "confidence.json").is_file():
        from modules.confidence_report import format_confidence_report

        print(format_confidence_report(read_json(out_dir / "confidence.json")))
    print(f"outputs: {out_dir}")


def cmd_analyze(args: argparse.Namespace) -> int:
    from modules.sc_analysis import analyze_bank
    from modules.score_lines import decoding_mode

    bank = Path(args.bank_path)
    config_path = bank.parent / CONFIG
    saved = read_json(config_path).get("args", {}) if config_path.is_file() else {}
    opts = {key: getattr(args, key) if getattr(args, key) is not None else saved.get(key, default)
            for key, default in ANALYSIS_DEFAULTS.items()}
    info, records = load_records(args.test_path, opts["limit"])
    fallback = resolve_fallback(opts["fallback_score"], info)
    baselines_path = opts["baselines_json"]
    if args.baselines_json is None and baselines_path and not Path(baselines_path).is_file():
        logger.warning("baselines %s (from %s) not found; plotting without baselines", baselines_path, config_path)
        baselines_path = None
    out_dir = Path(args.output_dir) if args.output_dir else bank.parent
    curves, best = analyze_bank(bank, args.test_path, records, info, out_dir, fallback=fallback,
                                n_bootstrap=opts["bootstrap"], seed=opts["seed"],
                                baselines=load_baselines(baselines_path), config_args=saved)
    # A run_config.json without the flag is from before it existed: those runs were unconstrained.
    decoding = (decoding_mode(saved.get("constrained", False)) if config_path.is_file()
                else f"unknown (no {CONFIG} beside the bank)")
    print_summary(curves, best, out_dir, decoding)
    return 0


# --------------------------------------------------------------------------- sampling

def cmd_sample(args: argparse.Namespace) -> int:
    """``sample`` and ``run``, stage by stage: check every input -> load the adapter -> (dry run:
    print one prompt, exit) -> create the run folder and its config -> draw the samples into the
    bank -> merge the processes' banks -> (``run``) analyze and print."""
    from modules import dist

    # Under a launcher each process takes its LOCAL_RANK's GPU and joins the process group first, so
    # that the checks end with one verdict for all. Everything that can be wrong with the input
    # fails in plan_sampling, before minutes of model loading.
    device = dist.join(args.device_id)
    plan, model, tokenizer, error = plan_and_load_adapter(lambda: plan_sampling(args), args, device, (UsageError,))
    if error:
        return stop(error)
    if dist.is_main():  # only now: a run that stops on an input error prints that error line alone
        log_prompt_source(args, plan)
    settings = sampler_settings(args)
    token_budget = settings.token_budget(tokenizer, plan.info.ranges)
    if args.dry_run:
        return print_dry_run(args, plan, model, tokenizer, token_budget) if dist.is_main() else 0
    error = open_run_dir(args, plan, model, token_budget)
    if error:
        return stop(error)
    draw_samples(args, plan, model, tokenizer, settings)
    dist.barrier()  # every process has written its share
    return finish_sampling(args, plan) if dist.is_main() else 0


def log_prompt_source(args: argparse.Namespace, plan: SamplingPlan) -> None:
    """Warn when the prompt settings are defaults (no run manifest), note a run without a budget."""
    manifest = Path(args.adapter_dir) / "run_manifest.json"
    if plan.prompt_source.endswith("defaults"):
        logger.warning("%s not found; prompting with mtl=%s, prompt_format=%s (pass the training flags if they "
                       "differed)", manifest, plan.prompts.mtl, plan.prompts.prompt_format)
    elif plan.prompts.max_prompt_tokens is None:
        logger.info("%s records no max_prompt_tokens (a run from before prompts were shortened alike); "
                    "prompting with whole essays", manifest)


def print_dry_run(args: argparse.Namespace, plan: SamplingPlan, model, tokenizer, token_budget: int) -> int:
    """The settings a run would sample with, and the first essay's prompt as the model sees it."""
    from modules.score_lines import decoding_mode

    param = next(model.parameters())
    record = plan.records[0]
    prompt = plan.prompts.prompt(record, plan.info, tokenizer)
    n_tokens = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    print(f"dry run: {len(plan.records)} essays, {len(plan.info.rubrics)} rubrics, mtl={plan.prompts.mtl}, "
          f"prompt_format={plan.prompts.prompt_format} ({plan.prompt_source}), sampler={args.sampler}, "
          f"{decoding_mode(args.constrained)} decoding, token budget {token_budget}, {param.device}, {param.dtype}")
    print(f"--- prompt of essay {record.id} ({n_tokens} tokens) ---")
    lines = prompt.splitlines()
    print("\n".join(lines[:DRY_RUN_LINES]))
    if len(lines) > DRY_RUN_LINES:
        print(f"... ({len(lines) - DRY_RUN_LINES} more lines)")
    return 0


def open_run_dir(args: argparse.Namespace, plan: SamplingPlan, model, token_budget: int) -> str | None:
    """Create the run folder (rank 0 names it by its clock and tells the others) and write its
    run_config.json, new or with one more resume; the error that stops every process, else None.

    Every process has checked the folder (first_error in cmd_sample waits for all); only now may
    rank 0 create it or rewrite its config."""
    from modules import dist
    from modules.runs import provenance, resume_entry

    error = None
    if dist.is_main():
        try:
            plan.out_dir = create_run_dir(plan.out_dir, Path(args.output_root), run_prefix(args))
        except RunDirError as err:
            error = str(err)
    plan.out_dir, error = dist.broadcast((plan.out_dir, error))  # one folder for all, named by rank 0's clock
    if error:
        return error
    plan.resolved["output_dir"] = str(plan.out_dir.resolve())
    if dist.is_main():
        param = next(model.parameters())
        if plan.saved is None:
            config = {**provenance(), "args": plan.resolved, "prompt_settings_from": plan.prompt_source,
                      "device": str(param.device), "dtype": str(param.dtype), "rubrics": plan.info.rubric_names,
                      "world_size": dist.world_size(), "token_budget": token_budget}
        else:
            config = {**plan.saved, "args": plan.resolved}
            config.setdefault("resumes", []).append(resume_entry({"world_size": dist.world_size()}))
        config["n_essays"] = len(plan.records)
        write_json_atomic(plan.out_dir / CONFIG, config)
        if plan.done:
            print(f"resuming {plan.out_dir}: {len(plan.done)} of {len(plan.records)} essays already sampled")
    return None


def sampler_settings(args: argparse.Namespace) -> SamplerSettings:
    """The sampling flags as :class:`~modules.sampling.SamplerSettings`."""
    from modules.sampling import SamplerSettings

    return SamplerSettings(**{f.name: getattr(args, f.name) for f in fields(SamplerSettings)})


def draw_samples(args: argparse.Namespace, plan: SamplingPlan, model, tokenizer, settings: SamplerSettings) -> None:
    """Draw --max_m samples of every essay not yet in this process's bank (its share of them under
    a launcher), appending each essay's line as soon as its batch ends."""
    from tqdm.auto import tqdm

    from modules import dist
    from modules.sampling import draw_bank_lines

    def prompt_of(record) -> str:
        return plan.prompts.prompt(record, plan.info, tokenizer)

    todo = dist.shard([(i, r) for i, r in enumerate(plan.records) if r.id not in plan.done])
    started, drawn, invalid = time.perf_counter(), 0, 0
    label = "sampling" if dist.world_size() == 1 else f"sampling (rank 0 of {dist.world_size()})"
    with (plan.out_dir / plan.own_bank).open("a", encoding="utf-8") as handle, \
            tqdm(total=len(plan.done) + len(todo), initial=len(plan.done), desc=label, unit="essay",
                 disable=None if dist.is_main() else True) as bar:
        for rows in draw_bank_lines(model, tokenizer, todo, prompt_of, plan.info.ranges, settings, seed=args.seed):
            for row in rows:
                append_bank_line(handle, row)
                drawn, invalid = drawn + len(row["samples"]), invalid + row["invalid"]
            bar.set_postfix(samples_per_s=f"{drawn / (time.perf_counter() - started):.1f}",
                            invalid=f"{invalid}/{drawn}")
            bar.update(len(rows))


def finish_sampling(args: argparse.Namespace, plan: SamplingPlan) -> int:
    """Rank 0, once every process has drawn: merge the per-process banks into samples.jsonl, then
    (``run``) analyze the bank and print the summary."""
    from modules.sc_analysis import analyze_bank
    from modules.score_lines import decoding_mode

    out_dir = plan.out_dir
    bank = out_dir / plan.own_bank
    if bank_files(out_dir) != [out_dir / BANK]:
        bank = merge_banks(out_dir, plan.records, plan.info)
    if args.command == "sample":
        print(f"sample bank: {bank}")
        return 0
    curves, best = analyze_bank(bank, args.test_path, plan.records, plan.info, out_dir, fallback=plan.fallback,
                                n_bootstrap=args.bootstrap, seed=args.seed,
                                baselines=load_baselines(plan.baselines_path), config_args=plan.resolved)
    print_summary(curves, best, out_dir, decoding_mode(args.constrained))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    sampling = args.command != "analyze"
    if sampling:  # analyze needs no process group, and must not import torch
        from modules import dist
    try:
        return cmd_sample(args) if sampling else cmd_analyze(args)
    except (DataError, UsageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if sampling:
            dist.finish()


if __name__ == "__main__":
    sys.exit(main())
