"""What the notebooks build and say: the recipes they train (unchanged by moving their values into the recipes),
the summaries they record, the conclusions written from them, and the helpers their cells call."""
import json
import math
from dataclasses import asdict
from types import SimpleNamespace

import pandas as pd
import pytest

from helpers import reports, summaries
from helpers.comparison import adapter_folders, metrics_table, side_by_side
from helpers.diagnostics import StepRecord, detect_collapse
from helpers.diagnostics.first_failure import replay_context, replay_first_failure
from helpers.diagnostics.traces import learning_rate_bounds, logged_steps, read_trace_table, records_from_rows
from helpers.notebooks import MAIN_JOB
from helpers.outputs import project_root
from helpers.precision import effective_precision
from helpers.recipes import named_recipe

# What the notebooks trained before their recipe settings defaulted to the recipe's own values (literal, so that a
# change of a recipe's defaults shows here): the blog recipe as notebook 02 ran it, and notebook 03's two runs, the
# fixed one at the notebook's defaults and the main job's blog run (which then restated labels, precision and lr).
# A setting added to Recipe since is left to the recipe's own default, which the notebooks do not touch.
BLOG = {"name": "blog", "quantization": "4bit", "precision": "fp16", "compute_dtype": "bf16",
        "gradient_checkpointing": True, "lora_r": 8, "lora_alpha": 32, "lora_dropout": 0.05,
        "lora_targets": "attention", "labels": "blog", "template": "koalpaca", "max_length": 512, "batch_size": 2, "gradient_accumulation": 1,
        "learning_rate": 1e-4, "lr_scheduler": "linear", "warmup_ratio": 0.0, "weight_decay": 0.0, "max_grad_norm": 1.0,
        "optimizer": "paged_adamw_8bit", "max_steps": 50, "epochs": 0.0, "logging_steps": 10, "eval_steps": 0,
        "save_steps": 0, "seed": 42, "group_by_length": False, "labelled_logits_only": False}
BLOG_03 = {**BLOG, "batch_size": 4, "max_steps": 0, "epochs": 1, "save_steps": 50, "gradient_checkpointing": False,
           "group_by_length": True}
FIXED_03 = {**BLOG_03, "name": "fixed", "precision": "auto", "compute_dtype": "auto", "labels": "answer_only",
            "learning_rate": 5e-4, "lr_scheduler": "cosine", "warmup_ratio": 0.05, "optimizer": "adamw_torch",
            "eval_steps": 100, "labelled_logits_only": True, "gradient_checkpointing": "auto"}


def run_cells(notebook: str, cell_ids: list[str], **parameters) -> dict:
    """Execute a notebook's parameters cell, then ``parameters`` as papermill injects them, then the named cells;
    return the namespace."""
    cells = {c["id"]: "".join(c["source"]) for c in
             json.loads((project_root() / "notebooks" / f"{notebook}.ipynb").read_text(encoding="utf-8"))["cells"]}
    namespace = {}
    exec(cells["c01"], namespace)
    namespace.update(parameters)
    for cell_id in cell_ids:
        exec(cells[cell_id], namespace)
    return namespace


def settings(recipe) -> dict:
    """The recipe's values of the settings that existed when the notebooks' recipes were pinned above."""
    return {key: value for key, value in asdict(recipe).items() if key in BLOG}


def main_job_parameters(out_name: str) -> dict:
    return next(params for _, params, name in MAIN_JOB if name == out_name)


def test_recipe_table_marks_what_departs_from_the_blog():
    table = reports.recipe_table(named_recipe("fixed"), comparison=named_recipe("blog", batch_size=8))
    assert list(table.columns) == ["this run", "comparison", "blog recipe", "differs"]
    assert table.loc["labels", "this run"] == "answer_only" and table.loc["labels", "differs"] == "yes"
    assert table.loc["batch_size", "differs"] == "yes"  # only the comparison departs there
    assert table.loc["lora_r", "differs"] == ""


def _answers(ended, new_tokens):
    return pd.DataFrame({"question": ["q"] * len(ended), "answer": ["a"] * len(ended), "new_tokens": new_tokens,
                         "ended_with_eos": ended, "time_to_first_token_s": [0.1, 0.3, 0.2][:len(ended)],
                         "tokens_per_s": [6.0, 10.0, 8.0][:len(ended)]})


def test_inference_summary_and_conclusion_follow_the_answers():
    summary = summaries.inference_summary(_answers([False, False, True], [96, 96, 40]), "embedded", None, "none",
                                          "torch.float32", 5.8, max_new_tokens=96, device="cpu")
    assert summary["questions"] == 3 and summary["median_tokens_per_s"] == 8.0
    text = reports.inference_conclusion(summary).data
    assert "**1 of 3 answers ended with EOS**; 2 ran to the 96-token cap" in text
    assert "did not end on their own" in text and "0.20 s" in text
    mostly_ended = summaries.inference_summary(_answers([True, True], [10, 12]), "embedded", None, "none",
                                               "torch.float32", 5.8, max_new_tokens=96, device="cpu")
    assert "ended on their own already" in reports.inference_conclusion(mostly_ended).data


