"""Tests for helpers.data: label recipes, bad input, splits, the command line and prompts.

The tokenizer is the embedded gemma-3-270m one (pad '<pad>' id 0, eos '<eos>' id 1, bos id 2). No model
weights are loaded. The shipped data files are not tested here.
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from helpers.data import (
    IGNORE_INDEX,
    DataError,
    DataReport,
    encode_example,
    format_answer,
    format_prompt,
    full_text,
    inspect_labels,
    label_stats,
    load_instructions,
    make_collator,
    prepare_tokenizer,
    read_rows,
    validate_rows,
)
from helpers.recipes import blog_recipe

PROJECT_ROOT = Path(__file__).resolve().parents[1]
BIG = 100_000  # a max_length no generated row reaches

# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def base_tok():
    """The gemma-3-270m tokenizer as loaded; tests must not mutate it (deep-copy first)."""
    from helpers.models import load_tokenizer

    tok = load_tokenizer("embedded", verbose=False)
    assert tok.pad_token_id == 0 and tok.eos_token_id == 1
    return tok


@pytest.fixture(scope="session")
def answer_only_tok(base_tok):
    tok = copy.deepcopy(base_tok)
    added = prepare_tokenizer(tok, "answer_only")
    assert added is False  # gemma already has a real pad token
    return tok


@pytest.fixture(scope="session")
def blog_tok(base_tok):
    tok = copy.deepcopy(base_tok)
    with pytest.warns(UserWarning, match="pad_token = eos_token.*never learns to stop"):
        assert prepare_tokenizer(tok, "blog") is False
    return tok


@pytest.fixture(scope="session")
def special_texts(base_tok):
    """Strings that the tokenizer turns into special tokens when they appear in text."""
    return [t for t in base_tok.get_added_vocab() if t.strip()] + list(base_tok.all_special_tokens)


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def good_rows(n: int, prefix: str = "질문") -> list[dict]:
    return [{"instruction": f"{prefix} {i}번: 한국의 수도는?", "output": f"답 {i}: 서울입니다."} for i in range(n)]


def problems_of(report: DataReport) -> set[tuple[int, str, str]]:
    return {(p.row, p.field, p.kind) for p in report.problems}


# ------------------------------------------------------------------------------------------- strategies

_korean = st.characters(min_codepoint=0xAC00, max_codepoint=0xD7A3)
_ascii = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
_text = st.text(alphabet=st.one_of(_korean, _ascii, st.just("\n")), min_size=1, max_size=40).filter(
    lambda s: s.strip())
_row = st.builds(
    lambda instruction, output, context: {"instruction": instruction.strip(), "output": output.strip(),
                                          "context": context.strip() if context else ""},
    _text, _text, st.one_of(st.none(), _text))

HYP = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _clean(row, special_texts) -> bool:
    """Keep generated text free of literal special-token strings (tested separately below)."""
    return not any(s in row[k] for k in ("instruction", "output", "context") for s in special_texts)


# ------------------------------------------------------------------------------------------- 1. label recipes


@HYP
@given(row=_row)
def test_answer_only_labels_train_answer_and_one_final_eos(row, answer_only_tok, special_texts):
    assume(_clean(row, special_texts))
    tok = answer_only_tok
    prompt_ids = tok(format_prompt(row["instruction"], row["context"], tok))["input_ids"]
    n_prompt = len(prompt_ids)
    enc = encode_example(row, tok, "answer_only", max_length=BIG)
    ids, labels = enc["input_ids"], enc["labels"]

    assert len(ids) == len(labels) == len(enc["attention_mask"])
    assert enc["attention_mask"] == [1] * len(ids)
    assert ids[:n_prompt] == prompt_ids
    trained = [i for i, lab in enumerate(labels) if lab != IGNORE_INDEX]
    # nothing in the prompt is trained, and the answer starts right after it
    assert trained and min(trained) >= n_prompt
    assert all(lab == IGNORE_INDEX for lab in labels[:n_prompt])
    # trained labels are the input ids themselves (the model shifts them)
    assert all(labels[i] == ids[i] for i in trained)
    # exactly one trained EOS, at the very end
    eos_positions = [i for i in trained if labels[i] == tok.eos_token_id]
    assert eos_positions == [len(ids) - 1]
    # the answer tokens between prompt and EOS decode back to the answer text
    assert tok.decode(ids[n_prompt:-1]) == format_answer(row["output"])


@HYP
@given(rows=st.lists(_row, min_size=2, max_size=5))
def test_answer_only_labels_collated_batch(rows, answer_only_tok, special_texts):
    assume(all(_clean(r, special_texts) for r in rows))
    tok = answer_only_tok
    features = [encode_example(r, tok, "answer_only", max_length=BIG) for r in rows]
    lengths = [len(f["input_ids"]) for f in features]
    batch = make_collator(tok, "answer_only")(features)
    stats = label_stats(batch, tok)

    assert stats["examples"] == len(rows)
    assert stats["trained_eos_per_example"] == [1] * len(rows)
    assert stats["trained_eos"] == len(rows)
    assert stats["real_tokens"] == sum(lengths)
    assert batch["input_ids"].shape == (len(rows), max(lengths))
    pad = batch["attention_mask"] == 0
    assert int(pad.sum()) == len(rows) * max(lengths) - sum(lengths)
    assert tok.pad_token_id != tok.eos_token_id
    assert bool((batch["labels"][pad] == IGNORE_INDEX).all())
    assert bool((batch["input_ids"][pad] == tok.pad_token_id).all())
    # right padding: each row's real tokens come first and are unchanged
    for i, f in enumerate(features):
        assert batch["input_ids"][i, : lengths[i]].tolist() == f["input_ids"]
        assert batch["labels"][i, : lengths[i]].tolist() == f["labels"]


def test_answer_only_labels_truncated_row_loses_its_eos(answer_only_tok):
    row = {"instruction": "긴 답을 써 주세요", "output": "가나다라마바사 " * 40}
    full = encode_example(row, answer_only_tok, "answer_only", max_length=BIG)
    enc = encode_example(row, answer_only_tok, "answer_only", max_length=20)
    assert len(full["input_ids"]) > 20
    assert len(enc["input_ids"]) == len(enc["labels"]) == 20
    assert enc["input_ids"] == full["input_ids"][:20]
    assert answer_only_tok.eos_token_id not in enc["labels"]


def test_answer_only_labels_literal_eos_text_in_output_is_not_a_stop(answer_only_tok):
    row = {"instruction": "토큰 설명", "output": "문장 끝에는 <eos> 토큰이 붙습니다"}
    enc = encode_example(row, answer_only_tok, "answer_only", max_length=BIG)
    assert enc["labels"].count(answer_only_tok.eos_token_id) == 1


def test_prepare_tokenizer_answer_only_keeps_real_pad(answer_only_tok):
    assert answer_only_tok.pad_token == "<pad>" and answer_only_tok.pad_token_id == 0
    assert answer_only_tok.padding_side == "right"


@pytest.mark.parametrize("pad", ["none", "eos"])
def test_answer_only_labels_add_no_token_and_mask_padding_by_position(base_tok, pad):
    # Before: prepare_tokenizer added "<|pad|>" and returned True, so the caller had to resize the embeddings.
    tok = copy.deepcopy(base_tok)
    tok.pad_token = None if pad == "none" else tok.eos_token
    n_before = len(tok)
    assert prepare_tokenizer(tok, "answer_only") is False
    assert len(tok) == n_before
    assert tok.pad_token_id == tok.eos_token_id  # no pad of its own: the EOS pads, masked by position
    rows = [{"instruction": "짧은 질문", "output": "네."},
            {"instruction": "조금 더 긴 질문입니다", "output": "대한민국의 수도는 서울이고 인구는 약 950만 명입니다."}]
    features = [encode_example(r, tok, "answer_only", max_length=BIG) for r in rows]
    lengths = [len(f["input_ids"]) for f in features]
    assert lengths[0] < lengths[1]
    batch = make_collator(tok, "answer_only")(features)
    for i, n in enumerate(lengths):
        assert batch["labels"][i, n - 1].item() == tok.eos_token_id  # each answer's own EOS is trained
        assert batch["attention_mask"][i, :n].tolist() == [1] * n
        assert batch["attention_mask"][i, n:].tolist() == [0] * (max(lengths) - n)
        assert batch["labels"][i, n:].tolist() == [IGNORE_INDEX] * (max(lengths) - n)
    assert label_stats(batch, tok)["trained_eos_per_example"] == [1, 1]


def test_prepare_tokenizer_unknown_recipe(base_tok):
    with pytest.raises(ValueError, match="unknown label recipe 'everything'; choose one of 'blog', 'answer_only'"):
        prepare_tokenizer(base_tok, "everything")  # raises before touching the tokenizer
    assert base_tok.pad_token == "<pad>"


@pytest.mark.parametrize("old, new", [("seed", "blog"), ("fixed", "answer_only")])
def test_the_old_label_recipe_names_say_the_new_ones(base_tok, old, new):
    for call in (lambda: prepare_tokenizer(base_tok, old), lambda: encode_example({"text": "가"}, base_tok, old),
                 lambda: make_collator(base_tok, old), lambda: blog_recipe(labels=old)):
        with pytest.raises(ValueError, match=f"label recipe '{old}' is now called '{new}'"):
            call()
    assert base_tok.pad_token == "<pad>"


def test_prepare_tokenizer_blog_sets_pad_to_eos(blog_tok):
    # the warning itself is asserted with pytest.warns in the blog_tok fixture
    assert blog_tok.pad_token_id == blog_tok.eos_token_id == 1
    assert blog_tok.padding_side == "right"


@HYP
@given(rows=st.lists(_row, min_size=2, max_size=5))
def test_blog_labels_mask_every_eos(rows, blog_tok, special_texts):
    assume(all(_clean(r, special_texts) for r in rows))
    tok = blog_tok
    features = [encode_example(r, tok, "blog", max_length=BIG) for r in rows]
    assert all("labels" not in f for f in features)
    assert all(f["input_ids"][-1] == tok.eos_token_id for f in features)
    with pytest.warns(UserWarning, match="mask every EOS"):
        collator = make_collator(tok, "blog")
    batch = collator(features)
    stats = label_stats(batch, tok)
    # the inputs hold every row's EOS ...
    assert int((batch["input_ids"] == tok.eos_token_id).sum()) >= len(rows)
    # ... but none of them is ever a training target
    assert stats["trained_eos"] == 0
    assert stats["trained_eos_per_example"] == [0] * len(rows)
    assert bool((batch["labels"] != tok.eos_token_id).all())


@HYP
@given(rows=st.lists(_row, min_size=2, max_size=4), example=st.integers(min_value=0, max_value=3))
def test_inspect_labels_one_row_per_token(rows, example, answer_only_tok, special_texts):
    assume(all(_clean(r, special_texts) for r in rows))
    example = example % len(rows)
    tok = answer_only_tok
    batch = make_collator(tok, "answer_only")([encode_example(r, tok, "answer_only", max_length=BIG) for r in rows])
    frame = inspect_labels(batch, tok, example=example)
    ids = batch["input_ids"][example].tolist()
    labels = batch["labels"][example].tolist()
    assert isinstance(frame, pd.DataFrame)
    assert len(frame) == len(ids) == batch["input_ids"].shape[1]
    assert frame["id"].tolist() == ids
    assert frame["label"].tolist() == labels
    assert frame["trained"].tolist() == [lab != IGNORE_INDEX for lab in labels]
    assert frame["padding"].tolist() == [m == 0 for m in batch["attention_mask"][example].tolist()]
    assert frame["token"].tolist() == tok.convert_ids_to_tokens(ids)
    assert int(frame["trained"].sum()) == int((batch["labels"][example] != IGNORE_INDEX).sum())


# ------------------------------------------------------------------------------------------- 2. bad input


@pytest.fixture
def messy_jsonl(tmp_path):
    """A JSON Lines file with one problem of each kind, between usable rows."""
    good = good_rows(4)
    lines = [
        json.dumps(good[0], ensure_ascii=False).encode(),                            # 1 ok
        json.dumps({"instruction": "출력이 없는 행"}, ensure_ascii=False).encode(),      # 2 missing output
        json.dumps({"instruction": "   ", "output": "답"}, ensure_ascii=False).encode(),  # 3 empty instruction
        json.dumps({"instruction": "숫자 답", "output": 42}, ensure_ascii=False).encode(),  # 4 wrong type
        json.dumps(["instruction", "output"]).encode(),                               # 5 row is a list
        b'{"instruction": "\xea\xb9\xa8\xec\xa7\x84", "output": ',                     # 6 invalid JSON
        b'{"instruction": "\xff\xfe", "output": "x"}',                                # 7 undecodable
        json.dumps(good[1], ensure_ascii=False).encode(),                            # 8 ok
        json.dumps(good[0], ensure_ascii=False).encode(),                            # 9 duplicate of 1
        b"",                                                                          # 10 blank, skipped
        json.dumps({**good[2], "context": "맥락 문단"}, ensure_ascii=False).encode(),     # 11 ok, context
        json.dumps({**good[3], "context": 7}, ensure_ascii=False).encode(),           # 12 wrong type context
        json.dumps({"instruction": None, "output": "답"}, ensure_ascii=False).encode(),  # 13 null = missing
        json.dumps({**good[3], "url": "https://example.com"}, ensure_ascii=False).encode(),  # 14 ok
    ]
    path = tmp_path / "messy.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


MESSY_PROBLEMS = {
    (2, "output", "missing"),
    (3, "instruction", "empty"),
    (4, "output", "wrong_type"),
    (5, "*", "wrong_type"),
    (6, "*", "invalid_json"),
    (7, "*", "undecodable"),
    (9, "instruction", "duplicate"),
    (12, "context", "wrong_type"),
    (13, "instruction", "missing"),
}
MESSY_KEPT = [1, 8, 11, 14]


def test_each_problem_reported_by_row_and_field(messy_jsonl):
    report = DataReport(str(messy_jsonl))
    kept = validate_rows(read_rows(str(messy_jsonl), report=report), report)
    assert problems_of(report) == MESSY_PROBLEMS
    assert len(report.problems) == len(MESSY_PROBLEMS)
    assert [r["row"] for r in kept] == MESSY_KEPT
    assert report.rows_kept == len(MESSY_KEPT)
    by_row = {p.row: p for p in report.problems}
    assert "int" in by_row[4].detail
    assert "list" in by_row[5].detail
    assert "not UTF-8" in by_row[7].detail
    assert by_row[9].detail == "same as row 1"
    assert report.counts() == {"missing": 2, "empty": 1, "wrong_type": 3, "invalid_json": 1,
                               "undecodable": 1, "duplicate": 1}
    text = report.text()
    for row, field, kind in MESSY_PROBLEMS:
        assert f"row {row} field {field}: {kind}" in text


def test_kept_rows_are_clean(messy_jsonl):
    report = DataReport(str(messy_jsonl))
    kept = {r["row"]: r for r in validate_rows(read_rows(str(messy_jsonl), report=report), report)}
    assert kept[11]["context"] == "맥락 문단"
    assert kept[1]["context"] == "" and kept[1]["url"] == ""
    assert kept[14]["url"] == "https://example.com"
    assert all(set(r) == {"instruction", "output", "context", "url", "row"} for r in kept.values())


def test_load_instructions_keeps_all_usable_rows(messy_jsonl):
    data, report = load_instructions(str(messy_jsonl), eval_fraction=0.25, verbose=False)
    assert report.rows_kept == len(MESSY_KEPT)
    assert sorted(list(data["train"]["row"]) + list(data["eval"]["row"])) == MESSY_KEPT
    assert problems_of(report) == MESSY_PROBLEMS


def test_whitespace_only_difference_is_a_duplicate_but_other_context_is_not(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"instruction": "같은 질문", "output": "같은 답"},
        {"instruction": "  같은 질문 ", "output": "같은 답\n"},
        {"instruction": "같은 질문", "output": "같은 답", "context": "다른 맥락"},
    ])
    report = DataReport(str(path))
    kept = validate_rows(read_rows(str(path), report=report), report)
    assert [r["row"] for r in kept] == [1, 3]
    assert problems_of(report) == {(2, "instruction", "duplicate")}
    assert report.problems[0].detail == "same as row 1"


@pytest.fixture
def long_row_file(tmp_path):
    rows = good_rows(3)
    rows.insert(1, {"instruction": "아주 긴 답", "output": "대한민국의 역사와 문화 " * 60})
    return write_jsonl(tmp_path / "long.jsonl", rows)


def test_too_long_truncate_keeps_and_counts(long_row_file, base_tok):
    data, report = load_instructions(str(long_row_file), tokenizer=base_tok, max_length=64, too_long="truncate",
                                     verbose=False)
    assert report.rows_kept == 4
    assert report.truncated == 1
    assert problems_of(report) == {(2, "output", "too_long")}
    assert "> 64 (truncate)" in report.problems[0].detail
    assert 2 in list(data["train"]["row"]) + list(data["eval"]["row"])


def test_too_long_drop_removes_the_row(long_row_file, base_tok):
    data, report = load_instructions(str(long_row_file), tokenizer=base_tok, max_length=64, too_long="drop",
                                     verbose=False)
    assert report.rows_kept == 3
    assert report.truncated == 0
    assert problems_of(report) == {(2, "output", "too_long")}
    assert sorted(list(data["train"]["row"]) + list(data["eval"]["row"])) == [1, 3, 4]


def test_too_long_refuse_raises(long_row_file, base_tok):
    with pytest.raises(DataError, match=r"row 2 is \d+ tokens, longer than max_length 64"):
        load_instructions(str(long_row_file), tokenizer=base_tok, max_length=64, too_long="refuse", verbose=False)


def test_too_long_length_counts_prompt_and_eos(base_tok, tmp_path):
    row = {"instruction": "질문", "output": "답입니다"}
    n = len(base_tok(full_text({**row, "context": ""}, base_tok))["input_ids"]) + 1
    path = write_jsonl(tmp_path / "one.jsonl", [row, {"instruction": "둘째", "output": "답"}])
    _, fits = load_instructions(str(path), tokenizer=base_tok, max_length=n, too_long="refuse", verbose=False)
    assert fits.truncated == 0 and fits.rows_kept == 2
    with pytest.raises(DataError, match="row 1"):
        load_instructions(str(path), tokenizer=base_tok, max_length=n - 1, too_long="refuse", verbose=False)


def test_unknown_too_long_action(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", good_rows(2))
    with pytest.raises(ValueError, match="too_long must be one of"):
        load_instructions(str(path), too_long="skip", verbose=False)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        load_instructions(str(tmp_path / "nope.jsonl"), verbose=False)
    with pytest.raises(DataError, match="not a hub id"):
        load_instructions(str(tmp_path / "nope"), verbose=False)


def test_unsupported_extension(tmp_path):
    path = tmp_path / "rows.txt"
    path.write_text('{"instruction": "a", "output": "b"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"unsupported data file .*\.jsonl, \.json, \.csv or \.parquet"):
        load_instructions(str(path), verbose=False)


def test_no_usable_row(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"instruction": "a"}\n[1, 2]\nnot json\n{"instruction": "b", "output": ""}\n')
    with pytest.raises(DataError, match="no usable rows") as info:
        load_instructions(str(path), verbose=False)
    message = str(info.value)
    for line in ("row 1 field output: missing", "row 2 field *: wrong_type", "row 3 field *: invalid_json",
                 "row 4 field output: empty"):
        assert line in message


def test_csv_without_instruction_column(tmp_path):
    path = tmp_path / "q.csv"
    pd.DataFrame({"question": ["a", "b"], "output": ["x", "y"]}).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"has no column \['instruction'\].*need columns instruction, output"):
        load_instructions(str(path), verbose=False)


def test_csv_loads(tmp_path):
    path = tmp_path / "rows.csv"
    pd.DataFrame({
        "instruction": ["김치 만드는 법?", "서울의 인구는?", "빈 답", "세종대왕은?"],
        "output": ["배추를 절인다.", "약 950만 명.", "", "한글을 만들었다."],
        "context": ["", "2020년 기준", "", ""],
        "url": ["", "", "", "https://ko.wikipedia.org"],
    }).to_csv(path, index=False)
    data, report = load_instructions(str(path), eval_fraction=0.25, verbose=False)
    rows = {r["row"]: r for r in list(data["train"]) + list(data["eval"])}
    assert sorted(rows) == [1, 2, 4]
    assert report.rows_kept == 3
    assert problems_of(report) == {(3, "output", "empty")}
    assert rows[2]["context"] == "2020년 기준"
    assert rows[1]["context"] == ""
    assert rows[4]["url"] == "https://ko.wikipedia.org"


def test_parquet_loads(tmp_path):
    path = tmp_path / "rows.parquet"
    pd.DataFrame({
        "instruction": ["김치 만드는 법?", "서울의 인구는?", "세종대왕은?"],
        "output": ["배추를 절인다.", "약 950만 명.", "한글을 만들었다."],
        "context": [None, "2020년 기준", None],
    }).to_parquet(path)
    data, report = load_instructions(str(path), eval_fraction=0.34, verbose=False)
    rows = {r["row"]: r for r in list(data["train"]) + list(data["eval"])}
    assert sorted(rows) == [1, 2, 3]
    assert report.problems == []
    assert rows[2]["context"] == "2020년 기준"
    assert rows[1]["context"] == "" and rows[3]["context"] == ""
    assert rows[3]["output"] == "한글을 만들었다."


def test_parquet_wrong_type_reported(tmp_path):
    path = tmp_path / "nums.parquet"
    pd.DataFrame({"instruction": ["a", "b"], "output": [1, 2]}).to_parquet(path)
    report = DataReport(str(path))
    validate_rows(read_rows(str(path), report=report), report)
    assert problems_of(report) == {(1, "output", "wrong_type"), (2, "output", "wrong_type")}


def test_parquet_null_required_cell_is_missing(tmp_path):
    path = tmp_path / "nulls.parquet"
    pd.DataFrame({"instruction": ["a", "b"], "output": ["x", None]}).to_parquet(path)
    report = DataReport(str(path))
    kept = validate_rows(read_rows(str(path), report=report), report)
    assert [r["row"] for r in kept] == [1]
    assert problems_of(report) == {(2, "output", "missing")}


def test_upper_case_csv_suffix_loads(tmp_path):
    path = tmp_path / "rows.CSV"
    pd.DataFrame({"instruction": ["a", "b"], "output": ["x", "y"]}).to_csv(path, index=False)
    _, report = load_instructions(str(path), verbose=False)
    assert report.rows_kept == 2


def test_json_array_loads(tmp_path):
    path = tmp_path / "rows.json"
    records = good_rows(3) + [{"instruction": "답 없음"}]
    path.write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    data, report = load_instructions(str(path), eval_fraction=0.34, verbose=False)
    assert report.rows_kept == 3
    assert problems_of(report) == {(4, "output", "missing")}
    assert sorted(list(data["train"]["row"]) + list(data["eval"]["row"])) == [1, 2, 3]
    assert sorted(list(data["train"]["instruction"]) + list(data["eval"]["instruction"])) == \
        sorted(r["instruction"] for r in good_rows(3))


def test_json_file_holding_json_lines_loads(tmp_path):
    path = write_jsonl(tmp_path / "lines.json", good_rows(3))
    _, report = load_instructions(str(path), verbose=False)
    assert report.rows_kept == 3


def test_truncated_json_array_keeps_its_rows(tmp_path):
    # Before: the whole file was refused ("not valid JSON").
    path = tmp_path / "broken.json"
    path.write_text('[{"instruction": "a", "output": "b"},\n', encoding="utf-8")
    _, report = load_instructions(str(path), verbose=False)
    assert report.rows_kept == 1
    assert problems_of(report) == {(2, "*", "invalid_json")}
    assert "ends at line 2 before the closing ]" in report.problems[0].detail


# ------------------------------------------------------------------------------------------- 3. splits


@pytest.fixture
def split_file(tmp_path):
    return write_jsonl(tmp_path / "split.jsonl", good_rows(25))


def _eval_rows(path, seed, fraction=0.2):
    data, _ = load_instructions(str(path), eval_fraction=fraction, seed=seed, verbose=False)
    return list(data["eval"]["row"])


def test_split_same_seed_same_eval(split_file):
    assert _eval_rows(split_file, seed=7) == _eval_rows(split_file, seed=7)


def test_split_different_seed_different_eval(split_file):
    assert _eval_rows(split_file, seed=1) != _eval_rows(split_file, seed=2)


@pytest.mark.parametrize("n_rows, fraction, n_eval", [
    (25, 0.2, 5),
    (10, 0.1, 1),
    (9, 0.3, 3),     # 2.7 rounds up
    (30, 0.33, 10),  # 9.9 rounds up
    (20, 0.12, 2),   # 2.4 rounds down
    (4, 0.1, 1),     # at least one eval row
])
def test_split_sizes(tmp_path, n_rows, fraction, n_eval):
    path = write_jsonl(tmp_path / "s.jsonl", good_rows(n_rows))
    data, report = load_instructions(str(path), eval_fraction=fraction, seed=3, verbose=False)
    train, evals = list(data["train"]["row"]), list(data["eval"]["row"])
    assert len(evals) == n_eval
    assert len(train) == n_rows - n_eval
    assert not set(train) & set(evals)
    assert sorted(train + evals) == list(range(1, n_rows + 1))
    assert report.rows_kept == n_rows


def test_split_over_kept_rows_only(messy_jsonl):
    data, _ = load_instructions(str(messy_jsonl), eval_fraction=0.5, seed=11, verbose=False)
    train, evals = list(data["train"]["row"]), list(data["eval"]["row"])
    assert len(evals) == 2
    assert not set(train) & set(evals)
    assert sorted(train + evals) == MESSY_KEPT


def test_max_rows_caps_each_split(split_file):
    data, report = load_instructions(str(split_file), eval_fraction=0.2, max_rows=3, verbose=False)
    assert len(data["train"]) == 3 and len(data["eval"]) == 3
    assert report.rows_kept == 25


# ------------------------------------------------------------------------------------------- 4. command line


def _check(*args):
    return subprocess.run([sys.executable, "-m", "helpers.data", "check", *map(str, args)], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=300)


def test_cli_check_reports_each_problem(messy_jsonl):
    result = _check(messy_jsonl)
    assert result.returncode == 0, result.stderr
    assert f"{len(MESSY_KEPT)} kept" in result.stdout
    for row, field, kind in MESSY_PROBLEMS:
        assert f"row {row} field {field}: {kind}" in result.stdout


def test_cli_check_json(messy_jsonl):
    result = _check(messy_jsonl, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["rows_kept"] == len(MESSY_KEPT)
    assert {(p["row"], p["field"], p["kind"]) for p in report["problems"]} == MESSY_PROBLEMS


def test_cli_check_missing_file(tmp_path):
    result = _check(tmp_path / "absent.jsonl")
    assert result.returncode != 0
    assert "cannot use" in result.stderr and "not found" in result.stderr
    assert result.stdout == ""


def test_cli_check_no_usable_row(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"instruction": "a"}\n{"output": "b"}\n')
    result = _check(path)
    assert result.returncode != 0
    assert "no usable rows" in result.stderr
    assert "row 1 field output: missing" in result.stderr
    assert "row 2 field instruction: missing" in result.stderr


# ------------------------------------------------------------------------------------------- 5. prompts


def test_koalpaca_prompt_without_context():
    assert format_prompt("한국의 수도는?") == "### 질문: 한국의 수도는?\n\n### 답변:"
    assert format_prompt("한국의 수도는?", context="") == "### 질문: 한국의 수도는?\n\n### 답변:"


def test_koalpaca_prompt_with_context():
    text = format_prompt("인구는?", context="서울은 한국의 수도다.")
    assert text.startswith("### 맥락: ")
    assert text == "### 맥락: 서울은 한국의 수도다.\n\n### 질문: 인구는?\n\n### 답변:"


def test_braces_in_text_are_not_format_fields():
    assert format_prompt("{context} {0} {instruction}", context="{x}") == \
        "### 맥락: {x}\n\n### 질문: {context} {0} {instruction}\n\n### 답변:"
    assert format_answer("{output}") == " {output}"


def test_full_text_is_prompt_plus_answer(base_tok):
    row = {"instruction": "질문", "output": "답", "context": "맥락"}
    assert full_text(row, base_tok) == "### 맥락: 맥락\n\n### 질문: 질문\n\n### 답변: 답"
    assert full_text({"instruction": "질문", "output": "답"}, base_tok) == "### 질문: 질문\n\n### 답변: 답"


def test_special_tokens_template():
    assert format_prompt("질문", template="special_tokens") == "<|prompt|>질문<|assistant|>"
    assert format_answer("답", template="special_tokens") == "답<|endofanswer|>"


def test_chat_template_needs_a_tokenizer_with_one(base_tok):
    with pytest.raises(ValueError, match="chat template"):
        format_prompt("질문", template="chat")
    if base_tok.chat_template:
        pytest.skip("this tokenizer has a chat template")
    with pytest.raises(ValueError, match="chat template"):
        format_prompt("질문", tokenizer=base_tok, template="chat")
