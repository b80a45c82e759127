"""Scoring: score-line parsing, greedy generation, exact weighted prediction, QWK evaluation."""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import cohen_kappa_score

import modules.predict as predict
import modules.scoring as scoring
import modules.weighted as weighted
from reference_scoring import two_pass_scoring
from reference_weighted import reference_candidate_log_scores, reference_scorer
from modules.data import DatasetInfo, EssayRecord, Rubric, build_prompt, load_splits
from modules.evaluation import evaluate_predictions, format_results_table
from modules.predict import decode_batch, predict_split
from modules.runs import PromptSettings
from modules.scoring import greedy_predict, stop_token_ids
from modules.weighted import WeightedPrediction, weighted_predict

SHIPPED = Path(__file__).resolve().parents[1] / "aes_dataset_mtl"

RANGES = [(0, 30), (1, 9), (0, 30)]  # "1" is a prefix of "12"; the third rubric follows a "12 7 " line
INFO = DatasetInfo((Rubric("content", 0, 30), Rubric("style", 1, 9), Rubric("mechanics", 0, 30)))


def peaky(model: torch.nn.Module, scale: float = 30.0) -> torch.nn.Module:
    """A copy with a scaled output layer: a freshly initialised model is almost uniform over the
    vocabulary, which would hide a wrong token index in the probability comparisons."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(scale)
    return model.eval()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tiny):
    """conftest's tiny model, made peaky."""
    model, tokenizer = tiny
    return peaky(model), tokenizer


