"""Constrained decoding: every answer is a valid score line (SPEC §6, ``--constrained``).

At each step only the tokens that keep the generated text a prefix of a valid score line are
allowed; once the K numbers are written, only the line end is. Sampling draws from the model's
distribution restricted to the allowed tokens and renormalised; the warpers (temperature,
top-k, top-p) act on the restricted logits.

The grammar is the canonical form the model is trained on (``data.score_line``)::

    line := [" "] n_1 " " n_2 ... " " n_K  END
    n_k  := a number in rubric k's range, ASCII digits, no leading zero ("0" itself is fine)
    END  := "\\n" (whatever follows it is no longer the score line) | an EOS token

One leading space is allowed because a tokenizer whose numbers carry their space ("Ġ7", "▁7")
may write the line's first number that way; SentencePiece tokenizers do so in training itself,
since the target is tokenised on its own ("7 8" -> "▁7", ...). ``parse_score_line`` strips it.

This is a small state machine over token texts rather than a grammar library (xgrammar,
outlines-core, llguidance): the language is finite and tiny, its states are (rubric, digits of
the current number so far) plus start and end, and the one subtle part, what text a token adds
in context ("Ġ"/"▁" markers, byte-fallback tokens), is decided here by the tokenizer's own decoder
(:func:`token_texts`), exactly as the samplers decode their output. A library would add a native
dependency and its own token-decoding rules for no gain on a grammar of ~100 states.
"""
from __future__ import annotations

import logging
import weakref
from typing import Iterable, Sequence

import torch
from transformers import LogitsProcessor

logger = logging.getLogger(__name__)

START, ACCEPT, DEAD = 0, 1, -1  # state ids; states 2.. are (rubric k, digits so far)


# --------------------------------------------------------------------------- token texts

def token_texts(tokenizer) -> list[str]:
    """The text each token id adds when it follows other text, for every id below ``len(tokenizer)``.

    Decoding a token alone is not enough: SentencePiece decoders strip the leading space of the
    text's first token, which would make "▁7" look like "7". Each token is therefore decoded after
    an anchor token (one ASCII letter) and the anchor's text is cut off; the tokenizer's own
    decoder handles "Ġ"/"▁" markers and byte-fallback tokens ("<0x0A>" is "\\n"). Special tokens
    keep their literal text ("<|im_end|>"), which never matches the grammar; EOS is handled by id.
    """
    ids = list(range(len(tokenizer)))
    alone = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    anchor = next((i for i, text in enumerate(alone) if len(text) == 1 and "a" <= text.lower() <= "z"), None)
    if anchor is None:  # no plain letter token: a vocabulary no supported tokenizer has
        logger.warning("no single-letter token to decode after; using single-token decoding")
        return alone
    head = alone[anchor]
    paired = tokenizer.batch_decode([[anchor, i] for i in ids], skip_special_tokens=False,
                                    clean_up_tokenization_spaces=False)
    return [pair[len(head):] if pair.startswith(head) else text for pair, text in zip(paired, alone)]


def _may_write_line(text: str) -> bool:
    """Whether a token with this text could ever be allowed before the line ends: it writes
    something, and up to its first newline only digits and spaces (after the newline anything)."""
    head = text.split("\n", 1)[0]
    return bool(text) and all(ch == " " or "0" <= ch <= "9" for ch in head)


# --------------------------------------------------------------------------- the automaton

def max_line_tokens(ranges: Sequence[tuple[int, int]]) -> int:
    """The most tokens a constrained line can take, its end included, whatever the tokenizer:
    every allowed token but EOS writes at least one character of the longest line,
    ``" " + widest numbers + separators + "\\n"``. A budget this large never cuts a constrained line."""
    return 1 + sum(len(str(hi)) for _, hi in ranges) + len(ranges) - 1 + 1


def _number_prefixes(lo: int, hi: int) -> set[str]:
    """Every non-empty prefix of the canonical text of a number in lo..hi."""
    return {str(v)[:i] for v in range(lo, hi + 1) for i in range(1, len(str(v)) + 1)}


