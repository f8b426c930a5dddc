"""Collapse diagnostics: a per-step monitor for any Trainer run, and a probe of fp16 headroom per layer.

The monitor sees what the Trainer's logs hide. ``logging_nan_inf_filter`` (on by default) replaces a NaN step
loss with the window's running mean, which is 0 right after each log, so a dead fp16 run logs exactly 0.0.
The monitor records the raw loss of every optimizer step, the loss scale, skipped steps, the learning rate and
the gradient norm into ``trace.jsonl``, and names the collapse signature it sees.

collapse       StepRecord, CollapseMonitor, read_trace, detect_collapse
early_warning  ActivationWatch, WarningRule, EarlyWarning, first_warning_step (fp16 headroom per step, its margin)
rescue         TrainingSnapshot, switch_to_safe_precision, StopAfter (on_collapse="rescue")
replay         HeadroomProbe, rng_state, replay_batch, diagnosis
"""
from helpers.diagnostics.collapse import CollapseFinding, CollapseMonitor, StepRecord, detect_collapse, read_trace
from helpers.diagnostics.replay import FP_MAX, HeadroomProbe, diagnosis, replay_batch, rng_state

__all__ = ["FP_MAX", "CollapseFinding", "CollapseMonitor", "HeadroomProbe", "StepRecord", "detect_collapse",
           "diagnosis", "read_trace", "replay_batch", "rng_state"]
