"""self_consistency.py on a real tiny-random-llama LoRA adapter: outputs, analyze, resume, errors, sampler."""
from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import cli_env, small_dataset
from modules.score_lines import score_line

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "aes_dataset_mtl"
PNGS = ("overall_qwk_vs_m.png", "average_qwk_vs_m.png", "per_rubric_qwk_vs_m.png")
ENV = cli_env()


def cli(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "self_consistency.py"), *args]


def run_cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cli(*args), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> SimpleNamespace:
    """A saved LoRA adapter with its run manifest and baselines, and a 4-essay test file."""
    from modules.models import add_lora, load_base_model

    root = tmp_path_factory.mktemp("sc")
    adapter = root / "adapter"
    model, _ = load_base_model("tiny-random-llama")
    add_lora(model, r=2, alpha=4, dropout=0.0).save_pretrained(adapter)
    (adapter / "run_manifest.json").write_text(json.dumps(
        {"config": {"mtl": False, "prompt_format": "chat", "base_model_name": "tiny-random-llama"},
         "max_prompt_tokens": 1000}))
    rubrics = [r["name"] for r in json.loads((DATA / "dataset.json").read_text())["rubrics"]]
    table = {name: 0.1 * (i % 5) for i, name in enumerate(rubrics)}
    (adapter / "evaluation_results.json").write_text(json.dumps(
        {"token": {**table, "overall": 0.31, "average": 0.27, "invalid": 0},
         "weighted": {**table, "overall": 0.42, "average": 0.38}}))
    data = small_dataset(root / "data", test=4)
    lines = (data / "test.jsonl").read_text(encoding="utf-8").splitlines()
    return SimpleNamespace(root=root, adapter=adapter, test=data / "test.jsonl", rubrics=rubrics,
                           ids=[json.loads(line)["id"] for line in lines])


def sample_flags(setup, *extra: str) -> list[str]:
    return ["--adapter_dir", str(setup.adapter), "--base_model_name", "tiny-random-llama", "--test_path",
            str(setup.test), "--max_m", "6", "--chunk_m", "3", "--bootstrap", "20", *extra]


@pytest.fixture(scope="module")
def run_dir(setup) -> Path:
    result = run_cli("run", *sample_flags(setup, "--output_root", str(setup.root / "results"), "--tag", "e2e"))
    assert result.returncode == 0, result.stderr[-3000:]
    folders = list((setup.root / "results").iterdir())
    assert len(folders) == 1 and folders[0].name.startswith("e2e_"), folders
    assert "overall QWK" in result.stdout and str(folders[0]) in result.stdout
    assert "decoding: unconstrained" in result.stdout
    return folders[0]