@pytest.fixture(scope="module")
def llama3_tiny(llama3_style_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = llama3_style_tokenizer
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    return peaky(LlamaForCausalLM(config), scale=60.0), tok


def essay(i: int, scores=(12, 7, 3)) -> EssayRecord:
    return EssayRecord(f"e{i}", "p1", f"I waited for bus {i} and read a book about patience.", tuple(scores))


# --------------------------------------------------------------------------- greedy

def test_stop_token_ids(tiny, llama3_style_tokenizer):
    for tok in (tiny[1], llama3_style_tokenizer):
        stops = stop_token_ids(tok)
        assert tok.eos_token_id in stops
        assert any(tok.decode([i]) == "\n" for i in stops)
        assert all("\n" in tok.decode([i]) for i in stops if i != tok.eos_token_id)
        assert stop_token_ids(tok) == stops


def manual_greedy(model, tokenizer, prompt: str, steps: int, stops: list[int]) -> str:
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    new = []
    with torch.inference_mode():
        for _ in range(steps):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            new.append(nxt)
            if nxt in stops:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return tokenizer.decode(new, skip_special_tokens=True).split("\n", 1)[0]


def test_greedy_matches_manual_loop_and_unbatched(tiny):
    model, tok = tiny
    prompts = [build_prompt(essay(i), INFO, tok) for i in range(3)]
    prompts[1] = prompts[1].replace("a book about patience", "")  # different lengths: real left padding
    side = tok.padding_side
    batched = greedy_predict(model, tok, prompts, RANGES, batch_size=3, max_new_tokens=10)
    assert tok.padding_side == side
    single = [greedy_predict(model, tok, [p], RANGES, batch_size=1, max_new_tokens=10)[0] for p in prompts]
    assert batched == single
    assert batched[0]["text"] == manual_greedy(model, tok, prompts[0], 10, stop_token_ids(tok))
    assert all(isinstance(a["text"], str) and "\n" not in a["text"] for a in batched)


def test_greedy_stops_at_newline_unless_feedback(tiny):
    """A hook makes the newline token win at the 4th generated step."""
    model, tok = tiny
    newline = next(i for i in stop_token_ids(tok) if tok.decode([i]) == "\n")
    calls = []

    def force_newline(module, args, output):
        calls.append(output.shape[1])
        if len(calls) == 4:
            output = output.clone()
            output[..., newline] += 1e4
        return output

    prompt = build_prompt(essay(1), INFO, tok)
    handle = model.get_output_embeddings().register_forward_hook(force_newline)
    try:
        short = greedy_predict(model, tok, [prompt], RANGES, max_new_tokens=20)[0]["text"]
        steps_short = len(calls)
        calls.clear()
        long = greedy_predict(model, tok, [prompt], RANGES, max_new_tokens=20, generate_feedback=True)[0]["text"]
    finally:
        handle.remove()
    assert steps_short == 4  # prefill + 3 tokens + the newline step, then stop
    assert "\n" not in short and short
    assert long.startswith(short + "\n") and len(long) > len(short) + 1


def test_constrained_greedy_writes_valid_lines_with_multi_digit_tokens(llama3_tiny):
    from modules.score_lines import parse_score_line

    # A random model with Llama-3 number tokens ("12", "25"): unconstrained, its greedy answers are
    # not score lines; constrained, every one is, and with feedback the text after it is free.
    model, tok = llama3_tiny
    prompts = [build_prompt(essay(i), INFO, tok) for i in range(4)]
    free = greedy_predict(model, tok, prompts, RANGES, batch_size=2)
    assert not any(a["scores"] for a in free)
    answers = greedy_predict(model, tok, prompts, RANGES, batch_size=2, constrained=True)
    assert all(a["scores"] == parse_score_line(a["text"], RANGES) is not None for a in answers), answers
    assert all(a["scores"] is not None and "truncated" not in a for a in answers), answers
    with_feedback = greedy_predict(model, tok, prompts, RANGES, batch_size=2, constrained=True, generate_feedback=True)
    assert [a["scores"] for a in with_feedback] == [a["scores"] for a in answers]
    assert any("\n" in a["text"] and a["text"].split("\n", 1)[1] for a in with_feedback)


# --------------------------------------------------------------------------- weighted

def test_number_continuation_rule():
    """Only a token whose own text starts with an ASCII digit extends the number before it; a
    space-led digit token ("Ġ4" in GPT-2-style vocabularies) starts the next score."""
    assert [scoring._continues_number(t) for t in ("5", "12", "<0x35>", "0x", "Ġ5", "▁5", " 5", "²", "\n", "", None)] \
        == [True, True, True, True, False, False, False, False, False, False, False]


def reference_weighted(model, tokenizer, prompt: str, ranges, prefix_scores=None):
    """Brute force: every candidate's full sequence through the model without any cache."""
    digit = torch.tensor([bool(t) and "0" <= t[0] <= "9" for t in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))])
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    chosen, expected, probs, raw = [], [], [], []
    for k, (lo, hi) in enumerate(ranges):
        line = " ".join(map(str, chosen)) + " " if chosen else ""
        scores = []
        for v in range(lo, hi + 1):
            cand = tokenizer(line + str(v), add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt_ids + cand])
            with torch.inference_mode():
                logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0].double(), dim=-1)
            start = len(prompt_ids)
            token_lp = sum(logp[start + j - 1, t] for j, t in enumerate(cand))
            end_p = 1 - logp[-1].exp()[: len(digit)][digit].sum()
            scores.append(float(token_lp + torch.log(end_p)))
        scores = np.array(scores)
        p = np.exp(scores - scores.max())
        p /= p.sum()
        values = np.arange(lo, hi + 1)
        expected.append(float((p * values).sum()))
        probs.append(p)
        raw.append(scores)
        chosen.append(prefix_scores[k] if prefix_scores is not None and k < len(prefix_scores) else lo + int(p.argmax()))
    return expected, probs, raw


