"""Dataset converters and the deterministic synthetic sample dataset.

Real corpora (``asap``, ``ellipse``, ``csv`` subcommands) are converted by
``modules/converters.py``; this file holds the CLI and the synthetic generator.

``python -m modules.convert synth --out_dir aes_dataset_mtl --seed 0`` writes the
shipped sample dataset (SPEC section 3). Every essay is assembled from templates
around a latent quality; every rubric score is a documented function of lexical
cues that can be *measured in the essay text* (``measure_essay``) plus bounded
integer noise in {-1, 0, +1}. Scoring from the text, not from the generator's
targets, keeps the labels honest: a test can recompute them, and a model can only
do well by reading the essay.
"""
from __future__ import annotations

import argparse
import logging
import math
import random
import re
import sys
import unicodedata
from pathlib import Path
from typing import Any, Sequence

from modules import converters
from modules.cli import ArgumentParser
from modules.data import DataError, write_json_atomic, write_jsonl_atomic, write_text_atomic

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------
# Word lists. Marker phrases never contain a word of MISSPELLINGS, so injected
# spelling errors cannot hide another cue (checked in the tests).
# ----------------------------------------------------------------------------
PROMPTS: list[dict[str, Any]] = [
    {"id": "school_uniforms", "title": "School uniforms",
     "text": "Should schools require students to wear uniforms? Take a position and "
             "support it with reasons and examples.",
     "key": "school uniforms",
     "topic": ["uniform", "clothing", "dress code", "fashion", "bullying", "identity",
               "discipline", "appearance", "self-expression", "school spirit",
               "equality", "peer pressure"],
     "stances": ["schools should ask every student to wear the same outfit",
                 "a shared outfit rule makes school days calmer",
                 "students should keep choosing what they wear"],
     "examples": [("my cousin's school saved families money on clothes",
                   "my cousin's school saved families 150 dollars on clothes"),
                  ("at my old school nobody was teased about shoes",
                   "at my old school 9 in 10 kids liked mornings more"),
                  ("my neighbour's school has fewer fights now",
                   "my neighbour's school has 30 percent fewer fights now")],
     "counters": ["a shared outfit limits personal style",
                  "extra outfits cost families too much"]},
    {"id": "phones_in_class", "title": "Phones in the classroom",
     "text": "Should students be allowed to use their phones during class? Explain "
             "your view with reasons and examples.",
     "key": "phones in class",
     "topic": ["smartphone use", "screen time", "distraction", "attention", "texting",
               "focus", "social media", "concentration", "homework",
               "classroom technology", "online research", "digital literacy"],
     "stances": ["students should be allowed to keep a phone on the desk",
                 "a phone belongs in a locker during lessons",
                 "teachers should decide when phones come out"],
     "examples": [("my sister checked her phone during every lesson",
                   "my sister checked her phone 40 times in one lesson"),
                  ("our science teacher lets us look up facts on a phone",
                   "our science teacher lets us look up facts for 10 minutes"),
                  ("my brother's grades dropped after he got a phone",
                   "my brother's grades dropped 15 points after he got a phone")],
     "counters": ["phones help students find answers fast",
                  "banning phones treats students like children"]},
    {"id": "learning_from_mistakes", "title": "Learning from a mistake",
     "text": "Describe a time when you made a mistake and explain what you learned "
             "from it. Use specific details.",
     "key": "learning from mistakes",
     "topic": ["failure", "courage", "practice", "honesty", "patience", "growth",
               "regret", "responsibility", "confidence", "self-reflection",
               "resilience", "apology"],
     "stances": ["the mistake i made last year taught me the most",
                 "my worst mistake turned into my best lesson",
                 "making that mistake changed how i act today"],
     "examples": [("i forgot my lines in the school play",
                   "i forgot my lines in front of 200 parents"),
                  ("i lied to my coach about missing training",
                   "i lied to my coach about missing 3 training sessions"),
                  ("i broke my sister's bike and hid it",
                   "i broke my sister's bike and hid it for 2 weeks")],
     "counters": ["a mistake should simply be forgotten",
                  "talking about errors only makes a person feel worse"]},
]
PROMPT_BY_ID = {p["id"]: p for p in PROMPTS}

