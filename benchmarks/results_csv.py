"""The benchmarks' result files: one CSV per benchmark, rows appended, the header written with the first row."""
from __future__ import annotations

import csv
from pathlib import Path


def append_rows(path: Path, rows: list[dict], columns: list[str]):
    path.parent.mkdir(parents=True, exist_ok=True)
    new_file = not path.exists()
    with path.open("a", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        if new_file:
            writer.writeheader()
        writer.writerows(rows)
