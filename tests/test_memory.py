"""modules.cli.keep_freed_memory: where a process's large allocations come from, read back from
glibc's own accounting (mallinfo2) in a fresh process each."""
from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's mallopt and mallinfo2")

# Allocates and frees 64 MB with libc's malloc and reports, from mallinfo2, the bytes in mmapped
# blocks while it is held and the free bytes the heap keeps once it is freed.
PROBE = """
import ctypes, json, sys
sys.path.insert(0, {root!r})
from modules.cli import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "on" else False

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2
before = libc.mallinfo2().hblkhd
block = libc.malloc(64 << 20)
held = libc.mallinfo2().hblkhd - before
libc.free(block)
print(json.dumps({{"applied": applied, "mmapped_while_held": held, "kept_after_free": libc.mallinfo2().fordblks}}))
"""


def probe(side: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT)), side], capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout)


def test_glibc_default_maps_a_large_block_and_returns_it() -> None:
    off = probe("off")
    assert off["applied"] is False
    assert off["mmapped_while_held"] >= 64 << 20
    assert off["kept_after_free"] < 64 << 20


def test_keep_freed_memory_serves_a_large_block_from_the_heap_and_keeps_it() -> None:
    on = probe("on")
    assert on["applied"] is True
    assert on["mmapped_while_held"] == 0
    assert on["kept_after_free"] >= 64 << 20
