"""Reading local data files: the encoding (UTF-8, UTF-8 with BOM, CP949), JSON Lines and JSON arrays read row by row
so that a broken row is reported and the others kept, and CSV and parquet tables."""
from __future__ import annotations

import codecs
import io
import json
import re
import sys
from pathlib import Path

from helpers.data.reports import ENCODING_NAMES, DataError, DataReport, _printable
from helpers.data.validation import REQUIRED_FIELDS, _is_nan, _looks_like_row

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
    import pandas as pd  # imported when used: slow to import, and only csv and parquet files need it

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
