"""Scoring new essays with a trained run (``main_pipeline.py --score_path FILE --adapter_dir RUN``):
every check of the input before a model loads, the new run folder and its manifest, and the
confidence attached to each row under the run's calibration."""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

from modules.calibrate import SCORE_MAP, load_score_map
from modules.probe_run import load_probe
from modules.runs import (MANIFEST, PromptSettings, RunDirError, create_run_dir, occupied_dir_error, provenance,
                          uncreatable_dir_error)

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger(__name__)


@dataclass
class ScoringJob:
    """What scoring with --score_path has checked before it loads the adapter."""
    info: object  # the DatasetInfo of the essays, whose rubrics are the adapter's
    records: list
    data_dir: str  # where dataset.json was read
    settings: PromptSettings  # the adapter's training prompts
    calibration: dict | None  # the adapter's confidence_calibration.json, when training wrote one
    out_dir: Path | None  # --output_dir, else None (a new runs/<adapter>_scored_<time>)
    score_map: dict | None = None  # the run's score_map.json (modules/calibrate.py), when it has one
    stack_probe: object = None  # the probe that map stacks with, loaded


def plan_scoring(args: argparse.Namespace) -> ScoringJob:
    """Every check of a scoring run's input, before any model loads; DataError as one line."""
    from modules.data import load_split
    from modules.jsonio import DataError, read_json

    adapter = Path(args.adapter_dir)
    if not adapter.is_dir():
        raise DataError(f"--adapter_dir {adapter}: adapter folder not found")
    settings = PromptSettings.from_run(adapter)
    manifest_path = adapter / MANIFEST
    manifest = read_json(manifest_path)
    data_dir, info = scoring_schema(args, manifest, manifest_path)
    records = load_split(args.score_path, info, scores_optional=True)
    out_dir = Path(args.output_dir) if args.output_dir else None
    error = out_dir and (occupied_dir_error(out_dir, "output folder", "scoring writes a new run folder")
                         or uncreatable_dir_error(out_dir))
    if error:
        raise DataError(error)
    score_map = load_score_map(adapter)
    if score_map is not None and args.no_weighted:
        raise DataError(f"{adapter / SCORE_MAP}: the run's final scores map the weighted expectation; drop --no_weighted")
    probe = load_probe(score_map["probe_run"]) if score_map and "probe" in score_map["fit"].names else None
    return ScoringJob(info, records[: args.test_limit] if args.test_limit else records, data_dir, settings,
                      read_calibration(args, adapter, info), out_dir, score_map, probe)


def mapped_rows(job: ScoringJob, model, tokenizer, records: list, rows: list[dict] | None) -> list[dict] | None:
    """The rows with the run's final scores when it has a score map (rank 0; None stays None)."""
    if job.score_map is None or rows is None:
        return rows
    from modules.calibrate import map_rows

    return map_rows(job.score_map["fit"], rows, records, job.info, model=model, tokenizer=tokenizer,
                    probe=job.stack_probe)


def scoring_schema(args: argparse.Namespace, manifest: dict, manifest_path: Path):
    """(folder, DatasetInfo) of the essays to score: dataset.json in --data_dir, else in the
    adapter's training data folder (its run manifest), else beside --score_path. Its rubrics must
    be the ones the adapter was trained to score, in the same order."""
    from modules.data import load_dataset_info
    from modules.jsonio import DataError

    trained_on = (manifest.get("config") or {}).get("data_dir")
    if args.data_dir:
        data_dir = args.data_dir
    elif trained_on and (Path(trained_on) / "dataset.json").is_file():
        data_dir = trained_on
    else:
        data_dir = str(Path(args.score_path).parent)
    info = load_dataset_info(data_dir)
    rubrics = manifest.get("rubrics")
    if rubrics and info.rubric_names != rubrics:
        raise DataError(f"{Path(data_dir) / 'dataset.json'}: rubrics {info.rubric_names} are not the ones the adapter "
                        f"was trained to score, {rubrics} ({manifest_path})")
    return data_dir, info


def read_calibration(args: argparse.Namespace, adapter: Path, info) -> dict | None:
    """The adapter's confidence calibration (chosen on its validation essays), None without one;
    DataError when it cannot judge these predictions."""
    from modules.confidence import SAMPLE_SIGNALS
    from modules.evaluation import CONFIDENCE_CALIBRATION
    from modules.jsonio import DataError, read_json

    path = adapter / CONFIDENCE_CALIBRATION
    if not path.is_file():
        return None
    calibration = read_json(path)
    if calibration.get("rubrics") != info.rubric_names:
        raise DataError(f"{path}: field 'rubrics': {calibration.get('rubrics')} are not {info.rubric_names}")
    if calibration.get("signal") in SAMPLE_SIGNALS:
        raise DataError(f"{path}: field 'signal': {calibration['signal']!r} needs a sample bank; scoring has none")
    if calibration.get("prediction") in ("weighted", "final") and args.no_weighted:
        logger.warning("--no_weighted: %s judges the weighted prediction, so these rows get no score sets or review "
                       "flags", path)
        return None
    return calibration


def new_scoring_dir(args: argparse.Namespace, job: ScoringJob) -> tuple[Path | None, str | None]:
    """Rank 0: create the scoring run's folder, --output_dir or a new runs/<adapter>_scored_<time>."""
    try:
        prefix = f"{Path(args.adapter_dir).resolve().name}_scored"
        return create_run_dir(job.out_dir, ROOT / "runs", prefix), None
    except RunDirError as err:
        return None, str(err)


def scoring_manifest(args: argparse.Namespace, job: ScoringJob, run_dir: Path, model) -> dict:
    """The scoring run's manifest: how it was made, the adapter, the essays, the prompt settings
    it took from the adapter's run, and whether a confidence calibration applied."""
    from modules import dist
    from modules.jsonio import write_json_atomic

    param = next(model.parameters())
    manifest = {**provenance(), "mode": "score", "config": vars(args), "run_dir": str(run_dir),
                "adapter_dir": str(Path(args.adapter_dir).resolve()), "score_path": str(Path(args.score_path).resolve()),
                "data_dir": str(Path(job.data_dir).resolve()), "device": str(param.device), "dtype": str(param.dtype),
                "world_size": dist.world_size(), "rubrics": job.info.rubric_names,
                "prompt_settings": job.settings.as_dict(),
                "n_essays": len(job.records), "n_with_gold": sum(r.scores is not None for r in job.records),
                "confidence_calibration": job.calibration is not None,
                "confidence_signal": job.calibration["signal"] if job.calibration else None,
                "score_map": {k: v for k, v in job.score_map.items() if k != "fit"} if job.score_map else None}
    if dist.is_main():
        write_json_atomic(run_dir / MANIFEST, manifest)
    return manifest


def confidence_rows(rows: list[dict], job: ScoringJob) -> tuple[list[dict], None]:
    """The prediction rows with their confidence: under the adapter's calibration also the
    conformal score sets and the review flag; without one, the signals alone."""
    from modules.confidence import attach_confidence
    from modules.confidence_report import apply_calibration

    essays = [r.essay for r in job.records]
    if job.calibration is not None:
        return apply_calibration(rows, job.calibration, essays=essays), None
    logger.info("the adapter has no confidence calibration: confidence signals without score sets or review flags")
    return attach_confidence(rows, job.info.rubric_names, job.info.ranges, essays=essays), None
