"""``python -m modules.convert``: the argument parser and one subcommand per dataset source.

``synth`` writes the synthetic sample dataset (``synthetic.py``); ``asap``, ``ellipse`` and
``csv`` convert real corpora (``corpora.py``). An input error is one ``error:`` line, exit 2.
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
from typing import Sequence

from modules.cli import ArgumentParser
from modules.convert.corpora import convert_asap, convert_csv, convert_ellipse, parse_split
from modules.convert.lexicon import SPLIT_SIZES
from modules.convert.pipeline import DEFAULT_SPLIT
from modules.convert.synthetic import write_synthetic
from modules.jsonio import DataError


def _cmd_synth(args: argparse.Namespace) -> int:
    summary = write_synthetic(args.out_dir, args.seed,
                              {"train": args.n_train, "valid": args.n_valid, "test": args.n_test})
    print(f"wrote {args.out_dir}: {summary['sizes']}, mean {summary['mean_words']:.1f} words")
    for name, v in summary["qwk"].items():
        print(f"  ridge QWK {name:<15} {v:.3f}")
    print(f"  ridge QWK {'mean':<15} {sum(summary['qwk'].values()) / len(summary['qwk']):.3f}")
    return 0


def _range(text: str) -> tuple[float, float]:
    match = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*-\s*(-?\d+(?:\.\d+)?)\s*", text)
    if not match:
        raise ValueError(f"range {text!r} is not LO-HI (e.g. 1-6)")
    return float(match.group(1)), float(match.group(2))


def _list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _split_arg(text: str) -> tuple[float, float, float]:
    try:
        return parse_split(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _ranges_arg(text: str) -> list[tuple[float, float]]:
    try:
        return [_range(v) for v in text.split(",")]
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out_dir", required=True, help="dataset folder to write")
    p.add_argument("--seed", type=int, default=0, help="split seed")
    p.add_argument("--split", type=_split_arg, default=DEFAULT_SPLIT, metavar="TRAIN,VALID,TEST",
                   help="split fractions, normalised by their sum (default 0.7,0.15,0.15)")
    p.add_argument("--name", default=None, help="dataset name in dataset.json")
    p.add_argument("--no_mojibake_repair", action="store_true",
                   help="keep cp1252-read UTF-8 sequences such as 'â€™' as they are")
    p.add_argument("--overwrite", action="store_true", help="replace the dataset files in an existing --out_dir")


def _add_corpus_parsers(sub) -> None:
    """Register the ``asap``, ``ellipse`` and ``csv`` subcommands (real corpora, ``corpora.py``)."""
    p = sub.add_parser("asap", help="ASAP training_set_rel3.tsv layout")
    p.add_argument("input", help="tab-separated ASAP file (UTF-8, cp1252 or Latin-1)")
    p.add_argument("--essay_set", type=int, nargs="+", default=None,
                   help="essay set(s) to convert (default: every set in the file; rubrics must match)")
    p.add_argument("--no_traits", action="store_true", help="holistic score only, even when trait columns exist")
    _common(p)
    p.set_defaults(func=_cmd_asap)

    p = sub.add_parser("ellipse", help="ELLIPSE CSV, the Feedback Prize - ELL layout (text_id, six traits) or the corpus's "
                            "release layout (text_id_kaggle, traits + Overall, prompt); 1.0-5.0 -> 2..10")
    p.add_argument("input")
    _common(p)
    p.set_defaults(func=_cmd_ellipse)

    p = sub.add_parser("csv", help="any table with a text column and integer score columns")
    p.add_argument("input")
    p.add_argument("--text_col", required=True)
    p.add_argument("--score_cols", type=_list, required=True, help="comma-separated score columns (rubric order)")
    p.add_argument("--ranges", type=_ranges_arg, required=True,
                   help="LO-HI per score column, comma-separated, or one for all (e.g. 1-6,1-4)")
    p.add_argument("--id_col", default=None, help="id column (default: row-N)")
    p.add_argument("--prompt_col", default=None, help="prompt column (default: one prompt)")
    p.add_argument("--prompt_text", default="", help="writing prompt text when there is no --prompt_col")
    p.add_argument("--scale", type=float, default=1, help="multiply scores by this before storing (e.g. 2 for halves)")
    p.add_argument("--delimiter", default=None, help="field delimiter (default: tab for .tsv, else comma)")
    p.add_argument("--language", default="en")
    _common(p)
    p.set_defaults(func=_cmd_csv)


def _shared_kwargs(args: argparse.Namespace) -> dict:
    return dict(seed=args.seed, fractions=args.split, name=args.name, repair_mojibake=not args.no_mojibake_repair,
                overwrite=args.overwrite)


def _cmd_asap(args: argparse.Namespace) -> int:
    report = convert_asap(args.input, args.out_dir, essay_sets=args.essay_set, traits=not args.no_traits,
                          **_shared_kwargs(args))
    print(report.format())
    return 0


def _cmd_ellipse(args: argparse.Namespace) -> int:
    report = convert_ellipse(args.input, args.out_dir, **_shared_kwargs(args))
    print(report.format())
    return 0


def _cmd_csv(args: argparse.Namespace) -> int:
    delimiter = {"\\t": "\t", "tab": "\t"}.get(args.delimiter, args.delimiter)
    report = convert_csv(args.input, args.out_dir, text_col=args.text_col, score_cols=args.score_cols,
                         ranges=args.ranges, id_col=args.id_col, prompt_col=args.prompt_col, scale=args.scale,
                         delimiter=delimiter, language=args.language, prompt_text=args.prompt_text,
                         **_shared_kwargs(args))
    print(report.format())
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Top-level parser; each converter registers one subcommand with ``func``."""
    parser = ArgumentParser(prog="python -m modules.convert",
                            description="Dataset converters and sample-data generator.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("synth", help="write the deterministic synthetic sample dataset")
    p.add_argument("--out_dir", default="aes_dataset_mtl")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n_train", type=int, default=SPLIT_SIZES["train"])
    p.add_argument("--n_valid", type=int, default=SPLIT_SIZES["valid"])
    p.add_argument("--n_test", type=int, default=SPLIT_SIZES["test"])
    p.set_defaults(func=_cmd_synth)
    _add_corpus_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DataError as err:  # bad input: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