def _training_summary(**changes):
    summary = {"recipe_name": "fixed", "labels": "answer_only", "precision": "fp32", "global_step": 125,
               "train_rows": 499, "eval_rows": 95, "wall_seconds": 690.0, "seconds_per_step": 5.5, "device": "cpu",
               "resumed_from": None, "logged_losses": [(10, 3.1), (120, 2.6)],
               "eval_losses": [(50, 3.0), (100, 2.9)], "stopped_at": None, "collapse_text": "no collapse in 125 steps",
               "adapter_dir": "adapter"}
    return {**summary, **changes}


def test_training_conclusion_reads_the_losses_it_is_given():
    text = reports.training_conclusion(_training_summary()).data
    assert "11.5 min" in text and "3.100 at step 10, 2.600 at step 120" in text
    assert "eval loss on 95 held-out rows fell" in text and "never trained on became more likely" in text
    rising = reports.training_conclusion(_training_summary(eval_losses=[(50, 2.9), (100, 3.2)])).data
    assert "did not fall" in rising and "overfitting" in rising
    stopped = reports.training_conclusion(_training_summary(stopped_at=51, eval_losses=[])).data
    assert "stopped the run at step 51" in stopped and "No eval loss" in stopped


def test_collapse_conclusion_lists_every_line_of_the_diagnosis():
    summary = {"diagnosis": "The fp16 run collapsed at step 32.\nThe learning rate stayed at 0.009.",
               "runs": {"blog": {"global_step": 51, "precision": "fp16_emulated"}}, "learning_rate": 1e-2,
               "lora_targets": "all", "first_nonfinite_module": "model.layers.3.mlp.down_proj"}
    text = reports.collapse_conclusion(summary).data
    assert "- The fp16 run collapsed at step 32.\n- The learning rate stayed at 0.009." in text
    assert "51 steps at lr 0.01" in text and "headroom.png" in text


def _metrics(label, ended, perplexity):
    return {"model": label, "answers": 20, "share_ended_with_eos": ended, "answer_perplexity": perplexity,
            "morpheme_f1": 0.25, "repeated_3gram_share": 0.1, "mean_answer_tokens": 60.0, "mean_tokens_per_s": 12.0,
            "batched_tokens_per_s": 60.0}


def test_metrics_table_and_evaluation_conclusion_compare_each_adapter_with_the_base():
    results = {"base": (_metrics("base", 0.05, 30.0), [{"answer": "b"}]),
               "fixed recipe": (_metrics("fixed recipe", 1.0, 18.0), [{"answer": "f"}])}
    metrics = metrics_table(results)
    assert metrics.loc["fixed recipe", "perplexity_change_vs_base"] == pytest.approx(-0.4)
    merge = {"adapter": "fixed recipe", "mean_abs_error_merged_bf16": 0.3, "mean_abs_error_unmerged_bf16": 0.1,
             "tolerance_factor": 2.0, "within_tolerance": False, "top1_agreement_merged_vs_fp32": 0.9,
             "saved_to": "outputs/merged"}
    summary = summaries.evaluation_summary(metrics, results, merge, model_id="embedded", quantization="4bit",
                                           generated=20, max_new_tokens=160, repetition_penalty=1.2,
                                           generation_batch_size=20, device="cpu")
    assert summary["answers"] == {"base": [{"answer": "b"}], "fixed recipe": [{"answer": "f"}]}
    text = reports.evaluation_conclusion(summary).data
    assert "100% ended with EOS (+95 points)" in text and "(-40%)" in text
    assert "**fixed recipe**'s" in text and "**outside** the 2x tolerance" in text
    side = side_by_side(results, [{"instruction": "질문", "output": "답"}], n=1)
    assert side.loc[0].to_dict() == {"question": "질문", "reference": "답", "base": "b", "fixed recipe": "f"}


def test_summaries_pick_the_run_card_entries_the_checks_read():
    card = {key: key for key in summaries.TRAINING_KEYS + ("data", "data_sha256", "eval_losses", "final_eval_loss",
                                                             "resumed_from", "adapter_dir", "train_rows", "eval_rows",
                                                             "final_learning_rate", "final_loss_scale")}
    run = SimpleNamespace(summary=card, recipe=named_recipe("blog"))
    training = summaries.training_summary(run, "blog")
    assert training["labels"] == "blog" and training["final_eval_loss"] == "final_eval_loss"
    collapse = summaries.collapse_summary(run, None, None, None, "text", model_id="embedded", learning_rate=1e-2,
                                          max_steps=300, lora_targets="all")
    assert list(collapse["runs"]) == ["blog"] and collapse["replayed_step"] is None
    assert collapse["runs"]["blog"]["final_loss_scale"] == "final_loss_scale"


