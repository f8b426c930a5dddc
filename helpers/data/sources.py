"""Where rows come from: the shipped set, a local file or a hub id, and the cheap check of a source before a run
(a mistyped local path is reported missing, never sent to the hub)."""
from __future__ import annotations

import difflib
import os
import re
from pathlib import Path

from helpers.data.files import _read_json, _read_jsonl, _read_table
from helpers.data.reports import DataError, DataReport

RESOURCES = Path(__file__).parent.parent / "resources"
SHIPPED = "shipped"
SHIPPED_DIR = RESOURCES / "ko_instructions"
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def _read_hub(name: str, revision: str | None) -> list[tuple[int, object]]:
    import datasets  # imported when used: slow to import, and only hub ids need it here

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