class ScoreLineConstraint:
    """The score-line grammar of one tokenizer, rubric ranges and EOS ids, as a token automaton.

    States are small ints: :data:`START` (nothing written), :data:`ACCEPT` (the line has ended:
    every token is allowed, so feedback after it is free), and one state per (rubric k, digits of
    number k written so far), "" meaning right after the separator (or the leading space).
    Transitions and allowed-token masks are computed once, for all states, at construction; a
    token is allowed only when its target state can still reach the line end with the
    vocabulary's tokens, so a sample can never be stranded with nothing allowed.
    """

    def __init__(self, texts: Sequence[str], ranges: Sequence[tuple[int, int]], eos_ids: Iterable[int]) -> None:
        if not ranges:
            raise ValueError("a score line needs at least one rubric")
        for lo, hi in ranges:
            if not 0 <= lo <= hi:
                raise ValueError(f"rubric range {lo}-{hi}: need 0 <= min <= max")
        self.ranges = [(int(lo), int(hi)) for lo, hi in ranges]
        self.vocab_size = len(texts)
        self.eos_ids = sorted({int(i) for i in eos_ids if 0 <= int(i) < len(texts)})
        self._prefixes = [_number_prefixes(lo, hi) for lo, hi in self.ranges]
        self._complete = [{str(v) for v in range(lo, hi + 1)} for lo, hi in self.ranges]
        # State table: index -> (k, digits); START and ACCEPT have no rubric.
        self._states: list[tuple[int, str] | None] = [None, None]
        self._index: dict[tuple[int, str], int] = {}
        for k, prefixes in enumerate(self._prefixes):
            for digits in [""] + sorted(prefixes, key=lambda p: (len(p), p)):
                self._index[(k, digits)] = len(self._states)
                self._states.append((k, digits))
        candidates = [(i, t) for i, t in enumerate(texts) if _may_write_line(t)]
        eos = set(self.eos_ids)
        self._next: list[dict[int, int]] = []
        for state in range(len(self._states)):
            moves = {i: self._run(state, text) for i, text in candidates if i not in eos}
            if self._line_complete(state):
                moves.update(dict.fromkeys(self.eos_ids, ACCEPT))
            self._next.append({i: s for i, s in moves.items() if s != DEAD})
        self._prune_dead_ends()
        if not self._next[START]:
            raise ValueError("this tokenizer has no token sequence that writes a valid score line for ranges "
                             f"{self.ranges}")
        self._masks = [self._mask(moves) for moves in self._next]
        self._device_masks: dict[tuple[int, torch.device, int], torch.Tensor] = {}

    # ---- characters

    def _line_complete(self, state: int) -> bool:
        rubric = self._states[state] if state >= 2 else None
        return rubric is not None and rubric[0] == len(self.ranges) - 1 and rubric[1] in self._complete[rubric[0]]

    def _step(self, state: int, ch: str) -> int:
        """The state after one more character (ACCEPT absorbs everything)."""
        if state == ACCEPT:
            return ACCEPT
        if state == START:
            if ch == " ":
                return self._index[(0, "")]
            state = self._index[(0, "")]  # a digit right away: as after the optional space
        k, digits = self._states[state]
        if "0" <= ch <= "9":
            return self._index.get((k, digits + ch), DEAD)  # in-range prefixes only: no leading zeros
        if digits not in self._complete[k]:
            return DEAD
        if ch == " " and k + 1 < len(self.ranges):
            return self._index[(k + 1, "")]
        if ch == "\n" and k + 1 == len(self.ranges):
            return ACCEPT
        return DEAD

    def _run(self, state: int, text: str) -> int:
        for ch in text:
            state = self._step(state, ch)
            if state in (DEAD, ACCEPT):  # after the newline the rest of the token is free
                return state
        return state

    def _prune_dead_ends(self) -> None:
        """Drop moves into states from which no token sequence reaches the line end. Every move
        writes at least one character and the line is bounded, so the states form a DAG (ACCEPT
        aside) and one pass from the longest prefixes back suffices."""
        live = {ACCEPT}
        # Reverse of construction order: later rubrics, then longer digit strings, come first;
        # every move goes to a later rubric or a longer string, so targets are decided first.
        for state in reversed(range(len(self._states))):
            if state == ACCEPT:
                continue
            self._next[state] = {i: s for i, s in self._next[state].items() if s in live}
            if self._next[state]:
                live.add(state)

    def _mask(self, moves: dict[int, int]) -> torch.Tensor:
        mask = torch.zeros(self.vocab_size, dtype=torch.bool)
        mask[list(moves)] = True
        return mask

    # ---- public

    def advance(self, state: int, token: int) -> int:
        """The state after ``token``; DEAD when the token was not allowed (ACCEPT stays ACCEPT)."""
        if state in (ACCEPT, DEAD):
            return state
        return self._next[state].get(int(token), DEAD)

    def walk(self, tokens: Iterable[int], state: int = START) -> int:
        """The state after a sequence of tokens."""
        for token in tokens:
            state = self.advance(state, token)
        return state

    def allowed(self, state: int) -> torch.Tensor | None:
        """Boolean mask over the tokenizer's ids of the tokens allowed in ``state``; None when any
        token is (ACCEPT: the line has ended; DEAD: only where generate pads a finished row)."""
        return None if state in (ACCEPT, DEAD) else self._masks[state]

    def mask_logits(self, logits: torch.Tensor, states: Sequence[int]) -> torch.Tensor:
        """``logits`` [B, V] with every token not allowed in row b's state set to -inf.

        Logit columns beyond the tokenizer's vocabulary (padded embedding matrices) are never real
        text, so they are disallowed in restricted rows; rows in ACCEPT are left as they are.
        """
        if len(states) != logits.shape[0]:
            raise ValueError(f"{logits.shape[0]} rows of logits but {len(states)} states")
        restricted = [b for b, s in enumerate(states) if self.allowed(s) is not None]
        if not restricted:
            return logits
        allowed = torch.ones(logits.shape, dtype=torch.bool, device=logits.device)
        unique = sorted({states[b] for b in restricted})
        table = torch.stack([self._device_mask(s, logits.device, logits.shape[-1]) for s in unique])
        rows = torch.tensor(restricted, device=logits.device)
        allowed[rows] = table[torch.tensor([unique.index(states[b]) for b in restricted], device=logits.device)]
        return logits.masked_fill(~allowed, float("-inf"))

    def _device_mask(self, state: int, device: torch.device, width: int) -> torch.Tensor:
        key = (state, device, width)
        if key not in self._device_masks:
            mask = self._masks[state][:width]
            if width > mask.numel():
                mask = torch.cat([mask, mask.new_zeros(width - mask.numel())])
            self._device_masks[key] = mask.to(device)
        return self._device_masks[key]


