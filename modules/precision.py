"""Training precision: bf16 autocast where the hardware runs bf16 matmuls natively, float32 elsewhere.

bf16 autocast pays only where bf16 matrix multiplies are native: a CUDA GPU with bf16, or a CPU
with AVX512-BF16 or AMX. On any other CPU (AVX2 only, a very common kind) oneDNN emulates them and
LoRA training runs about 30x slower than in float32 (SmolLM2-135M, one sequence of 512 tokens,
forward + backward: 99.6 s against 4.0 s). So ``--precision auto`` (the default) decides by the
machine, and ``bf16`` / ``fp32`` force either choice.

How a CPU is judged, in two steps:

1. the instruction sets torch's own cpuinfo reports (``torch.cpu._is_avx512_bf16_supported``,
   ``_is_amx_tile_supported``; no ``/proc/cpuinfo`` needed, so it works on any OS). On x86 without
   either, bf16 is emulated: float32, nothing timed.
2. where they are present (or on a CPU that is not x86, where they say nothing), a timed bf16
   matmul: one ``Linear`` at SmolLM2-135M's MLP width over 256 tokens, forward and backward,
   under bf16 autocast against float32. bf16 is chosen only when it is faster. The flags say what
   the CPU could do; the timing says what torch's kernels do with it here (a capped oneDNN,
   ``ONEDNN_MAX_CPU_ISA=AVX2``, runs it 20x slower despite the flags). It costs about 0.1 s where
   bf16 is native and about 1 s where it is not.
"""
from __future__ import annotations

import logging
import platform
import time
from dataclasses import asdict, dataclass

import torch

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "fp32")
# rows (tokens) x in x out of the timed matmul: SmolLM2-135M's up-projection over 256 tokens, the
# shape most of a training step's time goes to.
PROBE_SHAPE = (256, 576, 1536)
X86 = ("x86_64", "amd64", "i386", "i686", "x86")


@dataclass(frozen=True)
class Precision:
    """What a training run computes in, and why (recorded as ``precision`` in run_manifest.json)."""

    requested: str  # auto | bf16 | fp32
    chosen: str  # bf16 (autocast) | fp32
    reason: str  # one sentence, for the log and the manifest
    native_bf16: bool | None  # whether the device runs bf16 matmuls natively; None where not judged

    @property
    def bf16(self) -> bool:
        return self.chosen == "bf16"

    def record(self) -> dict:
        return asdict(self)


def cpu_bf16_flags() -> list[str]:
    """The bf16 matmul instruction sets this CPU has, as torch's cpuinfo reports them
    (``["AVX512-BF16", "AMX"]`` on a Sapphire Rapids Xeon, ``[]`` on an AVX2-only CPU)."""
    checks = {"AVX512-BF16": "_is_avx512_bf16_supported", "AMX": "_is_amx_tile_supported"}
    return [name for name, attr in checks.items() if getattr(torch.cpu, attr, lambda: False)()]


def bf16_matmul_speedup(shape: tuple[int, int, int] = PROBE_SHAPE, reps: int = 3) -> float:
    """float32 seconds / bf16-autocast seconds of one Linear's forward + backward on the CPU
    (``shape`` = rows, in, out): above 1 where bf16 is the faster path. Each side is timed after one
    warm-up, as the best of ``reps`` (the minimum is the least disturbed by other processes)."""
    rows, d_in, d_out = shape
    # A generator of its own: the global RNG, seeded by the run, must stay as it was (LoRA's init
    # and dropout draw from it after this check).
    generator = torch.Generator().manual_seed(0)
    weight, bias, x = (torch.randn(*size, generator=generator).requires_grad_()
                       for size in ((d_out, d_in), (d_out,), (rows, d_in)))

    def step(bf16: bool) -> float:
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = torch.nn.functional.linear(x, weight, bias)
        out.float().sum().backward()
        return time.perf_counter() - started

    seconds = {}
    for bf16 in (False, True):
        step(bf16)
        seconds[bf16] = min(step(bf16) for _ in range(reps))
    return seconds[False] / seconds[True]


def cpu_native_bf16() -> tuple[bool, str]:
    """Whether bf16 matmuls are native on this CPU (module docstring), and the evidence in words."""
    flags = cpu_bf16_flags()
    capability = torch.backends.cpu.get_cpu_capability()
    machine = platform.machine().lower()
    if machine in X86 and not flags:
        return False, f"this CPU has neither AVX512-BF16 nor AMX (torch CPU capability {capability})"
    speedup = bf16_matmul_speedup()
    has = f"this CPU has {' and '.join(flags)}" if flags else f"this {machine or 'unknown'} CPU"
    verdict = "faster" if speedup > 1 else "slower"
    return speedup > 1, f"{has}, and a bf16 matmul ran {speedup:.2f}x the speed of float32 ({verdict})"


def choose_precision(requested: str, device: torch.device) -> Precision:
    """The training precision on ``device`` for ``--precision requested`` (auto | bf16 | fp32):
    auto is bf16 autocast on a CUDA GPU with bf16 and on a CPU with native bf16 matmuls
    (:func:`cpu_native_bf16`), float32 elsewhere. ValueError (one line) for bf16 on a GPU without it."""
    if requested not in PRECISIONS:
        raise ValueError(f"--precision {requested!r}: choose one of {', '.join(PRECISIONS)}")
    device = torch.device(device)
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
        if requested == "bf16" and not native:
            raise ValueError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bf16 support; "
                             f"use --precision fp32")
        why = "the GPU supports bf16" if native else "the GPU has no bf16 support"
    elif device.type == "cpu":
        if requested == "fp32":  # nothing to judge: no need to time anything
            return Precision(requested, "fp32", "asked for with --precision fp32", None)
        native, why = cpu_native_bf16()
    else:
        native, why = False, f"bf16 autocast is not judged on {device.type} devices"
    chosen = "bf16" if (requested == "bf16" or (requested == "auto" and native)) else "fp32"
    reason = why if requested == "auto" else f"asked for with --precision {requested} ({why})"
    return Precision(requested, chosen, reason, native)


def training_autocast(precision: Precision, device: torch.device) -> torch.autocast:
    """The autocast a training run computes under, for the passes it makes outside the Trainer (the
    score head's starting ridge, the frozen-layer cache): bf16 where ``precision`` chose it, a
    context that changes nothing where it chose float32."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision.bf16)


def slow_bf16_warning(precision: Precision, device: torch.device) -> str | None:
    """The warning for bf16 forced on a CPU that emulates it, None otherwise."""
    if precision.bf16 and torch.device(device).type == "cpu" and precision.native_bf16 is False:
        return ("bf16 autocast on a CPU without native bf16 matmuls (no AVX512-BF16 or AMX) trains many times "
                "slower than float32 (about 30x); drop --bf16 / use --precision auto or fp32")
    return None
