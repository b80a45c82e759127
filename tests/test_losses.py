"""Tests for modules.losses: hand-computed cases, agreement with the `ntloss` package, gradients,
empty batches, extreme logits, number-token detection and a structural memory check."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from modules.losses import composite_loss, emo_loss, ntl_mse, ntl_was, number_token_values

NAN = float("nan")
LOSSES = ("ntl_mse", "ntl_was", "emo")


def word_tokenizer(words, added=(), special=()):
    """A real PreTrainedTokenizerFast (WordLevel) whose ids follow `words`, then added tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    if added:
        fast.add_tokens(list(added))
    if special:
        fast.add_special_tokens({"additional_special_tokens": list(special)})
    return fast


def call(name, logits, labels, values=None, emb=None, top_k=64):
    if name == "ntl_mse":
        return ntl_mse(logits, labels, values)
    if name == "ntl_was":
        return ntl_was(logits, labels, values)
    return emo_loss(logits, labels, emb, top_k=top_k)


def random_setup(seed=0, B=3, T=9, V=20, D=6, scale=3.0, dtype=torch.float32):
    """Random logits/labels (numbers, words and -100) with values: ids 4..13 are digits 0..9."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g) * scale).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.25] = -100
    labels[0, 0], labels[0, 1], labels[1, 2] = 7, 2, -100  # at least one number and one word
    values = torch.full((V,), NAN)
    values[4:14] = torch.arange(10.0)
    emb = torch.randn(V, D, generator=g)
    return logits, labels, values, emb


# ----------------------------------------------------------------------------- number values

def test_number_token_values_rules():
    words = ["[UNK]", "12", "100", "Ġ5", "▁7", " 3", "5a", "\u0663", "ĠĠ5", "007", "Ġ", "▁",
             "-1", "1.5", "\u00b2", "\uff15", "5", "x", "Ġ 5", "1e3"]
    tok = word_tokenizer(words, added=["42", "<score>"], special=["<s1>", "9"])
    values = number_token_values(tok)
    ids = {t: i for i, t in enumerate(tok.convert_ids_to_tokens(list(range(len(tok)))))}
    expected = {"12": 12, "100": 100, "Ġ5": 5, "▁7": 7, " 3": 3, "007": 7, "5": 5, "42": 42, "9": 9}
    assert values.shape == (len(tok),) and values.dtype == torch.float32
    for token, idx in ids.items():
        want = expected.get(token)
        if want is None:  # "5a", Arabic-Indic 3, two markers, bare markers, "-1", "1.5", "²", "５", ...
            assert math.isnan(values[idx]), token
        else:
            assert values[idx].item() == want, token


def test_number_token_values_llama3_style(llama3_style_tokenizer):
    tok = llama3_style_tokenizer
    values = number_token_values(tok)
    assert values.shape == (len(tok),)
    for text in ("12", "25", "399", "7"):
        assert values[tok.convert_tokens_to_ids(text)].item() == int(text)
    for idx in torch.nonzero(~torch.isnan(values)).flatten().tolist():
        assert tok.convert_ids_to_tokens(idx).lstrip("Ġ").isascii()
    assert math.isnan(values[tok.convert_tokens_to_ids("<|eot_id|>")])


# ----------------------------------------------------------------------------- hand-computed

def hand_ntl_inputs():
    # V = 4: "a"(0), "1"(1), "3"(2), "b"(3) -> values [nan, 1, 3, nan]
    values = torch.tensor([NAN, 1.0, 3.0, NAN])
    logits = torch.tensor([[[5.0, 0.0, 0.0, 1.0],               # label "3": p(1, 3) = (1/2, 1/2)
                            [0.0, math.log(3.0), 0.0, 9.0],     # label "1": p(1, 3) = (3/4, 1/4)
                            [0.0, 4.0, 0.0, 0.0],               # label "a": not a number -> ignored
                            [0.0, 0.0, 7.0, 0.0]]], requires_grad=True)  # -100
    labels = torch.tensor([[2, 1, 0, -100]])
    return logits, labels, values


def test_ntl_mse_hand():
    logits, labels, values = hand_ntl_inputs()
    # pos 0: y_hat = (1 + 3)/2 = 2, y = 3 -> 1;  pos 1: y_hat = 3/4 + 3/4 = 1.5, y = 1 -> 0.25
    # mean over the 2 number positions: (1 + 0.25) / 2 = 0.625
    assert ntl_mse(logits, labels, values).item() == pytest.approx(0.625, abs=1e-6)


def test_ntl_was_hand():
    logits, labels, values = hand_ntl_inputs()
    # values {1, 3}, gap 2. pos 0: |F_p(1) - F_y(1)| = |1/2 - 0| -> 1/2 * 2 = 1
    # pos 1: |3/4 - 1| * 2 = 0.5.  mean = 0.75
    assert ntl_was(logits, labels, values).item() == pytest.approx(0.75, abs=1e-6)


def test_ntl_was_merges_equal_values():
    tok = word_tokenizer(["[UNK]", "5", "Ġ5", "2", "▁9"])
    values = number_token_values(tok)
    assert values.tolist()[1:] == [5.0, 5.0, 2.0, 9.0]
    logits = torch.tensor([[[3.0, 0.0, 0.0, 0.0, 0.0]]])  # uniform 1/4 over the 4 number tokens
    labels = torch.tensor([[3]])                           # "2"
    # bins: 2 -> 1/4, 5 -> 1/2 ("5" + "Ġ5"), 9 -> 1/4.  y = 2:
    # k=1 (2->5): |1/4 - 1| * 3 = 2.25;  k=2 (5->9): |3/4 - 1| * 4 = 1.0  -> 3.25 (= E|v - 2|)
    assert ntl_was(logits, labels, values).item() == pytest.approx(3.25, abs=1e-6)
    # MSE: y_hat = (5 + 5 + 2 + 9)/4 = 5.25 -> (5.25 - 2)^2 = 10.5625
    assert ntl_mse(logits, labels, values).item() == pytest.approx(10.5625, abs=1e-5)


def test_emo_hand():
    # V = 3, D = 2; E rows normalise to [1,0], [0,1], [1,0]. p = (4, 3, 1)/8 = (.5, .375, .125)
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    logits = torch.log(torch.tensor([[[4.0, 3.0, 1.0], [4.0, 3.0, 1.0], [4.0, 3.0, 1.0]]]))
    # gold 2, top-2 = {0, 1}: q = n(.5 [1,0] + .375 [0,1]) = [.8, .6]; cos(n(E_2) = [1,0], q) = .8 -> .2
    assert emo_loss(logits[:, :1], torch.tensor([[2]]), emb, top_k=2).item() == pytest.approx(0.2, abs=1e-6)
    # gold 0, top-3: w = (0, .375, .125): q = n([.125, .375]); cos with [1,0] = 1/sqrt(10)
    want = 1 - 1 / math.sqrt(10)
    assert emo_loss(logits[:, :1], torch.tensor([[0]]), emb, top_k=3).item() == pytest.approx(want, abs=1e-6)
    # gold 1, top-2 = {0, 1}: w = (.5, 0) -> q = [1, 0] ⟂ E_1 -> loss 1; mean with the others:
    labels = torch.tensor([[2, 1, -100]])
    assert emo_loss(logits, labels, emb, top_k=2).item() == pytest.approx((0.2 + 1.0) / 2, abs=1e-6)


def test_emo_degenerate_all_mass_on_gold():
    # all top-k mass on gold (others underflow to exactly 0): q = 0 -> cos 0 -> loss 1, zero grad
    emb = torch.randn(5, 4)
    logits = torch.tensor([[[0.0, -1e4, -1e4, -1e4, -1e4]]], requires_grad=True)
    loss = emo_loss(logits, torch.tensor([[0]]), emb, top_k=3)
    assert loss.item() == 1.0
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def emo_reference(logits, labels, emb, top_k):
    """Direct transcription of SPEC §5 (full softmax, explicit q), for comparison only."""
    mask = labels != -100
    rows, gold = logits[mask].float(), labels[mask]
    p = torch.softmax(rows, -1)
    top = rows.topk(min(top_k, rows.shape[-1]), -1).indices
    w = p.gather(1, top) * (top != gold[:, None])
    q = F.normalize((w[..., None] * F.normalize(emb[top], dim=-1)).sum(1), dim=-1)
    return (1 - (F.normalize(emb[gold], dim=-1) * q).sum(-1)).mean()


@pytest.mark.parametrize("top_k", [1, 3, 64])
def test_emo_matches_direct_formula(top_k):
    for seed in range(3):
        logits, labels, _, emb = random_setup(seed)
        got = emo_loss(logits, labels, emb, top_k=top_k)
        want = emo_reference(logits, labels, emb, top_k)
        assert got.item() == pytest.approx(want.item(), abs=1e-5)
        g1, = torch.autograd.grad(got, logits)
        g2, = torch.autograd.grad(want, logits)
        torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- ntloss agreement

def test_agrees_with_ntloss_package():
    """ntloss (reweigh=False) vs ours on a digit vocabulary.

    Conventions checked in ntloss 0.3.2's source: labels == -100 and non-digit labels are both
    excluded, and "mean" divides by the number of digit-label positions, as SPEC §5 says.
    NTLossDotProduct with F.mse_loss is (y_hat - y)^2 with the softmax over the digit tokens;
    NTLoss computes sum_i p_i |v_i - y|, which equals our CDF form of W1 for a one-hot target.
    One difference: with no digit label ntloss returns a detached tensor(0); SPEC wants a zero
    that keeps the graph (tested below), so that case is not compared on the graph, only on value.
    """
    from ntloss import NTLoss, NTLossDotProduct

    words = ["[UNK]", "the", "3", "score", "is", "0", "1", ".", "2", "essay", "4", "5", "6",
             "good", "7", "8", "9", "Ġ", "12", "x"]  # "12": ntloss digit_level ignores it, so we
    tok = word_tokenizer(words)                      # compare without labels/mass on it (see below)
    n_before = len(tok)
    mse_ref, was_ref = NTLossDotProduct(tok, reweigh=False), NTLoss(tok, reweigh=False)
    assert len(tok) == n_before  # digits were present: ntloss added nothing
    values = number_token_values(tok)
    assert values[tok.convert_tokens_to_ids("12")].item() == 12.0
    values[tok.convert_tokens_to_ids("12")] = NAN  # digit-only vocabulary for the comparison
    assert torch.equal(~torch.isnan(values), mse_ref.is_number_token)
    for seed in range(5):
        logits, labels, _, _ = random_setup(seed, B=4, T=16, V=len(tok), scale=2.0 + seed)
        for ours, ref in ((ntl_mse, mse_ref), (ntl_was, was_ref)):
            got, want = ours(logits, labels, values), ref(logits, labels)
            assert got.item() == pytest.approx(want.item(), abs=1e-5, rel=1e-5)
            g1, = torch.autograd.grad(got, logits)
            g2, = torch.autograd.grad(want, logits)
            torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-4)
    no_number = torch.full((2, 5), tok.convert_tokens_to_ids("the"))
    logits = torch.randn(2, 5, len(tok))
    assert ntl_was(logits, no_number, values).item() == was_ref(logits, no_number).item() == 0.0


# ----------------------------------------------------------------------------- graph / gradients

@pytest.mark.parametrize("name", LOSSES)
def test_gradients_flow_only_at_used_positions(name):
    logits, labels, values, emb = random_setup(1)
    loss = call(name, logits, labels, values, emb, top_k=5)
    loss.backward()
    grad_norm = logits.grad.abs().sum(-1)
    used = labels != -100
    if name != "emo":
        used &= ~torch.isnan(values[labels.clamp_min(0)])
    assert used.any() and (grad_norm[used] > 0).all()
    assert (grad_norm[~used] == 0).all()


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("case", ["all_ignored", "no_number_label"])
def test_empty_returns_attached_zero(name, case):
    logits, labels, values, emb = random_setup(2)
    labels = torch.full_like(labels, -100) if case == "all_ignored" else torch.full_like(labels, 1)
    loss = call(name, logits, labels, values, emb)
    if case == "no_number_label" and name == "emo":  # EMO uses every labeled position: the SPEC §5 value
        assert loss.item() == pytest.approx(emo_reference(logits, labels, emb, 64).item(), abs=1e-6)
        assert loss.item() > 0.01  # not the empty case's zero
        return
    assert loss.item() == 0.0 and loss.requires_grad and loss.dim() == 0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finite_on_extreme_logits(name, dtype):
    for seed, scale in ((3, 1e4), (4, 1e30)):
        logits, labels, values, emb = random_setup(seed, scale=scale, dtype=dtype)
        with torch.no_grad():
            logits[0, 0] = -1e4
            logits[0, 0, 4] = 1e4  # huge spread, all mass on one token
        loss = call(name, logits, labels, values, emb, top_k=4)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        loss.backward()
        assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("name", LOSSES)
def test_masked_minus_inf_logits(name):
    logits, labels, values, emb = random_setup(5)
    with torch.no_grad():
        logits[:, :, 4:14] = -math.inf if name != "emo" else logits[:, :, 4:14]  # NTL: all numbers masked
        logits[:, :, 15:] = -math.inf
    loss = call(name, logits, labels, values, emb, top_k=64)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("name", LOSSES)
def test_bf16_computed_in_float32(name):
    logits, labels, values, emb = random_setup(6, dtype=torch.bfloat16)
    got = call(name, logits, labels, values, emb, top_k=5)
    want = call(name, logits.detach().float(), labels, values, emb, top_k=5)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want.item(), abs=1e-6)


def test_padded_vocab_and_short_values():
    # logits wider than the tokenizer (padded embedding): the extra columns are not numbers
    logits, labels, values, _ = random_setup(7, V=20)
    short = values[:16]
    assert ntl_mse(logits, labels, short).item() == pytest.approx(ntl_mse(logits, labels, values).item())
    with pytest.raises(ValueError):
        ntl_was(logits, labels, torch.cat([values, values]))


# ----------------------------------------------------------------------------- memory / structure

@pytest.mark.parametrize("name", LOSSES)
def test_no_full_size_intermediate(name):
    from torch.utils._python_dispatch import TorchDispatchMode

    B, T, V = 2, 64, 50000
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, T, V, generator=g).requires_grad_()
    labels = torch.full((B, T), -100)
    labels[0, 5:8] = torch.tensor([10, 11, 500])
    labels[1, 40:42] = torch.tensor([12, 7000])
    values = torch.full((V,), NAN)
    values[10:20] = torch.arange(10.0)
    emb = torch.randn(V, 16, generator=g)
    full = B * T * V

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel())
            return out

    saved = []
    with Record() as rec, torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss = call(name, logits, labels, values, emb, top_k=64)
    assert rec.largest < full, "a [B,T,V]-sized tensor was created in forward"
    assert max(saved, default=0) < full, "a [B,T,V]-sized tensor was saved for backward"
    loss.backward()
    assert torch.isfinite(logits.grad).all()


# ----------------------------------------------------------------------------- composite

def scalars(*xs):
    return [torch.tensor(x, requires_grad=True) for x in xs]


def test_composite_static():
    ce, ntl, emo = scalars(2.0, 0.5, 0.25)
    total, logs = composite_loss(ce, ntl, emo, 1.0, 2.0)  # 2 + 1*0.5 + 2*0.25 = 3
    assert total.item() == pytest.approx(3.0)
    assert logs == {"loss_ce": 2.0, "loss_ntl": 0.5, "loss_emo": 0.25, "loss_total": 3.0}
    total.backward()
    assert (ce.grad.item(), ntl.grad.item(), emo.grad.item()) == (1.0, 1.0, 2.0)
    # disabled terms (weight 0 / None; term may be None) are not added
    total, logs = composite_loss(ce, None, emo, None, 0.0)
    assert total.item() == 2.0 and logs["loss_total"] == 2.0 and logs["loss_ntl"] == 0.0
    assert "dynamic_lambda" not in logs
    with pytest.raises(ValueError):
        composite_loss(ce, None, emo, 0.3, 0.0)


def test_composite_dynamic():
    ce, ntl, emo = scalars(2.0, 0.5, 0.25)
    # aux = 0.75, lambda = 2/0.75 = 8/3, total = 0.5 * (2 + 8/3 * 0.75) = 2
    total, logs = composite_loss(ce, ntl, emo, -1.0, -1.0)
    assert total.item() == pytest.approx(2.0)
    assert logs["dynamic_lambda"] == pytest.approx(8 / 3) and logs["loss_total"] == pytest.approx(2.0)
    total.backward()  # lambda detached: dtotal/dce = 0.5, dtotal/daux = 0.5 * lambda = 4/3
    assert ce.grad.item() == pytest.approx(0.5)
    assert ntl.grad.item() == pytest.approx(4 / 3) and emo.grad.item() == pytest.approx(4 / 3)
    # one negative weight selects dynamic mode; a disabled term stays out of aux: aux=0.5, lambda=4
    total, logs = composite_loss(ce, ntl, emo, -0.5, None)
    assert logs["dynamic_lambda"] == pytest.approx(4.0) and total.item() == pytest.approx(2.0)
    # aux == 0 -> lambda = 0 -> total = CE / 2
    zero_ntl, = scalars(0.0)
    total, logs = composite_loss(ce, zero_ntl, None, -1.0, None)
    assert logs["dynamic_lambda"] == 0.0 and total.item() == pytest.approx(1.0)
    assert math.isfinite(total.item())
