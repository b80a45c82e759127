"""What the command lines share: a usage error is one line on stderr and exit 2, and on Linux
the process keeps the memory it frees for its next allocations.

argparse's own ``error`` prints the whole usage block first (dozens of lines for main_pipeline.py)
and then the message; the project's contract for bad input is a single ``error: ...`` line, the
same for a mistyped flag as for a bad record.
"""
from __future__ import annotations

import argparse
import ctypes
import platform
import sys
from typing import NoReturn

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line naming the flag; subcommand parsers
    made with ``add_subparsers`` are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def keep_freed_memory() -> bool:
    """glibc only: serve every allocation from the heap and keep what is freed there for reuse,
    ``mallopt(M_MMAP_MAX, 0)``, ``M_TRIM_THRESHOLD`` and ``M_TOP_PAD`` large. Returns whether it
    applied (False off glibc). Values and numerics are untouched; only where memory comes from.

    Why: a CPU training step or scoring batch allocates and frees tensors of tens to hundreds of
    MB (a batch's logits over SmolLM2's 49,152 tokens, a KV cache copied per decoding step).
    glibc hands every block above its mmap threshold (32 MB at most) back to the kernel on free,
    so the next one is fresh pages that the kernel zeroes on first touch, time spent in the
    kernel on every step (``benchmarks/bench_malloc.py`` measures it). The cost: a process's
    resident memory stays near its peak instead of shrinking between steps. Called by the
    command lines' ``__main__`` only, never on import, so a library user's process is left as it is.
    """
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return all(libc.mallopt(param, value) == 1 for param, value in
               ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, 2**30)))
