"""Korean instruction data: loading, validation, prompts, labels, statistics.

Three row shapes, each checked and labelled by the same functions:

- instruction rows (KoAlpaca v1.1a): ``instruction`` and ``output`` (required), ``url`` and ``context``
  (optional). Alpaca/KULLM rows name the context ``input``; it becomes the context, rendered as ``### 맥락:``.
- text rows: one ``text`` field, a whole transcript (what TRL's ``SFTTrainer(dataset_text_field="text")`` trains
  on). Every token is trained, plus one EOS at the end.
- messages rows: ``messages``, a list of ``{role, content}`` turns (an optional first ``system`` turn, then
  ``user``/``assistant`` turns in turn, ending with an assistant turn). Only assistant turns are trained.

One loader takes the shipped set, a local json/jsonl/csv/parquet file (UTF-8 with or without BOM, or CP949 as Excel
saves it on Korean Windows) or a hub id and returns a ``datasets.DatasetDict`` with ``train`` and ``eval`` splits
plus a report of every problem found, by row number and field.

Run before a long job:  ``python -m helpers.data check PATH``
"""
from __future__ import annotations

import argparse
import codecs
import difflib
import hashlib
import io
import json
import os
import random
import re
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

RESOURCES = Path(__file__).parent / "resources"
SHIPPED = "shipped"
SHIPPED_DIR = RESOURCES / "ko_instructions"
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
REQUIRED_FIELDS = ("instruction", "output")
OPTIONAL_TEXT_FIELDS = ("context", "url")
CONTEXT_ALIASES = ("context", "input")  # Alpaca and KULLM call the context "input"
ROW_SHAPES = ("instruction", "text", "messages")
ROLES = ("system", "user", "assistant")
# Columns the shapes fill; a file that mixes shapes gets every column, None where a row's shape has no such field.
ROW_COLUMNS = ("instruction", "output", "context", "url", "text", "messages")
TURN_SEPARATOR = "\n\n"  # between one answer's EOS and the next question in a multi-turn template rendering
TOO_LONG_ACTIONS = ("truncate", "drop", "refuse")
LABEL_RECIPES = ("seed", "fixed")
IGNORE_INDEX = -100  # the label value transformers' losses skip
ENCODING_NAMES = {"utf-8": "UTF-8", "utf-8-sig": "UTF-8 with BOM", "cp949": "CP949 (Korean Windows)"}


class DataError(ValueError):
    """The data cannot be used at all (missing file, unknown format, no usable row, a refused row)."""


# --------------------------------------------------------------------------------------------- reports

@dataclass
class Problem:
    row: int  # 1-based row number in the source (line number for jsonl, data row for csv/parquet/json arrays)
    field: str
    kind: str  # missing | empty | wrong_type | bad_turns | invalid_json | undecodable | too_long | duplicate
    detail: str = ""


@dataclass
class DataReport:
    source: str
    rows_read: int = 0
    rows_kept: int = 0
    truncated: int = 0
    encoding: str = ""  # how a text file was decoded; empty for parquet and hub data
    length_checked: bool = False
    max_length: int | None = None
    shapes: Counter = field(default_factory=Counter)  # kept rows per shape: instruction | text | messages
    notes: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return dict(Counter(p.kind for p in self.problems))

    def add(self, row, field_name, kind, detail=""):
        self.problems.append(Problem(row, field_name, kind, detail))

    def note(self, text: str):
        if text not in self.notes:
            self.notes.append(text)

    def as_dict(self) -> dict:
        return {"source": self.source, "rows_read": self.rows_read, "rows_kept": self.rows_kept,
                "truncated": self.truncated, "length_checked": self.length_checked, "max_length": self.max_length,
                "encoding": self.encoding, "shapes": dict(self.shapes), "notes": self.notes,
                "problem_counts": self.counts(), "problems": [vars(p) for p in self.problems]}

    def text(self, limit: int = 50) -> str:
        length = f"{self.truncated} truncated at {self.max_length} tokens" if self.length_checked \
            else "length not checked"
        encoding = f", read as {ENCODING_NAMES.get(self.encoding, self.encoding)}" if self.encoding else ""
        lines = [f"{self.source}: {self.rows_read} rows read, {self.rows_kept} kept, {length}{encoding}"]
        if set(self.shapes) - {"instruction"}:
            lines.append("  shapes: " + ", ".join(f"{n} {shape}" for shape, n in sorted(self.shapes.items())))
        lines += [f"  note: {note}" for note in self.notes]
        for kind, n in sorted(self.counts().items()):
            lines.append(f"  {kind}: {n}")
        for p in self.problems[:limit]:
            lines.append(f"  row {p.row} field {p.field}: {p.kind}{' - ' + p.detail if p.detail else ''}")
        if len(self.problems) > limit:
            lines.append(f"  ... {len(self.problems) - limit} more")
        return "\n".join(lines)


def _printable(text: str, limit: int = 60) -> str:
    """User text safe to print: lone surrogates escaped, long text cut."""
    text = str(text)
    return (text[:limit] + "...").encode("utf-8", "backslashreplace").decode("utf-8") if len(text) > limit \
        else text.encode("utf-8", "backslashreplace").decode("utf-8")


# --------------------------------------------------------------------------------------------- decoding

