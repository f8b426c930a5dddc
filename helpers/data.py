"""Korean instruction data in the KoAlpaca v1.1a schema: loading, validation, prompts, labels, statistics.

Rows have ``instruction`` and ``output`` (required, non-empty strings), ``url`` (optional) and ``context``
(optional; rendered as a ``### 맥락:`` block). One loader takes the shipped set, a local json/jsonl/csv/parquet
file or a hub id and returns a ``datasets.DatasetDict`` with ``train`` and ``eval`` splits plus a report of
every problem found, by row number and field.

Run before a long job:  ``python -m helpers.data check PATH``
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

RESOURCES = Path(__file__).parent / "resources"
SHIPPED = "shipped"
SHIPPED_DIR = RESOURCES / "ko_instructions"
REQUIRED_FIELDS = ("instruction", "output")
OPTIONAL_TEXT_FIELDS = ("context", "url")
TOO_LONG_ACTIONS = ("truncate", "drop", "refuse")
LABEL_RECIPES = ("seed", "fixed")
IGNORE_INDEX = -100  # the label value transformers' losses skip


class DataError(ValueError):
    """The data cannot be used at all (missing file, unknown format, no usable row, a refused row)."""


# --------------------------------------------------------------------------------------------- loading

@dataclass
class Problem:
    row: int  # 1-based row number in the source (line number for jsonl, data row for csv/parquet)
    field: str
    kind: str  # missing | empty | wrong_type | invalid_json | undecodable | too_long | duplicate
    detail: str = ""


@dataclass
class DataReport:
    source: str
    rows_read: int = 0
    rows_kept: int = 0
    truncated: int = 0
    problems: list[Problem] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return dict(Counter(p.kind for p in self.problems))

    def add(self, row, field_name, kind, detail=""):
        self.problems.append(Problem(row, field_name, kind, detail))

    def as_dict(self) -> dict:
        return {"source": self.source, "rows_read": self.rows_read, "rows_kept": self.rows_kept,
                "truncated": self.truncated, "problem_counts": self.counts(),
                "problems": [vars(p) for p in self.problems]}

    def text(self, limit: int = 50) -> str:
        lines = [f"{self.source}: {self.rows_read} rows read, {self.rows_kept} kept, {self.truncated} truncated"]
        for kind, n in sorted(self.counts().items()):
            lines.append(f"  {kind}: {n}")
        for p in self.problems[:limit]:
            lines.append(f"  row {p.row} field {p.field}: {p.kind}{' - ' + p.detail if p.detail else ''}")
        if len(self.problems) > limit:
            lines.append(f"  ... {len(self.problems) - limit} more")
        return "\n".join(lines)


def _read_jsonl(path: Path, report: DataReport) -> list[tuple[int, object]]:
    # Parsed line by line (not with datasets' json reader) so that one bad line is reported by number
    # instead of failing the whole file.
    rows = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                report.add(number, "*", "undecodable", f"byte {err.start}: not UTF-8")
                continue
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as err:
                report.add(number, "*", "invalid_json", err.msg)
    return rows


def _read_json(path: Path, report: DataReport) -> list[tuple[int, object]]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text (byte {err.start})") from None
    stripped = text.lstrip()
    if not stripped.startswith("["):
        return _read_jsonl(path, report)  # many ".json" files are really JSON Lines
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON: {err.msg} at line {err.lineno}") from None
    return list(enumerate(data, start=1))


def _read_table(path: Path) -> list[tuple[int, object]]:
    import pandas as pd

    try:
        frame = pd.read_csv(path, dtype=object, keep_default_na=False) if path.suffix.lower() == ".csv" \
            else pd.read_parquet(path)
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text (byte {err.start})") from None
    except Exception as err:  # pandas raises many types for unreadable files
        raise DataError(f"cannot read {path}: {type(err).__name__}: {err}") from None
    missing = [name for name in REQUIRED_FIELDS if name not in frame.columns]
    if missing:
        raise DataError(f"{path} has no column {missing}; KoAlpaca files need columns instruction, output (url optional)")
    # Empty cells come back as None or NaN depending on the column type; both mean "missing".
    return [(i, {k: (None if _is_nan(v) else v) for k, v in rec.items()})
            for i, rec in enumerate(frame.to_dict(orient="records"), start=1)]


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
        return _read_table(path)
    return _read_hub(str(source), revision)


def check_source(source: str) -> str:
    """``"shipped"``, ``"file"`` or ``"hub"``; a DataError for a missing or unsupported file. Cheap, so a run
    can check its data before it loads a model."""
    if source == SHIPPED:
        return SHIPPED
    path = Path(source).expanduser()
    if path.suffix.lower() in (".jsonl", ".json", ".csv", ".parquet"):
        if not path.is_file():
            raise DataError(f"data file not found: {path}")
        return "file"
    if path.exists():
        raise DataError(f"unsupported data file {path}: use .jsonl, .json, .csv or .parquet")
    if str(source).startswith((".", "/", "~")) or str(source).count("/") != 1:
        raise DataError(f"data file not found and not a hub id (owner/name): {source}")
    return "hub"


def validate_rows(rows, report: DataReport, formatter=None, tokenizer=None, max_length: int | None = None,
                  too_long: str = "truncate") -> list[dict]:
    """Keep the usable rows; record each problem in ``report``.

    Rows longer than ``max_length`` tokens (needs ``tokenizer``) are kept and marked for truncation,
    dropped, or refused with a DataError, by ``too_long``. Exact duplicates (same instruction, context
    and output) are dropped after the first.
    """
    if too_long not in TOO_LONG_ACTIONS:
        raise ValueError(f"too_long must be one of {TOO_LONG_ACTIONS}, not {too_long!r}")
    kept, seen = [], {}
    for number, record in rows:
        report.rows_read += 1
        if not isinstance(record, dict):
            report.add(number, "*", "wrong_type", f"row is {type(record).__name__}, not an object")
            continue
        clean, ok = {}, True
        for name in REQUIRED_FIELDS:
            value = record.get(name)
            if name not in record or value is None:
                report.add(number, name, "missing"); ok = False
            elif not isinstance(value, str):
                report.add(number, name, "wrong_type", f"{type(value).__name__}, not text"); ok = False
            elif not value.strip():
                report.add(number, name, "empty"); ok = False
            else:
                clean[name] = value.strip()
        for name in OPTIONAL_TEXT_FIELDS:
            value = record.get(name)
            if _is_nan(value):
                clean[name] = ""
            elif not isinstance(value, str):
                report.add(number, name, "wrong_type", f"{type(value).__name__}, not text"); ok = False
            else:
                clean[name] = value.strip()
        if not ok:
            continue
        key = (clean["instruction"], clean["context"], clean["output"])
        if key in seen:
            report.add(number, "instruction", "duplicate", f"same as row {seen[key]}")
            continue
        seen[key] = number
        clean["row"] = number
        if tokenizer is not None and max_length:
            n_tokens = len(tokenizer(formatter(clean) if formatter else clean["instruction"] + clean["output"])
                           ["input_ids"]) + 1
            if n_tokens > max_length:
                report.add(number, "output", "too_long", f"{n_tokens} tokens > {max_length} ({too_long})")
                if too_long == "refuse":
                    raise DataError(f"row {number} is {n_tokens} tokens, longer than max_length {max_length}; "
                                    f"pass too_long='truncate' or 'drop' to go on")
                if too_long == "drop":
                    continue
                report.truncated += 1
        kept.append(clean)
    report.rows_kept = len(kept)
    return kept


def load_instructions(source: str = SHIPPED, eval_fraction: float = 0.1, seed: int = 42, tokenizer=None,
                      max_length: int | None = None, too_long: str = "truncate", template: str = "koalpaca",
                      revision: str | None = None, max_rows: int | None = None, verbose: bool = True):
    """Load KoAlpaca-schema rows into ``DatasetDict(train, eval)`` and return ``(dataset, report)``.

    source: ``"shipped"`` (the project's Korean set, its own train/eval files), a local .jsonl/.json/.csv/
    .parquet file, or a hub id such as ``beomi/KoAlpaca-v1.1a``. Other sources are split deterministically
    by ``seed`` with ``eval_fraction`` of the rows held out. max_rows caps each split (for quick runs).
    """
    import datasets

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
    return datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()}), report


def _merge_reports(name, reports):
    merged = DataReport(name)
    for r in reports:
        merged.rows_read += r.rows_read
        merged.rows_kept += r.rows_kept
        merged.truncated += r.truncated
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


def format_prompt(instruction: str, context: str = "", tokenizer=None, template: str = "koalpaca") -> str:
    """The prompt text up to where the answer starts."""
    spec = prompt_templates()[template]
    if spec.get("use_chat_template"):
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'chat' needs a tokenizer that has a chat template; use 'koalpaca'")
        content = f"{context}\n\n{instruction}" if context else instruction
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    pattern = spec["prompt_with_context"] if context else spec["prompt"]
    return pattern.format(instruction=instruction, context=context)


def format_answer(output: str, template: str = "koalpaca") -> str:
    spec = prompt_templates()[template]
    return spec.get("answer", "{output}").format(output=output)


def full_text(row: dict, tokenizer, template: str = "koalpaca") -> str:
    """Prompt and answer as one string (no EOS), as the blog recipe feeds it."""
    return format_prompt(row["instruction"], row.get("context", ""), tokenizer, template) + \
        format_answer(row["output"], template)


# --------------------------------------------------------------------------------------------- labels

def pad_masks_eos(tokenizer) -> bool:
    return tokenizer.pad_token_id is not None and tokenizer.pad_token_id == tokenizer.eos_token_id


def prepare_tokenizer(tokenizer, recipe: str):
    """Set padding for a label recipe. ``seed`` copies the blog (pad = eos); ``fixed`` needs a real pad token.

    For ``fixed`` a tokenizer without a distinct pad token gets ``<|pad|>`` added; the caller must then
    resize the model's embeddings (``model.resize_token_embeddings(len(tokenizer))``). Returns True if a
    token was added.
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
    if tokenizer.pad_token is None or pad_masks_eos(tokenizer):
        tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
        return True
    return False


def encode_example(row: dict, tokenizer, recipe: str, template: str = "koalpaca", max_length: int = 512) -> dict:
    """Token ids (and, for ``fixed``, labels) of one row.

    seed: the blog's text ``prompt + answer + eos_token`` tokenized as one string; labels come later from
    the LM collator, which copies input_ids and masks pad (= eos) positions.
    fixed: prompt tokens get label -100, answer tokens are trained, and exactly one EOS id is appended and
    trained. A row truncated to max_length loses its tail and its EOS (it never finished, so it must not
    teach stopping there).
    """
    if recipe == "seed":
        text = full_text(row, tokenizer, template) + tokenizer.eos_token
        ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}
    # split_special_tokens: a row that mentions "<eos>" as text must not put a real EOS mid-answer.
    prompt_ids = tokenizer(format_prompt(row["instruction"], row.get("context", ""), tokenizer, template),
                           split_special_tokens=True)["input_ids"]
    answer_ids = tokenizer(format_answer(row["output"], template), add_special_tokens=False,
                           split_special_tokens=True)["input_ids"]
    ids = prompt_ids + answer_ids + [tokenizer.eos_token_id]
    labels = [IGNORE_INDEX] * len(prompt_ids) + answer_ids + [tokenizer.eos_token_id]
    ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


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

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers.data",
                                     description="Check a KoAlpaca-format data file before a long run.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate a file and print the report")
    check.add_argument("path", help="a .jsonl/.json/.csv/.parquet file, 'shipped', or a hub id")
    check.add_argument("--model", default=None, help="tokenizer for the length check (model id, folder, 'embedded')")
    check.add_argument("--max-length", type=int, default=512)
    check.add_argument("--too-long", choices=TOO_LONG_ACTIONS, default="truncate")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    tokenizer = None
    if args.model:
        from helpers.models import load_tokenizer
        tokenizer = load_tokenizer(args.model)
    try:
        _, report = load_instructions(args.path, tokenizer=tokenizer, max_length=args.max_length,
                                      too_long=args.too_long, verbose=False)
    except DataError as err:
        print(f"cannot use {args.path}: {err}", file=sys.stderr)
        return 1
    print(json.dumps(report.as_dict(), ensure_ascii=False, indent=1) if args.json else report.text(limit=10_000))
    return 0


if __name__ == "__main__":
    sys.exit(main())
