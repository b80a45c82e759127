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
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# Only torch-free modules at the top: analyze runs where torch and transformers are not installed.
from modules.bank import (BANK, append_bank_line, bank_files, bank_line, merge_banks, own_bank_name, read_bank,
                          sampled_ids)
from modules.jsonio import DataError, read_json, write_json_atomic
from modules.runs import (RunDirError, create_run_dir, manifest_prompt_settings, occupied_dir_error,
                          plan_and_load_adapter, setup_logging, stop)

ROOT = Path(__file__).resolve().parent
logger = logging.getLogger("self_consistency")

CONFIG = "run_config.json"
# The flags that decide which samples get drawn: a resumed run must use the same ones.
SAMPLING_KEYS = ("adapter_dir", "base_model_name", "test_path", "max_m", "chunk_m", "temperature", "top_k",
                 "top_p", "max_new_tokens", "seed", "sampler", "mtl", "prompt_format", "max_prompt_tokens",
                 "constrained")
# Sampling flags added after runs were first written, with the value an older run_config.json that
# lacks them was drawn with; resuming such a run compares against that value.
LATER_SAMPLING_DEFAULTS = {"constrained": False}
ANALYSIS_DEFAULTS = {"fallback_score": None, "bootstrap": 200, "seed": 42, "baselines_json": None, "limit": None}
DRY_RUN_LINES = 40


class CliError(Exception):
    """A usage problem reported as one line on stderr (exit 2)."""


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
        samplers = []
    else:
        from modules.sampling import SAMPLERS

        samplers = list(SAMPLERS)

    parser = ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sampling = _sampling_flags(samplers)
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


