"""Recipes by name, and the precision plan every run reads: what each precision mode becomes on a CPU, a GPU
without bf16 (T4) and a GPU with it."""
import pytest
import torch

from helpers.precision import effective_precision, plan_precision
from helpers.recipes import Recipe, blog_recipe, fast_recipe, fixed_recipe, named_recipe

CPU = {"gpu": False, "gpu_has_bf16": False}
T4 = {"gpu": True, "gpu_has_bf16": False}
BF16_GPU = {"gpu": True, "gpu_has_bf16": True}


def test_named_recipe_gives_the_recipe_of_that_name_and_ignores_overrides_of_none():
    assert named_recipe("fixed") == fixed_recipe() and named_recipe("blog") == blog_recipe() == Recipe()
    recipe = named_recipe("fixed", learning_rate=None, max_steps=7, precision=None)
    assert recipe == fixed_recipe(max_steps=7)  # None keeps the fixed recipe's own lr and precision
    with pytest.raises(ValueError, match="unknown recipe 'seed'; choose one of auto, fixed, blog"):
        named_recipe("seed")


def test_the_auto_recipe_is_the_fast_one_on_a_gpu_and_the_fixed_one_elsewhere(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert named_recipe("auto", max_steps=7) == fixed_recipe(max_steps=7)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert named_recipe("auto", max_steps=7) == fast_recipe(max_steps=7)


def test_named_recipe_validates_its_overrides():
    with pytest.raises(ValueError, match="max_steps must be > 0"):
        named_recipe("blog", max_steps=0)
    # A misspelt setting (a notebook's recipe_overrides, a config file) is named, with the settings there are.
    with pytest.raises(ValueError, match=r"learnig_rate: not a Recipe setting; the settings are name, .*learning_rate"):
        named_recipe("fixed", learnig_rate=1e-4)


@pytest.mark.parametrize("machine, mode, compute, quantization, effective, load", [
    # The blog recipe: fp16 with 4-bit layers computing in bf16.
    (CPU, "fp16", "bf16", "4bit", "fp16_emulated", "fp32"),  # Trainer(fp16=True) on a CPU would train in fp32
    (T4, "fp16", "bf16", "4bit", "fp16", "bf16"),
    (BF16_GPU, "fp16", "bf16", "4bit", "fp16", "bf16"),
    (BF16_GPU, "fp16", "bf16", "none", "fp16", "fp32"),  # fp16 autocast keeps fp32 master weights
    # The fixed recipe: auto, and the compute dtype follows the run's precision.
    (CPU, "auto", "auto", "4bit", "fp32", "fp32"),
    (T4, "auto", "auto", "4bit", "fp32", "fp32"),
    (BF16_GPU, "auto", "auto", "4bit", "bf16", "bf16"),
    (BF16_GPU, "auto", "auto", "none", "bf16", "bf16"),
    (CPU, "bf16", "auto", "none", "fp32", "fp32"),  # CPU bf16 autocast is slow; fp32 has the same range
    (CPU, "fp16_emulated", "auto", "none", "fp16_emulated", "fp32"),
    (BF16_GPU, "fp16_emulated", "auto", "none", "fp16_emulated", "fp32"),
    (CPU, "fp32", "fp16", "4bit", "fp32", "fp32"),  # bitsandbytes' CPU 4-bit kernels are fastest in fp32
    (T4, "fp32", "fp16", "4bit", "fp32", "fp16"),
])
def test_precision_plan(machine, mode, compute, quantization, effective, load):
    plan = plan_precision(mode, compute, quantization, **machine)
    assert (plan.mode, plan.effective, plan.load_precision) == (mode, effective, load)
    assert (plan.trainer_fp16, plan.trainer_bf16, plan.emulate_fp16) == \
        (effective == "fp16", effective == "bf16", effective == "fp16_emulated")
    assert plan.compute_dtype == (plan.load_dtype if quantization != "none" else None)


def test_precision_plan_of_this_machine_and_effective_precision_agree():
    machine = {"gpu": torch.cuda.is_available(),
               "gpu_has_bf16": torch.cuda.is_available() and torch.cuda.is_bf16_supported()}
    for mode in ("auto", "fp16", "fp16_emulated", "bf16", "fp32"):
        assert plan_precision(mode) == plan_precision(mode, **machine)
        assert effective_precision(mode) == plan_precision(mode).effective


def test_precision_plan_refuses_unknown_modes_and_compute_dtypes():
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        plan_precision("fp8")
    with pytest.raises(ValueError, match="unknown compute dtype 'int4'"):
        plan_precision("auto", "int4", "4bit")
