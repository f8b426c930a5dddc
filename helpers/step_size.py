"""The step a run takes: its tokens, examples a micro-batch, micro-batches a step and gradient checkpointing, chosen
from the memory estimate (helpers.memory) so that the step fits the memory budget."""
from __future__ import annotations

import random
import statistics
from dataclasses import replace

import torch

from helpers import data as data_mod
from helpers.collators import pack_rows
from helpers.distributed import world_size
from helpers.memory import StepPlan, epoch_capped_tokens, estimate_memory, plan_step
from helpers.recipes import Recipe

GPU_MEMORY_SHARE = 0.85  # of the GPU's memory, the default budget: the estimate counts tensors, not the allocator's
#                          reserve, fragmentation or the CUDA context
ESTIMATE_MARGIN = 0.90  # a memory_budget_gib is planned to 90% of itself: measured peaks of 4-bit runs came up to 9.1%
#                         above the estimate (polyglot-ko-12.8B shape on the H200: 23.6 GiB against 21.6 estimated)
MIN_MICRO_BATCH_TOKENS = 4096  # "auto" accumulates micro-batches of at least this many tokens rather than checkpoint:
#                                recomputing the forward costs more than the smaller micro-batch (docs/measurements/
#                                train_speed_2026-12-07_accumulation.md)


def micro_batch_tokens(lengths: list[int], examples: int, recipe: Recipe, draws: int = 64) -> int:
    """Tokens, padding included, of the largest of ``draws`` micro-batches of ``examples`` drawn from ``lengths``
    the way the run draws them: at random (packed into rows, or padded to the longest), or grouped by length,
    where the batch of the longest examples is the largest."""
    if recipe.group_by_length and not recipe.packing:
        return examples * max(lengths)
    draw = random.Random(recipe.seed)
    largest = 0
    for _ in range(draws):
        batch = draw.sample(lengths, min(examples, len(lengths)))
        if recipe.packing:
            rows = pack_rows(batch, recipe.max_length)
            largest = max(largest, len(rows) * max(sum(batch[i] for i in row) for row in rows))
        else:
            largest = max(largest, len(batch) * max(batch))
    return largest


def plan_step_size(recipe: Recipe, model, train_split, precision: str) -> tuple[Recipe, StepPlan]:
    """The recipe with its step size, checkpointing and ``torch_compile="auto"`` settled, and the memory plan behind
    it (helpers.memory).

    ``tokens_per_step`` > 0 sets the examples a step (batch_size) to tokens_per_step / (the train split's mean
    length x gradient_accumulation): batches of a fixed number of examples drawn at random, whose token count
    varies a little around the target. Before that, the tokens are lowered where the estimated peak of the largest
    likely micro-batch would not fit the budget (``memory_budget_gib``, or 85% of the GPU; no budget on a CPU),
    and ``gradient_checkpointing="auto"`` is decided: off where the step fits as micro-batches of at least
    MIN_MICRO_BATCH_TOKENS accumulated (as few as fit), else helpers.memory.plan_step. Every run gets the estimate.
    """
    lengths = [len(ids) for ids in train_split["input_ids"]]
    mean = statistics.fmean(lengths)
    labelled = (sum(sum(label != data_mod.IGNORE_INDEX for label in row) for row in train_split["labels"])
                / sum(lengths) if "labels" in train_split.column_names else 1.0)
    cuda = torch.cuda.is_available()
    logits = "full" if not recipe.labelled_logits_only else "chunked" if recipe.loss_chunk_rows else "labelled"

    def examples_for(tokens: int, accumulation: int = recipe.gradient_accumulation) -> int:
        if not recipe.tokens_per_step:
            return recipe.batch_size
        return max(1, round(tokens / (mean * accumulation)))

    def estimate_at(tokens: int, checkpointing: bool, accumulation: int = recipe.gradient_accumulation):
        micro = micro_batch_tokens(lengths, examples_for(tokens, accumulation), recipe)
        return estimate_memory(model.config, micro, quantization=recipe.quantization,
                               precision="fp32" if precision == "fp16_emulated" else precision,
                               lora_r=recipe.lora_r, lora_targets=recipe.lora_targets,
                               lora_dropout=recipe.lora_dropout, gradient_checkpointing=checkpointing,
                               logits=logits, labelled_share=labelled, loss_chunk_rows=recipe.loss_chunk_rows,
                               attention=getattr(model.config, "_attn_implementation", None) or "sdpa",
                               attended_length=recipe.max_length if recipe.packing else max(lengths),
                               optimizer=recipe.optimizer, device="cuda" if cuda else "cpu",
                               fp32_unquantized=recipe.fp32_unquantized)

    budget = recipe.memory_budget_gib * ESTIMATE_MARGIN if recipe.memory_budget_gib else (
        GPU_MEMORY_SHARE * torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30
        if cuda else None)
    accumulation = recipe.gradient_accumulation
    if recipe.tokens_per_step:
        requested = epoch_capped_tokens(recipe.tokens_per_step, lengths, recipe.min_steps_per_epoch, world_size())
        plan = None
        if recipe.gradient_checkpointing == "auto" and budget is not None:
            accumulation, plan = accumulated_plan(estimate_at, requested, budget, accumulation)
        plan = plan or plan_step(estimate_at, requested, budget, recipe.gradient_checkpointing)
        if requested < recipe.tokens_per_step:
            plan = replace(plan, reason=f"{recipe.tokens_per_step:,} tokens asked, at most {requested:,} so an epoch "
                                        f"has {recipe.min_steps_per_epoch} steps or more; " + plan.reason)
    else:  # the batch is the recipe's: only "auto" checkpointing is decided
        requested = round(recipe.batch_size * recipe.gradient_accumulation * mean)
        use = recipe.gradient_checkpointing
        if use == "auto":
            use = budget is not None and estimate_at(requested, False).total_gib > budget
        plan = StepPlan(requested, use, estimate_at(requested, use), budget,
                        f"batch of {recipe.batch_size} as the recipe has it")
    compile_model = cuda if recipe.torch_compile == "auto" else recipe.torch_compile
    return replace(recipe, batch_size=examples_for(plan.tokens_per_step, accumulation), torch_compile=compile_model,
                   gradient_accumulation=accumulation, gradient_checkpointing=plan.gradient_checkpointing), plan


def accumulated_plan(estimate_at, tokens: int, budget_gib: float, accumulation: int) -> tuple[int, StepPlan | None]:
    """The fewest micro-batches a step of ``tokens`` can be cut into, without checkpointing, that fit ``budget_gib``
    while each keeps MIN_MICRO_BATCH_TOKENS or more (a multiple of the recipe's ``accumulation``), and its plan;
    ``(accumulation, None)`` where none does. ``estimate_at(tokens, checkpointing, accumulation)``."""
    for split in range(1, tokens // (accumulation * MIN_MICRO_BATCH_TOKENS) + 1):
        estimate = estimate_at(tokens, False, accumulation * split)
        if estimate.total_gib <= budget_gib:
            reason = "fits as asked; checkpointing off" + (
                f": {accumulation * split} micro-batches of ~{tokens // (accumulation * split):,} tokens accumulated "
                "instead of recomputing the forward" if split > 1 else "")
            return accumulation * split, StepPlan(tokens, False, estimate, budget_gib, reason)
    return accumulation, None
