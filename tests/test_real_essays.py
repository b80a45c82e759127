"""The real-essay benchmark's recording and aggregation (benchmarks/result_files.py,
benchmarks/real_essay_tables.py, benchmarks/trust_tables.py, benchmarks/bench_real_essays.py) on
hand-made result files: no training here."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from benchmarks import bench_real_essays as bench
from benchmarks import real_essay_tables as tables
from benchmarks import result_files, trust_tables
from modules.convert.baseline import TUNED_RIDGE, mean_predictions
from modules.convert.subset import subset_draws, subset_sizes
from modules.jsonio import DataError, read_json
from modules.metrics import mcrmse, mean_qwk, rubric_qwks

ROOT = Path(__file__).resolve().parents[1]
RANGES = [(0, 4), (0, 4)]
RUBRICS = [{"name": "ideas", "min": 0, "max": 4}, {"name": "style", "min": 0, "max": 4}]
GOLD_TEST = [[0, 1], [1, 1], [2, 2], [3, 3], [4, 4], [2, 3], [1, 0], [3, 4]]
GOLD_VALID = [[0, 0], [1, 2], [2, 2], [3, 3], [4, 3], [2, 1]]


def result(variant: str, seed: int, test_rows: dict, valid_rows: dict, *, sizes: dict | None = None,
           gold_test=GOLD_TEST, gold_valid=GOLD_VALID, rubrics=RUBRICS) -> dict:
    """A result file's content as the benchmark writes it, with the given rows' predictions."""
    def split(gold, rows):
        return {"ids": [f"e{i}" for i in range(len(gold))], "gold": gold, "rows": rows, "weighted_expected": None,
                "line_counts": {"greedy": {"lines": len(gold), "invalid": 1, "truncated": 1}}}

    return {"corpus": "toy", "variant": variant, "seed": seed, "replicate": False, "rows": list(test_rows),
            "rubrics": rubrics, "data": {"sha256": "abc", "data_seed": 0, "sizes": sizes or {"train": 9, "valid": 6, "test": 8}},
            "splits": {"test": split(gold_test, test_rows), "valid": split(gold_valid, valid_rows)}}


def shifted(gold, k: int, step: int = 1, lo: int = 0, hi: int = 4) -> list[list[int]]:
    """gold with every `step`-th essay's first rubric moved by k (clipped): a controlled error."""
    return [[min(max(g[0] + (k if i % step == 0 else 0), lo), hi), g[1]] for i, g in enumerate(gold)]


# --------------------------------------------------------------------------- baselines and per-seed values


def test_training_mean_baseline_rounds_half_up_and_clips() -> None:
    def recs(rows):
        return [{"essay": "x", "scores": dict(zip("abc", r))} for r in rows]

    rubrics = [{"name": n, "min": 0, "max": 5} for n in "abc"]
    train = recs([[2, 1, 0], [3, 2, 1], [3, 4, 0]])  # means 2.667, 2.333, 0.333
    assert mean_predictions(train, recs([[0, 0, 0]] * 2), rubrics) == {"a": [3, 3], "b": [2, 2], "c": [0, 0]}
    # mean 2.5 rounds up to 3 (Python's round would give 2); a mean below the range is clipped to it
    rubrics = [{"name": "a", "min": 0, "max": 5}, {"name": "b", "min": 2, "max": 6}]
    assert mean_predictions(recs([[2, 0], [3, 1]]), recs([[0, 0]]), rubrics) == {"a": [3], "b": [2]}


def test_spread() -> None:
    s = result_files.spread([0.70, 0.72, 0.74])
    assert s["mean"] == pytest.approx(0.72) and s["sd"] == pytest.approx(0.02)
    assert (s["min"], s["max"]) == (0.70, 0.74)
    one = result_files.spread([0.5])
    assert one["mean"] == 0.5 and math.isnan(one["sd"])


def test_minutes_round_before_splitting() -> None:
    assert [tables.minutes(s) for s in (None, 0.4, 59.5, 1139.5, 1806.2, 3075.2)] == \
        ["-", "0 min 0 s", "1 min 0 s", "19 min 0 s", "30 min 6 s", "51 min 15 s"]


# --------------------------------------------------------------------------- result files and tables


def test_result_file_round_trip_and_no_overwrite(tmp_path: Path) -> None:
    content = result("ce+ntl", 2, {"greedy": GOLD_TEST}, {"greedy": GOLD_VALID})
    path = result_files.result_path(tmp_path, "toy", "ce+ntl", 2, "abc1234", "20261201T000000Z")
    assert path == tmp_path / "toy" / "ce-ntl_seed2_abc1234_20261201T000000Z.json"
    result_files.write_result(path, content)
    [back] = result_files.read_results(tmp_path)
    assert back["_path"] == str(path) and back["schema"] == result_files.SCHEMA
    assert {k: v for k, v in back.items() if k not in ("_path", "schema")} == content
    with pytest.raises(DataError, match="never overwritten"):
        result_files.write_result(path, content)
    (tmp_path / "toy" / "other.json").write_text(json.dumps({"corpus": "toy"}))
    with pytest.raises(DataError, match="other.json: not a real-essay result file"):
        result_files.read_results(tmp_path)


def test_best_row_is_chosen_on_validation_not_test() -> None:
    # On test, greedy is exact and weighted is off; on validation it is the other way round.
    test_rows = {"greedy": GOLD_TEST, "weighted": shifted(GOLD_TEST, 2)}
    valid_rows = {"greedy": shifted(GOLD_VALID, 2), "weighted": GOLD_VALID}
    group = tables.Group([{**result("ce+ntl", 0, test_rows, valid_rows), "_path": "a"}])
    assert mean_qwk(GOLD_TEST, test_rows["greedy"], RANGES) > mean_qwk(GOLD_TEST, test_rows["weighted"], RANGES)
    variant, row, value = group.best_on_validation()
    assert (variant, row) == ("ce+ntl", "weighted") and value == pytest.approx(1.0)


