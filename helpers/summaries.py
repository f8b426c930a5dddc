"""What each notebook records in its ``summary.json``: the numbers of its run, picked from the run's results.

One function per notebook; each returns the dict that :func:`helpers.outputs.write_summary` saves (it adds the
environment and the peak GPU memory). ``tests/notebook_checks`` reads these files after the notebook tests, and
:mod:`helpers.reports` writes each notebook's closing conclusion from them.
"""
from __future__ import annotations

import pandas as pd

# Run-card entries that every training summary carries.
TRAINING_KEYS = ("model_id", "revision", "precision", "global_step", "wall_seconds", "seconds_per_step",
                 "logged_losses", "final_train_loss", "collapse", "collapse_text", "stopped_at", "device",
                 "peak_gpu_allocated_gib", "peak_gpu_reserved_gib")


def _pick(run_summary: dict, keys) -> dict:
    return {key: run_summary[key] for key in keys}


def inference_summary(answers: pd.DataFrame, model_id: str, revision: str | None, quantization: str, precision: str,
                      load_seconds: float, max_new_tokens: int, device: str) -> dict:
    """Notebook 01: every answer (one row each, from :func:`helpers.evaluation.ask`) and their medians."""
    return {
        "notebook": "01_inference", "model_id": model_id, "revision": revision, "quantization": quantization,
        "precision": precision, "device": device, "load_seconds": load_seconds, "max_new_tokens": max_new_tokens,
        "answers": answers.to_dict(orient="records"), "questions": len(answers),
        "share_ended_with_eos": float(answers["ended_with_eos"].mean()),
        "median_time_to_first_token_s": float(answers["time_to_first_token_s"].median()),
        "median_tokens_per_s": float(answers["tokens_per_s"].median()),
    }


def smoke_summary(run, answer: dict, max_new_tokens: int) -> dict:
    """Notebook 02: the smoke run's card entries, its first and last logged loss, and the adapter's answer."""
    logged = run.summary["logged_losses"]
    return {
        "notebook": "02_qlora_smoke", "labels": run.recipe.labels,
        **_pick(run.summary, TRAINING_KEYS + ("trainable_parameters", "adapter_dir", "data_report")),
        "total_parameters": sum(p.numel() for p in run.model.parameters()),
        "lora_targets": sorted(run.model.peft_config["default"].target_modules),
        "loss_first_log": logged[0][1] if logged else None, "loss_last_log": logged[-1][1] if logged else None,
        "answer": answer, "answer_max_new_tokens": max_new_tokens,
    }


def training_summary(run, recipe_name: str) -> dict:
    """Notebook 03: the run card's entries (losses, eval losses, collapse, resume) under the recipe's name."""
    return {
        "notebook": "03_full_train", "recipe_name": recipe_name, "labels": run.recipe.labels,
        **_pick(run.summary, TRAINING_KEYS + ("data", "data_sha256", "eval_losses", "final_eval_loss",
                                              "resumed_from", "adapter_dir", "train_rows", "eval_rows")),
    }


def collapse_run_summary(run) -> dict:
    """One run of notebook 04: its card entries and the last learning rate and loss scale it reached."""
    return _pick(run.summary, ("precision", "global_step", "seconds_per_step", "wall_seconds", "logged_losses",
                               "collapse", "collapse_text", "stopped_at", "final_learning_rate", "final_loss_scale"))


def collapse_summary(run, comparison_run, failing: dict | None, probe, diagnosis: str, model_id: str,
                     learning_rate: float, max_steps: int, lora_targets: str) -> dict:
    """Notebook 04: the fp16 run (under ``blog``), the comparison run in a wider precision (under ``safe_precision``,
    if it ran), the replayed step and the first module that overflowed, and the diagnosis written from them."""
    runs = {"blog": collapse_run_summary(run)}
    if comparison_run is not None:
        runs["safe_precision"] = collapse_run_summary(comparison_run)
    return {
        "notebook": "04_loss_collapse_investigation", "model_id": model_id, "device": run.summary["device"],
        "learning_rate": learning_rate, "max_steps": max_steps, "lora_targets": lora_targets, "runs": runs,
        "first_nonfinite_module": probe.first_nonfinite if probe else None,
        "replayed_step": failing["step"] if failing else None, "diagnosis": diagnosis,
    }


def evaluation_summary(metrics: pd.DataFrame, results: dict, merge_report: dict | None, model_id: str,
                       quantization: str, generated: int, max_new_tokens: int, repetition_penalty: float,
                       generation_batch_size: int, device: str) -> dict:
    """Notebook 05: one metrics row per model (with the seconds it took), every answer, and the merge check."""
    return {
        "notebook": "05_inference_eval", "model_id": model_id, "quantization": quantization, "device": device,
        "generated": generated, "max_new_tokens": max_new_tokens,
        "repetition_penalty": repetition_penalty, "generation_batch_size": generation_batch_size,
        "metrics": metrics.reset_index().to_dict(orient="records"), "merge": merge_report,
        "answers": {label: answers for label, (_, answers) in results.items()},
    }
