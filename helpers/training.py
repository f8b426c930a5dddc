"""Training recipes: the blog's QLoRA recipe as users copy it, and the project's fixed recipe.

``blog_recipe()`` and ``fixed_recipe()`` return a :class:`Recipe`; ``train()`` runs any recipe on a model id
and a data source and returns the trainer, the trace of every step and a summary. Notebooks 02-04 call it.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import time
import warnings
import zipfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from helpers.data import LABEL_RECIPES
from helpers.models import QUANTIZATIONS
from helpers.outputs import (RunLock, atomic_write_text, check_free_space, describe_holder, folder_bytes,
                             peak_gpu_memory, publish_folder, restore_replaced, shown_path, writing_into)

PRECISION_MODES = ("auto", "fp16", "fp16_emulated", "bf16", "fp32")
SAVE_TOTAL_LIMIT = 2  # checkpoints kept in out_dir/checkpoints


@dataclass
class Recipe:
    """Every setting of a QLoRA run, with the blog's values as defaults."""

    name: str = "blog"
    quantization: str = "4bit"          # none | 4bit | 8bit
    precision: str = "fp16"             # auto | fp16 | fp16_emulated | bf16 | fp32 (training autocast mode)
    compute_dtype: str = "bf16"         # bnb 4-bit compute dtype: bf16 | fp32 | fp16
    gradient_checkpointing: bool = True
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: str | list = "attention"  # attention | all | comma-separated names
    labels: str = "seed"                # seed | fixed (see helpers.data)
    template: str = "koalpaca"
    max_length: int = 512
    batch_size: int = 2
    gradient_accumulation: int = 1
    learning_rate: float = 1e-4
    lr_scheduler: str = "linear"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optimizer: str = "paged_adamw_8bit"
    max_steps: int = 50
    epochs: float = 0.0                 # whole epochs, used when max_steps <= 0
    logging_steps: int = 10
    eval_steps: int = 0                 # 0: no evaluation during training
    save_steps: int = 0                 # 0: no checkpoints
    seed: int = 42
    group_by_length: bool = False       # batches of similar length: less padding, same examples per epoch
    labelled_logits_only: bool = False  # vocabulary logits only where a label is trained (see labelled_logits_loss)

    def validate(self):
        if self.max_steps <= 0 and self.epochs <= 0:
            raise ValueError(f"max_steps must be > 0 (got {self.max_steps}), or give epochs > 0")
        if self.precision not in PRECISION_MODES:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISION_MODES)}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0 (got {self.learning_rate})")
        if self.batch_size <= 0 or self.gradient_accumulation <= 0:
            raise ValueError("batch_size and gradient_accumulation must be >= 1")
        if self.labels not in LABEL_RECIPES:
            raise ValueError(f"unknown label recipe {self.labels!r}; choose one of {', '.join(LABEL_RECIPES)}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"unknown quantization {self.quantization!r}; choose one of {', '.join(QUANTIZATIONS)}")
        return self


def blog_recipe(**overrides) -> Recipe:
    """The KoAlpaca blog recipe: NF4 + double quant, compute bf16, checkpointing, LoRA r8/a32/d0.05 on the
    attention projections, pad = eos with the LM collator, batch 2, lr 1e-4, fp16=True, paged_adamw_8bit."""
    return replace(Recipe(), **overrides).validate()


def fixed_recipe(**overrides) -> Recipe:
    """The project's recipe: precision auto (bf16 on a GPU that has it, fp32 otherwise), answer-only labels with
    one trained EOS and a real pad token, cosine schedule with warmup, clipped gradients; for speed, batches
    grouped by length and vocabulary logits only at trained positions (the same loss, see labelled_logits_loss).

    lr 5e-4: on the shipped data with gemma-3-270m (H100, bf16, 1 epoch, batch 4, LoRA r8 on attention) answer
    perplexity was 19.2 at 2e-4, 18.5 at 5e-4 and 18.1 at 1e-3 (docs/measurements/gpu_h100_2026-11-23.md)."""
    base = Recipe(name="fixed", precision="auto", compute_dtype="auto", labels="fixed", lr_scheduler="cosine",
                  warmup_ratio=0.05, learning_rate=5e-4, optimizer="adamw_torch", group_by_length=True,
                  labelled_logits_only=True)
    return replace(base, **overrides).validate()


def effective_precision(mode: str) -> str:
    """What a precision mode becomes on this machine. fp16 on a CPU becomes fp16_emulated: Trainer(fp16=True)
    on CPU silently trains in fp32, which would hide the very failure the blog recipe has."""
    if mode == "auto":
        from helpers.models import resolve_precision
        return resolve_precision("auto", verbose=False).name
    if mode == "fp16" and not torch.cuda.is_available():
        return "fp16_emulated"
    if mode == "bf16" and not torch.cuda.is_available():
        return "fp32"  # CPU bf16 autocast is slow here and not what users run; fp32 has the same range
    return mode


def _compute_dtype(recipe: Recipe, precision: str) -> torch.dtype:
    if recipe.compute_dtype == "auto":
        return torch.bfloat16 if precision == "bf16" else torch.float32
    if not torch.cuda.is_available():
        return torch.float32  # bnb's CPU 4-bit kernels are fastest in fp32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[recipe.compute_dtype]


def prepare_lora(model, recipe: Recipe):
    """Checkpointing, k-bit preparation and LoRA, in the blog's order. Returns the peft model."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from helpers.models import lora_targets

    targets = lora_targets(model, recipe.lora_targets)
    if recipe.quantization != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=recipe.gradient_checkpointing)
    elif recipe.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model.config.use_cache = False
    config = LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
                        target_modules=targets, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def training_arguments(recipe: Recipe, output_dir: str | Path, precision: str, report_to: str = "none",
                       run_name: str | None = None):
    from transformers import TrainingArguments

    has_eval = recipe.eval_steps > 0
    return TrainingArguments(
        output_dir=str(output_dir), run_name=run_name or recipe.name,
        per_device_train_batch_size=recipe.batch_size, per_device_eval_batch_size=max(recipe.batch_size, 4),
        gradient_accumulation_steps=recipe.gradient_accumulation, learning_rate=recipe.learning_rate,
        lr_scheduler_type=recipe.lr_scheduler, warmup_steps=recipe.warmup_ratio, weight_decay=recipe.weight_decay,
        max_grad_norm=recipe.max_grad_norm, optim=recipe.optimizer,
        max_steps=recipe.max_steps if recipe.max_steps > 0 else -1, num_train_epochs=recipe.epochs or 1,
        fp16=precision == "fp16", bf16=precision == "bf16",
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


def labelled_logits_loss(model, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
    """The causal-LM loss computed from vocabulary logits at labelled positions only.

    The model's own loss projects every position onto the vocabulary (262k entries for Gemma-3, most of the
    compute of a 270M model) although answer-only labels use about half of them; the rest is prompt and padding.
    Same value as the model's loss: mean over labelled tokens, or sum / ``num_items_in_batch`` as Trainer
    passes it. LabTrainer checks the two against each other on the first batch before relying on this.
    """
    labels = inputs["labels"]
    targets = labels[:, 1:]
    keep = targets != -100
    outputs = model(**{k: v for k, v in inputs.items() if k != "labels"}, output_hidden_states=True,
                    logits_to_keep=1)
    head = model.get_output_embeddings()
    hidden = outputs.hidden_states[-1][:, :-1][keep]
    if head.weight.is_floating_point():
        # Mixed precision hands back fp32 hidden states (accelerate casts a model's outputs to fp32) while a bf16
        # model's head stays bf16; the model's own loss runs its head inside autocast, this one runs outside it.
        hidden = hidden.to(head.weight.dtype)
    logits = head(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    loss = torch.nn.functional.cross_entropy(logits, targets[keep].to(logits.device), reduction="sum")
    return loss / (num_items_in_batch if num_items_in_batch is not None else keep.sum().clamp(min=1))


def _lab_trainer_class():
    from transformers import Trainer
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

    from helpers.diagnostics import rng_state
    from helpers.fp16_emulation import DynamicLossScale, fp16_range

    class LabTrainer(Trainer):
        """Trainer that hands each raw step loss to a monitor and can emulate fp16 autocast on CPU.

        ``emulate_fp16=True`` runs the forward under :func:`helpers.fp16_emulation.fp16_range`, backpropagates
        ``loss * scale`` and skips the optimizer step (and so the LR scheduler step, as Trainer does for a
        GradScaler skip) when the gradients overflow, exactly where a real fp16 run would.
        """

        def __init__(self, *args, monitor=None, emulate_fp16=False, labelled_logits_only=False, **kwargs):
            super().__init__(*args, **kwargs)
            self.labelled_logits_only = labelled_logits_only
            self._labelled_logits_checked = False
            self.monitor = monitor.attach(self) if monitor is not None else None
            self.loss_scaler = DynamicLossScale() if emulate_fp16 else None
            self.first_nonfinite_batch = None
            self._unscaled = False
            self._staging_root = None   # set while a checkpoint is written (see _save_checkpoint)
            self.checkpoint_bytes = None  # size of a checkpoint, estimated, then measured on the first one

        def loss_scale(self):
            if self.loss_scaler is not None:
                return self.loss_scaler.scale
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
                devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
                with torch.no_grad(), torch.random.fork_rng(devices=devices):
                    state = torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]
                    ours = float(labelled_logits_loss(model, inputs, num_items_in_batch))
                    torch.set_rng_state(state[0])
                    for device, cuda_state in zip(devices, state[1]):
                        torch.cuda.set_rng_state(cuda_state, device)
                    theirs = float(super().compute_loss(model, dict(inputs), False, num_items_in_batch))
                if not abs(ours - theirs) <= 1e-3 * max(1.0, abs(theirs)):
                    warnings.warn(f"labelled_logits_only: loss {ours:.5f} differs from the model's {theirs:.5f} "
                                  "on this architecture; using the model's own loss")
                    self.labelled_logits_only = False
            return self.labelled_logits_only

        def _loss(self, model, inputs, return_outputs, num_items_in_batch):
            # Trainer hands num_items_in_batch to the model only when the model takes it; do the same.
            num_items_in_batch = num_items_in_batch if self.model_accepts_loss_kwargs else None
            if not return_outputs and self._use_labelled_logits(model, inputs, num_items_in_batch):
                return labelled_logits_loss(model, inputs, num_items_in_batch)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            if not (prediction_loss_only and self.labelled_logits_only and self._labelled_logits_checked
                    and "labels" in inputs):
                return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
            with torch.no_grad():
                loss = labelled_logits_loss(model, self._prepare_inputs(inputs))
            return loss.detach(), None, None

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.loss_scaler is None or not model.training:
                return self._loss(model, inputs, return_outputs, num_items_in_batch)
            with fp16_range():  # forward only: the backward stays in fp32 (see helpers.fp16_emulation)
                result = self._loss(model, inputs, return_outputs, num_items_in_batch)
            loss = result[0] if return_outputs else result
            scaled = loss * self.loss_scaler.scale
            return (scaled, result[1]) if return_outputs else scaled

        def training_step(self, model, inputs, num_items_in_batch=None):
            self._unscaled = False
            # Until a loss turns non-finite, keep what a replay needs to meet this forward again: the batch and the
            # random state its dropout draws from. The weights it met are still in the model when its loss comes
            # back (the optimizer steps after training_step), so they are copied only then; the run's last
            # weights would not do, as steps after the first non-finite loss may still move them.
            kept = None
            if self.first_nonfinite_batch is None:
                kept = {"batch": {k: v.detach().cpu().clone() for k, v in inputs.items() if isinstance(v, torch.Tensor)},
                        "rng_state": rng_state()}
            loss = super().training_step(model, inputs, num_items_in_batch)
            if self.loss_scaler is not None:
                loss = loss / self.loss_scaler.scale
            if kept is not None and not torch.isfinite(loss):
                weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
                self.first_nonfinite_batch = {"step": self.state.global_step + 1, "weights": weights, **kept}
            if self.monitor is not None:
                self.monitor.record_micro_loss(loss)
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
            self.optimizer._is_overflow = overflow

        def _clip_grad_norm(self, model):
            self._unscale_once(model)
            if self.loss_scaler is not None and self.optimizer._is_overflow:
                return torch.tensor(float("nan"))
            return super()._clip_grad_norm(model)

        def _get_grad_norm(self, model, grad_norm=None):
            self._unscale_once(model)
            if self.loss_scaler is not None and self.optimizer._is_overflow:
                grad_norm = torch.tensor(float("nan"))
            grad_norm = super()._get_grad_norm(model, grad_norm)
            if self.monitor is not None:
                self.monitor.record_grad_norm(grad_norm)
            return grad_norm

        def _save(self, output_dir=None, state_dict=None):
            # Relies on transformers 5.23 Trainer._save saving a PeftModel through self.model.save_pretrained(...).
            from peft import PeftModel

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
            # Relies on transformers 5.23 Trainer._save_checkpoint taking its folder (and rotating) from this method.
            return str(self._staging_root) if self._staging_root is not None else super()._get_output_dir(trial)

        def _save_checkpoint(self, model, trial):
            """Write the checkpoint into checkpoints/staging, check it, then rename it into place: a run killed or
            out of space while saving leaves the earlier checkpoints as they were and no half checkpoint."""
            # Relies on transformers 5.23 Trainer._save_checkpoint writing all into <_get_output_dir>/checkpoint-<step>.
            run_dir = Path(super()._get_output_dir(trial))
            name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            self._staging_root = run_dir / STAGING_NAME
            staged = self._staging_root / name
            shutil.rmtree(staged, ignore_errors=True)
            try:
                with writing_into(run_dir, name, needed=self.checkpoint_bytes, intact="every earlier checkpoint",
                                  partial=staged):
                    super()._save_checkpoint(model, trial)
                    if self.loss_scaler is not None:  # the emulated scale is part of the state a resume needs
                        (staged / "loss_scale.json").write_text(json.dumps(vars(self.loss_scaler)))
                    write_completion_marker(staged)
                    publish_folder(staged, run_dir / name)
            finally:
                if self._staging_root.is_dir() and not any(self._staging_root.iterdir()):
                    self._staging_root.rmdir()
                self._staging_root = None
            self.checkpoint_bytes = folder_bytes(run_dir / name)
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)

    return LabTrainer


def setup_wandb(out_dir: Path, project: str = "korean-qlora-lab") -> str:
    """wandb logs offline into ``out_dir/wandb`` unless the user configured a mode; never asks for a key."""
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_PROJECT", project)
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_DIR", str(out_dir))
    os.environ.setdefault("WANDB_DISABLE_GIT", "true")
    Path(os.environ["WANDB_DIR"]).mkdir(parents=True, exist_ok=True)
    return "wandb"


@dataclass
class RunResult:
    trainer: object
    model: object
    tokenizer: object
    recipe: Recipe
    precision: str
    monitor: object
    summary: dict


def train(recipe: Recipe, model_id: str = "embedded", data: str = "shipped", out_dir: str | Path = "outputs/run",
          revision: str | None = None, report_to: str = "wandb", on_collapse: str = "record",
          max_rows: int | None = None, resume: bool | str = False, model=None, tokenizer=None,
          save_adapter: bool = True, verbose: bool = True, callbacks: list | None = None,
          attn_implementation: str | None = None) -> RunResult:
    """Train ``recipe`` and keep the evidence under ``out_dir``: trace.jsonl, the adapter, run_card.json.

    report_to: ``wandb`` (offline by default) or ``none``. on_collapse: ``record`` or ``stop`` (see
    :class:`helpers.diagnostics.CollapseMonitor`). model/tokenizer: pass an already loaded base model to skip
    loading. callbacks: more TrainerCallbacks. attn_implementation: None lets ``load_model`` pick per architecture
    (sdpa; eager for Gemma-2/3), or ``sdpa``/``eager``/... to choose; it changes speed and memory, not the math.

    resume: True continues from the newest valid checkpoint in ``out_dir/checkpoints`` (a newer one that is
    incomplete or damaged is named, moved to ``invalid_checkpoints/`` and skipped); a path resumes from that
    checkpoint. A resume refuses a different recipe or different data (sha256 of the file) and names what changed.
    A run that starts from step 0 (resume=False, or no valid checkpoint) in a folder holding an earlier run's
    checkpoints, trace, adapter or run card first moves them into ``out_dir/earlier_runs/<time>/``: the runs never
    mix, and nothing of the earlier one is lost.

    One run at a time writes a folder: a second one stops at once and names the first (pid, host, start time); the
    lock of a run that was killed is taken over. Checkpoints, the adapter and the run card appear whole or not at
    all; a full disk or an unwritable folder stops the run with one message and leaves earlier files intact.
    """
    from transformers import set_seed

    from helpers import data as data_mod

    recipe.validate()
    data_mod.check_source(data)  # fail before loading a model
    out_dir = Path(out_dir)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    lock = _lock_output_folder(out_dir)
    try:
        _tidy_interrupted_writes(out_dir)
        checkpoint, skipped = _choose_checkpoint(out_dir, resume, verbose)
        inputs = _data_identity(data, data_mod.file_sha256(data), max_rows)
        if checkpoint is not None:
            _check_resumable(out_dir, recipe, inputs)
            set_aside = None
        else:
            set_aside = _set_aside_earlier_run(out_dir, verbose)
        with writing_into(out_dir, "recipe.json"):
            _record_run_inputs(out_dir, recipe, inputs)
        set_seed(recipe.seed)
        return _train_in_locked_folder(recipe, model_id, data, out_dir, revision, report_to, on_collapse, max_rows,
                                       checkpoint, model, tokenizer, save_adapter, verbose, callbacks,
                                       notes={"took_over_lock_of": lock.took_over, "skipped_checkpoints": skipped,
                                              "earlier_run_moved_to": set_aside, "data_sha256": inputs["data_sha256"]},
                                       attn_implementation=attn_implementation)
    finally:
        lock.release()


def _train_in_locked_folder(recipe, model_id, data, out_dir, revision, report_to, on_collapse, max_rows, checkpoint,
                            model, tokenizer, save_adapter, verbose, callbacks, notes,
                            attn_implementation=None) -> RunResult:
    from helpers import data as data_mod
    from helpers.diagnostics import CollapseMonitor
    from helpers.models import device_description, load_model
    from helpers.outputs import package_versions

    precision = effective_precision(recipe.precision)
    if precision == "fp16_emulated" and recipe.gradient_checkpointing:
        # Checkpointing recomputes the forward inside backward, outside the emulation (and under a restored CPU
        # bf16 autocast); it changes memory, not the math, so the emulated run goes without it.
        recipe = replace(recipe, gradient_checkpointing=False)
        if verbose:
            print("fp16 emulation: gradient checkpointing off (same math, no recompute outside the emulation)")
    if model is None:
        model, tokenizer = load_model(model_id, revision=revision, quantization=recipe.quantization,
                                      precision=_load_precision(recipe, precision),
                                      attn_implementation=attn_implementation, verbose=verbose)
    data_mod.prepare_tokenizer(tokenizer, recipe.labels)
    _check_pad_fits(model, tokenizer)
    dataset, data_report = data_mod.load_instructions(data, tokenizer=tokenizer, max_length=recipe.max_length,
                                                      template=recipe.template, seed=recipe.seed,
                                                      max_rows=max_rows, verbose=verbose)
    tokenized = data_mod.tokenize_dataset(dataset, tokenizer, recipe.labels, recipe.template, recipe.max_length)
    model = prepare_lora(model, recipe)
    if verbose:
        model.print_trainable_parameters()
    staged_adapter = out_dir / ADAPTER_STAGING_NAME
    checkpoint_bytes = _check_space_for_run(out_dir, recipe, model, tokenizer, staged_adapter, save_adapter)
    if report_to == "wandb":
        setup_wandb(out_dir)
    # A resumed run keeps the trace up to its checkpoint, so its curve continues the first run's.
    previous = _trace_until(out_dir / "trace.jsonl", _step_of(checkpoint)) if checkpoint else []
    monitor = CollapseMonitor(out_dir, on_collapse=on_collapse, wandb_log=report_to == "wandb", previous=previous)
    args = training_arguments(recipe, out_dir / "checkpoints", precision, report_to, run_name=out_dir.name)
    trainer = _lab_trainer_class()(
        model=model, args=args, train_dataset=tokenized["train"],
        eval_dataset=tokenized["eval"] if recipe.eval_steps > 0 else None,
        data_collator=data_mod.make_collator(tokenizer, recipe.labels), callbacks=[monitor, *(callbacks or [])],
        monitor=monitor, emulate_fp16=precision == "fp16_emulated", labelled_logits_only=recipe.labelled_logits_only)
    trainer.checkpoint_bytes = checkpoint_bytes
    if checkpoint and trainer.loss_scaler is not None and (Path(checkpoint) / "loss_scale.json").exists():
        vars(trainer.loss_scaler).update(json.loads((Path(checkpoint) / "loss_scale.json").read_text()))
    started = time.time()
    with writing_into(out_dir, "the training trace", intact="every earlier checkpoint"):
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    wall = time.time() - started
    if report_to == "wandb":
        _finish_wandb()
    finding = monitor.finding()
    adapter_dir = out_dir / "adapter"
    if save_adapter:
        _save_adapter(model, staged_adapter, adapter_dir)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    summary = {
        "recipe": asdict(recipe), "precision": precision, "model_id": model_id, "revision": revision,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "data": data, "data_sha256": notes.pop("data_sha256"), "data_report": data_report.counts(),
        "train_rows": len(dataset["train"]), "eval_rows": len(dataset["eval"]),
        "global_step": trainer.state.global_step, "wall_seconds": round(wall, 1),
        "seconds_per_step": round(wall / max(1, trainer.state.global_step - _step_of(checkpoint)), 3),
        "logged_losses": [(h["step"], h["loss"]) for h in logs], "eval_losses": [(h["step"], h["eval_loss"]) for h in evals],
        "final_train_loss": logs[-1]["loss"] if logs else None, "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
        "collapse": asdict(finding), "collapse_text": finding.text(), "stopped_at": monitor.stopped_at,
        "final_learning_rate": monitor.records[-1].learning_rate if monitor.records else None,
        "final_loss_scale": monitor.records[-1].loss_scale if monitor.records else None,
        "resumed_from": shown_path(checkpoint, out_dir) if checkpoint else None,
        "adapter_dir": shown_path(adapter_dir, out_dir) if save_adapter else None,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        **peak_gpu_memory(), **notes,
        "versions": package_versions(), "device": device_description(), "steps_traced": len(monitor.records),
    }
    with writing_into(out_dir, "run_card.json", intact="the adapter"):
        atomic_write_text(out_dir / "run_card.json", json.dumps(summary, ensure_ascii=False, indent=1, default=str))
    return RunResult(trainer, model, tokenizer, recipe, precision, monitor, summary)


def _trace_until(path: Path, step: int) -> list:
    """The trace's records up to ``step``. A run killed while appending a line leaves it torn; it is dropped (its
    step is after the checkpoint anyway)."""
    from helpers.diagnostics import StepRecord

    records = []
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            records.append(StepRecord(**json.loads(line)))
        except (ValueError, TypeError):
            continue
    return [r for r in records if r.step <= step]


def _check_pad_fits(model, tokenizer):
    """Padding must use a token the model already has: train() adds no tokens, so the saved adapter holds LoRA
    weights only and loads on the unchanged base model."""
    rows = model.get_input_embeddings().weight.shape[0]
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id >= rows:
        raise ValueError(f"the tokenizer's pad token {tokenizer.pad_token!r} (id {tokenizer.pad_token_id}) is not "
                         f"one of the model's {rows} embeddings; pad with a token it has (helpers.data.prepare_tokenizer)")


# ------------------------------------------------------------------------------------- output folder and resume

STAGING_NAME = "staging"                 # checkpoints/staging/checkpoint-N while Trainer writes it
ADAPTER_STAGING_NAME = "adapter.partial"  # the adapter while it is written; renamed to adapter/ when whole
COMPLETION_MARKER = "checkpoint_complete.json"
INVALID_CHECKPOINTS = "invalid_checkpoints"
EARLIER_RUNS = "earlier_runs"
# What one run writes into its out_dir; a run starting from step 0 moves an earlier run's copy of these aside
# (with its recipe.json and data.json).
RUN_STATE = ("checkpoints", INVALID_CHECKPOINTS, "trace.jsonl", "adapter", "last_good", "run_card.json")


def _lock_output_folder(out_dir: Path) -> RunLock:
    with writing_into(out_dir, "its lock file"):
        out_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock(out_dir).acquire()
    if lock.took_over:
        warnings.warn(f"{shown_path(out_dir)}: took over the lock of an earlier run ({describe_holder(lock.took_over)}"
                      "), which is no longer running", stacklevel=3)
    return lock


def _tidy_interrupted_writes(out_dir: Path):
    """What a run killed while saving leaves behind: half-written folders (deleted: nothing in them was ever
    published) and an adapter caught between the two renames of publish_folder (put back)."""
    shutil.rmtree(out_dir / "checkpoints" / STAGING_NAME, ignore_errors=True)
    shutil.rmtree(out_dir / ADAPTER_STAGING_NAME, ignore_errors=True)
    restore_replaced(out_dir / "adapter")
    for replaced in (out_dir / "checkpoints").glob("checkpoint-*.replaced"):
        restore_replaced(replaced.with_suffix(""))


def write_completion_marker(folder: Path):
    """List every file of a finished checkpoint with its size; checkpoint_problem compares them."""
    files = {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*")) if f.is_file()}
    (folder / COMPLETION_MARKER).write_text(json.dumps({"files": files}, indent=1))


def checkpoint_problem(folder: str | Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from, or None when it can: it needs its trainer state, a whole
    adapter, the optimizer and scheduler, and (when it has one) files of the sizes its completion marker lists."""
    folder = Path(folder)
    state = folder / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json"
    try:
        step = json.loads(state.read_text())["global_step"]
    except (ValueError, KeyError, OSError):
        return "trainer_state.json is unreadable"
    if step != _step_of(folder):
        return f"trainer_state.json is of step {step}"
    for name in ("adapter_config.json", "optimizer.pt", "scheduler.pt"):
        if not (folder / name).is_file():
            return f"no {name}"
    problem = _safetensors_problem(folder / "adapter_model.safetensors")
    if problem:
        return problem
    for name in ("optimizer.pt", "scheduler.pt"):
        if not zipfile.is_zipfile(folder / name):  # torch.save writes a zip whose directory is at its end
            return f"{name} is cut short or damaged"
    marker = folder / COMPLETION_MARKER
    if marker.is_file():
        try:
            listed = json.loads(marker.read_text())["files"]
        except (ValueError, KeyError, OSError):
            return f"{COMPLETION_MARKER} is unreadable"
        for name, size in listed.items():
            actual = (folder / name).stat().st_size if (folder / name).is_file() else None
            if actual != size:
                return f"{name} has {actual} bytes, {size} were written"
    return None


