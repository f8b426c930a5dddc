"""The bitsandbytes quantization config, built from plain parameters."""
from __future__ import annotations

from functools import partial

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


def keep_unquantized_in(model, dtype: torch.dtype) -> int:
    """Cast what a 4/8-bit model leaves unquantized (embeddings, norms, an untied output layer) to ``dtype``; returns
    how many tensors changed. peft's ``prepare_model_for_kbit_training`` makes them fp32, and with them the residual
    stream: every 4-bit projection then casts its input to the compute dtype and its output back, the stream's
    activations take twice the memory, and an fp32 output layer runs fp32 products. A bf16 run may cast them back
    (call it before adding LoRA, whose weights stay fp32 under autocast). Llama- and Gemma-style RMSNorms return
    their input's dtype; a LayerNorm (GPT-NeoX) is made to run in its weights' dtype, see
    :func:`layer_norm_in_weight_dtype`."""
    changed = 0
    for param in model.parameters():
        # by class, not dtype: packed 4-bit weights may be stored in a float dtype (FSDP's quant_storage)
        quantized = param.__class__.__name__ in ("Params4bit", "Int8Params")
        if not quantized and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
            changed += 1
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm) and module.weight is not None:
            module.forward = partial(layer_norm_in_weight_dtype, module)
    return changed


def layer_norm_in_weight_dtype(norm: torch.nn.LayerNorm, hidden: torch.Tensor) -> torch.Tensor:
    """``norm(hidden)`` computed and returned in the norm's weight dtype, autocast or not.

    Why: CUDA autocast runs every layer_norm in fp32, and bitsandbytes returns its input's dtype, so a 4-bit
    GPT-NeoX's residual stream stays fp32 even with bf16 norms: each projection then converts its input and output
    (dtype copies were ~20% of the GPU time of a polyglot-ko-5.8B-shape step, H100 profile of 2026-12-07). PyTorch's
    16-bit layer_norm kernels accumulate the mean and variance in fp32, as a bf16 model run without autocast does."""
    with torch.autocast(hidden.device.type, enabled=False):
        return torch.nn.functional.layer_norm(hidden.to(norm.weight.dtype), norm.normalized_shape, norm.weight,
                                              norm.bias, norm.eps)
