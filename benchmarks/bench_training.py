"""Training throughput on the CPU: SmolLM2-135M LoRA steps on real ASAP set-7 essays, today's
default settings against the CPU recipe, in one process.

    python benchmarks/bench_training.py [--essays 48] [--levers]

Each setting trains a fresh LoRA with the project's ``CustomTrainer`` (CE + 2.0 NTL, the real HF
Trainer, batch 4, lr 1e-3) for one epoch over the same seeded sample of ``--essays`` essays of the
converted train split (``modules.convert.corpora.convert_asap``, holistic 0-30), encoded exactly as
``main_pipeline.py`` encodes them. Throughput is essays / the Trainer's ``train_runtime``.

- ``default``: what ``main_pipeline.py`` does without the recipe flags: LoRA on q/v of every
  layer, random batches padded to their longest essay, float32.
- ``recipe``: the flags the README's CPU commands use (``CPU_RECIPE`` below).
- ``--levers``: also each lever alone on top of ``default``, so the note can say what each buys.

Prints one line per setting (essays/s, padded tokens per essay, final loss) and ends with
``ratio=<recipe essays/s / default essays/s>``. Run it alone: two cores, so anything running beside
it shows up in the figures. When the shared ASAP file is absent it says so and exits 0.
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_asap import ASAP7, shared_file_missing  # noqa: E402

# The CPU recipe (README "Quickstart" and "Results on real essays"): LoRA on the top 8 of the 30
# layers, length-grouped batches.
CPU_RECIPE = {"top_layers": 8, "group_by_length": True}
LEVERS = {
    "group_by_length": {"group_by_length": True},
    "top_layers=8": {"top_layers": 8},
    "top_layers=4": {"top_layers": 4},
    "bf16 autocast": {"bf16": True},
    "torch.compile": {"compile": True},
    "1 thread": {"threads": 1},
    "prompt <= 256 tokens": {"max_prompt_tokens": 256},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", default=str(ASAP7), help="ASAP set-7 file (training_set_rel3.tsv layout)")
    p.add_argument("--essays", type=int, default=48, help="essays per setting (one epoch; a multiple of 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--levers", action="store_true", help="also time each lever alone on top of the default")
    args = p.parse_args(argv)
    if args.essays < 4 or args.essays % 4:
        p.error("--essays must be a positive multiple of the batch size 4")
    return args


def encode_sample(source: Path, n_essays: int, seed: int, max_prompt_tokens: int | None = None):
    """A seeded sample of the converted train split, encoded as main_pipeline.py encodes it."""
    from modules.convert.corpora import convert_asap
    from modules.data import load_splits
    from modules.encoding import encode_example, prompt_token_budget
    from modules.losses import number_token_values
    from modules.models import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        convert_asap(source, Path(tmp) / "asap7", seed=seed)
        info, splits = load_splits(Path(tmp) / "asap7")
    records = random.Random(seed).sample(splits["train"], n_essays)
    tokenizer = load_tokenizer("smollm2-135m")
    budget = prompt_token_budget(splits["train"], tokenizer, False, 1024)
    if max_prompt_tokens is not None:
        budget = min(budget, max_prompt_tokens)
    values = number_token_values(tokenizer)
    return [encode_example(r, info, tokenizer, mtl=False, max_seq_length=1024, max_prompt_tokens=budget,
                           number_values=values) for r in records], values


def padded_tokens(examples: list[dict], batches: list[list[int]]) -> float:
    """Tokens per essay the model runs over once each batch is padded to its longest essay."""
    return sum(len(b) * max(len(examples[i]["input_ids"]) for i in b) for b in batches) / len(examples)


def time_setting(examples: list[dict], number_values, seed: int, *, top_layers: int = 0,
                 group_by_length: bool = False, bf16: bool = False, compile: bool = False,
                 threads: int | None = None, **_) -> dict:
    import torch
    from transformers import TrainingArguments, set_seed

    from modules.encoding import ScoringCollator
    from modules.models import add_lora, load_base_model
    from modules.trainer import LABEL_NAMES, CustomTrainer, LossConfig

    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads)
    set_seed(seed)
    model, tokenizer = load_base_model("smollm2-135m", device=torch.device("cpu"))
    model = add_lora(model, top_layers=top_layers)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, seed=seed, num_train_epochs=1, learning_rate=1e-3, per_device_train_batch_size=4,
            gradient_accumulation_steps=1, warmup_steps=0.03, eval_strategy="no", save_strategy="no",
            logging_steps=len(examples) // 4, report_to=[], label_names=LABEL_NAMES, remove_unused_columns=False,
            use_cpu=True, bf16=bf16, torch_compile=compile, dataloader_num_workers=0,
            train_sampling_strategy="group_by_length" if group_by_length else "random")
        trainer = CustomTrainer(model=model, args=args, train_dataset=examples,
                                data_collator=ScoringCollator(tokenizer.pad_token_id),
                                loss_config=LossConfig(number_values, ntl_weight=2.0, emo_weight=0.0),
                                processing_class=tokenizer)
        batches = list(trainer.get_train_dataloader().batch_sampler)
        result = trainer.train()
    torch.set_num_threads(default_threads)
    seconds = result.metrics["train_runtime"]
    return {"essays_per_s": len(examples) / seconds, "seconds": seconds, "loss": result.training_loss,
            "padded_tokens": padded_tokens(examples, batches)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    source = Path(args.input)
    if shared_file_missing(source):
        return 0
    import logging

    import transformers

    logging.basicConfig(level=logging.WARNING)
    transformers.logging.set_verbosity_error()
    settings = {"default": {}, **({name: lever for name, lever in LEVERS.items()} if args.levers else {}),
                "recipe": CPU_RECIPE}
    encoded = {}
    results = {}
    started = time.perf_counter()
    for name, setting in settings.items():
        cut = setting.get("max_prompt_tokens")
        if cut not in encoded:
            encoded[cut] = encode_sample(source, args.essays, args.seed, cut)
        examples, values = encoded[cut]
        results[name] = row = time_setting(examples, values, args.seed, **setting)
        print(f"{name:24s} {row['essays_per_s']:.3f} essays/s  ({row['seconds']:.1f} s for {args.essays} essays, "
              f"{row['padded_tokens']:.0f} padded tokens/essay, loss {row['loss']:.3f})", flush=True)
    print(f"total {time.perf_counter() - started:.0f} s")
    print(f"ratio={results['recipe']['essays_per_s'] / results['default']['essays_per_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
