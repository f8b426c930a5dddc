"""The rescue of an fp16 run (``on_collapse="rescue"``): a copy of the last good training state kept in memory, put
back when the collapse is coming, and the switch of the rest of the run to a precision with fp32's range.

Decisions, and why:

- **What is kept.** The trainable (LoRA) weights, the optimizer's and the LR scheduler's state and the loss scale,
  copied in memory every ``snapshot_every`` healthy steps (finite loss, step not skipped, no warning). For a LoRA
  run that is a few MB (the 270M model's adapter on all seven projections: 3.8M weights, ~46 MB with AdamW's two
  moments), far less than a checkpoint on disk costs, and no file to tidy.
- **Where it goes back to.** The newest copy, taken before the warning: the steps after it met weights already on
  their way out of fp16's range. The step counter is not put back: the Trainer's loop, its data order and the trace
  go on (the trace stays one record a step, with no step twice), so the run ends at ``max_steps`` having done the
  rolled-back steps' batches once, without their updates. The LR schedule resumes from the copy's position, so it
  ends that many steps short of 0.
- **The safe precision.** bf16 where the GPU has it, fp32 otherwise. On the CPU the fp16 emulation is switched off
  (fp32, with no loss scale). On a GPU with real fp16 (not run here yet: no GPU was available when this was
  written) accelerate's fp16 autocast wrapper and GradScaler are taken off the model and optimizer and, where the
  GPU has bf16, the forward is wrapped in bf16 autocast instead; it relies on accelerate 1.x keeping the unwrapped
  forward in ``model._original_forward`` and the scaler in ``Accelerator.scaler`` and ``AcceleratedOptimizer.scaler``.
"""
from __future__ import annotations

import copy
from types import MethodType

import torch
from transformers import TrainerCallback

from helpers.precision import has_bf16


class TrainingSnapshot:
    """An in-memory copy of what a rollback needs: trainable weights, optimizer, scheduler and loss scale."""

    def __init__(self, trainer, model, step: int):
        self.step = step
        self.weights = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
        self.optimizer = copy.deepcopy(trainer.optimizer.state_dict())
        self.scheduler = copy.deepcopy(trainer.lr_scheduler.state_dict())
        self.loss_scale = dict(vars(trainer.loss_scaler)) if trainer.loss_scaler is not None else None

    def restore(self, trainer, model):
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in self.weights.items():
                params[name].copy_(value)
        trainer.optimizer.load_state_dict(copy.deepcopy(self.optimizer))
        trainer.lr_scheduler.load_state_dict(copy.deepcopy(self.scheduler))
        if self.loss_scale is not None and trainer.loss_scaler is not None:
            vars(trainer.loss_scaler).update(self.loss_scale)


def safe_precision() -> str:
    """bf16 where the GPU has it, fp32 otherwise."""
    return "bf16" if has_bf16() else "fp32"


def switch_to_safe_precision(trainer, model) -> str:
    """Turn the run's fp16 (emulated or real) off for the rest of the run; returns the precision it now runs in."""
    if trainer.loss_scaler is not None:  # the CPU emulation: without it, LabTrainer trains in plain fp32
        trainer.loss_scaler = None
        # Relies on accelerate's AcceleratedOptimizer.step_was_skipped reading _is_overflow (see LabTrainer).
        trainer.optimizer._is_overflow = False
        return "fp32"
    accelerator = trainer.accelerator
    if getattr(accelerator, "scaler", None) is None:
        return "unchanged"
    target = safe_precision()
    original = getattr(model, "_original_forward", None)
    if original is not None:
        forward = original.__func__ if hasattr(original, "__func__") else original
        if target == "bf16":
            forward = torch.autocast("cuda", dtype=torch.bfloat16)(forward)
        model.forward = MethodType(forward, model) if hasattr(original, "__func__") else forward
    accelerator.scaler = None
    accelerator.native_amp = False  # accelerate's unscale_gradients then skips the (gone) GradScaler
    trainer.optimizer.scaler = None
    trainer.optimizer._is_overflow = False
    return target


class StopAfter(TrainerCallback):
    """Ends a run after ``steps`` optimizer steps, leaving its LR schedule (which decays over max_steps) as it is:
    notebook 04's rescue run follows the fp16 run's schedule for as many steps as its comparison runs."""

    def __init__(self, steps: int):
        self.steps = steps

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.steps:
            control.should_training_stop = True
        return control
