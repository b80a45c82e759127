"""Template feedback for the synthetic dataset: the strongest and the weakest rubric, each with
evidence quoted from the essay's measurements (``synthetic.measure_essay``)."""
from __future__ import annotations

import re
from typing import Any

from modules.convert.lexicon import MISSPELLINGS, RUBRIC_NAMES, RUBRICS


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
