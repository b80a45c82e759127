"""Constrained decoding: allowed-token sets against a brute force over the whole vocabulary, for the
supported tokenizers and hand-made vocabularies with multi-digit and space-carrying number tokens."""
from __future__ import annotations

import itertools

import pytest
import torch

from modules.constrained import (ACCEPT, DEAD, START, ScoreLineConstraint, ScoreLineLogitsProcessor,
                                 max_line_tokens, score_line_constraint, token_texts)


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- the brute force

def valid_lines(ranges) -> set[str]:
    """Every canonical score line (no line end), with and without the one allowed leading space."""
    bodies = {" ".join(map(str, combo)) for combo in itertools.product(*(range(lo, hi + 1) for lo, hi in ranges))}
    return bodies | {" " + body for body in bodies}


def brute_force_allowed(tokenizer, context: list[int], prefix: list[int], ranges, eos_ids) -> set[int]:
    """Token ids allowed after ``context + prefix`` by the definition, without the automaton: decode
    the whole sequence with each token of the vocabulary appended, and keep the token when the text
    after the context is a (longer) prefix of a valid line, or a whole valid line followed by a
    newline (anything after it is not the score line); EOS only once the line is whole."""
    lines = valid_lines(ranges)
    prefixes = {line[:i] for line in lines for i in range(1, len(line) + 1)}
    decode = lambda rows: tokenizer.batch_decode(rows, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    [head, written] = decode([context, context + prefix])
    assert written.startswith(head)
    written = written[len(head):]
    allowed = set()
    for token, text in enumerate(decode([context + prefix + [t] for t in range(len(tokenizer))])):
        assert text.startswith(head)
        text = text[len(head):]
        if token in eos_ids:
            ok = written in lines
        else:
            ok = len(text) > len(written) and (
                text in prefixes or ("\n" in text and text.split("\n", 1)[0] in lines))
        if ok:
            allowed.add(token)
    return allowed


def allowed_ids(constraint: ScoreLineConstraint, state: int) -> set[int]:
    mask = constraint.allowed(state)
    return set(torch.nonzero(mask).flatten().tolist())


def check_against_brute_force(tokenizer, ranges, context: list[int], prefixes: list[list[int]]) -> None:
    eos = [tokenizer.eos_token_id]
    constraint = score_line_constraint(tokenizer, ranges, eos)
    for prefix in prefixes:
        state = constraint.walk(prefix)
        assert state not in (DEAD, ACCEPT), tokenizer.convert_ids_to_tokens(prefix)
        expected = brute_force_allowed(tokenizer, context, prefix, ranges, eos)
        got = allowed_ids(constraint, state)
        assert got == expected, (tokenizer.convert_ids_to_tokens(prefix),
                                 tokenizer.convert_ids_to_tokens(sorted(got - expected)),
                                 tokenizer.convert_ids_to_tokens(sorted(expected - got)))
        assert got, "every reachable state allows something"


PREFIX_TEXTS = ["", " ", "1", "1 ", "12", "12 ", "0", "0 ", " 7", "12 3", "7 9"]


def encoded_prefixes(tokenizer, texts=PREFIX_TEXTS) -> list[list[int]]:
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


@pytest.mark.parametrize("ranges", [[(0, 12), (3, 9)], [(1, 9)] * 3])
def test_allowed_sets_match_brute_force_tiny(tiny_tokenizer, ranges):
    tok = tiny_tokenizer
    texts = [t for t in PREFIX_TEXTS if t.strip() == "" or all(
        lo <= int(v) <= hi for v, (lo, hi) in zip(t.split(), ranges))]
    check_against_brute_force(tok, ranges, tok("Scores:", add_special_tokens=False)["input_ids"],
                              encoded_prefixes(tok, texts))


def test_allowed_sets_match_brute_force_smollm2(smollm2_tokenizer):
    tok = smollm2_tokenizer
    # Fewer prefixes than for the small vocabularies: each one decodes all 49152 tokens.
    context = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    check_against_brute_force(tok, [(0, 12), (3, 9)], context, encoded_prefixes(tok, ["", " ", "1", "12 ", "12 3"]))


def test_allowed_sets_match_brute_force_llama3_style(llama3_style_tokenizer):
    # Multi-digit tokens ("12", "100"): "1" may be followed by "00" but not by "000" or "01".
    tok = llama3_style_tokenizer
    assert len(tok("100", add_special_tokens=False)["input_ids"]) == 1
    check_against_brute_force(tok, [(0, 100), (3, 9)], tok("Scores:", add_special_tokens=False)["input_ids"],
                              encoded_prefixes(tok, PREFIX_TEXTS + ["10", "100", "100 "]))


# --------------------------------------------------------------------------- hand-made vocabularies

MARKERS = {"bytes": ("Ġ", "Ċ"), "sentencepiece": ("▁", "<0x0A>"), "literal": (" ", "\n")}  # space, newline
SYNTHETIC_NUMBERS = ["0", "1", "2", "3", "7", "9", "12", "10", "00", "01", "123", "7 8", "1 "]


def synthetic_tokenizer(kind: str):
    """A word-level vocabulary whose tokens are written in one convention: byte-level ("Ġ7" = " 7",
    "Ċ" = newline), SentencePiece ("▁7" = " 7", byte fallback "<0x0A>", first space stripped on
    decoding) or literal text (" 7"). Each has multi-digit and space-carrying number tokens."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    space, newline = MARKERS[kind]
    numbers = [n.replace(" ", space) for n in SYNTHETIC_NUMBERS]
    words = (numbers + [space + n for n in ("7", "12", "0", "01")] + [space, space * 2, newline, newline * 2,
             "7" + newline, space + newline, newline + "a", "a", "x", "1x", "-1", "<unk>", "<eos>"])
    if kind == "sentencepiece":
        words += ["<0x20>", "<0x37>", "<0xE2>", space + "a"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(dict.fromkeys(words))}, unk_token="<unk>"))
    tok.decoder = {"bytes": decoders.ByteLevel(),
                   "sentencepiece": decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                                       decoders.Fuse(), decoders.Strip(" ", 1, 0)]),
                   "literal": decoders.Fuse()}[kind]
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


@pytest.mark.parametrize("kind", ["bytes", "sentencepiece", "literal"])
def test_allowed_sets_match_brute_force_synthetic(kind):
    tok = synthetic_tokenizer(kind)
    space, newline = MARKERS[kind]
    ids = lambda *tokens: tok.convert_tokens_to_ids([t.replace(" ", space).replace("\n", newline) for t in tokens])
    prefixes = [ids(), ids(" "), ids("1"), ids(" 12"), ids("12", " "), ids("1 "), ids("7 8"), ids(" 0"), ids("12", " 7"),
                ids("1", "0")]
    check_against_brute_force(tok, [(0, 12), (3, 9)], ids("a", "x"), prefixes)
    constraint = score_line_constraint(tok, [(0, 12), (3, 9)], [tok.eos_token_id])
    texts = token_texts(tok)
    assert texts[ids(" 7")[0]] == " 7"  # the marker is a space in context, whatever the convention
    if kind == "sentencepiece":
        assert texts[tok.convert_tokens_to_ids("<0x0A>")] == "\n" and texts[tok.convert_tokens_to_ids("<0x37>")] == "7"
    # "12" then " 7" then the line end: both end tokens reach ACCEPT
    whole = constraint.walk(ids("12", " 7"))
    assert constraint.advance(whole, tok.eos_token_id) == ACCEPT
    assert constraint.advance(whole, ids("\n")[0]) == ACCEPT
    assert constraint.advance(whole, ids("7\n")[0]) == DEAD  # "12 77" is out of range


# --------------------------------------------------------------------------- automaton properties

@pytest.mark.parametrize("tokenizer_name", ["llama3_style_tokenizer", "smollm2_tokenizer"])
def test_canonical_tokenisations_of_valid_lines_reach_the_end(request, tokenizer_name):
    # What the model is trained to write must be allowed, token by token, for the real tokenizers
    # (the Llama-3-style one needs no download: it runs wherever SmolLM2 cannot be had).
    tok = request.getfixturevalue(tokenizer_name)
    ranges = [(0, 100), (1, 9), (0, 30)]
    constraint = score_line_constraint(tok, ranges, [tok.eos_token_id])
    for scores in [(0, 1, 0), (100, 9, 30), (12, 7, 25), (9, 3, 10)]:
        line = " ".join(map(str, scores))
        ids = tok(line, add_special_tokens=False)["input_ids"]
        state = constraint.walk(ids)
        assert state not in (DEAD, ACCEPT), line
        assert constraint.advance(state, tok.eos_token_id) == ACCEPT
        assert constraint.walk(tok(line + "\n", add_special_tokens=False)["input_ids"]) == ACCEPT
        assert len(ids) + 1 <= max_line_tokens(constraint.ranges)
    for bad in ["01 1 0", "1 1", "1 10 0", "101 1 0", "1  1 0", "1 1 0 "]:
        assert constraint.walk(tok(bad + "\n", add_special_tokens=False)["input_ids"]) == DEAD, bad


def test_dead_ends_are_pruned_and_impossible_grammars_refused():
    texts = ["a", "1", "2", " ", "\n", "<eos>"]  # no "0": 10 cannot be written
    constraint = ScoreLineConstraint(texts, [(1, 10)], [5])
    assert constraint.allowed(START).nonzero().flatten().tolist() == [1, 2, 3]  # "1", "2", leading " "
    one = constraint.advance(START, 1)
    assert constraint.allowed(one).nonzero().flatten().tolist() == [4, 5]  # "1" is whole: end it
    with pytest.raises(ValueError, match="no token sequence"):
        ScoreLineConstraint(texts, [(10, 10)], [5])  # "1" would lead nowhere, so nothing is allowed
    with pytest.raises(ValueError, match="min <= max"):
        ScoreLineConstraint(texts, [(3, 1)], [5])


def test_mask_logits_restricts_rows_by_state_and_leaves_ended_rows_alone():
    texts = ["a", "1", "2", " ", "\n", "<eos>", "12"]
    constraint = ScoreLineConstraint(texts, [(1, 12)], [5])
    logits = torch.zeros(3, 9)  # two columns beyond the vocabulary (a padded embedding matrix)
    one = constraint.advance(START, 1)
    out = constraint.mask_logits(logits, [START, one, ACCEPT])
    finite = [torch.isfinite(row).nonzero().flatten().tolist() for row in out]
    assert finite == [[1, 2, 3, 6], [1, 2, 4, 5], list(range(9))]  # after "1": "11", "12", or end it
    assert torch.equal(logits, torch.zeros(3, 9))  # the input is not modified


# --------------------------------------------------------------------------- generate()

def constrained_generate(model, tokenizer, prompt: str, ranges, **kwargs) -> list[str]:
    from modules.scoring import line_constraint, stop_token_ids

    constraint = line_constraint(tokenizer, ranges, model)
    enc = tokenizer([prompt], add_special_tokens=False, return_tensors="pt")
    processor = ScoreLineLogitsProcessor(constraint, enc["input_ids"].shape[1])
    out = model.generate(**enc, logits_processor=[processor], eos_token_id=stop_token_ids(tokenizer, model),
                         pad_token_id=tokenizer.pad_token_id, max_new_tokens=max_line_tokens(constraint.ranges), **kwargs)
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True,
                                  clean_up_tokenization_spaces=False)


def test_generate_with_the_processor_writes_only_valid_lines(tiny):
    from modules.score_lines import parse_score_line

    model, tokenizer = tiny
    ranges = [(0, 12), (1, 9), (0, 3)]
    torch.manual_seed(0)
    texts = constrained_generate(model, tokenizer, "Score: ", ranges, do_sample=True, temperature=1.5, top_k=0,
                                 num_return_sequences=40)
    assert len(set(texts)) > 10  # a real spread of answers, not one
    for text in texts:
        assert parse_score_line(text, ranges) is not None, text


def test_the_mask_comes_before_the_warpers_in_generate(tiny):
    # With top_k=1 sampling is the argmax of the masked logits only if the mask ran first;
    # the other way round the one kept token is usually masked and nothing is left to draw.
    model, tokenizer = tiny
    ranges = [(0, 12), (1, 9)]
    greedy = constrained_generate(model, tokenizer, "Score: ", ranges, do_sample=False)
    torch.manual_seed(1)
    sampled = constrained_generate(model, tokenizer, "Score: ", ranges, do_sample=True, top_k=1, num_return_sequences=3)
    assert sampled == greedy * 3
