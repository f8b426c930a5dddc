"""Losses: the causal-LM loss computed from the vocabulary logits of labelled positions only."""
from __future__ import annotations

import torch


def labelled_logits_loss(model, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
    """The causal-LM loss computed from vocabulary logits at labelled positions only.

    The model's own loss projects every position onto the vocabulary (262k entries for Gemma-3, most of the
    compute of a 270M model) although answer-only labels use about half of them; the rest is prompt and padding.
    Same value as the model's loss: mean over labelled tokens, or sum / ``num_items_in_batch`` as Trainer
    passes it. LabTrainer checks the two against each other on the first batch before relying on this.
    """
    labels = inputs["labels"]
    targets = labels[:, 1:]
    keep = targets != -100
    outputs = model(**{k: v for k, v in inputs.items() if k != "labels"}, output_hidden_states=True,
                    logits_to_keep=1)
    head = model.get_output_embeddings()
    hidden = outputs.hidden_states[-1][:, :-1][keep]
    if head.weight.is_floating_point():
        # Mixed precision hands back fp32 hidden states (accelerate casts a model's outputs to fp32) while a bf16
        # model's head stays bf16; the model's own loss runs its head inside autocast, this one runs outside it.
        hidden = hidden.to(head.weight.dtype)
    logits = head(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    loss = torch.nn.functional.cross_entropy(logits, targets[keep].to(logits.device), reduction="sum")
    return loss / (num_items_in_batch if num_items_in_batch is not None else keep.sum().clamp(min=1))
