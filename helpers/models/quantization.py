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


def keep_unquantized_in(model, dtype: torch.dtype) -> int:
    """Cast what a 4/8-bit model leaves unquantized (embeddings, norms, an untied output layer) to ``dtype``; returns
    how many tensors changed. peft's ``prepare_model_for_kbit_training`` makes them fp32, and with them the residual
    stream: every 4-bit projection then casts its input to the compute dtype and its output back, the stream's
    activations take twice the memory, and an fp32 output layer runs fp32 products. A bf16 run may cast them back
    (call it before adding LoRA, whose weights stay fp32 under autocast). GPT-NeoX's stream stays fp32 under
    autocast all the same (its LayerNorm runs in fp32 there); Llama- and Gemma-style RMSNorms return their input's
    dtype."""
    changed = 0
    for param in model.parameters():
        # by class, not dtype: packed 4-bit weights may be stored in a float dtype (FSDP's quant_storage)
        quantized = param.__class__.__name__ in ("Params4bit", "Int8Params")
        if not quantized and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
            changed += 1
    return changed
