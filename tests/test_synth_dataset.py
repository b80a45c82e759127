"""The shipped synthetic dataset: reproducible, well-formed, honestly labelled, learnable."""
from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path

import pytest

from modules.convert import baseline, cli, lexicon, synthetic

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "aes_dataset_mtl"
SPLITS = ("train", "valid", "test")
FILES = ("train.jsonl", "valid.jsonl", "test.jsonl", "dataset.json", "README.md")


def _load(split: str) -> list[dict]:
    with open(DATA / f"{split}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def meta() -> dict:
    return json.loads((DATA / "dataset.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def splits() -> dict[str, list[dict]]:
    return {s: _load(s) for s in SPLITS}


def test_regeneration_is_byte_identical(tmp_path: Path) -> None:
    out = tmp_path / "aes_dataset_mtl"
    assert cli.main(["synth", "--out_dir", str(out), "--seed", "0"]) == 0
    for name in FILES:
        assert (out / name).read_bytes() == (DATA / name).read_bytes(), name


def test_other_seed_differs() -> None:
    a = synthetic.generate_synthetic(0, {"train": 5, "valid": 0, "test": 0})["train"]
    b = synthetic.generate_synthetic(1, {"train": 5, "valid": 0, "test": 0})["train"]
    assert [r["essay"] for r in a] != [r["essay"] for r in b]


def test_dataset_json_schema(meta: dict) -> None:
    assert isinstance(meta["name"], str) and meta["language"] == "en"
    assert 3 <= len(meta["prompts"]) <= 4
    for p in meta["prompts"]:
        assert set(p) == {"id", "title", "text"} and all(isinstance(v, str) and v for v in p.values())
    assert [r["name"] for r in meta["rubrics"]] == list(lexicon.RUBRIC_NAMES)
    for r in meta["rubrics"]:
        assert re.fullmatch(r"[a-z][a-z0-9_]*", r["name"])
        assert (r["min"], r["max"]) == (1, 9) and r["description"]
        assert list(r["levels"]) == [str(i) for i in range(1, 10)]
        assert all(isinstance(v, str) and v for v in r["levels"].values())


def test_records_schema(meta: dict, splits: dict[str, list[dict]]) -> None:
    prompt_ids = {p["id"] for p in meta["prompts"]}
    names = [r["name"] for r in meta["rubrics"]]
    assert {s: len(v) for s, v in splits.items()} == {"train": 200, "valid": 30, "test": 60}
    ids = []
    for recs in splits.values():
        for r in recs:
            assert list(r) == ["id", "prompt_id", "essay", "scores", "feedback"]
            assert re.fullmatch(r"synth-\d{5}", r["id"]) and r["prompt_id"] in prompt_ids
            assert list(r["scores"]) == names
            assert all(type(v) is int and 1 <= v <= 9 for v in r["scores"].values())
            for field in ("essay", "feedback"):
                assert r[field] and unicodedata.normalize("NFC", r[field]) == r[field]
            assert 45 <= len(r["essay"].split()) <= 130
            assert 1 <= len(re.findall(r"[.!?](?:\s|$)", r["feedback"])) <= 3
            ids.append(r["id"])
    assert len(ids) == len(set(ids))  # unique within and across splits
    for split in SPLITS:  # one JSON object per line, UTF-8, ensure_ascii=False layout
        for line in (DATA / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
            assert line == json.dumps(json.loads(line), ensure_ascii=False)


def test_scores_recomputable_from_text(splits: dict[str, list[dict]]) -> None:
    max_noise = max(abs(n) for n in lexicon.NOISE)
    assert max_noise == 1
    exact = total = 0
    for recs in splits.values():
        for r in recs:
            base = synthetic.score_from_measures(synthetic.measure_essay(r["essay"], r["prompt_id"]))
            for name, score in r["scores"].items():
                assert abs(score - base[name]) <= max_noise, (r["id"], name, score, base[name])
                exact += score == base[name]
                total += 1
    assert 0.35 < exact / total < 0.75  # noise is present but not dominant


def measures(**counts: int) -> dict[str, int]:
    """The cue counts score_from_measures reads: none found, one paragraph, overridden by ``counts``."""
    zero = dict.fromkeys(("has_position", "has_key_phrase", "off_topic_sentences", "topic_words", "example_markers",
                          "has_number", "depth_markers", "has_counterargument", "has_intro", "has_conclusion",
                          "transitions", "advanced_words", "misspellings"), 0)
    return {**zero, "paragraphs": 1, **counts}


RUBRIC_ORDER = ("task", "content_1", "content_2", "content_3", "organization_1", "organization_2", "expression_1",
                "expression_2")


@pytest.mark.parametrize("counts, expected", [
    # No cue at all: the floors, and 9 for spelling (no misspelling).
    ({}, (3, 1, 1, 1, 1, 1, 1, 9)),
    # Every cue at or past its cap: 3+3+3, _scale(5, 5) = 9, 1+3*2+2, 1+3+3+3-1; 7 misspellings count as 5.
    (dict(has_position=1, has_key_phrase=1, topic_words=5, example_markers=4, has_number=1, depth_markers=3,
          has_counterargument=1, has_intro=1, has_conclusion=1, paragraphs=6, transitions=5, advanced_words=5,
          misspellings=7), (9, 9, 9, 9, 9, 9, 9, 1)),
    # In between: task 3+3-2 = 4; content_1 = 1+floor(3.2+0.5) - 1 = 3; 1+3*min(3, 2) = 7; 1+3+2 = 6;
    # 1+3+2-1 = 5; transitions 1+floor(4.8+0.5) = 6; advanced 1+floor(1.6+0.5) = 3; spelling _scale(3, 5) = 6.
    (dict(has_position=1, off_topic_sentences=1, topic_words=2, example_markers=3, depth_markers=1,
          has_counterargument=1, has_intro=1, paragraphs=2, transitions=3, advanced_words=1, misspellings=2),
     (4, 3, 7, 6, 5, 6, 3, 6)),
    # Off-topic sentences push task (3-6) and content_1 (1-3) below the scale: clipped to 1.
    (dict(off_topic_sentences=3), (1, 1, 1, 1, 1, 1, 1, 9)),
])
def test_score_from_measures_by_hand(counts: dict, expected: tuple) -> None:
    scores = synthetic.score_from_measures(measures(**counts))
    assert tuple(scores[name] for name in RUBRIC_ORDER) == expected and len(scores) == len(RUBRIC_ORDER)


def test_cue_lists_do_not_collide() -> None:
    """A misspelling must never break another cue, and cue lists must not overlap."""
    phrases = [*lexicon.INTRO_OPENERS, *lexicon.CONCLUSION_OPENERS, *lexicon.POSITION_MARKERS,
               *lexicon.EXAMPLE_MARKERS, *lexicon.DEPTH_MARKERS, *lexicon.COUNTER_MARKERS,
               *lexicon.TRANSITIONS, *lexicon.ADVANCED_WORDS, *lexicon.OFF_TOPIC_WORDS]
    phrases += [w for p in lexicon.PROMPTS for w in [p["key"], *p["topic"]]]
    for key in lexicon.MISSPELLINGS:
        assert not any(synthetic.find_phrase(key, ph) for ph in phrases), key
    topic_sets = [set(p["topic"]) for p in lexicon.PROMPTS]
    assert all(not (a & b) for i, a in enumerate(topic_sets) for b in topic_sets[i + 1:])


def test_measure_essay_detects_cues() -> None:
    text = ("In this essay I discuss school uniforms. In my opinion, a dress code helps.\n\n"
            "However, for example, 30 poeple said bullying fell. This means that identity "
            "matters, a crucial point. My cat likes the sofa.\n\nIn conclusion, it works.")
    m = synthetic.measure_essay(text, "school_uniforms")
    assert (m["has_intro"], m["has_conclusion"], m["paragraphs"]) == (1, 1, 3)
    assert (m["has_position"], m["has_key_phrase"], m["off_topic_sentences"]) == (1, 1, 1)
    assert m["topic_found"] == ["dress code", "bullying", "identity"]
    assert (m["example_markers"], m["has_number"], m["depth_markers"]) == (1, 1, 1)
    assert (m["transitions"], m["advanced_words"], m["misspellings"]) == (1, 1, 1)


def test_score_spread(splits: dict[str, list[dict]]) -> None:
    for name in lexicon.RUBRIC_NAMES:
        assert len({r["scores"][name] for r in splits["train"]}) >= 5, name
    assert len({r["prompt_id"] for r in splits["train"]}) == len(lexicon.PROMPTS)


def test_ridge_baseline_learnable(meta: dict, splits: dict[str, list[dict]]) -> None:
    qwks = baseline.ridge_baseline(splits["train"], splits["test"], meta["rubrics"])
    assert set(qwks) == set(lexicon.RUBRIC_NAMES)
    mean = sum(qwks.values()) / len(qwks)
    assert mean >= 0.6, qwks
    assert min(qwks.values()) >= 0.5, qwks
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    assert f"**{mean:.3f}**" in readme  # the dataset card reports the same baseline
    for name, value in qwks.items():
        assert f"| `{name}` | {value:.3f} |" in readme, name

