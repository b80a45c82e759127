"""The frozen-layer cache (modules/frozen_cache.py, main_pipeline.py --cache_frozen_layers): the
cached path gives a full forward's logits, hidden states and losses, and a cached run trains the
same adapter as an uncached one."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import small_dataset
from test_pipeline import run_cli

from modules import frozen_cache as F
from modules.data import load_dataset_info, load_split
from modules.encoding import ScoringCollator, encode_example
from modules.losses import number_token_values
from modules.models import add_lora, load_base_model
from modules.trainer import LossConfig, compute_loss_terms

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def adapted():
    """tiny-random-llama with LoRA (random B, so the adapter changes the output) on its top layer."""
    model, tok = load_base_model("tiny-random-llama", device=torch.device("cpu"))
    model = add_lora(model, top_layers=1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5, generator=torch.Generator().manual_seed(len(name)))
    info = load_dataset_info("aes_dataset_mtl")
    examples = [{**encode_example(r, info, tok, number_values=number_token_values(tok)), "scores": list(r.scores)}
                for r in load_split("aes_dataset_mtl/train.jsonl", info)[:4]]
    return model, tok, examples


def test_the_first_adapted_layer_is_the_lowest_with_lora(adapted):
    model, _, _ = adapted
    n = len(F.decoder(model).layers)
    assert F.first_adapted_layer(model) == n - 1
    with F.layers_from(model, 1):
        assert len(F.decoder(model).layers) == n - 1
    assert len(F.decoder(model).layers) == n  # restored


def test_hidden_states_asked_inside_a_cut_leave_the_whole_pass_whole():
    """transformers hooks its hidden-state recording on the first forward that asks for it: asked
    first inside layers_from, a later whole pass must still return every layer's states."""
    model, _ = load_base_model("tiny-random-llama", device=torch.device("cpu"))
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    with torch.no_grad():
        with F.layers_from(model, 1):
            cut = model(inputs_embeds=model.get_input_embeddings()(ids), output_hidden_states=True).hidden_states
        whole = model(input_ids=ids, output_hidden_states=True).hidden_states
    n = model.config.num_hidden_layers
    assert len(cut) == n and len(whole) == n + 1
    torch.testing.assert_close(whole[0], model.get_input_embeddings()(ids))


def test_the_cached_path_equals_a_full_forward(adapted):
    """A padded batch, the LoRA on: logits, every hidden state above the cut and every loss term
    (with a score head reading an adapted layer) agree with the full forward to 1e-5."""
    from modules.score_head import ScoreHead

    model, tok, examples = adapted
    start = F.first_adapted_layer(model)
    states = F.frozen_states(model, examples, start)
    assert [s.shape[0] for s in states] == [len(e["input_ids"]) for e in examples]
    batch = ScoringCollator(tok.pad_token_id)(examples)
    cached_batch = ScoringCollator(tok.pad_token_id)([{**e, F.STATES_KEY: s} for e, s in zip(examples, states)])
    assert len({len(e["input_ids"]) for e in examples}) > 1 and cached_batch[F.STATES_KEY].shape[:2] == batch["input_ids"].shape
    info = load_dataset_info("aes_dataset_mtl")
    head = ScoreHead(start + 1, model.config.hidden_size, info.rubric_names, info.ranges)
    config = LossConfig(number_token_values(tok), ntl_weight=0.5, emo_weight=0.0)
    model.eval()
    with torch.no_grad():
        full_total, full_terms, full = compute_loss_terms(model, batch, config, head, 0.7)
        cached_total, cached_terms, cached = compute_loss_terms(model, cached_batch, config, head, 0.7, start)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(cached.logits, full.logits, atol=1e-5, rtol=0)
    for index in range(start, len(full.hidden_states)):
        torch.testing.assert_close(cached.hidden_states[index - start][real], full.hidden_states[index][real],
                                   atol=1e-5, rtol=1e-5)
    assert cached_total.item() == pytest.approx(full_total.item(), abs=1e-5)
    for key in ("loss_ce", "loss_ntl", "loss_head"):
        assert cached_terms[key] == pytest.approx(full_terms[key], abs=1e-5)
    assert F.check_cached_forward(model, examples[0], start) <= 1e-5


def test_a_model_that_changes_its_inputs_embeds_is_refused(adapted, monkeypatch):
    model, _, examples = adapted
    start = F.first_adapted_layer(model)
    real = F.cached_forward
    monkeypatch.setattr(F, "cached_forward", lambda m, s, st, **kw: real(m, s * 2.0, st, **kw))
    with pytest.raises(ValueError, match="frozen-layer cache changes this model's logits"):
        F.check_cached_forward(model, examples[0], start)


def test_a_cached_run_trains_the_adapter_an_uncached_run_trains(tmp_path):
    from safetensors.torch import load_file

    data = small_dataset(tmp_path / "data", train=8, valid=4, test=2)
    flags = ["--base_model_name", "tiny-random-llama", "--data_dir", str(data), "--no_wandb", "--precision", "fp32",
             "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--logging_steps", "1",
             "--max_steps", "4", "--eval_steps", "2", "--max_seq_length", "384", "--lora_top_layers", "1",
             "--head_layer", "2", "--skip_scoring"]
    for name, extra in (("full", []), ("cached", ["--cache_frozen_layers"])):
        proc = run_cli(*flags, *extra, "--output_dir", str(tmp_path / name))
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "frozen-layer cache: layers 0..0 computed once" in proc.stderr
    full, cached = (load_file(str(tmp_path / n / "adapter_model.safetensors")) for n in ("full", "cached"))
    assert sorted(full) == sorted(cached)
    for key in full:
        torch.testing.assert_close(cached[key], full[key], atol=1e-5, rtol=1e-4)
    losses = [[h["loss"] for h in json.loads((tmp_path / n / "log_history.json").read_text()) if "loss" in h]
              for n in ("full", "cached")]
    assert losses[1] == pytest.approx(losses[0], abs=1e-4)


@pytest.mark.parametrize("extra, message", [
    (["--cache_frozen_layers"], "--cache_frozen_layers needs --lora_top_layers N"),
])
def test_cache_flags_are_checked(extra, message):
    proc = run_cli("--base_model_name", "tiny-random-llama", "--no_wandb", *extra)
    assert proc.returncode == 2 and message in proc.stderr


def test_a_head_below_the_cache_is_refused(tmp_path):
    data = small_dataset(tmp_path / "data", train=4, valid=2, test=2)
    proc = run_cli("--base_model_name", "tiny-random-llama", "--data_dir", str(data), "--no_wandb", "--lora_top_layers",
                   "1", "--cache_frozen_layers", "--head_layer", "0", "--output_dir", str(tmp_path / "run"),
                   "--max_steps", "1")
    assert proc.returncode != 0 and "--head_layer 0 reads below the first adapted layer 1" in proc.stderr
