"""Self-consistency sampling speed: the original ``generate`` sampler vs the trie sampler, in one process.

    python -m benchmarks.bench_sampling [--essays 4] [--max_m 50] [--chunk_m 10] [--adapter_dir DIR]

Both samplers draw ``max_m`` samples for the same essays from ``smollm2-135m`` (with the LoRA
adapter in ``--adapter_dir`` when given, else the instruct model itself), with the CLI's sampling
defaults (temperature 0.7, top-k 9, 16 new tokens, stop at the end of the score line). The
essays are real: the first ``--essays`` of the test split of ``../shared/data/asap/asap_set7.tsv``
converted with ``modules.convert asap`` (seed 0); without that file, the shipped
``aes_dataset_mtl`` test split, and the output says so. ``generate`` runs essay by essay as the
original did; the trie sampler batches ``--essay_batch`` essays, as the CLI does by default.
Also printed: the share of valid score lines, for both, as a coarse check that they sample the
same thing (the distributional test is ``tests/test_self_consistency.py``). The last line is
``ratio=<generate seconds / trie seconds>``.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from modules.convert.corpora import convert_asap
from modules.data import build_prompt, load_splits
from modules.models import load_adapter, load_base_model
from modules.sampling import SAMPLERS

ASAP_SET7 = ROOT.parent / "shared" / "data" / "asap" / "asap_set7.tsv"
MODEL = "smollm2-135m"


def load_essays(n: int, workdir: Path):
    """The first n test essays of ASAP set 7 (converted here), else of the shipped dataset."""
    if ASAP_SET7.is_file():
        convert_asap(ASAP_SET7, workdir / "asap7", seed=0)
        info, splits = load_splits(workdir / "asap7")
        source = f"{ASAP_SET7} (ASAP set 7, converted with seed 0)"
    else:
        info, splits = load_splits(ROOT / "aes_dataset_mtl")
        source = f"{ASAP_SET7} not found: using the shipped aes_dataset_mtl test split (synthetic essays)"
    return info, splits["test"][:n], source


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--essays", type=int, default=4)
    p.add_argument("--max_m", type=int, default=50)
    p.add_argument("--chunk_m", type=int, default=10)
    p.add_argument("--essay_batch", type=int, default=8, help="essays per trie-sampler call (the CLI default)")
    p.add_argument("--adapter_dir", default=None, help=f"a LoRA adapter trained on {MODEL} (default: none)")
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        info, records, source = load_essays(args.essays, Path(tmp))
    if args.adapter_dir:
        model, tokenizer = load_adapter(MODEL, args.adapter_dir)
    else:
        model, tokenizer = load_base_model(MODEL)
    prompts = [build_prompt(r, info, tokenizer) for r in records]
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    seeds = [args.seed + i for i in range(len(prompts))]
    settings = dict(max_m=args.max_m, chunk_m=args.chunk_m, temperature=0.7, top_k=9, max_new_tokens=16)
    print(f"essays: {source}")
    print(f"{len(prompts)} essays, prompts of {min(lengths)}-{max(lengths)} tokens (mean {sum(lengths) / len(lengths):.0f}); "
          f"{MODEL}{' + ' + args.adapter_dir if args.adapter_dir else ''}; m={args.max_m}, chunk_m={args.chunk_m}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {next(model.parameters()).device}")

    seconds = {}
    for name, batch in (("generate", 1), ("trie", args.essay_batch)):
        started, bank = time.perf_counter(), []
        for i in range(0, len(prompts), batch):
            bank += SAMPLERS[name](model, tokenizer, prompts[i:i + batch], info.ranges,
                                   generator_seeds=seeds[i:i + batch], **settings)
        seconds[name] = time.perf_counter() - started
        drawn = sum(len(samples) for samples in bank)
        valid = sum(s["scores"] is not None for samples in bank for s in samples)
        print(f"{name:9s} {seconds[name]:8.1f} s  {seconds[name] / len(prompts):7.2f} s/essay  "
              f"{drawn / seconds[name]:7.1f} samples/s  valid score lines {100 * valid / drawn:5.1f}%")
    print(f"ratio={seconds['generate'] / seconds['trie']:.1f}")


if __name__ == "__main__":
    main()
