"""The early warning fires before a planted overflow and stays silent on a clean run; the rescue rolls the state
back, switches precision and keeps the trace one record a step."""
import json
import math

import pytest
import torch
from transformers import TrainerCallback

from helpers.diagnostics import StepRecord
from helpers.diagnostics.early_warning import (EarlyWarning, WarningRule, first_warning_step, headroom_bits,
                                               margin_steps)
from helpers.recipes import blog_recipe
from helpers.training import train

from blog_runs import arithmetic_rows, warned_about_the_blog_labels

PLANTED = "layers.1.mlp.down_proj"


class GrowingDownProj(TrainerCallback):
    """The planted overflow: one MLP down_proj's (frozen) base weight grows 1024-fold after the first step (its
    output's fp16 headroom falls from ~23 bits to ~13 on this tiny model), then fourfold after each step up to
    ``steps``, so its output loses two bits of headroom a step until it overflows (around step 8). It also keeps, per step, the
    trainable weights, learning rate and optimizer step count as the step ends (after the monitor, which runs first)."""

    def __init__(self, steps=12):
        self.steps, self.seen = steps, {}

    def on_step_end(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kwargs):
        adam_steps = [float(s["step"]) for s in optimizer.state_dict()["state"].values()]
        self.seen[state.global_step] = {
            "weights": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
            "lr": lr_scheduler.get_last_lr()[0], "adam_steps": max(adam_steps, default=0.0)}
        if state.global_step <= self.steps:
            weight = next(m for n, m in model.named_modules() if n.endswith(PLANTED + ".base_layer")).weight
            with torch.no_grad():
                weight.mul_(1024.0 if state.global_step == 1 else 4.0)
        return control


def _train(tiny_model_dir, tmp_path, name, plant=None, precision="fp16_emulated", on_collapse="record",
           max_steps=30):
    recipe = blog_recipe(quantization="none", precision=precision, learning_rate=1e-3, max_steps=max_steps,
                         logging_steps=5, lora_targets="all", optimizer="adamw_torch", max_grad_norm=0.0,
                         gradient_checkpointing=False)
    with warned_about_the_blog_labels():
        return train(recipe, model_id=str(tiny_model_dir), data=arithmetic_rows(tmp_path), out_dir=tmp_path / name,
                     report_to="none", save_adapter=False, verbose=False, on_collapse=on_collapse,
                     callbacks=[plant] if plant else None)


def test_headroom_and_margin_arithmetic():
    assert headroom_bits(65504 / 8) == pytest.approx(3.0)
    assert headroom_bits(float("inf")) == -math.inf and headroom_bits(float("nan")) == -math.inf
    assert margin_steps([10.0, 9.0, 8.0, 7.0, 6.0], window=8) == pytest.approx(6.0)  # one bit a step, 6 left
    assert margin_steps([6.0, 6.5, 7.0], window=8) is None  # headroom growing: no margin to count down


def test_rule_warns_on_a_falling_headroom_and_not_on_a_steady_one():
    steady = EarlyWarning(WarningRule())
    assert not any(steady.assess(s, {"a": 65504 / 2 ** 6}).warning for s in range(1, 30))
    falling = EarlyWarning(WarningRule())
    fired = [s for s in range(1, 14) if falling.assess(s, {"a": 65504 / 2 ** (13 - s)}).warning]
    assert fired and fired[0] < 13 and falling.first_step == fired[0]
    records = [StepRecord(s, 1.0, True, False, 1e-3, None, None, headroom_bits=13.0 - s) for s in range(1, 14)]
    assert first_warning_step(records) == fired[0]  # the offline re-assessment agrees with the online one


def test_warning_fires_before_a_planted_overflow_and_names_the_layer(tiny_model_dir, tmp_path):
    run = _train(tiny_model_dir, tmp_path, "planted", plant=GrowingDownProj(), max_steps=10)
    finding = run.monitor.finding()
    warned = run.summary["early_warning"]["first_step"]
    assert finding.first_nonfinite_step is not None and warned is not None
    assert warned < finding.first_nonfinite_step
    at = next(r for r in run.monitor.records if r.step == warned)
    assert at.warning and at.headroom_layer == PLANTED and at.finite
    assert PLANTED in run.summary["early_warning"]["text"] and "margin" in run.summary["early_warning"]["text"]


