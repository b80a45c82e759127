"""The score head (modules/score_head.py, main_pipeline.py --head_layer): its loss and pooling against
hand-computed values, the same pooled states in a training batch and in scoring's prefill, the ridge
it starts from, its file, its optimizer group, and whole runs (train, resume, --score_path)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import small_dataset
from test_pipeline import kappa, run_cli

from modules import score_head as H
from modules.data import load_dataset_info, load_split
from modules.encoding import ScoringCollator, encode_example
from modules.losses import IGNORE_INDEX, number_token_values
from modules.probe import fit_ridge, predict_ridge
from modules.runs import PromptSettings
from modules.scoring import prefill
from modules.trainer import LossConfig, compute_loss_terms

pytestmark = pytest.mark.usefixtures("one_thread")


def test_head_loss_is_the_mse_in_training_standard_deviations():
    pred = torch.tensor([[2.0, 10.0], [4.0, 7.0]])
    gold = torch.tensor([[3.0, 6.0], [4.0, 9.0]])
    scale = torch.tensor([0.5, 2.0])
    # ((2-3)/.5)^2 = 4, ((10-6)/2)^2 = 4, 0, ((7-9)/2)^2 = 1 -> 9 / 4
    assert H.head_loss(pred, gold, scale).item() == pytest.approx(2.25)


def test_pooling_reads_the_prompt_without_its_first_token_padding_or_target():
    hidden = torch.arange(2 * 5 * 1, dtype=torch.float32).reshape(2, 5, 1)  # row 0: 0..4, row 1: 5..9
    attention = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 7],
                           [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 4, 2]])
    positions = H.prompt_positions(attention, labels)
    assert positions.tolist() == [[False, False, True, True, False], [False, True, True, False, False]]
    assert H.pool_states(hidden, positions)[:, 0].tolist() == [2.5, 6.5]  # (2+3)/2, (6+7)/2
    with pytest.raises(ValueError, match="no prompt position"):
        H.pool_states(hidden, torch.zeros(2, 5, dtype=torch.bool))


@pytest.fixture(scope="module")
def shipped():
    info = load_dataset_info("aes_dataset_mtl")
    return info, load_split("aes_dataset_mtl/train.jsonl", info)[:6]


def test_a_training_batch_pools_what_scoring_prefill_pools(tiny, shipped):
    """Left-padded, with targets after the prompts: each row's pooled states equal the prompt run
    alone, so the head reads in scoring what it was trained on."""
    model, tok = tiny
    info, records = shipped
    settings = PromptSettings()
    examples = [encode_example(r, info, tok, number_values=number_token_values(tok)) for r in records]
    batch = ScoringCollator(tok.pad_token_id)(examples)
    assert len({len(e["input_ids"]) for e in examples}) > 1  # the batch is padded
    position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp_min(0)
    model.eval()
    with torch.no_grad():
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=position_ids,
                       output_hidden_states=True).hidden_states
    with torch.inference_mode():
        for layer in (0, 1, len(hidden) - 1):
            trained = H.pool_states(hidden[layer], H.prompt_positions(batch["attention_mask"], batch["labels"]))
            alone = torch.stack([prefill(model, tok, settings.prompt(r, info, tok), pool_layer=layer).pooled
                                 for r in records])
            torch.testing.assert_close(trained, alone, atol=1e-5, rtol=1e-5)


def test_head_features_run_only_the_layers_up_to_the_head(tiny, shipped):
    """The starting ridge's features: the whole model's pooled states at every index, bit for bit,
    from a pass that never runs a decoder layer more than one above the head's."""
    from transformers import LlamaForCausalLM

    _, tok = tiny
    info, records = shipped
    config = tiny[0].config.to_dict()
    config["num_hidden_layers"] = 4  # the built-in model has two: too few to cut
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(type(tiny[0].config).from_dict(config)).eval()
    prompts = [PromptSettings().prompt(r, info, tok) for r in records[:3]]
    ran: list[int] = []
    for index, layer in enumerate(model.model.layers):
        layer.register_forward_hook(lambda module, args, output, index=index: ran.append(index))
    for head_layer in range(5):
        ran.clear()
        features = H.prompt_features(model, tok, prompts, head_layer)
        assert max(ran) == min(head_layer, 3), head_layer  # layers above head_layer + 1 never ran
        with torch.inference_mode():
            whole = np.stack([prefill(model, tok, p, pool_layer=head_layer).pooled.numpy() for p in prompts])
        assert len(model.model.layers) == 4  # the stack is whole again
        np.testing.assert_array_equal(features, whole)