INTRO_OPENERS = ("in this essay", "this essay will explain", "there is a lively debate about")
INTRO_TEMPLATES = ("in this essay i discuss {ref}", "this essay will explain my view on {ref}",
                   "there is a lively debate about {ref}")
CONCLUSION_OPENERS = ("in conclusion", "to sum up", "all in all")
CONCLUSION_TEMPLATES = ("{o}, {n1} deserves {a_adj} amount of thought",
                        "{o}, the points above about {n1} show {a_adj} way forward",
                        "{o}, my view is {adj}")
POSITION_TEMPLATES = ("in my opinion, {s}", "i strongly believe that {s}",
                      "my position is that {s}", "i am convinced that {s}")
POSITION_MARKERS = tuple(t.split("{")[0].strip(" ,") for t in POSITION_TEMPLATES)
EXAMPLE_MARKERS = ("for example", "for instance", "to illustrate", "in my experience")
DEPTH_MARKERS = ("this means that", "in the long run", "the deeper reason is that",
                 "a key implication is that")
DEPTH_CLAUSES = ("small daily choices about {n1} add up to {a_adj} difference",
                 "habits formed early have {a_adj} influence later",
                 "trust in {n1} grows when the reasons are {adj}",
                 "a clear rule is {adj} when everybody understands it")
COUNTER_MARKERS = ("critics claim that", "others might object that")
REBUTTALS = ("yet this view misses the point", "but the evidence disagrees",
             "though that seems {adj} at first")
TRANSITIONS = ("however", "therefore", "moreover", "furthermore", "in addition",
               "on the other hand", "similarly", "as a result")
ADVANCED_WORDS = ("crucial", "substantial", "beneficial", "profound", "significant",
                  "invaluable", "fundamental", "compelling", "remarkable", "considerable")
BASIC_WORDS = ("good", "bad", "big", "nice", "okay", "cool")
GENERIC_NOUNS = ("life", "everything", "daily life", "the future", "the world",
                 "this stuff", "other things", "the situation")
BODY_TEMPLATES = (
    "people really think that {n1} is {a_adj} thing for {n2}",
    "{n1} can have {a_adj} effect on {n2} and on their friends",
    "i definitely think {n1} and {n2} are {adj} in different ways",
    "the way people treat {n1} is {adj} because it shapes {n2}",
    "many people forget how {adj} {n1} can be for {n2}",
    "{n1} usually changes {n2} in {a_adj} way",
    "everyone would receive {a_adj} benefit from {n1} and {n2}",
    "their ideas about {n1} are {adj}, and {n2} is something they always mention",
    "{n1} is {adj} for people because it connects to {n2}",
    "we probably see {n1} and {n2} as {adj} parts of the same problem",
)
OFF_TOPIC_SENTENCES = ("My favourite food is pizza with extra cheese.",
                       "Last weekend I watched a football match with my cousin.",
                       "It rained on my birthday and the weather was grey.",
                       "My cat likes to sleep on the sofa all afternoon.",
                       "I also enjoy playing video games after dinner.")
OFF_TOPIC_WORDS = ("pizza", "weekend", "football", "birthday", "weather", "cat", "sofa",
                   "video games", "dinner")
MISSPELLINGS = {"people": "poeple", "really": "realy", "because": "becuase",
                "their": "thier", "different": "diffrent", "usually": "usualy",
                "probably": "probaly", "always": "allways", "something": "somthing",
                "definitely": "definately", "receive": "recieve", "everyone": "evryone",
                "friends": "freinds"}

RUBRIC_NAMES = ("task", "content_1", "content_2", "content_3", "organization_1",
                "organization_2", "expression_1", "expression_2")