def detect_encoding(data: bytes) -> str:
    """``"utf-8-sig"`` (a byte order mark), ``"utf-8"`` or ``"cp949"`` (EUC-KR's superset, as Excel saves CSV on
    Korean Windows).

    A file that is not strict UTF-8 is CP949 only if it decodes as CP949 and most of its non-ASCII lines are not
    UTF-8; otherwise it is UTF-8 with some broken lines, which are reported one by one. (CP949 accepts most byte
    pairs, so a UTF-8 file with one bad byte could otherwise be misread as CP949 mojibake.)
    """
    if data.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    try:
        data.decode("utf-8")
        return "utf-8"
    except UnicodeDecodeError:
        pass
    non_ascii = [line for line in data.split(b"\n") if not line.isascii()]
    utf8_lines = sum(_decodes(line, "utf-8") for line in non_ascii)
    if utf8_lines * 2 < len(non_ascii) and _decodes(data, "cp949"):
        return "cp949"
    return "utf-8"


def _decodes(data: bytes, encoding: str) -> bool:
    try:
        data.decode(encoding)
        return True
    except UnicodeDecodeError:
        return False


def _without_bom(data: bytes, encoding: str) -> tuple[bytes, str]:
    return (data[len(codecs.BOM_UTF8):], "utf-8") if encoding == "utf-8-sig" else (data, encoding)


# --------------------------------------------------------------------------------------------- JSON

class _NonStandardConstant(ValueError):
    pass


def _refuse_constant(name: str):
    # Python's json reads NaN and Infinity, which are not JSON and not text; refuse the row instead.
    raise _NonStandardConstant(f"{name} is not valid JSON")


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)


def _json_error(err: BaseException) -> str:
    """A one-line reason for a JSON value that could not be read (never the value itself: it may be huge)."""
    if isinstance(err, json.JSONDecodeError):
        return f"{err.msg} (column {err.colno})"
    if isinstance(err, RecursionError):
        return "nested too deeply to read"
    if isinstance(err, _NonStandardConstant):
        return f"{err} (NaN and Infinity literals are not allowed)"
    if "integer string conversion" in str(err):
        return f"an integer literal longer than {sys.get_int_max_str_digits()} digits"  # novermin: in 3.10.7+ too (a security backport)
    return f"{type(err).__name__}: {_printable(str(err), 120)}"


def _parse_json(text: str):
    return _DECODER.decode(text)