def _sampling_flags(samplers: list[str]) -> argparse.ArgumentParser:
    """The flags of ``run`` and ``sample`` (a parent parser): adapter, test file, sampling settings,
    run folder, prompt settings and the analysis flags."""
    sampling = argparse.ArgumentParser(add_help=False)
    sampling.add_argument("--adapter_dir", required=True, help="trained LoRA adapter folder (runs/<name>)")
    sampling.add_argument("--base_model_name", required=True, help="the adapter's base: hub id, local dir or built-in")
    sampling.add_argument("--test_path", required=True, help="test jsonl; dataset.json is read from its folder")
    sampling.add_argument("--device_id", default=None,
                          help="GPU index among the visible GPUs (CUDA_VISIBLE_DEVICES order), or cpu (default: the "
                               "first GPU, else the CPU); a GPU that is not there is an error")
    sampling.add_argument("--dry_run", action="store_true", help="load everything, print one prompt, exit")
    sampling.add_argument("--max_m", type=int, default=50, help="samples per essay")
    sampling.add_argument("--chunk_m", type=int, default=10, help="samples per generate call")
    sampling.add_argument("--temperature", type=float, default=0.7)
    sampling.add_argument("--top_k", type=int, default=9)
    sampling.add_argument("--top_p", type=float, default=None, help="nucleus filter (default: the model's generation config)")
    sampling.add_argument("--max_new_tokens", type=int, default=None,
                          help="token budget per sample (default: what a valid score line can take for this "
                               "tokenizer and these rubrics); a sample cut by it is invalid")
    sampling.add_argument("--sampler", choices=samplers, default=samplers[0] if samplers else None,
                          help="trie: exact and fast (default); generate: the original's HF generate loop")
    sampling.add_argument("--constrained", action="store_true",
                          help="allow only tokens that keep each sample a prefix of a valid score line "
                               "(the model's distribution restricted and renormalised, then the warpers)")
    sampling.add_argument("--essay_batch", type=int, default=8,
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


# --------------------------------------------------------------------------- settings

def prompt_settings(args: argparse.Namespace) -> tuple[bool, str, int | None, str]:
    """mtl and prompt_format as in training (flags, else the adapter's run_manifest.json, else
    defaults), the training run's prompt budget (essays are shortened to it, as in training), and
    where the settings came from.

    The prompt must be rendered exactly as in training, or the adapter scores a prompt it never saw.
    """
    manifest = Path(args.adapter_dir) / "run_manifest.json"
    saved = read_json(manifest) if manifest.is_file() else {}
    try:
        saved_mtl, saved_format, max_prompt_tokens = manifest_prompt_settings(saved, manifest)
    except ValueError as err:
        raise CliError(str(err)) from None
    mtl = args.mtl if args.mtl is not None else bool(saved_mtl)
    fmt = args.prompt_format or saved_format or "chat"
    given = [args.mtl is not None, args.prompt_format is not None]
    parts = ["flags"] if any(given) else []
    if not all(given):
        config = saved.get("config")
        parts.append("run_manifest.json" if isinstance(config, dict) and config else "defaults")  # cmd_sample warns
    return mtl, fmt, max_prompt_tokens, " + ".join(parts)


def resolve_fallback(values: list[int] | None, info) -> list[int]:
    """Per-rubric fallback vote: one int for all rubrics, one per rubric, or the midpoints."""
    if values is None:
        return [r.midpoint for r in info.rubrics]
    if len(values) == 1:
        values = values * len(info.rubrics)
    if len(values) != len(info.rubrics):
        raise CliError(f"--fallback_score has {len(values)} values; give 1 or {len(info.rubrics)} (one per rubric)")
    for v, r in zip(values, info.rubrics):
        if not r.min <= v <= r.max:
            raise CliError(f"--fallback_score {v} is outside rubric '{r.name}' range {r.min}-{r.max}")
    return list(values)


def load_baselines(path: str | None) -> dict | None:
    return read_json(Path(path)) if path else None


def load_records(test_path: str, limit: int | None):
    from modules.data import dataset_info_for, load_split

    info = dataset_info_for(test_path)
    records = load_split(test_path, info)
    return info, records[:limit] if limit else records


def make_title(config_args: dict, m: int) -> str:
    """Model, sampling settings and m for the figures; parts the config does not know are left out."""
    parts = []
    if config_args.get("adapter_dir"):
        parts.append(f"{Path(config_args['adapter_dir']).name} on {config_args.get('base_model_name', '?')}")
    parts += [f"{label}={config_args[key]}" for key, label in (("temperature", "T"), ("top_k", "top_k"), ("top_p", "top_p"))
              if config_args.get(key) is not None]
    if config_args.get("constrained"):
        parts.append("constrained")
    return ", ".join(parts + [f"max m={m}"])


# --------------------------------------------------------------------------- analysis

def bank_samples(bank_path: Path, test_path: str, records, info) -> tuple["np.ndarray", int]:
    """The bank's scores as int [N, m, K] in test-file order (-1 = invalid sample) and its number of
    truncated samples; a DataError (one line) when its essays, sample counts or gold scores do not
    match the test file's."""
    import numpy as np

    from modules.voting import INVALID

    rows = {row["id"]: row for row in read_bank(bank_path, info.ranges)}
    expected = [r.id for r in records]
    missing = [i for i in expected if i not in rows]
    unknown = sorted(set(rows) - set(expected))
    if missing or unknown:
        detail = [f"{len(missing)} essays missing (first {missing[0]!r}; an unfinished run? continue it with "
                  f"--resume)"] if missing else []
        detail += [f"{len(unknown)} not among the {len(expected)} test essays (first {unknown[0]!r})"] if unknown else []
        raise DataError(f"{bank_path}: essay ids do not match {test_path}: " + ", ".join(detail))
    counts = sorted({len(rows[i]["samples"]) for i in expected})
    if len(counts) > 1:
        raise DataError(f"{bank_path}: essays hold different numbers of samples {counts}; finish the run with --resume")
    n, m, k = len(records), counts[0], len(info.rubrics)
    samples = np.full((n, m, k), INVALID, dtype=np.int64)
    for e, record in enumerate(records):
        row = rows[record.id]
        if row["gold"] != list(record.scores):
            raise DataError(f"{bank_path}: essay {record.id!r}: gold {row['gold']} differs from {test_path} "
                            f"({list(record.scores)})")
        for j, sample in enumerate(row["samples"]):
            if sample["scores"] is not None:
                samples[e, j] = sample["scores"]
    truncated = sum(bool(sample.get("truncated")) for r in records for sample in rows[r.id]["samples"])
    return samples, truncated


def analyze_bank(bank_path: Path, test_path: str, records, info, out_dir: Path, *, fallback: list[int],
                 n_bootstrap: int, seed: int, baselines: dict | None, config_args: dict) -> tuple[dict, dict]:
    """Votes, curves, bootstrap bands, best scores and figures of a bank; writes them into out_dir.

    Also the confidence of the majority vote over all samples (modules.confidence): per essay in
    ``confidence.jsonl``, the risk-coverage tables with AURC and AUROC of the self-consistency signals
    (agreement share, sample std) against essay length and random order in ``confidence.json``, and
    ``risk_coverage.png``.

    Essays are taken in test-file order, so the result does not depend on the bank's line order.
    """
    import numpy as np

    from modules.confidence import with_confidence
    from modules.confidence_report import sample_bank_report
    from modules.jsonio import write_jsonl_atomic
    from modules.plots import plot_average, plot_overall, plot_per_rubric, plot_risk_coverage
    from modules.curves import bootstrap_curves, qwk_curves
    from modules.voting import INVALID, best_scores

    samples, truncated = bank_samples(bank_path, test_path, records, info)
    n, m, _ = samples.shape
    gold = np.array([r.scores for r in records], dtype=np.int64)

    curves = qwk_curves(samples, gold, info.ranges, fallback, rubric_names=info.rubric_names)
    if n_bootstrap:
        curves["bootstrap"] = bootstrap_curves(samples, gold, info.ranges, fallback, n_orderings=n_bootstrap,
                                               seed=seed, rubric_names=info.rubric_names)
    invalid = int((samples == INVALID).all(axis=2).sum())
    curves.update(invalid_rate=invalid / (n * m), invalid_samples=invalid, truncated_samples=truncated,
                  fallback=list(fallback))
    best = best_scores(curves)

    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "curves.json", curves)
    write_json_atomic(out_dir / "best_qwk_scores.json", best)
    title = make_title(config_args, m)
    plot_overall(curves, baselines, out_dir / "overall_qwk_vs_m.png", title)
    plot_average(curves, baselines, out_dir / "average_qwk_vs_m.png", title)
    plot_per_rubric(curves, baselines, out_dir / "per_rubric_qwk_vs_m.png", title)

    report, signals, measures = sample_bank_report(samples, gold, info.ranges, fallback,
                                                   essays=[r.essay for r in records], seed=seed)
    write_json_atomic(out_dir / "confidence.json", report)
    write_jsonl_atomic(out_dir / "confidence.jsonl",
                       with_confidence([{"id": r.id} for r in records], info.rubric_names, signals, measures))
    plot_risk_coverage(report["signals"], out_dir / "risk_coverage.png", title)
    return curves, best


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

