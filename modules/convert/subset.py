"""A seeded subset of a converted dataset folder: fewer essays per split, plus ``pick`` more
validation essays for choosing among scorers, written as a dataset folder of its own.

The real-essay benchmark trains and scores on such subsets so that a command fits in the hour;
every command on a corpus and data seed shares one.
"""
from __future__ import annotations

import random
from pathlib import Path

from modules.data import SPLITS
from modules.jsonio import DataError, iter_jsonl, read_json, write_json_atomic, write_jsonl_atomic


def read_records(path: Path) -> list[dict]:
    """A split file's records as raw dicts, in file order."""
    return [record for _, record in iter_jsonl(path)]


def subset_sizes(full_dir: Path, train: int | None, valid: int, test: int) -> dict[str, int]:
    """Essays per split of the subset; ``train`` None: every essay of the converted training split
    in ``full_dir``."""
    train = train if train is not None else len(read_records(full_dir / "train.jsonl"))
    return {"train": train, "valid": valid, "test": test}


def subset_draws(full_dir: Path, sizes: dict[str, int], pick: int, seed: int) -> dict[str, list[dict]]:
    """The subset's records per split (file order kept): a seeded sample of each converted split, then
    ``pick`` more validation essays (the pick essays) from those the validation sample left. One RNG
    draws them in this order, so the train, valid and test samples do not depend on ``pick``."""
    rng = random.Random(seed)
    records, chosen = {}, {}
    for split in SPLITS:
        records[split] = read_records(full_dir / f"{split}.jsonl")
        if sizes[split] > len(records[split]):
            raise DataError(f"--{split}_essays {sizes[split]} is more than the {len(records[split])} essays of the "
                            f"converted {split} split")
        chosen[split] = sorted(rng.sample(range(len(records[split])), sizes[split]))
    taken = set(chosen["valid"])
    left = [i for i in range(len(records["valid"])) if i not in taken]
    if pick > len(left):
        raise DataError(f"--pick_essays {pick} is more than the {len(left)} validation essays the "
                        f"--valid_essays sample leaves in {full_dir / 'valid.jsonl'}")
    draws = {split: [records[split][i] for i in chosen[split]] for split in SPLITS}
    draws["pick"] = [records["valid"][i] for i in sorted(rng.sample(left, pick))]
    return draws


def make_subset(full_dir: Path, data_dir: Path, sizes: dict[str, int], pick: int, seed: int,
                system_prompt: str | None = None) -> None:
    """:func:`subset_draws` written as one dataset folder (``pick.jsonl`` beside the three splits, which
    main_pipeline.py does not read), with ``system_prompt`` in its dataset.json; an existing folder
    (another command's) is reused when it was made with the same seed, sizes, pick count and system
    prompt, else DataError."""
    if (data_dir / "dataset.json").is_file():
        meta = read_json(data_dir / "dataset.json")
        made = meta.get("subset", {})
        if (made.get("seed") != seed or made.get("sizes") != sizes or made.get("pick", 0) != pick
                or meta.get("system_prompt") != system_prompt):
            raise DataError(f"{data_dir}: made with seed {made.get('seed')}, sizes {made.get('sizes')}, "
                            f"{made.get('pick', 0)} pick essays and system prompt {meta.get('system_prompt')!r}, not "
                            f"{seed}, {sizes}, {pick} and {system_prompt!r}; use another --out_dir")
        return
    draws = subset_draws(full_dir, sizes, pick, seed)
    data_dir.mkdir(parents=True)
    meta = read_json(full_dir / "dataset.json")
    meta["subset"] = {"of": str(full_dir), "seed": seed, "sizes": sizes, "pick": pick}
    if system_prompt is not None:
        meta["system_prompt"] = system_prompt
    for split, records in draws.items():
        if records or split != "pick":
            write_jsonl_atomic(data_dir / f"{split}.jsonl", records)
    write_json_atomic(data_dir / "dataset.json", meta)