def test_pick_essays_join_the_validation_essays_for_the_row_pick(tmp_path: Path, capsys) -> None:
    # On the 6 validation essays greedy is exact; on the 5 pick essays weighted is, and greedy is far off:
    # over all 11, weighted wins. Test rows are the same for both, so test cannot decide.
    gold_pick = [[0, 1], [4, 4], [1, 3], [3, 0], [2, 2]]
    pick_rows = {"greedy": [[4 - a, 4 - b] for a, b in gold_pick], "weighted": gold_pick}
    valid_rows = {"greedy": GOLD_VALID, "weighted": shifted(GOLD_VALID, 1, step=3)}
    test_rows = {"greedy": GOLD_TEST, "weighted": GOLD_TEST}

    def with_pick(seed: int) -> dict:
        content = result("ce+ntl", seed, test_rows, valid_rows)
        content["splits"]["pick"] = {"ids": [f"p{i}" for i in range(5)], "gold": gold_pick, "rows": pick_rows}
        return content

    for seed in (0, 1):
        result_files.write_result(tmp_path / "toy" / f"r{seed}.json", with_pick(seed))
    group = tables.Group(result_files.read_results(tmp_path))
    assert group.validation_splits() == ["valid", "pick"]
    gold = GOLD_VALID + gold_pick
    weighted = mean_qwk(gold, valid_rows["weighted"] + gold_pick, RANGES)
    greedy = mean_qwk(gold, GOLD_VALID + pick_rows["greedy"], RANGES)
    assert weighted > greedy and mean_qwk(GOLD_VALID, valid_rows["weighted"], RANGES) < 1.0
    assert group.validation_means() == {("ce+ntl", "greedy"): pytest.approx(greedy),
                                        ("ce+ntl", "weighted"): pytest.approx(weighted)}
    assert group.best_on_validation() == ("ce+ntl", "weighted", pytest.approx(weighted))
    assert tables.main(["--results", str(tmp_path), "--bootstrap", "20"]) == 0
    out = capsys.readouterr().out
    assert (f"best LoRA row on the validation essays (6 validation + 5 pick): LoRA CE+NTL, weighted "
            f"(mean validation average QWK {weighted:.3f})") in out
    assert (f"validation average QWK per LoRA row (mean over seeds): LoRA CE+NTL, greedy {greedy:.3f}; "
            f"LoRA CE+NTL, weighted {weighted:.3f}") in out
    # a seed without the pick essays (an older file): the pick falls back to the validation essays
    result_files.write_result(tmp_path / "toy" / "r2.json", result("ce+ntl", 2, test_rows, valid_rows))
    group = tables.Group(result_files.read_results(tmp_path))
    assert group.validation_splits() == ["valid"]
    assert group.best_on_validation() == ("ce+ntl", "greedy", pytest.approx(1.0))


def test_subset_draws_keep_the_splits_and_add_unseen_validation_essays(tmp_path: Path) -> None:
    pools = {"train": 12, "valid": 9, "test": 7}
    for split, n in pools.items():
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps({"id": f"{split}{i}"}) + "\n" for i in range(n)))
    sizes = {"train": 5, "valid": 4, "test": 3}
    without = subset_draws(tmp_path, sizes, 0, seed=3)
    draws = subset_draws(tmp_path, sizes, 5, seed=3)
    ids = {split: [r["id"] for r in records] for split, records in draws.items()}
    assert all(ids[split] == [r["id"] for r in without[split]] for split in sizes)  # the pick draw comes last
    assert without["pick"] == [] and len(ids["pick"]) == 5 and ids["pick"] == sorted(ids["pick"], key=lambda i: int(i[5:]))
    assert set(ids["pick"]) == {f"valid{i}" for i in range(9)} - set(ids["valid"])  # every essay the sample left
    fewer = [r["id"] for r in subset_draws(tmp_path, sizes, 2, seed=3)["pick"]]
    assert len(fewer) == 2 and set(fewer) < set(ids["pick"])
    assert fewer == [r["id"] for r in subset_draws(tmp_path, sizes, 2, seed=3)["pick"]]  # seeded
    with pytest.raises(DataError, match=r"--pick_essays 6 is more than the 5 validation essays the --valid_essays "
                                        r"sample leaves in .*valid.jsonl"):
        subset_draws(tmp_path, sizes, 6, seed=3)
    # The traits default takes every training essay: the number is the converted split's.
    assert bench.parse_args(["--corpus", "asap-traits"]).train_essays is None
    assert subset_sizes(tmp_path, None, 4, 3) == {"train": 12, "valid": 4, "test": 3}
    assert subset_sizes(tmp_path, 800, 30, 200)["train"] == 800


def test_tables_with_missing_rows_and_one_seed(tmp_path: Path, capsys) -> None:
    full = {"greedy": shifted(GOLD_TEST, 1, step=2), "weighted": GOLD_TEST, "SC average": shifted(GOLD_TEST, 1, step=4),
            "training mean": [[2, 2]] * 8, "essay-length ridge": shifted(GOLD_TEST, -1, step=2)}
    valid = {"greedy": GOLD_VALID, "weighted": GOLD_VALID, "SC average": GOLD_VALID, "training mean": [[2, 2]] * 6}
    replicate = {"greedy": shifted(GOLD_TEST, 1, step=3), "weighted": shifted(GOLD_TEST, -1, step=4)}
    ce = {"greedy": shifted(GOLD_TEST, 2, step=2), "weighted": shifted(GOLD_TEST, 1, step=2)}
    replicate_run = {**result("ce+ntl", 1, replicate, valid), "replicate": True, "timings": {"total": 1806.4},
                     "training": {"seconds": 1636.4, "global_step": 500, "best_checkpoint": "checkpoint-400",
                                  "kept_checkpoint": "checkpoint-500",
                                  "eval_loss": [[1.0, 1.81187], [2.0, 1.8207], [2.5, 1.7688]],
                                  "precision": {"requested": "auto", "chosen": "fp32", "native_bf16": False,
                                                "reason": "this CPU has neither AVX512-BF16 nor AMX"}},
                     "machine": {"cpu": "AMD EPYC", "torch": "2.13.0+cpu"}, "git": {"commit": "ba22d2f", "dirty": False},
                     "command": "bench_real_essays.py --corpus asap --seed 1 --replicate"}
    for i, content in enumerate([result("ce+ntl", 0, full, valid), replicate_run, result("ce", 0, ce, valid),
                                 result("ce+ntl", 0, full, valid, sizes={"train": 5, "valid": 6, "test": 8})]):
        result_files.write_result(tmp_path / "toy" / f"r{i}.json", content)
    assert tables.main(["--results", str(tmp_path), "--bootstrap", "200"]) == 0
    out = capsys.readouterr().out
    assert out.count("## toy:") == 2  # the other subset size is another group, never pooled
    first = out.split("## toy:")[1]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in first.splitlines() if line.startswith("| ")}
    assert rows["LoRA CE+NTL, greedy"].split(" | ")[1] == "0,1"
    assert rows["LoRA CE+NTL, SC average"].split(" | ")[1] == "0"  # only seed 0 ran self-consistency
    assert "LoRA CE+NTL, SC majority" not in rows and "TF-IDF ridge, same essays" not in rows
    g0 = mean_qwk(GOLD_TEST, full["greedy"], RANGES)
    g1 = mean_qwk(GOLD_TEST, replicate["greedy"], RANGES)
    s = result_files.spread([g0, g1])
    assert f"{s['mean']:.3f} (sd {s['sd']:.3f}, {s['min']:.3f}-{s['max']:.3f}) [s0: {g0:.3f}, s1: {g1:.3f}]" \
        in rows["LoRA CE+NTL, greedy"]
    assert "MCRMSE" not in first  # scale 1: QWK only
    mean_row = rows["training mean"].split(" | ")
    assert mean_row[1:3] == ["-", f"{rubric_qwks(GOLD_TEST, [[2, 2]] * 8, RANGES)[0]:.3f}"]
    # CE+NTL minus CE only pairs seed 0 with seed 0 only, and says it covers the essays only
    ntl = rows["CE+NTL minus CE only, greedy"]
    assert " | 0 | " in ntl and "essays only (one seed)" in ntl
    diff = g0 - mean_qwk(GOLD_TEST, ce["greedy"], RANGES)
    assert f"| {diff:+.3f} |" in ntl
    assert "seeds and essays" in rows["LoRA CE+NTL, greedy minus training mean"]
    assert "best LoRA row on the validation essays (6 validation): LoRA CE+NTL, greedy" in first  # ties: table order
    assert "LoRA CE+NTL, greedy seed 0: 1 invalid, 1 truncated of 8" in first
    # one line per result file: what ran, how long, where, and the command
    assert ("| LoRA CE+NTL, seed 1 | greedy, weighted | 30 min 6 s | 27 min 16 s, 500 steps | 1.812, 1.821, 1.769 "
            "(checkpoint-500) | AMD EPYC, 2.13.0+cpu | fp32 (auto) | ba22d2f | "
            "`bench_real_essays.py --corpus asap --seed 1 --replicate` |" in first.splitlines())
    # a file from before --precision trained with the --bf16 the benchmark passed then
    [seed0] = [line for line in first.splitlines() if line.startswith("| LoRA CE+NTL, seed 0 |")]
    assert seed0.split(" | ")[6] == "bf16 (--bf16)"
    assert first.index("| LoRA CE+NTL, seed 0 | all |") < first.index("| LoRA CE+NTL, seed 1 |") \
        < first.index("| LoRA CE only, seed 0 | all |")


