"""Both CLIs under `torchrun --nproc_per_node 2` on the CPU (gloo), checked against one process.

Each torchrun call costs about 15 s of start-up (the launcher and two workers import torch) on a
2-core machine, so the multi-process runs are few and the one-process references run in-process.
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import cli_env, small_dataset

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "aes_dataset_mtl"
N_TEST = 5  # odd, so the two ranks get different numbers of essays (3 and 2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str, *args: str, nproc: int = 2, timeout: int = 240) -> subprocess.CompletedProcess:
    env = cli_env(OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(ROOT / script), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> SimpleNamespace:
    folder = small_dataset(tmp_path_factory.mktemp("data"), train=8, valid=4, test=N_TEST)
    test_lines = (folder / "test.jsonl").read_text(encoding="utf-8").splitlines()
    return SimpleNamespace(dir=folder, test=folder / "test.jsonl", ids=[json.loads(l)["id"] for l in test_lines])


# --------------------------------------------------------------------------- main_pipeline.py

TRAIN_FLAGS = ["--base_model_name", "tiny-random-llama", "--mtl", "--per_device_train_batch_size", "2",
               "--gradient_accumulation_steps", "1", "--logging_steps", "1", "--eval_steps", "2",
               "--max_seq_length", "384", "--max_steps", "2", "--no_wandb",
               # one essay per generate call, so scoring does not depend on how essays are batched
               "--per_device_eval_batch_size", "1"]


def test_two_process_training_writes_one_run_and_scores_every_essay_once(data, tmp_path, one_thread):
    from modules.data import dataset_info_for, load_split
    from modules.models import load_adapter
    from modules.evaluation import evaluate_predictions
    from modules.predict import predict_split
    from modules.runs import PromptSettings

    run_dir = tmp_path / "run"
    result = torchrun("main_pipeline.py", *TRAIN_FLAGS, "--data_dir", str(data.dir), "--output_dir", str(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("run folder:") == 1 and result.stdout.count("average") == 1  # rank 0 prints

    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    assert (run_dir / "adapter_model.safetensors").is_file() and (run_dir / "evaluation_results.json").is_file()
    assert sorted(p.name for p in run_dir.glob("*.safetensors")) == ["adapter_model.safetensors"]
    manifest = json.loads((run_dir / "run_manifest.json").read_text())
    assert (manifest["world_size"], manifest["ddp_backend"]) == (2, "gloo")
    assert manifest["train"]["global_step"] == 2
    history = json.loads((run_dir / "log_history.json").read_text())
    logged = [h for h in history if "loss_total" in h]
    # the logged terms are means over both ranks, like the Trainer's own loss
    assert logged and all(h["loss_total"] == pytest.approx(h["loss"], rel=1e-5) for h in logged)

    rows = [json.loads(l) for l in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == data.ids  # every essay once, in test order

    # One process scoring the saved adapter gives the same predictions and evaluation.
    info = dataset_info_for(data.test)
    model, tokenizer = load_adapter("tiny-random-llama", run_dir)
    alone = predict_split(model, tokenizer, load_split(data.test, info), info,
                          PromptSettings(mtl=True, max_prompt_tokens=manifest["max_prompt_tokens"]), batch_size=1)
    for got, want in zip(rows, alone):
        assert {k: got[k] for k in ("id", "gold", "greedy", "text", "valid", "weighted")} == \
               {k: want[k] for k in ("id", "gold", "greedy", "text", "valid", "weighted")}
        assert got["weighted_expected"] == pytest.approx(want["weighted_expected"], abs=1e-5)
    results = json.loads((run_dir / "evaluation_results.json").read_text())
    expected = evaluate_predictions(alone, info)
    assert set(results) == set(expected) | {"confidence"}
    # The validation essays are scored sharded too (the confidence is calibrated on them): each once, in order.
    valid_rows = [json.loads(l) for l in (run_dir / "valid_predictions.jsonl").read_text().splitlines()]
    valid_ids = [json.loads(l)["id"] for l in (data.dir / "valid.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in valid_rows] == valid_ids
    for block in expected:
        assert results[block] == pytest.approx(expected[block], abs=1e-9)


def test_two_process_bad_data_fails_fast_with_one_line(data, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(data.dir, bad)
    lines = (bad / "valid.jsonl").read_text(encoding="utf-8").splitlines()
    record = json.loads(lines[1])
    record["scores"]["task"] = 12
    lines[1] = json.dumps(record)
    (bad / "valid.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    # A model that does not exist proves the error comes before any model load.
    result = torchrun("main_pipeline.py", "--base_model_name", "no-such/model", "--data_dir", str(bad), "--no_wandb",
                      timeout=120)
    assert result.returncode != 0
    # Both ranks find the error; rank 0 alone reports it, and no launcher kill can cut it off.
    assert error_lines(result) == [f"error: {bad / 'valid.jsonl'}:2: field 'scores.task': score 12 outside 1-9"], \
        result.stderr[-3000:]
    assert "[rank0]: Traceback" not in result.stderr and "[rank1]: Traceback" not in result.stderr
    assert not any(tmp_path.glob("**/run_manifest.json"))


def test_load_in_4bit_is_a_one_line_error_without_cuda_or_bitsandbytes(data, tmp_path, capsys, monkeypatch):
    import importlib.util

    import torch

    import main_pipeline
    from modules.models import check_4bit, load_base_model

    out = tmp_path / "run"
    assert main_pipeline.main([*TRAIN_FLAGS, "--data_dir", str(data.dir), "--output_dir", str(out),
                               "--load_in_4bit"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --load_in_4bit needs a CUDA GPU (bitsandbytes QLoRA); drop the flag on CPU"
    assert not out.exists()  # refused before the run folder is made
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        load_base_model("tiny-random-llama", device=torch.device("cpu"), load_in_4bit=True)
    # bitsandbytes is a GPU extra, not in requirements.txt: hide it, so the check runs wherever it is installed.
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    with pytest.raises(ValueError, match="pip install bitsandbytes"):
        check_4bit(torch.device("cuda", 0))


def test_output_embedding_unwraps_and_gathers_a_sharded_matrix(monkeypatch):
    """FSDP2 holds E as a DTensor shard; the EMO loss needs the whole matrix (one-process mesh here)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    from modules.models import load_base_model
    from modules.trainer import output_embedding

    model, _ = load_base_model("tiny-random-llama", device=torch.device("cpu"))
    full = model.get_output_embeddings().weight.detach().clone()
    assert output_embedding(model) is model.get_output_embeddings().weight  # unsharded: E itself
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        head = model.get_output_embeddings()
        head.weight = torch.nn.Parameter(distribute_tensor(head.weight.detach(), mesh, [Shard(0)]), requires_grad=False)

        class Wrapper(torch.nn.Module):  # what DDP and DeepSpeed look like: the model under .module
            def __init__(self, module):
                super().__init__()
                self.module = module

        gathered = output_embedding(Wrapper(model))
        assert not hasattr(gathered, "placements") and torch.equal(gathered, full)
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- self_consistency.py