def check_output_dir(args: argparse.Namespace) -> Path | None:
    """The run folder to continue or create; never an existing non-empty one unless resuming."""
    if args.resume:
        if not args.output_dir:
            raise CliError("--resume needs --output_dir naming the run folder to continue")
        out = Path(args.output_dir)
        if not (out / CONFIG).is_file():
            raise CliError(f"{out}: no {CONFIG} there; not a self-consistency run to resume")
        return out
    if args.output_dir:
        out = Path(args.output_dir)
        error = occupied_dir_error(out, "output folder", "use --resume to continue that run")
        if error:
            raise CliError(error)
        return out
    return None


def run_prefix(args: argparse.Namespace) -> str:
    """The name a new run folder starts with: --tag, else the adapter folder's name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", args.tag or Path(args.adapter_dir).resolve().name)


@dataclass
class SamplingPlan:
    """What a sampling run has checked before it loads the model: the essays, the prompt settings
    as in training, the fallback votes, the run folder and, when resuming, what is already drawn."""
    info: object
    records: list
    fallback: list[int]
    mtl: bool
    prompt_format: str
    max_prompt_tokens: int | None
    prompt_source: str
    baselines_path: str | None
    out_dir: Path | None
    resolved: dict  # the flags as run_config.json records them
    own_bank: str
    saved: dict | None = None  # the run_config.json of the run being resumed
    done: set = field(default_factory=set)  # ids already in this process's bank


def cmd_sample(args: argparse.Namespace) -> int:
    """``sample`` and ``run``, stage by stage: check every input -> load the adapter -> (dry run:
    print one prompt, exit) -> create the run folder and its config -> draw the samples into the
    bank -> merge the processes' banks -> (``run``) analyze and print."""
    from modules import dist
    from modules.scoring import score_line_budget

    # Under a launcher each process takes its LOCAL_RANK's GPU and joins the process group first, so
    # that the checks end with one verdict for all. Everything that can be wrong with the input
    # fails in plan_sampling, before minutes of model loading.
    device = dist.join(args.device_id)
    plan, model, tokenizer, error = plan_and_load_adapter(lambda: plan_sampling(args), args, device, (CliError,))
    if error:
        return stop(error)
    if dist.is_main():  # only now: a run that stops on an input error prints that error line alone
        log_prompt_source(args, plan)
    token_budget = args.max_new_tokens or score_line_budget(tokenizer, plan.info.ranges, args.constrained)
    if args.dry_run:
        return print_dry_run(args, plan, model, tokenizer, token_budget) if dist.is_main() else 0
    error = open_run_dir(args, plan, model, token_budget)
    if error:
        return stop(error)
    draw_samples(args, plan, model, tokenizer, token_budget)
    dist.barrier()  # every process has written its share
    return finish_sampling(args, plan) if dist.is_main() else 0


