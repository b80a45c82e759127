"""Data layer: validation errors, original records, subsampling, rendering and label masks."""
from __future__ import annotations

import json
import unicodedata
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from modules.data import (DataError, DatasetInfo, EssayRecord, Rubric, build_prompt, load_dataset_info, load_split,
                          load_splits, target_text)
from modules.encoding import ScoringCollator, encode_example, prompt_token_budget
from modules.losses import IGNORE_INDEX
from modules.score_lines import score_line

ROOT = Path(__file__).resolve().parents[1]
RUBRICS = [{"name": "content", "min": 0, "max": 30, "description": "ideas"},
           {"name": "style", "min": 1, "max": 9, "description": "voice"},
           {"name": "mechanics", "min": 1, "max": 9}]


def write_folder(tmp_path: Path, records: list, rubrics=RUBRICS, raw_lines: list[str] | None = None) -> Path:
    (tmp_path / "dataset.json").write_text(json.dumps({"name": "t", "language": "en", "rubrics": rubrics,
                                                       "prompts": [{"id": "p1", "text": "Describe patience."}]}))
    lines = raw_lines if raw_lines is not None else [json.dumps(r) for r in records]
    for split in ("train", "valid", "test"):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tmp_path


def record(i: int = 1, **overrides) -> dict:
    base = {"id": f"e{i}", "prompt_id": "p1", "essay": f"I waited for the bus number {i} patiently.",
            "scores": {"content": 12, "style": 7, "mechanics": 3}, "feedback": "Clear story; check commas."}
    base.update(overrides)
    return base


# --------------------------------------------------------------------------- validation

@pytest.mark.parametrize("line, field_text", [
    ('{"id": "e2", "essay": "x", "scores": {', "invalid JSON"),
    (json.dumps({"id": "e2", "essay": "text"}), "field 'scores': missing"),
    (json.dumps(record(2, scores={"content": 5, "style": 5})), "field 'scores.mechanics': missing"),
    (json.dumps(record(2, scores={"content": 5, "style": 5, "mechanics": 5, "voice": 2})), "field 'scores.voice': unknown rubric"),
    (json.dumps(record(2, scores={"content": 31, "style": 5, "mechanics": 5})), "field 'scores.content': score 31 outside 0-30"),
    (json.dumps(record(2, scores={"content": 3.5, "style": 5, "mechanics": 5})), "field 'scores.content': score 3.5 is not a non-negative integer"),
    (json.dumps(record(1)), "field 'id': duplicate id 'e1'"),
])
def test_bad_record_names_file_line_and_field(tmp_path, line, field_text):
    folder = write_folder(tmp_path, [], raw_lines=[json.dumps(record(1)), line])
    with pytest.raises(DataError) as err:
        load_split(folder / "train.jsonl")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{folder / 'train.jsonl'}:2:")
    assert field_text in message


def test_empty_split_and_missing_files(tmp_path):
    folder = write_folder(tmp_path, [], raw_lines=[""])
    with pytest.raises(DataError, match="train.jsonl: empty split"):
        load_split(folder / "train.jsonl")
    with pytest.raises(DataError, match="data folder not found"):
        load_splits(tmp_path / "nope")


def test_bad_dataset_json(tmp_path):
    (tmp_path / "dataset.json").write_text('{"rubrics": [{"name": "a", "min": 5, "max": 1}]}')
    with pytest.raises(DataError, match=r"dataset.json:1: field 'rubrics\[0\]': min 5 > max 1"):
        load_dataset_info(tmp_path)


@pytest.mark.parametrize("rubric, expected", [
    ({"name": "b", "min": -1, "max": 3}, "11: field 'rubrics[1].min': -1 is negative; scores must be integers >= 0"),
    ({"name": "b", "min": 0, "max": "9"}, "12: field 'rubrics[1].max': must be an integer, got '9'"),
    ({"name": "b", "max": 3}, "9: field 'rubrics[1].min': missing"),
])
def test_dataset_json_errors_name_the_line(tmp_path, rubric, expected):
    # Indented as people write it: the line is the one holding the field (or its rubric's "{"),
    # the second rubric's "{" being on line 9.
    text = json.dumps({"name": "t", "rubrics": [{"name": "a", "min": 0, "max": 3}, rubric]}, indent=2)
    (tmp_path / "dataset.json").write_text(text)
    with pytest.raises(DataError) as err:
        load_dataset_info(tmp_path)
    assert str(err.value).startswith(f"{tmp_path / 'dataset.json'}:{expected}")


