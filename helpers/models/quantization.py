"""The bitsandbytes quantization config, built from plain parameters."""
from __future__ import annotations

import torch

QUANTIZATIONS = ("none", "4bit", "8bit")


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
