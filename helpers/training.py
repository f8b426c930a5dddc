"""A training run: ``train()`` runs a recipe (:mod:`helpers.recipes`) on a model and a data source and keeps the
evidence under its output folder: the trace of every step, checkpoints that resume, the adapter and a run card.
Notebooks 02-04 call it; the Trainer it builds is :class:`helpers.trainer.LabTrainer`."""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import set_seed

from helpers import data as data_mod
from helpers.chat_template import attach_chat_template
from helpers.checkpoints import ADAPTER_STAGING_NAME, check_space_for_run, checkpoint_step, write_adapter
from helpers.collators import make_training_collator
from helpers.diagnostics import CollapseMonitor, StepRecord
from helpers.distributed import is_main_process, start_processes, sum_across_processes, world_size
from helpers.model_card import adapter_readme
from helpers.multi_process import StopTogether, monitor_folder, open_run_folder
from helpers.models import keep_unquantized_in, load_model, lora_targets, resolve_source
from helpers.models.base_reference import base_model_reference
from helpers.outputs import atomic_write_text, package_versions, peak_gpu_memory, shown_path, writing_into
from helpers.precision import device_description, plan_precision
from helpers.recipes import Recipe
from helpers.step_size import plan_step_size
from helpers.trainer import LabTrainer, training_arguments