def test_results_pool_only_with_the_same_recipe_and_one_file_per_seed(tmp_path: Path, capsys) -> None:
    recipe = {"base_model": "smollm2-135m", "epochs": 2.5, "learning_rate": 0.001, "batch_size": 4, "m": 10}
    rows = {"greedy": GOLD_TEST}, {"greedy": GOLD_VALID}
    all_linear = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    files = {"r0": {**result("ce+ntl", 0, *rows), "config": {**recipe, "bootstrap": 2000}},
             # another checkpoint rule or bootstrap count is still the same recipe, and so is an older file
             # without --target_modules against a newer one with its default: pooled as seed 1
             "r1": {**result("ce+ntl", 1, *rows), "config": {**recipe, "bootstrap": 50, "load_best_model_at_end": False,
                                                               "target_modules": "q_proj,v_proj"}},
             # a lever's learning rate is its own group, not a third seed; so are other LoRA modules
             "r2": {**result("ce+ntl", 2, *rows), "config": {**recipe, "learning_rate": 0.0005}},
             "r4": {**result("ce+ntl", 0, *rows), "config": {**recipe, "target_modules": all_linear}}}
    for name, content in files.items():
        result_files.write_result(tmp_path / "toy" / f"{name}.json", content)
    assert tables.main(["--results", str(tmp_path), "--bootstrap", "20"]) == 0
    groups = capsys.readouterr().out.split("## toy:")[1:]
    assert len(groups) == 3
    pooled = next(g for g in groups if "seeds LoRA CE+NTL: [0, 1]\n" in g)
    lever = next(g for g in groups if "learning_rate 0.0005" in g)
    modules = next(g for g in groups if all_linear in g)
    assert "learning_rate 0.001, target_modules q_proj,v_proj, m 10\n" in pooled
    assert "seeds LoRA CE+NTL: [2]\n" in lever
    assert ("recipe: base_model smollm2-135m, epochs 2.5, batch_size 4, learning_rate 0.0005, "
            "target_modules q_proj,v_proj, m 10\n") in lever
    assert "seeds LoRA CE+NTL: [0]\n" in modules
    # two files for one seed of one recipe: refused, naming both, instead of one replacing the other
    result_files.write_result(tmp_path / "toy" / "r3.json", {**result("ce+ntl", 0, *rows), "config": recipe})
    assert tables.main(["--results", str(tmp_path), "--bootstrap", "20"]) == 2
    err = capsys.readouterr().err
    assert "r3.json: a second result for LoRA CE+NTL seed 0 with the same essays and recipe (the other: " in err
    assert "r0.json); keep one" in err


