"""What both CLIs do around a run: logging, the run folder, the manifest's provenance, and stopping.

``main_pipeline.py`` writes ``run_manifest.json`` into its run folder, ``self_consistency.py``
writes ``run_config.json``; both record how the run was made (:func:`provenance`) and each
resume (:func:`resume_entry`). Imports neither torch nor transformers (:func:`stop` loads
:mod:`modules.dist` only when called), so ``self_consistency.py analyze`` can use it without them.
"""
from __future__ import annotations

import logging
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

from modules.jsonio import DataError, read_json

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "transformers", "peft", "accelerate", "numpy", "scikit-learn", "wandb", "gguf")


class RunDirError(ValueError):
    """A run folder that cannot be created, as one line."""


def setup_logging() -> None:
    """Log INFO with times; under a launcher only rank 0 does, the others keep warnings and errors."""
    # Called before the process group exists, when the launcher's RANK is the rank (as modules.dist
    # reads it too); importing dist here would load torch, which analyze must not need.
    main = int(os.environ.get("RANK", 0)) == 0
    logging.basicConfig(level=logging.INFO if main else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def stop(error: str) -> int:
    """End a run on an error every process met: rank 0 prints the one line, and all exit 2.

    The barrier keeps the other processes alive until rank 0 has printed: a launcher stops the
    remaining processes as soon as one exits, and could otherwise cut rank 0 off before its line.
    """
    from modules import dist

    if dist.is_main():
        print(f"error: {error}", file=sys.stderr, flush=True)
    dist.barrier()
    return 2


# --------------------------------------------------------------------------- the run folder

def timestamp() -> str:
    """The time part of a run folder's name."""
    return time.strftime("%Y%m%d-%H%M%S")


def occupied_dir_error(path: Path, what: str, hint: str) -> str | None:
    """The one-line error for a new run's folder that already holds something, else None."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        return f"{path}: {what} exists and is not empty ({hint})"
    return None


def uncreatable_dir_error(path: Path) -> str | None:
    """The error ``create_run_dir`` would give for ``path``, found without writing: its nearest
    existing ancestor is not a folder, or one this user may not write into; else None."""
    parent = path.absolute()
    while not parent.exists():
        parent = parent.parent
    if parent == path.absolute():
        return None
    problem = ("Not a directory" if not parent.is_dir()
               else None if os.access(parent, os.W_OK | os.X_OK) else "Permission denied")
    return f"{path}: cannot create the run folder ({problem})" if problem else None


def create_run_dir(path: Path | None, parent: Path | None = None, prefix: str = "") -> Path:
    """Create the run folder ``path`` (and its parents; it may exist already, empty or resumed), or
    without one a new ``<parent>/<prefix>_<timestamp>``, with ``-1``, ``-2``, ... when a run
    started in the same second took that name. Raises :class:`RunDirError` when it cannot."""
    try:
        if path is not None:
            path.mkdir(parents=True, exist_ok=True)
            return path
        base = parent / f"{prefix}_{timestamp()}"
        base.parent.mkdir(parents=True, exist_ok=True)
        for i in range(1000):
            path = base.with_name(f"{base.name}-{i}") if i else base
            try:
                path.mkdir()
                return path
            except FileExistsError:
                continue
    except OSError as err:
        raise RunDirError(f"{path if path is not None else base}: cannot create the run folder "
                          f"({err.strerror})") from None
    raise RunDirError(f"{base}: could not create a new run folder")


def plan_and_load_adapter(plan: Callable[[], object], args, device, errors: tuple[type[Exception], ...] = (),
                          load: Callable | None = None):
    """``(plan(), model, tokenizer, error)``: every input check of a command that scores with a
    trained adapter (``plan``), then the adapter of ``args.adapter_dir`` on ``args.base_model_name``,
    loaded only once the checks pass (transformers and peft take seconds to import). ``error`` is
    the one line every process agrees on (None when all went well): a ValueError's, OSError's or
    one of ``errors``' first line (the loader's messages can span lines; the first says what).

    One process without --device_id lets the loader choose its device (first GPU, else CPU) after
    it has checked the adapter's base model; ``device`` is the launcher's, or None alone. ``load``:
    another loader, ``load(device) -> (model, tokenizer)`` (a probe run's base model)."""
    from modules import dist

    planned = model = tokenizer = error = None
    try:
        planned = plan()
        if device is None and args.device_id is not None:
            device = dist.device(args.device_id)
        if load is not None:
            model, tokenizer = load(device)
        else:
            from modules.models import load_adapter

            model, tokenizer = load_adapter(args.base_model_name, args.adapter_dir, device=device)
    except (OSError, ValueError, *errors) as err:
        error = str(err).strip().splitlines()[0]
    return planned, model, tokenizer, dist.first_error(error)


# --------------------------------------------------------------------------- a training run's prompts

MANIFEST = "run_manifest.json"  # a run folder's record of how it was made


def manifest_prompt_settings(manifest: dict, path: Path) -> tuple[bool | None, str | None, int | None]:
    """mtl, prompt_format and max_prompt_tokens as a training run recorded them in its
    run_manifest.json (``path``, for the message), None where it records none; a prompt for its
    adapter must be rendered with them. ValueError naming the field when one is malformed."""
    config = manifest.get("config")
    config = config if isinstance(config, dict) else {}
    max_prompt_tokens = manifest.get("max_prompt_tokens")
    if max_prompt_tokens is not None and (not isinstance(max_prompt_tokens, int) or max_prompt_tokens < 1):
        raise ValueError(f"{path}: field 'max_prompt_tokens': expected a positive integer, got {max_prompt_tokens!r}")
    prompt_format = config.get("prompt_format")
    if prompt_format is not None and prompt_format not in ("chat", "plain"):
        raise ValueError(f"{path}: field 'config.prompt_format': unknown format {prompt_format!r}")
    mtl = config.get("mtl")
    return (None if mtl is None else bool(mtl)), prompt_format, max_prompt_tokens


@dataclass(frozen=True)
class PromptSettings:
    """How an adapter's prompts are rendered: as in its training, or it scores prompts it never saw.
    ``mtl``: the target was score line + feedback; ``prompt_format``: ``chat`` or ``plain``;
    ``max_prompt_tokens``: the training run's prompt budget (longer essays are shortened to it)."""

    mtl: bool = False
    prompt_format: str = "chat"
    max_prompt_tokens: int | None = None

    @classmethod
    def from_run(cls, run_dir: str | Path) -> "PromptSettings":
        """The settings a training run recorded in its ``run_manifest.json``; DataError naming the
        file and field when it lacks one."""
        path = Path(run_dir) / MANIFEST
        if not path.is_file():
            raise DataError(f"{run_dir}: no {MANIFEST}, so the prompts its adapter was trained on are unknown "
                            f"(score with a run folder main_pipeline.py wrote)")
        try:
            mtl, prompt_format, max_prompt_tokens = manifest_prompt_settings(read_json(path), path)
        except ValueError as err:
            raise DataError(str(err)) from None
        for name, value in (("mtl", mtl), ("prompt_format", prompt_format)):
            if value is None:
                raise DataError(f"{path}: field 'config.{name}': missing")
        return cls(mtl, prompt_format, max_prompt_tokens)

    def prompt(self, record, info, tokenizer) -> str:
        """The record's prompt text under these settings."""
        from modules.data import build_prompt

        return build_prompt(record, info, tokenizer, self.mtl, self.prompt_format, self.max_prompt_tokens)

    def as_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- provenance

def git_commit() -> str | None:
    """The checked-out commit of this code, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def git_dirty() -> bool:
    """Whether tracked files differ from the checked-out commit (a result then is not that commit's)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10)
        return bool(out.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return False


def cpu_model() -> str:
    """``model name`` of /proc/cpuinfo: the CPU's arithmetic is part of what a timed run measures."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    """The CPU, its cores, and the torch and Python versions a run ran on."""
    import torch

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "host": platform.node()}


def package_versions() -> dict[str, str]:
    """Python's version and those of the installed packages a run's results depend on."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def now() -> str:
    """The local time as a manifest records it."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def provenance() -> dict:
    """How a run was made, the first fields of its manifest: command line, time, commit, packages."""
    return {"command": [sys.executable, *sys.argv], "created": now(), "git_commit": git_commit(),
            "packages": package_versions()}


def resume_entry(details: dict) -> dict:
    """One entry of a manifest's ``resumes`` list: command line, time, commit, then ``details``."""
    return {"command": [sys.executable, *sys.argv], "at": now(), "git_commit": git_commit(), **details}
