"""The deterministic synthetic sample dataset: essay generator, measurements and scores.

``python -m modules.convert synth --out_dir aes_dataset_mtl --seed 0`` writes the
shipped sample dataset (SPEC section 3). Every essay is assembled from templates
around a latent quality; every rubric score is a documented function of lexical
cues that can be *measured in the essay text* (``measure_essay``) plus bounded
integer noise in {-1, 0, +1}. Scoring from the text, not from the generator's
targets, keeps the labels honest: a test can recompute them, and a model can only
do well by reading the essay.

The word lists and rubric table are in ``lexicon.py``, the feedback templates in
``feedback.py``; ``write_synthetic`` adds the card (``card.py``) with the ridge baseline
(``baseline.py``).
"""
from __future__ import annotations

import logging
import math
import random
import re
import unicodedata
from pathlib import Path
from typing import Any, Sequence

from modules.convert.baseline import ridge_baseline
from modules.convert.card import render_readme
from modules.convert.feedback import make_feedback
from modules.convert.lexicon import (ADVANCED_WORDS, BASIC_WORDS, BODY_TEMPLATES, CONCLUSION_OPENERS,
                                     CONCLUSION_TEMPLATES, COUNTER_MARKERS, DEPTH_CLAUSES, DEPTH_MARKERS,
                                     EXAMPLE_MARKERS, GENERIC_NOUNS, INTRO_OPENERS, INTRO_TEMPLATES,
                                     MISSPELLINGS, NOISE, OFF_TOPIC_SENTENCES, OFF_TOPIC_WORDS,
                                     POSITION_MARKERS, POSITION_TEMPLATES, PROMPT_BY_ID, PROMPTS, REBUTTALS,
                                     RUBRIC_NAMES, RUBRICS, SPLIT_SIZES, TRANSITIONS)
from modules.jsonio import write_json_atomic, write_jsonl_atomic, write_text_atomic

logger = logging.getLogger(__name__)


def find_phrase(phrase: str, text: str) -> list[str]:
    """Whole-word, case-insensitive occurrences of ``phrase`` in ``text``."""
    return re.findall(r"(?<![\w'-])" + re.escape(phrase) + r"(?![\w'-])", text.lower())


def _clip(x: int, lo: int = 1, hi: int = 9) -> int:
    return max(lo, min(hi, x))


def _scale(count: int, cap: int) -> int:
    """Map a count in 0..cap linearly onto 1..9 (round half up)."""
    return 1 + int(math.floor(8 * min(max(count, 0), cap) / cap + 0.5))


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def measure_essay(text: str, prompt: str | dict) -> dict[str, Any]:
    """Measure the lexical cues the scores depend on, from the essay text alone.

    ``prompt`` is a prompt id or a prompt dict with an ``id``. Counts are exposed
    next to the found items (``*_found``) so feedback can quote the evidence.
    """
    spec = PROMPT_BY_ID[prompt if isinstance(prompt, str) else prompt["id"]]
    low = text.lower()
    sents = [s.lower() for s in _sentences(text)]

    def found(words: Sequence[str]) -> list[str]:
        return [w for w in words if find_phrase(w, low)]

    miss = [w for w in MISSPELLINGS.values() for _ in find_phrase(w, low)]
    off = [s for s in sents if any(find_phrase(w, s) for w in OFF_TOPIC_WORDS)]
    m = {"words": len(text.split()), "sentences": len(sents),
         "paragraphs": len([p for p in text.split("\n\n") if p.strip()]),
         "has_intro": int(bool(sents) and sents[0].startswith(INTRO_OPENERS)),
         "has_conclusion": int(bool(sents) and sents[-1].startswith(CONCLUSION_OPENERS)),
         "position_found": found(POSITION_MARKERS),
         "has_key_phrase": int(bool(find_phrase(spec["key"], low))),
         "off_topic_sentences": len(off), "off_topic_found": found(OFF_TOPIC_WORDS),
         "topic_found": found(spec["topic"]), "example_found": found(EXAMPLE_MARKERS),
         "has_number": int(bool(re.search(r"\d", text))), "depth_found": found(DEPTH_MARKERS),
         "has_counterargument": int(bool(found(COUNTER_MARKERS))),
         "transitions_found": found(TRANSITIONS), "advanced_found": found(ADVANCED_WORDS),
         "basic_found": found(BASIC_WORDS), "misspellings_found": miss}
    m["has_position"] = int(bool(m["position_found"]))
    m["topic_words"], m["advanced_words"] = len(m["topic_found"]), len(m["advanced_found"])
    m["example_markers"], m["depth_markers"] = len(m["example_found"]), len(m["depth_found"])
    m["transitions"], m["misspellings"] = len(m["transitions_found"]), len(miss)
    return m