@pytest.mark.parametrize("family", ["digit_per_token", "multi_digit_tokens"])
@pytest.mark.parametrize("prefix", [None, [12, 7]])
def test_weighted_predict_is_exact(family, prefix, tiny, llama3_tiny):
    model, tok = tiny if family == "digit_per_token" else llama3_tiny
    twelve = tok("12", add_special_tokens=False)["input_ids"]
    assert len(twelve) == (2 if family == "digit_per_token" else 1)  # the family really is what it claims
    prompt = f"{tok.bos_token}Essay: I waited for the bus.\nScores: "  # short: the reference is brute force
    expected, probs, underflow = weighted_predict(model, tok, prompt, RANGES, prefix_scores=prefix)
    assert underflow == []
    ref_expected, ref_probs, ref_raw = reference_weighted(model, tok, prompt, RANGES, prefix)
    for (lo, hi), p, rp in zip(RANGES, probs, ref_probs):
        assert len(p) == hi - lo + 1
        assert abs(sum(p) - 1) < 1e-5
        np.testing.assert_allclose(p, rp, atol=1e-4)
        assert np.ptp(rp) > 0.01  # not uniform: the comparison can tell candidates apart
    np.testing.assert_allclose(expected, ref_expected, atol=1e-3)
    if prefix is not None:
        # Log scores too (tiny probabilities included). The shared "12 7 " tokens add a constant
        # log-probability to the reference only, so differences are compared.
        ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
        with torch.inference_mode():
            out = model(input_ids=ids, use_cache=True)
            scores, = weighted._candidate_log_scores(model, tok, out.cache, out.logits[0, -1].float(), [("12 7 ", 0, 30)])
        np.testing.assert_allclose(scores.numpy() - scores[0].item(), ref_raw[2] - ref_raw[2][0], atol=1e-4)




# The tree-attention scorer against the scorer it replaced (tests/reference_weighted.py: a
# padded batch row per candidate over a repeated copy of the prompt cache), on every model family.

@pytest.fixture(scope="module")
def tiny_lora(tiny):
    """The tiny model under a LoRA adapter whose B matrices are not zero, so it changes the logits."""
    from modules.models import add_lora
    model, tok = tiny
    lora = add_lora(copy.deepcopy(model))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    return lora.eval(), tok


MODELS = ["tiny", "tiny_lora", "llama3_tiny", "smollm2"]


def cache_snapshot(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]


def assert_cache_is(cache, snapshot) -> None:
    assert len(cache.layers) == len(snapshot)
    for layer, (keys, values) in zip(cache.layers, snapshot):
        assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)


def prompt_state(model, tok, prompt: str):
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    return out.cache, out.logits[0, -1].float()


@pytest.mark.parametrize("name", MODELS)
def test_candidate_scores_match_the_reference_and_keep_the_prompt_cache(name, request):
    model, tok = request.getfixturevalue(name)
    cache, logits = prompt_state(model, tok, build_prompt(essay(1), INFO, tok))
    snapshot = cache_snapshot(cache)
    # 0-30 with nothing before it, after a line (a shared prefix that the trie runs once), and 1-9;
    # one rubric per call, then all three in one trie.
    rubrics = [("", 0, 30), ("12 7 ", 0, 30), ("12 ", 1, 9)]
    with torch.inference_mode():
        one_by_one = [weighted._candidate_log_scores(model, tok, cache, logits, [r])[0] for r in rubrics]
        together = weighted._candidate_log_scores(model, tok, cache, logits, rubrics)
        assert_cache_is(cache, snapshot)  # the prompt cache serves every rubric: it must come back as it was
        reference = [reference_candidate_log_scores(model, tok, cache, logits, *r) for r in rubrics]
    for (_, lo, hi), want, alone, joint in zip(rubrics, reference, one_by_one, together):
        assert np.ptp(torch.softmax(want, 0).numpy()) > 1e-3  # not uniform: the comparison can tell candidates apart
        for got in (alone, joint):
            assert got.shape == (hi - lo + 1,) and got.dtype == torch.float32
            np.testing.assert_allclose(torch.softmax(got, 0).numpy(), torch.softmax(want, 0).numpy(), atol=1e-5)
            # Both leave out the tokens every candidate shares, so even the raw scores agree.
            np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("dataset", ["shipped_8x1-9", "0-30_1-9_0-30"])
def test_weighted_predict_matches_the_reference_on_multi_rubric_data(name, dataset, request):
    model, tok = request.getfixturevalue(name)
    if dataset == "shipped_8x1-9":
        info, splits = load_splits(SHIPPED)
        record = splits["test"][0]
    else:
        info, record = INFO, essay(2)
    prompt = build_prompt(record, info, tok, mtl=True)
    for prefix in (None, list(record.scores)):
        got = weighted_predict(model, tok, prompt, info.ranges, prefix_scores=prefix)
        with reference_scorer():
            want = weighted_predict(model, tok, prompt, info.ranges, prefix_scores=prefix)
        assert got.underflow == want.underflow == []
        np.testing.assert_allclose(got.expected, want.expected, atol=1e-5 * max(hi for _, hi in info.ranges))
        for p, q in zip(got.probabilities, want.probabilities):
            np.testing.assert_allclose(p, q, atol=1e-5)


