"""LabTrainer, the Trainer every run of the lab uses, and the TrainingArguments a recipe gives it.

LabTrainer hands each raw step loss to the collapse monitor, can emulate fp16 autocast on a CPU, computes the loss
from labelled logits only when asked, and writes checkpoints whole or not at all. It overrides private methods of
transformers' Trainer; each override says which Trainer behaviour (transformers 5.23) it relies on, so an upgrade
of transformers is a known risk.

Importing this module imports transformers, which takes seconds. LabTrainer is a module-level class all the same:
whatever imports it is about to train and needs transformers anyway, while ``import helpers`` and the modules that
only describe a run (``helpers.recipes``, ``helpers.precision``) stay free of it.
"""
from __future__ import annotations

import functools
import json
import math
import shutil
import warnings
from pathlib import Path

import torch
from peft import PeftModel
from transformers import Trainer, TrainingArguments
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from helpers.checkpoints import SAVE_TOTAL_LIMIT, STAGING_NAME, write_completion_marker
from helpers.diagnostics import rng_state
from helpers.distributed import barrier, mean_across_processes
from helpers.fp16_emulation import DynamicLossScale, fp16_range
from helpers.losses import LABELLED_LOGITS_CHECK_TOKENS, labelled_logits_loss
from helpers.outputs import folder_bytes, publish_folder, writing_into
from helpers.precision import PrecisionPlan
from helpers.recipes import Recipe

# A batch may carry the count of its real (not padding) tokens under this key, as a Python int counted on the host
# by the collator (helpers.training); LabTrainer takes it out before the model sees the batch.
REAL_TOKENS = "real_tokens"
# Fused AdamW updates every LoRA weight in one kernel instead of several per weight: it saves CUDA kernel launches.
# A CPU has none to save, so there the plain loop runs, the optimizer the fixed recipe's CPU runs were measured with.
CUDA_ONLY_OPTIMIZERS = {"adamw_torch_fused": "adamw_torch"}


def optimizer_for_device(optimizer: str, cuda: bool) -> str:
    """The optimizer a run uses on this device (see CUDA_ONLY_OPTIMIZERS)."""
    return optimizer if cuda else CUDA_ONLY_OPTIMIZERS.get(optimizer, optimizer)


def training_arguments(recipe: Recipe, output_dir: str | Path, precision: PrecisionPlan, report_to: str = "none",
                       run_name: str | None = None) -> TrainingArguments:
    """The Trainer's arguments for ``recipe``, with the fp16/bf16 switches of its precision plan."""
    has_eval = recipe.eval_steps > 0
    return TrainingArguments(
        output_dir=str(output_dir), run_name=run_name or recipe.name,
        per_device_train_batch_size=recipe.batch_size, per_device_eval_batch_size=max(recipe.batch_size, 4),
        gradient_accumulation_steps=recipe.gradient_accumulation, learning_rate=recipe.learning_rate,
        lr_scheduler_type=recipe.lr_scheduler, warmup_steps=recipe.warmup_ratio, weight_decay=recipe.weight_decay,
        max_grad_norm=recipe.max_grad_norm, optim=optimizer_for_device(recipe.optimizer, torch.cuda.is_available()),
        torch_compile=recipe.torch_compile,
        max_steps=recipe.max_steps if recipe.max_steps > 0 else -1, num_train_epochs=recipe.epochs or 1,
        fp16=precision.trainer_fp16, bf16=precision.trainer_bf16,
        logging_steps=recipe.logging_steps, logging_first_step=False,
        eval_strategy="steps" if has_eval else "no", eval_steps=recipe.eval_steps if has_eval else None,
        save_strategy="steps" if recipe.save_steps > 0 else "no", save_steps=recipe.save_steps or 500,
        save_total_limit=SAVE_TOTAL_LIMIT,
        train_sampling_strategy="group_by_length" if recipe.group_by_length else "random",
        gradient_checkpointing=False,  # already enabled by prepare_lora, in the blog's order
        seed=recipe.seed, data_seed=recipe.seed, report_to=report_to, disable_tqdm=False,
        remove_unused_columns=False, dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(),
        prediction_loss_only=True,  # the eval loss is all we use; otherwise Trainer keeps every eval logit (262k wide)
    )