def score_from_measures(m: dict[str, Any]) -> dict[str, int]:
    """Noise-free rubric scores (1..9); the formulas are the ones in ``RUBRICS``."""
    return {
        "task": _clip(3 + 3 * m["has_position"] + 3 * m["has_key_phrase"]
                      - 2 * m["off_topic_sentences"]),
        "content_1": _clip(_scale(m["topic_words"], 5) - m["off_topic_sentences"]),
        "content_2": _clip(1 + 3 * min(m["example_markers"], 2) + 2 * m["has_number"]),
        "content_3": _clip(1 + 3 * min(m["depth_markers"], 2) + 2 * m["has_counterargument"]),
        "organization_1": _clip(1 + 3 * m["has_intro"] + 3 * m["has_conclusion"]
                                + min(m["paragraphs"], 3) - 1),
        "organization_2": _scale(m["transitions"], 5),
        "expression_1": _scale(m["advanced_words"], 5),
        "expression_2": _scale(5 - min(m["misspellings"], 5), 5),
    }


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _plan(rng: random.Random, q: float) -> dict[str, Any]:
    """Per-cue targets: each rubric gets its own jittered copy of the latent quality
    so rubrics correlate (learnable jointly) without being identical."""
    def qj(sd: float = 0.12) -> float:
        return min(1.0, max(0.0, q + rng.gauss(0, sd)))

    def count(cap: int, inv: bool = False) -> int:
        v = qj()
        return max(0, min(cap, round((1 - v if inv else v) * cap + rng.gauss(0, 0.4))))

    qt = qj()
    return {"position": qj() > 0.35, "key": qj() > 0.6,
            "off": 2 if qt < 0.12 else 1 if qt < 0.3 else 0,
            "topic": count(5), "examples": count(2), "number": qj() > 0.55,
            "depth": count(2), "counter": qj() > 0.6, "intro": qj() > 0.35,
            "conclusion": qj() > 0.45, "paragraphs": 1 + count(2), "transitions": count(5),
            "advanced": count(5), "misspellings": count(5, inv=True),
            "target_words": rng.randint(40, 64)}