def test_a_failed_forward_leaves_the_prompt_cache_as_it_was(tiny):
    """The second decoder layer fails after the first has appended the candidates to the cache."""
    model, tok = tiny
    cache, logits = prompt_state(model, tok, build_prompt(essay(1), INFO, tok))
    snapshot = cache_snapshot(cache)

    def fail(module, args):
        raise RuntimeError("boom")

    handle = model.model.layers[1].register_forward_pre_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="boom"), torch.inference_mode():
            weighted._candidate_log_scores(model, tok, cache, logits, [("", 0, 30)])
    finally:
        handle.remove()
    assert cache.layers[0].get_seq_length() == cache.layers[1].get_seq_length() == snapshot[0][0].shape[-2]
    assert_cache_is(cache, snapshot)


def test_sliding_window_model_is_scored_while_the_window_holds_prompt_and_candidates(tiny_tokenizer):
    from transformers import MistralConfig, MistralForCausalLM
    tok = tiny_tokenizer
    config = MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=64,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = peaky(MistralForCausalLM(config))
    short = f"{tok.bos_token}Scores: "
    got = weighted_predict(model, tok, short, [(0, 30)])
    with reference_scorer():
        want = weighted_predict(model, tok, short, [(0, 30)])
    np.testing.assert_allclose(got.probabilities[0], want.probabilities[0], atol=1e-5)
    # Past the window the layer drops the prompt's first states: refused, not scored wrongly, also
    # where greedy decoding would start from that cache; without the weighted scorer, scored.
    with pytest.raises(ValueError, match="DynamicSlidingWindowLayer.*--no_weighted"):
        weighted_predict(model, tok, short + "word " * 40, [(0, 30)])
    info = DatasetInfo((Rubric("holistic", 0, 30),))
    long_essay = [dataclasses.replace(essay(0, scores=(3,)), essay="word " * 40)]
    with pytest.raises(ValueError, match="DynamicSlidingWindowLayer.*--no_weighted"):
        predict_split(model, tok, long_essay, info, PromptSettings())
    assert predict_split(model, tok, long_essay, info, PromptSettings(), weighted=False)[0]["weighted"] is None


def test_underflow_is_reported_in_the_row_the_results_and_the_table(tiny):
    """The output layer gives the digits 5 and 6 no probability at all, so the second rubric (5-6)
    has no finite candidate score, while the first (1-4) is scored normally."""
    model, tok = tiny
    info = DatasetInfo((Rubric("content", 1, 4), Rubric("style", 5, 6)))
    killed = [i for i in range(len(tok)) if tok.convert_ids_to_tokens(i) in ("5", "6")]
    assert len(killed) == 2

    def no_five_or_six(module, args, output):
        output = output.clone()
        output[..., killed] = float("-inf")
        return output

    records = [essay(i, scores=(3, 5)) for i in range(3)]
    handle = model.get_output_embeddings().register_forward_hook(no_five_or_six)
    try:
        preds = predict_split(model, tok, records, info, PromptSettings(), batch_size=3)
    finally:
        handle.remove()
    for p in preds:
        assert p["weighted_underflow"] == ["style"]
        assert p["probabilities"]["style"] == [0.5, 0.5] and p["weighted_expected"][1] == 5.5
        assert abs(sum(p["probabilities"]["content"]) - 1) < 1e-5 and np.ptp(p["probabilities"]["content"]) > 0.01
    results = evaluate_predictions(preds, info)
    assert results["weighted"]["underflow"] == 3  # essay-rubric pairs
    assert "underflow" not in results["token"]
    rows = {line.split()[0]: line.split()[1:] for line in format_results_table(results, info).splitlines()}
    assert rows["underflow"] == ["-", "3"]
    assert rows["invalid"][1] == "-"


# --------------------------------------------------------------------------- one prompt forward for both

