"""The real-essay benchmark's LoRA rows: each prompt run four times (as separate stages) vs once.

    python benchmarks/bench_one_prefill.py --work_dir runs/real_essays/ell [--essays 48] [--m 10]

``--work_dir`` is the work folder of a ``bench_real_essays.py`` command (its
``runs/real_essays/<corpus>``): the saved adapter of ``run_<variant>_seed<k>`` (``--variant``,
``--seed``) scores the first ``--essays`` essays of ``data_seed0/<--split>.jsonl`` with the prompts
it was trained on. Both sides give every LoRA row the benchmark scores: greedy and weighted (as
``main_pipeline.py`` scores them), constrained greedy, and ``--m`` self-consistency samples per
essay, unconstrained and ``--constrained``, at ``self_consistency.py run``'s defaults, essay i
drawing from seed + i.

* old: four passes, as the benchmark ran them before: ``main_pipeline.py``'s greedy + weighted
  scoring (one prefill for both), ``main_pipeline.py``-style constrained greedy over padded
  batches, then ``self_consistency.py``'s trie sampler twice, each running every prompt itself;
* new: ``bench_real_essays.one_prefill_batch``: one prefill per prompt, every row decoding from it.

Seconds: wall time summed over batches of ``self_consistency.py``'s essay batch (8) that the two
sides score in turn (old first on even batches, new first on odd ones), so drift in the machine's
speed hits both alike, after one untimed warm-up batch per side. The old side's model loads and
process starts (one ``main_pipeline.py`` and three processes per split in the old benchmark) are
not counted: the ratio is the computation's. Also printed, as the check that both sides score
alike: how many greedy, weighted and constrained greedy rows and how many essays' samples are
identical, and the largest difference of the weighted expected scores. The last line is
``ratio=<old seconds / new seconds>``. Run it alone: two cores.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_real_essays as bench  # noqa: E402

from modules.data import DatasetInfo, build_prompt, load_dataset_info, load_split  # noqa: E402
from modules.evaluation import predict_split  # noqa: E402
from modules.jsonio import read_json  # noqa: E402
from modules.models import load_adapter  # noqa: E402
from modules.sampling import trie_sample  # noqa: E402
from modules.scoring import score_line_budget  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work_dir", required=True, help="a bench_real_essays.py work folder (runs/real_essays/<corpus>)")
    p.add_argument("--variant", default="ce+ntl", choices=sorted(bench.VARIANTS))
    p.add_argument("--seed", type=int, default=0, help="the run's training seed, and the sampling seed")
    p.add_argument("--split", default="test")
    p.add_argument("--essays", type=int, default=48, help="the split's first N essays (plus one warm-up batch)")
    p.add_argument("--m", type=int, default=10, help="samples per essay")
    p.add_argument("--base_model", default="smollm2-135m")
    return p.parse_args(argv)


def four_passes(model, tokenizer, records, info, max_prompt_tokens: int, first_index: int, seed: int, m: int,
                sc: argparse.Namespace) -> tuple[list[dict], list[dict], dict[bool, list[list[dict]]]]:
    """:func:`bench_real_essays.one_prefill_batch`'s rows as four separate passes over the prompts."""
    predictions = predict_split(model, tokenizer, records, info, mtl=False, max_prompt_tokens=max_prompt_tokens,
                                batch_size=len(records))
    greedy = predict_split(model, tokenizer, records, info, mtl=False, max_prompt_tokens=max_prompt_tokens,
                           batch_size=len(records), weighted=False, constrained=True)
    prompts = [build_prompt(r, info, tokenizer, False, "chat", max_prompt_tokens) for r in records]
    drawn = {constrained: trie_sample(model, tokenizer, prompts, info.ranges,
                                      generator_seeds=[seed + first_index + i for i in range(len(records))],
                                      max_m=m, temperature=sc.temperature, top_k=sc.top_k, top_p=sc.top_p,
                                      max_new_tokens=score_line_budget(tokenizer, info.ranges, constrained),
                                      constrained=constrained)
             for constrained in (False, True)}
    return predictions, greedy, drawn


