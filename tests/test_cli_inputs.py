"""Broken (and merely unusual) inputs against both CLIs and the converter, run as a user runs them.

One table, one row per input. Each row runs the real command line in a subprocess and checks:

* a broken input: exit 2, exactly one stderr line, ``error: ...`` naming the problem (the file,
  line and field, or the flag), no traceback, and no partial output (the folders the run would
  write do not appear, existing ones are unchanged);
* an unusual but valid input (a BOM, CRLF line endings, a Korean essay, a 50,000-character
  essay, a cp1252 table, a killed training run): exit 0 and the result it should give.

The subprocesses start in a small thread pool (each spends most of its time importing torch), and
only the rows pytest selected are run. ``AES_CLI_CASES_REPORT=path`` writes every row's exit code
and stderr line to ``path``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

import pytest

from conftest import cli_env
from modules.score_lines import score_line

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "aes_dataset_mtl"
SCRIPTS = {"main": [str(ROOT / "main_pipeline.py")], "sc": [str(ROOT / "self_consistency.py")],
           "convert": ["-m", "modules.convert"]}
TRAIN_FLAGS = ["--base_model_name", "tiny-random-llama", "--mtl", "--per_device_train_batch_size", "2",
               "--gradient_accumulation_steps", "1", "--logging_steps", "1", "--eval_steps", "2",
               "--max_seq_length", "384", "--no_wandb"]
KOREAN = ("학교 교복은 학생들 사이의 차별을 줄이고 소속감을 높인다고 생각합니다. 하지만 개성을 표현할 자유도 중요합니다. "
          "그래서 나는 일주일에 한 번은 자유 복장을 허용해야 한다고 주장합니다. ") * 3
LONG_ESSAY = ("The bus was late again, so I walked to school and thought about patience. " * 700)[:50_000]


class Fixtures:
    """The inputs of the table, each built on first use (a converter row needs no trained run)."""

    def __init__(self, root: Path):
        self.root = root

    def path(self, name: str) -> Path:
        """A fresh path under the session's folder for one row's outputs (nothing there yet)."""
        return self.root / "out" / name

    def folder(self, name: str, *files: str) -> Path:
        """An existing folder under ``path(name)``, holding ``files`` (each with a line of text)."""
        folder = self.path(name)
        folder.mkdir(parents=True)
        for file in files:
            (folder / file).write_text("mine\n")
        return folder

    @cached_property
    def data(self) -> Path:
        """The shipped dataset cut to 8/4/4 essays."""
        folder = self.root / "data"
        folder.mkdir()
        shutil.copy(DATA / "dataset.json", folder / "dataset.json")
        for split, n in (("train", 8), ("valid", 4), ("test", 4)):
            lines = (DATA / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()[:n]
            (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        return folder

    def variant(self, name: str, edit: Callable[[Path], object]) -> Path:
        """A copy of ``data`` changed by ``edit(folder)``."""
        folder = self.root / "variants" / name
        shutil.copytree(self.data, folder)
        edit(folder)
        return folder

    def lines(self, folder: Path, split: str) -> list[str]:
        return (folder / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()

    def set_record(self, folder: Path, split: str, index: int, change: Callable[[dict], object]) -> None:
        lines = self.lines(folder, split)
        record = json.loads(lines[index])
        change(record)
        lines[index] = json.dumps(record, ensure_ascii=False)
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")

    def set_line(self, folder: Path, split: str, index: int, raw: bytes) -> None:
        lines = (folder / f"{split}.jsonl").read_bytes().splitlines()
        lines[index] = raw
        (folder / f"{split}.jsonl").write_bytes(b"\n".join(lines) + b"\n")

    @cached_property
    def negative_min(self) -> tuple[Path, int]:
        """dataset.json whose first rubric has min -1, and the line of that min."""
        def edit(folder: Path) -> None:
            text = (folder / "dataset.json").read_text(encoding="utf-8")
            (folder / "dataset.json").write_text(text.replace('"min": 1,', '"min": -1,', 1), encoding="utf-8")

        folder = self.variant("negative_min", edit)
        text = (folder / "dataset.json").read_text(encoding="utf-8")
        return folder, text[:text.index('"min": -1')].count("\n") + 1

    @cached_property
    def not_utf8(self) -> tuple[Path, int]:
        """train.jsonl with a cp1252 byte on line 3, and its column."""
        folder = self.variant("not_utf8", lambda f: None)
        raw = (folder / "train.jsonl").read_bytes().splitlines()[2]
        at = raw.index(b"essay") + 12
        self.set_line(folder, "train", 2, raw[:at] + b"\xff" + raw[at:])
        return folder, len(raw[:at].decode("utf-8")) + 1

    @cached_property
    def bom_crlf(self) -> Path:
        def edit(folder: Path) -> None:
            for name in ("dataset.json", "train.jsonl", "valid.jsonl", "test.jsonl"):
                data = (folder / name).read_bytes().replace(b"\n", b"\r\n")
                (folder / name).write_bytes(b"\xef\xbb\xbf" + data)

        return self.variant("bom_crlf", edit)

    @cached_property
    def adapter(self) -> Path:
        """A LoRA adapter on tiny-random-llama with the run manifest main_pipeline writes."""
        from modules.models import add_lora, load_base_model

        folder = self.root / "adapter"
        model, _ = load_base_model("tiny-random-llama")
        add_lora(model, r=2, alpha=4, dropout=0.0).save_pretrained(folder)
        (folder / "run_manifest.json").write_text(json.dumps(
            {"config": {"mtl": False, "prompt_format": "chat", "base_model_name": "tiny-random-llama"}}))
        return folder

    def sc_flags(self, test_path: Path, *extra: str) -> list[str]:
        return ["--adapter_dir", str(self.adapter), "--base_model_name", "tiny-random-llama", "--test_path",
                str(test_path), "--max_m", "4", "--chunk_m", "2", *extra]

    def bank(self, name: str, scores: Callable[[list[int], int], list[int] | None] | None,
             lines: list[str] | None = None, gold: Callable[[list[int]], list[int]] = list) -> Path:
        """A sample bank for data/test.jsonl in its own folder: ``scores(gold, j)`` gives sample j and
        ``gold(gold)`` the gold it records; or the bank's ``lines`` as given."""
        folder = self.root / "banks" / name
        folder.mkdir(parents=True)
        names = [r["name"] for r in json.loads((self.data / "dataset.json").read_text())["rubrics"]]
        rows = []
        for line in self.lines(self.data, "test") if lines is None else []:
            record = json.loads(line)
            true = [record["scores"][n] for n in names]
            drawn = [scores(true, j) for j in range(4)]  # each sample's text is what its scores say
            samples = [{"text": "no score" if d is None else score_line(d), "scores": d} for d in drawn]
            rows.append(json.dumps({"id": record["id"], "gold": gold(true), "samples": samples,
                                    "invalid": sum(s["scores"] is None for s in samples)}))
        (folder / "samples.jsonl").write_text("\n".join(lines if lines is not None else rows) + "\n")
        return folder / "samples.jsonl"

    @cached_property
    def good_rows(self) -> list[str]:
        return self.bank("good", lambda gold, j: gold).read_text().splitlines()

    @cached_property
    def sc_resumable(self) -> Path:
        """A self-consistency run folder whose run_config.json says it sampled at temperature 0.9."""
        folder = self.root / "sc_run"
        folder.mkdir()
        args = {"adapter_dir": str(self.adapter.resolve()), "base_model_name": "tiny-random-llama",
                "test_path": str((self.data / "test.jsonl").resolve()), "max_m": 4, "chunk_m": 2,
                "temperature": 0.9, "top_k": 9, "top_p": None, "max_new_tokens": 16, "seed": 42, "sampler": "trie",
                "mtl": False, "prompt_format": "chat"}
        (folder / "run_config.json").write_text(json.dumps({"args": args}))
        return folder

    @cached_property
    def killed(self) -> Path:
        """A real training run killed after its first checkpoint (a second may be cut off mid-save)."""
        run_dir = self.root / "killed"
        cmd = [sys.executable, *SCRIPTS["main"], *TRAIN_FLAGS, "--data_dir", str(self.data),
               "--output_dir", str(run_dir), "--max_steps", "400"]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=cli_env(**ROW_ENV), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300  # a bound on the wait, not a speed assertion
        while not (run_dir / "checkpoint-2" / "trainer_state.json").is_file() and proc.poll() is None:
            assert time.monotonic() < deadline, "the training run wrote no checkpoint"
            time.sleep(0.05)
        proc.kill()
        proc.wait()
        assert (run_dir / "run_manifest.json").is_file() and not (run_dir / "adapter_model.safetensors").exists()
        return run_dir

    @cached_property
    def killed_step(self) -> int:
        from main_pipeline import newest_checkpoint

        return int(newest_checkpoint(self.killed).name.split("-")[1])

    def killed_copy(self, name: str) -> Path:
        target = self.root / "killed_copies" / name
        shutil.copytree(self.killed, target)
        return target

    def resume_flags(self, run_dir: Path, *extra: str) -> list[str]:
        return [*TRAIN_FLAGS, "--data_dir", str(self.data), "--resume_checkpoint", str(run_dir), *extra]

    def csv(self, name: str, text: str | bytes) -> Path:
        path = self.root / "tables" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
        return path

    @cached_property
    def table(self) -> Path:
        rows = "".join(f'"Essay {i}: I waited for the bus and learned patience.",{1 + i % 6}\n' for i in range(20))
        return self.csv("scores.csv", "text,score\n" + rows)


