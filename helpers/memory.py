"""GPU memory of a QLoRA training step, estimated before training: what fits, and the largest step that does.

:func:`estimate_memory` adds up, from the model's shape alone, what a step holds at its peak:

weights      the base model: 4-bit NF4 with double quantization (0.5 bytes a weight, an 8-bit absmax per block of
             64 and an fp32 absmax per 256 of those), 8-bit, or 16/32-bit; what is not quantized (embeddings, an
             untied output layer, norms) is fp32 after peft's ``prepare_model_for_kbit_training``
lora         LoRA weights, their gradients and the optimizer state (AdamW: two fp32 moments; paged 8-bit: two bytes)
activations  what autograd keeps for the backward pass: every layer's saved tensors, or with gradient checkpointing
             only each layer's input plus one layer recomputed; the 4-bit weight dequantized while it is multiplied
logits       the vocabulary logits the loss needs at once: every position (the model's own loss), the labelled
             positions only, or ``loss_chunk_rows`` of them (helpers.losses.labelled_logits_loss); plus, for the
             model's own loss, the 16-bit copy of an fp32 output layer that autocast makes and keeps for backward
check        the first step compares the labelled-logits loss with the model's own on a small slice of the batch
             (LabTrainer): full logits of that slice, before any activation exists

``total_gib`` = weights + lora + max(activations + logits, check). It models what PyTorch allocates
(``torch.cuda.max_memory_allocated``), not the allocator's reserve or the CUDA context.

How the activation constants come about. Per token and layer, a layer keeps (bytes; h hidden size, I intermediate
size, q = heads x head_dim, kv = key/value heads x head_dim, s the bytes of the residual stream and norm outputs,
c the bytes of the compute dtype, m the bytes of a base projection's output):

- every RMSNorm keeps its fp32 input (4h); Gemma-3 has four a layer plus q/k norms (4q + 4kv), Llama two;
  GPT-NeoX's two LayerNorms read the same input, kept once in fp32 (twice when autocast casts a 16-bit stream;
  once in the stream's dtype where helpers.models.keep_unquantized_in runs them in their bf16 weights' dtype)
- every LoRA-adapted projection with input size d keeps its dropout mask (a bool on CUDA, the input's dtype on the
  CPU) and the input of lora_A: d(1 + c) under autocast; without autocast peft casts that input to the fp32 LoRA
  weights' dtype, d(1 + 4); the frozen base weight needs no saved input (bitsandbytes' 4-bit matmul saves none)
- sdpa's fused kernel keeps q, k, v, its output and its fp32 log-sum-exp per head, plus the attention mask that
  packed rows and padded batches pass, cast to the compute dtype: c(2q + 2kv) + 4 heads + c x length (cuDNN's
  kernel on an H100 at head sizes 128 and 256, with and without masks and GQA, 2026-12-07); eager attention keeps
  q, k, v and its fp32 softmax with the 16-bit copy of it, c(q + 2kv) + heads x length x (4 + c);
  GPT-NeoX's v is a view of its fused q/k/v output, which stays alive whole (c(q + kv) more) unless autocast has
  to cast it
- the MLP keeps the inputs of its activation and gating: 3Im for gated MLPs (Gemma-3, Llama), Im for GPT-NeoX;
  m = s behind a 4-bit layer (bitsandbytes returns its input's dtype), c otherwise

The loss peaks in its backward pass at 14 bytes a logit: the saved fp32 log-softmax, the gradient nll_loss hands
it, the gradient of the fp32 logits and its 16-bit copy (2 + 4 + 4 + 4); final soft-capping (Gemma-2) keeps its
fp32 tanh as well (18; the model's own loss caps in 16 bits: 16). The labelled-logits loss runs the head in its
own dtype, outside autocast: no 16-bit copy of an fp32 head, and a bf16 head's logits and their gradient are cast
to and from fp32 where nothing else of that size is alive (12; capped 16; the gemma-3-270m row with a bf16 head,
H100 2026-12-07, peaked 18% under 14 bytes' estimate). Without a backward pass (the check): 10.

Checked against: the saved tensors of one layer counted with ``torch.autograd.graph.saved_tensors_hooks`` on the CPU
in fp32 (tests/unit/test_memory.py, gemma3/llama/gpt_neox, within 10%); and the peaks measured on H200s and H100s
(docs/measurements/real_shapes_h200_2026-12-01.md: polyglot-ko-12.8b 4-bit batch 4 with checkpointing 8.2 GiB, 5.8b
4.3 GiB; the H200 speed figures of 2026-12-01: gemma-3-270m fixed recipe batch 2 1.9 GiB, blog 2.4 GiB; the
train_speed rows of 2026-12-02 (H200) and 2026-12-07 (both)), all within 15% at the token counts the test states.
The attention term is measured by benchmarks/attention_memory.py.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

from helpers.losses import LABELLED_LOGITS_CHECK_TOKENS

GIB = 2**30
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes, 8-bit absmax per 64, fp32 absmax per 256 blocks
INT8_BYTES_PER_WEIGHT = 1.0
# Optimizer bytes per trainable weight beyond the fp32 weight and its fp32 gradient.
OPTIMIZER_STATE_BYTES = {"paged_adamw_8bit": 2, "adamw_8bit": 2, "adamw_bnb_8bit": 2, "sgd": 0}
ADAMW_STATE_BYTES = 8  # two fp32 moments: adamw_torch, adamw_torch_fused and the rest
LOSS_BYTES_PER_LOGIT = {"capped": 18, "plain": 14, "model_capped": 16, "model_plain": 14, "no_grad": 10}


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder that set its memory; :meth:`from_config` reads them from a transformers config."""

    family: str          # gemma3 | llama | gpt_neox (any other decoder is treated as llama: gated MLP, RMSNorm)
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool           # the output layer shares the input embedding's weight
    softcapped: bool     # Gemma's tanh capping of the final logits

    @classmethod
    def from_config(cls, config) -> "ModelShape":
        config = getattr(config, "text_config", None) or config
        model_type = getattr(config, "model_type", "")
        family = "gpt_neox" if model_type == "gpt_neox" else "gemma3" if model_type.startswith("gemma") else "llama"
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(family=family, hidden=config.hidden_size, intermediate=config.intermediate_size,
                   layers=config.num_hidden_layers, heads=heads,
                   kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim,
                   vocab=config.vocab_size, tied=bool(getattr(config, "tie_word_embeddings", False)),
                   softcapped=bool(getattr(config, "final_logit_softcapping", None)))

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def projections(self) -> dict[str, tuple[int, int, bool]]:
        """Every linear layer of one decoder layer: name -> (inputs, outputs, is an attention projection)."""
        h, i = self.hidden, self.intermediate
        if self.family == "gpt_neox":
            return {"query_key_value": (h, 3 * self.q_dim, True), "dense": (self.q_dim, h, False),
                    "dense_h_to_4h": (h, i, False), "dense_4h_to_h": (i, h, False)}
        return {"q_proj": (h, self.q_dim, True), "k_proj": (h, self.kv_dim, True), "v_proj": (h, self.kv_dim, True),
                "o_proj": (self.q_dim, h, True), "gate_proj": (h, i, False), "up_proj": (h, i, False),
                "down_proj": (i, h, False)}

    def layer_weights(self) -> int:
        return sum(d_in * d_out for d_in, d_out, _ in self.projections().values())

    def other_weights(self) -> int:
        """Embeddings, an untied output layer and the norms: what stays unquantized."""
        norms = self.layers * (4 if self.family == "gemma3" else 2) * self.hidden
        return self.vocab * self.hidden * (1 if self.tied else 2) + norms

    def matmul_weights(self) -> int:
        """The weights a token is multiplied by: every decoder projection and the output layer (not the embedding
        lookup). The N of the usual 2N forward FLOPs a token."""
        return self.layers * self.layer_weights() + self.vocab * self.hidden


