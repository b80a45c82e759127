"""A self-consistency sampling run's inputs and folder, checked before its model loads (SPEC §2, §9).

:func:`plan_sampling` checks everything ``self_consistency.py sample`` / ``run`` is given (test
file, fallback votes, the adapter's training prompt settings, baselines, run folder, a resume's
settings and finished essays) into a :class:`SamplingPlan`. The run folder holds the sample bank
(:mod:`modules.bank`), ``run_config.json`` (:data:`CONFIG`: the resolved flags under ``"args"``)
and the analysis (:mod:`modules.sc_analysis`), whose options ``analyze`` takes from that config
(:data:`ANALYSIS_DEFAULTS`). Input problems are one-line :class:`UsageError` s; nothing is printed.

Imports neither torch nor transformers: ``self_consistency.py analyze`` uses it without them.
"""
from __future__ import annotations

import re
from argparse import Namespace
from dataclasses import dataclass, field
from pathlib import Path

from modules.bank import own_bank_name, sampled_ids
from modules.data import DatasetInfo, EssayRecord, dataset_info_for, load_split
from modules.jsonio import read_json
from modules.runs import PromptSettings, manifest_prompt_settings, occupied_dir_error

CONFIG = "run_config.json"
# The flags that decide which samples get drawn: a resumed run must use the same ones.
SAMPLING_KEYS = ("adapter_dir", "base_model_name", "test_path", "max_m", "chunk_m", "temperature", "top_k",
                 "top_p", "max_new_tokens", "seed", "sampler", "mtl", "prompt_format", "max_prompt_tokens",
                 "constrained")
# Sampling flags added after runs were first written, with the value an older run_config.json that
# lacks them was drawn with; resuming such a run compares against that value.
LATER_SAMPLING_DEFAULTS = {"constrained": False}
ANALYSIS_DEFAULTS = {"fallback_score": None, "bootstrap": 200, "seed": 42, "baselines_json": None, "limit": None}


class UsageError(Exception):
    """A problem with a run's flags or folder, reported as one line on stderr (exit 2)."""


def prompt_settings(args: Namespace) -> tuple[PromptSettings, str]:
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
        raise UsageError(str(err)) from None
    mtl = args.mtl if args.mtl is not None else bool(saved_mtl)
    fmt = args.prompt_format or saved_format or "chat"
    given = [args.mtl is not None, args.prompt_format is not None]
    parts = ["flags"] if any(given) else []
    if not all(given):
        config = saved.get("config")
        parts.append("run_manifest.json" if isinstance(config, dict) and config else "defaults")  # the CLI warns
    return PromptSettings(mtl, fmt, max_prompt_tokens), " + ".join(parts)


def resolve_fallback(values: list[int] | None, info) -> list[int]:
    """Per-rubric fallback vote: one int for all rubrics, one per rubric, or the midpoints."""
    if values is None:
        return [r.midpoint for r in info.rubrics]
    if len(values) == 1:
        values = values * len(info.rubrics)
    if len(values) != len(info.rubrics):
        raise UsageError(f"--fallback_score has {len(values)} values; give 1 or {len(info.rubrics)} (one per rubric)")
    for v, r in zip(values, info.rubrics):
        if not r.min <= v <= r.max:
            raise UsageError(f"--fallback_score {v} is outside rubric '{r.name}' range {r.min}-{r.max}")
    return list(values)


def load_records(test_path: str, limit: int | None) -> tuple[DatasetInfo, list[EssayRecord]]:
    """The test file's dataset info and its essays, the first ``limit`` only when given."""
    info = dataset_info_for(test_path)
    records = load_split(test_path, info)
    return info, records[:limit] if limit else records


def check_output_dir(args: Namespace) -> Path | None:
    """The run folder to continue or create; never an existing non-empty one unless resuming."""
    if args.resume:
        if not args.output_dir:
            raise UsageError("--resume needs --output_dir naming the run folder to continue")
        out = Path(args.output_dir)
        if not (out / CONFIG).is_file():
            raise UsageError(f"{out}: no {CONFIG} there; not a self-consistency run to resume")
        return out
    if args.output_dir:
        out = Path(args.output_dir)
        error = occupied_dir_error(out, "output folder", "use --resume to continue that run")
        if error:
            raise UsageError(error)
        return out
    return None


def run_prefix(args: Namespace) -> str:
    """The name a new run folder starts with: --tag, else the adapter folder's name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", args.tag or Path(args.adapter_dir).resolve().name)


@dataclass
class SamplingPlan:
    """What a sampling run has checked before it loads the model: the essays, the prompt settings
    as in training, the fallback votes, the run folder and, when resuming, what is already drawn."""
    info: object
    records: list
    fallback: list[int]
    prompts: PromptSettings
    prompt_source: str  # where the settings came from: flags, run_manifest.json or defaults
    baselines_path: str | None
    out_dir: Path | None
    resolved: dict  # the flags as run_config.json records them
    own_bank: str
    saved: dict | None = None  # the run_config.json of the run being resumed
    done: set = field(default_factory=set)  # ids already in this process's bank


def plan_sampling(args: Namespace) -> SamplingPlan:
    """Every check of a sampling run's input (test file, fallback, prompt settings, baselines, run
    folder, a resume's settings and finished essays); DataError or UsageError as one line. Loads no model."""
    from modules import dist

    info, records = load_records(args.test_path, args.limit)
    fallback = resolve_fallback(args.fallback_score, info)
    prompts, prompt_source = prompt_settings(args)
    if args.baselines_json is not None and not Path(args.baselines_json).is_file():
        raise UsageError(f"{args.baselines_json}: baselines file not found")
    default_baselines = Path(args.adapter_dir) / "evaluation_results.json"
    baselines_path = args.baselines_json or (str(default_baselines.resolve()) if default_baselines.is_file() else None)
    out_dir = check_output_dir(args)  # also on --dry_run: a bad folder should show up before a real run
    resolved = {**vars(args), "adapter_dir": str(Path(args.adapter_dir).resolve()),
                "test_path": str(Path(args.test_path).resolve()), "mtl": prompts.mtl, "prompt_format": prompts.prompt_format,
                "max_prompt_tokens": prompts.max_prompt_tokens, "fallback_score": fallback, "baselines_json": baselines_path}
    plan = SamplingPlan(info, records, fallback, prompts, prompt_source,
                        baselines_path, out_dir, resolved, own_bank_name(dist.rank(), dist.world_size()))
    if args.resume:
        plan.saved = read_json(out_dir / CONFIG)
        before = plan.saved.get("args", {})
        used = {k: before.get(k, LATER_SAMPLING_DEFAULTS.get(k)) for k in SAMPLING_KEYS}
        diffs = [k for k in SAMPLING_KEYS if used[k] != resolved[k]]
        if diffs:
            raise UsageError(f"{out_dir}: cannot resume with different sampling settings: " + "; ".join(
                f"{k} {resolved[k]!r} (run used {used[k]!r})" for k in diffs))
        plan.done = sampled_ids(out_dir, records, info, plan.own_bank)
    return plan
