"""load_instructions: a source read, validated and split into ``DatasetDict(train, eval)`` with its report; and the
hash of a local source for run cards."""
from __future__ import annotations

import hashlib
import random
from pathlib import Path

from helpers.data.prompts import _check_template, full_text
from helpers.data.reports import DataError, DataReport, Problem
from helpers.data.sources import SHIPPED, SHIPPED_DIR, read_rows
from helpers.data.validation import validate_rows

# Columns the shapes fill; a file that mixes shapes gets every column, None where a row's shape has no such field.
ROW_COLUMNS = ("instruction", "output", "context", "url", "text", "messages")


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
    import datasets  # imported when used, so that `import helpers.data` and check_source stay fast

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