@dataclass(frozen=True)
class MemoryEstimate:
    """The estimated peak of one training step, by term, in GiB (see the module docstring for each term)."""

    weights_gib: float
    lora_gib: float
    activations_gib: float
    logits_gib: float
    check_gib: float
    tokens: int                   # tokens of one micro-batch, padding included
    gradient_checkpointing: bool
    logits: str                   # full | labelled | chunked

    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.lora_gib + max(self.activations_gib + self.logits_gib, self.check_gib)

    def summary(self) -> str:
        return (f"estimated peak {self.total_gib:.2f} GiB for {self.tokens:,} tokens a micro-batch: weights "
                f"{self.weights_gib:.2f} + LoRA and optimizer {self.lora_gib:.2f} + activations "
                f"{self.activations_gib:.2f} ({'checkpointed' if self.gradient_checkpointing else 'all kept'}) + "
                f"logits {self.logits_gib:.2f} ({self.logits})")

    def as_dict(self) -> dict:
        return {**{k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()},
                "total_gib": round(self.total_gib, 3)}


def _lora_targets(shape: ModelShape, targets) -> list[str]:
    names = shape.projections()
    if targets == "attention":
        return [n for n, (_, _, attention) in names.items() if attention]
    if targets == "all":
        return list(names)
    wanted = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else list(targets)
    return [n for n in names if n in wanted]