_CONSTRAINTS: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()


def score_line_constraint(tokenizer, ranges: Sequence[tuple[int, int]], eos_ids: Iterable[int]) -> ScoreLineConstraint:
    """The constraint for a tokenizer, rubric ranges and EOS ids, built once and cached.

    Keyed on the tokenizer object (rebuilt when tokens were added since), so the vocabulary is
    decoded once per tokenizer and the automaton once per (ranges, EOS ids).
    """
    cache = _CONSTRAINTS.get(tokenizer)
    if cache is None or cache["size"] != len(tokenizer):
        cache = _CONSTRAINTS[tokenizer] = {"size": len(tokenizer), "texts": token_texts(tokenizer)}
    key = (tuple((int(lo), int(hi)) for lo, hi in ranges), tuple(sorted({int(i) for i in eos_ids})))
    if key not in cache:
        cache[key] = ScoreLineConstraint(cache["texts"], key[0], key[1])
    return cache[key]


# --------------------------------------------------------------------------- generate()

class ScoreLineLogitsProcessor(LogitsProcessor):
    """Masks ``generate``'s logits to the constraint, per row, from the tokens generated so far.

    ``generate`` runs user logits processors before its sampling warpers (temperature, top-k,
    top-p), so the warpers see the restricted logits, as the trie sampler does. Make one per
    ``generate`` call: ``prompt_length`` is the width of the (left-padded) input ids, after which
    every row's generated tokens start. Rows ``generate`` has finished are padded; they are in
    ACCEPT (their last real token was EOS or carried the newline), so nothing is masked there.
    """

    def __init__(self, constraint: ScoreLineConstraint, prompt_length: int) -> None:
        self.constraint, self.prompt_length = constraint, prompt_length
        self._states: list[int] = []
        self._consumed = -1  # generated tokens folded into _states

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids.shape[1] - self.prompt_length
        if generated == self._consumed + 1 and len(self._states) == input_ids.shape[0] and generated > 0:
            last = input_ids[:, -1].tolist()
            self._states = [self.constraint.advance(s, t) for s, t in zip(self._states, last)]
        else:  # first step, or a processor reused on other input: replay every row
            rows = input_ids[:, self.prompt_length:].tolist()
            self._states = [self.constraint.walk(row) for row in rows]
        self._consumed = generated
        return self.constraint.mask_logits(scores, self._states)
