"""What a data check found: the report of the rows read and kept, with every problem by row and field, and the
error for data that cannot be used at all."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

ENCODING_NAMES = {"utf-8": "UTF-8", "utf-8-sig": "UTF-8 with BOM", "cp949": "CP949 (Korean Windows)"}


class DataError(ValueError):
    """The data cannot be used at all (missing file, unknown format, no usable row, a refused row)."""


DataError.__module__ = "helpers.data"  # tracebacks name it as users import it: helpers.data.DataError


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