def _jsonl_rows(data: bytes, encoding: str, report: DataReport) -> list[tuple[int, object]]:
    # Parsed line by line (not with datasets' json reader) so that one bad line is reported by number
    # instead of failing the whole file. Splitting bytes on b"\n" is safe in CP949 too (no trail byte is 0x0A).
    rows = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            line = raw.decode(encoding)
        except UnicodeDecodeError as err:
            report.add(number, "*", "undecodable", f"byte {err.start}: not {ENCODING_NAMES[encoding]}")
            continue
        try:
            rows.append((number, _parse_json(line)))
        except (ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError
            report.add(number, "*", "invalid_json", _json_error(err))
    return rows


def _read_jsonl(path: Path, report: DataReport) -> list[tuple[int, object]]:
    data = path.read_bytes()
    report.encoding = detect_encoding(data)
    return _jsonl_rows(*_without_bom(data, report.encoding), report)


def _read_json(path: Path, report: DataReport) -> list[tuple[int, object]]:
    data = path.read_bytes()
    report.encoding = detect_encoding(data)
    data, encoding = _without_bom(data, report.encoding)
    # Undecodable bytes become lone surrogates here; validate_rows reports the rows that hold them.
    text = data.decode(encoding, errors="surrogateescape")
    stripped = text.lstrip()
    if stripped.startswith("["):
        return _json_array_rows(text, report)
    if stripped.startswith("{"):
        try:
            whole = _parse_json(text)
        except (ValueError, RecursionError):
            whole = None  # JSON Lines, or broken: read line by line below
        if isinstance(whole, dict) and not _looks_like_row(whole):
            return _unwrap_rows(whole, path, report)
    return _jsonl_rows(data, encoding, report)  # many ".json" files are really JSON Lines


def _looks_like_row(record: dict) -> bool:
    return any(name in record for name in (*REQUIRED_FIELDS, *CONTEXT_ALIASES, "text", "messages"))


def _unwrap_rows(whole: dict, path: Path, report: DataReport) -> list[tuple[int, object]]:
    """Rows from a JSON object that holds them under one key, such as ``{"data": [...]}`` or ``{"train": [...]}``."""
    lists = [key for key, value in whole.items() if isinstance(value, list)]
    if len(lists) != 1:
        found = ", ".join(repr(_printable(k)) for k in lists) or "none"
        raise DataError(f"{path} is one JSON object, not a list of rows; it would need exactly one key holding the "
                        f"list of rows (lists found: {found})")
    report.note(f"rows read from the list under the key {_printable(lists[0])!r} of the file's JSON object")
    return list(enumerate(whole[lists[0]], start=1))


def _json_array_rows(text: str, report: DataReport) -> list[tuple[int, object]]:
    """The elements of a JSON array, one by one, so that a broken element is reported and the others kept.

    After a broken element, reading goes on at the next line that starts the way that element started
    (same indentation, then ``{`` or ``[``), as in a pretty-printed file; a file without such a line
    (one long line) loses the rest, and the report says from which line.
    """
    rows, number = [], 0
    pos = text.index("[") + 1
    while True:
        pos = _skip_space(text, pos)
        if pos < len(text) and text[pos] == "]":
            break
        if pos >= len(text):
            report.add(number + 1, "*", "invalid_json",
                       f"the file ends at line {_line_of(text, pos)} before the closing ]; "
                       f"rows after this point are lost")
            break
        number += 1
        try:
            value, end = _DECODER.raw_decode(text, pos)
        except (ValueError, RecursionError) as err:
            report.add(number, "*", "invalid_json", f"line {_line_of(text, pos)}: {_json_error(err)}")
            pos = _next_element(text, pos)
            if pos is None:
                report.note(f"reading stopped after the broken row {number}: no later line starts a new row")
                break
            continue
        rows.append((number, value))
        pos = _skip_space(text, end)
        if text.startswith(",", pos):
            pos += 1
        elif not text.startswith("]", pos) and pos < len(text):
            report.add(number + 1, "*", "invalid_json", f"line {_line_of(text, pos)}: expected , or ] after a row")
            pos = _next_element(text, pos)
            if pos is None:
                break
    return rows


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _next_element(text: str, pos: int) -> int | None:
    line_start = text.rfind("\n", 0, pos) + 1
    indent = text[line_start:pos]
    pattern = r"\n" + (re.escape(indent) if not indent.strip() else r"[ \t]*") + r"[\[{]"
    found = re.compile(pattern).search(text, pos + 1)
    return found.end() - 1 if found else None


# --------------------------------------------------------------------------------------------- tables

def _read_table(path: Path, report: DataReport) -> list[tuple[int, object]]:
    import pandas as pd

    is_csv = path.suffix.lower() == ".csv"
    try:
        if is_csv:
            data = path.read_bytes()
            report.encoding = detect_encoding(data)
            data, encoding = _without_bom(data, report.encoding)
            # Undecodable bytes become U+FFFD; the rows that hold one are reported below.
            text, broken = data.decode(encoding, errors="replace"), not _decodes(data, encoding)
            frame = pd.read_csv(io.StringIO(text), dtype=object, keep_default_na=False)
        else:
            frame = pd.read_parquet(path)
    except Exception as err:  # pandas raises many types for unreadable files
        raise DataError(f"cannot read {path}: {type(err).__name__}: {_printable(str(err), 200)}") from None
    columns = set(frame.columns)
    missing = [name for name in REQUIRED_FIELDS if name not in columns]
    if missing and not columns & {"text", "messages"}:
        raise DataError(f"{path} has no column {missing}; data files need columns instruction, output "
                        f"(context or input, url optional), or a text column, or a messages column")
    rows = []
    for number, record in enumerate(frame.to_dict(orient="records"), start=1):
        # Empty cells come back as None or NaN depending on the column type; both mean "missing".
        # Parquet list columns come back as numpy arrays.
        record = {k: None if _is_nan(v) else v.tolist() if hasattr(v, "tolist") else v for k, v in record.items()}
        if is_csv and broken and any(isinstance(v, str) and "\ufffd" in v for v in record.values()):
            report.add(number, "*", "undecodable", f"holds bytes that are not {ENCODING_NAMES[encoding]}")
            continue
        rows.append((number, record))
    return rows


def _is_nan(value) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def _read_hub(name: str, revision: str | None) -> list[tuple[int, object]]:
    import datasets

    try:
        loaded = datasets.load_dataset(name, revision=revision)
    except Exception as err:
        raise DataError(f"cannot load dataset {name!r} from the hub ({type(err).__name__}: {str(err)[:200]}). "
                        f"Without a hub, download it elsewhere and pass the local json/csv/parquet path.") from None
    split = loaded["train"] if "train" in loaded else loaded[list(loaded)[0]]
    return list(enumerate(split, start=1))


def read_rows(source: str, revision: str | None = None, report: DataReport | None = None) -> list[tuple[int, object]]:
    """Raw ``(row_number, record)`` pairs from a local file or a hub id, before validation."""
    report = report if report is not None else DataReport(str(source))
    kind = check_source(source)
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if kind == "file":
        if suffix == ".jsonl":
            return _read_jsonl(path, report)
        if suffix == ".json":
            return _read_json(path, report)
        return _read_table(path, report)
    return _read_hub(str(source), revision)


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name
FILE_LIKE_SUFFIXES = (*DATA_SUFFIXES, ".txt", ".tsv", ".xlsx", ".xls", ".gz", ".zip")


def _looks_like_path(source: str) -> bool:
    """A missing source written like a local path (or inside a folder that exists here): never sent to the hub."""
    separators = {os.sep, os.altsep or os.sep, "\\"} - {"/"}  # "/" also separates owner/name in hub ids
    suffix = Path(source).suffix.lower()
    return (source.startswith((".", "~", "/")) or any(s in source for s in separators)
            or not _HUB_ID.fullmatch(source) or suffix in FILE_LIKE_SUFFIXES or _mistyped_suffix(suffix)
            or Path(source).parent.is_dir())


def _mistyped_suffix(suffix: str) -> bool:
    """``.josnl``, ``.cvs``: letters close to a data suffix (hub names end in things like ``.1a``, not these)."""
    return suffix[1:].isalpha() and bool(difflib.get_close_matches(suffix, DATA_SUFFIXES, n=1, cutoff=0.6))


def check_source(source: str) -> str:
    """``"shipped"``, ``"file"`` or ``"hub"``; a DataError for a missing or unsupported file. Cheap, so a run
    can check its data before it loads a model."""
    if source == SHIPPED:
        return SHIPPED
    path = Path(source).expanduser()
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix.lower() in DATA_SUFFIXES)[:5]
        raise DataError(f"{path} is a directory, not a data file; pass one .jsonl, .json, .csv or .parquet file"
                        + (f" (it holds {', '.join(inside)})" if inside else ""))
    if path.suffix.lower() in DATA_SUFFIXES:
        if not path.is_file():
            raise DataError(f"data file not found: {path}")
        return "file"
    if path.exists():
        raise DataError(f"unsupported data file {path}: use .jsonl, .json, .csv or .parquet")
    if _looks_like_path(str(source)):
        raise DataError(f"data file not found: {path} (written like a local path and not a hub id owner/name, "
                        f"so the hub was not asked)")
    return "hub"


