"""benchmarks/lever_checkpoint_average.py: the averaged model is the base plus the mean of the
checkpoints' exact LoRA deltas, checked against PEFT's own merge of each adapter."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks import lever_checkpoint_average as lever
from modules.models import add_lora, load_adapter, load_base_model

TINY = "tiny-random-llama"


def saved_adapter(folder: Path, seed: int) -> Path:
    """A tiny-model LoRA adapter with random (non-zero) A and B, saved as the Trainer saves checkpoints."""
    model, _ = load_base_model(TINY, device=torch.device("cpu"), dtype=torch.float32)
    adapter = add_lora(model, r=4, alpha=8)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in adapter.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    adapter.save_pretrained(str(folder))
    return folder


def merged_weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    model, _ = load_adapter(TINY, adapter_dir, device=torch.device("cpu"), dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.merge_and_unload().named_parameters()}


def test_averaged_model_is_the_mean_of_the_merged_checkpoints(tmp_path: Path) -> None:
    checkpoints = [saved_adapter(tmp_path / f"checkpoint-{k}", seed=k) for k in (1, 2)]
    model, _ = lever.averaged_model(TINY, checkpoints)
    got = dict(model.named_parameters())
    first, second = (merged_weights(c) for c in checkpoints)
    assert got.keys() == first.keys()
    changed = [k for k in first if not torch.equal(first[k], second[k])]
    assert changed and all("q_proj" in k or "v_proj" in k for k in changed)
    for k in first:
        torch.testing.assert_close(got[k], (first[k] + second[k]) / 2, rtol=1e-5, atol=1e-6)


def test_averaging_refuses_checkpoints_of_different_modules(tmp_path: Path) -> None:
    first = saved_adapter(tmp_path / "checkpoint-1", seed=1)
    model, _ = load_base_model(TINY, device=torch.device("cpu"), dtype=torch.float32)
    add_lora(model, r=4, alpha=8, target_modules=("q_proj",)).save_pretrained(str(tmp_path / "checkpoint-2"))
    with pytest.raises(ValueError, match="adapt different modules"):
        lever.averaged_model(TINY, [first, tmp_path / "checkpoint-2"])
