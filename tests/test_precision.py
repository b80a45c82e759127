"""The training precision follows the machine (modules/precision.py): the auto rule with the CPU and
CUDA checks mocked both ways, the real timing check on an emulated-bf16 CPU, and main_pipeline.py
recording the choice (manifest and the Trainer's own arguments) and warning on a forced slow bf16."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import cli_env, small_dataset

from modules import precision as P

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
# oneDNN capped at AVX2: its bf16 matmuls are emulated, as on a CPU without AVX512-BF16 or AMX
# (about 20x slower than float32 here). On such a CPU the cap changes nothing, so these tests
# mean the same on both kinds of machine.
EMULATED_BF16 = {"ONEDNN_MAX_CPU_ISA": "AVX2"}
SLOW_WARNING = "trains many times slower than float32"


@pytest.fixture
def cpu(monkeypatch):
    """Set what the CPU check sees: ``cpu(arch, flags, speedup)``; returns the list of timed probes."""
    probes = []

    def set_cpu(arch: str, flags: list[str], speedup: float):
        monkeypatch.setattr(P.platform, "machine", lambda: arch)
        monkeypatch.setattr(P, "cpu_bf16_flags", lambda: list(flags))
        monkeypatch.setattr(P, "bf16_matmul_speedup", lambda *a, **k: probes.append(1) or speedup)
        return probes

    return set_cpu


@pytest.mark.parametrize("arch, flags, speedup, chosen, timed", [
    ("x86_64", [], 5.0, "fp32", False),  # AVX2 only: emulated bf16, and nothing is timed
    ("x86_64", ["AVX512-BF16"], 1.7, "bf16", True),
    ("x86_64", ["AVX512-BF16", "AMX"], 2.5, "bf16", True),
    ("x86_64", ["AVX512-BF16"], 0.05, "fp32", True),  # the flags, but a kernel that does not use them
    ("aarch64", [], 1.4, "bf16", True),  # no x86 flags to read: the timing decides
    ("aarch64", [], 0.6, "fp32", True),
])
def test_auto_on_the_cpu(cpu, arch, flags, speedup, chosen, timed):
    probes = cpu(arch, flags, speedup)
    got = P.choose_precision("auto", CPU)
    assert (got.chosen, got.bf16, got.native_bf16) == (chosen, chosen == "bf16", chosen == "bf16")
    assert bool(probes) is timed
    if timed:
        assert f"{speedup:.2f}x the speed of float32" in got.reason
    else:
        assert "neither AVX512-BF16 nor AMX" in got.reason


@pytest.mark.parametrize("native", [True, False])
def test_forced_choices_on_the_cpu(cpu, native):
    probes = cpu("x86_64", ["AVX512-BF16"] if native else [], 2.0)
    fp32 = P.choose_precision("fp32", CPU)
    assert (fp32.chosen, fp32.native_bf16, probes) == ("fp32", None, [])  # nothing to judge, nothing timed
    assert P.slow_bf16_warning(fp32, CPU) is None
    bf16 = P.choose_precision("bf16", CPU)
    assert (bf16.chosen, bf16.native_bf16) == ("bf16", native)
    assert bf16.reason.startswith("asked for with --precision bf16")
    warning = P.slow_bf16_warning(bf16, CPU)
    assert (warning is not None) is (not native)
    if warning:
        assert SLOW_WARNING in warning and "--precision auto or fp32" in warning and "\n" not in warning


@pytest.mark.parametrize("bf16_gpu", [True, False])
def test_auto_on_a_gpu(monkeypatch, cpu, bf16_gpu):
    probes = cpu("x86_64", [], 0.01)  # the CPU's bf16 is irrelevant on a GPU
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_gpu)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Test GPU")
    gpu = torch.device("cuda", 0)
    got = P.choose_precision("auto", gpu)
    assert (got.chosen, got.native_bf16, probes) == ("bf16" if bf16_gpu else "fp32", bf16_gpu, [])
    assert P.choose_precision("fp32", gpu).chosen == "fp32"
    assert P.slow_bf16_warning(got, gpu) is None
    if bf16_gpu:
        assert P.choose_precision("bf16", gpu).chosen == "bf16"
    else:
        with pytest.raises(ValueError, match="--precision bf16: Test GPU has no bf16 support"):
            P.choose_precision("bf16", gpu)


def test_the_real_checks():
    flags = P.cpu_bf16_flags()
    assert set(flags) <= {"AVX512-BF16", "AMX"}
    torch.manual_seed(7)
    rng_before = torch.random.get_rng_state()
    speedup = P.bf16_matmul_speedup(shape=(32, 64, 64), reps=1)
    assert 0 < speedup < float("inf")
    # the timing draws nothing from the global RNG, which the run seeded for LoRA's init and dropout
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    with pytest.raises(ValueError, match="choose one of auto, bf16, fp32"):
        P.choose_precision("fp16", CPU)


def test_emulated_bf16_is_judged_slow():
    """The real check, not mocked: with oneDNN capped at AVX2 (whatever the CPU's flags say) bf16 is
    not native and auto picks float32."""
    code = ("import torch; from modules.precision import choose_precision; "
            "p = choose_precision('auto', torch.device('cpu')); print(p.chosen, p.native_bf16, '|', p.reason)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=cli_env(**EMULATED_BF16), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("fp32 False |"), done.stdout


# --------------------------------------------------------------------------- main_pipeline.py

TRAIN = ["--base_model_name", "tiny-random-llama", "--mtl", "--per_device_train_batch_size", "2",
         "--gradient_accumulation_steps", "1", "--max_steps", "1", "--eval_steps", "1", "--max_seq_length", "384",
         "--no_wandb", "--skip_scoring"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return small_dataset(tmp_path_factory.mktemp("data"), train=4, valid=2, test=2)


def trained_with(run_dir: Path) -> tuple[dict, bool]:
    """The manifest's precision record and the bf16 flag of the TrainingArguments the Trainer saved."""
    manifest = json.loads((run_dir / "run_manifest.json").read_text())
    [checkpoint] = run_dir.glob("checkpoint-*")
    training_args = torch.load(checkpoint / "training_args.bin", weights_only=False)
    return manifest["precision"], training_args.bf16


@pytest.mark.parametrize("flags, precision", [([], "auto"), (["--bf16"], "bf16"), (["--precision", "fp32"], "fp32")])
def test_cli_on_a_cpu_without_native_bf16(data, tmp_path, flags, precision):
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, str(ROOT / "main_pipeline.py"), *TRAIN, *flags, "--data_dir", str(data),
                           "--output_dir", str(run_dir)], cwd=ROOT, env=cli_env(**EMULATED_BF16),
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    record, trainer_bf16 = trained_with(run_dir)
    forced_bf16 = precision == "bf16"
    assert record["requested"] == precision and trainer_bf16 is forced_bf16
    assert record["chosen"] == ("bf16" if forced_bf16 else "fp32")
    assert record["native_bf16"] is (None if precision == "fp32" else False)
    chosen_lines = [l for l in done.stderr.splitlines() if "main_pipeline: precision: " in l]
    assert len(chosen_lines) == 1 and record["reason"] in chosen_lines[0]  # logged once, with its reason
    warnings = [l for l in done.stderr.splitlines() if SLOW_WARNING in l]
    assert len(warnings) == (1 if forced_bf16 else 0), done.stderr[-3000:]


def test_cli_auto_on_a_cpu_with_native_bf16(data, tmp_path, cpu, capsys):
    import main_pipeline

    cpu("x86_64", ["AVX512-BF16", "AMX"], 1.8)
    run_dir = tmp_path / "run"
    assert main_pipeline.main([*TRAIN, "--data_dir", str(data), "--output_dir", str(run_dir)]) == 0
    record, trainer_bf16 = trained_with(run_dir)
    assert trainer_bf16 is True
    assert record == {"requested": "auto", "chosen": "bf16", "native_bf16": True,
                      "reason": "this CPU has AVX512-BF16 and AMX, and a bf16 matmul ran 1.80x the speed of float32 "
                                "(faster)"}


def test_bf16_with_fp32_is_a_usage_error(data):
    done = subprocess.run([sys.executable, str(ROOT / "main_pipeline.py"), *TRAIN, "--bf16", "--precision", "fp32",
                           "--data_dir", str(data), "--dry_run"], cwd=ROOT, env=cli_env(), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: --bf16 asks for --precision bf16; do not also give --precision fp32 (see "
                                   "main_pipeline.py --help)")
