"""Hostile input to helpers.data: every broken row is a row-level report, the good rows are kept, and nothing
ends in a traceback. Also: a directory, a JSON object that wraps its rows, and mistyped local paths (which must
never be sent to the hub). No tokenizer is needed except in the command-line test.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.data import sources as data_sources
from helpers.data import DataError, DataReport, check_source, load_instructions, read_rows, validate_rows

PROJECT_ROOT = Path(__file__).resolve().parents[2]
GOOD = [{"instruction": f"질문 {i}", "output": f"답 {i}"} for i in range(3)]
DEEP = "[" * 100_000 + "]" * 100_000
HUGE_INT = "1" * 5_000


def good_line(i: int) -> bytes:
    return json.dumps(GOOD[i], ensure_ascii=False).encode()


@pytest.fixture
def hostile_jsonl(tmp_path):
    lines = [
        good_line(0),                                                   # 1 ok
        b'{"instruction": "q", "output": ' + DEEP.encode() + b"}",       # 2 RecursionError
        b'{"instruction": "q", "output": ' + HUGE_INT.encode() + b"}",   # 3 int max str digits
        b'{"instruction": "q", "output": "a\\ud800b"}',                  # 4 lone surrogate
        b'{"instruction": "q", "output": NaN}',                           # 5 NaN literal
        b'{"instruction": "q", "output": "a", "url": -Infinity}',         # 6 Infinity literal
        good_line(1),                                                   # 7 ok
        b'{"instruction": "q", "output": "a",}',                          # 8 JSON syntax
        DEEP.encode(),                                                  # 9 RecursionError, top level
        b'{"text": "\\udfff"}',                                           # 10 lone surrogate, text row
        b'{"messages": [{"role": "user", "content": "\\ud83d"}, {"role": "assistant", "content": "x"}]}',  # 11
        good_line(2),                                                   # 12 ok
    ]
    path = tmp_path / "hostile.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


HOSTILE_PROBLEMS = {
    (2, "*", "invalid_json"), (3, "*", "invalid_json"), (4, "output", "undecodable"), (5, "*", "invalid_json"),
    (6, "*", "invalid_json"), (8, "*", "invalid_json"), (9, "*", "invalid_json"), (10, "text", "undecodable"),
    (11, "messages", "undecodable"),
}


def test_hostile_lines_reported_and_good_rows_kept(hostile_jsonl):
    # Before: the deep line raised RecursionError and the long integer ValueError (tracebacks); NaN was read as
    # a missing output and the surrogates failed later, in the tokenizer or when printing.
    data, report = load_instructions(str(hostile_jsonl), eval_fraction=0.34, verbose=False)
    assert sorted(list(data["train"]["row"]) + list(data["eval"]["row"])) == [1, 7, 12]
    assert {(p.row, p.field, p.kind) for p in report.problems} == HOSTILE_PROBLEMS
    detail = {p.row: p.detail for p in report.problems}
    assert detail[2] == detail[9] == "nested too deeply to read"
    assert detail[3] == f"an integer literal longer than {sys.get_int_max_str_digits()} digits"  # novermin: in 3.10.7+ too (a security backport)
    assert "U+D800 at position 1 is a lone surrogate" in detail[4]
    assert detail[5] == "NaN is not valid JSON (NaN and Infinity literals are not allowed)"
    assert detail[6] == "-Infinity is not valid JSON (NaN and Infinity literals are not allowed)"
    assert detail[8].startswith("Expecting property name enclosed in double quotes")
    assert "turn 1 (user): character U+D83D" in detail[11]
    report.text().encode("utf-8")  # printable


def test_check_command_on_hostile_file(hostile_jsonl):
    result = subprocess.run([sys.executable, "-m", "helpers.data", "check", str(hostile_jsonl)], cwd=PROJECT_ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "3 kept" in result.stdout
    for row, field, kind in HOSTILE_PROBLEMS:
        assert f"row {row} field {field}: {kind}" in result.stdout


def test_pretty_json_array_with_broken_rows_keeps_the_rest(tmp_path):
    # Before: one broken element refused the whole file ("not valid JSON"), and a deep one raised RecursionError.
    rows = [json.dumps(r, ensure_ascii=False, indent=4).replace("\n", "\n  ") for r in GOOD]
    broken = [
        '{\n    "instruction": "깨진 행",\n    "output": "따옴표가 없음\n  }',   # 2 unterminated string
        DEEP,                                                               # 4 nested too deeply
        '{"instruction": "q", "output": ' + HUGE_INT + "}",                 # 5 long integer
        '{"instruction": "q", "output": Infinity}',                          # 6
    ]
    elements = [rows[0], broken[0], rows[1], broken[1], broken[2], broken[3], rows[2]]
    path = tmp_path / "pretty.json"
    path.write_text("[\n  " + ",\n  ".join(elements) + "\n]\n", encoding="utf-8")
    data, report = load_instructions(str(path), eval_fraction=0.34, verbose=False)
    assert sorted(list(data["train"]["instruction"]) + list(data["eval"]["instruction"])) == \
        [r["instruction"] for r in GOOD]
    assert {(p.row, p.kind) for p in report.problems} == {(2, "invalid_json"), (4, "invalid_json"),
                                                          (5, "invalid_json"), (6, "invalid_json")}
    assert report.problems[0].detail.startswith("line 6: Invalid control character")  # where the row starts


def test_one_line_json_array_broken_midway_keeps_rows_before(tmp_path):
    path = tmp_path / "compact.json"
    path.write_text("[" + ", ".join(json.dumps(r, ensure_ascii=False) for r in GOOD[:2]) + ', {"instruction": }, '
                    + json.dumps(GOOD[2], ensure_ascii=False) + "]", encoding="utf-8")
    data, report = load_instructions(str(path), eval_fraction=0.5, verbose=False)
    assert report.rows_kept == 2
    assert [(p.row, p.kind) for p in report.problems] == [(3, "invalid_json")]
    assert "reading stopped after the broken row 3" in report.text()


def test_undecodable_bytes_in_a_json_array_are_row_level(tmp_path):
    path = tmp_path / "bytes.json"
    path.write_bytes(b'[\n  {"instruction": "\xff\xfe", "output": "x"},\n  ' + good_line(0) + b"\n]\n")
    report = DataReport(str(path))
    kept = validate_rows(read_rows(str(path), report=report), report)
    assert [r["row"] for r in kept] == [2]
    assert [(p.row, p.field, p.kind) for p in report.problems] == [(1, "instruction", "undecodable")]


# ------------------------------------------------------------------------------------------- wrapped rows


@pytest.mark.parametrize("key", ["data", "train"])
def test_rows_wrapped_in_one_key_are_read_with_a_note(tmp_path, key):
    # Before: every key was read as a row and reported "instruction missing": "no usable rows".
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"version": 2, key: GOOD}, ensure_ascii=False, indent=1), encoding="utf-8")
    data, report = load_instructions(str(path), eval_fraction=0.34, verbose=False)
    assert report.rows_kept == 3 and report.problems == []
    assert f"note: rows read from the list under the key '{key}'" in report.text()


def test_object_with_several_lists_is_refused_with_its_keys(tmp_path):
    path = tmp_path / "splits.json"
    path.write_text(json.dumps({"train": GOOD, "test": GOOD[:1]}, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(DataError, match=r"exactly one key holding the list of rows \(lists found: 'train', 'test'\)"):
        load_instructions(str(path), verbose=False)


def test_single_messages_row_is_not_taken_for_a_wrapper(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "안녕"},
                                             {"role": "assistant", "content": "안녕하세요"}]},
                               ensure_ascii=False), encoding="utf-8")
    _, report = load_instructions(str(path), verbose=False)
    assert report.rows_kept == 1 and report.shapes == {"messages": 1}


# ------------------------------------------------------------------------------------------- paths


def test_directory_is_named_as_such(tmp_path):
    # Before: "data file not found and not a hub id".
    (tmp_path / "train.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match=r"is a directory, not a data file.*\(it holds train.jsonl\)"):
        load_instructions(str(tmp_path), verbose=False)


@pytest.fixture
def no_hub(monkeypatch):
    def refuse(name, revision):
        raise AssertionError(f"{name!r} was sent to the hub")

    monkeypatch.setattr(data_sources, "_read_hub", refuse)


@pytest.mark.parametrize("source", [
    "data/train",          # its folder exists here (before: sent to the hub)
    "data/rows.txt",       # a file suffix (before: sent to the hub)
    "my data/rows",        # not an owner/name id (before: sent to the hub)
    "train/rows.josnl", "train/rows.cvs",  # a mistyped suffix (before: sent to the hub)
    "data\\train.jsonl",   # a Windows path
    "./rows", "~/rows_that_do_not_exist", "a/b/c", "rows.JSONL", "data/rows.parquet",
])
def test_mistyped_local_path_is_a_missing_file_not_a_hub_id(tmp_path, monkeypatch, no_hub, source):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    with pytest.raises(DataError, match="data file not found"):
        load_instructions(source, verbose=False)


def test_hub_id_still_goes_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data_sources, "_read_hub", lambda name, revision: list(enumerate(GOOD, start=1)))
    assert check_source("beomi/KoAlpaca-v1.1a") == "hub"
    _, report = load_instructions("beomi/KoAlpaca-v1.1a", verbose=False)
    assert report.rows_kept == 3