# name -> (description, feedback label, five band descriptors for 1-2, 3-4, 5-6, 7-8, 9,
#          scoring function as documented in the README)
RUBRICS: dict[str, tuple[str, str, tuple[str, ...], str]] = {
    "task": ("Task fulfilment: the essay answers the prompt, names the issue and takes "
             "a clear position without drifting off topic.", "task fulfilment",
             ("no position and off-topic material", "unclear position or off-topic lines",
              "position or issue stated, not both", "clear position on the named issue",
              "clear position, named issue, fully on topic"),
             "clip(3 + 3*has_position + 3*has_key_phrase - 2*off_topic_sentences, 1, 9)"),
    "content_1": ("Relevance of ideas to the prompt: the ideas use the prompt's own "
                  "topic vocabulary and stay on it.", "relevance",
                  ("barely related to the prompt", "few ideas tied to the prompt",
                   "mostly relevant ideas", "relevant ideas across the topic",
                   "every idea on the prompt's topic"),
                  "clip(scale(topic_words, 5) - off_topic_sentences, 1, 9)"),
    "content_2": ("Supporting details and examples: points are backed by concrete "
                  "examples and specific facts.", "supporting detail",
                  ("no examples", "one vague example", "some examples",
                   "several concrete examples", "concrete examples with specific facts"),
                  "clip(1 + 3*min(example_markers, 2) + 2*has_number, 1, 9)"),
    "content_3": ("Originality and depth: ideas are explained with consequences and "
                  "a counterargument is answered.", "depth of reasoning",
                  ("ideas only listed", "little explanation", "some explanation",
                   "ideas explained with consequences",
                   "deep reasoning with a counterargument answered"),
                  "clip(1 + 3*min(depth_markers, 2) + 2*has_counterargument, 1, 9)"),
    "organization_1": ("Paragraph structure: an introduction, a conclusion and "
                       "clear paragraphs.", "paragraph structure",
                       ("one block, no introduction or conclusion",
                        "introduction or conclusion missing",
                        "partial structure", "introduction, body and conclusion",
                        "complete structure in well-divided paragraphs"),
                       "clip(1 + 3*has_intro + 3*has_conclusion + min(paragraphs, 3) - 1, 1, 9)"),
    "organization_2": ("Transitions and coherence: sentences are linked with varied "
                       "transition words.", "transitions and coherence",
                       ("no transitions", "one or two transitions", "some transitions",
                        "varied transitions", "consistently linked ideas"),
                       "scale(transitions, 5)"),
    "expression_1": ("Vocabulary range: precise and advanced word choice instead of "
                     "plain words.", "vocabulary range",
                     ("only plain words", "mostly plain words", "some precise words",
                      "varied precise vocabulary", "rich, precise vocabulary"),
                     "scale(advanced_words, 5)"),
    "expression_2": ("Spelling and mechanics: words are spelled correctly.",
                     "spelling and mechanics",
                     ("many misspellings", "frequent misspellings", "a few misspellings",
                      "rare misspellings", "no misspellings"),
                     "scale(5 - min(misspellings, 5), 5)"),
}
NOISE = (-1, 0, 0, 1)  # bounded integer noise, drawn uniformly from this tuple
SPLIT_SIZES = {"train": 200, "valid": 30, "test": 60}


def _find(phrase: str, text: str) -> list[str]:
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
        return [w for w in words if _find(w, low)]

    miss = [w for w in MISSPELLINGS.values() for _ in _find(w, low)]
    off = [s for s in sents if any(_find(w, s) for w in OFF_TOPIC_WORDS)]
    m = {"words": len(text.split()), "sentences": len(sents),
         "paragraphs": len([p for p in text.split("\n\n") if p.strip()]),
         "has_intro": int(bool(sents) and sents[0].startswith(INTRO_OPENERS)),
         "has_conclusion": int(bool(sents) and sents[-1].startswith(CONCLUSION_OPENERS)),
         "position_found": found(POSITION_MARKERS),
         "has_key_phrase": int(bool(_find(spec["key"], low))),
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
                if not _find(w, texts[i])] or [w for w in GENERIC_NOUNS if not _find(w, texts[i])]
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