def _safetensors_problem(path: Path) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header, then the tensors it lists: a file cut short
    (or padded) no longer matches the size its header describes."""
    if not path.is_file():
        return f"no {path.name}"
    size = path.stat().st_size
    try:
        with path.open("rb") as handle:
            header_length = int.from_bytes(handle.read(8), "little")
            if size < 8 or header_length > size - 8:
                raise ValueError
            header = json.loads(handle.read(header_length))
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError):
        return f"{path.name} is damaged (no readable header)"
    if 8 + header_length + end != size:
        return f"{path.name} has {size} bytes, its header describes {8 + header_length + end}"
    return None


def _choose_checkpoint(out_dir: Path, resume, verbose: bool) -> tuple[Path | None, list]:
    """The checkpoint to resume from: the newest valid one. Newer invalid ones move to invalid_checkpoints/ (so
    that Trainer's rotation and the next resume do not meet them) with a warning that says why."""
    if not resume:
        return None, []
    if isinstance(resume, (str, Path)):
        problem = checkpoint_problem(resume)
        if problem:
            raise ValueError(f"cannot resume from {shown_path(resume, out_dir)}: {problem}")
        return Path(resume), []
    folder = out_dir / "checkpoints"
    found = sorted((f for f in folder.glob("checkpoint-*") if f.is_dir() and f.name.split("-")[-1].isdigit()),
                   key=_step_of, reverse=True)
    chosen, skipped = None, []
    for candidate in found:
        problem = checkpoint_problem(candidate)
        if problem is None:
            chosen = candidate
            break
        skipped.append({"checkpoint": candidate.name, "problem": problem})
    for entry in skipped:
        destination = out_dir / INVALID_CHECKPOINTS / entry["checkpoint"]
        shutil.rmtree(destination, ignore_errors=True)
        destination.parent.mkdir(exist_ok=True)
        os.replace(folder / entry["checkpoint"], destination)
        warnings.warn(f"resume: skipped {entry['checkpoint']} ({entry['problem']}); moved it to "
                      f"{INVALID_CHECKPOINTS}/", stacklevel=3)
    if verbose:
        print(f"resume: from {chosen.name}, the newest valid checkpoint" if chosen else
              f"resume: no valid checkpoint in {shown_path(folder)}, starting from step 0")
    return chosen, skipped


def _set_aside_earlier_run(out_dir: Path, verbose: bool) -> str | None:
    """Move an earlier run's files out of the way of a run that starts from step 0; returns where to."""
    present = [name for name in RUN_STATE if (out_dir / name).exists()]
    if not present:
        return None
    present += [name for name in ("recipe.json", "data.json") if (out_dir / name).exists()]
    started = out_dir / ("recipe.json" if "recipe.json" in present else present[0])  # written when that run began
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(started.stat().st_mtime))
    destination = out_dir / EARLIER_RUNS / stamp
    suffix = 1
    while destination.exists():
        suffix += 1
        destination = out_dir / EARLIER_RUNS / f"{stamp}-{suffix}"
    destination.mkdir(parents=True)
    for name in present:
        os.replace(out_dir / name, destination / name)
    where = shown_path(destination, out_dir)
    if verbose:
        print(f"starting from step 0: the earlier run in this folder ({', '.join(present)}) moved to {where}")
    return where


