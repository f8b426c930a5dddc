"""Trained adapters: load one onto its base, merge it into a 16-bit copy, and check that merging changed nothing.

A merged model is what users export and serve; the check tells them whether it still answers like the adapter.
Merging rounds ``W + BA`` to bf16 once, and bf16 rounding already moves the logits of the unmerged adapter, so the
merged model's logit error (against the adapter in fp32) is judged against the unmerged bf16 model's own error.
"""
from __future__ import annotations

import gc
import shutil
import time
from pathlib import Path

import torch
from peft import PeftModel
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from helpers.data import format_prompt
from helpers.evaluation import ask, padding_tokenizer
from helpers.models import load_model
from helpers.outputs import project_root, publish_folder, restore_replaced, writing_into


def load_adapter(base, adapter_dir, is_trainable: bool = False):
    """``(peft_model, tokenizer)``: the adapter in ``adapter_dir`` on ``base``, with the tokenizer saved beside it
    (the one it was trained with; an adapter folder holds no model, so it is read directly, never running code).
    A tokenizer without a pad gets its EOS as pad: batches are masked by position."""
    return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=is_trainable), adapter_tokenizer(adapter_dir)


def adapter_tokenizer(adapter_dir):
    """The tokenizer saved beside an adapter, with its EOS as pad when it has none."""
    return padding_tokenizer(AutoTokenizer.from_pretrained(str(adapter_dir), trust_remote_code=False))


def _adapter_logits(model_id, revision, adapter_dir, precision, probe, merge=False):
    device_map = {"": 0} if torch.cuda.is_available() else None  # straight to the GPU, not through host memory
    base, _ = load_model(model_id, revision=revision, quantization="none", precision=precision, device_map=device_map,
                         verbose=False)
    model, _ = load_adapter(base, adapter_dir)
    model = model.merge_and_unload() if merge else model
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(**{k: v.to(device) for k, v in probe.items()}).logits.float().cpu()
    return model, logits


def merge_check(model_id: str, adapter_dir, rows: list[dict], revision: str | None = None, tolerance: float = 2.0,
                speed_tokens: int = 64) -> tuple[dict, torch.nn.Module, object]:
    """Merge ``adapter_dir`` into a bf16 copy of ``model_id`` and compare logits on the prompts of ``rows``.

    Returns ``(report, merged_model, tokenizer)``. The report holds the mean and largest |logit error| of the merged
    and the unmerged bf16 models against the adapter in fp32, their top-1 agreement, generation speed of both, and
    ``within_tolerance``: merged mean error <= ``tolerance`` x unmerged mean error.
    """
    tokenizer = adapter_tokenizer(adapter_dir)
    probe = tokenizer([format_prompt(r["instruction"], r.get("context", "")) for r in rows], return_tensors="pt",
                      padding=True)
    mask = probe["attention_mask"].bool()
    stages = tqdm(total=3, desc="merge check: adapter in fp32", leave=False)
    reference_model, reference = _adapter_logits(model_id, revision, adapter_dir, "fp32", probe)
    del reference_model; gc.collect()
    stages.update(1)
    stages.set_description("merge check: unmerged adapter in bf16")
    unmerged, unmerged_logits = _adapter_logits(model_id, revision, adapter_dir, "bf16", probe)
    speed_unmerged = ask(unmerged, tokenizer, rows[0]["instruction"], stream=False, max_new_tokens=speed_tokens,
                         do_sample=False)
    del unmerged; gc.collect()
    stages.update(1)
    stages.set_description("merge check: merged into bf16")
    merged, merged_logits = _adapter_logits(model_id, revision, adapter_dir, "bf16", probe, merge=True)
    speed_merged = ask(merged, tokenizer, rows[0]["instruction"], stream=False, max_new_tokens=speed_tokens,
                       do_sample=False)
    stages.update(1)
    stages.close()
    unmerged_error = (unmerged_logits - reference).abs()[mask]
    merged_error = (merged_logits - reference).abs()[mask]
    report = {
        "mean_abs_error_merged_bf16": float(merged_error.mean()),
        "mean_abs_error_unmerged_bf16": float(unmerged_error.mean()),
        "max_abs_error_merged_bf16": float(merged_error.max()),
        "max_abs_error_unmerged_bf16": float(unmerged_error.max()),
        "max_abs_diff_merged_vs_unmerged": float((merged_logits - unmerged_logits).abs()[mask].max()),
        "top1_agreement_merged_vs_fp32": float((merged_logits.argmax(-1) == reference.argmax(-1))[mask].float().mean()),
        "tolerance_factor": tolerance,
        "within_tolerance": bool(merged_error.mean() <= tolerance * unmerged_error.mean()),
        "unmerged_tokens_per_s": speed_unmerged["tokens_per_s"], "merged_tokens_per_s": speed_merged["tokens_per_s"],
    }
    return report, merged, tokenizer


def save_merged(model, tokenizer, folder) -> Path:
    """Write a merged model and its tokenizer to ``folder`` whole or not at all: into ``<folder>.partial`` first,
    renamed when complete, so an interrupted export never leaves a folder that looks usable (an earlier export
    there stays until the new one is complete)."""
    folder = Path(folder)
    restore_replaced(folder)
    staged = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staged, ignore_errors=True)
    with writing_into(folder.parent, "the merged model", intact=f"the earlier {folder.name}/ (if any)",
                      partial=staged):
        model.save_pretrained(staged, safe_serialization=True)
        tokenizer.save_pretrained(staged)
    return publish_folder(staged, folder)


def merge_and_export(model_id: str, adapter_dir, rows: list[dict], folder, label: str, revision: str | None = None,
                     tolerance: float = 2.0) -> dict:
    """:func:`merge_check`, then :func:`save_merged` into ``folder``: the check's report with the adapter's
    ``label``, where the merged model went (``saved_to``, from the project root when inside it) and the
    ``seconds`` both took. The export is written whatever the check says; the report says whether to trust it."""
    started = time.perf_counter()
    report, merged, tokenizer = merge_check(model_id, adapter_dir, rows, revision=revision, tolerance=tolerance)
    saved = save_merged(merged, tokenizer, folder)
    root = project_root().resolve()
    shown = saved.resolve().relative_to(root) if saved.resolve().is_relative_to(root) else saved
    report.update(adapter=label, saved_to=str(shown), seconds=round(time.perf_counter() - started, 1))
    return report
