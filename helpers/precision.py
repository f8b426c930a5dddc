"""Precision, decided in one place: the dtype a model is loaded and run in, and a training run's precision plan.

``load_model(precision=...)`` takes ``auto|bf16|fp16|fp32`` and :func:`resolve_precision` turns it into a dtype. A
training recipe's precision mode (``auto|fp16|fp16_emulated|bf16|fp32``) becomes a :class:`PrecisionPlan` through
:func:`plan_precision`: what the mode becomes on this machine, the dtype the base model is loaded in, the compute
dtype of quantized layers, the Trainer's fp16/bf16 switches and the CPU emulation of fp16. ``train()``, the
Trainer's arguments and LabTrainer read the plan; none of them decides anything about precision themselves.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PRECISIONS = ("auto", "bf16", "fp16", "fp32")  # what load_model takes
PRECISION_MODES = ("auto", "fp16", "fp16_emulated", "bf16", "fp32")  # what a training recipe takes
COMPUTE_DTYPES = ("auto", "bf16", "fp16", "fp32")  # a recipe's compute dtype for quantized layers


def has_bf16() -> bool:
    """True where bf16 matrix work is native: a CUDA GPU with compute capability 8.0 or newer."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def device_description() -> str:
    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name()}"
    return f"cpu: {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def _auto_precision(gpu: bool, gpu_has_bf16: bool) -> tuple[str, str]:
    """What ``auto`` picks, and why. fp32 (not fp16) is the fallback: CPU fp16 matrix products are two orders of
    magnitude slower, and fp16's range is what makes the blog recipe collapse."""
    if gpu_has_bf16:
        return "bf16", "supports bf16"
    if gpu:
        return "fp32", "this GPU has no bf16; fp32 avoids fp16 overflow"
    return "fp32", "no GPU, so fp32 on CPU"


@dataclass(frozen=True)
class Precision:
    """The dtype a model is loaded and computes in, and why it was chosen."""

    name: str  # "bf16", "fp16" or "fp32"
    dtype: torch.dtype
    reason: str


def resolve_precision(precision: str = "auto", verbose: bool = True) -> Precision:
    """Turn ``auto|bf16|fp16|fp32`` into a dtype. ``auto`` picks bf16 where the GPU has it, fp32 otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        name, why = _auto_precision(torch.cuda.is_available(), has_bf16())
        if name == "bf16":
            why = f"{torch.cuda.get_device_name()} {why}"
        chosen = Precision(name, DTYPES[name], f"auto: {why}")
    else:
        chosen = Precision(precision, DTYPES[precision], "asked for")
    if verbose:
        print(f"precision: {chosen.name} ({chosen.reason})")
    return chosen


@dataclass(frozen=True)
class PrecisionPlan:
    """Every precision setting of one training run, decided together by :func:`plan_precision`."""

    mode: str            # as the recipe asks: auto | fp16 | fp16_emulated | bf16 | fp32
    effective: str       # what runs on this machine: bf16 | fp16 | fp16_emulated | fp32
    load_precision: str  # what load_model is given (bf16 | fp16 | fp32); quantized layers compute in it too
    quantized: bool      # the base model is loaded in 4 or 8 bits
    trainer_fp16: bool   # TrainingArguments(fp16=True): fp16 autocast and a GradScaler (on a GPU)
    trainer_bf16: bool   # TrainingArguments(bf16=True): bf16 autocast
    emulate_fp16: bool   # LabTrainer emulates fp16's range and loss scaling on CPU (helpers.fp16_emulation)

    @property
    def load_dtype(self) -> torch.dtype:
        return DTYPES[self.load_precision]

    @property
    def compute_dtype(self) -> torch.dtype | None:
        """bitsandbytes' compute dtype of the quantized layers; None for a model that is not quantized."""
        return self.load_dtype if self.quantized else None


def plan_precision(mode: str = "auto", compute_dtype: str = "auto", quantization: str = "none", *,
                   gpu: bool | None = None, gpu_has_bf16: bool | None = None) -> PrecisionPlan:
    """The precision plan of a training run: precision ``mode``, ``compute_dtype`` of quantized layers
    (``auto|bf16|fp16|fp32``) and ``quantization`` (``none|4bit|8bit``), on this machine. ``gpu`` and
    ``gpu_has_bf16`` describe another machine instead (for example the plan a recipe gets on a GPU).

    - ``auto`` becomes bf16 on a GPU that has it, fp32 otherwise (as in :func:`resolve_precision`).
    - ``fp16`` on a CPU becomes ``fp16_emulated``: ``Trainer(fp16=True)`` on a CPU silently trains in fp32, which
      would hide the very failure the blog recipe has.
    - ``bf16`` on a CPU becomes fp32: CPU bf16 autocast is slow here and not what users run; fp32 has the same range.
    - A quantized base is loaded in its compute dtype: for ``auto``, bf16 in a bf16 run and fp32 otherwise; on a
      CPU always fp32 (bitsandbytes' CPU 4-bit kernels are fastest in fp32). A base that is not quantized is loaded
      in bf16 for a bf16 run and fp32 otherwise (fp16 autocast keeps fp32 master weights).
    """
    if mode not in PRECISION_MODES:
        raise ValueError(f"unknown precision {mode!r}; choose one of {', '.join(PRECISION_MODES)}")
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"unknown compute dtype {compute_dtype!r}; choose one of {', '.join(COMPUTE_DTYPES)}")
    gpu = torch.cuda.is_available() if gpu is None else gpu
    gpu_has_bf16 = has_bf16() if gpu_has_bf16 is None else gpu_has_bf16
    if mode == "auto":
        effective = _auto_precision(gpu, gpu_has_bf16)[0]
    elif mode == "fp16" and not gpu:
        effective = "fp16_emulated"
    elif mode == "bf16" and not gpu:
        effective = "fp32"
    else:
        effective = mode
    quantized = quantization != "none"
    if quantized and compute_dtype != "auto":
        load_precision = compute_dtype if gpu else "fp32"
    else:
        load_precision = "bf16" if effective == "bf16" else "fp32"
    return PrecisionPlan(mode=mode, effective=effective, load_precision=load_precision, quantized=quantized,
                         trainer_fp16=effective == "fp16", trainer_bf16=effective == "bf16",
                         emulate_fp16=effective == "fp16_emulated")


def effective_precision(mode: str) -> str:
    """What a training precision mode becomes on this machine (see :func:`plan_precision`)."""
    return plan_precision(mode).effective
