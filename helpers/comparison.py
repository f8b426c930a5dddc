"""Notebook 05's comparison: the base model and every adapter, each loaded fresh and measured the same way on the
same eval questions, then tabulated side by side."""
from __future__ import annotations

import gc
import time
from pathlib import Path

import pandas as pd

from helpers.adapters import load_adapter
from helpers.evaluation import answer_perplexity, evaluate_generations
from helpers.models import load_model, load_tokenizer
from helpers.outputs import project_root


def adapter_folders(adapters: dict[str, str]) -> dict[str, Path]:
    """label -> adapter folder, relative paths taken from the project root; an error names every folder that
    holds no adapter (notebook 03 writes them)."""
    folders = {label: Path(path) if Path(path).is_absolute() else project_root() / path
               for label, path in adapters.items()}
    missing = [str(folder) for folder in folders.values() if not (folder / "adapter_config.json").exists()]
    if missing:
        raise FileNotFoundError(f"adapter folders not found (run notebook 03 first): {missing}")
    return folders


def reference_lengths(model_id: str, rows: list[dict], revision: str | None = None) -> list[int]:
    """Tokens in each reference answer (``output``) with the base model's tokenizer, shortest first."""
    tokenizer = load_tokenizer(model_id, revision=revision, verbose=False)
    return sorted(len(ids) for ids in tokenizer([row["output"] for row in rows])["input_ids"])


def measure(label: str, model_id: str, generate_rows: list[dict], eval_rows: list[dict], adapter=None,
            revision: str | None = None, quantization: str = "4bit", attn_implementation: str | None = None,
            max_new_tokens: int = 160, repetition_penalty: float = 1.2, batch_size: int = 20,
            speed_rows: int = 3) -> tuple[dict, list[dict]]:
    """Load the base (and ``adapter`` on it, with the tokenizer it was trained with), answer ``generate_rows``
    greedily and score every reference answer of ``eval_rows``; free the model. Returns ``(metrics, answers)``
    as :func:`helpers.evaluation.evaluate_generations` does, with ``answer_perplexity`` and ``wall_seconds``."""
    started = time.perf_counter()
    model, tokenizer = load_model(model_id, revision=revision, quantization=quantization,
                                  attn_implementation=attn_implementation, verbose=False)
    if adapter is not None:
        model, tokenizer = load_adapter(model, adapter)
    model.eval()
    metrics, answers = evaluate_generations(model, tokenizer, generate_rows, label, max_new_tokens=max_new_tokens,
                                            repetition_penalty=repetition_penalty, batch_size=batch_size,
                                            speed_rows=speed_rows)
    metrics["answer_perplexity"] = answer_perplexity(model, tokenizer, eval_rows)
    del model
    gc.collect()
    metrics["wall_seconds"] = round(time.perf_counter() - started, 1)
    return metrics, answers


def measure_all(model_id: str, adapters: dict[str, Path], generate_rows: list[dict], eval_rows: list[dict],
                **settings) -> dict[str, tuple[dict, list[dict]]]:
    """:func:`measure` for the base model, then for each adapter: label -> ``(metrics, answers)``."""
    results = {"base": measure("base", model_id, generate_rows, eval_rows, **settings)}
    for label, folder in adapters.items():
        results[label] = measure(label, model_id, generate_rows, eval_rows, adapter=folder, **settings)
    return results


def metrics_table(results: dict[str, tuple[dict, list[dict]]]) -> pd.DataFrame:
    """One row per model, with the change of answer perplexity against the base model."""
    metrics = pd.DataFrame([row for row, _ in results.values()]).set_index("model")
    metrics["perplexity_change_vs_base"] = metrics["answer_perplexity"] / metrics.loc["base", "answer_perplexity"] - 1
    return metrics


def side_by_side(results: dict[str, tuple[dict, list[dict]]], rows: list[dict], n: int = 6) -> pd.DataFrame:
    """The first ``n`` questions with the reference answer and every model's answer."""
    table = pd.DataFrame({"question": [row["instruction"] for row in rows[:n]],
                          "reference": [row["output"] for row in rows[:n]]})
    for label, (_, answers) in results.items():
        table[label] = [answer["answer"] for answer in answers[:n]]
    return table