# --------------------------------------------------------------------------------------------- validation

def row_shape(record: dict) -> str:
    """``"messages"``, ``"text"`` or ``"instruction"`` (the default, so that a row of an unknown shape is reported
    as missing its instruction fields). A row with both instruction fields and a ``text`` is an instruction row."""
    given = {name for name, value in record.items() if value is not None}
    if "messages" in given and "instruction" not in given:
        return "messages"
    if "text" in given and not given & {*REQUIRED_FIELDS, "input"}:
        return "text"
    return "instruction"


def _unencodable(value: str) -> str:
    """Why a string cannot be written as UTF-8 (a lone surrogate from a bad \\u escape or an undecodable byte)."""
    try:
        value.encode("utf-8")
        return ""
    except UnicodeEncodeError as err:
        return (f"character U+{ord(value[err.start]):04X} at position {err.start} is a lone surrogate "
                f"(a broken \\u escape or an undecodable byte) and cannot be written as UTF-8")


def _text_field(number, record, name, report, required=True):
    """The stripped text of one field, or None after reporting why it is unusable (a missing optional field is "")."""
    value = record.get(name)
    if _is_nan(value):
        if required:
            report.add(number, name, "missing")
            return None
        return ""
    if not isinstance(value, str):
        report.add(number, name, "wrong_type", f"{type(value).__name__}, not text")
        return None
    if why := _unencodable(value):
        report.add(number, name, "undecodable", why)
        return None
    if required and not value.strip():
        report.add(number, name, "empty")
        return None
    return value.strip()


def _clean_instruction_row(number, record, report):
    if not _looks_like_row(record):
        fields = _printable(", ".join(map(str, record)), 120)
        report.add(number, "*", "missing",
                   f"no known row shape (fields: {fields}); expected instruction and output, text, or messages")
        return None
    clean = {name: _text_field(number, record, name, report) for name in REQUIRED_FIELDS}
    clean["context"] = ""
    contexts = [_text_field(number, record, name, report, required=False) for name in CONTEXT_ALIASES]
    clean["url"] = _text_field(number, record, "url", report, required=False)
    if any(value is None for value in (*clean.values(), *contexts)):
        return None
    clean["context"] = "\n\n".join(dict.fromkeys(c for c in contexts if c))  # both, once each, if both are given
    if "text" in record:
        report.note("rows with instruction/output also have a text field; it is ignored (the prompt is built "
                    "from instruction, context/input and output)")
    return clean


def _clean_text_row(number, record, report):
    text = _text_field(number, record, "text", report)
    return None if text is None else {"text": text}


