"""The three row shapes (instruction, text, messages) and their validation: each row cleaned or reported by row
number and field, exact duplicates dropped, over-long rows truncated, dropped or refused."""
from __future__ import annotations

from helpers.data.reports import DataError, DataReport, _printable

REQUIRED_FIELDS = ("instruction", "output")
OPTIONAL_TEXT_FIELDS = ("context", "url")
CONTEXT_ALIASES = ("context", "input")  # Alpaca and KULLM call the context "input"
ROW_SHAPES = ("instruction", "text", "messages")
ROLES = ("system", "user", "assistant")
TOO_LONG_ACTIONS = ("truncate", "drop", "refuse")


def row_shape(record: dict) -> str:
    """``"messages"``, ``"text"`` or ``"instruction"`` (the default, so that a row of an unknown shape is reported
    as missing its instruction fields). A row with both instruction fields and a ``text`` is an instruction row."""
    given = {name for name, value in record.items() if value is not None}
    if "messages" in given and "instruction" not in given:
        return "messages"
    if "text" in given and not given & {*REQUIRED_FIELDS, "input"}:
        return "text"
    return "instruction"



def _looks_like_row(record: dict) -> bool:
    return any(name in record for name in (*REQUIRED_FIELDS, *CONTEXT_ALIASES, "text", "messages"))


def _is_nan(value) -> bool:
    return value is None or (isinstance(value, float) and value != value)

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
