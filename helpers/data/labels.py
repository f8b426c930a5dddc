"""Label recipes (``blog``, the blog's, and ``answer_only``): padding, a row encoded into ids and labels, the
collator, and statistics of the labels and lengths of encoded data."""
from __future__ import annotations

import hashlib
import warnings

from helpers.data.prompts import (
    _text_body,
    _uses_chat_template,
    conversation_segments,
    format_answer,
    format_prompt,
    full_text,
)
from helpers.data.validation import row_shape

LABEL_RECIPES = ("blog", "answer_only")
# Earlier names of the label recipes: a script or notebook that still passes one is told the new name.
RENAMED_LABEL_RECIPES = {"seed": "blog", "fixed": "answer_only"}
IGNORE_INDEX = -100  # the label value transformers' losses skip


def check_label_recipe(recipe: str) -> str:
    """``recipe`` if it names a label recipe; otherwise a ValueError that says which names there are."""
    if recipe in RENAMED_LABEL_RECIPES:
        raise ValueError(f"label recipe {recipe!r} is now called {RENAMED_LABEL_RECIPES[recipe]!r}")
    if recipe not in LABEL_RECIPES:
        raise ValueError(f"unknown label recipe {recipe!r}; choose one of {', '.join(map(repr, LABEL_RECIPES))}")
    return recipe


def pad_masks_eos(tokenizer) -> bool:
    return tokenizer.pad_token_id is not None and tokenizer.pad_token_id == tokenizer.eos_token_id


def prepare_tokenizer(tokenizer, recipe: str) -> bool:
    """Set padding for a label recipe. Never adds a token, so it always returns False (nothing to resize).

    ``blog`` copies the blog (pad = eos, with the LM collator that masks every pad id, EOS included).
    ``answer_only`` keeps the tokenizer's pad token, or uses the EOS when it has none: its collator masks padding by
    position (labels padded with -100, attention_mask 0), so pad = eos costs nothing and every real EOS keeps its
    label. (Adding a pad token would make the embeddings grow, and PEFT would then save both embedding matrices
    into every adapter: gigabytes for an 8B model.)
    """
    check_label_recipe(recipe)
    tokenizer.padding_side = "right"
    if recipe == "blog":
        tokenizer.pad_token = tokenizer.eos_token
        warnings.warn("label recipe 'blog': pad_token = eos_token, so DataCollatorForLanguageModeling masks every "
                      "EOS label and the model never learns to stop. Use label recipe 'answer_only' to train the EOS.",
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
    """Token ids (and, for ``answer_only``, labels) of one row of any shape.

    blog: the blog's text ``full_text + eos_token`` tokenized as one string; labels come later from the LM
    collator, which copies input_ids and masks pad (= eos) positions.
    answer_only: instruction rows train the answer and exactly one appended EOS id (prompt labels -100); text rows train
    every token and one appended EOS; messages rows train each assistant turn, each ending in a trained EOS (with
    the chat template, the template's own end-of-turn marker, plus one EOS at the end). A row truncated to
    max_length loses its tail and its EOS (it never finished, so it must not teach stopping there).
    """
    check_label_recipe(recipe)
    if recipe == "blog":
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
    if hasattr(dataset, "keys"):
        return type(dataset)({split: tokenize_dataset(part, tokenizer, recipe, template, max_length)
                              for split, part in dataset.items()})
    return dataset.map(lambda row: encode_example(row, tokenizer, recipe, template, max_length),
                       remove_columns=dataset.column_names, desc=f"tokenizing ({recipe})",
                       new_fingerprint=_encoding_fingerprint(dataset, tokenizer, recipe, template, max_length))


def _encoding_fingerprint(dataset, tokenizer, recipe, template, max_length) -> str:
    # datasets would otherwise pickle the whole tokenizer to name the result (about 20 s for a 262k vocabulary on
    # a CPU, most of a short run); everything the encoding depends on, hashed directly, takes milliseconds.
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = [dataset._fingerprint, recipe, template, str(max_length), backend.to_str() if backend else repr(tokenizer),
             str((tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id)),
             str(getattr(tokenizer, "chat_template", None))]
    return hashlib.sha256("\x00".join(parts).encode("utf-8", "surrogatepass")).hexdigest()[:16]


def make_collator(tokenizer, recipe: str):
    """``blog``: the blog's DataCollatorForLanguageModeling(mlm=False). ``answer_only``: pads labels with -100."""
    # imported when used, so that `import helpers.data` stays fast
    from transformers import DataCollatorForLanguageModeling, DataCollatorForSeq2Seq

    check_label_recipe(recipe)
    if recipe == "blog":
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
    import pandas as pd  # imported when used: slow to import

    ids = batch["input_ids"][example].tolist()
    labels = batch["labels"][example].tolist()
    mask = batch["attention_mask"][example].tolist()
    return pd.DataFrame({"token": tokenizer.convert_ids_to_tokens(ids), "id": ids, "label": labels,
                         "trained": [lab != IGNORE_INDEX for lab in labels],
                         "padding": [m == 0 for m in mask]})


def sequence_stats(tokenized, max_length: int) -> dict:
    """Token length statistics per split of a tokenized DatasetDict."""
    import numpy as np  # imported when used, so that `import helpers.data` needs only the standard library

    stats = {}
    for split in tokenized:
        lengths = np.array([len(ids) for ids in tokenized[split]["input_ids"]])
        stats[split] = {"rows": int(len(lengths)), "tokens": int(lengths.sum()), "mean": float(lengths.mean()),
                        "p50": float(np.percentile(lengths, 50)), "p95": float(np.percentile(lengths, 95)),
                        "max": int(lengths.max()), "share_truncated": float((lengths >= max_length).mean()),
                        "lengths": lengths.tolist()}
    return stats
