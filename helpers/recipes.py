"""Training recipes: :class:`Recipe` holds every setting of a QLoRA run with the blog's values as defaults, and the
named recipes set only what differs from them: :func:`blog_recipe` (the recipe users copy from the KoAlpaca
blog posts), :func:`fixed_recipe` (the project's fix) and :func:`fast_recipe` (the fix, made fast).
:func:`named_recipe` picks one by name."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from helpers.data import check_label_recipe
from helpers.models import QUANTIZATIONS
from helpers.precision import PRECISION_MODES


@dataclass
class Recipe:
    """Every setting of a QLoRA run, with the blog's values as defaults."""

    name: str = "blog"
    quantization: str = "4bit"          # none | 4bit | 8bit
    precision: str = "fp16"             # auto | fp16 | fp16_emulated | bf16 | fp32 (training autocast mode)
    compute_dtype: str = "bf16"         # bnb 4-bit compute dtype: auto | bf16 | fp16 | fp32
    gradient_checkpointing: bool | str = True  # True | False | "auto": on only where the memory estimate needs it
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: str | list = "attention"  # attention | all | comma-separated names
    labels: str = "blog"                # blog | answer_only (label recipes, see helpers.data.labels)
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
    # Speed (helpers.memory, helpers.training; each off by default)
    packing: bool = False               # examples end to end in rows of max_length tokens, none sees another
    tokens_per_step: int = 0            # > 0: examples a step = this / the train split's mean length (not batch_size)
    min_steps_per_epoch: int = 0        # > 0: tokens_per_step lowered so an epoch has at least this many steps
    memory_budget_gib: float = 0.0      # what tokens_per_step and "auto" checkpointing must fit in; 0: 85% of the GPU
    loss_chunk_rows: int = 0            # > 0: labelled logits of at most this many rows at once (labelled_logits_only)
    torch_compile: bool | str = False   # True | False | "auto": on where a CUDA GPU trains (TrainingArguments)
    fp32_unquantized: bool = True       # 4/8-bit: peft's fp32 norms and embeddings; False: bf16 where the run is bf16

    def validate(self):
        if self.max_steps <= 0 and self.epochs <= 0:
            raise ValueError(f"max_steps must be > 0 (got {self.max_steps}), or give epochs > 0")
        if self.precision not in PRECISION_MODES:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISION_MODES)}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0 (got {self.learning_rate})")
        if self.batch_size <= 0 or self.gradient_accumulation <= 0:
            raise ValueError("batch_size and gradient_accumulation must be >= 1")
        check_label_recipe(self.labels)
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"unknown quantization {self.quantization!r}; choose one of {', '.join(QUANTIZATIONS)}")
        for name in ("gradient_checkpointing", "torch_compile"):
            if getattr(self, name) not in (True, False, "auto"):
                raise ValueError(f"{name}: True, False or 'auto', not {getattr(self, name)!r}")
        if self.packing and self.labels != "answer_only":
            raise ValueError("packing needs labels='answer_only': the blog's labels come from a collator that pads")
        if self.loss_chunk_rows and not self.labelled_logits_only:
            raise ValueError("loss_chunk_rows needs labelled_logits_only=True (the chunks are of labelled rows)")
        if min(self.tokens_per_step, self.min_steps_per_epoch, self.memory_budget_gib, self.loss_chunk_rows) < 0:
            raise ValueError("tokens_per_step, min_steps_per_epoch, memory_budget_gib and loss_chunk_rows must be >= 0")
        return self


def blog_recipe(**overrides) -> Recipe:
    """The KoAlpaca blog recipe: NF4 + double quant, compute bf16, checkpointing, LoRA r8/a32/d0.05 on the
    attention projections, pad = eos with the LM collator, batch 2, lr 1e-4, fp16=True, paged_adamw_8bit."""
    return replace(Recipe(), **overrides).validate()


def fixed_recipe(**overrides) -> Recipe:
    """The project's recipe: precision auto (bf16 on a GPU that has it, fp32 otherwise), answer-only labels with
    one trained EOS and a real pad token, cosine schedule with warmup, clipped gradients; for speed, batches
    grouped by length, vocabulary logits only at trained positions (the same loss, see labelled_logits_loss) and
    gradient checkpointing only where the memory estimate says the GPU needs it (never on a CPU).

    lr 5e-4: on the shipped data with gemma-3-270m (H100, bf16, 1 epoch, batch 4, LoRA r8 on attention) answer
    perplexity was 19.2 at 2e-4, 18.5 at 5e-4 and 18.1 at 1e-3 (docs/measurements/gpu_h100_2026-11-23.md)."""
    base = Recipe(name="fixed", precision="auto", compute_dtype="auto", labels="answer_only", lr_scheduler="cosine",
                  warmup_ratio=0.05, learning_rate=5e-4, optimizer="adamw_torch", group_by_length=True,
                  labelled_logits_only=True, gradient_checkpointing="auto")
    return replace(base, **overrides).validate()