def test_head_features_from_the_frozen_layer_cache_are_the_prompts_own(tiny, shipped):
    """With --cache_frozen_layers the starting ridge reads each training example's cached states
    (prompt then target) through layers start..head only: the prompt-alone features to 1e-5, at
    every head layer from the cache's up to the last (normed) index."""
    from transformers import LlamaForCausalLM

    from modules.frozen_cache import with_frozen_states

    _, tok = tiny
    info, records = shipped
    config = tiny[0].config.to_dict()
    config["num_hidden_layers"] = 4
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(type(tiny[0].config).from_dict(config)).eval()
    prompts = [PromptSettings().prompt(r, info, tok) for r in records[:3]]
    examples = [encode_example(r, info, tok, number_values=number_token_values(tok)) for r in records[:3]]
    for start in (1, 3):
        cached = with_frozen_states(model, examples, start)
        for head_layer in range(start, 5):
            np.testing.assert_allclose(H.cached_prompt_features(model, cached, start, head_layer),
                                       H.prompt_features(model, tok, prompts, head_layer), atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="reads below the first adapted layer"):
            H.cached_prompt_features(model, cached, start, start - 1)
    assert len(model.model.layers) == 4  # the stack is whole again


def test_the_starting_ridge_reads_the_states_under_the_training_autocast(tiny):
    """main_pipeline fits the head's starting ridge on the states the head then trains on: under bf16
    autocast where the run's precision chose bf16 (the same head as :func:`initial_head` called under
    that autocast, bit for bit), in float32 where it chose float32."""
    import argparse

    import main_pipeline
    from modules.precision import Precision

    model, tok = tiny
    info = load_dataset_info("aes_dataset_mtl")
    records = load_split("aes_dataset_mtl/train.jsonl", info)[:12]
    settings = PromptSettings()
    args = argparse.Namespace(head_layer=1, seed=0)

    def started(chosen: str) -> H.ScoreHead:
        head, error = main_pipeline.score_head_for(args, model, tok, info, records, settings, None,
                                                   Precision(chosen, chosen, "test", True))
        assert error is None
        del model.score_head  # score_head_for attaches it; the fixture model is shared
        return head

    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_by_hand = H.initial_head(model, tok, records, info, settings, 1, seed=0)
    fp32_by_hand = H.initial_head(model, tok, records, info, settings, 1, seed=0)
    bf16, fp32 = started("bf16"), started("fp32")
    torch.testing.assert_close(bf16.state_dict(), bf16_by_hand.state_dict(), rtol=0, atol=0)
    torch.testing.assert_close(fp32.state_dict(), fp32_by_hand.state_dict(), rtol=0, atol=0)
    assert not torch.equal(bf16.feature_mean, fp32.feature_mean)  # bf16 states are not float32's


def test_the_head_starts_as_the_ridge_and_its_file_keeps_it(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6)) * [1, 5, 0.1, 2, 3, 1] + [0, 10, -3, 0, 1, 0]
    gold = np.column_stack([x @ [1, 0.2, 3, 0, 0, 1] + rng.normal(size=40), x[:, 3] * 2 + 5])
    fit = fit_ridge(x, gold)
    head = H.head_from_ridge(fit, 3, gold, ["a", "b"], [(0, 30), (1, 9)])
    want = predict_ridge(fit, x)
    got = head(torch.from_numpy(x).float()).detach().double().numpy()
    np.testing.assert_allclose(got, want, atol=1e-3)
    H.save_head(tmp_path, head)
    again = H.load_head(tmp_path)
    assert (again.layer, again.rubric_names, again.ranges) == (3, ("a", "b"), ((0, 30), (1, 9)))
    torch.testing.assert_close(again(torch.from_numpy(x).float()), head(torch.from_numpy(x).float()))
    expected, rounded = again.expected_and_rounded(torch.from_numpy(x[:3]).float())
    assert rounded == np.floor(np.clip(want[:3], [0, 1], [30, 9]) + 0.5).astype(int).tolist()
    assert H.load_head(tmp_path / "none") is None
    (tmp_path / H.HEAD_FILE).write_bytes(b"not safetensors")
    with pytest.raises(Exception):
        H.load_head(tmp_path)


