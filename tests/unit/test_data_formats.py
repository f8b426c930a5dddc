"""Tests for the row shapes and file encodings of helpers.data: Alpaca/KULLM ``input``, ``text`` rows,
``messages`` rows (template and chat-template renderings), mixed files, UTF-8 with BOM and CP949, and the length
check of ``python -m helpers.data check``.

The tokenizer is the embedded gemma-3-270m one (``tokenizer`` fixture of conftest: a fresh copy per test).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import data as lab_data
from helpers.data import (
    IGNORE_INDEX,
    DataError,
    DataReport,
    encode_example,
    full_text,
    load_instructions,
    make_collator,
    prepare_tokenizer,
    read_rows,
    tokenize_dataset,
    validate_rows,
)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
BIG = 100_000

# A small chat template in Gemma's form, for a tokenizer that ships none (the embedded one has none).
GEMMA_LIKE_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def all_rows(data) -> list[dict]:
    return sorted(list(data["train"]) + list(data["eval"]), key=lambda r: r["row"])


def trained_text(enc, tok) -> str:
    return tok.decode([i for i, lab in zip(enc["input_ids"], enc["labels"]) if lab != IGNORE_INDEX])


# ------------------------------------------------------------------------------------------- Alpaca / KULLM input


ALPACA_ROWS = [
    {"instruction": "다음 문장을 영어로 번역하세요.", "input": "오늘 날씨가 정말 좋네요.", "output": "The weather is really nice today."},
    {"instruction": "한국의 수도는?", "input": "", "output": "서울입니다."},
    {"instruction": "요약하세요.", "input": "세종대왕은 1443년에 훈민정음을 만들었다.", "output": "세종이 한글을 만들었다."},
]


def test_alpaca_input_reaches_the_training_text(tmp_path, tokenizer):
    # Before: `input` was silently dropped; the model trained on "translate the following" with nothing to translate.
    path = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA_ROWS)
    data, report = load_instructions(str(path), eval_fraction=0.34, verbose=False)
    rows = all_rows(data)
    assert report.rows_kept == len(ALPACA_ROWS) == len(rows)
    assert [r["context"] for r in rows] == [r["input"] for r in ALPACA_ROWS]
    prepare_tokenizer(tokenizer, "answer_only")
    enc = encode_example(rows[0], tokenizer, "answer_only", max_length=BIG)
    decoded = tokenizer.decode(enc["input_ids"], skip_special_tokens=True)
    assert decoded == ("### 맥락: 오늘 날씨가 정말 좋네요.\n\n### 질문: 다음 문장을 영어로 번역하세요.\n\n"
                       "### 답변: The weather is really nice today.")
    assert "오늘 날씨가 정말 좋네요." in full_text(rows[0], tokenizer)
    # the context is prompt: untrained
    assert trained_text(enc, tokenizer) == " The weather is really nice today.<eos>"


def test_alpaca_csv_with_input_column(tmp_path):
    path = tmp_path / "kullm.csv"
    import pandas as pd

    pd.DataFrame(ALPACA_ROWS).to_csv(path, index=False)
    data, report = load_instructions(str(path), eval_fraction=0.34, verbose=False)
    assert [r["context"] for r in all_rows(data)] == [r["input"] for r in ALPACA_ROWS]
    assert report.problems == []


def test_input_and_context_both_kept_and_wrong_type_input_reported(tmp_path):
    path = write_jsonl(tmp_path / "both.jsonl", [
        {"instruction": "질문", "context": "맥락 하나", "input": "입력 둘", "output": "답"},
        {"instruction": "질문 2", "input": 3, "output": "답 2"},
        {"instruction": "질문 3", "input": "입력", "output": "답 3"},
    ])
    report = DataReport(str(path))
    kept = validate_rows(read_rows(str(path), report=report), report)
    assert [r["row"] for r in kept] == [1, 3]
    assert kept[0]["context"] == "맥락 하나\n\n입력 둘"
    assert {(p.row, p.field, p.kind) for p in report.problems} == {(2, "input", "wrong_type")}


# ------------------------------------------------------------------------------------------- text rows


TEXT_ROWS = [
    {"text": "### 질문: 김치찌개 끓이는 법?\n\n### 답변: 잘 익은 김치를 볶은 뒤 물을 붓고 끓입니다."},
    {"text": "사용자: 안녕하세요\n상담원: 무엇을 도와드릴까요?<eos>"},  # Unsloth's "+ EOS_TOKEN"
    {"text": "<bos>첫 줄\n둘째 줄"},
]


def test_text_rows_train_every_token_and_one_final_eos(tmp_path, tokenizer):
    # Before: every text row was refused as "instruction missing".
    path = write_jsonl(tmp_path / "text.jsonl", TEXT_ROWS)
    data, report = load_instructions(str(path), eval_fraction=0.34, verbose=False)
    rows = all_rows(data)
    assert report.rows_kept == len(rows) == len(TEXT_ROWS)
    assert report.shapes == {"text": 3}
    prepare_tokenizer(tokenizer, "answer_only")
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    for row in rows:
        enc = encode_example(row, tokenizer, "answer_only", max_length=BIG)
        assert enc["labels"] == enc["input_ids"]  # the whole text is trained
        assert enc["input_ids"].count(eos) == 1 and enc["input_ids"][-1] == eos
        assert enc["input_ids"].count(bos) == 1 and enc["input_ids"][0] == bos
    enc = encode_example(rows[0], tokenizer, "answer_only", max_length=BIG)
    assert tokenizer.decode(enc["input_ids"][1:-1]) == TEXT_ROWS[0]["text"]


def test_text_row_blog_labels_have_one_eos(tokenizer):
    enc = encode_example({"text": "대화 기록<eos>"}, tokenizer, "blog", max_length=BIG)
    assert enc["input_ids"].count(tokenizer.eos_token_id) == 1


# ------------------------------------------------------------------------------------------- messages rows


CONVERSATION = [
    {"role": "system", "content": "당신은 친절한 한국어 비서입니다."},
    {"role": "user", "content": "서울의 인구는?"},
    {"role": "assistant", "content": "약 950만 명입니다."},
    {"role": "user", "content": "부산은요?"},
    {"role": "assistant", "content": "약 330만 명입니다."},
]


def test_messages_rows_train_assistant_turns_each_with_an_eos(tmp_path, tokenizer):
    # Before: every messages row was refused as "instruction missing".
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": CONVERSATION},
        {"messages": CONVERSATION[1:3]},
        {"messages": CONVERSATION[1:]},
    ])
    data, report = load_instructions(str(path), eval_fraction=0.34, verbose=False)
    rows = all_rows(data)
    assert report.rows_kept == len(rows) == 3 and report.shapes == {"messages": 3}
    prepare_tokenizer(tokenizer, "answer_only")
    enc = encode_example(rows[0], tokenizer, "answer_only", max_length=BIG)
    eos = tokenizer.eos_token_id
    assert [lab for lab in enc["labels"] if lab == eos] == [eos, eos]  # one trained EOS per assistant turn
    assert enc["input_ids"].count(eos) == 2 and enc["input_ids"][-1] == eos
    assert trained_text(enc, tokenizer) == " 약 950만 명입니다.<eos> 약 330만 명입니다.<eos>"
    assert tokenizer.decode(enc["input_ids"], skip_special_tokens=True) == (
        "### 맥락: 당신은 친절한 한국어 비서입니다.\n\n### 질문: 서울의 인구는?\n\n### 답변: 약 950만 명입니다."
        "\n\n### 질문: 부산은요?\n\n### 답변: 약 330만 명입니다.")
    assert full_text(rows[0], tokenizer) + tokenizer.eos_token == tokenizer.decode(enc["input_ids"][1:])


def test_single_exchange_encodes_like_the_instruction_row(tokenizer):
    """A system turn is the context: one exchange gives the very ids of the KoAlpaca row it stands for."""
    prepare_tokenizer(tokenizer, "answer_only")
    as_messages = encode_example({"messages": CONVERSATION[:3]}, tokenizer, "answer_only", max_length=BIG)
    as_row = encode_example({"instruction": "서울의 인구는?", "output": "약 950만 명입니다.",
                             "context": "당신은 친절한 한국어 비서입니다."}, tokenizer, "answer_only", max_length=BIG)
    assert as_messages == as_row


def test_messages_with_the_tokenizers_chat_template(tokenizer):
    tokenizer.chat_template = GEMMA_LIKE_CHAT_TEMPLATE
    prepare_tokenizer(tokenizer, "answer_only")
    enc = encode_example({"messages": CONVERSATION}, tokenizer, "answer_only", template="chat", max_length=BIG)
    ids, labels = enc["input_ids"], enc["labels"]
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    assert ids[-1] == labels[-1] == tokenizer.eos_token_id
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    trained_ends = [i for i, lab in enumerate(labels) if lab == end_of_turn]
    assert len(trained_ends) == 2  # each assistant turn ends in the template's trained end-of-turn token
    assert ids.count(end_of_turn) == 5  # the system and user turns' markers are not trained
    assert trained_text(enc, tokenizer) == \
        "약 950만 명입니다.<end_of_turn>\n약 330만 명입니다.<end_of_turn>\n<eos>"


def test_chat_template_missing_is_a_clear_error(tmp_path, tokenizer):
    assert not tokenizer.chat_template
    with pytest.raises(ValueError, match="needs a tokenizer that has a chat template"):
        encode_example({"messages": CONVERSATION}, tokenizer, "answer_only", template="chat")
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    with pytest.raises(ValueError, match="needs a tokenizer that has a chat template"):
        load_instructions(str(path), tokenizer=tokenizer, max_length=512, template="chat", verbose=False)


def test_bad_messages_are_reported_by_row(tmp_path):
    good = {"messages": CONVERSATION[1:3]}
    path = write_jsonl(tmp_path / "bad_chat.jsonl", [
        good,                                                                            # 1
        {"messages": "안녕"},                                                              # 2 not a list
        {"messages": [{"role": "bot", "content": "x"}]},                                  # 3 unknown role
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},  # 4 order
        {"messages": [{"role": "user", "content": "질문만"}]},                              # 5 no answer
        {"messages": [{"role": "user"}, {"role": "assistant", "content": "답"}]},          # 6 no content
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]},  # 7 empty
        {"messages": ["user: hi"]},                                                      # 8 turn not an object
        {"messages": []},                                                                # 9 no turns
        {"messages": CONVERSATION[1:3] + [{"role": "system", "content": "늦은 시스템"}]},  # 10 system late
        {"messages": CONVERSATION},                                                      # 11 ok
    ])
    report = DataReport(str(path))
    kept = validate_rows(read_rows(str(path), report=report), report)
    assert [r["row"] for r in kept] == [1, 11]
    assert {(p.row, p.field, p.kind) for p in report.problems} == {
        (2, "messages", "wrong_type"), (3, "messages", "bad_turns"), (4, "messages", "bad_turns"),
        (5, "messages", "bad_turns"), (6, "messages", "missing"), (7, "messages", "empty"),
        (8, "messages", "wrong_type"), (9, "messages", "bad_turns"), (10, "messages", "bad_turns")}
    by_row = {p.row: p.detail for p in report.problems}
    assert "role 'bot' is not one of system, user, assistant" in by_row[3]
    assert "roles user user" in by_row[4]


def test_mixed_shapes_in_one_file_all_kept_and_tokenized(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        ALPACA_ROWS[0], TEXT_ROWS[0], {"messages": CONVERSATION}, {"instruction": "질문", "output": "답"},
        {"question": "이건 무슨 형식?", "answer": "모름"},
    ])
    data, report = load_instructions(str(path), eval_fraction=0.25, verbose=False)
    assert report.rows_kept == 4
    assert report.shapes == {"instruction": 2, "text": 1, "messages": 1}
    assert [(p.row, p.field, p.kind) for p in report.problems] == [(5, "*", "missing")]
    assert "no known row shape (fields: question, answer)" in report.problems[0].detail
    prepare_tokenizer(tokenizer, "answer_only")
    encoded = tokenize_dataset(data, tokenizer, "answer_only", max_length=BIG)
    assert len(encoded["train"]) + len(encoded["eval"]) == 4
    batch = make_collator(tokenizer, "answer_only")(list(encoded["train"]) + list(encoded["eval"]))
    # one EOS per instruction/text row, two for the two-answer conversation
    assert sorted(lab_data.label_stats(batch, tokenizer)["trained_eos_per_example"]) == [1, 1, 1, 2]


# ------------------------------------------------------------------------------------------- encodings


KOREAN_CSV = ("instruction,output,context\r\n"
              "김치찌개 끓이는 법?,잘 익은 김치를 볶아 끓입니다.,\r\n"
              "서울의 인구는?,약 950만 명입니다.,2020년 기준\r\n"
              "\"쉼표, 따옴표\"\"가 든 질문\",답입니다.,\r\n")


@pytest.mark.parametrize("encoding", ["cp949", "euc-kr"])
def test_cp949_csv_from_excel_loads_every_row(tmp_path, encoding):
    # Before: refused as "not UTF-8 text".
    path = tmp_path / "excel.csv"
    path.write_bytes(KOREAN_CSV.encode(encoding))
    data, report = load_instructions(str(path), eval_fraction=0.34, verbose=False)
    rows = all_rows(data)
    assert report.rows_read == report.rows_kept == len(rows) == 3
    assert report.encoding == "cp949"
    assert "read as CP949 (Korean Windows)" in report.text()
    assert [r["instruction"] for r in rows] == ["김치찌개 끓이는 법?", "서울의 인구는?", "쉼표, 따옴표\"가 든 질문"]
    assert rows[1]["context"] == "2020년 기준"


def test_cp949_jsonl_loads(tmp_path):
    path = tmp_path / "cp949.jsonl"
    path.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ALPACA_ROWS).encode("cp949"))
    data, report = load_instructions(str(path), eval_fraction=0.34, verbose=False)
    assert report.encoding == "cp949" and report.rows_kept == 3
    assert all_rows(data)[0]["context"] == "오늘 날씨가 정말 좋네요."


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_utf8_bom_files_load(tmp_path, suffix):
    # Before: the BOM broke the first line (jsonl) or the whole array (json): "no usable rows".
    path = tmp_path / f"bom{suffix}"
    if suffix == ".jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ALPACA_ROWS)
    elif suffix == ".json":
        text = json.dumps(ALPACA_ROWS, ensure_ascii=False, indent=2)
    else:
        text = KOREAN_CSV
    path.write_bytes(text.encode("utf-8-sig"))
    data, report = load_instructions(str(path), eval_fraction=0.34, verbose=False)
    assert report.problems == []
    assert report.rows_kept == len(all_rows(data)) == 3
    assert report.encoding == "utf-8-sig"
    assert "read as UTF-8 with BOM" in report.text()
    assert not all_rows(data)[0]["instruction"].startswith("\ufeff")


def test_utf8_file_with_one_bad_byte_is_not_read_as_cp949(tmp_path):
    good = [json.dumps(r, ensure_ascii=False).encode() for r in ALPACA_ROWS]
    path = tmp_path / "mostly_utf8.jsonl"
    path.write_bytes(b"\n".join(good[:2] + [b'{"instruction": "\xbf\xa9", "output": "x"}'] + good[2:]) + b"\n")
    data, report = load_instructions(str(path), eval_fraction=0.34, verbose=False)
    assert report.encoding == "utf-8"
    assert [(p.row, p.kind) for p in report.problems] == [(3, "undecodable")]
    assert [r["instruction"] for r in all_rows(data)] == [r["instruction"] for r in ALPACA_ROWS]


# ------------------------------------------------------------------------------------------- check command


def _check(*args):
    return subprocess.run([sys.executable, "-m", "helpers.data", "check", *map(str, args)], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=300)


def test_check_without_model_measures_lengths(tmp_path):
    # Before: without --model it printed "0 truncated" having measured nothing.
    path = write_jsonl(tmp_path / "long.jsonl", [
        {"instruction": "짧은 질문", "output": "짧은 답"},
        {"instruction": "아주 긴 답", "output": "대한민국의 역사와 문화 " * 60},
        {"messages": CONVERSATION},
        {"text": "대화 기록 " * 100},
    ])
    result = _check(path, "--max-length", "64")
    assert result.returncode == 0, result.stderr
    assert "4 kept, 2 truncated at 64 tokens" in result.stdout
    assert "row 2 field output: too_long" in result.stdout
    assert "row 4 field text: too_long" in result.stdout
    assert "shapes: 2 instruction, 1 messages, 1 text" in result.stdout


def test_check_says_when_length_was_not_checked(tmp_path, monkeypatch, capsys):
    import helpers.models

    def cannot_load(*args, **kwargs):
        raise OSError("no tokenizer here")

    monkeypatch.setattr(helpers.models, "load_tokenizer", cannot_load)
    path = write_jsonl(tmp_path / "rows.jsonl", ALPACA_ROWS)
    assert lab_data.main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "3 kept, length not checked" in out
    assert "truncated" not in out
    assert "length not checked: the embedded tokenizer could not be loaded (OSError: no tokenizer here)" in out


def test_check_cp949_csv_and_json_report(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes(KOREAN_CSV.encode("cp949"))
    result = _check(path, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["encoding"] == "cp949" and report["rows_kept"] == 3 and report["length_checked"] is True


def test_unknown_template_is_refused(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "rows.jsonl", ALPACA_ROWS)
    with pytest.raises(ValueError, match="unknown template 'alpaca'"):
        load_instructions(str(path), tokenizer=tokenizer, max_length=64, template="alpaca", verbose=False)


def test_no_usable_rows_still_refused(tmp_path):
    path = write_jsonl(tmp_path / "none.jsonl", [{"messages": []}, {"text": ""}])
    with pytest.raises(DataError, match="no usable rows"):
        load_instructions(str(path), verbose=False)
