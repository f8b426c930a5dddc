"""Numbers a run computes with: the precision (dtype) chosen and why, the device, and the bitsandbytes
quantization config."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

QUANTIZATIONS = ("none", "4bit", "8bit")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


@dataclass(frozen=True)
class Precision:
    """The dtype a run computes in, and why it was chosen."""

    name: str  # "bf16", "fp16" or "fp32"
    dtype: torch.dtype
    reason: str


def has_bf16() -> bool:
    """True where bf16 matrix work is native: a CUDA GPU with compute capability 8.0 or newer."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve_precision(precision: str = "auto", verbose: bool = True) -> Precision:
    """Turn ``auto|bf16|fp16|fp32`` into a dtype. ``auto`` picks bf16 where the GPU has it, fp32 otherwise.

    fp32 (not fp16) is the CPU fallback because CPU fp16 matmuls are two orders of magnitude slower and
    fp16's range is what makes the blog recipe collapse.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        if has_bf16():
            chosen = Precision("bf16", torch.bfloat16, f"auto: {torch.cuda.get_device_name()} supports bf16")
        elif torch.cuda.is_available():
            chosen = Precision("fp32", torch.float32, "auto: this GPU has no bf16; fp32 avoids fp16 overflow")
        else:
            chosen = Precision("fp32", torch.float32, "auto: no GPU, so fp32 on CPU")
    else:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
        chosen = Precision(precision, dtype, "asked for")
    if verbose:
        print(f"precision: {chosen.name} ({chosen.reason})")
    return chosen


def device_description() -> str:
    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name()}"
    return f"cpu: {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def quantization_config(quantization: str = "none", compute_dtype: torch.dtype = torch.bfloat16,
                        double_quant: bool = True, quant_type: str = "nf4"):
    """A ``BitsAndBytesConfig`` from plain parameters, or None for ``quantization="none"``.

    The 4-bit defaults are the blog recipe's: NF4, double quantization, the given compute dtype.
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; choose one of {', '.join(QUANTIZATIONS)}")
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig  # slow to import, so imported when a load needs it

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_quant_type=quant_type, bnb_4bit_compute_dtype=compute_dtype)
