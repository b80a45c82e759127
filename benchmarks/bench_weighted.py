"""Weighted-prediction speed and memory: the candidate scorer before and after the tree-attention
rewrite, in one process.

    python -m benchmarks.bench_weighted [--essays 10] [--adapter_dir DIR] [--threads N]

Both sides call the same ``modules.weighted.weighted_predict`` on ``smollm2-135m`` (with the LoRA
adapter in ``--adapter_dir`` when given); the old side swaps in the previous candidate scorer
(``benchmarks/reference_weighted.py``: a copy of the prompt cache repeated once per candidate,
one padded batch row each), the new side is the library's (all candidates as a token trie in one
row of the prompt's own cache). Two workloads, ``--essays`` essays each:

* ``asap7``: the first test essays of ``../shared/data/asap/asap_set7.tsv`` converted with
  ``modules.convert asap`` (seed 0), one holistic rubric 0-30: 31 candidates, two tokens for most
  of them with SmolLM2's digit-per-token numbers. Without that file, the shipped
  ``aes_dataset_mtl`` test essays given one synthetic 0-30 rubric instead (same candidates, the
  essays are synthetic), and the output says so.
* ``mtl``: the shipped ``aes_dataset_mtl`` test essays, 8 rubrics x 9 candidates (1-9), each
  rubric after the gold scores of the ones before it (what a valid greedy line gives).

Seconds: wall time of ``weighted_predict`` per essay, without any profiler, after one untimed
warm-up call per side; the sides alternate essay by essay (old first on even essays, new first
on odd ones), so drift in the machine's speed hits both alike. The process's CPU seconds are
printed too: on a machine shared with other jobs they move less than wall time.

Both sides run the prompt once per essay (the same prefill), which bounds the ratio. So the
prompt's forward alone is timed too (essay by essay, after the two sides), and the candidate
step's own ratio, (old - prefill) / (new - prefill), is printed with the whole call's.

Memory: the peak of live tensor bytes that ``weighted_predict`` allocates, measured on the essay
with the longest prompt in one extra call per side. On a GPU that is
``torch.cuda.max_memory_allocated()`` minus the bytes allocated before the call. On the CPU,
where torch keeps no allocator statistics and peak RSS mixes in the allocator's caching (freed
memory stays resident, and ``ru_maxrss`` is a peak over the whole process, so the second side
would be hidden behind the first), it is the torch profiler's ``profile_memory`` record: every
tensor allocation and free during the call with the running total, whose maximum is the peak.
That includes the prompt's own KV cache, activations and logits, so the old/new ratio of the
peaks is smaller than the ratio of the candidate caches themselves; the prompt cache's size
(layers x 2 x KV heads x head size x prompt tokens x bytes) is printed for reference.

Also printed: the largest difference between the two sides' probabilities (they compute the same
distribution; float rounding only). The last line is ``ratio=<old seconds / new seconds>``, the
smaller of the two workloads' ratios.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]

from benchmarks.bench_sampling import ASAP_SET7, MODEL, load_essays
from tests.reference_weighted import reference_scorer
from modules.data import DatasetInfo, EssayRecord, Rubric, build_prompt, load_splits
from modules.models import load_adapter, load_base_model
from modules.weighted import weighted_predict

SHIPPED = ROOT / "aes_dataset_mtl"
SIDES = {"old": reference_scorer, "new": nullcontext}


def workloads(n: int, workdir: Path) -> list[tuple[str, DatasetInfo, list[EssayRecord], bool, str]]:
    """(name, info, essays, mtl prompt, where the essays come from) for the two workloads."""
    if ASAP_SET7.is_file():
        asap_info, asap, source = load_essays(n, workdir)
    else:
        _, splits = load_splits(SHIPPED)
        asap_info = DatasetInfo((Rubric("holistic", 0, 30),))
        asap = [dataclasses.replace(r, scores=(15,)) for r in splits["test"][:n]]
        source = (f"{ASAP_SET7} not found: shipped aes_dataset_mtl test essays (synthetic) with one "
                  f"synthetic 0-30 rubric")
    mtl_info, splits = load_splits(SHIPPED)
    return [("asap7", asap_info, asap, False, source),
            ("mtl", mtl_info, splits["test"][:n], True, f"{SHIPPED} test split (synthetic essays)")]


def peak_bytes(call, device: torch.device) -> int:
    """Peak of live tensor bytes allocated during ``call()`` (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        call()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with tempfile.TemporaryDirectory() as tmp:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            call()
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    # "Total Allocated" is the running total of the bytes allocated since the profiler started.
    totals = [e["args"]["Total Allocated"] for e in events
              if e.get("name") == "[memory]" and e["args"].get("Device Type", 0) == 0]
    return max(totals, default=0)


def kv_bytes(model, tokens: int) -> int:
    """Bytes of a KV cache holding ``tokens`` tokens: layers x (K and V) x KV heads x head size."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    itemsize = next(model.parameters()).element_size()
    return config.num_hidden_layers * 2 * kv_heads * head_dim * tokens * itemsize


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--essays", type=int, default=10, help="essays per workload")
    p.add_argument("--adapter_dir", default=None, help=f"a LoRA adapter trained on {MODEL} (default: none)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's); 1 on a CPU shared with other jobs, whose "
                        "load makes the thread pool spin")
    args = p.parse_args()
    if args.essays < 1:
        p.error("--essays must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        loads = workloads(args.essays, Path(tmp))
    if args.adapter_dir:
        model, tokenizer = load_adapter(MODEL, args.adapter_dir)
    else:
        model, tokenizer = load_base_model(MODEL)
    device = next(model.parameters()).device
    print(f"{MODEL}{' + ' + args.adapter_dir if args.adapter_dir else ''}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {device}, {next(model.parameters()).dtype}")

    ratios = []
    for name, info, records, mtl, source in loads:
        prompts = [build_prompt(r, info, tokenizer, mtl=mtl) for r in records]
        prefixes = [list(r.scores) for r in records]
        lengths = [len(tokenizer(q, add_special_tokens=False)["input_ids"]) for q in prompts]
        candidates = sum(hi - lo + 1 for lo, hi in info.ranges)
        print(f"\n[{name}] essays: {source}")
        print(f"{len(prompts)} essays, prompts of {min(lengths)}-{max(lengths)} tokens "
              f"(mean {sum(lengths) / len(lengths):.0f}); {len(info.ranges)} rubric(s), {candidates} candidates per essay")

        def run(side: str, i: int):
            if side == "prefill":  # weighted_predict's first step, alone
                ids = torch.tensor([tokenizer(prompts[i], add_special_tokens=False)["input_ids"]], device=device)
                with torch.inference_mode():
                    return model(input_ids=ids, use_cache=True, logits_to_keep=1)
            with SIDES[side]():
                return weighted_predict(model, tokenizer, prompts[i], info.ranges, prefix_scores=prefixes[i])

        timed = (*SIDES, "prefill")
        for side in timed:  # warm-up: first-call costs (vocabulary tables, kernels) out of the timing
            run(side, 0)
        seconds, cpu_seconds = dict.fromkeys(timed, 0.0), dict.fromkeys(timed, 0.0)
        diff = 0.0
        for i in range(len(prompts)):
            results = {}
            for side in (("old", "new", "prefill") if i % 2 == 0 else ("new", "old", "prefill")):
                started, cpu_started = time.perf_counter(), time.process_time()
                results[side] = run(side, i)
                seconds[side] += time.perf_counter() - started
                cpu_seconds[side] += time.process_time() - cpu_started
            diff = max([diff] + [abs(a - b) for old, new in zip(results["old"].probabilities, results["new"].probabilities)
                                 for a, b in zip(old, new)])
        longest = max(range(len(prompts)), key=lengths.__getitem__)
        peaks = {side: peak_bytes(lambda: run(side, longest), device) for side in SIDES}
        for side in timed:
            peak = f"peak {peaks[side] / 2**20:8.1f} MiB (prompt of {lengths[longest]} tokens)" if side in peaks else ""
            print(f"{side:7s} {seconds[side] / len(prompts):8.3f} s/essay ({cpu_seconds[side] / len(prompts):.3f} CPU s)  "
                  f"{peak}")
        print(f"prompt KV cache of that essay: {kv_bytes(model, lengths[longest]) / 2**20:.1f} MiB; "
              f"max |p_old - p_new| = {diff:.2e}")
        ratios.append(seconds["old"] / seconds["new"])
        step = (seconds["old"] - seconds["prefill"]) / max(seconds["new"] - seconds["prefill"], 1e-9)
        print(f"[{name}] old/new: time {ratios[-1]:.2f}x (candidate step without the prefill {step:.2f}x), "
              f"peak memory {peaks['old'] / max(peaks['new'], 1):.2f}x")
    print(f"ratio={min(ratios):.2f}")


if __name__ == "__main__":
    main()