def plan_sampling(args: argparse.Namespace) -> SamplingPlan:
    """Every check of a sampling run's input (test file, fallback, prompt settings, baselines, run
    folder, a resume's settings and finished essays); DataError or CliError as one line."""
    from modules import dist

    info, records = load_records(args.test_path, args.limit)
    fallback = resolve_fallback(args.fallback_score, info)
    mtl, prompt_format, max_prompt_tokens, prompt_source = prompt_settings(args)
    if args.baselines_json is not None and not Path(args.baselines_json).is_file():
        raise CliError(f"{args.baselines_json}: baselines file not found")
    default_baselines = Path(args.adapter_dir) / "evaluation_results.json"
    baselines_path = args.baselines_json or (str(default_baselines.resolve()) if default_baselines.is_file() else None)
    out_dir = check_output_dir(args)  # also on --dry_run: a bad folder should show up before a real run
    resolved = {**vars(args), "adapter_dir": str(Path(args.adapter_dir).resolve()),
                "test_path": str(Path(args.test_path).resolve()), "mtl": mtl, "prompt_format": prompt_format,
                "max_prompt_tokens": max_prompt_tokens, "fallback_score": fallback, "baselines_json": baselines_path}
    plan = SamplingPlan(info, records, fallback, mtl, prompt_format, max_prompt_tokens, prompt_source,
                        baselines_path, out_dir, resolved, own_bank_name(dist.rank(), dist.world_size()))
    if args.resume:
        plan.saved = read_json(out_dir / CONFIG)
        before = plan.saved.get("args", {})
        used = {k: before.get(k, LATER_SAMPLING_DEFAULTS.get(k)) for k in SAMPLING_KEYS}
        diffs = [k for k in SAMPLING_KEYS if used[k] != resolved[k]]
        if diffs:
            raise CliError(f"{out_dir}: cannot resume with different sampling settings: " + "; ".join(
                f"{k} {resolved[k]!r} (run used {used[k]!r})" for k in diffs))
        plan.done = sampled_ids(out_dir, records, info, plan.own_bank)
    return plan