def _cue(name: str, m: dict[str, Any], key: str, strong: bool) -> str:
    """Concrete evidence for one rubric, quoting what was measured in the essay;
    ``strong`` picks praise-style or advice-style wording."""
    q = lambda xs: " and ".join(f"'{x}'" for x in xs[:2])  # noqa: E731
    if name == "task":
        if m["off_topic_sentences"]:
            return f"it drifts off topic ({q(m['off_topic_found'])})"
        if not m["has_position"]:
            return "it never states a clear position"
        if not m["has_key_phrase"]:
            return f"it states a position with {q(m['position_found'])} but never names '{key}'"
        return (f"it states a position with {q(m['position_found'])} on {key}" if strong
                else "the position is stated but could be argued more fully")
    if name == "content_1":
        k, found = m["topic_words"], q(m["topic_found"])
        if strong and k:
            return f"it uses prompt vocabulary such as {found}"
        return (f"only {k} prompt word(s) such as {found}; engage more with the topic" if k
                else "it uses almost no vocabulary from the prompt's topic")
    if name == "content_2":
        if not m["example_markers"]:
            return "it gives no example; add one with 'for example' and a specific fact"
        if strong:
            return f"it marks examples with {q(m['example_found'])}" + (
                " and gives a specific number" if m["has_number"] else "")
        return ("its example lacks specific facts or numbers" if not m["has_number"]
                else "a second concrete example would help")
    if name == "content_3":
        if not m["depth_markers"]:
            return "ideas are stated but not explained; add reasons with 'this means that'"
        if strong:
            return f"it explains consequences with {q(m['depth_found'])}" + (
                " and answers a counterargument" if m["has_counterargument"] else "")
        return ("no counterargument is answered" if not m["has_counterargument"]
                else "the reasoning could go one step further")
    if name == "organization_1":
        parts = (("an introduction", m["has_intro"]), ("a conclusion", m["has_conclusion"]))
        have, lack = [p for p, ok in parts if ok], [p for p, ok in parts if not ok]
        paras = f"{m['paragraphs']} paragraph" + ("s" if m["paragraphs"] > 1 else "")
        if strong and have:
            return f"it has {' and '.join(have)} in {paras}"
        if lack:
            return f"it lacks {' and '.join(lack)} ({paras})"
        return ("it could divide the body into clearer paragraphs" if m["paragraphs"] < 3
                else "the frame is thin")
    if name == "organization_2":
        t, found = m["transitions"], ", ".join(m["transitions_found"][:3])
        if not t:
            return "sentences are not linked; try 'however' or 'therefore'"
        return (f"it links sentences with transitions ({found})" if strong
                else f"only {t} transition(s) ({found}); link more sentences")
    if name == "expression_1":
        adv, basic = q(m["advanced_found"]), q(m["basic_found"])
        if strong and m["advanced_words"]:
            return f"it uses precise words such as {adv}"
        if m["basic_found"]:
            return f"plain words such as {basic} dominate; choose more precise ones"
        return "vocabulary is plain"
    if not m["misspellings"]:
        return "no misspellings were found"
    inv = {v: k for k, v in MISSPELLINGS.items()}
    w = m["misspellings_found"][0]
    return f"{m['misspellings']} misspelling(s) such as '{w}' (for '{inv[w]}')"


def make_feedback(scores: dict[str, int], m: dict[str, Any], key: str) -> str:
    """Template feedback: strongest and weakest rubric with evidence from the essay.

    Kept to two short sentences: every feedback token is a training target, and the CPU
    quickstart pays for each one.
    """
    best = max(RUBRIC_NAMES, key=lambda n: scores[n])   # first on ties, rubric order
    worst = min(RUBRIC_NAMES, key=lambda n: scores[n])
    avg = sum(scores.values()) / len(scores)
    if scores[best] == scores[worst]:
        out = f"All rubrics at level {scores[best]}: {_cue(best, m, key, avg >= 5)}."
    else:
        out = " ".join(f"{tag}: {RUBRICS[n][1]} ({scores[n]}), {_cue(n, m, key, tag == 'Strongest')}."
                       for tag, n in (("Strongest", best), ("Weakest", worst)))
    return re.sub(r"\bi\b", "I", out)  # quoted markers are stored lowercase


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