def read_bank(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_run_writes_every_output(setup, run_dir):
    import matplotlib.image

    for name in ("run_config.json", "samples.jsonl", "curves.json", "best_qwk_scores.json", *PNGS):
        assert (run_dir / name).is_file(), name
    for name in PNGS:
        assert (run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = matplotlib.image.imread(run_dir / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    bank = read_bank(run_dir / "samples.jsonl")
    assert [row["id"] for row in bank] == setup.ids
    for row in bank:
        assert len(row["samples"]) == 6 and len(row["gold"]) == len(setup.rubrics)
        assert row["invalid"] == sum(s["scores"] is None for s in row["samples"])
        assert all(isinstance(s["text"], str) and "\n" not in s["text"] for s in row["samples"])
    curves = json.loads((run_dir / "curves.json").read_text())
    assert curves["ms"] == list(range(1, 7)) and curves["rubrics"] == setup.rubrics
    for key in ("overall_avg", "overall_maj", "avgk_avg", "avgk_maj"):
        assert len(curves[key]) == 6
        assert len(curves["bootstrap"][key]["lo"]) == 6
    assert curves["bootstrap"]["n_orderings"] == 20 and curves["bootstrap"]["seed"] == 42
    assert curves["invalid_rate"] == sum(r["invalid"] for r in bank) / 24
    best = json.loads((run_dir / "best_qwk_scores.json").read_text())
    assert set(best) == {"avg", "maj"} and best["avg"]["max_m"]["m"] == 6
    config = json.loads((run_dir / "run_config.json").read_text())
    args = config["args"]
    assert (args["mtl"], args["prompt_format"], args["max_m"], args["seed"]) == (False, "chat", 6, 42)
    assert args["fallback_score"] == [5] * len(setup.rubrics)  # midpoints of 1-9
    assert args["baselines_json"] == str((setup.adapter / "evaluation_results.json").resolve())
    assert {"git_commit", "packages", "command"} <= set(config) and "torch" in config["packages"]


def test_analyze_reproduces_run(setup, run_dir, tmp_path):
    result = run_cli("analyze", "--bank_path", str(run_dir / "samples.jsonl"), "--test_path", str(setup.test),
                     "--output_dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("curves.json", "best_qwk_scores.json"):
        assert (tmp_path / name).read_bytes() == (run_dir / name).read_bytes(), name
    assert all((tmp_path / name).is_file() for name in PNGS)


def test_killed_sample_resumes_to_the_same_bank(setup, run_dir, tmp_path):
    out = tmp_path / "killed"
    bank = out / "samples.jsonl"
    proc = subprocess.Popen(cli("sample", *sample_flags(setup, "--output_dir", str(out))), cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None:
        if bank.is_file() and bank.read_bytes().endswith(b"\n"):
            break
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    lines = bank.read_text(encoding="utf-8").splitlines(keepends=True)
    assert lines, "no essay was flushed before the kill"
    if len(lines) == len(setup.ids):  # the process outran the poll: cut it back to one finished essay
        bank.write_text(lines[0], encoding="utf-8")
    first = json.loads(lines[0])
    with bank.open("a", encoding="utf-8") as handle:  # what a kill in the middle of a write leaves
        handle.write('{"id": "' + setup.ids[-1] + '", "gold": [1, 2')

    result = run_cli("sample", *sample_flags(setup, "--output_dir", str(out), "--resume"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "already sampled" in result.stdout and "torn last line" in result.stderr
    rows = read_bank(bank)
    assert sorted(row["id"] for row in rows) == sorted(setup.ids)
    assert rows[0] == first
    # Same seed and settings: the resumed bank is the uninterrupted run's bank, line for line.
    assert bank.read_text(encoding="utf-8") == (run_dir / "samples.jsonl").read_text(encoding="utf-8")
    assert len(json.loads((out / "run_config.json").read_text())["resumes"]) == 1


def test_constrained_run_records_the_flag_and_resumes_only_constrained(setup, run_dir, tmp_path, capsys):
    import self_consistency

    out = tmp_path / "constrained"
    result = run_cli("run", *sample_flags(setup, "--output_dir", str(out), "--constrained", "--temperature", "1.5"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "decoding: constrained" in result.stdout
    config = json.loads((out / "run_config.json").read_text())
    assert config["args"]["constrained"] is True
    # The untrained adapter's answers are all valid score lines, never cut by the default budget.
    samples = [s for row in read_bank(out / "samples.jsonl") for s in row["samples"]]
    assert len(samples) == 24 and all(s["scores"] is not None and "truncated" not in s for s in samples)
    analyzed = run_cli("analyze", "--bank_path", str(out / "samples.jsonl"), "--test_path", str(setup.test))
    assert analyzed.returncode == 0 and "decoding: constrained" in analyzed.stdout, analyzed.stderr[-3000:]

    # Resuming must keep the mode: checked before any model load.
    assert self_consistency.main(["sample", *sample_flags(setup, "--output_dir", str(out), "--resume"),
                                  "--base_model_name", "no-such/model"]) == 2
    assert "constrained False (run used True)" in capsys.readouterr().err
    # A run_config.json from before the flag existed was unconstrained, and resumes as such.
    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    config = json.loads((old / "run_config.json").read_text())
    del config["args"]["constrained"]
    (old / "run_config.json").write_text(json.dumps(config))
    assert self_consistency.main(["sample", *sample_flags(setup, "--output_dir", str(old), "--resume")]) == 0
    assert "4 of 4 essays already sampled" in capsys.readouterr().out


def test_dry_run_prints_the_training_prompt(setup, capsys):
    import self_consistency  # in-process: the same code path as the CLI, without a second model-loading process

    assert self_consistency.main(["run", *sample_flags(setup, "--output_root", str(setup.root / "dry")),
                                  "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "mtl=False, prompt_format=chat (run_manifest.json)" in out
    assert f"prompt of essay {setup.ids[0]}" in out and "<|assistant|>" in out
    assert not (setup.root / "dry").exists()


def test_input_errors_are_one_line_before_model_load(setup, run_dir, tmp_path, capsys):
    import self_consistency

    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(setup.test.parent / "dataset.json", bad / "dataset.json")
    rows = setup.test.read_text().splitlines()
    record = json.loads(rows[1])
    record["scores"]["task"] = 12
    (bad / "test.jsonl").write_text("\n".join([rows[0], json.dumps(record)]) + "\n")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    base = ["--adapter_dir", str(setup.adapter), "--test_path", str(setup.test)]
    cases = [
        (["run", "--adapter_dir", str(setup.adapter), "--base_model_name", "no-such/model", "--test_path",
          str(bad / "test.jsonl")], "test.jsonl:2: field 'scores.task': score 12 outside 1-9"),
        (["run", *base, "--base_model_name", "no-such/model", "--output_dir", str(tmp_path / "full")],
         "output folder exists and is not empty"),
        (["sample", *base, "--base_model_name", "no-such/model", "--resume"], "--resume needs --output_dir"),
        (["sample", *sample_flags(setup, "--output_dir", str(run_dir), "--resume", "--temperature", "0.9")],
         "temperature 0.9 (run used 0.7)"),
        (["run", *base, "--base_model_name", "no-such/model", "--fallback_score", "1,2"],
         "--fallback_score has 2 values; give 1 or 8"),
        (["analyze", "--bank_path", str(run_dir / "samples.jsonl"), "--test_path", str(DATA / "test.jsonl")],
         "essay ids do not match"),
    ]
    for argv, expected in cases:
        assert self_consistency.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and expected in err, (argv, err)
    assert (tmp_path / "full" / "keep.txt").read_text() == "x"


def test_analyze_handcrafted_bank_matches_voting(setup, tmp_path):
    """A bank with real scores: curves.json is exactly voting's curves of the [N, m, K] array."""
    import self_consistency
    from modules.bank import read_bank as read_checked
    from modules.curves import bootstrap_curves, qwk_curves
    from modules.voting import INVALID, best_scores

    rng = np.random.default_rng(0)
    gold = np.array([[json.loads(line)["scores"][r] for r in setup.rubrics]
                     for line in setup.test.read_text().splitlines()])
    n, m, k = len(setup.ids), 5, len(setup.rubrics)
    samples = np.clip(gold[:, None, :] + rng.integers(-2, 3, size=(n, m, k)), 1, 9)
    samples[0, 1] = INVALID
    samples[2, :] = INVALID
    bank = tmp_path / "samples.jsonl"
    with bank.open("w") as handle:
        for i in (3, 1, 0, 2):  # line order must not matter
            drawn = [{"text": "no score" if s[0] == INVALID else score_line(s), "scores": None if s[0] == INVALID
                      else s.tolist()} for s in samples[i]]
            handle.write(json.dumps({"id": setup.ids[i], "gold": gold[i].tolist(), "samples": drawn,
                                     "invalid": sum(d["scores"] is None for d in drawn)}) + "\n")
        handle.write('{"id": "torn')
    assert self_consistency.main(["analyze", "--bank_path", str(bank), "--test_path", str(setup.test),
                                  "--bootstrap", "30", "--seed", "7", "--fallback_score", "4"]) == 0
    expected = qwk_curves(samples, gold, [(1, 9)] * k, 4, rubric_names=setup.rubrics)
    expected["bootstrap"] = bootstrap_curves(samples, gold, [(1, 9)] * k, 4, n_orderings=30, seed=7,
                                             rubric_names=setup.rubrics)
    curves = json.loads((tmp_path / "curves.json").read_text())
    assert {key: curves[key] for key in expected} == json.loads(json.dumps(expected))
    assert curves["invalid_rate"] == 6 / 20 and curves["fallback"] == [4] * k
    assert json.loads((tmp_path / "best_qwk_scores.json").read_text()) == json.loads(json.dumps(best_scores(expected)))
    assert len(set(curves["overall_avg"])) > 1  # real variation, not a constant fallback curve
    # By hand at m = 1: each essay's vote is its first sample (the fallback 4 where it is invalid),
    # and the overall QWK is sklearn's quadratic kappa of all (gold, vote) pairs over 1-9.
    from sklearn.metrics import cohen_kappa_score

    first = np.where(samples[:, 0] == INVALID, 4, samples[:, 0])
    assert first[0].tolist() == samples[0, 0].tolist() and first[2].tolist() == [4] * k
    pooled = cohen_kappa_score(gold.ravel(), first.ravel(), weights="quadratic", labels=list(range(1, 10)))
    assert curves["overall_avg"][0] == curves["overall_maj"][0] == pytest.approx(pooled, abs=1e-9)
    # confidence of the majority vote: the self-consistency signals as modules.confidence computes them
    from modules.confidence_report import sample_bank_report

    report, signals, _ = sample_bank_report(samples, gold, [(1, 9)] * k, 4, seed=7)
    saved = json.loads((tmp_path / "confidence.json").read_text())
    for name in ("sc_agreement", "neg_sc_std"):
        assert saved["signals"][name] == json.loads(json.dumps(report["signals"][name])), name
    per_essay = [json.loads(line) for line in (tmp_path / "confidence.jsonl").read_text().splitlines()]
    assert [row["id"] for row in per_essay] == setup.ids
    assert [row["confidence"]["essay"]["sc_agreement"] for row in per_essay] == signals["sc_agreement"].tolist()
    assert (tmp_path / "risk_coverage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # reading never changes the file; repair=True cuts the torn line off
    assert bank.read_bytes().endswith(b'"torn')
    assert len(read_checked(bank, [(1, 9)] * k, repair=True)) == n
    assert bank.read_bytes().endswith(b"\n")


# Runs self_consistency.py with its arguments as if torch and transformers (and peft and accelerate,
# which need them) were not installed: importing any of them raises ModuleNotFoundError.
WITHOUT_TORCH = """
import runpy, sys
for name in ("torch", "transformers", "peft", "accelerate"):
    sys.modules[name] = None
sys.argv = ["self_consistency.py", *sys.argv[1:]]
runpy.run_path("self_consistency.py", run_name="__main__")
"""


def test_analyze_runs_without_torch_and_transformers(tmp_path):
    data = small_dataset(tmp_path / "data", test=4)
    rubrics = [r["name"] for r in json.loads((data / "dataset.json").read_text())["rubrics"]]
    run = tmp_path / "run"
    run.mkdir()
    (run / "run_config.json").write_text(json.dumps({"args": {"bootstrap": 5, "seed": 3, "constrained": True}}))
    with (run / "samples.jsonl").open("w") as handle:
        for line in (data / "test.jsonl").read_text().splitlines():
            record = json.loads(line)
            gold = [record["scores"][name] for name in rubrics]
            drawn = [[min(9, g + j % 2) for g in gold] for j in range(3)]
            samples = [{"text": score_line(scores), "scores": scores} for scores in drawn]
            handle.write(json.dumps({"id": record["id"], "gold": gold, "samples": samples, "invalid": 0}) + "\n")
    result = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, "analyze", "--bank_path", str(run / "samples.jsonl"),
                             "--test_path", str(data / "test.jsonl")], cwd=ROOT, env=ENV, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "overall QWK (4 essays, m = 1..3)" in result.stdout and "decoding: constrained" in result.stdout
    assert all((run / name).is_file() for name in ("curves.json", "best_qwk_scores.json", *PNGS, "confidence.json",
                                                   "confidence.jsonl", "risk_coverage.png"))
    assert "sc_agreement: AURC" in result.stdout
    curves = json.loads((run / "curves.json").read_text())
    assert curves["ms"] == [1, 2, 3] and curves["bootstrap"]["n_orderings"] == 5


def test_bank_samples_reads_a_bank_in_test_file_order_and_checks_it_against_the_test_file(tmp_path):
    """modules.bank.bank_samples: the int [N, m, K] array analyze and the real-essay benchmark vote on."""
    from modules.bank import bank_samples
    from modules.data import dataset_info_for, load_split
    from modules.jsonio import DataError
    from modules.voting import INVALID

    data = small_dataset(tmp_path / "data", test=3)
    info = dataset_info_for(data / "test.jsonl")
    records = load_split(data / "test.jsonl", info)
    k = len(info.rubrics)
    lines = {r.id: {"id": r.id, "gold": list(r.scores), "invalid": 1, "samples": [
        {"text": score_line([lo for lo, _ in info.ranges]), "scores": [lo for lo, _ in info.ranges]},
        {"text": score_line(list(r.scores)), "scores": list(r.scores)},
        {"text": "no score", "scores": None, **({"truncated": True} if i == 1 else {})}]}
        for i, r in enumerate(records)}

    def bank(rows: list[dict]) -> Path:
        path = tmp_path / "samples.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        return path

    samples, truncated = bank_samples(bank([lines[r.id] for r in reversed(records)]), "test.jsonl", records, info)
    assert samples.shape == (3, 3, k) and samples.dtype == np.int64 and truncated == 1
    assert samples[:, 0].tolist() == [[lo for lo, _ in info.ranges]] * 3  # test-file order, not the bank's
    assert samples[:, 1].tolist() == [list(r.scores) for r in records] and (samples[:, 2] == INVALID).all()
    short = {**lines[records[1].id], "samples": lines[records[1].id]["samples"][:2]}
    wrong_gold = {**lines[records[2].id], "gold": [lo for lo, _ in info.ranges]}
    for rows, expected in (([lines[records[0].id]], "2 essays missing"),
                           ([lines[records[0].id], short, lines[records[2].id]], "different numbers of samples"),
                           ([lines[records[0].id], lines[records[1].id], wrong_gold], "differs from test.jsonl")):
        with pytest.raises(DataError, match=expected):
            bank_samples(bank(rows), "test.jsonl", records, info)


def test_run_flags_default_to_the_sampler_settings():
    """SamplerSettings is the one home of the sampling defaults: run's flags read them."""
    import dataclasses

    import self_consistency
    from modules.sampling import SAMPLERS, SamplerSettings

    defaults = SamplerSettings()
    args = self_consistency.parse_args(["run", "--adapter_dir", "a", "--base_model_name", "b", "--test_path", "t"])
    assert {f.name: getattr(args, f.name) for f in dataclasses.fields(SamplerSettings)} == dataclasses.asdict(defaults)
    assert self_consistency.sampler_settings(args) == defaults and defaults.sampler in SAMPLERS
    assert (defaults.temperature, defaults.top_k, defaults.top_p, defaults.essay_batch) == (0.7, 9, None, 8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        defaults.top_k = 1  # type: ignore[misc]


@pytest.fixture(scope="module")
def adapter_model(setup):
    from modules.models import load_adapter

    return load_adapter("tiny-random-llama", setup.adapter)


def test_generate_sampler_chunks_seeds_and_stops(adapter_model, monkeypatch):
    from modules.sampling import SAMPLERS, generate_sample
    from modules.scoring import stop_token_ids

    model, tokenizer = adapter_model
    assert SAMPLERS["generate"] is generate_sample

    def generate_sampler(model, tokenizer, prompt, ranges, generator_seed, **kwargs):
        return generate_sample(model, tokenizer, [prompt], ranges, generator_seeds=[generator_seed], **kwargs)[0]

    calls = []
    real_generate = model.generate

    def spy(**kwargs):
        calls.append(kwargs)
        return real_generate(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    ranges = [(1, 9)] * 8
    kwargs = dict(max_m=5, chunk_m=2, temperature=0.7, top_k=9, max_new_tokens=6)
    first = generate_sampler(model, tokenizer, "Score: ", ranges, generator_seed=3, **kwargs)
    assert [c["num_return_sequences"] for c in calls] == [2, 2, 1] and len(first) == 5
    call = calls[0]
    assert call["do_sample"] is True and call["temperature"] == 0.7 and call["top_k"] == 9
    assert set(stop_token_ids(tokenizer)) <= set(call["eos_token_id"]) and call["pad_token_id"] == tokenizer.pad_token_id
    assert "top_p" not in call  # the model's generation config decides, as in the original tool
    assert generate_sampler(model, tokenizer, "Score: ", ranges, generator_seed=3, **kwargs) == first
    assert generate_sampler(model, tokenizer, "Score: ", ranges, generator_seed=4, **kwargs) != first
    generate_sampler(model, tokenizer, "Score: ", ranges, generator_seed=3, top_p=0.9, **kwargs)
    assert calls[-1]["top_p"] == 0.9


def test_generate_sampler_parses_the_score_line(adapter_model):
    import torch

    from modules.sampling import generate_sample

    _, tokenizer = adapter_model
    answers = ["3 4 5 6 7 8 9 1\nGood essay.", "3 4 5", "3 4 5 6 7 8 9 10"]

    class Scripted:  # writes fixed answers, to check text -> scores without a trained model
        generation_config = None

        def get_input_embeddings(self):
            return torch.nn.Embedding(1, 1)

        def generate(self, input_ids, num_return_sequences, **_):
            rows = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers[:num_return_sequences]]
            width = max(map(len, rows))
            rows = [r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows]
            return torch.cat([input_ids.repeat(num_return_sequences, 1), torch.tensor(rows)], dim=1)

    [out] = generate_sample(Scripted(), tokenizer, ["Score: "], [(1, 9)] * 8, max_m=3, chunk_m=3, temperature=1.0,
                            top_k=9, max_new_tokens=32, generator_seeds=[0])
    assert out[0] == {"text": "3 4 5 6 7 8 9 1", "scores": [3, 4, 5, 6, 7, 8, 9, 1]}
    # Too few scores (and no line end: cut by the budget); 10 out of range (also never ended).
    assert [o["scores"] for o in out[1:]] == [None, None]


def test_samples_cut_by_the_budget_are_invalid_and_flagged(adapter_model):
    from modules.sampling import SAMPLERS
    from modules.scoring import greedy_predict, stop_token_ids

    model, tokenizer = adapter_model
    stops = stop_token_ids(tokenizer, model)

    def no_line_end(module, args, output):  # the answer can never end: every sample hits the budget
        output = output.clone()
        output[..., stops] = -1e4
        return output

    ranges = [(1, 9)] * 8
    handle = model.get_output_embeddings().register_forward_hook(no_line_end)
    try:
        banks = {name: sampler(model, tokenizer, TRIE_PROMPTS[:2], ranges, generator_seeds=[0, 1], max_m=8, chunk_m=4,
                               temperature=1.0, top_k=9, max_new_tokens=5) for name, sampler in SAMPLERS.items()}
        greedy = greedy_predict(model, tokenizer, TRIE_PROMPTS[:2], ranges, max_new_tokens=5)
    finally:
        handle.remove()
    for bank in banks.values():
        samples = [s for essay in bank for s in essay]
        assert len(samples) == 16 and all(s["truncated"] is True and s["scores"] is None for s in samples)
    assert all(a["truncated"] is True and a["scores"] is None for a in greedy)

    def line_end_now(module, args, output):  # every answer ends at its first token: none is cut
        output = output.clone()
        output[..., stops] = 1e4
        return output

    handle = model.get_output_embeddings().register_forward_hook(line_end_now)
    try:
        ended = SAMPLERS["trie"](model, tokenizer, TRIE_PROMPTS[:1], ranges, generator_seeds=[0], max_m=8,
                                 temperature=1.0, top_k=9, max_new_tokens=5)[0]
    finally:
        handle.remove()
    assert len(ended) == 8 and not any("truncated" in s for s in ended)


# --------------------------------------------------------------------------- the trie sampler

TRIE_PROMPTS = ["Score: ", "The essay is clear and well argued. Scores:", "Rate it 1-9 on each rubric:\n"]


def first_tokens(tokenizer, bank: list[list[dict]], depth: int = 2) -> list[list[tuple]]:
    """A fixed function of each sample (its first ``depth`` tokens): equal sample distributions give
    equal distributions of this, so a chi-square test on it can tell two samplers apart."""
    return [[tuple(tokenizer(s["text"], add_special_tokens=False)["input_ids"][:depth]) for s in essay]
            for essay in bank]


def chi_square_p(a: list, b: list) -> float:
    """Two-sample chi-square test of homogeneity; categories expected fewer than 5 times are pooled."""
    from collections import Counter

    from scipy.stats import chi2_contingency

    ca, cb = Counter(a), Counter(b)
    common = [k for k in ca.keys() | cb.keys() if (ca[k] + cb[k]) / 2 >= 5]
    table = [[ca[k] for k in common] + [len(a) - sum(ca[k] for k in common)],
             [cb[k] for k in common] + [len(b) - sum(cb[k] for k in common)]]
    table = [list(col) for col in zip(*table) if sum(col) > 0]
    return float(chi2_contingency(list(zip(*table)))[1])


@pytest.mark.parametrize("temperature", [0.7, 1.5])  # the CLI's default, and one above 1
@pytest.mark.parametrize("constrained, sharpness", [(False, 16.0), (True, 4.0)])
def test_trie_sampler_draws_from_the_generate_distribution(setup, constrained, sharpness, temperature):
    import torch

    from modules.models import load_adapter
    from modules.sampling import generate_sample, trie_sample

    # The untrained model's top logits are nearly equal, so neither temperature nor a top-p cut
    # would change its distribution much: its output layer is scaled by ``sharpness`` (more when
    # the whole vocabulary competes) until both do. Compared four tokens deep, where sibling nodes
    # of the trie share forward passes, with all three warpers on (temperature, top-k 9, top-p 0.8).
    model, tokenizer = load_adapter("tiny-random-llama", setup.adapter)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(sharpness)
    ranges = [(1, 9)] * 8
    kwargs = dict(max_m=400, chunk_m=50, max_new_tokens=6, constrained=constrained)
    seeds = [11, 12, 13]

    def trie(seeds, temperature=temperature, top_k=9, top_p=0.8):
        bank = trie_sample(model, tokenizer, TRIE_PROMPTS, ranges, generator_seeds=seeds, temperature=temperature,
                           top_k=top_k, top_p=top_p, **kwargs)
        return first_tokens(tokenizer, bank, depth=4)

    reference = first_tokens(tokenizer, generate_sample(model, tokenizer, TRIE_PROMPTS, ranges, generator_seeds=seeds,
                                                        temperature=temperature, top_k=9, top_p=0.8, **kwargs), depth=4)
    same = trie([s + 100 for s in seeds])
    for essay in range(len(TRIE_PROMPTS)):
        assert len(set(reference[essay])) > 20  # a real distribution, not one answer
        assert chi_square_p(reference[essay], same[essay]) > 0.001
    # The test has the power to see a different distribution: another top-k, no top-p cut, or no
    # temperature is told apart from generate's in some essay.
    for control in (trie(seeds, top_k=6), trie(seeds, top_p=1.0), trie(seeds, temperature=1.0)):
        assert min(chi_square_p(reference[e], control[e]) for e in range(len(TRIE_PROMPTS))) < 0.001


def test_constrained_trie_with_top_k_1_is_constrained_greedy(adapter_model):
    from modules.sampling import trie_sample
    from modules.scoring import greedy_predict, score_line_budget

    model, tokenizer = adapter_model
    ranges = [(0, 12), (1, 9), (0, 30)]
    budget = score_line_budget(tokenizer, ranges, constrained=True)
    greedy = greedy_predict(model, tokenizer, TRIE_PROMPTS, ranges, constrained=True)
    assert all(g["scores"] is not None for g in greedy)
    bank = trie_sample(model, tokenizer, TRIE_PROMPTS, ranges, generator_seeds=[0, 1, 2], max_m=5,
                       temperature=0.7, top_k=1, max_new_tokens=budget, constrained=True)
    assert bank == [[g] * 5 for g in greedy]


def test_every_constrained_sample_of_an_untrained_model_is_a_valid_score_line(adapter_model):
    from modules.sampling import SAMPLERS
    from modules.score_lines import parse_score_line
    from modules.scoring import score_line_budget

    model, tokenizer = adapter_model
    ranges = [(0, 12), (1, 9), (0, 3), (10, 60)]
    budget = score_line_budget(tokenizer, ranges, constrained=True)
    for name, sampler in SAMPLERS.items():
        bank = sampler(model, tokenizer, TRIE_PROMPTS, ranges, generator_seeds=[3, 4, 5], max_m=40, chunk_m=20,
                       temperature=1.5, top_k=0, max_new_tokens=budget, constrained=True)
        samples = [s for essay in bank for s in essay]
        assert len({s["text"] for s in samples}) > 30, name  # a real spread, not one answer
        for sample in samples:
            assert "truncated" not in sample and sample["scores"] == parse_score_line(sample["text"], ranges), sample
            assert sample["scores"] is not None, (name, sample)


def test_a_budget_one_token_short_of_a_full_line_leaves_every_sample_invalid_and_flagged(adapter_model):
    from modules.sampling import SAMPLERS
    from modules.scoring import greedy_predict

    # Constrained, the tiny model cannot end a line before writing "d d d" (5 one-digit or space
    # tokens) and its end: 6 tokens. With 5, every answer is cut, and "3 4 5" must not count.
    model, tokenizer = adapter_model
    ranges = [(1, 9)] * 3
    for name, sampler in SAMPLERS.items():
        bank = sampler(model, tokenizer, TRIE_PROMPTS, ranges, generator_seeds=[3, 4, 5], max_m=20, chunk_m=10,
                       temperature=1.0, top_k=9, max_new_tokens=5, constrained=True)
        samples = [s for essay in bank for s in essay]
        assert len(samples) == 60 and all(s["truncated"] is True and s["scores"] is None for s in samples), name
        assert sum(len(s["text"].split()) == 3 for s in samples) > 0, name  # cut lines that would have parsed
    greedy = greedy_predict(model, tokenizer, TRIE_PROMPTS, ranges, max_new_tokens=5, constrained=True)
    assert all(a["truncated"] is True and a["scores"] is None for a in greedy)
    # With room for the longest line (optional leading space, 5 tokens, the end) every sample is valid.
    bank = SAMPLERS["trie"](model, tokenizer, TRIE_PROMPTS, ranges, generator_seeds=[3, 4, 5], max_m=20,
                            temperature=1.0, top_k=9, max_new_tokens=7, constrained=True)
    assert all(s["scores"] is not None and "truncated" not in s for essay in bank for s in essay)


def test_trie_sampler_with_top_k_1_is_greedy(adapter_model):
    from modules.sampling import trie_sample
    from modules.scoring import greedy_predict

    # One top token: every sample is the greedy answer, so the batched, tree-masked forwards
    # must give each path the logits of plain decoding of that path.
    model, tokenizer = adapter_model
    ranges = [(1, 9)] * 8
    greedy = greedy_predict(model, tokenizer, TRIE_PROMPTS, ranges, max_new_tokens=8)
    bank = trie_sample(model, tokenizer, TRIE_PROMPTS, ranges, generator_seeds=[0, 1, 2], max_m=5,
                       temperature=0.7, top_k=1, max_new_tokens=8)
    assert bank == [[g] * 5 for g in greedy]


def test_trie_sampler_is_seeded_and_independent_of_its_batch(adapter_model):
    from modules.sampling import SAMPLERS, trie_sample

    model, tokenizer = adapter_model
    assert next(iter(SAMPLERS)) == "trie" and SAMPLERS["trie"] is trie_sample
    kwargs = dict(max_m=30, temperature=1.0, top_k=9, max_new_tokens=6)
    ranges = [(1, 9)] * 8
    together = trie_sample(model, tokenizer, TRIE_PROMPTS, ranges, generator_seeds=[5, 6, 7], **kwargs)
    alone = trie_sample(model, tokenizer, TRIE_PROMPTS[1:2], ranges, generator_seeds=[6], **kwargs)
    assert alone[0] == together[1] and [len(e) for e in together] == [30, 30, 30]
    assert trie_sample(model, tokenizer, TRIE_PROMPTS[1:2], ranges, generator_seeds=[8], **kwargs) != alone
    # Shuffled out of the trie, where samples that share a first token are adjacent.
    firsts = first_tokens(tokenizer, together[:1], depth=1)[0]
    runs = sum(1 for a, b in zip(firsts, firsts[1:]) if a != b) + 1
    assert 1 < len(set(firsts)) < runs


def test_one_prefill_serves_greedy_constrained_and_the_trie_sampler_unchanged(adapter_model):
    import torch

    from modules.sampling import trie_sample
    from modules.scoring import greedy_from_states, greedy_predict, prefill

    # The benchmark runs each prompt once and decodes every row from it: each decoding must give
    # what it gives from its own prefill, and leave the states for the next one as they were.
    model, tokenizer = adapter_model
    ranges = [(1, 9)] * 8
    kwargs = dict(max_m=20, temperature=1.0, top_k=9, max_new_tokens=8)
    with torch.inference_mode():
        states = [prefill(model, tokenizer, prompt) for prompt in TRIE_PROMPTS]
    before = [[(layer.keys.clone(), layer.values.clone()) for layer in state.cache.layers] for state in states]
    for constrained in (False, True):
        with torch.inference_mode():
            shared = greedy_from_states(model, tokenizer, states, ranges, constrained=constrained, max_new_tokens=8)
        assert shared == greedy_predict(model, tokenizer, TRIE_PROMPTS, ranges, constrained=constrained,
                                        max_new_tokens=8)
        for seeds in ([3, 4, 5], [6, 7, 8]):
            own = trie_sample(model, tokenizer, TRIE_PROMPTS, ranges, generator_seeds=seeds, constrained=constrained,
                              **kwargs)
            assert trie_sample(model, tokenizer, TRIE_PROMPTS, ranges, generator_seeds=seeds, constrained=constrained,
                               prompt_states=states, **kwargs) == own
            assert len({s["text"] for s in own[1]}) > 1  # real draws, not one greedy line
    for state, layers in zip(states, before):
        assert len(state.cache.layers) == len(layers)
        for layer, (keys, values) in zip(state.cache.layers, layers):
            assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)
    with pytest.raises(ValueError, match="^3 prompts but 2 prompt states$"):
        trie_sample(model, tokenizer, TRIE_PROMPTS, ranges, generator_seeds=[0, 1, 2], prompt_states=states[:2],
                    **kwargs)


def test_tree_attention_is_refused_to_a_model_without_custom_4d_masks(adapter_model):
    from modules.sampling import trie_sample
    from modules.tree_attention import require_tree_attention

    # Flash attention takes no custom 4D mask: a tree in one cache row would attend across branches.
    model, _ = adapter_model
    for implementation in ("sdpa", "eager"):
        require_tree_attention(SimpleNamespace(config=SimpleNamespace(_attn_implementation=implementation)), "x", "y")
    for implementation in ("flash_attention_2", "flex_attention", None):
        with pytest.raises(ValueError) as error:
            require_tree_attention(SimpleNamespace(config=SimpleNamespace(_attn_implementation=implementation)),
                                   "the scorer", "use another")
        assert str(error.value) == ("the scorer needs sdpa or eager attention (custom 4D masks), the model uses "
                                    f"{implementation!r}: use another")
    saved = model.config._attn_implementation
    model.config._attn_implementation = "flash_attention_2"
    try:
        with pytest.raises(ValueError, match="^the trie sampler needs sdpa or eager attention .* the model uses "
                                             "'flash_attention_2': use --sampler generate$"):
            trie_sample(model, adapter_model[1], ["Score: "], [(1, 9)], generator_seeds=[0], max_m=2, temperature=1.0,
                        top_k=9, max_new_tokens=4)
    finally:
        model.config._attn_implementation = saved


def test_trie_sampler_refuses_settings_it_does_not_implement(adapter_model):
    from modules.sampling import trie_sample

    model, tokenizer = adapter_model
    saved = model.generation_config.repetition_penalty
    model.generation_config.repetition_penalty = 1.3
    try:
        with pytest.raises(ValueError, match="repetition_penalty=1.3.*--sampler generate"):
            trie_sample(model, tokenizer, ["Score: "], [(1, 9)], generator_seeds=[0], max_m=2, temperature=1.0,
                        top_k=9, max_new_tokens=4)
    finally:
        model.generation_config.repetition_penalty = saved


@contextlib.contextmanager
def ending_after(model, triggers: set[int], eos: int):
    """Within it, the model's next token after any of ``triggers`` is ``eos`` (its logit raised by
    1e4): a rule on the input tokens alone, the same for every decoding path. The input ids are
    taken where they enter the embedding; the logits kept are the last positions' (as with
    logits_to_keep=1)."""
    import torch

    seen = {}

    def keep_ids(module, args):
        seen["ids"] = args[0]

    def end_after_trigger(module, args, output):
        ids = seen["ids"][:, -output.shape[1]:]
        output = output.clone()
        output[..., eos] += 1e4 * torch.isin(ids, torch.tensor(sorted(triggers), device=ids.device))
        return output

    handles = [model.get_input_embeddings().register_forward_pre_hook(keep_ids),
               model.get_output_embeddings().register_forward_hook(end_after_trigger)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def tiny_essays_ending_at_different_depths(model, tokenizer, max_new_tokens: int):
    """Prompts for the tiny model with a token rule that ends the first essay's greedy answer
    after 3 tokens and the second's after 7, while the third runs to the budget; and the texts
    the first two end with."""
    import torch

    prompts = TRIE_PROMPTS
    greedy_ids = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]  # as the samplers
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
            greedy_ids.append(out[0, ids.shape[1]:].tolist())
    triggers = {greedy_ids[0][2], greedy_ids[1][6]}
    # Each answer meets a trigger first where it should (and the third never does).
    assert [next((d for d, t in enumerate(ids) if t in triggers), None) for ids in greedy_ids] == [2, 6, None], \
        (greedy_ids, triggers)
    ends = [tokenizer.decode(greedy_ids[0][:3]), tokenizer.decode(greedy_ids[1][:7])]
    return prompts, ending_after(model, triggers, tokenizer.eos_token_id), ends


@pytest.mark.parametrize("model_name", ["adapter_model", "smollm2"])
def test_trie_sampler_matches_greedy_when_essays_stop_at_different_depths(request, model_name):
    from modules.data import render_prompt
    from modules.sampling import trie_sample
    from modules.scoring import greedy_predict

    # Answers that end early (EOS, newline) and one that runs on, so the batch drops finished
    # essays' cache rows mid-way; top_k=1 must still reproduce greedy decoding. The tiny model
    # (no download) is made to end by a token rule; SmolLM2, a real chat model, ends by itself.
    model, tokenizer = request.getfixturevalue(model_name)
    if model_name == "smollm2":
        questions = ["What is 2+2? Answer with one number.", "Write a long story about a dog and a cat.",
                     "Score this essay from 0 to 9: 'I like dogs.' Answer with one number only."]
        prompts, rule, ends = [render_prompt(tokenizer, q) for q in questions], contextlib.nullcontext(), None
    else:
        prompts, rule, ends = tiny_essays_ending_at_different_depths(model, tokenizer, max_new_tokens=12)
    ranges = [(0, 9)]
    with rule:
        greedy = greedy_predict(model, tokenizer, prompts, ranges, max_new_tokens=12)
        bank = trie_sample(model, tokenizer, prompts, ranges, generator_seeds=[0, 1, 2], max_m=4, temperature=0.7,
                           top_k=1, max_new_tokens=12)
    assert bank == [[g] * 4 for g in greedy]  # same text, scores and truncation flag
    if ends is None:
        lengths = [len(tokenizer(g["text"], add_special_tokens=False)["input_ids"]) for g in greedy]
        assert min(lengths) < 9 and max(lengths) == 12  # the batch really shrinks mid-way
        assert [g.get("truncated", False) for g in greedy] == [n == 12 for n in lengths]
    else:
        assert [g["text"] for g in greedy[:2]] == ends  # ended after 3 and 7 tokens
        assert [g.get("truncated", False) for g in greedy] == [False, False, True]