def _clean_messages_row(number, record, report):
    """The turns as ``[{role, content}]``, or None after reporting the first thing wrong with them."""
    turns = record["messages"]
    if not isinstance(turns, (list, tuple)):
        report.add(number, "messages", "wrong_type", f"{type(turns).__name__}, not a list of turns")
        return None
    clean = []
    for i, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            report.add(number, "messages", "wrong_type", f"turn {i} is {type(turn).__name__}, not an object")
            return None
        role, content = turn.get("role"), turn.get("content")
        if role not in ROLES:
            report.add(number, "messages", "bad_turns",
                       f"turn {i}: role {_printable(repr(role), 40)} is not one of {', '.join(ROLES)}")
            return None
        if not isinstance(content, str):
            kind = "missing" if content is None else "wrong_type"
            report.add(number, "messages", kind, f"turn {i} ({role}): content is {type(content).__name__}, not text")
            return None
        if why := _unencodable(content):
            report.add(number, "messages", "undecodable", f"turn {i} ({role}): {why}")
            return None
        if not content.strip():
            report.add(number, "messages", "empty", f"turn {i} ({role}) has no content")
            return None
        clean.append({"role": role, "content": content.strip()})
    roles = [turn["role"] for turn in clean]
    dialogue = roles[1:] if roles[:1] == ["system"] else roles
    expected = ["user", "assistant"] * (len(dialogue) // 2)
    if not dialogue or dialogue != expected:
        report.add(number, "messages", "bad_turns",
                   f"roles {' '.join(roles) or '(none)'}: expected an optional system turn, then user and "
                   f"assistant turns in turn, ending with an assistant turn")
        return None
    return {"messages": clean}


_CLEANERS = {"instruction": _clean_instruction_row, "text": _clean_text_row, "messages": _clean_messages_row}


def _dedup_key(clean: dict, shape: str) -> tuple:
    if shape == "instruction":
        return clean["instruction"], clean["context"], clean["output"]
    if shape == "text":
        return ("text", clean["text"])
    return ("messages",) + tuple((turn["role"], turn["content"]) for turn in clean["messages"])


def _length_text(clean: dict, formatter) -> str:
    if formatter:
        return formatter(clean)
    if "text" in clean:
        return clean["text"]
    if "messages" in clean:
        return "\n\n".join(turn["content"] for turn in clean["messages"])
    return clean["instruction"] + clean["output"]


def validate_rows(rows, report: DataReport, formatter=None, tokenizer=None, max_length: int | None = None,
                  too_long: str = "truncate") -> list[dict]:
    """Keep the usable rows; record each problem in ``report``.

    Rows longer than ``max_length`` tokens (needs ``tokenizer``) are kept and marked for truncation,
    dropped, or refused with a DataError, by ``too_long``. Exact duplicates (same instruction, context
    and output; same text; same turns) are dropped after the first.
    """
    if too_long not in TOO_LONG_ACTIONS:
        raise ValueError(f"too_long must be one of {TOO_LONG_ACTIONS}, not {too_long!r}")
    check_length = tokenizer is not None and bool(max_length)
    report.length_checked, report.max_length = check_length, max_length if check_length else None
    kept, seen = [], {}
    for number, record in rows:
        report.rows_read += 1
        if not isinstance(record, dict):
            report.add(number, "*", "wrong_type", f"row is {type(record).__name__}, not an object")
            continue
        shape = row_shape(record)
        clean = _CLEANERS[shape](number, record, report)
        if clean is None:
            continue
        key = _dedup_key(clean, shape)
        if key in seen:
            report.add(number, "instruction" if shape == "instruction" else shape, "duplicate",
                       f"same as row {seen[key]}")
            continue
        seen[key] = number
        clean["row"] = number
        if check_length:
            n_tokens = len(tokenizer(_length_text(clean, formatter))["input_ids"]) + 1
            if n_tokens > max_length:
                report.add(number, "output" if shape == "instruction" else shape, "too_long",
                           f"{n_tokens} tokens > {max_length} ({too_long})")
                if too_long == "refuse":
                    raise DataError(f"row {number} is {n_tokens} tokens, longer than max_length {max_length}; "
                                    f"pass too_long='truncate' or 'drop' to go on")
                if too_long == "drop":
                    continue
                report.truncated += 1
        report.shapes[shape] += 1
        kept.append(clean)
    report.rows_kept = len(kept)
    return kept


def _same_columns(rows: list[dict]) -> list[dict]:
    """Rows of mixed shapes with every column present (None where unused), as a Dataset needs."""
    if len({tuple(sorted(r)) for r in rows}) <= 1:
        return rows
    names = [name for name in ROW_COLUMNS if any(name in r for r in rows)] + ["row"]
    return [{name: r.get(name) for name in names} for r in rows]


def load_instructions(source: str = SHIPPED, eval_fraction: float = 0.1, seed: int = 42, tokenizer=None,
                      max_length: int | None = None, too_long: str = "truncate", template: str = "koalpaca",
                      revision: str | None = None, max_rows: int | None = None, verbose: bool = True):
    """Load instruction, text or messages rows into ``DatasetDict(train, eval)`` and return ``(dataset, report)``.

    source: ``"shipped"`` (the project's Korean set, its own train/eval files), a local .jsonl/.json/.csv/
    .parquet file, or a hub id such as ``beomi/KoAlpaca-v1.1a``. Other sources are split deterministically
    by ``seed`` with ``eval_fraction`` of the rows held out. max_rows caps each split (for quick runs).
    """
    import datasets

    if tokenizer is not None:
        _check_template(tokenizer, template)
    formatter = (lambda row: full_text(row, tokenizer, template)) if tokenizer is not None else None
    splits, reports = {}, []
    if source == SHIPPED:
        parts = {"train": SHIPPED_DIR / "train.jsonl", "eval": SHIPPED_DIR / "eval.jsonl"}
    else:
        parts = {"all": source}
    for split, part in parts.items():
        report = DataReport(str(part))
        rows = read_rows(str(part), revision=revision, report=report)
        splits[split] = validate_rows(rows, report, formatter, tokenizer, max_length, too_long)
        reports.append(report)
    report = reports[0] if len(reports) == 1 else _merge_reports(SHIPPED, reports)
    if report.rows_kept == 0:
        raise DataError(f"no usable rows in {source}:\n{report.text()}")
    if "all" in splits:
        rows = splits.pop("all")
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        n_eval = max(1, round(len(rows) * eval_fraction)) if len(rows) > 1 else 0
        splits = {"train": [rows[i] for i in sorted(order[n_eval:])], "eval": [rows[i] for i in sorted(order[:n_eval])]}
    if max_rows:
        splits = {name: rows[:max_rows] for name, rows in splits.items()}
    if verbose:
        print(report.text(limit=10))
    same_columns = iter(_same_columns([row for rows in splits.values() for row in rows]))
    splits = {name: [next(same_columns) for _ in rows] for name, rows in splits.items()}
    return datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()}), report