def ridge_baseline(train: list[dict], test: list[dict], rubrics: list[dict]) -> dict[str, float]:
    """TF-IDF (1-2 grams) + Ridge per rubric; test QWK over each rubric's full range."""
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import Ridge
    from sklearn.metrics import cohen_kappa_score

    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    xtr, xte = vec.fit_transform([r["essay"] for r in train]), vec.transform([r["essay"] for r in test])
    res = {}
    for rb in rubrics:
        lo, hi, n = rb["min"], rb["max"], rb["name"]
        pred = Ridge(alpha=1.0).fit(xtr, [r["scores"][n] for r in train]).predict(xte)
        pred = np.clip(np.rint(pred), lo, hi).astype(int)
        res[n] = float(cohen_kappa_score([r["scores"][n] for r in test], pred,
                                         weights="quadratic", labels=list(range(lo, hi + 1))))
    return res


def render_readme(splits: dict[str, list[dict]], meta: dict[str, Any], seed: int,
                  out_name: str, qwk: dict[str, float]) -> str:
    """The dataset card, rendered from the same constants the generator uses."""
    sizes = {k: len(v) for k, v in splits.items()}
    allrec = [r for v in splits.values() for r in v]
    mean_words = sum(len(r["essay"].split()) for r in allrec) / len(allrec)
    cmd = f"python -m modules.convert synth --out_dir {out_name} --seed {seed}"
    if sizes != SPLIT_SIZES:
        cmd += "".join(f" --n_{k} {v}" for k, v in sizes.items())
    lines = [
        "# Synthetic AES sample dataset (multi-task: scores + feedback)", "",
        "Generated by the project's own deterministic generator; no text comes from any "
        "other corpus. Regenerate (byte-identical) with:", "", f"    {cmd}", "",
        "## How it is generated", "",
        "For each essay the generator draws a prompt and a latent quality q ~ U(0, 1). Every "
        "rubric gets its own jittered copy of q (Gaussian, sd 0.12), which sets targets for "
        "lexical cues (how many topic words, transitions, advanced words, misspellings, ...). "
        "Sentences come from templates (intro, position, body, example, reasoning, "
        "counterargument, off-topic, conclusion) whose slots are filled from the word lists "
        "below; essays have 1-3 paragraphs and 45-130 words.", "",
        "Scores are **not** the generator's targets: `measure_essay(text, prompt_id)` "
        "measures the cues in the final text and `score_from_measures` applies the formulas "
        "below. Each score then gets integer noise drawn uniformly from "
        f"`{list(NOISE)}` (so -1/0/+1 with probability 1/4, 1/2, 1/4) and is clipped to "
        "1..9. Every stored score is therefore within 1 of the formula.", "",
        "Feedback (two short sentences) is templated from the noisy scores and the measurements: "
        "the strongest and the weakest rubric (first in rubric order on ties) with its level "
        "and quoted evidence from the essay.", "",
        "## Files", "",
        "- `dataset.json`: name, language, prompts, rubrics (name, min, max, description, "
        "per-level descriptors).",
        "- `train.jsonl`, `valid.jsonl`, `test.jsonl`: one record per line, "
        '`{"id", "prompt_id", "essay", "scores": {rubric: int}, "feedback"}`.', "",
        f"Sizes: train {sizes.get('train', 0)}, valid {sizes.get('valid', 0)}, "
        f"test {sizes.get('test', 0)}. Mean essay length: {mean_words:.1f} words.", "",
        "## Prompts", "",
        *[f"- `{p['id']}`: {p['text']} (key phrase: \"{p['key']}\")" for p in PROMPTS], "",
        "## Scoring functions", "",
        "`scale(c, cap) = 1 + round_half_up(8 * min(c, cap) / cap)`; `clip(x, 1, 9)`. "
        "All matching is case-insensitive and whole-word.", "",
        "| rubric | description | score (before noise) |", "|---|---|---|",
        *[f"| `{n}` | {RUBRICS[n][0]} | `{RUBRICS[n][3]}` |" for n in RUBRIC_NAMES], "",
        "Measured properties:", "",
        "- `has_position`: one of " + ", ".join(f'"{w}"' for w in POSITION_MARKERS) + ".",
        "- `has_key_phrase`: the prompt's key phrase appears.",
        "- `off_topic_sentences`: sentences with one of " + ", ".join(OFF_TOPIC_WORDS) + ".",
        "- `topic_words`: distinct words/phrases of the prompt's topic list used:",
        *[f"  - `{p['id']}`: " + ", ".join(p["topic"]) for p in PROMPTS],
        "- `example_markers`: distinct of " + ", ".join(f'"{w}"' for w in EXAMPLE_MARKERS)
        + "; `has_number`: any digit in the essay.",
        "- `depth_markers`: distinct of " + ", ".join(f'"{w}"' for w in DEPTH_MARKERS)
        + "; `has_counterargument`: " + " or ".join(f'"{w}"' for w in COUNTER_MARKERS) + ".",
        "- `has_intro`: the first sentence starts with " + " / ".join(f'"{w}"' for w in INTRO_OPENERS)
        + "; `has_conclusion`: the last sentence starts with "
        + " / ".join(f'"{w}"' for w in CONCLUSION_OPENERS) + "; `paragraphs`: blocks separated "
        "by a blank line.",
        "- `transitions`: distinct of " + ", ".join(TRANSITIONS) + ".",
        "- `advanced_words`: distinct of " + ", ".join(ADVANCED_WORDS)
        + " (weaker essays use " + ", ".join(BASIC_WORDS) + ").",
        "- `misspellings`: occurrences of "
        + ", ".join(f"{v} ({k})" for k, v in MISSPELLINGS.items()) + ".", "",
        "## Score distribution (train)", "",
        "| rubric | mean | min | max | distinct values |", "|---|---|---|---|---|",
    ]
    for n in RUBRIC_NAMES:
        v = [r["scores"][n] for r in splits["train"]]
        lines.append(f"| `{n}` | {sum(v) / len(v):.2f} | {min(v)} | {max(v)} | {len(set(v))} |")
    lines += ["", "## Learnability baseline", "",
              "`TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)` + "
              "`Ridge(alpha=1.0)` per rubric, fit on train, predictions rounded and clipped "
              "to 1..9, quadratic weighted kappa on test (labels 1..9):", "",
              "| rubric | test QWK |", "|---|---|",
              *[f"| `{n}` | {qwk[n]:.3f} |" for n in RUBRIC_NAMES],
              f"| **mean** | **{sum(qwk.values()) / len(qwk):.3f}** |", ""]
    return "\n".join(lines)


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


