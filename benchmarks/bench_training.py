"""Training throughput on the CPU: SmolLM2-135M LoRA steps on real essays, today's default settings
against the CPU recipe, in one process.

    python -m benchmarks.bench_training [--corpus asap] [--essays 48] [--levers [LEVER ...]]

``--corpus`` is one of ``bench_real_essays.py``'s (``asap``: ASAP set 7 holistic 0-30;
``asap-traits``: with its four traits on the same line; ``ell``: six traits), converted by its
converter. Each setting trains a fresh LoRA with the project's ``CustomTrainer`` (CE + 2.0 NTL, the
real HF Trainer, batch 4, lr 1e-3) on ``--essays`` essays: ``--essays / 4`` batches of one epoch over
all essays of the converted train split (ASAP set 7: 1,099), encoded exactly as ``main_pipeline.py``
encodes them. The epoch's batches are random, or
length-grouped for settings that group (``modules.trainer.ShuffledLengthBuckets``, what
``--group_by_length`` uses); the sample is picked at evenly spaced quantiles of the batches' padded
width, so its padding is the epoch's (each line prints both). Throughput is essays / the Trainer's
``train_runtime``.

- ``default``: what ``main_pipeline.py`` does without the recipe flags: LoRA on q/v of every
  layer, random batches padded to their longest essay, float32.
- ``recipe``: the flags ``bench_real_essays.py`` trains with (``CPU_RECIPE`` below), in the precision
  ``main_pipeline.py --precision auto`` picks on this machine (``modules.precision``).
- precision: float32 against bf16 autocast, the default setting on the same ``--precision_essays``
  essays (fewer than ``--essays``: where bf16 is emulated a step takes minutes), and which one
  ``auto`` picks here and why.
- ``--levers``: also each lever (or the ones named) alone on top of ``default``
  (``top_layers=8, cached``: ``main_pipeline.py --cache_frozen_layers``, its once-per-essay pass of
  the frozen layers printed apart from the steps' throughput; ``score head``: ``--head_layer 20``,
  what the head adds to a step); the prompt levers
  (``short system prompt``, ``no writing prompt``: dataset.json's writing prompt left out of every
  prompt, ``prompt <= 256 tokens``) show what a shorter prompt buys.

Prints, per prompt variant, the mean tokens per training example (prompt without its essay, essay,
target + EOS), then one line per setting (essays/s, padded tokens per essay, final loss), the
bf16/float32 throughput ratio with auto's pick, and ends with ``ratio=<recipe essays/s / default
essays/s>``. Run it alone: two cores, so anything running beside
it shows up in the figures. When the corpus file is absent it says so and exits 0.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks import bench_real_essays
from benchmarks.bench_real_essays import SYSTEM_PROMPT, shared_file_missing

if TYPE_CHECKING:  # only for annotations: the modules load lazily, after argument parsing
    from transformers import PreTrainedTokenizerBase

    from modules.data import DatasetInfo, EssayRecord

# The CPU recipe of the real-essay runs (docs/results.md): length-bucketed batches in random order
# (--group_by_length) and bench_real_essays.py's short system message, in auto's precision (main()).
# LoRA stays on q/v of every layer: fewer adapted layers trained faster but learned the score line
# far more slowly (docs/performance.md, training levers).
CPU_RECIPE = {"group_by_length": True, "system_prompt": SYSTEM_PROMPT}
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LEVERS = {
    "group_by_length": {"group_by_length": True},
    "top_layers=8": {"top_layers": 8},
    "top_layers=16": {"top_layers": 16},
    "top_layers=8, all linear": {"top_layers": 8, "target_modules": ALL_LINEAR},
    "top_layers=8, cached": {"top_layers": 8, "cache": True},
    "score head": {"head_layer": 20},
    "torch.compile": {"compile": True},
    "1 thread": {"threads": 1},
    "prompt <= 256 tokens": {"max_prompt_tokens": 256},
    "short system prompt": {"system_prompt": SYSTEM_PROMPT},
    "no writing prompt": {"writing_prompt": False},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", choices=sorted(bench_real_essays.CORPORA), default="asap")
    p.add_argument("--input", default=None, help="corpus file in the corpus's layout (default: its file in ../shared/data)")
    p.add_argument("--essays", type=int, default=48, help="essays per setting (one epoch; a multiple of 4)")
    p.add_argument("--precision_essays", type=int, default=8,
                   help="essays of the float32 / bf16 comparison (a multiple of 4, at most --essays)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--levers", nargs="*", default=None, choices=list(LEVERS), metavar="LEVER",
                   help=f"also time these levers (default: all) each alone on top of the default: {', '.join(LEVERS)}")
    args = p.parse_args(argv)
    for key in ("essays", "precision_essays"):
        if getattr(args, key) < 4 or getattr(args, key) % 4:
            p.error(f"--{key} must be a positive multiple of the batch size 4")
    if args.precision_essays > args.essays:
        p.error("--precision_essays must be at most --essays")
    args.input = args.input or str(bench_real_essays.CORPORA[args.corpus].default_input)
    return args


def train_split(corpus: str, source: str,
                seed: int = 0) -> tuple[DatasetInfo, list[EssayRecord], PreTrainedTokenizerBase, int]:
    """The corpus's train split as ``bench_real_essays.py --data_seed seed`` converts it, its
    dataset.json info, and the prompt token budget its training uses (``--max_seq_length 1024``)
    with SmolLM2-135M's tokenizer: ``(info, records, tokenizer, budget)``."""
    from modules.data import load_splits
    from modules.encoding import prompt_token_budget
    from modules.models import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        bench_real_essays.convert(bench_real_essays.parse_args(["--corpus", corpus, "--input", source,
                                                                "--data_seed", str(seed)]), Path(tmp) / "data")
        info, splits = load_splits(Path(tmp) / "data")
    tokenizer = load_tokenizer("smollm2-135m")
    return info, splits["train"], tokenizer, prompt_token_budget(splits["train"], tokenizer, False, 1024)