SIDES = {"old": four_passes, "new": bench.one_prefill_batch}


class Work(NamedTuple):
    """A benchmark work folder's saved adapter, loaded, and the essays it scores here."""
    model: object
    tokenizer: object
    info: DatasetInfo
    records: list  # the split's first --essays essays plus one warm-up batch
    max_prompt_tokens: int
    sc: argparse.Namespace  # self_consistency.py run's flags at their defaults


def load_work(args: argparse.Namespace) -> Work | None:
    """:class:`Work` for ``args`` (:func:`parse_args`'s), or None after an error line when the run
    has no saved adapter."""
    work = Path(args.work_dir)
    run_dir, data_dir = work / f"run_{args.variant}_seed{args.seed}", work / "data_seed0"
    if not (run_dir / "adapter_config.json").is_file():
        print(f"error: {run_dir}: no saved adapter; run bench_real_essays.py first", file=sys.stderr)
        return None
    info = load_dataset_info(data_dir)
    split_path = data_dir / f"{args.split}.jsonl"
    sc = bench.sc_settings(run_dir, args.base_model, split_path)
    records = load_split(split_path, info)[:args.essays + sc.essay_batch]
    max_prompt_tokens = read_json(run_dir / "run_manifest.json")["max_prompt_tokens"]
    return Work(*load_adapter(args.base_model, run_dir), info, records, max_prompt_tokens, sc)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    loaded = load_work(args)
    if loaded is None:
        return 2
    model, tokenizer, info, records, max_prompt_tokens, sc = loaded
    work = Path(args.work_dir)
    batches = [(start, records[start:start + sc.essay_batch]) for start in range(0, len(records), sc.essay_batch)]
    seconds = {side: 0.0 for side in SIDES}
    outputs: dict[str, list] = {side: [] for side in SIDES}
    for number, (start, batch) in enumerate(batches):
        order = list(SIDES) if number % 2 == 0 else list(SIDES)[::-1]
        for side in order:
            began = time.perf_counter()
            rows = SIDES[side](model, tokenizer, batch, info, max_prompt_tokens, start, args.seed, args.m, sc)
            if number:  # batch 0 warms both sides up
                seconds[side] += time.perf_counter() - began
                outputs[side].append(rows)
        print(f"batch {number}/{len(batches) - 1}: old {seconds['old']:.1f} s, new {seconds['new']:.1f} s", flush=True)
    pairs = list(zip(outputs["old"], outputs["new"]))
    essays = sum(len(new[0]) for _, new in pairs)

    def same(part: int, key: str) -> int:
        return sum(a[key] == b[key] and a["valid"] == b["valid"] for old, new in pairs for a, b in zip(old[part], new[part]))

    same_samples = {constrained: sum(a == b for old, new in pairs for a, b in zip(old[2][constrained], new[2][constrained]))
                    for constrained in (False, True)}
    expected_gap = max(abs(x - y) for old, new in pairs for a, b in zip(old[0], new[0])
                       for x, y in zip(a["weighted_expected"], b["weighted_expected"]))
    prompt_tokens = [len(tokenizer(build_prompt(r, info, tokenizer, False, "chat", max_prompt_tokens),
                                   add_special_tokens=False)["input_ids"]) for _, batch in batches[1:] for r in batch]
    print(f"{work.name}: {essays} essays ({sum(prompt_tokens) / len(prompt_tokens):.0f} prompt tokens on average), "
          f"m = {args.m}")
    for side in SIDES:
        print(f"  {side}: {seconds[side]:.1f} s ({seconds[side] / essays:.2f} s an essay)")
    print(f"  identical: greedy {same(0, 'greedy')}/{essays}, weighted {same(0, 'weighted')}/{essays} (expected "
          f"scores at most {expected_gap:.2g} apart), constrained greedy {same(1, 'greedy')}/{essays}, samples "
          f"{same_samples[False]}/{essays}, constrained samples {same_samples[True]}/{essays}")
    print(f"ratio={seconds['old'] / seconds['new']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