def _merge_reports(name, reports):
    merged = DataReport(name, encoding=reports[0].encoding, length_checked=reports[0].length_checked,
                        max_length=reports[0].max_length)
    for r in reports:
        merged.rows_read += r.rows_read
        merged.rows_kept += r.rows_kept
        merged.truncated += r.truncated
        merged.shapes += r.shapes
        for note in r.notes:
            merged.note(f"{Path(r.source).name}: {note}")
        merged.problems += [Problem(p.row, p.field, p.kind, f"{Path(r.source).name}: {p.detail}".rstrip(": "))
                            for p in r.problems]
    return merged


def file_sha256(source: str) -> str:
    """Hash of a local data source (both shipped files for ``shipped``), for run cards."""
    paths = [SHIPPED_DIR / "train.jsonl", SHIPPED_DIR / "eval.jsonl"] if source == SHIPPED else [Path(source)]
    digest = hashlib.sha256()
    for path in paths:
        if not path.is_file():
            return "not a local file"
        digest.update(path.read_bytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------- prompts

def prompt_templates() -> dict:
    return json.loads((RESOURCES / "prompt_templates.json").read_text(encoding="utf-8"))


def _uses_chat_template(template: str) -> bool:
    return bool(prompt_templates()[template].get("use_chat_template"))


def _check_template(tokenizer, template: str):
    if template not in prompt_templates():
        raise ValueError(f"unknown template {template!r}; choose one of {', '.join(prompt_templates())}")
    if _uses_chat_template(template) and (tokenizer is None or not getattr(tokenizer, "chat_template", None)):
        raise ValueError(f"template {template!r} needs a tokenizer that has a chat template (this one has none); "
                         f"use 'koalpaca'")


def format_prompt(instruction: str, context: str = "", tokenizer=None, template: str = "koalpaca") -> str:
    """The prompt text up to where the answer starts."""
    spec = prompt_templates()[template]
    if spec.get("use_chat_template"):
        _check_template(tokenizer, template)
        content = f"{context}\n\n{instruction}" if context else instruction
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    pattern = spec["prompt_with_context"] if context else spec["prompt"]
    return pattern.format(instruction=instruction, context=context)


def format_answer(output: str, template: str = "koalpaca") -> str:
    spec = prompt_templates()[template]
    return spec.get("answer", "{output}").format(output=output)


def _dialogue(messages) -> tuple[str, list[tuple[str, str]]]:
    """``(system, [(user, assistant), ...])`` of validated turns."""
    system = messages[0]["content"] if messages[0]["role"] == "system" else ""
    turns = [turn["content"] for turn in messages if turn["role"] != "system"]
    return system, list(zip(turns[0::2], turns[1::2]))


def conversation_segments(messages, tokenizer, template: str = "koalpaca") -> list[tuple[str, bool]]:
    """A conversation as ``(text, trained)`` pieces, in order; joined they are the training text (without the
    final EOS, which :func:`encode_example` appends).

    Template forms (koalpaca, special_tokens): the system turn is the first question's context (``### 맥락:``),
    each exchange is a prompt then an answer, and every answer but the last is followed by the EOS text and a
    blank line before the next question. The chat form renders the tokenizer's own chat template and trains what
    each assistant turn adds to it: its content and the template's end-of-turn marker.
    """
    if _uses_chat_template(template):
        return _chat_segments(messages, tokenizer, template)
    system, exchanges = _dialogue(messages)
    segments = []
    for i, (question, answer) in enumerate(exchanges):
        prompt = format_prompt(question, system if i == 0 else "", tokenizer, template)
        segments += [(TURN_SEPARATOR + prompt if i else prompt, False), (format_answer(answer, template), True)]
        if i < len(exchanges) - 1:
            segments.append((tokenizer.eos_token, True))
    return segments


def _chat_segments(messages, tokenizer, template: str) -> list[tuple[str, bool]]:
    _check_template(tokenizer, template)
    render = lambda turns, **kw: tokenizer.apply_chat_template(list(turns), tokenize=False, **kw)  # noqa: E731
    text = render(messages)
    segments, done = [], 0
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        start, end = len(render(messages[:i], add_generation_prompt=True)), len(render(messages[:i + 1]))
        if not (done <= start <= end <= len(text)):
            raise ValueError("the tokenizer's chat template does not render a conversation as the prefixes of its "
                             "turns, so assistant turns cannot be found in it; use template 'koalpaca'")
        segments += [(text[done:start], False), (text[start:end], True)]
        done = end
    if done < len(text):
        segments.append((text[done:], False))
    return [(piece, trained) for piece, trained in segments if piece]


def full_text(row: dict, tokenizer, template: str = "koalpaca") -> str:
    """The whole training text of a row of any shape, without the final EOS (as the blog recipe feeds it)."""
    shape = row_shape(row)
    if shape == "text":
        return _text_body(row["text"], tokenizer)
    if shape == "messages":
        return "".join(piece for piece, _ in conversation_segments(row["messages"], tokenizer, template))
    return format_prompt(row["instruction"], row.get("context", ""), tokenizer, template) + \
        format_answer(row["output"], template)


def _text_body(text: str, tokenizer) -> str:
    # Transcripts made for SFTTrainer often end in the EOS text already (Unsloth's "+ EOS_TOKEN"); the one
    # trained EOS is appended as an id, so a second one is cut here.
    eos = getattr(tokenizer, "eos_token", None)
    return text[: -len(eos)].rstrip() if eos and text.endswith(eos) else text


# --------------------------------------------------------------------------------------------- labels

def pad_masks_eos(tokenizer) -> bool:
    return tokenizer.pad_token_id is not None and tokenizer.pad_token_id == tokenizer.eos_token_id


def prepare_tokenizer(tokenizer, recipe: str) -> bool:
    """Set padding for a label recipe. Never adds a token, so it always returns False (nothing to resize).

    ``seed`` copies the blog (pad = eos, with the LM collator that masks every pad id, EOS included).
    ``fixed`` keeps the tokenizer's pad token, or uses the EOS when it has none: its collator masks padding by
    position (labels padded with -100, attention_mask 0), so pad = eos costs nothing and every real EOS keeps its
    label. (Adding a pad token would make the embeddings grow, and PEFT would then save both embedding matrices
    into every adapter: gigabytes for an 8B model.)
    """
    if recipe not in LABEL_RECIPES:
        raise ValueError(f"unknown label recipe {recipe!r}; choose 'seed' or 'fixed'")
    tokenizer.padding_side = "right"
    if recipe == "seed":
        tokenizer.pad_token = tokenizer.eos_token
        warnings.warn("label recipe 'seed': pad_token = eos_token, so DataCollatorForLanguageModeling masks every "
                      "EOS label and the model never learns to stop. Use recipe 'fixed' to train the EOS.",
                      stacklevel=2)
        return False
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return False


def _ids(tokenizer, text: str, first: bool, split_special: bool) -> list[int]:
    """Token ids of one piece; only the first piece of an example gets the tokenizer's BOS (and none if the text
    already starts with the BOS text, as chat templates render it)."""
    bos = getattr(tokenizer, "bos_token", None)
    add_special = first and not (bos and text.startswith(bos))
    return tokenizer(text, add_special_tokens=add_special, split_special_tokens=split_special)["input_ids"]


def encode_example(row: dict, tokenizer, recipe: str, template: str = "koalpaca", max_length: int = 512) -> dict:
    """Token ids (and, for ``fixed``, labels) of one row of any shape.

    seed: the blog's text ``full_text + eos_token`` tokenized as one string; labels come later from the LM
    collator, which copies input_ids and masks pad (= eos) positions.
    fixed: instruction rows train the answer and exactly one appended EOS id (prompt labels -100); text rows train
    every token and one appended EOS; messages rows train each assistant turn, each ending in a trained EOS (with
    the chat template, the template's own end-of-turn marker, plus one EOS at the end). A row truncated to
    max_length loses its tail and its EOS (it never finished, so it must not teach stopping there).
    """
    if recipe not in LABEL_RECIPES:
        raise ValueError(f"unknown label recipe {recipe!r}; choose 'seed' or 'fixed'")
    if recipe == "seed":
        text = full_text(row, tokenizer, template) + tokenizer.eos_token
        ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}
    shape = row_shape(row)
    if shape == "text":
        # Transcripts are trained as SFTTrainer reads them: special-token text in them (a chat template's
        # markers) stays a special token.
        ids = _ids(tokenizer, _text_body(row["text"], tokenizer), first=True, split_special=False)
        ids, labels = ids + [tokenizer.eos_token_id], ids + [tokenizer.eos_token_id]
    elif shape == "messages":
        ids, labels = _encode_segments(conversation_segments(row["messages"], tokenizer, template), tokenizer,
                                       template)
    else:
        # split_special_tokens: a row that mentions "<eos>" as text must not put a real EOS mid-answer.
        prompt_ids = tokenizer(format_prompt(row["instruction"], row.get("context", ""), tokenizer, template),
                               split_special_tokens=True)["input_ids"]
        answer_ids = tokenizer(format_answer(row["output"], template), add_special_tokens=False,
                               split_special_tokens=True)["input_ids"]
        ids = prompt_ids + answer_ids + [tokenizer.eos_token_id]
        labels = [IGNORE_INDEX] * len(prompt_ids) + answer_ids + [tokenizer.eos_token_id]
    ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def _encode_segments(segments, tokenizer, template) -> tuple[list[int], list[int]]:
    chat = _uses_chat_template(template)
    ids, labels = [], []
    for i, (piece, trained) in enumerate(segments):
        if piece == tokenizer.eos_token and trained and not chat:
            piece_ids = [tokenizer.eos_token_id]  # the EOS after an answer, as an id (user text cannot make one)
        else:
            # Template text is split like instruction rows are; a chat template's markers must stay tokens.
            piece_ids = _ids(tokenizer, piece, first=(i == 0), split_special=not chat)
        ids += piece_ids
        labels += piece_ids if trained else [IGNORE_INDEX] * len(piece_ids)
    if not ids or ids[-1] != tokenizer.eos_token_id:
        ids, labels = ids + [tokenizer.eos_token_id], labels + [tokenizer.eos_token_id]
    return ids, labels