def test_traces_read_from_a_table_give_the_same_finding_as_the_monitor(tmp_path):
    records = [StepRecord(step, 3.0 if step < 5 else math.nan, step < 5, step >= 5, 0.01, 2.0 ** (10 - step), None,
                          0.0 if step == 20 else None) for step in range(1, 21)]
    rows = pd.DataFrame([{**asdict(r), "run": "toy"} for r in records])
    rows.to_csv(tmp_path / "trace.csv", index=False)
    read = read_trace_table(tmp_path / "trace.csv")
    assert list(read) == ["toy"] and detect_collapse(read["toy"]) == detect_collapse(records)
    assert records_from_rows(rows.iloc[:1])[0].grad_norm is None  # an empty cell is "not measured", not NaN
    assert list(logged_steps(read["toy"])["step"]) == [20]


def test_learning_rate_bounds_of_the_recorded_gpu_runs():
    runs = pd.read_csv(project_root() / "docs/measurements/fp16_collapse_h100_gemma3_270m.csv")
    assert learning_rate_bounds(runs[runs.fp16]) == {"lowest_lr_collapsed": 0.01, "highest_lr_healthy": 0.003}


def test_replay_context_follows_the_precision_and_a_healthy_run_has_nothing_to_replay():
    from helpers.fp16_emulation import fp16_range

    assert type(replay_context("fp16_emulated")) is type(fp16_range())
    assert type(replay_context("fp32")).__name__ == "nullcontext"
    healthy = SimpleNamespace(trainer=SimpleNamespace(first_nonfinite_batch=None), precision="fp32")
    assert replay_first_failure(healthy) == (None, None)


def test_adapter_folders_name_every_missing_adapter(tmp_path):
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "adapter_config.json").write_text("{}")
    assert adapter_folders({"ok": str(tmp_path / "ok")}) == {"ok": tmp_path / "ok"}
    with pytest.raises(FileNotFoundError, match="run notebook 03 first.*missing_one"):
        adapter_folders({"ok": str(tmp_path / "ok"), "gone": str(tmp_path / "missing_one")})


def test_merge_and_export_reports_where_the_merged_model_went(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from helpers.adapters import merge_and_export
    from helpers.models import load_tokenizer

    adapter = tmp_path / "adapter"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    model.save_pretrained(adapter)
    load_tokenizer(str(tiny_model_dir), verbose=False).save_pretrained(adapter)
    report = merge_and_export(str(tiny_model_dir), adapter, [{"instruction": "질문", "context": ""}],
                              tmp_path / "merged", label="tiny")
    assert report["adapter"] == "tiny" and report["within_tolerance"] and report["seconds"] >= 0
    assert (tmp_path / "merged" / "model.safetensors").exists() and report["saved_to"] == str(tmp_path / "merged")


def test_notebook_02_trains_the_blog_recipe_as_before(tmp_path):
    assert settings(run_cells("02_qlora_smoke", ["c02"], output_dir=str(tmp_path))["recipe"]) == BLOG


def test_notebook_03_trains_the_same_recipes_as_before(tmp_path):
    fixed = run_cells("03_full_train", ["c02"], **{**main_job_parameters("03_full_train_fixed"),
                                                   "output_dir": str(tmp_path / "fixed")})["recipe"]
    blog = run_cells("03_full_train", ["c02"], **{**main_job_parameters("03_full_train_blog"),
                                                  "output_dir": str(tmp_path / "blog")})["recipe"]
    assert settings(fixed) == FIXED_03
    assert settings(blog) == BLOG_03


def test_the_main_job_names_the_blog_recipe_instead_of_restating_it():
    blog = main_job_parameters("03_full_train_blog")
    assert set(blog) == {"recipe_name", "eval_steps", "output_dir", "recipe_overrides"}
    # Only how batches are drawn and whether activations are recomputed: what the blog recipe learns (labels,
    # precision, learning rate, LoRA) stays the recipe's own.
    assert set(blog["recipe_overrides"]) == {"group_by_length", "gradient_checkpointing"}


def test_notebook_04_trains_the_same_two_runs_as_before(tmp_path):
    collapse = run_cells("04_loss_collapse_investigation", ["c02"], output_dir=str(tmp_path))
    fp16_run = {**BLOG, "max_steps": 300, "learning_rate": 1e-2, "lora_targets": "all"}
    assert settings(collapse["blog"]) == fp16_run
    assert settings(collapse["comparison"]) == {
        **fp16_run, "max_steps": 45, "precision": "auto",
        "gradient_checkpointing": effective_precision("fp16") != "fp16_emulated"}
