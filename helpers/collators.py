"""The collators of a training run: packed rows for a recipe with ``packing``, the label recipe's padding collator
otherwise; both put the batch's count of real (not padding) tokens under ``REAL_TOKENS`` for LabTrainer."""
from __future__ import annotations

import torch
from transformers import DataCollatorWithFlattening

from helpers import data as data_mod
from helpers.recipes import Recipe
from helpers.trainer import REAL_TOKENS


def pack_rows(lengths: list[int], row_tokens: int) -> list[list[int]]:
    """Indices of examples of these ``lengths`` grouped into rows of at most ``row_tokens`` tokens, longest first,
    each into the first row with room (first-fit decreasing: rows end up nearly full)."""
    rows, room = [], []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if lengths[index] <= free), None)
        if row is None:
            rows.append([index])
            room.append(max(row_tokens, lengths[index]) - lengths[index])
        else:
            rows[row].append(index)
            room[row] -= lengths[index]
    return rows


class PackedRows:
    """The collator of a recipe with ``packing``: a batch's examples end to end, without padding between them, in
    rows of at most ``row_tokens`` tokens, each row flattened by transformers' ``DataCollatorWithFlattening``.

    No attention mask: ``position_ids`` restart at 0 for every example, and transformers' sdpa and eager masks
    (masking_utils.find_packed_sequence_indices, 5.23) then let a token attend only to earlier tokens of its own
    example, in full and sliding-window layers alike; the first label of every example is -100, so no example
    learns to predict the next one's start. Rows, rather than one row for the whole batch: sdpa and eager attention
    compute and mask every pair of positions in a row, so a 16k-token row would cost 16k x 16k scores a head and
    layer. The rows are padded to the longest (few tokens: the rows are nearly full) with a run of pad tokens that
    restarts its own positions and has no labels. Each batch carries its count of real tokens (REAL_TOKENS).
    """

    def __init__(self, pad_token_id: int, row_tokens: int):
        self.pad_token_id, self.row_tokens = pad_token_id, row_tokens
        self.flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=data_mod.IGNORE_INDEX)

    def __call__(self, features: list[dict]) -> dict:
        rows = pack_rows([len(f["input_ids"]) for f in features], self.row_tokens)
        flat = [self.flatten([{"input_ids": features[i]["input_ids"], "labels": features[i]["labels"]} for i in row])
                for row in rows]
        width = max(row["input_ids"].shape[1] for row in flat)
        fill = {"input_ids": self.pad_token_id, "labels": data_mod.IGNORE_INDEX}
        batch = {}
        for key in ("input_ids", "labels", "position_ids"):
            padded = []
            for row in flat:
                missing = width - row[key].shape[1]
                tail = (torch.arange(missing) if key == "position_ids" else torch.full((missing,), fill[key]))
                padded.append(torch.cat([row[key][0], tail.to(row[key].dtype)]))
            batch[key] = torch.stack(padded)
        batch[REAL_TOKENS] = sum(row["input_ids"].shape[1] for row in flat)
        return batch


class CountingCollator:
    """A padding collator whose batches also carry their count of real tokens (REAL_TOKENS), from the attention
    mask on the host, so that counting them costs the GPU nothing."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, features: list[dict]) -> dict:
        batch = self.collate(features)
        batch[REAL_TOKENS] = int(batch["attention_mask"].sum())
        return batch


def make_training_collator(tokenizer, recipe: Recipe):
    """The collator of a run: packed rows for a recipe with ``packing``, the label recipe's padding collator
    otherwise; both count real tokens."""
    if recipe.packing:
        return PackedRows(tokenizer.pad_token_id, recipe.max_length)
    return CountingCollator(data_mod.make_collator(tokenizer, recipe.labels))