def _cmd_synth(args: argparse.Namespace) -> int:
    summary = write_synthetic(args.out_dir, args.seed,
                              {"train": args.n_train, "valid": args.n_valid, "test": args.n_test})
    print(f"wrote {args.out_dir}: {summary['sizes']}, mean {summary['mean_words']:.1f} words")
    for name, v in summary["qwk"].items():
        print(f"  ridge QWK {name:<15} {v:.3f}")
    print(f"  ridge QWK {'mean':<15} {sum(summary['qwk'].values()) / len(summary['qwk']):.3f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Top-level parser; each converter registers one subcommand with ``func``."""
    parser = ArgumentParser(prog="python -m modules.convert",
                                     description="Dataset converters and sample-data generator.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("synth", help="write the deterministic synthetic sample dataset")
    p.add_argument("--out_dir", default="aes_dataset_mtl")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n_train", type=int, default=SPLIT_SIZES["train"])
    p.add_argument("--n_valid", type=int, default=SPLIT_SIZES["valid"])
    p.add_argument("--n_test", type=int, default=SPLIT_SIZES["test"])
    p.set_defaults(func=_cmd_synth)
    converters.add_parsers(sub)  # asap, ellipse, csv: real corpora (modules/converters.py)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DataError as err:  # bad input: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
