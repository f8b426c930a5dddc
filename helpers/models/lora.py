"""LoRA target module names per architecture, or found in any decoder's attention modules, checked against the
model's own modules."""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("helpers.models")  # the logger name these warnings have always had

# LoRA targets per architecture (config.model_type). GPT-NeoX fuses q/k/v into one projection.
ATTENTION_TARGETS = {
    "gpt_neox": ["query_key_value"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma3": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma3_text": ["q_proj", "k_proj", "v_proj", "o_proj"],
}
MLP_TARGETS = {
    "gpt_neox": ["dense", "dense_h_to_4h", "dense_4h_to_h"],
    "default": ["gate_proj", "up_proj", "down_proj"],
}


def lora_targets(model, which: str | list[str] = "attention") -> list[str]:
    """LoRA target module names: ``attention``, ``all`` (attention + MLP) or a list (or comma-separated names).

    Architectures in :data:`ATTENTION_TARGETS` use its names (the blog's ``query_key_value`` for GPT-NeoX); any
    other decoder gets the linear layers found inside its attention modules for ``attention``, and for ``all``
    every linear layer but the output head, as PEFT's ``all-linear`` does. Names are checked against the model's
    own modules, so a model where none match fails here with a clear error instead of deep inside peft.
    """
    model_type = getattr(model.config, "model_type", "")
    if isinstance(which, str) and which not in ("attention", "all"):
        which = [name.strip() for name in which.split(",") if name.strip()]
    if isinstance(which, list):
        wanted = which
    elif model_type in ATTENTION_TARGETS:
        wanted = list(ATTENTION_TARGETS[model_type])
        if which == "all":
            wanted += MLP_TARGETS.get(model_type, MLP_TARGETS["default"])
    else:
        wanted = attention_projections(model)
        if not wanted:
            raise ValueError(f"found no linear layers inside the attention modules of this {model_type!r} model; "
                             f"pass lora_targets as a list of module names, e.g. from "
                             f"[n for n, _ in model.named_modules()]")
        if which == "all":
            wanted += [name for name in all_linear_names(model) if name not in wanted]
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    found = [name for name in wanted if name in present]
    missing = [name for name in wanted if name not in present]
    if not found:
        raise ValueError(f"none of the LoRA targets {wanted} exist in this {model_type!r} model")
    if missing:
        log.warning("LoRA targets not in this model, skipped: %s", missing)
    return found


def _linear_modules(model):
    """``(name, module)`` for every linear layer: nn.Linear (bitsandbytes' 4/8-bit layers subclass it) and the
    Conv1D that GPT-2-style models use, the classes PEFT's ``all-linear`` takes."""
    from transformers.pytorch_utils import Conv1D  # slow to import, so imported when a load needs it

    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, (torch.nn.Linear, Conv1D))]


def _is_attention(module) -> bool:
    # transformers names every attention class ...Attention (LlamaAttention, GPTNeoXAttention, Gemma3Attention,
    # Exaone4Attention, GPT2Attention, ...); linear-attention or recurrent mixers in hybrid models are not matched.
    return type(module).__name__.endswith("Attention")


def attention_projections(model) -> list[str]:
    """Names of the linear layers inside the model's attention modules (q_proj/k_proj/v_proj/o_proj,
    query_key_value/dense, qkv_proj, c_attn, Wqkv, ...), in module order.

    A name that also names a linear layer outside attention (GPT-2's ``c_proj`` is in both attention and MLP) is
    left out, because PEFT matches names wherever they occur.
    """
    inside, outside = [], set()
    attention_prefixes = [name + "." for name, module in model.named_modules() if _is_attention(module)]
    for name, _ in _linear_modules(model):
        short = name.rsplit(".", 1)[-1]
        if any(name.startswith(prefix) for prefix in attention_prefixes):
            if short not in inside:
                inside.append(short)
        else:
            outside.add(short)
    return [name for name in inside if name not in outside]


def all_linear_names(model) -> list[str]:
    """Names of every linear layer except the output head, in module order: PEFT's ``all-linear`` as a list.

    A name the output head shares with another layer is left out, so the head is never adapted."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names, head_names = [], set()
    for name, module in _linear_modules(model):
        short = name.rsplit(".", 1)[-1]
        if module is head:
            head_names.add(short)
        elif short not in names:
            names.append(short)
    return [name for name in names if name not in head_names]
