"""Losses: the causal-LM loss computed from the vocabulary logits of labelled positions only, optionally a few
thousand rows at a time so that the logits of a large step never exist at once."""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

# LabTrainer checks labelled_logits_loss against the model's own loss on this many tokens of the first batch (the
# model's loss needs every position's logits: 512 x 262k fp32 logits are 0.5 GiB, a whole large step's tens).
LABELLED_LOGITS_CHECK_TOKENS = 512


def labelled_logits_loss(model, inputs: dict, num_items_in_batch=None, chunk_rows: int = 0) -> torch.Tensor:
    """The causal-LM loss computed from vocabulary logits at labelled positions only.

    The model's own loss projects every position onto the vocabulary (262k entries for Gemma-3, most of the
    compute of a 270M model) although answer-only labels use about half of them; the rest is prompt and padding.
    Same value as the model's loss: mean over labelled tokens, or sum / ``num_items_in_batch`` as Trainer
    passes it. LabTrainer checks the two against each other on the first batch before relying on this.

    ``chunk_rows`` > 0 computes the logits of at most that many labelled rows at a time, each chunk under
    ``torch.utils.checkpoint`` so that the backward pass recomputes its logits instead of keeping them: the same
    value and gradients, one more output-layer product per labelled row, and a peak of ``chunk_rows`` x vocabulary
    logits instead of every labelled row's (the idea of Liger Kernel's fused linear cross-entropy, which also
    skips the recompute; here in plain PyTorch so that it runs and is tested on the CPU).
    """
    labels = inputs["labels"]
    targets = labels[:, 1:]
    keep = targets != -100
    # Under DDP the forward goes through the wrapper (it syncs the gradients); the head is the wrapped model's.
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    head = inner.get_output_embeddings()
    # The decoder's last hidden state, caught as it leaves the decoder: output_hidden_states=True would return every
    # layer's, and mixed precision casts a model's outputs to fp32 (accelerate), so a 16-bit stream got an fp32
    # copy of every layer at the end of the forward pass (H100, 2026-12-07: 15.2 GiB peak for the
    # polyglot-ko-5.8B shape at 17,408 tokens a step with a bf16 stream, where the estimate without them said 10.2)
    caught = _last_hidden_state_of(inner.get_decoder())
    # No cache: a loss needs none, and with one transformers ignores the restarting positions of packed rows.
    model(**{k: v for k, v in inputs.items() if k != "labels"}, logits_to_keep=1, use_cache=False)
    hidden = caught.pop()[:, :-1][keep]
    if head.weight.is_floating_point():
        # a bf16 stream meets an fp32 head (peft's upcast) or the reverse; the model's own loss runs its head
        # inside autocast, this one runs outside it
        hidden = hidden.to(head.weight.dtype)
    cap = getattr(inner.config, "final_logit_softcapping", None)
    targets = targets[keep].to(hidden.device)
    if chunk_rows <= 0 or hidden.shape[0] <= chunk_rows:
        loss = _loss_sum(hidden, targets, head, cap)
    else:
        # Checkpointed only where a backward pass will follow; nothing random inside, so no RNG state to keep.
        backward = torch.is_grad_enabled() and hidden.requires_grad
        loss = 0.0
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            loss = loss + (checkpoint(_loss_sum, hidden[rows], targets[rows], head, cap, use_reentrant=False,
                                      preserve_rng_state=False) if backward
                           else _loss_sum(hidden[rows], targets[rows], head, cap))
    return loss / (num_items_in_batch if num_items_in_batch is not None else keep.sum().clamp(min=1))


def _last_hidden_state_of(decoder) -> list:
    """A list that holds the last hidden state of ``decoder``'s latest forward pass. The hook is added once per
    decoder and kept: one added and removed at every step would change the module's hooks under torch.compile,
    which then compiles again."""
    if "_last_hidden_state" not in decoder.__dict__:
        decoder.__dict__["_last_hidden_state"] = []
        decoder.register_forward_hook(_keep_last_hidden_state)
    return decoder.__dict__["_last_hidden_state"]


def _keep_last_hidden_state(decoder, _args, output):
    # one at most (generation and evaluation pass through here too); the module's own list, so a deep copy of the
    # model keeps its own
    decoder.__dict__["_last_hidden_state"][:] = [output[0]]


def _loss_sum(hidden: torch.Tensor, targets: torch.Tensor, head, cap) -> torch.Tensor:
    """Summed cross-entropy of ``hidden`` rows through the output layer ``head``, with Gemma's final soft-capping."""
    logits = head(hidden).float()
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
