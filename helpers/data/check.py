"""The ``check`` command line: ``python -m helpers.data check PATH`` validates a file and prints the report."""
from __future__ import annotations

import argparse
import json
import sys

from helpers.data.loading import load_instructions
from helpers.data.prompts import prompt_templates
from helpers.data.reports import DataError, _printable
from helpers.data.sources import check_source
from helpers.data.validation import TOO_LONG_ACTIONS


def _length_tokenizer(model: str | None):
    """``(tokenizer, why_not)``: the tokenizer for the length check (the embedded one by default), or None and the
    reason it could not be loaded."""
    # imported when used: helpers.models loads torch, which a missing file need not wait for
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