# Fields a resumed run may change: how long it runs and how often it logs, evaluates and saves.
RESUMABLE_CHANGES = {"max_steps", "epochs", "logging_steps", "eval_steps", "save_steps"}


def _check_resumable(out_dir: Path, recipe: Recipe, inputs: dict) -> None:
    """Refuse to resume a checkpoint of a different recipe or different data (a changed parameter or data file with
    the old output_dir would otherwise continue the old run silently), naming every changed field."""
    current = asdict(recipe)
    changes = []
    if (out_dir / "recipe.json").exists():
        previous = json.loads((out_dir / "recipe.json").read_text())
        changes += [f"{k}: {previous.get(k)!r} -> {current[k]!r}" for k in sorted(current)
                    if k not in RESUMABLE_CHANGES and previous.get(k) != current[k]]
    if (out_dir / "data.json").exists():  # recorded since data checks began; older runs have only recipe.json
        previous = json.loads((out_dir / "data.json").read_text())
        other_content = previous.get("data_sha256") != inputs["data_sha256"]
        other_hub_set = not inputs["local"] and previous.get("data_file") != inputs["data_file"]
        if other_content or other_hub_set:
            changes.append(f"data: {previous.get('data_file')!r} (sha256 {str(previous.get('data_sha256'))[:12]}) -> "
                           f"{inputs['data_file']!r} (sha256 {inputs['data_sha256'][:12]})")
        if previous.get("max_rows") != inputs["max_rows"]:
            changes.append(f"max_rows: {previous.get('max_rows')!r} -> {inputs['max_rows']!r}")
    if changes:
        raise ValueError(f"{shown_path(out_dir)} holds checkpoints of a run with a different recipe or data ("
                         + "; ".join(changes) + "); choose another output_dir, or resume=False to start over there "
                         f"(the earlier run then moves to {EARLIER_RUNS}/)")


