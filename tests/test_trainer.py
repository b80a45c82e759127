"""compute_loss_terms: trimmed logits and left padding give exactly the full-logit losses."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from modules.data import load_splits
from modules.encoding import ScoringCollator, encode_example
from modules.losses import IGNORE_INDEX, composite_loss, emo_loss, ntl_mse, ntl_was, number_token_values
from modules.models import add_lora, load_base_model
from modules.trainer import (LABEL_NAMES, LossConfig, ShuffledLengthBuckets, compute_loss_terms, labeled_log_probs,
                             logits_to_keep, loss_terms, shift_labels)


@pytest.fixture(scope="module")
def tiny_batch_parts():
    model, tokenizer = load_base_model("tiny-random-llama")
    info, splits = load_splits(Path(__file__).resolve().parents[1] / "aes_dataset_mtl")
    values = number_token_values(tokenizer)
    feats = [encode_example(r, info, tokenizer, mtl=True, number_values=values) for r in splits["train"][:3]]
    return model, tokenizer, feats, values


def reference_terms(model, feats, values, config: LossConfig) -> dict[str, float]:
    """Each example alone, unpadded, full logits, labels shifted by hand, then pooled."""
    rows = []
    for f in feats:
        logits = model(input_ids=torch.tensor([f["input_ids"]])).logits[0, :-1]
        rows.append((logits, {k: torch.tensor(f[k][1:]) for k in LABEL_NAMES}))
    logits = torch.cat([l for l, _ in rows])[None]
    labels = {k: torch.cat([y[k] for _, y in rows])[None] for k in LABEL_NAMES}
    mask = labels["labels"] != IGNORE_INDEX
    ce = F.cross_entropy(logits[mask], labels["labels"][mask])
    ntl = (ntl_mse if config.loss_type == "mse" else ntl_was)(logits, labels["ntl_labels"], values)
    emo = emo_loss(logits, labels["emo_labels"], model.get_output_embeddings().weight, top_k=config.emo_topk)
    return composite_loss(ce, ntl, emo, config.ntl_weight, config.emo_weight)[1]


@pytest.mark.parametrize("loss_type, ntl_weight", [("mse", 2.0), ("was", 2.0), ("mse", -1.0)])
def test_trimmed_left_padded_losses_equal_full_reference(tiny_batch_parts, loss_type, ntl_weight):
    model, tokenizer, feats, values = tiny_batch_parts
    config = LossConfig(values, ntl_weight=ntl_weight, emo_weight=0.1, loss_type=loss_type, emo_topk=16)
    expected = reference_terms(model, feats, values, config)
    with torch.no_grad():
        for side in ("left", "right"):
            batch = ScoringCollator(tokenizer.pad_token_id, side)(feats)
            _, terms, outputs = compute_loss_terms(model, batch, config)
            assert terms.keys() == expected.keys()
            for key in expected:
                assert terms[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-5), (side, key)
    assert ("dynamic_lambda" in terms) == (ntl_weight < 0)


@pytest.mark.parametrize("loss_type", ["mse", "was"])
def test_one_gather_equals_each_public_loss_in_value_and_gradient(loss_type):
    """loss_terms (one gather of gold, number and top-k columns) against F.cross_entropy, ntl_* and
    emo_loss each on the full logits, over a padded vocabulary (values shorter than V)."""
    gen = torch.Generator().manual_seed(0)
    batch, length, vocab, numbers = 2, 9, 40, 12
    logits = (3 * torch.randn(batch, length, vocab, generator=gen)).requires_grad_()
    values = torch.full((vocab - 3,), float("nan"))
    values[5:5 + numbers] = torch.arange(numbers, dtype=torch.float32) % 10  # "7" and " 7" share a value
    embedding = torch.randn(vocab, 6, generator=gen)
    labels = torch.randint(0, vocab, (batch, length), generator=gen)
    labels[:, :3] = IGNORE_INDEX                                       # the prompt
    labels[:, 3:5] = torch.randint(5, 5 + numbers, (batch, 2), generator=gen)  # the score digits
    ntl_labels, emo_labels = labels.clone(), labels.clone()
    ntl_labels[:, 5:] = IGNORE_INDEX
    emo_labels[:, 3:5] = IGNORE_INDEX
    config = LossConfig(values, ntl_weight=2.0, emo_weight=0.1, loss_type=loss_type, emo_topk=7)
    mask = labels != IGNORE_INDEX
    want = [F.cross_entropy(logits[mask], labels[mask]),
            (ntl_mse if loss_type == "mse" else ntl_was)(logits, ntl_labels, values),
            emo_loss(logits, emo_labels, embedding, top_k=7)]
    got = loss_terms(*labeled_log_probs(logits, labels, ntl_labels, emo_labels), config, embedding)
    for name, g, w in zip(("ce", "ntl", "emo"), got, want):
        assert g.item() == pytest.approx(w.item(), rel=1e-5, abs=1e-6), name
        grad_got, = torch.autograd.grad(g, logits, retain_graph=True)
        grad_want, = torch.autograd.grad(w, logits, retain_graph=True)
        torch.testing.assert_close(grad_got, grad_want, atol=1e-6, rtol=1e-5, msg=name)
    # a weight of 0 leaves its term out
    ce, ntl, emo = loss_terms(*labeled_log_probs(logits, labels, ntl_labels, emo_labels),
                              LossConfig(values, ntl_weight=0.0, emo_weight=0.0), None)
    assert ntl is None and emo is None and ce.item() == pytest.approx(want[0].item(), rel=1e-6)


def test_loss_config_refuses_bad_settings():
    values = torch.zeros(4)
    with pytest.raises(ValueError, match="emo_topk must be >= 1, got 0"):
        LossConfig(values, emo_topk=0)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        LossConfig(values, loss_type="l1")


def test_logits_to_keep_covers_every_label():
    labels = torch.full((2, 10), IGNORE_INDEX)
    labels[0, 7:] = 1
    labels[1, 5:9] = 2
    keep = logits_to_keep(labels)
    assert keep == 6  # position 4 predicts the first label at 5
    assert (shift_labels(labels)[:, :-keep] == IGNORE_INDEX).all()
    assert logits_to_keep(torch.full((1, 4), IGNORE_INDEX)) == 1


def test_loss_terms_backpropagate_into_lora(tiny_batch_parts):
    _, tokenizer, feats, values = tiny_batch_parts
    model, _ = load_base_model("tiny-random-llama")
    model = add_lora(model, r=4, alpha=8, dropout=0.0)
    batch = ScoringCollator(tokenizer.pad_token_id)(feats)
    total, terms, _ = compute_loss_terms(model, batch, LossConfig(values))
    total.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    assert all(torch.isfinite(torch.tensor(v)) for v in terms.values())


def test_shuffled_length_buckets_batch_similar_lengths_in_random_order():
    lengths = [int(x) for x in torch.randint(50, 900, (203,), generator=torch.Generator().manual_seed(1))]
    sampler = ShuffledLengthBuckets(lengths, 4, pool_batches=8, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(203)) and len(sampler) == 203  # every example once per epoch
    batches = [order[i:i + 4] for i in range(0, 203, 4)]
    assert batches == sampler.batches() and len(batches[-1]) == 3  # the one short batch is last

    def padded(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches) / len(lengths)
    randperm = torch.randperm(203, generator=torch.Generator().manual_seed(3)).tolist()
    assert padded(batches) < 0.85 * padded([randperm[i:i + 4] for i in range(0, 203, 4)])
    # No sweep: the batches' longest essays are not ordered (LengthGroupedSampler reads long to short).
    longest = torch.tensor([max(lengths[i] for i in b) for b in batches[:-1]], dtype=torch.float)
    steps = torch.arange(len(longest), dtype=torch.float)
    assert abs(torch.corrcoef(torch.stack([longest, steps]))[0, 1]) < 0.3
    sampler.set_epoch(1)
    assert list(sampler) != order and sorted(sampler) == list(range(203))
    sampler.set_epoch(0)
    assert list(sampler) == order  # an epoch's order depends only on seed and epoch (resume replays it)
    with pytest.raises(ValueError, match="batch_size"):
        ShuffledLengthBuckets(lengths, 0)


def test_trainer_group_by_length_uses_shuffled_length_buckets(tiny_batch_parts, tmp_path):
    from transformers import TrainingArguments

    from modules.trainer import CustomTrainer

    model, tokenizer, feats, values = tiny_batch_parts
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, report_to=[], use_cpu=True,
                             train_sampling_strategy="group_by_length", seed=5, label_names=LABEL_NAMES,
                             remove_unused_columns=False)
    trainer = CustomTrainer(model=model, args=args, train_dataset=feats, loss_config=LossConfig(values),
                            data_collator=ScoringCollator(tokenizer.pad_token_id))
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, ShuffledLengthBuckets) and sampler.batch_size == 2 and sampler.seed == 5
    assert sampler.lengths == [len(f["input_ids"]) for f in feats]
    assert len(list(trainer.get_train_dataloader())) == 2