# Each row's process on one thread, as several run side by side on a small machine.
ROW_ENV = {"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


@dataclass
class Case:
    id: str
    cli: str  # main | sc | convert
    argv: Callable[[Fixtures], list[str]]
    error: Callable[[Fixtures], list[str]] | None  # substrings of the one error line; None: accepted
    watch: Callable[[Fixtures], list[Path]] = lambda fx: []  # must not appear, or stay unchanged
    check: Callable[[Fixtures, subprocess.CompletedProcess], None] | None = None  # accepted rows
    env: dict[str, str] = field(default_factory=dict)


def out(fx: Fixtures, case_id: str) -> list[Path]:
    return [fx.path(case_id)]


def main_err(case_id: str, edit: Callable[[Fixtures], Path], *expected: Callable[[Fixtures, Path], str] | str) -> Case:
    """A main_pipeline.py row with a broken data folder: a real run (no --dry_run), into a fresh
    --output_dir that must not appear."""
    memo: dict[str, Path] = {}

    def folder(fx: Fixtures) -> Path:
        if "d" not in memo:
            memo["d"] = edit(fx)
        return memo["d"]

    return Case(case_id, "main",
                lambda fx: [*TRAIN_FLAGS, "--data_dir", str(folder(fx)), "--output_dir", str(fx.path(case_id))],
                lambda fx: [e if isinstance(e, str) else e(fx, folder(fx)) for e in expected],
                lambda fx: [fx.path(case_id), folder(fx)])


def score_case(case_id: str, expected: Callable[[Fixtures], list[str]], *,
               adapter: Callable[[Fixtures], Path] = lambda fx: fx.adapter,
               score: Callable[[Fixtures], Path] = lambda fx: fx.data / "test.jsonl",
               output: Callable[[Fixtures], Path] | None = None,
               extra: Callable[[Fixtures], list[str]] = lambda fx: []) -> Case:
    """A main_pipeline.py --score_path row: the adapter and the output folder must stay unchanged
    (the output folder: not appear)."""
    def out_dir(fx: Fixtures) -> Path:
        return output(fx) if output else fx.path(case_id)

    return Case(case_id, "main",
                lambda fx: ["--base_model_name", "tiny-random-llama", "--adapter_dir", str(adapter(fx)),
                            "--score_path", str(score(fx)), "--output_dir", str(out_dir(fx)), *extra(fx)],
                expected, lambda fx: [fx.path(case_id), adapter(fx)])


def convert_case(case_id: str, expected: Callable[[Fixtures], list[str]],
                 table: Callable[[Fixtures], Path] = lambda fx: fx.table, **flags: str) -> Case:
    """A `modules.convert csv` row on the 20-essay table (text, score 1-6), with ``flags`` changed;
    flags are passed as --flag=value, so a value may start with '-'."""
    flags = {"text_col": "text", "score_cols": "score", "ranges": "1-6", **flags}
    return Case(case_id, "convert",
                lambda fx: ["csv", str(table(fx)), "--out_dir", str(fx.path(case_id)),
                            *(f"--{k}={v}" for k, v in flags.items())],
                expected, lambda fx: [fx.path(case_id)])


def dry_run_ok(result: subprocess.CompletedProcess, max_width: int = 384) -> tuple[int, int]:
    """The dry run's batch shape, after checking every loss term is a finite number."""
    line = next(line for line in result.stdout.splitlines() if line.startswith("dry run:"))
    batch, width = map(int, re.search(r"batch \((\d+), (\d+)\)", line).groups())
    terms = dict(re.findall(r"(\w+)=([-\d.naif]+)", line))
    assert set(terms) >= {"loss_ce", "loss_ntl", "loss_emo", "loss_total"}, line
    assert all(re.fullmatch(r"-?\d+\.\d+", v) for v in terms.values()), line  # no nan / inf
    assert width <= max_width
    return batch, width


def check_resumed(fx: Fixtures, result: subprocess.CompletedProcess, run_dir: Path, forced: dict) -> None:
    step = fx.killed_step
    assert f"resuming from {run_dir / f'checkpoint-{step}'} (global step {step})" in result.stdout
    manifest = json.loads((run_dir / "run_manifest.json").read_text())
    assert manifest["train"]["global_step"] == step + 2
    assert manifest["resumes"][-1]["forced"] == forced and len(manifest["resumes"]) == 1
    assert (run_dir / "evaluation_results.json").is_file() and (run_dir / "adapter_model.safetensors").is_file()


def check_converted(out_dir: Path, essay_part: str, encoding: str):
    def check(fx: Fixtures, result: subprocess.CompletedProcess) -> None:
        from modules.data import load_splits

        assert f"({encoding})" in result.stdout
        _, splits = load_splits(out_dir)
        essays = [r.essay for records in splits.values() for r in records]
        assert len(essays) == 20 and any(essay_part in e for e in essays)
        assert not any("\r" in e or "\ufeff" in e for e in essays)

    return check


CASES: list[Case] = [
    # ------------------------------------------------------------ main_pipeline.py: the cases
    Case("main_unknown_base_model", "main",
         lambda fx: ["--base_model_name", "no-such-org/no-such-model", "--data_dir", str(fx.data), "--no_wandb",
                     "--output_dir", str(fx.path("main_unknown_base_model"))],
         lambda fx: ["Cannot load model 'no-such-org/no-such-model'", "tiny-random-llama, smollm2-135m"],
         lambda fx: out(fx, "main_unknown_base_model")),
    Case("main_resume_without_checkpoint", "main",
         lambda fx: fx.resume_flags(fx.folder("empty_run")),
         lambda fx: [f"{fx.path('empty_run')}: no complete checkpoint-* folder to resume from"],
         lambda fx: [fx.path("empty_run")]),
    main_err("main_rubric_min_negative", lambda fx: fx.negative_min[0],
             lambda fx, d: f"{d / 'dataset.json'}:{fx.negative_min[1]}: field 'rubrics[0].min': -1 is negative"),
    main_err("main_prompt_id_not_in_dataset_json",
             lambda fx: fx.variant("prompt_id", lambda d: fx.set_record(d, "train", 1, lambda r: r.update(prompt_id="no_such_prompt"))),
             lambda fx, d: f"{d / 'train.jsonl'}:2: field 'prompt_id': 'no_such_prompt' is not a prompt id of dataset.json"),
    main_err("main_not_utf8", lambda fx: fx.not_utf8[0],
             lambda fx, d: f"{d / 'train.jsonl'}:3: byte 0xff at column {fx.not_utf8[1]} is not UTF-8"),
    Case("main_device_id_of_absent_gpu", "main",
         lambda fx: [*TRAIN_FLAGS, "--data_dir", str(fx.data), "--device_id", "99",
                     "--output_dir", str(fx.path("main_device_id_of_absent_gpu"))],
         lambda fx: ["--device_id 99: ", "; use --device_id cpu to run on the CPU"],
         lambda fx: out(fx, "main_device_id_of_absent_gpu")),
    Case("main_device_id_with_every_gpu_hidden", "main",
         lambda fx: [*TRAIN_FLAGS, "--data_dir", str(fx.data), "--device_id", "0",
                     "--output_dir", str(fx.path("main_device_id_with_every_gpu_hidden"))],
         lambda fx: ["--device_id 0: ", "; use --device_id cpu to run on the CPU"],
         lambda fx: out(fx, "main_device_id_with_every_gpu_hidden"), env={"CUDA_VISIBLE_DEVICES": ""}),
    Case("main_resume_with_other_learning_rate", "main",
         lambda fx: fx.resume_flags(fx.killed, "--learning_rate", "1e-3", "--max_steps", "6"),
         lambda fx: [f"{fx.killed}: cannot resume with different flags: --learning_rate 0.001 (run used 0.0003); "
                     "use the run's values, or --force_resume to continue anyway"],
         lambda fx: [fx.killed]),
    Case("main_resume_with_other_data_dir", "main",
         lambda fx: [*fx.resume_flags(fx.killed), "--data_dir", str(fx.variant("same_data", lambda d: None))],
         lambda fx: [f"--data_dir '{fx.root / 'variants' / 'same_data'}' (run used '{fx.data}')"],
         lambda fx: [fx.killed]),
    # ------------------------------------------------------------ main_pipeline.py: more broken inputs
    Case("main_resume_of_missing_folder", "main", lambda fx: fx.resume_flags(fx.path("no_run")),
         lambda fx: [f"--resume_checkpoint {fx.path('no_run')}: run folder not found"],
         lambda fx: [fx.path("no_run")]),
    Case("main_resume_only_cut_off_checkpoint", "main",
         lambda fx: fx.resume_flags(cut_off_run(fx)),
         lambda fx: [f"{fx.path('cut_off')}: no complete checkpoint-* folder to resume from (checkpoint-3: no "
                     "trainer_state.json, cut off while saving)"],
         lambda fx: [fx.path("cut_off")]),
    Case("main_resume_with_two_other_flags", "main",
         lambda fx: [a for a in fx.resume_flags(fx.killed, "--lora_r", "8") if a != "--mtl"],
         lambda fx: ["cannot resume with different flags: --mtl False (run used True); --lora_r 8 (run used 16)"],
         lambda fx: [fx.killed]),
    main_err("main_rubrics_disagree_with_records",
             lambda fx: fx.variant("renamed_rubric", lambda d: (d / "dataset.json").write_text(
                 (d / "dataset.json").read_text().replace('"name": "task"', '"name": "task_fulfilment"'))),
             lambda fx, d: f"{d / 'train.jsonl'}:1: field 'scores.task': unknown rubric"),
    main_err("main_score_outside_rubric",
             lambda fx: fx.variant("score_12", lambda d: fx.set_record(d, "valid", 2, lambda r: r["scores"].update(task=12))),
             lambda fx, d: f"{d / 'valid.jsonl'}:3: field 'scores.task': score 12 outside 1-9"),
    main_err("main_invalid_json_line",
             lambda fx: fx.variant("bad_json", lambda d: fx.set_line(d, "train", 2, b'{"id": "x", "essay": ')),
             lambda fx, d: f"{d / 'train.jsonl'}:3: invalid JSON"),
    main_err("main_dataset_json_cut_short",
             lambda fx: fx.variant("short_meta", lambda d: (d / "dataset.json").write_text(
                 (d / "dataset.json").read_text()[:500])),
             lambda fx, d: f"{d / 'dataset.json'}:", "invalid JSON"),
    main_err("main_empty_split",
             lambda fx: fx.variant("empty_valid", lambda d: (d / "valid.jsonl").write_text("\n")),
             lambda fx, d: f"{d / 'valid.jsonl'}: empty split (no records)"),
    main_err("main_duplicate_id",
             lambda fx: fx.variant("dup_id", lambda d: fx.set_line(d, "test", 3, (d / "test.jsonl").read_bytes().splitlines()[0])),
             lambda fx, d: f"{d / 'test.jsonl'}:4: field 'id': duplicate id"),
    main_err("main_missing_essay",
             lambda fx: fx.variant("no_essay", lambda d: fx.set_record(d, "train", 0, lambda r: r.pop("essay"))),
             lambda fx, d: f"{d / 'train.jsonl'}:1: field 'essay': missing"),
    Case("main_missing_data_dir", "main",
         lambda fx: [*TRAIN_FLAGS, "--data_dir", str(fx.path("no_data")), "--output_dir", str(fx.path("main_missing_data_dir"))],
         lambda fx: [f"{fx.path('no_data')}: data folder not found"], lambda fx: out(fx, "main_missing_data_dir")),
    Case("main_output_dir_not_empty", "main",
         lambda fx: [*TRAIN_FLAGS, "--data_dir", str(fx.data), "--output_dir", str(fx.folder("full", "notes.txt"))],
         lambda fx: [f"{fx.path('full')}: run folder exists and is not empty"], lambda fx: [fx.path("full")]),
    Case("main_load_in_4bit_on_cpu", "main",
         lambda fx: [*TRAIN_FLAGS, "--data_dir", str(fx.data), "--load_in_4bit", "--device_id", "cpu",
                     "--output_dir", str(fx.path("main_load_in_4bit_on_cpu"))],
         lambda fx: ["--load_in_4bit needs a CUDA GPU (bitsandbytes QLoRA); drop the flag on CPU"],
         lambda fx: out(fx, "main_load_in_4bit_on_cpu")),
    Case("main_device_id_not_a_device", "main",
         lambda fx: [*TRAIN_FLAGS, "--data_dir", str(fx.data), "--device_id", "banana"],
         lambda fx: ["--device_id banana: not a GPU index (0, 1, ...), cuda:N or cpu"]),
    Case("main_emo_topk_zero", "main", lambda fx: [*TRAIN_FLAGS, "--emo_topk", "0"],
         lambda fx: ["--emo_topk must be >= 1, got 0 (see main_pipeline.py --help)"]),
    Case("main_review_fraction_one", "main", lambda fx: [*TRAIN_FLAGS, "--review_fraction", "1"],
         lambda fx: ["--review_fraction must be in [0, 1), got 1.0 (see main_pipeline.py --help)"]),
    Case("main_review_both_targets", "main",
         lambda fx: [*TRAIN_FLAGS, "--review_fraction", "0.1", "--review_min_qwk", "0.8"],
         lambda fx: ["give --review_fraction or --review_min_qwk, not both (see main_pipeline.py --help)"]),
    Case("main_conformal_coverage_one", "main", lambda fx: [*TRAIN_FLAGS, "--conformal_coverage", "1"],
         lambda fx: ["--conformal_coverage must be in (0, 1), got 1.0 (see main_pipeline.py --help)"]),
    Case("main_force_resume_alone", "main", lambda fx: [*TRAIN_FLAGS, "--force_resume"],
         lambda fx: ["--force_resume goes with --resume_checkpoint"]),
    Case("main_no_base_model", "main", lambda fx: ["--mtl"],
         lambda fx: ["the following arguments are required: --base_model_name"]),
    # ------------------------------------------------------------ main_pipeline.py --dry_run refuses what the run does
    # (more: the --dry_run twins of the rows named in DRY_RUN_TWINS, added below the table)
    Case("main_dry_run_output_dir_not_empty", "main",
         lambda fx: [*TRAIN_FLAGS, "--data_dir", str(fx.data), "--dry_run",
                     "--output_dir", str(fx.folder("dry_full", "notes.txt"))],
         lambda fx: [f"{fx.path('dry_full')}: run folder exists and is not empty"], lambda fx: [fx.path("dry_full")]),
    Case("main_output_dir_under_a_file", "main",
         lambda fx: [*TRAIN_FLAGS, "--data_dir", str(fx.data), "--output_dir",
                     str(fx.folder("file_parent", "f.txt") / "f.txt" / "run")],
         lambda fx: [f"{fx.path('file_parent') / 'f.txt' / 'run'}: cannot create the run folder (Not a directory)"],
         lambda fx: [fx.path("file_parent")]),
    Case("main_dry_run_output_dir_under_a_file", "main",
         lambda fx: [*TRAIN_FLAGS, "--data_dir", str(fx.data), "--dry_run", "--output_dir",
                     str(fx.folder("dry_file_parent", "f.txt") / "f.txt" / "run")],
         lambda fx: [f"{fx.path('dry_file_parent') / 'f.txt' / 'run'}: cannot create the run folder (Not a directory)"],
         lambda fx: [fx.path("dry_file_parent")]),
    main_err("main_valid_feedback_too_long", lambda fx: long_valid_feedback(fx),
             lambda fx, d: f"{first_id(d, 'valid')}: the prompt without its essay takes more than"),
    # ------------------------------------------------------------ main_pipeline.py --score_path: essays without gold
    score_case("main_score_adapter_dir_missing", lambda fx: [f"--adapter_dir {fx.path('no_adapter')}: adapter folder "
                                                             "not found"], adapter=lambda fx: fx.path("no_adapter")),
    score_case("main_score_adapter_without_manifest",
               lambda fx: [f"{fx.root / 'bare_adapter'}: no run_manifest.json, so the prompts its adapter was "
                           "trained on are unknown"], adapter=lambda fx: bare_adapter(fx)),
    score_case("main_score_path_missing", lambda fx: [f"{fx.data / 'nope.jsonl'}: file not found"],
               score=lambda fx: fx.data / "nope.jsonl"),
    score_case("main_score_present_but_invalid_scores",
               lambda fx: [f"{fx.root / 'variants' / 'half_graded' / 'test.jsonl'}:3: field 'scores.task': "
                           "score 12 outside 1-9"], score=lambda fx: half_graded(fx, task_of_third=12) / "test.jsonl"),
    score_case("main_score_output_dir_not_empty", lambda fx: [f"{fx.path('score_full')}: output folder exists and is "
                                                              "not empty"],
               output=lambda fx: fx.folder("score_full", "notes.txt")),
    score_case("main_score_with_resume_checkpoint",
               lambda fx: ["--resume_checkpoint is a training flag; scoring with --score_path takes the adapter's "
                           "settings from its run_manifest.json"], extra=lambda fx: ["--resume_checkpoint",
                                                                             str(fx.path("a_run"))]),
    score_case("main_score_with_mtl", lambda fx: ["--mtl is a training flag"], extra=lambda fx: ["--mtl"]),
    Case("main_score_without_adapter_dir", "main",
         lambda fx: ["--base_model_name", "tiny-random-llama", "--score_path", str(fx.data / "test.jsonl")],
         lambda fx: ["--score_path needs --adapter_dir"]),
    Case("main_adapter_dir_without_score_path", "main", lambda fx: [*TRAIN_FLAGS, "--adapter_dir", str(fx.adapter)],
         lambda fx: ["--adapter_dir goes with --score_path"]),
    main_err("main_training_split_without_scores",
             lambda fx: fx.variant("no_scores", lambda d: fx.set_record(d, "train", 1, lambda r: r.pop("scores"))),
             lambda fx, d: f"{d / 'train.jsonl'}:2: field 'scores': missing"),
    # ------------------------------------------------------------ main_pipeline.py: unusual, valid
    Case("main_bom_and_crlf_accepted", "main",
         lambda fx: [*TRAIN_FLAGS, "--data_dir", str(fx.bom_crlf), "--dry_run", "--output_dir", str(fx.path("bom"))],
         None, lambda fx: [fx.path("bom")], check=lambda fx, r: dry_run_ok(r)),
    Case("main_korean_essay_accepted", "main",
         lambda fx: [*TRAIN_FLAGS, "--dry_run", "--data_dir", str(fx.variant("korean", lambda d: fx.set_record(
             d, "train", 0, lambda rec: rec.update(essay=KOREAN))))],
         None, check=lambda fx, r: dry_run_ok(r)),
    Case("main_50000_character_essay_accepted", "main",
         lambda fx: [*TRAIN_FLAGS, "--dry_run", "--data_dir", str(fx.variant("long", lambda d: fx.set_record(
             d, "train", 0, lambda rec: rec.update(essay=LONG_ESSAY))))],
         None, check=lambda fx, r: check_long_essay(dry_run_ok(r))),
    Case("main_killed_run_resumes", "main",
         lambda fx: fx.resume_flags(fx.killed_copy("resume"), "--max_steps", str(fx.killed_step + 2), "--test_limit",
                                    "1", "--no_weighted"),
         None, check=lambda fx, r: check_resumed(fx, r, fx.root / "killed_copies" / "resume", {})),
    Case("main_force_resume_records_the_difference", "main",
         lambda fx: fx.resume_flags(fx.killed_copy("forced"), "--max_steps", str(fx.killed_step + 2), "--test_limit",
                                    "1", "--no_weighted", "--learning_rate", "1e-3", "--force_resume"),
         None, check=lambda fx, r: check_resumed(fx, r, fx.root / "killed_copies" / "forced",
                                                  {"learning_rate": {"run": 0.0003, "now": 0.001}})),
    # ------------------------------------------------------------ self_consistency.py
    Case("sc_unknown_base_model", "sc",
         lambda fx: ["run", *fx.sc_flags(fx.data / "test.jsonl", "--output_root", str(fx.path("sc_base"))),
                     "--base_model_name", "no-such-org/no-such-model"],
         lambda fx: [f"{fx.adapter}: adapter was trained on base model 'tiny-random-llama', not "
                     "'no-such-org/no-such-model'"], lambda fx: [fx.path("sc_base")]),
    Case("sc_adapter_dir_missing", "sc",
         lambda fx: ["run", *fx.sc_flags(fx.data / "test.jsonl", "--output_root", str(fx.path("sc_noad"))),
                     "--adapter_dir", str(fx.path("no_adapter"))],
         lambda fx: [f"{fx.path('no_adapter')}: not a LoRA adapter folder (no adapter_config.json)"],
         lambda fx: [fx.path("sc_noad")]),
    Case("sc_test_path_missing", "sc",
         lambda fx: ["run", *fx.sc_flags(fx.data / "nope.jsonl", "--output_root", str(fx.path("sc_notest")))],
         lambda fx: [f"{fx.data / 'nope.jsonl'}: file not found"], lambda fx: [fx.path("sc_notest")]),
    Case("sc_prompt_id_not_in_dataset_json", "sc",
         lambda fx: ["sample", *fx.sc_flags(fx.variant("sc_prompt", lambda d: fx.set_record(
             d, "test", 3, lambda r: r.update(prompt_id="elsewhere"))) / "test.jsonl",
             "--output_root", str(fx.path("sc_prompt")))],
         lambda fx: [f"{fx.root / 'variants' / 'sc_prompt' / 'test.jsonl'}:4: field 'prompt_id': 'elsewhere' is "
                     "not a prompt id of dataset.json"], lambda fx: [fx.path("sc_prompt")]),
    Case("sc_test_file_not_utf8", "sc",
         lambda fx: ["run", *fx.sc_flags(fx.variant("sc_utf8", lambda d: fx.set_line(
             d, "test", 1, b'{"id": "caf\xe9"}')) / "test.jsonl", "--output_root", str(fx.path("sc_utf8")))],
         lambda fx: [f"{fx.root / 'variants' / 'sc_utf8' / 'test.jsonl'}:2: byte 0xe9 at column 12 is not UTF-8"],
         lambda fx: [fx.path("sc_utf8")]),
    Case("sc_device_id_of_absent_gpu", "sc",
         lambda fx: ["run", *fx.sc_flags(fx.data / "test.jsonl", "--device_id", "99",
                                         "--output_root", str(fx.path("sc_gpu")))],
         lambda fx: ["--device_id 99: ", "; use --device_id cpu to run on the CPU"], lambda fx: [fx.path("sc_gpu")]),
    Case("sc_resume_with_other_temperature", "sc",
         lambda fx: ["sample", *fx.sc_flags(fx.data / "test.jsonl", "--resume", "--output_dir", str(fx.sc_resumable))],
         lambda fx: [f"{fx.sc_resumable}: cannot resume with different sampling settings: temperature 0.7 (run used 0.9)"],
         lambda fx: [fx.sc_resumable]),
    Case("sc_fallback_score_outside_rubric", "sc",
         lambda fx: ["run", *fx.sc_flags(fx.data / "test.jsonl", "--fallback_score", "99",
                                         "--output_root", str(fx.path("sc_fb")))],
         lambda fx: ["--fallback_score 99 is outside rubric 'task' range 1-9"], lambda fx: [fx.path("sc_fb")]),
    Case("sc_temperature_zero", "sc",
         lambda fx: ["run", "--adapter_dir", "a", "--base_model_name", "b", "--test_path", "t", "--temperature", "0"],
         lambda fx: ["--temperature must be > 0, got 0.0"]),
    Case("sc_analyze_bank_from_another_test_file", "sc",
         lambda fx: ["analyze", "--bank_path", str(fx.bank("other", lambda gold, j: gold)), "--test_path",
                     str(DATA / "test.jsonl")],
         lambda fx: [f"{fx.root / 'banks' / 'other' / 'samples.jsonl'}: essay ids do not match {DATA / 'test.jsonl'}: "
                     "56 essays missing"],
         lambda fx: [fx.root / "banks" / "other"]),
    Case("sc_analyze_bank_with_a_broken_line", "sc",
         lambda fx: ["analyze", "--bank_path", str(fx.bank("broken", None, lines=[fx.good_rows[0], '{"id": ',
                                                                              *fx.good_rows[2:]])),
                     "--test_path", str(fx.data / "test.jsonl")],
         lambda fx: [f"{fx.root / 'banks' / 'broken' / 'samples.jsonl'}:2: invalid JSON"],
         lambda fx: [fx.root / "banks" / "broken"]),
    Case("sc_analyze_bank_with_other_gold", "sc",
         lambda fx: ["analyze", "--bank_path", str(fx.bank("gold", lambda g, j: g, gold=lambda g: g[::-1])),
                     "--test_path", str(fx.data / "test.jsonl")],
         lambda fx: [f"{fx.root / 'banks' / 'gold' / 'samples.jsonl'}: essay ", "differs from"],
         lambda fx: [fx.root / "banks" / "gold"]),
    Case("sc_analyze_all_samples_invalid_accepted", "sc",
         lambda fx: ["analyze", "--bank_path", str(fx.bank("invalid", lambda gold, j: None)), "--test_path",
                     str(fx.data / "test.jsonl"), "--bootstrap", "10"],
         None, check=lambda fx, r: check_all_invalid(fx, r)),
    Case("sc_bom_crlf_korean_test_file_accepted", "sc",
         lambda fx: ["run", "--dry_run", *fx.sc_flags(korean_test_file(fx), "--output_root", str(fx.path("sc_ko")))],
         None, lambda fx: [fx.path("sc_ko")], check=lambda fx, r: assert_in(KOREAN.split(". ")[0], r.stdout)),
    # ------------------------------------------------------------ python -m modules.convert
    convert_case("convert_input_missing", lambda fx: [f"{fx.path('none.csv')}: file not found"],
                 table=lambda fx: fx.path("none.csv")),
    convert_case("convert_column_missing", lambda fx: [f"{fx.table}: missing column(s) 'body'"], text_col="body"),
    convert_case("convert_negative_range",
                 lambda fx: ["range -1-6 of column 'score': scores must be >= 0; shift the column to 0-7 first"],
                 ranges="-1-6"),
    convert_case("convert_score_outside_range",
                 lambda fx: [f"{fx.table}:7: row 6, column 'score': score 6 outside 1-5"], ranges="1-5"),
    convert_case("convert_ranges_not_lo_hi", lambda fx: ["argument --ranges: range '1..6' is not LO-HI (e.g. 1-6)"],
                 ranges="1..6"),
    Case("convert_out_dir_holds_a_dataset", "convert",
         lambda fx: ["csv", str(fx.table), "--out_dir", str(fx.data), "--text_col", "text",
                     "--score_cols", "score", "--ranges", "1-6"],
         lambda fx: [f"{fx.data}: already holds", "(pass --overwrite to replace them)"], lambda fx: [fx.data]),
    Case("convert_bom_crlf_korean_accepted", "convert",
         lambda fx: ["csv", str(fx.csv("ko.csv", b"\xef\xbb\xbf" + ("text,score\r\n" + "".join(
             f'"{KOREAN if i == 3 else f"Essay {i} about buses."}",{1 + i % 6}\r\n' for i in range(20))).encode())),
                     "--out_dir", str(fx.path("cv_ko")), "--text_col", "text", "--score_cols", "score", "--ranges", "1-6"],
         None, check=lambda fx, r: check_converted(fx.path("cv_ko"), KOREAN.split(". ")[0], "utf-8")(fx, r)),
    Case("convert_cp1252_table_accepted", "convert",
         lambda fx: ["csv", str(fx.csv("cp.csv", ("text,score\n" + "".join(
             f'"Essay {i}: the caf\u00e9\u2019s bus was late.",{1 + i % 6}\n' for i in range(20))).encode("cp1252"))),
                     "--out_dir", str(fx.path("cv_cp")), "--text_col", "text", "--score_cols", "score", "--ranges", "1-6"],
         None, check=lambda fx, r: check_converted(fx.path("cv_cp"), "caf\u00e9\u2019s", "cp1252")(fx, r)),
]


# Rows whose real run refuses an input before training; each gets a --dry_run twin that must refuse
# it with the same line and write nothing (their command lines can be built twice).
DRY_RUN_TWINS = ("main_unknown_base_model", "main_rubric_min_negative", "main_score_outside_rubric",
                 "main_missing_data_dir", "main_device_id_of_absent_gpu", "main_load_in_4bit_on_cpu",
                 "main_resume_of_missing_folder", "main_resume_with_other_learning_rate",
                 "main_valid_feedback_too_long")


def dry_run_twin(case: Case) -> Case:
    return Case(f"{case.id}_dry_run", case.cli, lambda fx: [*case.argv(fx), "--dry_run"], case.error, case.watch,
                env=case.env)


CASES += [dry_run_twin(case) for case in CASES if case.id in DRY_RUN_TWINS]


def long_valid_feedback(fx: Fixtures) -> Path:
    """A validation essay whose feedback alone is longer than --max_seq_length (384 tokens)."""
    return fx.variant("long_feedback", lambda d: fx.set_record(d, "valid", 0, lambda r: r.update(
        feedback="The essay states its position and supports it with two examples. " * 60)))


def first_id(folder: Path, split: str) -> str:
    return json.loads((folder / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()[0])["id"]


def bare_adapter(fx: Fixtures) -> Path:
    """A LoRA adapter folder without the run manifest main_pipeline writes."""
    folder = fx.root / "bare_adapter"
    if not folder.exists():
        shutil.copytree(fx.adapter, folder)
        (folder / "run_manifest.json").unlink()
    return folder


def half_graded(fx: Fixtures, task_of_third: int) -> Path:
    """The test split with its first essay's scores removed and the third's task score set."""
    def edit(folder: Path) -> None:
        fx.set_record(folder, "test", 0, lambda r: r.pop("scores"))
        fx.set_record(folder, "test", 2, lambda r: r["scores"].update(task=task_of_third))

    return fx.variant("half_graded", edit)


def cut_off_run(fx: Fixtures) -> Path:
    """A run folder whose only checkpoint was cut off before trainer_state.json (a kill mid-save)."""
    run_dir = fx.path("cut_off")
    shutil.copytree(fx.killed / "checkpoint-2", run_dir / "checkpoint-3")
    (run_dir / "checkpoint-3" / "trainer_state.json").unlink()
    shutil.copy(fx.killed / "run_manifest.json", run_dir / "run_manifest.json")
    return run_dir


def korean_test_file(fx: Fixtures) -> Path:
    def edit(folder: Path) -> None:
        fx.set_record(folder, "test", 0, lambda r: r.update(essay=KOREAN))
        data = (folder / "test.jsonl").read_bytes().replace(b"\n", b"\r\n")
        (folder / "test.jsonl").write_bytes(b"\xef\xbb\xbf" + data)

    return fx.variant("sc_korean", edit) / "test.jsonl"


def check_all_invalid(fx: Fixtures, result: subprocess.CompletedProcess) -> None:
    assert "invalid samples: 16 (100.0%)" in result.stdout
    curves = json.loads((fx.root / "banks" / "invalid" / "curves.json").read_text())
    assert curves["invalid_rate"] == 1.0 and len(set(curves["overall_avg"])) == 1


def check_long_essay(shape: tuple[int, int]) -> None:
    batch, width = shape
    assert batch == 2 and 300 < width <= 384  # the essay shortened to fit --max_seq_length, not refused


def assert_in(part: str, text: str) -> None:
    assert part in text, text[-2000:]


def snapshot(path: Path) -> dict[str, tuple[int, int]] | None:
    """Every file under ``path`` with its size and modification time; None when it does not exist."""
    if not path.exists():
        return None
    if path.is_file():
        return {".": (path.stat().st_size, path.stat().st_mtime_ns)}
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*"))}


@dataclass
class Outcome:
    argv: list[str]
    result: subprocess.CompletedProcess
    before: dict[Path, dict | None]


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory) -> tuple[Fixtures, dict[str, Outcome]]:
    """Run the selected rows: inputs built first (in order, the cached ones once), every watched
    path snapshotted, then the command lines in a few parallel subprocesses."""
    selected = {item.callspec.params["case"].id for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec")}
    fx = Fixtures(tmp_path_factory.mktemp("cli_inputs"))
    started = time.monotonic()
    plans = []
    for case in CASES:
        if case.id in selected:
            argv = case.argv(fx)
            plans.append((case, argv, {p: snapshot(p) for p in case.watch(fx)}))

    seconds: dict[str, float] = {}

    def launch(case: Case, argv: list[str]) -> subprocess.CompletedProcess:
        cmd = [sys.executable, *SCRIPTS[case.cli], *argv]
        started = time.monotonic()
        try:
            return subprocess.run(cmd, cwd=ROOT, env=cli_env(**{**ROW_ENV, **case.env}), capture_output=True, text=True, timeout=600)
        finally:
            seconds[case.id] = time.monotonic() - started  # for the report only

    seconds["(inputs)"] = time.monotonic() - started
    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as pool:
        futures = {case.id: (argv, before, pool.submit(launch, case, argv)) for case, argv, before in plans}
        results = {cid: Outcome(argv, future.result(), before) for cid, (argv, before, future) in futures.items()}
    report = os.environ.get("AES_CLI_CASES_REPORT")
    if report:
        with open(report, "w", encoding="utf-8") as handle:
            handle.write(f"building the inputs: {seconds['(inputs)']:.1f} s\n")
            for case in CASES:
                if case.id in results:
                    r = results[case.id].result
                    line = r.stderr.strip().splitlines()[-1] if case.error and r.stderr.strip() else "(accepted)"
                    handle.write(f"{case.id}\texit {r.returncode}\t{seconds[case.id]:.1f} s\t{line}\n")
    return fx, results


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cli_input(case: Case, outcomes: tuple[Fixtures, dict[str, Outcome]]) -> None:
    fx, results = outcomes
    outcome = results[case.id]
    result, command = outcome.result, " ".join(outcome.argv)
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    if case.error is None:
        assert result.returncode == 0, (command, result.stderr[-3000:])
        if case.check:
            case.check(fx, result)
    else:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2, (command, result.stderr[-3000:])
        assert len(lines) == 1, result.stderr  # exactly one line: no usage block, log or warning
        assert lines[0].startswith("error: "), lines[0]
        for part in case.error(fx):
            assert part in lines[0], (part, lines[0])
    for path, before in outcome.before.items():
        assert snapshot(path) == before, f"{path} changed"  # no partial output

