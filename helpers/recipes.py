"""Training recipes: :class:`Recipe` holds every setting of a QLoRA run with the blog's values as defaults, and the
two named recipes set only what differs from them: :func:`blog_recipe` (the recipe users copy from the KoAlpaca
blog posts) and :func:`fixed_recipe` (the project's fix). :func:`named_recipe` picks one by name."""
from __future__ import annotations

from dataclasses import dataclass, replace

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
    gradient_checkpointing: bool = True
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
    base = Recipe(name="fixed", precision="auto", compute_dtype="auto", labels="answer_only", lr_scheduler="cosine",
                  warmup_ratio=0.05, learning_rate=5e-4, optimizer="adamw_torch", group_by_length=True,
                  labelled_logits_only=True)
    return replace(base, **overrides).validate()


NAMED_RECIPES = {"fixed": fixed_recipe, "blog": blog_recipe}


def named_recipe(name: str, **overrides) -> Recipe:
    """The recipe called ``name`` (``fixed`` or ``blog``) with ``overrides``; an override of None keeps the recipe's
    own value, so a notebook parameter set to None means "as the recipe has it"."""
    if name not in NAMED_RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(NAMED_RECIPES)}")
    return NAMED_RECIPES[name](**{key: value for key, value in overrides.items() if value is not None})
