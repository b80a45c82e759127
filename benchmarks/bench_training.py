"""Training throughput on the CPU: SmolLM2-135M LoRA steps on real ASAP set-7 essays, today's
default settings against the CPU recipe, in one process.

    python benchmarks/bench_training.py [--essays 48] [--levers [LEVER ...]]

Each setting trains a fresh LoRA with the project's ``CustomTrainer`` (CE + 2.0 NTL, the real HF
Trainer, batch 4, lr 1e-3) on ``--essays`` essays: ``--essays / 4`` batches spread evenly over one
epoch's batch order of all 1,099 essays of the converted train split
(``modules.convert.corpora.convert_asap``, holistic 0-30), encoded exactly as ``main_pipeline.py``
encodes them. The order is random, or length-grouped for settings that group (the Trainer's own
``get_length_grouped_indices``): grouping pays off only over a whole epoch, which is why the
batches are drawn from one. Throughput is essays / the Trainer's ``train_runtime``.

- ``default``: what ``main_pipeline.py`` does without the recipe flags: LoRA on q/v of every
  layer, random batches padded to their longest essay, float32.
- ``recipe``: the flags the README's CPU commands use (``CPU_RECIPE`` below).
- ``--levers``: also each lever (or the ones named) alone on top of ``default``.

Prints one line per setting (essays/s, padded tokens per essay, final loss) and ends with
``ratio=<recipe essays/s / default essays/s>``. Run it alone: two cores, so anything running beside
it shows up in the figures. When the shared ASAP file is absent it says so and exits 0.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_asap import ASAP7, shared_file_missing  # noqa: E402

# The CPU recipe (README "Quickstart" and "Results on real essays"): bf16 autocast. LoRA stays on
# q/v of every layer and batches stay random: fewer adapted layers trained faster but learned the
# score line far more slowly, and length-grouped batches cost QWK on ASAP (see the README).
CPU_RECIPE = {"bf16": True}
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LEVERS = {
    "group_by_length": {"group_by_length": True},
    "top_layers=8": {"top_layers": 8},
    "top_layers=16": {"top_layers": 16},
    "top_layers=8, all linear": {"top_layers": 8, "target_modules": ALL_LINEAR},
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
    p.add_argument("--levers", nargs="*", default=None, choices=list(LEVERS), metavar="LEVER",
                   help=f"also time these levers (default: all) each alone on top of the default: {', '.join(LEVERS)}")
    args = p.parse_args(argv)
    if args.essays < 4 or args.essays % 4:
        p.error("--essays must be a positive multiple of the batch size 4")
    return args


def encode_train_split(source: Path, seed: int, max_prompt_tokens: int | None = None):
    """Every essay of the converted train split, encoded as main_pipeline.py encodes it."""
    from modules.convert.corpora import convert_asap
    from modules.data import load_splits
    from modules.encoding import encode_example, prompt_token_budget
    from modules.losses import number_token_values
    from modules.models import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        convert_asap(source, Path(tmp) / "asap7", seed=seed)
        info, splits = load_splits(Path(tmp) / "asap7")
    tokenizer = load_tokenizer("smollm2-135m")
    budget = prompt_token_budget(splits["train"], tokenizer, False, 1024)
    if max_prompt_tokens is not None:
        budget = min(budget, max_prompt_tokens)
    values = number_token_values(tokenizer)
    return [encode_example(r, info, tokenizer, mtl=False, max_seq_length=1024, max_prompt_tokens=budget,
                           number_values=values) for r in splits["train"]], values


def sampled_batches(examples: list[dict], n_batches: int, group_by_length: bool, seed: int) -> list[list[int]]:
    """``n_batches`` batches of 4, spread evenly over one epoch's batch order of all ``examples``.

    The order is the Trainer's: a random permutation, or with ``group_by_length`` its length-grouped
    order (``get_length_grouped_indices``: megabatches of up to 50 batches sorted by length). A
    length-grouped order only pays off over many essays, so a few batches taken from the start of
    it would not be typical; batches spread over the whole epoch are.
    """
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    generator = torch.Generator().manual_seed(seed)
    lengths = [len(e["input_ids"]) for e in examples]
    order = (get_length_grouped_indices(lengths, 4, generator=generator) if group_by_length
             else torch.randperm(len(lengths), generator=generator).tolist())
    batches = [order[i:i + 4] for i in range(0, len(order) - 3, 4)]
    step = len(batches) / n_batches
    return [batches[int(i * step)] for i in range(n_batches)]


def padded_tokens(examples: list[dict], batches: list[list[int]]) -> float:
    """Tokens per essay the model runs over once each batch is padded to its longest essay."""
    return sum(len(b) * max(len(examples[i]["input_ids"]) for i in b) for b in batches) / (4 * len(batches))


def time_setting(examples: list[dict], batches: list[list[int]], number_values, seed: int, *, top_layers: int = 0,
                 target_modules: tuple[str, ...] = ("q_proj", "v_proj"), bf16: bool = False, compile: bool = False,
                 threads: int | None = None, **_) -> dict:
    """One epoch over ``batches`` (in that order) with a fresh LoRA; essays/s from the Trainer's runtime."""
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
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, seed=seed, num_train_epochs=1, learning_rate=1e-3, per_device_train_batch_size=4,
            gradient_accumulation_steps=1, warmup_steps=0.03, eval_strategy="no", save_strategy="no",
            logging_steps=len(batches), report_to=[], label_names=LABEL_NAMES, remove_unused_columns=False,
            use_cpu=True, bf16=bf16, torch_compile=compile, dataloader_num_workers=0,
            train_sampling_strategy="sequential")
        trainer = CustomTrainer(model=model, args=args, train_dataset=ordered,
                                data_collator=ScoringCollator(tokenizer.pad_token_id),
                                loss_config=LossConfig(number_values, ntl_weight=2.0, emo_weight=0.0))
        result = trainer.train()
    torch.set_num_threads(default_threads)
    seconds = result.metrics["train_runtime"]
    return {"essays_per_s": len(ordered) / seconds, "seconds": seconds, "loss": result.training_loss,
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
    levers = [] if args.levers is None else args.levers or list(LEVERS)
    settings = {"default": {}, **{name: LEVERS[name] for name in levers}, "recipe": CPU_RECIPE}
    encoded = {}
    results = {}
    started = time.perf_counter()
    for name, setting in settings.items():
        cut = setting.get("max_prompt_tokens")
        if cut not in encoded:
            encoded[cut] = encode_train_split(source, args.seed, cut)
        examples, values = encoded[cut]
        batches = sampled_batches(examples, args.essays // 4, setting.get("group_by_length", False), args.seed)
        results[name] = row = time_setting(examples, batches, values, args.seed, **setting)
        print(f"{name:26s} {row['essays_per_s']:.3f} essays/s  ({row['seconds']:.1f} s for {args.essays} essays, "
              f"{row['padded_tokens']:.0f} padded tokens/essay, loss {row['loss']:.3f})", flush=True)
    print(f"total {time.perf_counter() - started:.0f} s")
    print(f"ratio={results['recipe']['essays_per_s'] / results['default']['essays_per_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