def layer_activation_bytes(shape: ModelShape, *, stream_bytes: int, compute_bytes: int, projection_bytes: int,
                           targets: list[str], lora_r: int, lora_dropout: float, attention: str,
                           attended_length: int, mask_bytes: int, autocast: bool,
                           layer_norm_in_stream_dtype: bool = False) -> float:
    """Bytes one decoder layer keeps for backward, per token (see the module docstring for each term)."""
    h, q, kv, c = shape.hidden, shape.q_dim, shape.kv_dim, compute_bytes
    if shape.family == "gemma3":
        norms = 4 * 4 * h + 4 * (q + kv)
    elif shape.family == "llama":
        norms = 2 * 4 * h
    elif layer_norm_in_stream_dtype:  # two LayerNorms on one input, outside autocast (keep_unquantized_in)
        norms = stream_bytes * h
    else:  # two LayerNorms on one input: shared, unless autocast makes each its own fp32 copy of a 16-bit stream
        norms = 4 * h * (2 if autocast and stream_bytes < 4 else 1)
    projections = shape.projections()
    lora_input = c if autocast else 4  # peft casts lora_A's input to the fp32 adapter weights; autocast to c
    lora = sum(projections[name][0] * ((mask_bytes if lora_dropout > 0 else 0) + lora_input) + lora_r * lora_input
               for name in targets)
    if attention == "eager":  # q, k, v and the fp32 softmax (plus its 16-bit copy); the output is not kept
        attention_bytes = c * (q + 2 * kv) + shape.heads * attended_length * (4 + (c if c < 4 else 0))
    else:  # a fused kernel keeps its output, its log-sum-exp and the mask in the compute dtype, never the scores
        attention_bytes = c * (2 * q + 2 * kv) + 4 * shape.heads + c * attended_length
    if shape.family == "gpt_neox" and projection_bytes == c:
        attention_bytes += c * (q + kv)
    mlp = (shape.intermediate if shape.family == "gpt_neox" else 3 * shape.intermediate) * projection_bytes
    return norms + lora + attention_bytes + mlp