class LabTrainer(Trainer):
    """Trainer that hands each raw step loss to a monitor and can emulate fp16 autocast on CPU.

    ``emulate_fp16=True`` runs the forward under :func:`helpers.fp16_emulation.fp16_range`, backpropagates
    ``loss * scale`` and skips the optimizer step (and so the LR scheduler step, as Trainer does for a
    GradScaler skip) when the gradients overflow, exactly where a real fp16 run would.

    With a monitor, the batch of the first step whose loss is not finite is kept for a replay
    (``first_nonfinite_batch``: the batch, the random state its dropout drew from, the weights it met) at no cost
    to the other steps: each step keeps references to its tensors, and the one read of its loss the monitor needs
    anyway decides whether they are copied. Without a monitor nothing reads the losses, and nothing is kept.
    """

    def __init__(self, *args, monitor=None, emulate_fp16=False, labelled_logits_only=False, loss_chunk_rows=0,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.labelled_logits_only = labelled_logits_only
        self.loss_chunk_rows = loss_chunk_rows
        self.real_tokens_seen = 0  # this session's training tokens that are not padding (from REAL_TOKENS)
        self._labelled_logits_checked = False
        self.monitor = monitor.attach(self) if monitor is not None else None
        self.loss_scaler = DynamicLossScale() if emulate_fp16 else None
        self.first_nonfinite_batch = None
        self._unscaled = False
        self._staging_root = None   # set while a checkpoint is written (see _save_checkpoint)
        self.checkpoint_bytes = None  # size of a checkpoint, estimated, then measured on the first one

    def _run_epoch(self, *args, **kwargs):
        # transformers 5.23 resumes a run that already reached max_steps part-way through an epoch by training one
        # step more (its stop is only checked after a step): a second `make run` would then train past the schedule.
        if 0 < self.state.max_steps <= self.state.global_step:
            return None
        return super()._run_epoch(*args, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        # Relies on Trainer grouping by length in mega-batches of the per-process batch, and on accelerate handing
        # the sampler's batches to the processes in turn: grouped by N x the batch, N processes then see, step by
        # step, the examples one process of N x the batch would.
        sampler = super()._get_train_sampler(train_dataset)
        if isinstance(sampler, LengthGroupedSampler) and self.args.world_size > 1:
            sampler.batch_size *= self.args.world_size
        return sampler

    def loss_scale(self):
        if self.loss_scaler is not None:
            return self.loss_scaler.scale
        # Relies on accelerate keeping the GradScaler of an fp16 run in Accelerator.scaler (None otherwise).
        scaler = getattr(self.accelerator, "scaler", None)
        return float(scaler.get_scale()) if scaler is not None else None

    def _use_labelled_logits(self, model, inputs, num_items_in_batch) -> bool:
        """Only for training steps; on the first one, check it against the model's own loss (an architecture
        that transforms its logits in other ways would differ) and fall back with a warning if it does not."""
        if not (self.labelled_logits_only and model.training and "labels" in inputs):
            return False
        if not self._labelled_logits_checked:
            self._labelled_logits_checked = True
            # Same mode and same random state for both (dropout masks alike), then the RNG is restored so that
            # the check does not change the run it checks. No eval(): on CPUs with AVX512-BF16, bitsandbytes'
            # 4-bit layers repack their weights for another kernel on their first eval-mode forward and keep
            # that layout, which moved this model's loss by ~0.1%.
            # The first rows of the batch only: the model's own loss needs every position's logits, which for a
            # large step would need more memory than the step itself (LABELLED_LOGITS_CHECK_TOKENS).
            rows = max(1, LABELLED_LOGITS_CHECK_TOKENS // inputs["labels"].shape[1])
            sample = {k: v[:rows] if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
            devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                state = torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]
                ours = float(self._labelled_loss(model, sample, num_items_in_batch))
                torch.set_rng_state(state[0])
                for device, cuda_state in zip(devices, state[1]):
                    torch.cuda.set_rng_state(cuda_state, device)
                theirs = float(super().compute_loss(model, dict(sample), False, num_items_in_batch))
            if not abs(ours - theirs) <= 1e-3 * max(1.0, abs(theirs)):
                warnings.warn(f"labelled_logits_only: loss {ours:.5f} differs from the model's {theirs:.5f} "
                              "on this architecture; using the model's own loss")
                self.labelled_logits_only = False
        return self.labelled_logits_only

    def _loss(self, model, inputs, return_outputs, num_items_in_batch):
        # Relies on Trainer.model_accepts_loss_kwargs: Trainer hands num_items_in_batch to the model only when the
        # model takes it; do the same.
        num_items_in_batch = num_items_in_batch if self.model_accepts_loss_kwargs else None
        if not return_outputs and self._use_labelled_logits(model, inputs, num_items_in_batch):
            return self._labelled_loss(model, inputs, num_items_in_batch, chunk_rows=self.loss_chunk_rows)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _labelled_loss(self, model, inputs, num_items_in_batch, chunk_rows=0):
        # Relies on Trainer counting num_items_in_batch over every process (average_tokens_across_devices) and
        # scaling the loss by the process count, as Trainer.compute_loss does, so that DDP's mean of the processes'
        # gradients is the gradient of the whole step's loss.
        loss = labelled_logits_loss(model, inputs, num_items_in_batch, chunk_rows=chunk_rows)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # Relies on Trainer's evaluation loop taking each batch's (loss, logits, labels) from prediction_step.
        inputs.pop(REAL_TOKENS, None)
        if not (prediction_loss_only and self.labelled_logits_only and self._labelled_logits_checked
                and "labels" in inputs):
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        with torch.no_grad():
            loss = labelled_logits_loss(model, self._prepare_inputs(inputs), chunk_rows=self.loss_chunk_rows)
        return loss.detach(), None, None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Relies on Trainer.training_step backpropagating what compute_loss returns (here the scaled loss).
        if self.loss_scaler is None or not model.training:
            return self._loss(model, inputs, return_outputs, num_items_in_batch)
        with fp16_range():  # forward only: the backward stays in fp32 (see helpers.fp16_emulation)
            result = self._loss(model, inputs, return_outputs, num_items_in_batch)
        loss = result[0] if return_outputs else result
        scaled = loss * self.loss_scaler.scale
        return (scaled, result[1]) if return_outputs else scaled

    def training_step(self, model, inputs, num_items_in_batch=None):
        # Relies on Trainer's inner loop calling training_step once per micro-batch, before the optimizer step, and
        # logging the loss it returns (here unscaled) through logging_nan_inf_filter.
        self._unscaled = False
        # Counted on the host, so no device read; TrainerState keeps the run's total (checkpoints carry it) for
        # callbacks. Relies on include_num_input_tokens_seen staying "no", or Trainer would count a second time.
        real_tokens = inputs.pop(REAL_TOKENS, 0)
        self.real_tokens_seen += real_tokens
        self.state.num_input_tokens_seen += real_tokens
        # Until a loss turns non-finite, what a replay needs to meet this forward again: the batch (references to
        # the tensors Trainer already put on the device, no copy) and the random state its dropout draws from.
        kept = None
        if self.first_nonfinite_batch is None and self.monitor is not None:
            kept = {"batch": {k: v.detach() for k, v in inputs.items() if isinstance(v, torch.Tensor)},
                    "rng_state": rng_state()}
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.loss_scaler is not None:
            loss = loss / self.loss_scaler.scale
        if self.monitor is not None:
            # The step's one device-to-host read: the monitor records every raw loss, and the same value decides
            # whether this step is the first to keep. The weights it met are still in the model (the optimizer
            # steps after training_step), so they are copied only then; the run's last weights would not do, as
            # steps after the first non-finite loss may still move them.
            # With several processes, the mean over all of them: the step's loss, seen alike by every monitor.
            loss_value = mean_across_processes(loss.detach().float().item())
            self.monitor.record_micro_loss(torch.tensor(loss_value))
            if kept is not None and not math.isfinite(loss_value):
                weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
                kept["batch"] = {k: v.cpu() for k, v in kept["batch"].items()}
                self.first_nonfinite_batch = {"step": self.state.global_step + 1, "weights": weights, **kept}
        return loss

    def _unscale_once(self, model):
        if self.loss_scaler is None or self._unscaled:
            return
        self._unscaled = True
        params = [p for p in model.parameters() if p.requires_grad]
        overflow = self.loss_scaler.unscale_and_check(params)
        self.loss_scaler.update(overflow)
        if overflow:  # no gradients: the optimizer step does nothing, and Trainer skips the scheduler step
            for p in params:
                p.grad = None
        # Relies on accelerate's AcceleratedOptimizer.step_was_skipped reading _is_overflow (no GradScaler here to
        # set it), which Trainer reads to skip the LR scheduler step.
        self.optimizer._is_overflow = overflow

    def _clip_grad_norm(self, model):
        # Relies on Trainer calling _clip_grad_norm (when max_grad_norm > 0) after the last backward of a step and
        # before optimizer.step().
        self._unscale_once(model)
        if self.loss_scaler is not None and self.optimizer._is_overflow:
            return torch.tensor(float("nan"))
        return super()._clip_grad_norm(model)

    def _get_grad_norm(self, model, grad_norm=None):
        # Relies on Trainer calling _get_grad_norm on every optimizer step, after _clip_grad_norm, before
        # optimizer.step(), and logging the norm it returns.
        self._unscale_once(model)
        if self.loss_scaler is not None and self.optimizer._is_overflow:
            grad_norm = torch.tensor(float("nan"))
        grad_norm = super()._get_grad_norm(model, grad_norm)
        if self.monitor is not None:
            self.monitor.record_grad_norm(grad_norm)
        return grad_norm

    def _save(self, output_dir=None, state_dict=None):
        # Relies on Trainer._save saving a PeftModel through self.model.save_pretrained(...).
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not isinstance(model, PeftModel):
            return super()._save(output_dir, state_dict)
        # LoRA weights only: no copy of the (unchanged) embeddings, and no hub look-up that "auto" would do.
        model.save_pretrained = functools.partial(type(model).save_pretrained, model, save_embedding_layers=False)
        try:
            return super()._save(output_dir, state_dict)
        finally:
            del model.save_pretrained

    def _get_output_dir(self, trial):
        # Relies on Trainer._save_checkpoint taking its folder (and rotating) from this method.
        return str(self._staging_root) if self._staging_root is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        """Write the checkpoint into checkpoints/staging, check it, then rename it into place: a run killed or
        out of space while saving leaves the earlier checkpoints as they were and no half checkpoint. With several
        processes, each writes its own files there (its random state) and the main process alone publishes."""
        # Relies on Trainer._save_checkpoint writing all into <_get_output_dir>/checkpoint-<step>, from every
        # process (rng_state_<rank>.pth) and the rest from the process that should_save.
        run_dir = Path(super()._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        main = self.args.should_save
        self._staging_root = run_dir / STAGING_NAME
        staged = self._staging_root / name
        if main:
            shutil.rmtree(staged, ignore_errors=True)
        barrier()  # nobody writes into the staging folder before it is emptied
        try:
            with writing_into(run_dir, name, needed=self.checkpoint_bytes, intact="every earlier checkpoint",
                              partial=staged if main else None):
                super()._save_checkpoint(model, trial)
                barrier()  # every process's files are in
                if main:
                    if self.loss_scaler is not None:  # the emulated scale is part of the state a resume needs
                        (staged / "loss_scale.json").write_text(json.dumps(vars(self.loss_scaler)))
                    write_completion_marker(staged)
                    publish_folder(staged, run_dir / name)
        finally:
            if main and self._staging_root.is_dir() and not any(self._staging_root.iterdir()):
                self._staging_root.rmdir()
            self._staging_root = None
        barrier()  # published before any process goes on
        if main:
            self.checkpoint_bytes = folder_bytes(run_dir / name)
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