def test_a_foreign_safetensors_file_is_refused_by_name(tmp_path):
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(1, 2)}, str(tmp_path / H.HEAD_FILE), metadata={"format": "other"})
    with pytest.raises(ValueError, match=r"score_head\.safetensors: not a score head"):
        H.load_head(tmp_path)


def test_the_loss_adds_the_weighted_head_term(tiny, shipped):
    model, tok = tiny
    info, records = shipped
    numbers = number_token_values(tok)
    examples = [{**encode_example(r, info, tok, max_seq_length=384, max_prompt_tokens=300, number_values=numbers),
                 "scores": list(r.scores)} for r in records[:3]]
    batch = ScoringCollator(tok.pad_token_id)(examples)
    assert batch["scores"].shape == (3, len(info.rubric_names))
    config = LossConfig(numbers, ntl_weight=0.5, emo_weight=0.0)
    head = H.ScoreHead(1, model.config.hidden_size, info.rubric_names, info.ranges)
    with torch.no_grad():
        head.score_scale.fill_(2.0)
        head.linear.weight.normal_(generator=torch.Generator().manual_seed(0))
        plain, _, _ = compute_loss_terms(model, batch, config)
        total, logged, out = compute_loss_terms(model, batch, config, head, 0.3)
        pooled = H.pool_states(out.hidden_states[1], H.prompt_positions(batch["attention_mask"], batch["labels"]))
        oracle = ((head(pooled) - batch["scores"]) / 2.0).pow(2).mean()
    assert logged["loss_head"] == pytest.approx(oracle.item(), rel=1e-5)
    assert total.item() == pytest.approx(plain.item() + 0.3 * oracle.item(), rel=1e-5)
    assert logged["loss_total"] == pytest.approx(total.item(), rel=1e-6)


@pytest.fixture(scope="module")
def head_run(tmp_path_factory):
    """A tiny run with a score head (layer 1, its own learning rate), trained 4 steps with a
    checkpoint every 2, scored on 4 test essays."""
    data = small_dataset(tmp_path_factory.mktemp("data"), train=8, valid=4, test=4)
    run = tmp_path_factory.mktemp("runs") / "head"
    flags = ["--base_model_name", "tiny-random-llama", "--data_dir", str(data), "--no_wandb", "--precision", "fp32",
             "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--logging_steps", "1",
             "--eval_steps", "2", "--max_seq_length", "384", "--head_layer", "1", "--head_learning_rate", "0.05",
             "--seed", "3"]
    proc = run_cli(*flags, "--output_dir", str(run), "--max_steps", "4", "--no-load_best_model_at_end")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return data, run, flags, proc


def test_a_head_run_trains_saves_and_reports_the_head(head_run):
    data, run, _, proc = head_run
    for folder in (run, run / "checkpoint-2", run / "checkpoint-4"):
        assert (folder / H.HEAD_FILE).is_file()
    history = json.loads((run / "log_history.json").read_text())
    assert all("loss_head" in h for h in history if "loss_ce" in h)
    final, early = H.load_head(run), H.load_head(run / "checkpoint-2")
    assert final.layer == 1
    torch.testing.assert_close(final.linear.weight, H.load_head(run / "checkpoint-4").linear.weight)
    assert not torch.equal(final.linear.weight, early.linear.weight)  # training moved the head
    rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    results = json.loads((run / "evaluation_results.json").read_text())
    info = load_dataset_info(data)
    for k, name in enumerate(info.rubric_names):
        assert results["head"][name] == pytest.approx(kappa([r["gold"][k] for r in rows], [r["head"][k] for r in rows]))
    for row in rows:
        assert row["head"] == [math.floor(min(max(e, lo), hi) + 0.5)
                               for e, (lo, hi) in zip(row["head_expected"], info.ranges)]
    header = next(line for line in proc.stdout.splitlines() if line.startswith("rubric "))
    assert header.split()[1:] == ["token", "weighted", "head"]  # the printed table has a head column


