"""Checks on what the notebooks measured, run after nbval executed them (make test).

Each notebook writes outputs/nbval/<notebook>/summary.json with the parameters of tests/notebook_params.json.
NOTEBOOK_PARAMS=<file> checks the summaries of a run made with another parameters file instead.
"""
import json
import math
import os
from pathlib import Path

import pytest

from helpers.outputs import project_root

PARAMS_FILE = Path(os.environ.get("NOTEBOOK_PARAMS", project_root() / "tests" / "notebook_params.json"))
PARAMS = json.loads(PARAMS_FILE.read_text(encoding="utf-8"))


def summary(name):
    path = project_root() / PARAMS[name]["output_dir"] / "summary.json"
    if not path.exists():
        pytest.fail(f"{path} missing: run the notebooks first (make test runs them under nbval)")
    return json.loads(path.read_text(encoding="utf-8"))


def test_01_inference_answers_and_timing():
    s = summary("01_inference")
    assert s["questions"] == PARAMS["01_inference"]["n_questions"] + 2  # two fixed questions + the eval ones
    for answer in s["answers"]:
        assert answer["answer"].strip() and 0 < answer["new_tokens"] <= PARAMS["01_inference"]["max_new_tokens"]
        assert answer["time_to_first_token_s"] > 0
    assert s["median_tokens_per_s"] > 0 and s["load_seconds"] > 0
    assert s["environment"]["torch"] and s["environment"]["device"]


def test_02_smoke_trained_and_saved_an_adapter():
    s = summary("02_qlora_smoke")
    params = PARAMS["02_qlora_smoke"]
    assert s["global_step"] == params["max_steps"]
    assert s["logged_losses"] and all(math.isfinite(loss) for _, loss in s["logged_losses"])
    assert not s["collapse"]["collapsed"]
    assert 0 < s["trainable_parameters"] < 5_000_000
    adapter = Path(s["adapter_dir"])
    assert (adapter / "adapter_model.safetensors").exists() and (adapter / "adapter_config.json").exists()
    assert s["answer"]["new_tokens"] > 0
    out = project_root() / params["output_dir"]
    assert list(out.glob("wandb/offline-run-*")), "wandb should have logged offline into the output folder"


def test_04_reproduces_the_collapse_and_the_fix_does_not_collapse():
    s = summary("04_loss_collapse_investigation")
    blog, safe = s["runs"]["blog"], s["runs"]["safe_precision"]
    collapse = blog["collapse"]
    assert collapse["collapsed"] and collapse["first_nonfinite_step"] <= 300
    for sign in ("nonfinite_streak_from", "fake_zero_log_step", "lr_frozen_from", "scale_to_zero_step"):
        assert collapse[sign] is not None, f"collapse signature incomplete: {sign} not seen"
    assert not safe["collapse"]["collapsed"] and safe["collapse"]["nonfinite_steps"] == 0
    assert s["first_nonfinite_module"], "the replay should name the first overflowing module"
    assert str(collapse["first_nonfinite_step"]) in s["diagnosis"]


def test_03_trains_the_fixed_recipe_with_eval_checkpoints_and_a_run_card():
    s = summary("03_full_train")
    params = PARAMS["03_full_train"]
    assert s["global_step"] == params["max_steps"] and s["labels"] == "answer_only"
    assert s["eval_losses"] and math.isfinite(s["final_eval_loss"])
    out = project_root() / params["output_dir"]
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    card = json.loads((out / "run_card.json").read_text(encoding="utf-8"))
    assert len(card["data_sha256"]) == 64 and card["versions"]["transformers"] and card["recipe"]["seed"] == 42
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]


def test_05_measures_base_and_adapter_and_merges_within_tolerance():
    s = summary("05_inference_eval")
    by_model = {m["model"]: m for m in s["metrics"]}
    assert set(by_model) == {"base", "fixed recipe"}
    for m in by_model.values():
        assert m["answers"] == PARAMS["05_inference_eval"]["n_generate"]
        assert m["answer_perplexity"] > 1 and 0 <= m["share_ended_with_eos"] <= 1 and 0 <= m["morpheme_f1"] <= 1
    merge = s["merge"]
    assert merge["within_tolerance"]
    assert merge["mean_abs_error_merged_bf16"] <= merge["tolerance_factor"] * merge["mean_abs_error_unmerged_bf16"]
    assert merge["top1_agreement_merged_vs_fp32"] >= 0.9
    assert (Path(merge["saved_to"]) / "model.safetensors").exists()