@pytest.fixture(scope="module")
def adapter(tmp_path_factory, data) -> Path:
    from modules.models import add_lora, load_base_model

    folder = tmp_path_factory.mktemp("adapter") / "adapter"
    model, _ = load_base_model("tiny-random-llama")
    add_lora(model, r=2, alpha=4, dropout=0.0).save_pretrained(folder)
    (folder / "run_manifest.json").write_text(json.dumps({"config": {"mtl": False, "prompt_format": "chat"}}))
    return folder


def sc_flags(adapter: Path, data, *extra: str) -> list[str]:
    return ["--adapter_dir", str(adapter), "--base_model_name", "tiny-random-llama", "--test_path", str(data.test),
            "--max_m", "4", "--chunk_m", "2", "--bootstrap", "10", *extra]


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, adapter, data) -> Path:
    import torch

    import self_consistency

    out = tmp_path_factory.mktemp("sc_one") / "run"
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert self_consistency.main(["run", *sc_flags(adapter, data, "--output_dir", str(out))]) == 0
    finally:
        torch.set_num_threads(saved)
    return out


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, adapter, data) -> Path:
    root = tmp_path_factory.mktemp("sc_two")
    result = torchrun("self_consistency.py", "run", *sc_flags(adapter, data, "--output_root", str(root),
                                                              "--tag", "two"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("overall QWK") == 1  # only rank 0 prints the summary
    folders = list(root.iterdir())
    assert len(folders) == 1 and folders[0].name.startswith("two_"), folders  # ranks agreed on one folder
    return folders[0]


def test_two_process_sampling_merges_the_one_process_bank(two_process_run, one_process_run, data):
    bank = (two_process_run / "samples.jsonl").read_text(encoding="utf-8")
    assert [json.loads(l)["id"] for l in bank.splitlines()] == data.ids  # every essay once, in test order
    # essay i is seeded with seed + i whichever rank draws it: the same bank, byte for byte
    assert bank == (one_process_run / "samples.jsonl").read_text(encoding="utf-8")
    assert not list(two_process_run.glob("samples.rank*.jsonl"))
    for name in ("curves.json", "best_qwk_scores.json"):
        assert (two_process_run / name).read_bytes() == (one_process_run / name).read_bytes(), name
    config = json.loads((two_process_run / "run_config.json").read_text())
    assert config["world_size"] == 2 and config["n_essays"] == N_TEST
    assert json.loads((one_process_run / "run_config.json").read_text())["world_size"] == 1


def test_two_process_sampling_stops_on_bad_input_with_one_line(adapter, data, tmp_path):
    bad = tmp_path / "test.jsonl"
    lines = data.test.read_text(encoding="utf-8").splitlines()
    lines[2] = lines[2][:40]  # a torn line
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    shutil.copy(data.dir / "dataset.json", tmp_path / "dataset.json")
    out = tmp_path / "run"
    result = torchrun("self_consistency.py", "run", "--adapter_dir", str(adapter), "--base_model_name",
                      "tiny-random-llama", "--test_path", str(bad), "--output_dir", str(out), timeout=120)
    assert result.returncode != 0
    errors = error_lines(result)
    assert len(errors) == 1 and errors[0].startswith(f"error: {bad}:3: "), result.stderr[-3000:]
    assert "[rank0]: Traceback" not in result.stderr and "[rank1]: Traceback" not in result.stderr
    assert not out.exists()


def killed_run(folder: Path, two_process_run: Path, banks: dict[str, list[str]]) -> None:
    """A run folder as a kill leaves it: the config and some banks, the last line of each possibly torn."""
    folder.mkdir()
    shutil.copy(two_process_run / "run_config.json", folder / "run_config.json")
    for name, lines in banks.items():
        (folder / name).write_text("".join(lines), encoding="utf-8")


def test_resume_per_rank_continues_a_killed_run(two_process_run, one_process_run, adapter, data, tmp_path):
    want = (one_process_run / "samples.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    planted = json.loads(want[0])
    planted["samples"][0]["text"] = "kept from the killed run"  # shows the essay was not drawn again
    planted = json.dumps(planted, ensure_ascii=False) + "\n"
    out = tmp_path / "killed"
    killed_run(out, two_process_run, {
        "samples.jsonl": [want[4]],                          # merged by an earlier run
        "samples.rank0.jsonl": [planted, '{"id": "torn'],    # rank 0 was killed mid-write
        "samples.rank1.jsonl": [want[1]],
    })
    result = torchrun("self_consistency.py", "sample", *sc_flags(adapter, data, "--output_dir", str(out), "--resume"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"3 of {N_TEST} essays already sampled" in result.stdout and "torn last line" in result.stderr
    assert (out / "samples.jsonl").read_text(encoding="utf-8") == "".join([planted, *want[1:]])
    assert not list(out.glob("samples.rank*.jsonl"))
    assert json.loads((out / "run_config.json").read_text())["resumes"][-1]["world_size"] == 2


def test_one_process_resumes_a_killed_two_process_run(two_process_run, one_process_run, adapter, data, tmp_path,
                                                      one_thread):
    import self_consistency

    want = (one_process_run / "samples.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    out = tmp_path / "killed"
    killed_run(out, two_process_run, {"samples.rank0.jsonl": [want[0], want[2]], "samples.rank1.jsonl": [want[3]]})
    assert self_consistency.main(["sample", *sc_flags(adapter, data, "--output_dir", str(out), "--resume")]) == 0
    assert (out / "samples.jsonl").read_text(encoding="utf-8") == "".join(want)
    assert not list(out.glob("samples.rank*.jsonl"))
