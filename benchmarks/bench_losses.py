"""Step time and peak memory of a CE-only training step vs CE + NTL + EMO, on the same batch.

    python -m benchmarks.bench_losses [--models smollm2-135m,tiny-llama3-vocab] [--seq_len 512]

Models: ``smollm2-135m`` (vocabulary 49,152), ``tiny-llama3-vocab`` (a random tiny LLaMA with
Llama-3's vocabulary of 128,256, where the LM head dominates), ``tiny-random-llama``. Each step is
forward + backward + AdamW on a LoRA model. The batch mimics a scoring example: a prompt, then a
target of ``--target_len`` tokens whose first 16 are score digits (NTL) and the rest feedback (EMO).
Step times alternate between the two losses so drift on a shared machine hits both alike; peak
memory (max RSS) is measured in a fresh subprocess per model and loss. The last line is the
largest overhead over the models: ``overhead=<x>%``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch


from modules.losses import IGNORE_INDEX, number_token_values
from modules.models import add_lora, load_base_model
from modules.trainer import LossConfig, compute_loss_terms

LLAMA3_VOCAB = 128_256


def build_model(name: str):
    """The model with LoRA, and its number-token values."""
    if name == "tiny-llama3-vocab":
        from transformers import LlamaConfig, LlamaForCausalLM
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=LLAMA3_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
        model = LlamaForCausalLM(config)
        values = torch.full((LLAMA3_VOCAB,), float("nan"))
        values[:1000] = torch.arange(1000, dtype=torch.float32)  # Llama-3 has a token for every 0..999
    else:
        model, tokenizer = load_base_model(name)
        values = number_token_values(tokenizer)
    return add_lora(model, dropout=0.0), values


def build_batch(values: torch.Tensor, vocab: int, batch: int, seq_len: int, target_len: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=gen)
    number_ids = torch.nonzero(~torch.isnan(values)).squeeze(1)
    start = seq_len - target_len
    scores = number_ids[torch.randint(0, len(number_ids), (batch, 16), generator=gen)]
    ids[:, start:start + 16] = scores
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, start:] = ids[:, start:]
    ntl, emo = labels.clone(), labels.clone()
    ntl[:, start + 16:] = IGNORE_INDEX
    emo[:, start:start + 16] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "ntl_labels": ntl, "emo_labels": emo}


def configs(values: torch.Tensor) -> dict[str, LossConfig]:
    return {"ce": LossConfig(values, ntl_weight=0.0, emo_weight=0.0),
            "ce+ntl+emo": LossConfig(values, ntl_weight=2.0, emo_weight=0.1)}


def train_step(model, optimizer, batch, config: LossConfig) -> float:
    started = time.perf_counter()
    loss, _, _ = compute_loss_terms(model, batch, config)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def step_times(name: str, args) -> dict[str, float]:
    model, values = build_model(name)
    model.train()
    batch = build_batch(values, model.get_output_embeddings().weight.shape[0], args.batch, args.seq_len, args.target_len)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    losses = configs(values)
    for config in losses.values():  # warm-up
        train_step(model, optimizer, batch, config)
    times: dict[str, list[float]] = {k: [] for k in losses}
    for _ in range(args.steps):
        for key, config in losses.items():
            times[key].append(train_step(model, optimizer, batch, config))
    return {k: statistics.median(v) for k, v in times.items()}


def peak_rss_mb(name: str, loss: str, args) -> float:
    """Peak RSS of a fresh process that loads the model and runs two steps with one loss."""
    cmd = [sys.executable, __file__, "--models", name, "--seq_len", str(args.seq_len), "--batch", str(args.batch),
           "--target_len", str(args.target_len), "--_memory_of", loss]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def memory_child(name: str, loss: str, args) -> None:
    model, values = build_model(name)
    batch = build_batch(values, model.get_output_embeddings().weight.shape[0], args.batch, args.seq_len, args.target_len)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    for _ in range(2):
        train_step(model, optimizer, batch, configs(values)[loss])
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over exec from the parent.
    status = Path("/proc/self/status").read_text()
    peak_kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
    print(json.dumps({"peak_rss_mb": peak_kb / 1024}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="smollm2-135m,tiny-llama3-vocab")
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--target_len", type=int, default=96)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--_memory_of", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    if args._memory_of:
        memory_child(names[0], args._memory_of, args)
        return
    print(f"batch {args.batch} x {args.seq_len} tokens, target {args.target_len}, median of {args.steps} steps, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    overheads = []
    for name in names:
        times = step_times(name, args)
        memory = {loss: peak_rss_mb(name, loss, args) for loss in times}
        overhead = 100 * (times["ce+ntl+emo"] / times["ce"] - 1)
        overheads.append(overhead)
        for loss in times:
            print(f"{name:18s} {loss:11s} step {times[loss]:7.3f} s  peak RSS {memory[loss]:8.0f} MB")
        print(f"{name:18s} aux-loss step overhead {overhead:+.1f}%, memory {memory['ce+ntl+emo'] - memory['ce']:+.0f} MB")
    print(f"overhead={max(overheads):.1f}%")


if __name__ == "__main__":
    main()