def _data_identity(data: str, sha256: str, max_rows) -> dict:
    """What a resume compares: a local file by its content (it may have moved), a hub data set by its id."""
    local = sha256 != "not a local file"
    return {"data_file": Path(data).name if local else data, "data_sha256": sha256, "local": local,
            "max_rows": max_rows}


def _record_run_inputs(out_dir: Path, recipe: Recipe, inputs: dict):
    """recipe.json and data.json: what the next resume compares against."""
    atomic_write_text(out_dir / "recipe.json", json.dumps(asdict(recipe), indent=1))
    atomic_write_text(out_dir / "data.json", json.dumps(inputs, ensure_ascii=False, indent=1))


def _check_space_for_run(out_dir: Path, recipe: Recipe, model, tokenizer, staged_adapter: Path,
                         save_adapter: bool) -> int:
    """Write the tokenizer (it does not change while training) where the adapter will go, then check that the
    disk has room for the checkpoints and the adapter, before any training time is spent. Returns the estimated
    size of one checkpoint."""
    adapter_weights = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    if not save_adapter and recipe.save_steps <= 0:
        check_free_space(out_dir, 2**20, "this run's trace and run card")
        return None
    with writing_into(out_dir, "the tokenizer of the adapter", partial=staged_adapter):
        tokenizer.save_pretrained(staged_adapter)
    tokenizer_bytes = folder_bytes(staged_adapter)
    if not save_adapter:
        shutil.rmtree(staged_adapter)
    # Trainer saves the collator's tokenizer into each checkpoint beside the adapter, the optimizer's two moments
    # per weight (Adam; 8-bit optimizers keep less) and small state files.
    checkpoint_bytes = tokenizer_bytes + 3 * adapter_weights + 2**16
    needed = (adapter_weights if save_adapter else 0) + 2**20  # the trace and the run card
    if recipe.save_steps > 0:
        existing = len(list((out_dir / "checkpoints").glob("checkpoint-*")))
        saves = recipe.max_steps // recipe.save_steps + 1 if recipe.max_steps > 0 else 2**31  # +1: at the end
        # Trainer writes the new checkpoint before it deletes the oldest beyond its limit
        needed += max(0, min(saves, SAVE_TOTAL_LIMIT + 1 - existing)) * checkpoint_bytes
    try:
        check_free_space(out_dir, needed, "this run's checkpoints and adapter")
    except OSError:
        shutil.rmtree(staged_adapter, ignore_errors=True)
        raise
    return checkpoint_bytes


def _save_adapter(model, staged: Path, final: Path):
    """Adapter weights beside the tokenizer already staged, then one rename: a full disk or a kill leaves the
    earlier adapter/ (if any) as it was and never an adapter/ that looks complete but is not."""
    needed = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    with writing_into(final.parent, "the adapter", needed=needed, intact="the earlier adapter/ (if any)",
                      partial=staged):
        model.save_pretrained(staged, safe_serialization=True, save_embedding_layers=False)
        publish_folder(staged, final)


def _step_of(checkpoint) -> int:
    return int(Path(checkpoint).name.split("-")[-1]) if checkpoint else 0


def _load_precision(recipe: Recipe, precision: str) -> str:
    """The dtype to load the base in: the 4-bit compute dtype when quantized; else bf16 for bf16 runs and fp32
    otherwise (fp16 autocast keeps fp32 master weights)."""
    if recipe.quantization != "none":
        compute = _compute_dtype(recipe, precision)
        return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[compute]
    return "bf16" if precision == "bf16" else "fp32"


def _finish_wandb():
    try:
        import wandb
        if wandb.run is not None:
            wandb.finish()
    except ImportError:
        pass
