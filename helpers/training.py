"""Training recipes: the blog's QLoRA recipe as users copy it, and the project's fixed recipe.

``blog_recipe()`` and ``fixed_recipe()`` return a :class:`Recipe`; ``train()`` runs any recipe on a model id
and a data source and returns the trainer, the trace of every step and a summary. Notebooks 02-04 call it.
"""
from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from helpers.data import LABEL_RECIPES
from helpers.models import QUANTIZATIONS

PRECISION_MODES = ("auto", "fp16", "fp16_emulated", "bf16", "fp32")


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
        save_total_limit=2, train_sampling_strategy="group_by_length" if recipe.group_by_length else "random",
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
    hidden = outputs.hidden_states[-1][:, :-1][keep]
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    loss = torch.nn.functional.cross_entropy(logits, targets[keep].to(logits.device), reduction="sum")
    return loss / (num_items_in_batch if num_items_in_batch is not None else keep.sum().clamp(min=1))


def _lab_trainer_class():
    from transformers import Trainer

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

        def _save_checkpoint(self, model, trial):
            super()._save_checkpoint(model, trial)
            if self.loss_scaler is not None:  # the emulated scale is part of the state a resume needs
                folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
                (folder / "loss_scale.json").write_text(json.dumps(vars(self.loss_scaler)))

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
          save_adapter: bool = True, verbose: bool = True) -> RunResult:
    """Train ``recipe`` and keep the evidence under ``out_dir``: trace.jsonl, the adapter, run_card.json.

    report_to: ``wandb`` (offline by default) or ``none``. on_collapse: ``record`` or ``stop`` (see
    :class:`helpers.diagnostics.CollapseMonitor`). resume: True picks the last checkpoint in out_dir.
    model/tokenizer: pass an already loaded base model to skip loading.
    """
    from transformers import set_seed
    from transformers.trainer_utils import get_last_checkpoint

    from helpers import data as data_mod
    from helpers.diagnostics import CollapseMonitor, read_trace
    from helpers.models import device_description, load_model
    from helpers.outputs import package_versions

    recipe.validate()
    data_mod.check_source(data)  # fail before loading a model
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_resumable(out_dir, recipe, resume)
    precision = effective_precision(recipe.precision)
    if precision == "fp16_emulated" and recipe.gradient_checkpointing:
        # Checkpointing recomputes the forward inside backward, outside the emulation (and under a restored CPU
        # bf16 autocast); it changes memory, not the math, so the emulated run goes without it.
        recipe = replace(recipe, gradient_checkpointing=False)
        if verbose:
            print("fp16 emulation: gradient checkpointing off (same math, no recompute outside the emulation)")
    set_seed(recipe.seed)
    if model is None:
        model, tokenizer = load_model(model_id, revision=revision, quantization=recipe.quantization,
                                      precision=_load_precision(recipe, precision), verbose=verbose)
    if data_mod.prepare_tokenizer(tokenizer, recipe.labels):
        model.resize_token_embeddings(len(tokenizer))
    dataset, data_report = data_mod.load_instructions(data, tokenizer=tokenizer, max_length=recipe.max_length,
                                                      template=recipe.template, seed=recipe.seed,
                                                      max_rows=max_rows, verbose=verbose)
    tokenized = data_mod.tokenize_dataset(dataset, tokenizer, recipe.labels, recipe.template, recipe.max_length)
    model = prepare_lora(model, recipe)
    if verbose:
        model.print_trainable_parameters()
    if report_to == "wandb":
        setup_wandb(out_dir)
    checkpoint = None
    if resume:
        folder = out_dir / "checkpoints"
        checkpoint = resume if isinstance(resume, str) else \
            (get_last_checkpoint(str(folder)) if folder.is_dir() else None)
        if checkpoint is None and verbose:
            print(f"resume: no checkpoint in {out_dir / 'checkpoints'}, starting from step 0")
    # A resumed run keeps the trace up to its checkpoint, so its curve continues the first run's.
    previous = [r for r in read_trace(out_dir / "trace.jsonl") if r.step <= _step_of(checkpoint)] \
        if checkpoint and (out_dir / "trace.jsonl").exists() else []
    monitor = CollapseMonitor(out_dir, on_collapse=on_collapse, wandb_log=report_to == "wandb", previous=previous)
    args = training_arguments(recipe, out_dir / "checkpoints", precision, report_to, run_name=out_dir.name)
    trainer = _lab_trainer_class()(
        model=model, args=args, train_dataset=tokenized["train"],
        eval_dataset=tokenized["eval"] if recipe.eval_steps > 0 else None,
        data_collator=data_mod.make_collator(tokenizer, recipe.labels), callbacks=[monitor],
        monitor=monitor, emulate_fp16=precision == "fp16_emulated", labelled_logits_only=recipe.labelled_logits_only)
    if checkpoint and trainer.loss_scaler is not None and (Path(checkpoint) / "loss_scale.json").exists():
        vars(trainer.loss_scaler).update(json.loads((Path(checkpoint) / "loss_scale.json").read_text()))
    started = time.time()
    trainer.train(resume_from_checkpoint=checkpoint)
    wall = time.time() - started
    if report_to == "wandb":
        _finish_wandb()
    finding = monitor.finding()
    adapter_dir = out_dir / "adapter"
    if save_adapter:
        model.save_pretrained(adapter_dir, safe_serialization=True)
        tokenizer.save_pretrained(adapter_dir)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    summary = {
        "recipe": asdict(recipe), "precision": precision, "model_id": model_id, "revision": revision,
        "data": data, "data_sha256": data_mod.file_sha256(data), "data_report": data_report.counts(),
        "train_rows": len(dataset["train"]), "eval_rows": len(dataset["eval"]),
        "global_step": trainer.state.global_step, "wall_seconds": round(wall, 1),
        "seconds_per_step": round(wall / max(1, trainer.state.global_step - _step_of(checkpoint)), 3),
        "logged_losses": [(h["step"], h["loss"]) for h in logs], "eval_losses": [(h["step"], h["eval_loss"]) for h in evals],
        "final_train_loss": logs[-1]["loss"] if logs else None, "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
        "collapse": asdict(finding), "collapse_text": finding.text(), "stopped_at": monitor.stopped_at,
        "final_learning_rate": monitor.records[-1].learning_rate if monitor.records else None,
        "final_loss_scale": monitor.records[-1].loss_scale if monitor.records else None,
        "resumed_from": checkpoint, "adapter_dir": str(adapter_dir) if save_adapter else None,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "versions": package_versions(), "device": device_description(), "steps_traced": len(monitor.records),
    }
    (out_dir / "run_card.json").write_text(json.dumps(summary, ensure_ascii=False, indent=1, default=str))
    return RunResult(trainer, model, tokenizer, recipe, precision, monitor, summary)


# Fields a resumed run may change: how long it runs and how often it logs, evaluates and saves.
RESUMABLE_CHANGES = {"max_steps", "epochs", "logging_steps", "eval_steps", "save_steps"}


def _check_resumable(out_dir: Path, recipe: Recipe, resume) -> None:
    """Refuse to resume a checkpoint of a different recipe (a changed parameter with the old output_dir would
    otherwise continue the old run silently); record this run's recipe for the next resume."""
    saved = out_dir / "recipe.json"
    current = asdict(recipe)
    if resume and saved.exists() and (out_dir / "checkpoints").is_dir():
        previous = json.loads(saved.read_text())
        changed = sorted(k for k in current if k not in RESUMABLE_CHANGES and previous.get(k) != current[k])
        if changed:
            raise ValueError(f"{out_dir} holds checkpoints of a run with a different recipe ("
                             + ", ".join(f"{k}: {previous.get(k)!r} -> {current[k]!r}" for k in changed)
                             + "); choose another output_dir, or resume=False to start over there")
    saved.write_text(json.dumps(current, indent=1))


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