def encode_train_split(corpus: str, source: str, seed: int, max_prompt_tokens: int | None = None,
                       system_prompt: str | None = None, writing_prompt: bool = True):
    """Every essay of the corpus's converted train split, encoded as main_pipeline.py encodes it
    (with ``system_prompt`` as dataset.json's system message, when given; without its writing
    prompts unless ``writing_prompt``), and the mean tokens per example (prompt without the essay,
    essay, target + EOS)."""
    from dataclasses import replace

    from modules.data import build_prompt
    from modules.encoding import encode_example
    from modules.losses import number_token_values

    info, train, tokenizer, budget = train_split(corpus, source, seed)
    info = replace(info, system_prompt=system_prompt, prompts=info.prompts if writing_prompt else {})
    if max_prompt_tokens is not None:
        budget = min(budget, max_prompt_tokens)
    values = number_token_values(tokenizer)
    examples = [{**encode_example(r, info, tokenizer, mtl=False, max_seq_length=1024, max_prompt_tokens=budget,
                                  number_values=values), "scores": list(r.scores)} for r in train]
    frame = [len(tokenizer(build_prompt(replace(r, essay=""), info, tokenizer), add_special_tokens=False)["input_ids"])
             for r in train]
    total = [len(e["input_ids"]) for e in examples]
    target = [sum(label != -100 for label in e["labels"]) for e in examples]
    n = len(examples)
    tokens = {"prompt without essay": sum(frame) / n, "essay": (sum(total) - sum(target) - sum(frame)) / n,
              "target + EOS": sum(target) / n}
    return examples, values, tokens