def test_ell_table_has_mcrmse_with_expected_scores(tmp_path: Path, capsys) -> None:
    rubrics = [{"name": "cohesion", "min": 2, "max": 10, "scale": 2}]
    gold = [[2], [4], [6], [8], [10], [6]]
    content = result("ce+ntl", 0, {"weighted": [[3], [4], [6], [8], [9], [6]]}, {"weighted": [[2]] * 6},
                     gold_test=gold, gold_valid=[[4]] * 6, rubrics=rubrics)
    content["splits"]["test"]["weighted_expected"] = [[2.5], [4.0], [6.0], [8.0], [9.5], [6.0]]
    result_files.write_result(tmp_path / "ell" / "r.json", content)
    assert tables.main(["--results", str(tmp_path), "--bootstrap", "50"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("| LoRA CE+NTL, weighted"))
    expected = mcrmse(gold, content["splits"]["test"]["weighted_expected"], [2])  # unrounded, not [[3], ...]
    assert expected == pytest.approx(math.sqrt((0.25 ** 2 * 2) / 6))
    assert line.rstrip(" |").endswith(f"{expected:.3f} (1 seed) [s0: {expected:.3f}]")


# --------------------------------------------------------------------------- the benchmark's own helpers


def test_benchmark_defaults_per_corpus() -> None:
    args = bench.parse_args(["--corpus", "ell"])
    assert (args.train_essays, args.epochs, args.test_essays, args.m) == (800, 1.5, 200, 3)
    # ELL draws 3 self-consistency samples to fit the hour; the ASAP corpora 10; --m overrides either
    assert [bench.parse_args(a).m for a in ([], ["--corpus", "asap-traits"], ["--corpus", "ell", "--m", "10"])] \
        == [10, 10, 10]
    assert args.input.endswith("ell/ell_train.csv") and bench.corpus_key(args) == "ell"
    args = bench.parse_args(["--corpus", "asap-traits", "--essay_set", "8", "--train_essays", "10"])
    assert args.train_essays == 10 and args.test_essays == 150 and bench.corpus_key(args) == "asap-set8-traits"
    assert bench.corpus_key(bench.parse_args([])) == "asap-set7"
    assert bench.parse_args(["--corpus", "asap-traits"]).train_essays is None  # every training essay
    # every corpus trains at batch 4 and lr 1e-3 (batch 8 at 2e-3 widened the spread: README, levers)
    assert [(a.batch_size, a.grad_accum, a.learning_rate) for a in map(bench.parse_args, ([], ["--corpus", "ell"]))] \
        == [(4, 1, 1e-3), (4, 1, 1e-3)]
    args = bench.parse_args(["--grad_accum", "2", "--learning_rate", "2e-3"])  # the batch-size lever
    assert (args.grad_accum, args.learning_rate) == (2, 2e-3)
    for zero in (["--grad_accum", "0"], ["--train_essays", "0"]):  # an explicit 0 is refused, not read as the default
        with pytest.raises(SystemExit):
            bench.parse_args(zero)
    # every corpus's recipe trains the score head kept on validation; --no_head is the recipe before it
    head = ("head_layer", "head_weight", "head_learning_rate")
    argvs = ([], ["--no_head"], ["--corpus", "asap-traits"], ["--corpus", "asap-traits", "--no_head"], ["--corpus", "ell"],
             ["--corpus", "ell", "--no_head"])
    assert [tuple(getattr(a, k) for k in head) for a in map(bench.parse_args, argvs)] \
        == [(21, None, 1e-4), (None, None, None), (20, None, 1e-4), (None, None, None), (19, None, 1e-4),
            (None, None, None)]
    args = bench.parse_args(["--head_layer", "20"])  # another layer keeps the recipe's head learning rate
    assert (args.head_layer, args.head_learning_rate) == (20, 1e-4)
    args = bench.parse_args(["--corpus", "ell", "--head_layer", "23", "--head_learning_rate", "1e-3"])  # both overridden
    assert (args.head_layer, args.head_learning_rate) == (23, 1e-3)
    with pytest.raises(SystemExit):
        bench.parse_args(["--no_head", "--head_layer", "20"])


def test_benchmark_baselines_on_a_tiny_dataset(tmp_path: Path) -> None:
    def records(n: int, offset: int) -> list[dict]:
        return [{"id": f"x{offset + i}", "essay": " ".join(["word"] * (5 + 3 * i)), "scores": {"ideas": min(i, 4), "style": 2}}
                for i in range(n)]

    for split, recs in {"train": records(6, 0), "valid": records(3, 100), "test": records(4, 200)}.items():
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (tmp_path / "dataset.json").write_text(json.dumps({"rubrics": RUBRICS}))
    entry = {"rows": {}}
    bench.baselines(tmp_path, records(6, 0) + records(2, 50), "test", entry)
    out = entry["rows"]
    assert list(out) == [TUNED_RIDGE, *result_files.BASELINE_ROWS]
    assert out["training mean"] == [[2, 2]] * 4  # ideas 0+1+2+3+4+4 = 14/6 -> 2, style 2
    # the tuned ridge's unrounded outputs, clipped to range, round half up to its row
    assert list(entry["continuous"]) == [TUNED_RIDGE]
    assert [[int(np.floor(v + 0.5)) for v in r] for r in entry["continuous"][TUNED_RIDGE]] == out[TUNED_RIDGE]
    assert all(len(rows) == 4 and all(len(r) == 2 for r in rows) for rows in out.values())
    assert all(lo <= v <= hi for rows in out.values() for r in rows for v, (lo, hi) in zip(r, RANGES))


def test_benchmark_traits_need_trait_columns(tmp_path: Path) -> None:
    header = "essay_id\tessay_set\tessay\tdomain1_score\n"
    src = tmp_path / "set7.tsv"
    src.write_text(header + "".join(f"{i}\t7\tEssay {i} about waiting.\t{i % 20}\n" for i in range(20)))
    args = bench.parse_args(["--corpus", "asap-traits", "--input", str(src)])
    with pytest.raises(DataError) as excinfo:
        bench.convert(args, tmp_path / "out")
    assert str(excinfo.value) == f"{src}: no trait columns for essay set 7 (ASAP publishes traits for sets 7 and 8); " \
                                 "use --corpus asap"
    assert not (tmp_path / "out").exists()  # nothing a later command could reuse as the traits' data
    with pytest.raises(DataError, match="no trait columns for essay set 3"):
        bench.convert(bench.parse_args(["--corpus", "asap-traits", "--input", str(src), "--essay_set", "3"]), tmp_path / "o3")
    bench.convert(bench.parse_args(["--corpus", "asap", "--input", str(src)]), tmp_path / "holistic")
    assert json.loads((tmp_path / "holistic" / "dataset.json").read_text())["rubrics"][0]["name"] == "holistic"


def test_benchmark_line_counts_and_missing_file(tmp_path: Path, capsys) -> None:
    preds = [{"valid": True, "truncated": False}, {"valid": False, "truncated": True}, {"valid": False, "truncated": False}]
    assert result_files.line_counts(preds) == {"lines": 3, "invalid": 2, "truncated": 1}
    assert bench.main(["--corpus", "ell", "--input", str(tmp_path / "absent.csv")]) == 0
    assert "not found" in capsys.readouterr().out


# --------------------------------------------------------------------------- which scores to trust


def twenty_essays(n: int, wrong: set[int]) -> tuple[np.ndarray, np.ndarray]:
    """(gold, pred) [n, 2] on 0-4: pred = gold except a 2-point error on rubric 0 of the ``wrong`` essays."""
    gold = np.array([[i % 5, (2 * i + 1) % 5] for i in range(n)])
    pred = gold.copy()
    for i in wrong:
        pred[i, 0] = gold[i, 0] + 2 if gold[i, 0] <= 2 else gold[i, 0] - 2
    return gold, pred


def ranks_wrong_last(n: int, wrong: set[int]) -> np.ndarray:
    """A confidence that puts exactly the ``wrong`` essays last (distinct values, file order otherwise)."""
    return np.array([-1.0 - i if i in wrong else 1.0 - i / n for i in range(n)])


WRONG_TEST = {3, 8, 13, 18}
WRONG_VALID = {1, 6}
WRONG_40 = set(range(3, 40, 5))


def test_selective_gain_matches_the_risk_coverage_table_on_resamples() -> None:
    from modules.confidence_report import risk_coverage_table

    rng = np.random.default_rng(5)
    gold = rng.integers(0, 5, (30, 2))
    pred = np.clip(gold + rng.integers(-2, 3, (30, 2)), 0, 4)
    signal = np.round(rng.random(30), 1)  # ties: stable order within each resample
    idx = np.vstack([np.arange(30), rng.integers(0, 30, (20, 30))])
    gains = trust_tables.selective_gain(signal, gold, pred, idx)
    for b, rows in enumerate(idx):
        table = risk_coverage_table(signal[rows], gold[rows], pred[rows], RANGES, coverages=(1.0, 0.8))
        assert gains[b] == pytest.approx(table["qwk"][1] - table["qwk"][0])
    other = rng.random(30)
    versus = trust_tables.selective_gain(signal, gold, pred, idx, reference=other)
    assert versus == pytest.approx(gains - trust_tables.selective_gain(other, gold, pred, idx))


def test_coverage_gain_bootstrap_on_a_hand_made_case() -> None:
    from modules.confidence import random_confidence

    gold, pred = twenty_essays(20, WRONG_TEST)
    good = ranks_wrong_last(20, WRONG_TEST)
    point, lo, hi = trust_tables.gain_with_interval(gold, [good], [pred], 1000, seed=0)
    # the 16 kept essays are exactly the correct ones: QWK 1 on them
    assert point == pytest.approx(1.0 - mean_qwk(gold, pred, RANGES)) and point > 0.05
    assert 0 < lo < point < hi
    point, lo, hi = trust_tables.gain_with_interval(gold, [-good], [pred], 1000, seed=0)  # wrong essays first
    assert point < 0 and hi < 0
    random_points = [trust_tables.gain_with_interval(gold, [random_confidence(20, s)], [pred], 1, seed=0)[0]
                     for s in range(300)]
    assert abs(np.mean(random_points)) < 0.02  # random order: no gain on average
    point, lo, hi = trust_tables.gain_with_interval(gold, [random_confidence(20, 7)], [pred], 1000, seed=0)
    assert lo < 0 < hi
    # picked minus random order, paired on the same resamples
    point, lo, hi = trust_tables.gain_with_interval(gold, [good], [pred], 1000, seed=0,
                                                    references=[random_confidence(20, 7)])
    kept = trust_tables.kept_qwk(random_confidence(20, 7), gold, pred, np.arange(20)[None, :])[0]
    assert point == pytest.approx(1.0 - kept) and point > 0 and lo >= 0  # never below random here


def with_study(content: dict, valid_signals: dict, test_signals: dict, report: dict | None = None) -> dict:
    """A result file's content with a confidence study (per-essay signals of the weighted row)."""
    signals = {"valid": {k: list(map(float, v)) for k, v in valid_signals.items()},
               "test": {k: list(map(float, v)) for k, v in test_signals.items()}}
    return {**content, "confidence": {"prediction": "weighted", "signals": signals, "report": report or {}}}


def trust_group(test_gold: np.ndarray, valid_gold: np.ndarray, test_pred, valid_pred, valid_signals: dict,
                test_signals: dict) -> tables.Group:
    content = result("ce+ntl", 0, {"weighted": test_pred.tolist()}, {"weighted": valid_pred.tolist()},
                     gold_test=test_gold.tolist(), gold_valid=valid_gold.tolist(),
                     sizes={"train": 9, "valid": len(valid_gold), "test": len(test_gold)})
    return tables.Group([{**with_study(content, valid_signals, test_signals), "_path": "a"}])


def picked_line(lines: list[str]) -> str:
    return next(line for line in lines if line.startswith("picked on the validation essays"))


def test_signal_is_picked_on_validation_and_never_looks_at_test_gold() -> None:
    gold_t, pred_t = twenty_essays(20, WRONG_TEST)
    gold_v, pred_v = twenty_essays(10, WRONG_VALID)
    # neg_std ranks the validation errors last and the test errors first; p_pred the other way round
    valid_signals = {"p_pred": -ranks_wrong_last(10, WRONG_VALID), "neg_std": ranks_wrong_last(10, WRONG_VALID),
                     "random": np.linspace(0, 1, 10)}
    test_signals = {"p_pred": ranks_wrong_last(20, WRONG_TEST), "neg_std": -ranks_wrong_last(20, WRONG_TEST),
                    "random": np.linspace(0, 1, 20)}
    lines = trust_tables.trust_lines(trust_group(gold_t, gold_v, pred_t, pred_v, valid_signals, test_signals),
                                     "ce+ntl", 200, 0)
    assert picked_line(lines).startswith("picked on the validation essays, never on test: neg_std,")
    rng = np.random.default_rng(0)
    for _ in range(3):  # scrambled test gold: the same pick
        scrambled = gold_t[rng.permutation(20)]
        lines = trust_tables.trust_lines(trust_group(scrambled, gold_v, pred_t, pred_v, valid_signals, test_signals),
                                         "ce+ntl", 50, 0)
        assert picked_line(lines).startswith("picked on the validation essays, never on test: neg_std,")
    swapped = {"p_pred": valid_signals["neg_std"], "neg_std": valid_signals["p_pred"], "random": valid_signals["random"]}
    lines = trust_tables.trust_lines(trust_group(gold_t, gold_v, pred_t, pred_v, swapped, test_signals),
                                     "ce+ntl", 50, 0)
    assert picked_line(lines).startswith("picked on the validation essays, never on test: p_pred,")


def test_pick_signal_matches_choose_signal_and_pools_seeds() -> None:
    from modules.review import choose_signal

    rng = np.random.default_rng(2)
    gold = rng.integers(0, 5, (25, 2))
    preds = [np.clip(gold + rng.integers(-2, 3, (25, 2)), 0, 4) for _ in range(2)]
    signals = [{s: rng.random(25) for s in ("p_pred", "neg_std", "length", "random")} for _ in range(2)]
    for k in range(2):
        assert trust_tables.pick_signal([(signals[k], gold, preds[k])])[0] == \
            choose_signal(signals[k], gold, preds[k], allowed=list(signals[k]))
    name, aurcs = trust_tables.pick_signal([(signals[k], gold, preds[k]) for k in range(2)])
    assert set(aurcs) == {"p_pred", "neg_std", "length"} and aurcs[name] == min(aurcs.values())
    assert "sc_agreement" not in trust_tables.pick_signal([({**signals[0], "sc_agreement": -preds[0][:, 0]},
                                                            gold, preds[0]),
                                                           (signals[1], gold, preds[1])])[1]  # not in every seed


def test_trust_table_from_result_files(tmp_path: Path, capsys) -> None:
    from modules.confidence import random_confidence

    gold_t, pred_t = twenty_essays(40, WRONG_40)
    gold_v, pred_v = twenty_essays(10, WRONG_VALID)
    good_v, good_t = ranks_wrong_last(10, WRONG_VALID), ranks_wrong_last(40, WRONG_40)
    length_t = np.arange(40.0)
    report = {"conformal": {"method": "LAC", "target_coverage": 0.9, "average_coverage": 0.95, "average_set_size": 2.5},
              "review": {"signal": "neg_std", "review_fraction": 0.2, "threshold": 0.5,
                         "test": {"review_share": 0.2, "n_auto": 32, "qwk_auto": 1.0}, "test_qwk_all": 0.8125}}
    sizes = {"train": 9, "valid": 10, "test": 40}
    seed0 = with_study(result("ce+ntl", 0, {"weighted": pred_t.tolist()}, {"weighted": pred_v.tolist()},
                              gold_test=gold_t.tolist(), gold_valid=gold_v.tolist(), sizes=sizes),
                       {"neg_std": good_v, "sc_agreement": -good_v, "length": np.arange(10.0),
                        "random": random_confidence(10, 1)},
                       {"neg_std": good_t, "sc_agreement": -good_t, "length": length_t,
                        "random": random_confidence(40, 0)}, report)
    replicate = with_study(result("ce+ntl", 1, {"weighted": pred_t.tolist()}, {"weighted": pred_v.tolist()},
                                  gold_test=gold_t.tolist(), gold_valid=gold_v.tolist(), sizes=sizes),
                           {"neg_std": good_v, "length": np.arange(10.0), "random": random_confidence(10, 2)},
                           {"neg_std": good_t, "length": length_t, "random": random_confidence(40, 1)})
    no_study = result("ce", 0, {"weighted": pred_t.tolist()}, {"weighted": pred_v.tolist()},
                      gold_test=gold_t.tolist(), gold_valid=gold_v.tolist(), sizes=sizes)
    for i, content in enumerate([seed0, replicate, no_study]):
        result_files.write_result(tmp_path / "toy" / f"r{i}.json", content)
    assert tables.main(["--results", str(tmp_path), "--bootstrap", "300"]) == 0
    out = capsys.readouterr().out
    assert out.count("### Which scores to trust") == 1  # the CE-only result has no study
    section = out.split("### Which scores to trust: LoRA CE+NTL, weighted (seeds 0,1)")[1]
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in section.splitlines() if line.startswith("| ")}
    assert list(rows)[1:] == ["neg_std (picked)", "sc_agreement", "length", "random"]  # confidence.SIGNALS order
    q100 = mean_qwk(gold_t, pred_t, RANGES)
    assert rows["neg_std (picked)"][1] == "0,1" and rows["sc_agreement"][1] == "0"  # SC only where it ran
    assert rows["neg_std (picked)"][2].startswith("1.000 (sd 0.000")  # AUROC: the errors ranked last
    assert rows["sc_agreement"][2] == "0.000 (1 seed) [s0: 0.000]"
    assert rows["neg_std (picked)"][3].startswith(f"{q100:.3f} (sd 0.000")
    assert rows["neg_std (picked)"][4].startswith("1.000 (sd 0.000")
    assert rows["neg_std (picked)"][5].startswith(f"{1 - q100:.3f} (sd 0.000")
    lo, hi = map(float, rows["neg_std (picked)"][6].strip(" |[]").split(", "))
    assert 0 < lo <= hi
    kept = trust_tables.kept_qwk(length_t, gold_t, pred_t, np.arange(40)[None, :])[0]
    assert rows["length"][4] == f"{kept:.3f} (sd 0.000, {kept:.3f}-{kept:.3f}) [s0: {kept:.3f}, s1: {kept:.3f}]"
    assert "never on test: neg_std," in section and "sc_agreement" not in picked_line(section.splitlines())
    assert "neg_std minus random order, QWK at 80% coverage (paired bootstrap, 300 resamples, seeds and test essays): +" \
        in section
    assert "seed 0: conformal score sets (LAC, target 90%, calibrated on validation): test coverage 95.0%, " \
           "mean set size 2.50" in section
    assert "seed 0: review rule (20% of validation essays below the neg_std threshold): 20.0% of test essays to " \
           "review, QWK auto-scored 1.000 (all 0.812)" in section
    assert "seed 1: conformal" not in section
    assert f"Trust neg_std: sending the 8 least confident of 40 test essays to a human leaves QWK 1.000 on the 32 " \
           f"others, against {q100:.3f} on all" in section
    assert "; it beats random order at that coverage by +" in section