def test_warning_is_silent_on_a_clean_fp16_run_and_absent_in_fp32(tiny_model_dir, tmp_path):
    clean = _train(tiny_model_dir, tmp_path, "clean", max_steps=10)
    assert clean.monitor.finding().nonfinite_steps == 0
    assert all(r.headroom_bits is not None and not r.warning for r in clean.monitor.records)
    assert clean.summary["early_warning"]["active"] and clean.summary["early_warning"]["first_step"] is None
    fp32 = _train(tiny_model_dir, tmp_path, "fp32", precision="fp32", max_steps=3)
    assert all(r.headroom_bits is None for r in fp32.monitor.records)  # fp32 has no fp16 range to run out of
    assert not fp32.summary["early_warning"]["active"]


def test_rescue_rolls_back_switches_precision_and_keeps_the_trace_continuous(tiny_model_dir, tmp_path):
    plant = GrowingDownProj()
    run = _train(tiny_model_dir, tmp_path, "rescue", plant=plant, on_collapse="rescue", max_steps=14)
    rescue = run.summary["rescue"]
    assert rescue is not None and rescue["from"] == "fp16_emulated" and rescue["to"] == "fp32"
    step, back_to = rescue["step"], rescue["rolled_back_to"]
    assert back_to < step <= run.summary["early_warning"]["first_step"] + 5
    # The state at the end of the rescue step is the snapshot's: weights, learning rate, optimizer steps.
    after, snapshot = plant.seen[step], plant.seen[back_to]
    assert all(torch.equal(after["weights"][n], snapshot["weights"][n]) for n in snapshot["weights"])
    assert after["lr"] == snapshot["lr"] and after["adam_steps"] == snapshot["adam_steps"]
    assert run.trainer.loss_scaler is None
    trace = [StepRecord(**json.loads(line)) for line in (tmp_path / "rescue" / "trace.jsonl").read_text().splitlines()]
    assert [r.step for r in trace] == list(range(1, 15))  # one record a step, none twice, none missing
    assert "rescue" in trace[step - 1].event and trace[step - 1].precision == "fp16_emulated"
    later = trace[step:]
    assert all(r.precision == "fp32" and r.finite and not r.skipped and r.loss_scale is None for r in later)
    assert later[-1].learning_rate < snapshot["lr"]  # the schedule went on from the snapshot
    card = json.loads((tmp_path / "rescue" / "run_card.json").read_text())
    assert card["rescue"]["to"] == "fp32" and card["global_step"] == 14


def test_the_benchmark_row_reads_the_lead_the_rescue_and_the_learning_from_a_trace(tmp_path):
    from dataclasses import asdict

    from benchmarks.early_warning import row

    def run_folder(name, records):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "recipe.json").write_text(json.dumps({"learning_rate": 0.01, "lora_targets": "all",
                                                        "max_steps": 300, "precision": "fp16"}))
        (folder / "benchmark.json").write_text(json.dumps({
            "precision": "fp16", "device": "cuda: a GPU", "versions": {"torch": "x"}, "date": "2026-12-02",
            "eval_loss": 2.5}))
        (folder / "trace.jsonl").write_text("".join(json.dumps(asdict(r)) + "\n" for r in records))
        return folder

    # one bit of headroom lost a step: under 5 bits (with a margin of 4 steps) at step 8, the overflow at step 13
    healthy = [StepRecord(s, 4.0 - s / 10, True, False, 1e-2, 1024.0, 1.0, headroom_bits=12.0 - s,
                          headroom_layer="layers.2.mlp.down_proj", precision="fp16") for s in range(1, 13)]
    broken = [StepRecord(s, math.nan, False, True, 1e-2, 512.0, None, headroom_bits=-math.inf, precision="fp16")
              for s in range(13, 16)]
    collapsed = row(run_folder("collapsed", healthy + broken))
    assert (collapsed["warning_step"], collapsed["first_nonfinite_step"], collapsed["lead_steps"]) == (8, 13, 5)
    assert collapsed["warning_layer"] == "layers.2.mlp.down_proj" and collapsed["warning_headroom_bits"] == 4.0
    assert collapsed["rescued_at"] is None and collapsed["nonfinite_after_rescue"] is None
    assert collapsed["first_raw_loss"] == 3.9 and collapsed["last_raw_loss"] == pytest.approx(3.0)  # steps 8-12

    after = [StepRecord(s, 2.0, True, False, 1e-2, None, 1.0, precision="bf16") for s in range(13, 20)]
    after[0].event = "rescue (warning certain): rolled back to step 10, fp16 -> bf16"
    rescued = row(run_folder("rescued", healthy + after))
    assert rescued["rescued_at"] == 13 and rescued["nonfinite_after_rescue"] == 0
    assert rescued["first_nonfinite_step"] is None and rescued["eval_loss"] == 2.5 and rescued["finished"]
