"""The score head's starting pass on the CPU: the pooled prompt states its starting ridge is fitted on
(``modules.score_head.prompt_features``, decoder layers up to the head's only) against scoring's
prefill of the whole model (``modules.scoring.prefill``, what the pass ran before), in one process.

    python -m benchmarks.bench_head_start [--corpus asap-traits] [--essays 32] [--layer L]

The first ``--essays`` training essays of the corpus's converted train split, rendered as
``bench_real_essays.py``'s training renders them (its system message, the prompt budget of
``--max_seq_length 1024``), SmolLM2-135M in float32 as ``main_pipeline.py`` loads it, each prompt
run alone. ``--layer``: the hidden-state index the head reads (default: the corpus's head layer,
else its probe layer). Prints seconds per essay of each pass, the largest difference between their
features (0: the cut pass is exact), the whole train split's pass at each speed, and ends with
``ratio=<whole seconds / cut seconds>``. Run it alone: two cores. When the corpus file is absent it
says so and exits 0.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

from benchmarks import bench_real_essays
from benchmarks.bench_real_essays import SYSTEM_PROMPT, shared_file_missing
from benchmarks.bench_training import train_split

# The layer the head would read where a corpus keeps none: its probe's, chosen on validation
# (docs/results.md).
PROBE_LAYER = {"asap": 20, "asap-traits": 20, "ell": 19}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", choices=sorted(bench_real_essays.CORPORA), default="asap-traits")
    p.add_argument("--input", default=None, help="corpus file in the corpus's layout (default: its file in ../shared/data)")
    p.add_argument("--essays", type=int, default=32, help="training essays each pass runs")
    p.add_argument("--layer", type=int, default=None, help="hidden-state index the head reads")
    args = p.parse_args(argv)
    corpus = bench_real_essays.CORPORA[args.corpus]
    args.input = args.input or str(corpus.default_input)
    if args.layer is None:
        args.layer = corpus.head_layer if corpus.head_layer is not None else PROBE_LAYER[args.corpus]
    if args.essays < 1:
        p.error("--essays must be at least 1")
    return args


def training_prompts(corpus: str, source: str) -> list[str]:
    """Every training essay's prompt as the benchmark's training renders it."""
    from modules.runs import PromptSettings

    info, train, tokenizer, budget = train_split(corpus, source)
    info = replace(info, system_prompt=SYSTEM_PROMPT)
    settings = PromptSettings(max_prompt_tokens=budget)
    return [settings.prompt(r, info, tokenizer) for r in train]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shared_file_missing(Path(args.input)):
        return 0
    import logging

    import numpy as np
    import torch
    import transformers

    from modules.models import load_base_model
    from modules.score_head import prompt_features
    from modules.scoring import eval_mode, prefill

    logging.basicConfig(level=logging.WARNING)
    transformers.logging.set_verbosity_error()
    prompts = training_prompts(args.corpus, args.input)
    n_train = len(prompts)
    prompts = prompts[: args.essays]
    model, tokenizer = load_base_model("smollm2-135m", device=torch.device("cpu"))
    n_layers = model.config.num_hidden_layers

    def whole(chunk: list[str]) -> np.ndarray:
        with eval_mode(model), torch.inference_mode():
            return np.stack([prefill(model, tokenizer, p, pool_layer=args.layer).pooled.numpy() for p in chunk])

    passes = {"whole model (scoring's prefill)": whole,
              f"layers up to {args.layer} (prompt_features)": lambda chunk: prompt_features(model, tokenizer, chunk,
                                                                                           args.layer)}
    seconds, features = {}, {}
    print(f"{args.corpus}: {len(prompts)} training prompts, hidden-state index {args.layer} of {n_layers}, "
          f"float32, {torch.get_num_threads()} threads", flush=True)
    for name, run in passes.items():
        run(prompts[:1])  # warm-up
        started = time.perf_counter()
        features[name] = run(prompts)
        seconds[name] = (time.perf_counter() - started) / len(prompts)
        print(f"{name:36s} {seconds[name]:.3f} s/essay; the {n_train} training essays: "
              f"{seconds[name] * n_train / 60:.1f} min", flush=True)
    whole_f, cut_f = features.values()
    print(f"largest feature difference: {float(np.abs(whole_f - cut_f).max()):.3g}")
    whole_s, cut_s = seconds.values()
    print(f"ratio={whole_s / cut_s:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