def prompt_runs(model, tok, prompts: list[str], call):
    """``call()``'s result and, per prompt, how many forwards ran it whole: rows of the embedding
    layer's input that end with the prompt's ids (left padding in front of them or not)."""
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    runs = [0] * len(prompts)

    def count(module, args):
        for row in args[0].tolist():
            for i, prompt_ids in enumerate(ids):
                runs[i] += row[-len(prompt_ids):] == prompt_ids

    handle = model.get_input_embeddings().register_forward_pre_hook(count)
    try:
        return call(), runs
    finally:
        handle.remove()


def varied_essays() -> list[EssayRecord]:
    """Four essays of different lengths: batches of 3 are left-padded, and the last one is partial."""
    return [essay(0), dataclasses.replace(essay(1), essay="Short."),
            dataclasses.replace(essay(2, scores=(30, 9, 0)), essay="The bus came late."),
            dataclasses.replace(essay(3), essay="I waited. " * 6)]


@pytest.mark.parametrize("name, constrained, feedback",
                         [(m, c, f) for m in ("tiny", "tiny_lora", "llama3_tiny")
                          for c in (False, True) for f in (False, True)]
                         + [("smollm2", False, False), ("smollm2", True, False)])
def test_predict_split_runs_each_prompt_once_and_matches_the_two_pass_path(name, constrained, feedback, request):
    """The shared path (each prompt prefilled once, greedy and weighted continuing from its cache)
    against the path before it (tests/reference_scoring.py: greedy over padded batches, then
    the weighted scorer running the prompt again): the same greedy answers exactly, the same
    weighted expectations and probabilities to 1e-5. Constrained, the lines are valid and the
    weighted scorer conditions on them; unconstrained, the random models' lines are invalid and
    it conditions on its own argmax."""
    model, tok = request.getfixturevalue(name)
    records = varied_essays()
    prompts = [build_prompt(r, INFO, tok, mtl=feedback) for r in records]

    def score():
        return predict_split(model, tok, records, INFO, PromptSettings(mtl=feedback), batch_size=3,
                             constrained=constrained, generate_feedback=feedback)

    shared, shared_runs = prompt_runs(model, tok, prompts, score)
    with two_pass_scoring():
        two_pass, two_pass_runs = prompt_runs(model, tok, prompts, score)
    assert shared_runs == [1, 1, 1, 1] and two_pass_runs == [2, 2, 2, 2]
    assert len({len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts[:3]}) == 3  # real padding
    if constrained:
        assert all(p["valid"] for p in shared)
    for got, want in zip(shared, two_pass):
        assert {k: got[k] for k in ("id", "text", "greedy", "valid", "truncated", "weighted", "weighted_underflow")} \
            == {k: want[k] for k in ("id", "text", "greedy", "valid", "truncated", "weighted", "weighted_underflow")}
        np.testing.assert_allclose(got["weighted_expected"], want["weighted_expected"], rtol=0, atol=1e-5)
        for rubric in INFO.rubric_names:
            np.testing.assert_allclose(got["probabilities"][rubric], want["probabilities"][rubric], rtol=0, atol=1e-5)
            assert np.ptp(want["probabilities"][rubric]) > 1e-3  # not uniform: candidates are told apart


def test_prompt_states_come_back_unchanged_and_without_weighted_the_prompt_runs_once(tiny):
    model, tok = tiny
    prompts = [build_prompt(r, INFO, tok) for r in varied_essays()]
    states, answers = [], []
    with torch.inference_mode():
        for start in range(0, len(prompts), 3):
            batch_states, batch_answers, _ = decode_batch(model, tok, prompts[start:start + 3], RANGES)
            states += batch_states
            answers += batch_answers
    assert answers == greedy_predict(model, tok, prompts, RANGES, batch_size=3)
    for prompt, state in zip(prompts, states):
        alone = prompt_state(model, tok, prompt)
        assert state.ids == tok(prompt, add_special_tokens=False)["input_ids"]
        assert_cache_is(state.cache, cache_snapshot(alone[0]))  # greedy decoded from a copy
        assert torch.equal(state.logits, alone[1])
    _, runs = prompt_runs(model, tok, prompts, lambda: predict_split(model, tok, varied_essays(), INFO, PromptSettings(),
                                                                    batch_size=3, weighted=False))
    assert runs == [1, 1, 1, 1]