def tokenize_dataset(dataset, tokenizer, recipe: str, template: str = "koalpaca", max_length: int = 512):
    """Apply :func:`encode_example` to every split of a DatasetDict (or one Dataset)."""
    columns = dataset["train"].column_names if hasattr(dataset, "keys") else dataset.column_names
    return dataset.map(lambda row: encode_example(row, tokenizer, recipe, template, max_length),
                       remove_columns=columns, desc=f"tokenizing ({recipe})")


def make_collator(tokenizer, recipe: str):
    """``seed``: the blog's DataCollatorForLanguageModeling(mlm=False). ``fixed``: pads labels with -100."""
    from transformers import DataCollatorForLanguageModeling, DataCollatorForSeq2Seq

    if recipe == "seed":
        if pad_masks_eos(tokenizer):
            warnings.warn("pad_token == eos_token: the LM collator will mask every EOS label", stacklevel=2)
        return DataCollatorForLanguageModeling(tokenizer, mlm=False)
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, padding=True)


def label_stats(batch, tokenizer) -> dict:
    """Share of trained tokens and count of trained EOS labels in a collated batch."""
    labels = batch["labels"]
    real = batch["attention_mask"].bool()
    trained = labels != IGNORE_INDEX
    return {"examples": int(labels.shape[0]), "real_tokens": int(real.sum()), "trained_tokens": int(trained.sum()),
            "trained_share": float(trained.sum() / real.sum().clamp(min=1)),
            "trained_eos": int((labels == tokenizer.eos_token_id).sum()),
            "trained_eos_per_example": [int(n) for n in (labels == tokenizer.eos_token_id).sum(dim=1)]}


