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

reports     DataError, DataReport and its problems
files       reading local files: encodings, JSON Lines, JSON arrays, CSV and parquet
sources     the shipped set, local files and hub ids: read_rows, check_source
validation  the row shapes and validate_rows
loading     load_instructions (train and eval splits) and file_sha256
prompts     prompt templates, conversations, full_text
labels      label recipes: prepare_tokenizer, encode_example, tokenize_dataset, make_collator, statistics
check       the ``check`` command line
"""
from helpers.data.check import main
from helpers.data.files import detect_encoding
from helpers.data.labels import (
    IGNORE_INDEX,
    LABEL_RECIPES,
    check_label_recipe,
    encode_example,
    inspect_labels,
    label_stats,
    make_collator,
    pad_masks_eos,
    prepare_tokenizer,
    sequence_stats,
    tokenize_dataset,
)
from helpers.data.loading import ROW_COLUMNS, file_sha256, load_instructions
from helpers.data.prompts import (
    TURN_SEPARATOR,
    conversation_segments,
    format_answer,
    format_prompt,
    full_text,
    prompt_templates,
)
from helpers.data.reports import ENCODING_NAMES, DataError, DataReport, Problem
from helpers.data.sources import (
    DATA_SUFFIXES,
    FILE_LIKE_SUFFIXES,
    RESOURCES,
    SHIPPED,
    SHIPPED_DIR,
    check_source,
    read_rows,
)
from helpers.data.validation import (
    CONTEXT_ALIASES,
    OPTIONAL_TEXT_FIELDS,
    REQUIRED_FIELDS,
    ROLES,
    ROW_SHAPES,
    TOO_LONG_ACTIONS,
    row_shape,
    validate_rows,
)

__all__ = [
    "CONTEXT_ALIASES", "DATA_SUFFIXES", "ENCODING_NAMES", "FILE_LIKE_SUFFIXES", "IGNORE_INDEX", "LABEL_RECIPES",
    "OPTIONAL_TEXT_FIELDS", "REQUIRED_FIELDS", "RESOURCES", "ROLES", "ROW_COLUMNS", "ROW_SHAPES", "SHIPPED",
    "SHIPPED_DIR", "TOO_LONG_ACTIONS", "TURN_SEPARATOR", "DataError", "DataReport", "Problem", "check_label_recipe",
    "check_source", "conversation_segments", "detect_encoding", "encode_example", "file_sha256", "format_answer",
    "format_prompt", "full_text", "inspect_labels", "label_stats", "load_instructions", "main", "make_collator",
    "pad_masks_eos", "prepare_tokenizer", "prompt_templates", "read_rows", "row_shape", "sequence_stats",
    "tokenize_dataset", "validate_rows",
]