def test_trust_sentence_says_plainly_when_no_signal_beats_random() -> None:
    figures = {"q100": 0.70, "q80": 0.71, "gain": (0.01, -0.02, 0.04)}
    text = trust_tables.trust_sentence("neg_std", figures, (0.005, -0.03, 0.04), 150, 120)
    assert text == ("No signal to trust on these essays: with neg_std, picked on validation, sending the 30 least "
                    "confident of 150 test essays to a human leaves QWK 0.710 on the 120 others, against 0.700 on "
                    "all (+0.010 [-0.020, +0.040]) and +0.005 [-0.030, +0.040] against random order; the interval "
                    "against random order does not lie above zero, so review by this signal buys no QWK that "
                    "sending a random choice of essays would not.")
    assert trust_tables.trust_sentence("neg_std", figures, (0.05, 0.01, 0.09), 150, 120).startswith("Trust neg_std:")


def test_benchmark_confidence_study_aligns_by_id_and_saves_figures(tmp_path: Path) -> None:
    from modules.confidence import essay_signals

    (tmp_path / "dataset.json").write_text(json.dumps({"rubrics": RUBRICS}))
    rng = np.random.default_rng(4)
    predictions, banks = {}, {}
    for split, n in (("test", 8), ("valid", 6)):
        records = [{"id": f"{split}{i}", "essay": " ".join(["w"] * (3 + i)), "scores": {"ideas": i % 5, "style": 2}}
                   for i in range(n)]
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        banks[split] = rng.integers(0, 5, (n, 3, 2))  # file order
        rows = []
        for r in reversed(records):  # the prediction rows in another order than the file
            probs = {name: list(rng.dirichlet(np.ones(5))) for name in ("ideas", "style")}
            weighted = [int(np.argmax(probs["ideas"])), int(np.argmax(probs["style"]))]
            rows.append({"id": r["id"], "gold": [r["scores"]["ideas"], 2], "greedy": weighted, "weighted": weighted,
                         "probabilities": probs})
        predictions[split] = rows
    study = bench.confidence_study(tmp_path, predictions, banks, 3, tmp_path / "t", "toy")
    assert study["prediction"] == "weighted"
    for split, seed in (("test", 3), ("valid", 4)):
        order = [int(row["id"][len(split):]) for row in predictions[split]]
        expected, _ = essay_signals(predictions[split], ["ideas", "style"], RANGES,
                                    essays=[" ".join(["w"] * (3 + i)) for i in order], samples=banks[split][order],
                                    seed=seed)
        assert set(study["signals"][split]) == set(expected)
        for name, values in expected.items():
            assert study["signals"][split][name] == pytest.approx(values, abs=5e-7)
        assert study["signals"][split]["length"] == [3.0 + i for i in order]
    assert (tmp_path / "t" / "risk_coverage.png").stat().st_size > 0
    assert (tmp_path / "t" / "reliability_diagram.png").stat().st_size > 0
    assert read_json(tmp_path / "t" / "confidence_calibration.json")["signal"] == study["report"]["review"]["signal"]
    report = study["report"]
    assert report["review"]["signal"] in study["signals"]["valid"] and report["conformal"]["target_coverage"] == 0.9
    assert set(report) == {"large_errors", "ece", "conformal", "review"}
    no_bank = bench.confidence_study(tmp_path, predictions, {}, 3, tmp_path / "u", "toy")  # --replicate
    assert set(no_bank["signals"]["test"]) == {"p_pred", "neg_std", "neg_entropy", "length", "random"}