def estimate_memory(config, tokens: int, *, quantization: str = "4bit", precision: str = "bf16",
                    lora_r: int = 8, lora_targets="attention", lora_dropout: float = 0.05,
                    gradient_checkpointing: bool = False, logits: str = "labelled", labelled_share: float = 0.5,
                    loss_chunk_rows: int = 0, attention: str = "sdpa", attended_length: int = 512,
                    optimizer: str = "adamw_torch", device: str = "cuda",
                    autocast: bool | None = None, fp32_unquantized: bool = True) -> MemoryEstimate:
    """The peak of one training step of ``tokens`` tokens (a micro-batch, padding included).

    config: a transformers config (or a :class:`ModelShape`). quantization: none|4bit|8bit. precision: what the
    run computes in (bf16|fp16|fp32; fp16_emulated counts as fp32). logits: ``full`` (the model's own loss),
    ``labelled`` (labelled positions only; ``labelled_share`` of the tokens) or ``chunked`` (``loss_chunk_rows``
    of them at once). attention: the implementation the model runs (eager|sdpa|...); attended_length: how many
    positions a token's attention row spans (the padded length, or the packed row). device: cuda or cpu (the
    dropout mask is a bool on CUDA, a tensor of the input's dtype on the CPU). autocast: None as a Trainer run
    has it (on for bf16 and fp16 on CUDA); False for a loop that runs 16-bit weights without it.
    fp32_unquantized: False where a bf16 run keeps a 4/8-bit model's unquantized weights in bf16
    (helpers.models.keep_unquantized_in): its stream is then bf16 as a bf16 model's is (GPT-NeoX's too: its
    LayerNorms then run in bf16 outside autocast).
    """
    shape = config if isinstance(config, ModelShape) else ModelShape.from_config(config)
    quantized = quantization != "none"
    if autocast is None:
        autocast = precision in ("bf16", "fp16") and device == "cuda"
    # A quantized model's norms and embeddings are fp32 after prepare_model_for_kbit_training (unless a bf16 run
    # casts them back), so is its stream; a bf16 model's stream is bf16; fp16 autocast keeps fp32 weights.
    sixteen_bit = precision == "bf16" and device == "cuda" and not (quantized and fp32_unquantized)
    compute = 2 if autocast or sixteen_bit else 4
    stream = weight_bytes = 2 if sixteen_bit else 4
    projection = stream if quantized else compute
    linear = shape.layers * shape.layer_weights()
    if quantization == "4bit":
        weights = linear * NF4_BYTES_PER_WEIGHT + shape.other_weights() * weight_bytes
    elif quantization == "8bit":
        weights = linear * INT8_BYTES_PER_WEIGHT + shape.other_weights() * weight_bytes
    else:
        weights = (linear + shape.other_weights()) * weight_bytes

    targets = _lora_targets(shape, lora_targets)
    projections = shape.projections()
    lora_weights = shape.layers * sum(lora_r * (projections[n][0] + projections[n][1]) for n in targets)
    lora = lora_weights * (4 + 4 + OPTIMIZER_STATE_BYTES.get(optimizer, ADAMW_STATE_BYTES))

    per_layer = layer_activation_bytes(shape, stream_bytes=stream, compute_bytes=compute, projection_bytes=projection,
                                       targets=targets, lora_r=lora_r, lora_dropout=lora_dropout,
                                       attention=attention, attended_length=attended_length,
                                       mask_bytes=1 if device == "cuda" else stream, autocast=autocast,
                                       layer_norm_in_stream_dtype=quantized and sixteen_bit)
    kept_layers = tokens * shape.hidden * stream * shape.layers + tokens * per_layer if gradient_checkpointing \
        else tokens * per_layer * shape.layers
    final_norm = tokens * shape.hidden * 4
    largest = max(d_in * d_out for d_in, d_out, _ in projections.values())
    dequantized = largest * compute if quantized and device == "cuda" else 0
    activations = kept_layers + final_norm + dequantized

    labelled_rows = max(1, int(tokens * labelled_share))
    rows = {"full": tokens, "labelled": labelled_rows,
            "chunked": min(labelled_rows, loss_chunk_rows or labelled_rows)}[logits]
    per_logit = LOSS_BYTES_PER_LOGIT[("model_" if logits == "full" else "") + ("capped" if shape.softcapped
                                                                                else "plain")]
    if logits != "full":
        per_logit -= 2  # the labelled-logits loss runs the head outside autocast: no 16-bit gradient kept beside it
    # autocast's 16-bit copy of an fp32 head, kept for backward: only the model's own loss runs the head under
    # autocast (the labelled-logits loss runs it in its own dtype; the H100 profile of 2026-12-07 shows its fp32 GEMMs)
    head_copy = shape.vocab * shape.hidden * compute if weight_bytes == 4 and compute < 4 and logits == "full" else 0
    logit_bytes = rows * shape.vocab * per_logit + head_copy
    check = 0.0
    if logits != "full":
        check = min(tokens, LABELLED_LOGITS_CHECK_TOKENS) * shape.vocab * LOSS_BYTES_PER_LOGIT["no_grad"]
    return MemoryEstimate(weights_gib=weights / GIB, lora_gib=lora / GIB, activations_gib=activations / GIB,
                          logits_gib=logit_bytes / GIB, check_gib=check / GIB, tokens=int(tokens),
                          gradient_checkpointing=gradient_checkpointing, logits=logits)