def forced_lines(model, successor: dict[int, int], first: int):
    """Hooks that make ``model`` write a chosen line: after an input ending in token t the next
    token's logit gains 1e4 when t is in ``successor`` (``successor[t]``), else at ``first``.
    Returns the hooks' handles."""
    last = {}

    def take_last(module, args, kwargs):
        last["ids"] = kwargs["input_ids"][:, -1].tolist()

    def push(module, args, logits):
        nudge = torch.zeros_like(logits[:, -1])
        for row, token in enumerate(last["ids"]):
            nudge[row, successor.get(token, first)] = 1e4
        logits[:, -1] += nudge
        return logits

    return [model.register_forward_pre_hook(take_last, with_kwargs=True),
            model.get_output_embeddings().register_forward_hook(push)]


def test_greedy_pair_decodes_the_constrained_batch_only_when_it_can_differ(tiny, monkeypatch):
    model, tok = tiny
    three, space, five, newline, zero, bang = (tok.convert_tokens_to_ids(t) for t in ("3", "Ġ", "5", "Ċ", "0", "!"))
    assert tok.decode([three, space, five, newline]) == "3 5\n" and tok.decode([bang, zero]) == "!0"
    ranges = [(1, 9), (1, 9)]
    calls = []
    real_generate = model.generate

    def spy(**kwargs):
        calls.append(len(kwargs["logits_processor"]))
        return real_generate(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    # Every prompt writes "3 5\n", a valid line, except one ending in "!", which writes "0\n" ("0" is
    # not in 1-9); the untouched model writes no valid line at all.
    hooks = forced_lines(model, {three: space, space: five, five: newline, bang: zero, zero: newline}, three)
    try:
        cases = {"all valid": (["Score:", "The essay is clear. Scores:"], 1, [(3, 5), (3, 5)]),
                 "one invalid": (["Score:", "Scores!"], 2, [(3, 5), None])}
        for prompts, generates, free_scores in cases.values():
            calls.clear()
            with torch.inference_mode():
                states = [scoring.prefill(model, tok, prompt) for prompt in prompts]
                free, bound = scoring.greedy_pair_from_states(model, tok, states, ranges)
                assert calls == [0, 1][:generates]
                assert [a["scores"] and tuple(a["scores"]) for a in free] == free_scores
                assert free == scoring.greedy_from_states(model, tok, states, ranges)
                assert bound == scoring.greedy_from_states(model, tok, states, ranges, constrained=True)
            assert all(a["scores"] is not None for a in bound)
    finally:
        for hook in hooks:
            hook.remove()
    with torch.inference_mode():
        states = [scoring.prefill(model, tok, prompt) for prompt in ("Score:", "Scores!")]
        calls.clear()
        free, bound = scoring.greedy_pair_from_states(model, tok, states, ranges)
    assert calls == [0, 1] and all(a["scores"] is None for a in free)
    assert bound == greedy_predict(model, tok, ["Score:", "Scores!"], ranges, constrained=True)


# --------------------------------------------------------------------------- splits and evaluation

KEYS = {"id", "gold", "greedy", "weighted", "weighted_expected", "probabilities", "weighted_underflow", "text", "valid",
        "truncated"}


def test_predict_split_keys(tiny):
    model, tok = tiny
    info = DatasetInfo((Rubric("content", 1, 6), Rubric("style", 1, 4)))
    records = [essay(i, scores=(3, 2)) for i in range(3)]
    preds = predict_split(model, tok, records, info, PromptSettings(), batch_size=2)
    assert [p["id"] for p in preds] == ["e0", "e1", "e2"]
    for p in preds:
        assert set(p) == KEYS
        assert p["gold"] == [3, 2]
        assert set(p["probabilities"]) == {"content", "style"}
        assert [len(v) for v in p["probabilities"].values()] == [6, 4]
        assert all(lo <= s <= hi for s, (lo, hi) in zip(p["weighted"], info.ranges))
        assert p["weighted_underflow"] == []
        # Both outcomes are checked (a random model may write either): the parsed line, or the
        # rubric midpoints of 1-6 and 1-4.
        assert p["greedy"] == ([int(v) for v in p["text"].split("\n")[0].split()] if p["valid"] else [3, 2])


def test_predict_split_valid_invalid_and_rounding(tiny, monkeypatch):
    model, tok = tiny
    info = DatasetInfo((Rubric("content", 1, 6), Rubric("style", 1, 4)))
    records = [essay(i, scores=(3, 2)) for i in range(3)]
    seen = []
    answers = [{"text": "5 1", "scores": [5, 1]}, {"text": "7 1", "scores": None},
               {"text": "2 4\nNice.", "scores": [2, 4]}]
    states = ["state0", "state1", "state2"]  # stand-ins for the PromptStates the weighted scorer continues from
    monkeypatch.setattr(predict, "decode_batch", lambda *a, **k: (states, answers, None))
    monkeypatch.setattr(predict, "weighted_predict",
                        lambda m, t, state, ranges, prefix_scores=None: (
                            seen.append((state, prefix_scores))
                            or WeightedPrediction([2.5, 3.49], [[1 / 6] * 6, [0.25] * 4], [])))
    preds = predict_split(model, tok, records, info, PromptSettings(mtl=True))
    assert [p["valid"] for p in preds] == [True, False, True]
    assert [p["greedy"] for p in preds] == [[5, 1], [3, 2], [2, 4]]
    assert seen == [("state0", [5, 1]), ("state1", None), ("state2", [2, 4])]
    assert preds[0]["weighted"] == [3, 3] and preds[0]["weighted_expected"] == [2.5, 3.49]
    assert preds[2]["text"] == "2 4\nNice."


def test_evaluate_predictions_matches_sklearn():
    rng = np.random.default_rng(0)
    n = 40
    gold = np.stack([rng.integers(0, 31, n), rng.integers(1, 10, n), rng.integers(0, 31, n)], axis=1)
    greedy = np.clip(gold + rng.integers(-3, 4, gold.shape), [0, 1, 0], [30, 9, 30])
    weighted = np.clip(gold + rng.integers(-1, 2, gold.shape), [0, 1, 0], [30, 9, 30])
    preds = [{"id": str(i), "gold": gold[i].tolist(), "greedy": greedy[i].tolist(), "weighted": weighted[i].tolist(),
              "valid": i % 7 != 0, "truncated": i % 14 == 0} for i in range(n)]
    results = evaluate_predictions(preds, INFO)
    for block, pred in (("token", greedy), ("weighted", weighted)):
        rubric_qwks = []
        for k, r in enumerate(INFO.rubrics):
            expected = cohen_kappa_score(gold[:, k], pred[:, k], weights="quadratic", labels=list(range(r.min, r.max + 1)))
            assert results[block][r.name] == pytest.approx(expected, abs=1e-9)
            rubric_qwks.append(expected)
        pooled = cohen_kappa_score(gold.ravel(), pred.ravel(), weights="quadratic", labels=list(range(0, 31)))
        assert results[block]["overall"] == pytest.approx(pooled, abs=1e-9)
        assert results[block]["average"] == pytest.approx(np.mean(rubric_qwks), abs=1e-9)
    assert results["token"]["invalid"] == sum(i % 7 == 0 for i in range(n))
    assert results["token"]["truncated"] == sum(i % 14 == 0 for i in range(n)) == 3
    assert "invalid" not in results["weighted"]
    assert results["weighted"]["underflow"] == 0  # rows without "weighted_underflow" (older runs) count as none
    table = format_results_table(results, INFO)
    lines = table.splitlines()
    assert [line.split() for line in lines[-4:-1]] == [["invalid", "6", "-"], ["truncated", "3", "-"],
                                                      ["underflow", "-", "0"]]
    assert lines[-1] == "decoding: unconstrained"
    assert format_results_table(results, INFO, constrained=True).splitlines()[-1] == "decoding: constrained"
    assert [line.split()[0] for line in lines[1:6]] == ["content", "style", "mechanics", "overall", "average"]
    assert f"{results['weighted']['overall']:.4f}" in lines[4]