def test_the_head_has_its_own_learning_rate(tiny, shipped):
    from transformers import TrainingArguments

    from modules.trainer import CustomTrainer

    model, tok = tiny
    info, _ = shipped
    head = H.ScoreHead(1, model.config.hidden_size, info.rubric_names, info.ranges)
    model.score_head = head
    try:
        args = TrainingArguments(output_dir="/tmp/unused-head-optimizer", learning_rate=1e-3, use_cpu=True,
                                 report_to=[])
        trainer = CustomTrainer(model=model, args=args, loss_config=LossConfig(number_token_values(tok)),
                                score_head=head, head_learning_rate=2e-5)
        optimizer = trainer.create_optimizer()
        head_ids = {id(p) for p in head.parameters()}
        groups = [(g["lr"], {id(p) for p in g["params"]}) for g in optimizer.param_groups]
        assert [lr for lr, ids in groups if ids & head_ids] == [2e-5]
        assert next(ids for lr, ids in groups if lr == 2e-5) == head_ids
        assert all(lr == 1e-3 for lr, ids in groups if not ids & head_ids)
    finally:
        del model.score_head


def test_score_path_scores_with_the_saved_head(head_run, tmp_path):
    data, run, _, _ = head_run
    proc = run_cli("--base_model_name", "tiny-random-llama", "--score_path", str(data / "test.jsonl"),
                   "--adapter_dir", str(run), "--output_dir", str(tmp_path / "scored"), "--no_wandb")
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = {r["id"]: r for r in map(json.loads, (run / "predictions.jsonl").read_text().splitlines())}
    scored = [json.loads(line) for line in (tmp_path / "scored" / "predictions.jsonl").read_text().splitlines()]
    assert [r["head"] for r in scored] == [trained[r["id"]]["head"] for r in scored]
    np.testing.assert_allclose([r["head_expected"] for r in scored],
                               [trained[r["id"]]["head_expected"] for r in scored], atol=1e-4)


def test_resume_continues_the_checkpoint_head(head_run, tmp_path):
    import shutil

    _, run, flags, _ = head_run
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoint-4")
    proc = run_cli(*flags, "--resume_checkpoint", str(resumed), "--max_steps", "4", "--no-load_best_model_at_end")
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.testing.assert_close(H.load_head(resumed).linear.weight, H.load_head(run).linear.weight)
    (resumed / "checkpoint-4" / H.HEAD_FILE).unlink()
    shutil.rmtree(resumed / "checkpoint-2")
    proc = run_cli(*flags, "--resume_checkpoint", str(resumed), "--max_steps", "6", "--no-load_best_model_at_end")
    assert proc.returncode != 0 and "no score head to resume" in proc.stderr


@pytest.mark.parametrize("extra, message", [
    (["--head_layer", "1", "--scorer", "probe"], "--head_layer trains with the LoRA scorer"),
    (["--head_layer", "-1"], "needs an index >= 0"),
])
def test_bad_head_flags_are_one_line_errors(extra, message):
    proc = run_cli("--base_model_name", "tiny-random-llama", "--no_wandb", *extra)
    assert proc.returncode == 2 and message in proc.stderr


def test_a_head_layer_beyond_the_model_is_refused(tmp_path):
    data = small_dataset(tmp_path / "data", train=4, valid=2, test=2)
    proc = run_cli("--base_model_name", "tiny-random-llama", "--data_dir", str(data), "--no_wandb", "--head_layer", "99",
                   "--output_dir", str(tmp_path / "run"), "--max_steps", "1")
    assert proc.returncode != 0 and "--head_layer 99: the model has hidden-state indices 0.." in proc.stderr


def test_the_best_checkpoint_keeps_its_own_head(head_run, tmp_path):
    """--load_best_model_at_end: the Trainer reloads the best adapter, and the run saves that
    checkpoint's head with it, not the last step's."""
    _, _, flags, _ = head_run
    run = tmp_path / "best"
    proc = run_cli(*flags, "--output_dir", str(run), "--max_steps", "4", "--skip_scoring")
    assert proc.returncode == 0, proc.stderr[-3000:]
    kept = json.loads((run / "run_manifest.json").read_text())["train"]["kept_checkpoint"]
    saved = H.load_head(run).linear.weight
    torch.testing.assert_close(saved, H.load_head(kept).linear.weight, rtol=0, atol=0)
    others = [c for c in run.glob("checkpoint-*") if c.name != kept.split("/")[-1]]
    assert all(not torch.equal(saved, H.load_head(c).linear.weight) for c in others)