def epoch_batches(examples: list[dict], group_by_length: bool, seed: int) -> list[list[int]]:
    """One epoch's batches of 4 in the order the Trainer reads them: a random permutation, or with
    ``group_by_length`` the project's ``ShuffledLengthBuckets`` (main_pipeline.py --group_by_length)."""
    import torch

    from modules.trainer import ShuffledLengthBuckets

    if group_by_length:
        return ShuffledLengthBuckets([len(e["input_ids"]) for e in examples], 4, seed=seed).batches()
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    return [order[i:i + 4] for i in range(0, len(order), 4)]


def sampled_batches(examples: list[dict], batches: list[list[int]], n_batches: int) -> list[list[int]]:
    """``n_batches`` of an epoch's full batches, picked at evenly spaced quantiles of their padded
    width and kept in epoch order: a few batches drawn at random would stray from the epoch's padding
    (the figure that grouping changes), a stratified pick stays close to it."""
    full = [b for b in batches if len(b) == 4]
    by_width = sorted(range(len(full)), key=lambda k: batch_width(examples, full[k]))
    picked = sorted(by_width[int((q + 0.5) * len(full) / n_batches)] for q in range(n_batches))
    return [full[k] for k in picked]


def batch_width(examples: list[dict], batch: list[int]) -> int:
    """Tokens per row of the padded batch: its longest example."""
    return max(len(examples[i]["input_ids"]) for i in batch)


def padded_tokens(examples: list[dict], batches: list[list[int]]) -> float:
    """Tokens per essay the model runs over once each batch is padded to its longest essay."""
    return sum(len(b) * batch_width(examples, b) for b in batches) / sum(map(len, batches))