def log_prompt_source(args: argparse.Namespace, plan: SamplingPlan) -> None:
    """Warn when the prompt settings are defaults (no run manifest), note a run without a budget."""
    manifest = Path(args.adapter_dir) / "run_manifest.json"
    if plan.prompt_source.endswith("defaults"):
        logger.warning("%s not found; prompting with mtl=%s, prompt_format=%s (pass the training flags if they "
                       "differed)", manifest, plan.mtl, plan.prompt_format)
    elif plan.max_prompt_tokens is None:
        logger.info("%s records no max_prompt_tokens (a run from before prompts were shortened alike); "
                    "prompting with whole essays", manifest)


def print_dry_run(args: argparse.Namespace, plan: SamplingPlan, model, tokenizer, token_budget: int) -> int:
    """The settings a run would sample with, and the first essay's prompt as the model sees it."""
    from modules.data import build_prompt
    from modules.score_lines import decoding_mode

    param = next(model.parameters())
    record = plan.records[0]
    prompt = build_prompt(record, plan.info, tokenizer, plan.mtl, plan.prompt_format, plan.max_prompt_tokens)
    n_tokens = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    print(f"dry run: {len(plan.records)} essays, {len(plan.info.rubrics)} rubrics, mtl={plan.mtl}, "
          f"prompt_format={plan.prompt_format} ({plan.prompt_source}), sampler={args.sampler}, "
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


def draw_samples(args: argparse.Namespace, plan: SamplingPlan, model, tokenizer, token_budget: int) -> None:
    """Draw --max_m samples of every essay not yet in this process's bank (its share of them under
    a launcher), appending each essay's line as soon as its batch ends."""
    from tqdm.auto import tqdm

    from modules import dist
    from modules.data import build_prompt
    from modules.sampling import SAMPLERS

    todo = dist.shard([(i, r) for i, r in enumerate(plan.records) if r.id not in plan.done])
    sampler = SAMPLERS[args.sampler]
    sample_args = dict(max_m=args.max_m, chunk_m=args.chunk_m, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, max_new_tokens=token_budget, constrained=args.constrained)
    started, drawn, invalid = time.perf_counter(), 0, 0
    label = "sampling" if dist.world_size() == 1 else f"sampling (rank 0 of {dist.world_size()})"
    # The generate sampler runs essay by essay as the original did; the trie sampler batches essays.
    batch_size = args.essay_batch if args.sampler == "trie" else 1
    with (plan.out_dir / plan.own_bank).open("a", encoding="utf-8") as handle, \
            tqdm(total=len(plan.done) + len(todo), initial=len(plan.done), desc=label, unit="essay",
                 disable=None if dist.is_main() else True) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            prompts = [build_prompt(record, plan.info, tokenizer, plan.mtl, plan.prompt_format,
                                    plan.max_prompt_tokens) for _, record in batch]
            # Essay i is seeded with seed + i (its position in the test file), so a resumed, sharded or
            # --limit'ed run draws exactly the samples a full uninterrupted run would.
            drawn_samples = sampler(model, tokenizer, prompts, plan.info.ranges,
                                    generator_seeds=[args.seed + index for index, _ in batch], **sample_args)
            for (_, record), samples in zip(batch, drawn_samples):
                row = bank_line(record.id, record.scores, samples)
                append_bank_line(handle, row)
                drawn, invalid = drawn + len(samples), invalid + row["invalid"]
            bar.set_postfix(samples_per_s=f"{drawn / (time.perf_counter() - started):.1f}",
                            invalid=f"{invalid}/{drawn}")
            bar.update(len(batch))


def finish_sampling(args: argparse.Namespace, plan: SamplingPlan) -> int:
    """Rank 0, once every process has drawn: merge the per-process banks into samples.jsonl, then
    (``run``) analyze the bank and print the summary."""
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
    except (DataError, CliError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if sampling:
            dist.finish()


if __name__ == "__main__":
    sys.exit(main())