def largest_fitting_tokens(estimate_at: Callable[[int], MemoryEstimate], budget_gib: float, most: int,
                           step: int = 256) -> int:
    """``most`` tokens if their estimate fits ``budget_gib``, else the largest multiple of ``step`` below that fits; 0
    if none does. The estimate grows with the tokens, so a bisection finds it."""
    if estimate_at(most).total_gib <= budget_gib:
        return most  # a request that fits is kept as asked (the small-data floor asks for ~1,000 tokens, not 768)
    low, high = 0, most // step
    while low < high:
        middle = (low + high + 1) // 2
        if estimate_at(middle * step).total_gib <= budget_gib:
            low = middle
        else:
            high = middle - 1
    return low * step


def epoch_capped_tokens(tokens: int, lengths: list[int], min_steps_per_epoch: int, processes: int = 1) -> int:
    """``tokens`` a step, lowered on small data so an epoch of examples of these ``lengths`` (shared by ``processes``)
    has ``min_steps_per_epoch`` steps or more, and never below one example of mean length; 0 steps: no cap."""
    if not min_steps_per_epoch:
        return tokens
    epoch_share = sum(lengths) // (min_steps_per_epoch * processes)
    return max(round(sum(lengths) / len(lengths)), min(tokens, epoch_share))


@dataclass(frozen=True)
class StepPlan:
    """Tokens a step and gradient checkpointing, chosen so that the estimated peak fits the memory budget."""

    tokens_per_step: int
    gradient_checkpointing: bool
    estimate: MemoryEstimate
    budget_gib: float | None
    reason: str


def plan_step(estimate_at: Callable[[int, bool], MemoryEstimate], requested_tokens: int, budget_gib: float | None,
              checkpointing="auto") -> StepPlan:
    """The tokens a step and whether to checkpoint, from ``estimate_at(tokens, checkpointing)``.

    No budget: the requested tokens, checkpointing off for ``auto``. With a budget, ``auto`` keeps checkpointing
    off while at least half the requested tokens fit without it (checkpointing recomputes the forward: 2N more
    FLOPs on top of LoRA's 4N a token, +50%; halving the tokens costs less than that once a step is that large),
    else turns it on; then the largest tokens up to the request that fit. True/False only fit the tokens.
    """
    if budget_gib is None or math.isinf(budget_gib):
        use = bool(checkpointing) if checkpointing != "auto" else False
        return StepPlan(requested_tokens, use, estimate_at(requested_tokens, use), None, "no memory budget")
    choices = [checkpointing] if checkpointing != "auto" else [False, True]
    for use in choices:
        tokens = largest_fitting_tokens(lambda t: estimate_at(t, use), budget_gib, requested_tokens)
        enough = tokens >= requested_tokens / 2 or use is choices[-1]
        if tokens > 0 and enough:
            reason = ("fits as asked" if tokens == requested_tokens else
                      f"lowered from {requested_tokens:,} to fit {budget_gib:.1f} GiB")
            if checkpointing == "auto":
                reason += "; checkpointing " + ("on: without it under half the tokens fit" if use else "off")
            return StepPlan(tokens, use, estimate_at(tokens, use), budget_gib, reason)
    smallest = estimate_at(256, choices[-1])
    raise ValueError(f"even 256 tokens a step do not fit {budget_gib:.1f} GiB: {smallest.summary()}")