def test_utf8_bom_crlf_and_bad_bytes(tmp_path):
    folder = write_folder(tmp_path, [record(1), record(2)])
    for name in ("dataset.json", "train.jsonl"):  # a BOM and CRLF line endings, as Windows editors save
        data = (folder / name).read_bytes().replace(b"\n", b"\r\n")
        (folder / name).write_bytes(b"\xef\xbb\xbf" + data)
    assert [r.id for r in load_split(folder / "train.jsonl")] == ["e1", "e2"]
    lines = (folder / "valid.jsonl").read_bytes().splitlines()
    lines[1] = lines[1].replace(b"bus", b"b\xe9s")  # a cp1252 byte in UTF-8 text
    (folder / "valid.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    column = lines[1].index(b"\xe9") + 1
    with pytest.raises(DataError) as err:
        load_split(folder / "valid.jsonl")
    assert str(err.value).startswith(f"{folder / 'valid.jsonl'}:2: byte 0xe9 at column {column} is not UTF-8")
    (folder / "test.jsonl").write_bytes(b"\xef\xbb\xbf{\"id\": \"\xff")  # the BOM is not a column
    with pytest.raises(DataError, match=r"test.jsonl:1: byte 0xff at column 9 is not UTF-8"):
        load_split(folder / "test.jsonl")


@pytest.mark.parametrize("prompt_id, expected", [
    ("p2", "field 'prompt_id': 'p2' is not a prompt id of dataset.json (its prompts: 'p1')"),
    (None, "field 'prompt_id': missing (its prompts: 'p1')"),
])
def test_record_prompt_id_must_name_a_prompt(tmp_path, prompt_id, expected):
    bad = record(2, prompt_id=prompt_id)
    if prompt_id is None:
        del bad["prompt_id"]
    folder = write_folder(tmp_path, [record(1), bad])
    with pytest.raises(DataError) as err:
        load_split(folder / "train.jsonl")
    assert str(err.value) == f"{folder / 'train.jsonl'}:2: {expected}"


def test_original_records_with_inferred_rubrics(tmp_path, caplog):
    lines = [json.dumps({"instruction": f"Rate essay {i}", "output": f"{i} 5 6 7\nGood work."}) for i in range(1, 4)]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    with caplog.at_level("WARNING"):
        records = load_split(tmp_path / "train.jsonl")
    assert "inferred 4 rubrics" in caplog.text
    assert [r.scores for r in records] == [(1, 5, 6, 7), (2, 5, 6, 7), (3, 5, 6, 7)]
    assert records[0].instruction == "Rate essay 1" and records[0].feedback == "Good work."
    bad = json.dumps({"instruction": "x", "output": "1 5 6 10"})
    (tmp_path / "valid.jsonl").write_text(lines[0] + "\n" + bad + "\n")
    with pytest.raises(DataError, match=r"valid.jsonl:2: field 'output\[3\]': score 10 outside 1-9"):
        load_split(tmp_path / "valid.jsonl")


def test_ratio_is_seeded_and_not_head_of_file(tmp_path):
    folder = write_folder(tmp_path, [record(i) for i in range(40)])
    first = load_split(folder / "train.jsonl", ratio=0.25, seed=3)
    again = load_split(folder / "train.jsonl", ratio=0.25, seed=3)
    other = load_split(folder / "train.jsonl", ratio=0.25, seed=4)
    assert len(first) == 10 and [r.id for r in first] == [r.id for r in again]
    assert [r.id for r in first] != [f"e{i}" for i in range(10)]
    assert [r.id for r in first] != [r.id for r in other]
    ids = [int(r.id[1:]) for r in first]
    assert ids == sorted(ids)  # file order kept
    info, splits = load_splits(folder, ratio=0.25, seed=3)
    assert len(splits["train"]) == 10 and len(splits["test"]) == 40


def test_text_is_nfc_normalised(tmp_path):
    decomposed = "Cafe\u0301 na\u0131\u0308ve"
    folder = write_folder(tmp_path, [record(1, essay=decomposed, feedback=decomposed)])
    rec = load_split(folder / "train.jsonl")[0]
    assert rec.essay == unicodedata.normalize("NFC", decomposed) != decomposed
    assert rec.feedback == rec.essay


def test_shipped_dataset_validates():
    info, splits = load_splits(ROOT / "aes_dataset_mtl")
    assert len(info.rubrics) == 8 and all((r.min, r.max) == (1, 9) for r in info.rubrics)
    assert all(len(splits[s]) > 0 for s in splits)
    assert all(r.feedback for r in splits["train"])


# --------------------------------------------------------------------------- masks

def sample_info() -> DatasetInfo:
    return DatasetInfo(tuple(Rubric(r["name"], r["min"], r["max"], r.get("description", "")) for r in RUBRICS),
                       {"p1": "Write about a time you were patient."})


def sample_records() -> list[EssayRecord]:
    return [EssayRecord("a", "p1", "I waited two hours in line, and then the doors opened.", (12, 7, 3),
                        "Vivid details; vary your sentences and check spelling."),
            EssayRecord("b", "p1", "Patience is hard. My sister taught me to wait.", (25, 9, 1),
                        "Good reflection, but the ending is abrupt.")]


def number_groups(tokenizer, ids: list[int], positions: list[int]) -> list[str]:
    """Re-assemble numbers from NTL positions: a token starting with a space, or not adjacent, starts a number."""
    groups: list[str] = []
    last = None
    for pos in positions:
        text = tokenizer.decode([ids[pos]])
        if last is None or pos != last + 1 or text[:1].isspace():
            groups.append("")
        groups[-1] += text.strip()
        last = pos
    return groups


def check_masks(tokenizer, prompt_format: str = "chat"):
    info = sample_info()
    for rec in sample_records():
        ex = encode_example(rec, info, tokenizer, mtl=True, prompt_format=prompt_format)
        ids, labels, ntl, emo = ex["input_ids"], ex["labels"], ex["ntl_labels"], ex["emo_labels"]
        assert len(ids) == len(labels) == len(ntl) == len(emo)
        prompt_ids = tokenizer(build_prompt(rec, info, tokenizer, True, prompt_format), add_special_tokens=False)["input_ids"]
        n_prompt = len(prompt_ids)
        # No prompt token is ever a label; the first label is the first target token.
        assert ids[:n_prompt] == list(prompt_ids)
        assert all(x == IGNORE_INDEX for x in labels[:n_prompt] + ntl[:n_prompt] + emo[:n_prompt])
        assert labels[n_prompt] != IGNORE_INDEX
        label_pos = [i for i, x in enumerate(labels) if x != IGNORE_INDEX]
        assert label_pos == list(range(n_prompt, len(ids)))
        assert all(labels[i] == ids[i] for i in label_pos)
        assert tokenizer.decode([ids[i] for i in label_pos]) == target_text(rec, True) + tokenizer.eos_token
        # NTL covers exactly the score numbers.
        ntl_pos = [i for i, x in enumerate(ntl) if x != IGNORE_INDEX]
        assert all(ntl[i] == ids[i] for i in ntl_pos)
        assert number_groups(tokenizer, ids, ntl_pos) == score_line(rec.scores).split()
        # EMO covers exactly the feedback.
        emo_pos = [i for i, x in enumerate(emo) if x != IGNORE_INDEX]
        assert emo_pos == list(range(emo_pos[0], emo_pos[-1] + 1))
        assert tokenizer.decode([ids[i] for i in emo_pos]).strip() == rec.feedback
        # Everything else in the target is separators or EOS.
        rest = [ids[i] for i in label_pos if i not in set(ntl_pos) | set(emo_pos)]
        assert tokenizer.decode(rest).replace(tokenizer.eos_token, "").strip() == ""
        without_mtl = encode_example(rec, info, tokenizer, mtl=False, prompt_format=prompt_format)
        assert all(x == IGNORE_INDEX for x in without_mtl["emo_labels"])
        assert tokenizer.decode([x for x in without_mtl["labels"] if x != IGNORE_INDEX]) == score_line(rec.scores) + tokenizer.eos_token


def test_masks_tiny_tokenizer(tiny_tokenizer):
    assert len(tiny_tokenizer.tokenize("12")) == 2  # single-digit number tokens
    check_masks(tiny_tokenizer, "chat")
    check_masks(tiny_tokenizer, "plain")


def test_masks_llama3_style_multi_digit_tokenizer(llama3_style_tokenizer):
    assert llama3_style_tokenizer.tokenize("12") == ["12"]  # multi-digit number tokens
    check_masks(llama3_style_tokenizer, "chat")
    check_masks(llama3_style_tokenizer, "plain")


def test_masks_smollm2_tokenizer(smollm2_tokenizer):
    check_masks(smollm2_tokenizer, "chat")


@pytest.mark.parametrize("tokenizer_name, system_block, user_marker, template_default", [
    # Llama-3's template has no system message of its own (and needs no download).
    ("llama3_style_tokenizer",
     "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou score essays.<|eot_id|>"
     "<|start_header_id|>user<|end_header_id|>\n\n", "<|start_header_id|>user", None),
    # SmolLM2's adds its own when none is given.
    ("smollm2_tokenizer", "<|im_start|>system\nYou score essays.<|im_end|>\n<|im_start|>user\n", "<|im_start|>user",
     "You are a helpful AI assistant named SmolLM"),
], ids=["llama3_style", "smollm2"])
def test_dataset_system_prompt_is_the_system_message(tmp_path, request, tokenizer_name, system_block, user_marker,
                                                     template_default):
    tokenizer = request.getfixturevalue(tokenizer_name)
    folder = write_folder(tmp_path, [record(1)])
    meta = json.loads((folder / "dataset.json").read_text())
    default_info, [rec] = load_dataset_info(folder), load_split(folder / "train.jsonl")
    assert default_info.system_prompt is None
    default = build_prompt(rec, default_info, tokenizer)
    if template_default:
        assert template_default in default
    else:
        assert "system" not in default
    (folder / "dataset.json").write_text(json.dumps({**meta, "system_prompt": "You score essays."}))
    info = load_dataset_info(folder)
    prompt = build_prompt(rec, info, tokenizer)
    assert prompt.startswith(system_block) and prompt.count("You score essays.") == 1
    assert prompt.split(user_marker)[1] == default.split(user_marker)[1]  # the same user turn
    if template_default:
        assert template_default not in prompt
        assert len(tokenizer(prompt)["input_ids"]) < len(tokenizer(default)["input_ids"]) - 10
    # The training example holds the same prompt as scoring.
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert encode_example(rec, info, tokenizer)["input_ids"][:len(prompt_ids)] == prompt_ids
    assert build_prompt(rec, info, tokenizer, prompt_format="plain") == \
        build_prompt(rec, default_info, tokenizer, prompt_format="plain")  # plain has no system message


def test_dataset_system_prompt_must_be_a_string(tmp_path):
    folder = write_folder(tmp_path, [record(1)])
    meta = json.loads((folder / "dataset.json").read_text())
    (folder / "dataset.json").write_text(json.dumps({**meta, "system_prompt": 3}, indent=2))
    with pytest.raises(DataError, match=r"dataset.json:\d+: field 'system_prompt': must be a string, got 3"):
        load_dataset_info(folder)


def test_truncation_shortens_the_essay_not_the_target(tiny_tokenizer):
    info, rec = sample_info(), sample_records()[0]
    long = EssayRecord(rec.id, rec.prompt_id, " ".join([rec.essay] * 40), rec.scores, rec.feedback)
    full = encode_example(long, info, tiny_tokenizer, mtl=True)
    cut = encode_example(long, info, tiny_tokenizer, mtl=True, max_seq_length=len(full["input_ids"]) // 2)
    assert len(cut["input_ids"]) <= len(full["input_ids"]) // 2
    target = lambda ex: [x for x in ex["labels"] if x != IGNORE_INDEX]
    assert target(cut) == target(full)


@pytest.mark.parametrize("tokenizer_name, max_seq_length", [("tiny_tokenizer", 160), ("llama3_style_tokenizer", 480)])
def test_long_essay_scoring_prompt_is_the_training_prompt(request, tokenizer_name, max_seq_length):
    tokenizer = request.getfixturevalue(tokenizer_name)
    info, records = sample_info(), sample_records()
    long = EssayRecord("long", "p1", " ".join([records[0].essay] * 60), records[0].scores, records[0].feedback)
    for mtl in (False, True):
        budget = prompt_token_budget(records, tokenizer, mtl, max_seq_length)
        example = encode_example(long, info, tokenizer, mtl=mtl, max_seq_length=max_seq_length,
                                 max_prompt_tokens=budget)
        trained = [i for i, label in zip(example["input_ids"], example["labels"]) if label == IGNORE_INDEX]
        scored = tokenizer(build_prompt(long, info, tokenizer, mtl, max_prompt_tokens=budget),
                           add_special_tokens=False)["input_ids"]
        assert scored == trained and budget - 5 <= len(trained) <= budget < max_seq_length
        whole = tokenizer(build_prompt(long, info, tokenizer, mtl), add_special_tokens=False)["input_ids"]
        assert len(whole) > 2 * max_seq_length and whole[:20] == trained[:20]
        # The budget comes from the training targets, not from the essay being scored.
        assert budget == max_seq_length - max(len(tokenizer(target_text(r, mtl), add_special_tokens=False)["input_ids"]) + 1
                                   for r in records)


def test_cutting_a_byte_level_essay_mid_character_converges(tiny_tokenizer):
    # The tiny tokenizer spells Hangul in byte tokens: a cut inside a character decodes to U+FFFD,
    # which re-encodes to the bytes that were cut; the cut must still shorten the essay.
    info, rec = sample_info(), sample_records()[0]
    korean = replace(rec, essay="학교 교복은 학생들 사이의 차별을 줄이고 소속감을 높인다고 생각합니다. " * 8)
    short_prompt = len(tiny_tokenizer(build_prompt(replace(rec, essay=""), info, tiny_tokenizer),
                                      add_special_tokens=False)["input_ids"])
    for budget in range(short_prompt + 5, short_prompt + 60, 7):
        prompt = build_prompt(korean, info, tiny_tokenizer, max_prompt_tokens=budget)
        assert budget - 4 <= len(tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"]) <= budget
        assert "\ufffd" not in prompt and "Essay:\n학" in prompt


def test_collator_pads_and_masks(tiny_tokenizer):
    info = sample_info()
    feats = [encode_example(r, info, tiny_tokenizer, mtl=True) for r in sample_records()]
    width = max(len(f["input_ids"]) for f in feats)
    assert len(feats[0]["input_ids"]) != len(feats[1]["input_ids"])
    for side in ("left", "right"):
        batch = ScoringCollator(tiny_tokenizer.pad_token_id, side)(feats)
        assert set(batch) == {"input_ids", "attention_mask", "labels", "ntl_labels", "emo_labels"}
        assert all(t.shape == (2, width) and t.dtype == torch.long for t in batch.values())
        for row, f in enumerate(feats):
            n = len(f["input_ids"])
            real = slice(width - n, width) if side == "left" else slice(0, n)
            pad = slice(0, width - n) if side == "left" else slice(n, width)
            assert batch["attention_mask"][row].sum() == n and batch["attention_mask"][row, real].all()
            assert batch["input_ids"][row, real].tolist() == f["input_ids"]
            assert (batch["input_ids"][row, pad] == tiny_tokenizer.pad_token_id).all()
            for key in ("labels", "ntl_labels", "emo_labels"):
                assert batch[key][row, real].tolist() == f[key]
                assert (batch[key][row, pad] == IGNORE_INDEX).all()