def _compose(rng: random.Random, spec: dict[str, Any], plan: dict[str, Any]) -> str:
    """Assemble one essay from templates following ``plan``; returns the text."""
    # Sentences are (kind, template) pairs; slots are filled after the layout is fixed.
    ref = spec["key"] if plan["key"] else rng.choice(("this question", "this topic"))
    head: list[tuple[str, str]] = []
    if plan["intro"]:
        head.append(("intro", rng.choice(INTRO_TEMPLATES).replace("{ref}", ref)))
    elif plan["key"]:
        head.append(("key", spec["key"] + " is a topic that many people discuss"))
    if plan["position"]:
        stance = rng.choice(spec["stances"])
        head.append(("position", rng.choice(POSITION_TEMPLATES).replace("{s}", stance)))
    extras: list[tuple[str, str]] = []
    for marker, (plain, numbered) in zip(rng.sample(EXAMPLE_MARKERS, plan["examples"]),
                                         rng.sample(spec["examples"], plan["examples"])):
        use_num = plan["number"] and not any(re.search(r"\d", t) for _, t in extras)
        extras.append(("example", f"{marker}, {numbered if use_num else plain}"))
    for marker, clause in zip(rng.sample(DEPTH_MARKERS, plan["depth"]),
                              rng.sample(DEPTH_CLAUSES, plan["depth"])):
        extras.append(("depth", marker + (", " if marker == "in the long run" else " ") + clause))
    if plan["counter"]:
        extras.append(("counter", f"{rng.choice(COUNTER_MARKERS)} {rng.choice(spec['counters'])}, "
                                  f"{rng.choice(REBUTTALS)}"))
    extras += [("off", s) for s in rng.sample(OFF_TOPIC_SENTENCES, plan["off"])]
    opener = rng.choice(CONCLUSION_OPENERS)
    tail = ([("conclusion", rng.choice(CONCLUSION_TEMPLATES).replace("{o}", opener))]
            if plan["conclusion"] else [])
    body: list[tuple[str, str]] = []
    order = rng.sample(BODY_TEMPLATES, len(BODY_TEMPLATES))  # no template repeats
    n_words = lambda: sum(len(t.split()) for _, t in head + extras + tail + body)  # noqa: E731
    while len(body) < 2 or (n_words() + 2 * len(body) < plan["target_words"] and len(body) < 9):
        body.append(("body", order[len(body)]))
    mid = list(body)
    for item in extras:
        mid.insert(rng.randint(1, len(mid)), item)
    sents = head + mid + tail
    # Slot filling: transitions on body/depth sentences, topic words in noun slots,
    # advanced words in adjective slots.
    texts = [t for _, t in sents]
    trans_slots = [i for i, (k, _) in enumerate(sents) if k in ("body", "depth", "counter")]
    for i, tr in zip(rng.sample(trans_slots, min(len(trans_slots), plan["transitions"])),
                     rng.sample(TRANSITIONS, plan["transitions"])):
        texts[i] = f"{tr}, {texts[i]}"
    topics = rng.sample(spec["topic"], plan["topic"])
    noun_slots = [(i, s) for i, t in enumerate(texts) for s in ("{n1}", "{n2}") if s in t]
    rng.shuffle(noun_slots)
    for j, (i, s) in enumerate(noun_slots):
        pool = [w for w in (topics if topics and rng.random() < 0.5 else GENERIC_NOUNS)
                if not find_phrase(w, texts[i])] or [w for w in GENERIC_NOUNS if not find_phrase(w, texts[i])]
        word = topics[j] if j < len(topics) else rng.choice(pool)
        texts[i] = texts[i].replace(s, word, 1)
    adj_slots = [i for i, t in enumerate(texts) if "adj}" in t]
    rng.shuffle(adj_slots)
    advanced = rng.sample(ADVANCED_WORDS, plan["advanced"])
    for j, i in enumerate(adj_slots):
        word = advanced[j] if j < len(advanced) else rng.choice(BASIC_WORDS)
        texts[i] = texts[i].replace("{a_adj}", _article(word)).replace("{adj}", word)
    texts = [t if t.endswith(".") else t[0].upper() + t[1:] + "." for t in texts]
    # Paragraphs: head | middle | tail when three, an even split when two.
    n, k = len(texts), plan["paragraphs"]
    if k == 3:
        a, b = max(len(head), 2), n - max(len(tail), 2)
        cuts = [0, a, b, n] if 0 < a < b < n else [0, n // 2, n]
    else:
        cuts = [0, n // 2, n] if k == 2 else [0, n]
    text = "\n\n".join(" ".join(texts[x:y]) for x, y in zip(cuts, cuts[1:]))
    text = re.sub(r"\bi\b", "I", text)
    # Misspellings: replace randomly chosen occurrences of table words, keeping case.
    spots = [mt for w in MISSPELLINGS for mt in re.finditer(rf"\b{w}\b", text, flags=re.I)]
    spots = sorted(rng.sample(spots, min(len(spots), plan["misspellings"])),
                   key=lambda mt: -mt.start())
    for mt in spots:
        wrong = MISSPELLINGS[mt.group(0).lower()]
        wrong = wrong[0].upper() + wrong[1:] if mt.group(0)[0].isupper() else wrong
        text = text[:mt.start()] + wrong + text[mt.end():]
    return unicodedata.normalize("NFC", text)

def generate_synthetic(seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, list[dict]]:
    """Generate all splits from one ``random.Random(seed)``; splits are i.i.d. slices."""
    sizes = dict(SPLIT_SIZES if sizes is None else sizes)
    rng = random.Random(seed)
    records: list[dict] = []
    for idx in range(sum(sizes.values())):
        spec = rng.choice(PROMPTS)
        q = rng.random()
        for _ in range(50):  # keep essays within 45..130 words (deterministic retries)
            plan = _plan(rng, q)
            essay = _compose(rng, spec, plan)
            if 45 <= len(essay.split()) <= 130:
                break
        m = measure_essay(essay, spec["id"])
        base = score_from_measures(m)
        scores = {n: _clip(base[n] + rng.choice(NOISE)) for n in RUBRIC_NAMES}
        records.append({"id": f"synth-{idx + 1:05d}", "prompt_id": spec["id"], "essay": essay,
                        "scores": scores, "feedback": make_feedback(scores, m, spec["key"])})
    out, start = {}, 0
    for split, n in sizes.items():
        out[split], start = records[start:start + n], start + n
    logger.info("generated %s essays with seed %d", {k: len(v) for k, v in out.items()}, seed)
    return out


def dataset_meta() -> dict[str, Any]:
    """Contents of dataset.json (rubric order = RUBRIC_NAMES)."""
    rubrics = [{"name": n, "min": 1, "max": 9, "description": RUBRICS[n][0],
                "levels": {str(lv): RUBRICS[n][2][(lv - 1) // 2] for lv in range(1, 10)}}
               for n in RUBRIC_NAMES]
    return {"name": "synthetic-aes-mtl", "language": "en",
            "prompts": [{"id": p["id"], "title": p["title"], "text": p["text"]} for p in PROMPTS],
            "rubrics": rubrics}


def write_synthetic(out_dir: str | Path, seed: int = 0,
                    sizes: dict[str, int] | None = None) -> dict[str, Any]:
    """Generate and write the dataset folder; returns a summary (sizes, QWK)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits = generate_synthetic(seed, sizes)
    meta = dataset_meta()
    for split, recs in splits.items():
        write_jsonl_atomic(out / f"{split}.jsonl", recs)
    write_json_atomic(out / "dataset.json", meta)
    qwk = ridge_baseline(splits["train"], splits["test"], meta["rubrics"])
    write_text_atomic(out / "README.md", render_readme(splits, meta, seed, out.name, qwk))
    return {"sizes": {k: len(v) for k, v in splits.items()}, "qwk": qwk,
            "mean_words": sum(len(r["essay"].split()) for v in splits.values() for r in v)
            / sum(len(v) for v in splits.values())}