def time_setting(examples: list[dict], batches: list[list[int]], number_values, seed: int, *, top_layers: int = 0,
                 target_modules: tuple[str, ...] = ("q_proj", "v_proj"), bf16: bool = False, compile: bool = False,
                 threads: int | None = None, cache: bool = False, head_layer: int | None = None, **_) -> dict:
    """One epoch over ``batches`` (in that order) with a fresh LoRA; essays/s from the Trainer's runtime.
    ``cache``: main_pipeline.py's --cache_frozen_layers, the frozen layers' pass timed apart
    (``cache_seconds``: it runs once per essay, not once per epoch). ``head_layer``: a score head on
    that layer trained with the LoRA (main_pipeline.py --head_layer, --head_learning_rate 1e-4), its
    starting ridge left out (it runs once, before training: ``bench_head_start.py``)."""
    import torch
    from transformers import TrainingArguments, set_seed

    from modules.encoding import ScoringCollator
    from modules.models import add_lora, load_base_model
    from modules.trainer import LABEL_NAMES, CustomTrainer, LossConfig

    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads)
    set_seed(seed)
    model, tokenizer = load_base_model("smollm2-135m", device=torch.device("cpu"))
    model = add_lora(model, target_modules=target_modules, top_layers=top_layers)
    ordered = [examples[i] for batch in batches for i in batch]
    head = None
    if head_layer is not None:
        from modules.score_head import ScoreHead

        gold = torch.tensor([ex["scores"] for ex in ordered], dtype=torch.float32)
        head = ScoreHead(head_layer, model.config.hidden_size, [f"rubric {k}" for k in range(gold.shape[1])],
                         [(0, 100)] * gold.shape[1])
        head.score_mean.copy_(gold.mean(0))
        head.score_scale.copy_(gold.std(0).clamp_min(1.0))
        model.score_head = head  # as main_pipeline.py attaches it, so the optimizer trains it
    frozen_start, cache_seconds = 0, 0.0
    if cache:
        from modules.frozen_cache import first_adapted_layer, with_frozen_states

        frozen_start = first_adapted_layer(model)
        began = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            ordered = with_frozen_states(model, ordered, frozen_start)
        cache_seconds = time.perf_counter() - began
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, seed=seed, num_train_epochs=1, learning_rate=1e-3, per_device_train_batch_size=4,
            gradient_accumulation_steps=1, warmup_steps=0.03, eval_strategy="no", save_strategy="no",
            logging_steps=len(batches), report_to=[], label_names=LABEL_NAMES, remove_unused_columns=False,
            use_cpu=True, bf16=bf16, torch_compile=compile, dataloader_num_workers=0,
            train_sampling_strategy="sequential")
        trainer = CustomTrainer(model=model, args=args, train_dataset=ordered,
                                data_collator=ScoringCollator(tokenizer.pad_token_id),
                                loss_config=LossConfig(number_values, ntl_weight=2.0, emo_weight=0.0),
                                frozen_start=frozen_start, score_head=head, head_weight=1.0,
                                head_learning_rate=None if head is None else 1e-4)
        result = trainer.train()
    torch.set_num_threads(default_threads)
    seconds = result.metrics["train_runtime"]
    return {"essays_per_s": len(ordered) / seconds, "seconds": seconds, "loss": result.training_loss,
            "padded_tokens": padded_tokens(examples, batches), "cache_seconds": cache_seconds}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    source = Path(args.input)
    if shared_file_missing(source):
        return 0
    import logging

    import transformers

    logging.basicConfig(level=logging.WARNING)
    transformers.logging.set_verbosity_error()
    import torch

    from modules.precision import choose_precision

    auto = choose_precision("auto", torch.device("cpu"))
    print(f"--precision auto picks {'bf16 autocast' if auto.bf16 else 'float32'} here: {auto.reason}", flush=True)
    levers = [] if args.levers is None else args.levers or list(LEVERS)
    settings = {"default": {}, **{name: LEVERS[name] for name in levers}, "recipe": {**CPU_RECIPE, "bf16": auto.bf16}}
    encoded = {}
    results = {}
    started = time.perf_counter()
    for name, setting in settings.items():
        prompt = (setting.get("max_prompt_tokens"), setting.get("system_prompt"), setting.get("writing_prompt", True))
        if prompt not in encoded:
            encoded[prompt] = encode_train_split(args.corpus, args.input, args.seed, *prompt)
            tokens = encoded[prompt][2]
            print(f"{name:26s} tokens per example: " + ", ".join(f"{k} {v:.1f}" for k, v in tokens.items()), flush=True)
        examples, values, _ = encoded[prompt]
        epoch = epoch_batches(examples, setting.get("group_by_length", False), args.seed)
        batches = sampled_batches(examples, epoch, args.essays // 4)
        results[name] = row = time_setting(examples, batches, values, args.seed, **setting)
        print(f"{name:26s} {row['essays_per_s']:.3f} essays/s  ({row['seconds']:.1f} s for {args.essays} essays, "
              f"{row['padded_tokens']:.0f} padded tokens/essay, whole epoch {padded_tokens(examples, epoch):.0f}; "
              f"loss {row['loss']:.3f})" + (f"; frozen-layer pass {row['cache_seconds']:.1f} s, once per essay"
                                          if setting.get("cache") else ""), flush=True)
    examples, values, _ = encoded[(None, None, True)]
    batches = sampled_batches(examples, epoch_batches(examples, False, args.seed), args.essays // 4)
    batches = batches[:: args.essays // args.precision_essays][: args.precision_essays // 4]
    speed = {}
    for bf16, name in ((False, "float32"), (True, "bf16 autocast")):
        speed[bf16] = row = time_setting(examples, batches, values, args.seed, bf16=bf16)
        print(f"precision: {name:14s} {row['essays_per_s']:.3f} essays/s  ({row['seconds']:.1f} s for "
              f"{args.precision_essays} essays, {row['padded_tokens']:.0f} padded tokens/essay)", flush=True)
    print(f"bf16/float32 training throughput: {speed[True]['essays_per_s'] / speed[False]['essays_per_s']:.2f}x; "
          f"--precision auto picks {auto.chosen}")
    print(f"total {time.perf_counter() - started:.0f} s")
    print(f"ratio={results['recipe']['essays_per_s'] / results['default']['essays_per_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