# --------------------------------------------------------------------------- the whole benchmark, tiny


def test_benchmark_end_to_end_on_a_tiny_ell_file(tmp_path: Path, monkeypatch, capsys) -> None:
    """Every stage of one command on a 40-essay file in the ELL layout with the tiny model: the result
    file holds each row for the same essays in the split file's order, six in-range numbers per
    line, the SC votes of the sample bank the subprocess wrote, and the printed tables."""
    import csv

    from modules.voting import INVALID, majority_vote

    traits = ["cohesion", "syntax", "vocabulary", "phraseology", "grammar", "conventions"]
    with open(tmp_path / "ell.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text_id", "full_text", *traits])
        for i in range(40):
            words = " ".join(["the dog ran home"] * (3 + i % 7))
            w.writerow([f"T{i:03d}", f"Essay {i}. {words}.", *[f"{1 + ((i + k) % 9) * 0.5:.1f}" for k in range(6)]])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    out = tmp_path / "bench"
    argv = ["--corpus", "ell", "--input", str(tmp_path / "ell.csv"), "--out_dir", str(out), "--base_model",
            "tiny-random-llama", "--train_essays", "8", "--valid_essays", "4", "--test_essays", "4", "--max_steps", "2",
            "--m", "3", "--max_seq_length", "256", "--bootstrap", "20", "--pick_essays", "2",
            "--target_modules", "q_proj,v_proj,down_proj",
            # the recipe's head reads layer 19, which the tiny model lacks: seed 2 below trains one on layer 1
            "--no_head",
            # batches of 3 essays, so that the one-prefill stage's second batch must seed its essays as
            # self_consistency.py does (seed + the essay's index in the file)
            "--batch_essays", "3"]
    import self_consistency as sc_cli
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    assert "smoke run" in printed and "best_lora_qwk=" in printed and "MCRMSE" in printed
    [path] = list((out / "results" / "ell").glob("ce-ntl_seed0_*.json"))
    saved = json.loads(path.read_text())
    assert saved["corpus"] == "ell" and saved["variant"] == "ce+ntl" and not saved["replicate"]
    # the recipe keeps the last step's weights: main_pipeline.py's run folder says which checkpoint
    assert saved["config"]["load_best_model_at_end"] is False and saved["training"]["kept_checkpoint"] == "checkpoint-2"
    assert saved["training"]["eval_loss"] == []  # so no in-training evaluation: it would choose nothing
    assert "| not evaluated (checkpoint-2) |" in printed
    # no machine paths: the input file and every folder relative to the repository
    assert saved["config"]["input"] == os.path.relpath(tmp_path / "ell.csv", ROOT) and saved["data"]["input"] == "ell.csv"
    assert not [token for token in saved["command"].split() if os.path.isabs(token)]
    assert not any(os.path.isabs(saved["config"][key]) for key in result_files.PATH_FLAGS if saved["config"][key])
    # the precision main_pipeline.py chose by the machine (no --bf16 passed) is recorded as its manifest says
    run_manifest = json.loads((out / "run_ce+ntl_seed0" / "run_manifest.json").read_text())
    assert run_manifest["config"]["bf16"] is False and run_manifest["config"]["precision"] == "auto"
    assert saved["training"]["precision"] == run_manifest["precision"] and saved["training"]["precision"]["chosen"]
    # --target_modules reaches main_pipeline.py: the saved adapter adapts those projections
    adapter_config = json.loads((out / "run_ce+ntl_seed0" / "adapter_config.json").read_text())
    assert sorted(adapter_config["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    assert [r["scale"] for r in saved["rubrics"]] == [2] * 6
    lora_rows = ["greedy", "weighted", "greedy, constrained", "SC majority", "SC average",
                 "SC majority, constrained", "SC average, constrained"]
    assert set(saved["rows"]) == set(lora_rows)
    assert set(saved["timings"]) == {"convert + subset", "train", "every LoRA row (one prefill)", "baselines",
                                     "confidence", "total"}
    # main_pipeline.py only trained (--skip_scoring): every row is the benchmark's, from one prefill
    assert (out / "run_ce+ntl_seed0" / "adapter_model.safetensors").is_file()
    assert not (out / "run_ce+ntl_seed0" / "predictions.jsonl").exists()
    assert saved["data"]["pick_essays"] == 2
    valid_pool = {json.loads(line)["id"] for line in (out / "full_seed0" / "valid.jsonl").read_text().splitlines()}
    assert set(saved["splits"]["pick"]["ids"]) == valid_pool - set(saved["splits"]["valid"]["ids"])
    for split, n in (("test", 4), ("valid", 4), ("pick", 2)):
        entry = saved["splits"][split]
        records = [json.loads(line) for line in (out / "data_seed0" / f"{split}.jsonl").read_text().splitlines()]
        assert entry["ids"] == [r["id"] for r in records]
        assert entry["gold"] == [[r["scores"][t] for t in traits] for r in records]
        assert set(entry["rows"]) == set(lora_rows) | set(result_files.BASELINE_ROWS) | {TUNED_RIDGE}
        for row, scores in entry["rows"].items():
            assert len(scores) == n and all(len(s) == 6 and all(2 <= v <= 10 for v in s) for s in scores), row
        assert len(entry["weighted_expected"]) == n and all(2 <= v <= 10 for s in entry["weighted_expected"] for v in s)
        # the votes are the bank's: rebuilt here from samples.jsonl's text, in the split file's order
        for suffix, folder in (("", ""), (", constrained", "_constrained")):
            bank = {}
            for line in (out / f"sc_ce+ntl_seed0_{split}{folder}" / "samples.jsonl").read_text().splitlines():
                row = json.loads(line)
                bank[row["id"]] = [s["scores"] if s["scores"] is not None else [INVALID] * 6 for s in row["samples"]]
            samples = np.array([bank[i] for i in entry["ids"]])
            assert entry["rows"]["SC majority" + suffix] == majority_vote(samples, [6] * 6).tolist()
            counts = entry["line_counts"]["SC samples" + suffix]
            assert counts == {"lines": n * 3, "invalid": int((samples == INVALID).all(axis=2).sum()), "truncated": counts["truncated"]}
        assert entry["line_counts"]["SC samples, constrained"]["invalid"] == 0
    # The one-prefill stage gives what the separate paths give: self_consistency.py run's banks
    # (same m and seed), predict_split's greedy and weighted rows (as main_pipeline.py scores them,
    # in batches of the same size) and its constrained greedy rows.
    from modules.data import load_dataset_info, load_split
    from modules.models import load_adapter
    from modules.predict import predict_split
    from modules.runs import PromptSettings
    from modules.score_head import load_head

    def bank_rows(bank: Path) -> list:
        return [(r["id"], [(s["text"], s["scores"]) for s in r["samples"]]) for r in map(json.loads, bank.read_text().splitlines())]

    test_path = out / "data_seed0" / "test.jsonl"
    for flag, folder in (([], ""), (["--constrained"], "_constrained")):
        assert sc_cli.main(["run", "--adapter_dir", str(out / "run_ce+ntl_seed0"), "--base_model_name", "tiny-random-llama",
                            "--test_path", str(test_path), "--max_m", "3", "--chunk_m", "3", "--seed", "0",
                            "--output_dir", str(tmp_path / f"cli{folder}"), "--bootstrap", "0", *flag]) == 0
        assert bank_rows(tmp_path / f"cli{folder}" / "samples.jsonl") == \
            bank_rows(out / f"sc_ce+ntl_seed0_test{folder}" / "samples.jsonl")
    model, tokenizer = load_adapter("tiny-random-llama", out / "run_ce+ntl_seed0")
    info = load_dataset_info(out / "data_seed0")
    settings = PromptSettings(max_prompt_tokens=saved["data"]["max_prompt_tokens"])
    assert PromptSettings.from_run(out / "run_ce+ntl_seed0") == settings  # what the benchmark prompted with
    alone = predict_split(model, tokenizer, load_split(test_path, info), info, settings, weighted=False,
                          constrained=True)
    assert saved["splits"]["test"]["rows"]["greedy, constrained"] == [p["greedy"] for p in alone]
    for split in ("test", "pick"):
        scored = predict_split(model, tokenizer, load_split(out / "data_seed0" / f"{split}.jsonl", info), info, settings,
                               batch_size=3)
        entry = saved["splits"][split]
        assert entry["rows"]["greedy"] == [p["greedy"] for p in scored]
        assert entry["rows"]["weighted"] == [p["weighted"] for p in scored]
        assert entry["weighted_expected"] == [[round(e, 4) for e in p["weighted_expected"]] for p in scored]
        assert entry["line_counts"]["greedy"] == result_files.line_counts(scored)
    # a second command on the same folder and seed is refused before anything runs
    assert bench.main(argv) == 2
    # the probe on the same essays: main_pipeline.py --scorer probe's rows, its layer chosen on the
    # validation and pick essays, in the group's table beside the LoRA rows
    from benchmarks import bench_probe

    capsys.readouterr()
    assert bench_probe.main(argv) == 0
    [probe_path] = list((out / "results" / "ell").glob("probe_seed0_*.json"))
    probe = json.loads(probe_path.read_text())
    run_probe = out / "run_probe_data0"
    assert probe["variant"] == "probe" and probe["data"]["sizes"] == saved["data"]["sizes"]
    assert [json.loads(line)["id"] for line in (run_probe / "valid_predictions.jsonl").read_text().splitlines()] == \
        saved["splits"]["valid"]["ids"] + saved["splits"]["pick"]["ids"]
    probe_test = [json.loads(line) for line in (run_probe / "predictions.jsonl").read_text().splitlines()]
    assert probe["splits"]["test"]["ids"] == saved["splits"]["test"]["ids"]
    assert probe["splits"]["test"]["rows"]["probe"] == [r["weighted"] for r in probe_test]
    assert probe["training"]["layer"] == json.loads((run_probe / "run_manifest.json").read_text())["probe"]["layer"]
    assert bench_probe.main(argv) == 2  # the probe's folders exist: refused
    assert tables.main(["--results", str(out / "results"), "--bootstrap", "20"]) == 0
    printed = capsys.readouterr().out
    assert "| probe (frozen base model, ridge on one layer) | - |" in printed and "minus probe" in printed
    # a replicate seed: greedy and weighted only, scored from its own adapter, no sample banks
    assert bench.main([*argv, "--seed", "1", "--replicate"]) == 0
    [replicate_path] = list((out / "results" / "ell").glob("ce-ntl_seed1_*.json"))
    replicate = json.loads(replicate_path.read_text())
    assert replicate["replicate"] and replicate["rows"] == ["greedy", "weighted"]
    assert set(replicate["timings"]) == {"convert + subset", "train", "greedy + weighted", "baselines", "confidence",
                                         "total"}
    assert not list(out.glob("sc_ce+ntl_seed1_*"))
    assert set(replicate["confidence"]["signals"]["test"]) == {"p_pred", "neg_std", "neg_entropy", "length", "random"}
    model, tokenizer = load_adapter("tiny-random-llama", out / "run_ce+ntl_seed1")
    for split in ("test", "valid", "pick"):
        entry = replicate["splits"][split]
        scored = predict_split(model, tokenizer, load_split(out / "data_seed0" / f"{split}.jsonl", info), info,
                               PromptSettings(max_prompt_tokens=replicate["data"]["max_prompt_tokens"]), batch_size=3)
        assert set(entry["rows"]) == {"greedy", "weighted"} | set(result_files.BASELINE_ROWS) | {TUNED_RIDGE}
        assert entry["rows"]["weighted"] == [p["weighted"] for p in scored]
        assert entry["rows"]["greedy"] == [p["greedy"] for p in scored]
    # a score head (--head_layer): its row and unrounded output, from the head the run saved; its
    # recipe is its own group in the tables. LoRA on the top layer only, so the layer below is cached
    # and the head's starting ridge reads the cache
    with_head_argv = [a for a in argv if a != "--no_head"]
    assert bench.main([*with_head_argv, "--seed", "2", "--replicate", "--head_layer", "1", "--head_learning_rate", "0.01",
                       "--top_layers", "1"]) == 0
    [head_path] = list((out / "results" / "ell").glob("ce-ntl_seed2_*.json"))
    with_head = json.loads(head_path.read_text())
    assert with_head["rows"] == ["greedy", "weighted", "head"] and with_head["config"]["head_layer"] == 1
    run_dir = out / "run_ce+ntl_seed2"
    run_config = json.loads((run_dir / "run_manifest.json").read_text())["config"]
    assert (run_config["head_learning_rate"], run_config["lora_top_layers"], run_config["cache_frozen_layers"]) \
        == (0.01, 1, True)
    model, tokenizer = load_adapter("tiny-random-llama", run_dir)
    head = load_head(run_dir)
    scored = predict_split(model, tokenizer, load_split(out / "data_seed0" / "valid.jsonl", info), info,
                           PromptSettings(max_prompt_tokens=with_head["data"]["max_prompt_tokens"]), batch_size=3,
                           head=head)
    entry = with_head["splits"]["valid"]
    assert entry["rows"]["head"] == [p["head"] for p in scored]
    np.testing.assert_allclose(entry["continuous"]["head"], [p["head_expected"] for p in scored], atol=1e-4)
    assert tables.main(["--results", str(out / "results"), "--bootstrap", "20"]) == 0
    assert "| LoRA CE+NTL, head | 2 |" in capsys.readouterr().out


def test_rubric_alone_against_sharing_its_line(tmp_path: Path, capsys) -> None:
    alone_pred = shifted(GOLD_TEST, 1, step=2)
    shared_pred = shifted(GOLD_TEST, 2, step=2)
    short = result("ce+ntl", 0, {"greedy": [[p[0]] for p in alone_pred]}, {"greedy": [[g[0]] for g in GOLD_VALID]},
                   gold_test=[[g[0]] for g in GOLD_TEST], gold_valid=[[g[0]] for g in GOLD_VALID], rubrics=RUBRICS[:1])
    short["corpus"] = "toy-ideas"
    result_files.write_result(tmp_path / "a.json", short)
    result_files.write_result(tmp_path / "b.json", result("ce+ntl", 0, {"greedy": shared_pred}, {"greedy": GOLD_VALID}))
    assert tables.main(["--results", str(tmp_path), "--bootstrap", "200"]) == 0
    out = capsys.readouterr().out.split("## A rubric alone and sharing its line")[1]
    alone = mean_qwk([[g[0]] for g in GOLD_TEST], [[p[0]] for p in alone_pred], RANGES[:1])
    shared = mean_qwk([[g[0]] for g in GOLD_TEST], [[p[0]] for p in shared_pred], RANGES[:1])
    [line] = [x for x in out.splitlines() if x.startswith("| ideas:")]
    cells = line.split(" | ")
    assert cells[0] == "| ideas: toy-ideas minus toy" and cells[1:4] == ["LoRA CE+NTL, greedy", "0", f"{alone:.3f}"]
    assert cells[4:6] == [f"{shared:.3f}", f"{alone - shared:+.3f}"] and alone > shared