def prepare_lora(model, recipe: Recipe, precision: str):
    """Checkpointing, k-bit preparation and LoRA, in the blog's order. Returns the peft model."""
    targets = lora_targets(model, recipe.lora_targets)
    if recipe.quantization != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=recipe.gradient_checkpointing)
        if not recipe.fp32_unquantized and precision == "bf16":
            keep_unquantized_in(model, torch.bfloat16)
    elif recipe.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model.config.use_cache = False
    config = LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
                        target_modules=targets, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


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

    report_to: ``wandb`` (offline by default) or ``none``. on_collapse: ``record``, ``stop`` or ``rescue`` (see
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
    recipe.validate()
    data_mod.check_source(data)  # fail before loading a model
    out_dir, verbose = Path(out_dir), verbose and is_main_process()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start_processes()  # several processes (accelerate launch): the main one writes out_dir (helpers.multi_process)
    folder = open_run_folder(out_dir, recipe, data, max_rows, resume, verbose)
    try:
        set_seed(recipe.seed)
        return _train_in_locked_folder(recipe, model_id, data, out_dir, revision, report_to, on_collapse, max_rows,
                                       folder.checkpoint, model, tokenizer, save_adapter, verbose, callbacks,
                                       notes={"took_over_lock_of": getattr(folder.lock, "took_over", None),
                                              "skipped_checkpoints": folder.skipped,
                                              "earlier_run_moved_to": folder.set_aside,
                                              "data_sha256": folder.inputs["data_sha256"]},
                                       attn_implementation=attn_implementation)
    finally:
        folder.release()


def _train_in_locked_folder(recipe, model_id, data, out_dir, revision, report_to, on_collapse, max_rows, checkpoint,
                            model, tokenizer, save_adapter, verbose, callbacks, notes,
                            attn_implementation=None) -> RunResult:
    plan = plan_precision(recipe.precision, recipe.compute_dtype, recipe.quantization)
    precision = plan.effective
    if plan.emulate_fp16 and recipe.gradient_checkpointing:
        # Checkpointing recomputes the forward inside backward, outside the emulation (and under a restored CPU
        # bf16 autocast); it changes memory, not the math, so the emulated run goes without it.
        recipe = replace(recipe, gradient_checkpointing=False)
        if verbose:
            print("fp16 emulation: gradient checkpointing off (same math, no recompute outside the emulation)")
    if model is None:
        model, tokenizer = load_model(model_id, revision=revision, quantization=recipe.quantization,
                                      precision=plan.load_precision,
                                      attn_implementation=attn_implementation, verbose=verbose)
    data_mod.prepare_tokenizer(tokenizer, recipe.labels)
    _check_pad_fits(model, tokenizer)
    dataset, data_report = data_mod.load_instructions(data, tokenizer=tokenizer, max_length=recipe.max_length,
                                                      template=recipe.template, seed=recipe.seed,
                                                      max_rows=max_rows, verbose=verbose)
    tokenized = data_mod.tokenize_dataset(dataset, tokenizer, recipe.labels, recipe.template, recipe.max_length)
    attach_chat_template(tokenizer, recipe.template)  # the saved tokenizer then prompts as training did
    recipe, step_plan = plan_step_size(recipe, model, tokenized["train"], precision)
    if verbose:
        print(f"step: {recipe.batch_size} examples x {recipe.gradient_accumulation} (~{step_plan.tokens_per_step:,} "
              f"tokens), gradient checkpointing {'on' if recipe.gradient_checkpointing else 'off'} "
              f"({step_plan.reason}); {step_plan.estimate.summary()}")
    model = prepare_lora(model, recipe, precision)
    base_model = _name_base_model(model, model_id, revision, verbose)
    if verbose:
        model.print_trainable_parameters()
    staged_adapter = out_dir / ADAPTER_STAGING_NAME
    main = is_main_process()
    checkpoint_bytes = (check_space_for_run(out_dir, recipe, model, tokenizer, staged_adapter, save_adapter)
                        if main else None)
    if report_to == "wandb":
        setup_wandb(out_dir)
    # A resumed run keeps the trace up to its checkpoint, so its curve continues the first run's.
    previous = _trace_until(out_dir / "trace.jsonl", checkpoint_step(checkpoint)) if checkpoint else []
    monitor = CollapseMonitor(monitor_folder(out_dir), on_collapse=on_collapse, wandb_log=report_to == "wandb",
                              previous=previous)
    args = training_arguments(recipe, out_dir / "checkpoints", plan, report_to, run_name=out_dir.name)
    trainer = LabTrainer(
        model=model, args=args, train_dataset=tokenized["train"],
        eval_dataset=tokenized["eval"] if recipe.eval_steps > 0 else None,
        data_collator=make_training_collator(tokenizer, recipe), callbacks=[monitor, *(callbacks or []), StopTogether()],
        monitor=monitor, emulate_fp16=plan.emulate_fp16, labelled_logits_only=recipe.labelled_logits_only,
        loss_chunk_rows=recipe.loss_chunk_rows)
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
    logs = [h for h in trainer.state.log_history if "loss" in h]
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    tokens = sum_across_processes(trainer.real_tokens_seen)  # of every process
    summary = {
        "recipe": asdict(recipe), "precision": precision, "model_id": model_id, "revision": revision,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "base_model": base_model, "data": data, "data_sha256": notes.pop("data_sha256"),
        "data_report": data_report.counts(),
        "train_rows": len(dataset["train"]), "eval_rows": len(dataset["eval"]),
        "global_step": trainer.state.global_step, "wall_seconds": round(wall, 1),
        "seconds_per_step": round(wall / max(1, trainer.state.global_step - checkpoint_step(checkpoint)), 3),
        "logged_losses": [(h["step"], h["loss"]) for h in logs], "eval_losses": [(h["step"], h["eval_loss"]) for h in evals],
        "final_train_loss": logs[-1]["loss"] if logs else None, "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
        "collapse": asdict(finding), "collapse_text": finding.text(), "stopped_at": monitor.stopped_at,
        **monitor.card(),  # the early warning and the rescue (helpers.diagnostics.collapse)
        "final_learning_rate": monitor.records[-1].learning_rate if monitor.records else None,
        "final_loss_scale": monitor.records[-1].loss_scale if monitor.records else None,
        "resumed_from": shown_path(checkpoint, out_dir) if checkpoint else None,
        "adapter_dir": shown_path(adapter_dir, out_dir) if save_adapter else None,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "optimizer": str(trainer.args.optim.value), "real_tokens": tokens,
        "real_tokens_per_s": round(tokens / wall, 1) if wall > 0 else None, "processes": world_size(),
        "step_plan": {"tokens_per_step": step_plan.tokens_per_step, "reason": step_plan.reason,
                      "budget_gib": step_plan.budget_gib},
        "memory_estimate": step_plan.estimate.as_dict(),
        **peak_gpu_memory(), **notes,
        "versions": package_versions(), "device": device_description(), "steps_traced": len(monitor.records),
    }
    if save_adapter and main:
        write_adapter(model, staged_adapter, adapter_dir, readme=adapter_readme(summary))
    if main:
        with writing_into(out_dir, "run_card.json", intact="the adapter"):
            atomic_write_text(out_dir / "run_card.json", json.dumps(summary, ensure_ascii=False, indent=1, default=str))
    else:  # the other processes' monitors wrote to scratch folders (helpers.multi_process.monitor_folder)
        shutil.rmtree(monitor.out_dir, ignore_errors=True)
    return RunResult(trainer, model, tokenizer, recipe, precision, monitor, summary)


def _name_base_model(model, model_id: str, revision: str | None, verbose: bool) -> dict:
    """adapter_config.json names the base by hub id and revision, never by a folder of this machine."""
    name, base_revision, note = base_model_reference(model_id, revision, resolve_source(model_id, verbose=False),
                                                     getattr(model.config, "_commit_hash", None))
    for config in model.peft_config.values():
        config.base_model_name_or_path, config.revision = name, base_revision
    if note and verbose:
        print(note)
    return {"name": name, "revision": base_revision, "note": note}


def _trace_until(path: Path, step: int) -> list:
    """The trace's records up to ``step``. A run killed while appending a line leaves it torn; it is dropped (its
    step is after the checkpoint anyway)."""
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


def _finish_wandb():
    try:
        import wandb  # optional: only runs that report to wandb need it
        if wandb.run is not None:
            wandb.finish()
    except ImportError:
        pass
