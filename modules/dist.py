"""Multi-process runs under ``torchrun`` / ``accelerate launch`` (SPEC §8).

The launcher starts one process per device and sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``;
this module turns that into the few things both CLIs need: which device a process uses, one
process group (gloo on CPU, NCCL on CUDA), which process writes files (rank 0), and moving
Python objects between processes. Without a launcher every function is the single-process
identity (rank 0 of 1, barriers are no-ops), so the CLIs have one code path.

The Trainer (through accelerate) reuses the process group created here instead of making its own.

accelerate's ``PartialState`` creates that group (:func:`init`); everything else talks to
``torch.distributed`` directly. Rank and size must be known before the group exists (logging is
set up first, from the launcher's variables), ``PartialState``'s object helpers follow a singleton
that the Trainer resets and rebuilds from its own arguments, ``gather_object`` gathers to every
process rather than to rank 0, and ``split_between_processes`` hands out contiguous blocks where
:func:`shard` deals essays round-robin (which essays a process scores, and batches together,
would change).
"""
from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import Any, Sequence, TypeVar

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)
T = TypeVar("T")
# How long a process waits for the others in a collective: the Trainer's ddp_timeout default
# (NCCL's own default is 10 minutes, short for a rank that waits while rank 0 writes files).
TIMEOUT = timedelta(minutes=30)


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    """The process that writes files and prints summaries."""
    return rank() == 0


def device(device_id: int | str | None = None) -> torch.device:
    """This process's device: under a launcher the GPU of its ``LOCAL_RANK`` (the CPU when there is
    no GPU, and ``device_id`` is ignored); alone, ``resolve_device(device_id)``."""
    from modules.models import resolve_device

    if world_size() == 1:
        return resolve_device(device_id)
    if device_id is not None:
        logger.warning("--device_id %s ignored: under a launcher each process uses the GPU of its LOCAL_RANK",
                       device_id)
    return resolve_device(local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def init(on: torch.device) -> None:
    """Join the launcher's process group: NCCL for CUDA devices, gloo for the CPU. One process: no-op.

    accelerate's ``PartialState`` reads the launcher's variables and creates the group; it is
    told ``cpu`` explicitly because, without it, a CPU-only launch counts as one process.
    """
    if world_size() == 1 or dist.is_initialized():
        return
    from accelerate import PartialState

    if on.type == "cuda":
        torch.cuda.set_device(on)  # NCCL collectives and gather_object use the current device
        PartialState(backend="nccl", device_id=on, timeout=TIMEOUT)
    else:
        PartialState(cpu=True, backend="gloo", timeout=TIMEOUT)
    logger.info("process %d of %d (%s backend) on %s", rank(), world_size(), dist.get_backend(), on)


def join(device_id: int | str | None = None) -> torch.device | None:
    """Under a launcher: this process's :func:`device`, with the process group joined, so that the
    checks a CLI runs next can end in one verdict (:func:`first_error`). Alone: None and nothing
    done; the caller resolves its device after its checks (resolving may log, and a bad input
    should stay the only line printed)."""
    if world_size() == 1:
        return None
    on = device(device_id)
    init(on)
    return on


def backend() -> str | None:
    return dist.get_backend() if dist.is_initialized() else None


def barrier() -> None:
    """Wait until every process got here (no-op alone)."""
    if dist.is_initialized() and world_size() > 1:
        dist.barrier()


def broadcast(obj: T) -> T:
    """Rank 0's ``obj`` on every process (picklable objects)."""
    if not dist.is_initialized() or world_size() == 1:
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def first_error(error: str | None) -> str | None:
    """The error of the lowest-ranked process that met one, on every process; None when none did.

    A collective: every process calls it at the same point, so checks that all processes run (input
    validation) end with one verdict instead of each process stopping on its own. Alone: ``error``.
    """
    if not dist.is_initialized() or world_size() == 1:
        return error
    errors: list[str | None] = [None] * world_size()
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e is not None), None)


def shard(items: Sequence[T]) -> list[T]:
    """This process's share: every ``world_size``-th item from its rank on (undone by :func:`gather`)."""
    return list(items[rank()::world_size()])


def gather(part: list[T]) -> list[T] | None:
    """On rank 0, every process's :func:`shard` put back into the original order; None elsewhere."""
    if not dist.is_initialized() or world_size() == 1:
        return list(part)
    n = world_size()
    parts: list[Any] | None = [None] * n if is_main() else None
    dist.gather_object(part, parts, dst=0)
    if parts is None:
        return None
    whole: list[Any] = [None] * sum(len(p) for p in parts)
    for r, p in enumerate(parts):
        whole[r::n] = p
    return whole


def mean(values: list[float], on: torch.device) -> list[float]:
    """Element-wise mean of ``values`` over all processes (every process must call it)."""
    if not dist.is_initialized() or world_size() == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=on)
    dist.all_reduce(tensor)
    return (tensor / world_size()).tolist()


def finish() -> None:
    """Leave the process group (a no-op when there is none)."""
    if dist.is_initialized():
        dist.destroy_process_group()