def fast_recipe(**overrides) -> Recipe:
    """The fixed recipe with the step made large and cheap: answer-only labels packed without padding into rows of
    ``max_length`` tokens, up to 16,384 tokens a step (lowered where the memory estimate says the GPU needs it, or
    where an epoch would have fewer than 60 steps), labelled logits 1,024 rows at a time, bf16 where the GPU has it,
    batches drawn at random (packing leaves no padding for grouping by length to save).

    Each choice is measured side by side on an H200 with gemma-3-270m's real weights and the shipped data
    (benchmarks/results/train_speed.csv, 2026-12-02): packing 30.3k tokens/s against 27.1k padded (and 23.5 against
    37.4 GiB); the chunked loss 23.5 GiB against 56.1 unchunked (which ran 41.4k tokens/s: the chunks cost speed and
    buy the 24 GB card). Fused AdamW ran no faster than plain AdamW (30.3k against 31.5k): plain it is.
    Norms and embeddings stay bf16 where the run is bf16 (``fp32_unquantized=False``), not the fp32 that peft's
    k-bit preparation makes them, so that the residual stream is bf16 too (helpers.models.keep_unquantized_in).
    Measured side by side (train_speed.csv, 2026-12-07, random weights): polyglot-ko-5.8B shape on an H200 at 16,384
    tokens a step, 12.2k tokens/s, MFU 0.53 and 9.9 GiB peak against 9.0k, 0.39 and 15.8 with fp32 ones;
    polyglot-ko-12.8B 6.0k tokens/s at 16,384 tokens and 17.0 GiB against 4.6k at the 11,776 tokens that fit
    22 GiB with fp32 ones. On gemma-3-270m's real weights (H100) the eval loss after one epoch of the shipped data
    was 2.9326 against 2.9318 with fp32 ones (+0.03%).
    60 steps an epoch: on that small split (~60k tokens) the eval loss after one epoch was +1.5% over batch 2 at
    1,024 tokens a step, +4.1% at 4,096 and +7.1% at 16,384 (few large steps learn less from the same tokens); a
    user's larger data keeps the full 16,384.
    Where that step does not fit the memory budget as it is, ``gradient_checkpointing="auto"`` first cuts it into
    accumulated micro-batches of 4,096 tokens or more (helpers.step_size), and checkpoints only where those do not
    fit either: the polyglot-ko-5.8B shape (random weights, H100, 2026-12-07, 22 GiB budget) ran 14.1k tokens/s in
    four micro-batches at 16.0 GiB against 11.6k tokens/s checkpointed at 9.9 GiB, the recompute costing more.
    torch.compile stays off (``torch_compile=True`` or ``"auto"`` turns it on): it ran the 270M model's 16,384-token
    step 2.5x faster (74.7k tokens/s), but on an H100 (2026-12-07) its compilations cost minutes where training the
    shipped data takes seconds (92 s before the first step at 768 tokens a step; the benchmark row's process ~7 min
    against 8 s of timed steps), and the polyglot-ko-12.8B shape did not finish 16 compiled steps in what was left
    of a 9-minute call after building its random weights.
    """
    base = replace(fixed_recipe(), name="fast", packing=True, tokens_per_step=16384, min_steps_per_epoch=60,
                   gradient_checkpointing="auto", loss_chunk_rows=1024, group_by_length=False,
                   fp32_unquantized=False)
    return replace(base, **overrides).validate()


def auto_recipe(**overrides) -> Recipe:
    """The fast recipe where a CUDA GPU trains, the fixed recipe elsewhere: the fast recipe's choices were measured on
    a GPU only, where kernel launches set the step time of a small model, and the CPU main job's figures (README) were
    measured with the fixed recipe, which this keeps. The recipe's ``name`` says which one ran."""
    return (fast_recipe if torch.cuda.is_available() else fixed_recipe)(**overrides)


NAMED_RECIPES = {"auto": auto_recipe, "fixed": fixed_recipe, "blog": blog_recipe, "fast": fast_recipe}


def named_recipe(name: str, **overrides) -> Recipe:
    """The recipe called ``name`` (``auto``, ``fixed``, ``blog`` or ``fast``) with ``overrides``; an override of None
    keeps the recipe's own value, so a notebook parameter set to None means "as the recipe has it"."""
    if name not in NAMED_RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(NAMED_RECIPES)}")
    unknown = sorted(set(overrides) - {field.name for field in fields(Recipe)})
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: not a Recipe setting; the settings are "
                         f"{', '.join(field.name for field in fields(Recipe))}")
    return NAMED_RECIPES[name](**{key: value for key, value in overrides.items() if value is not None})