def inspect_labels(batch, tokenizer, example: int = 0):
    """A table of one example in a collated batch: each token, its id, and whether it is trained."""
    import pandas as pd

    ids = batch["input_ids"][example].tolist()
    labels = batch["labels"][example].tolist()
    mask = batch["attention_mask"][example].tolist()
    return pd.DataFrame({"token": tokenizer.convert_ids_to_tokens(ids), "id": ids, "label": labels,
                         "trained": [lab != IGNORE_INDEX for lab in labels],
                         "padding": [m == 0 for m in mask]})


def sequence_stats(tokenized, max_length: int) -> dict:
    """Token length statistics per split of a tokenized DatasetDict."""
    import numpy as np

    stats = {}
    for split in tokenized:
        lengths = np.array([len(ids) for ids in tokenized[split]["input_ids"]])
        stats[split] = {"rows": int(len(lengths)), "tokens": int(lengths.sum()), "mean": float(lengths.mean()),
                        "p50": float(np.percentile(lengths, 50)), "p95": float(np.percentile(lengths, 95)),
                        "max": int(lengths.max()), "share_truncated": float((lengths >= max_length).mean()),
                        "lengths": lengths.tolist()}
    return stats


# --------------------------------------------------------------------------------------------- command line

def _length_tokenizer(model: str | None):
    """``(tokenizer, why_not)``: the tokenizer for the length check (the embedded one by default), or None and the
    reason it could not be loaded."""
    from helpers.models import load_tokenizer

    try:
        return load_tokenizer(model or "embedded", verbose=False), ""
    except Exception as err:  # any failure to load means the same to the user: lengths go unchecked
        if model:
            raise DataError(f"cannot load the tokenizer {model!r} for the length check: "
                            f"{type(err).__name__}: {_printable(str(err), 200)}") from None
        return None, f"{type(err).__name__}: {_printable(str(err), 200)}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers.data",
                                     description="Check a data file (instruction, text or messages rows) before a "
                                                 "long run.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate a file and print the report")
    check.add_argument("path", help="a .jsonl/.json/.csv/.parquet file, 'shipped', or a hub id")
    check.add_argument("--model", default=None,
                       help="tokenizer for the length check (model id, folder, 'embedded'; default: the embedded one)")
    check.add_argument("--max-length", type=int, default=512)
    check.add_argument("--too-long", choices=TOO_LONG_ACTIONS, default="truncate")
    check.add_argument("--template", choices=sorted(prompt_templates()), default="koalpaca",
                       help="prompt template the lengths are measured with")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    try:
        check_source(args.path)  # a missing file is reported before a tokenizer is loaded
        tokenizer, why_not = _length_tokenizer(args.model)
        _, report = load_instructions(args.path, tokenizer=tokenizer, max_length=args.max_length,
                                      too_long=args.too_long, template=args.template, verbose=False)
    except (DataError, ValueError) as err:  # ValueError: a template the tokenizer cannot render
        print(f"cannot use {_printable(args.path, 200)}: {err}", file=sys.stderr)
        return 1
    if tokenizer is None:
        report.note(f"length not checked: the embedded tokenizer could not be loaded ({why_not}); "
                    f"pass --model to check lengths with another tokenizer")
    print(json.dumps(report.as_dict(), ensure_ascii=False, indent=1) if args.json else report.text(limit=10_000))
    return 0


if __name__ == "__main__":
    sys.exit(main())
