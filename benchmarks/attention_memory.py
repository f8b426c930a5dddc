"""What sdpa keeps for the backward pass, and which kernel runs, for the attention calls the lab's models make.

helpers.memory counts, per token and layer, what attention keeps for backward. Which kernel PyTorch's
``scaled_dot_product_attention`` picks decides that: a fused kernel keeps q, k, v, its output and a log-sum-exp per
head; the math kernel keeps the full score matrix, heads x length x length. This runs each call shape once with
autograd's saved-tensor hooks and the profiler, and writes one JSON row per case:

    python -m benchmarks.attention_memory --result outputs/attention_memory.json
    python -m benchmarks.attention_memory --tiny --result outputs/attention_memory.json   (CPU, small lengths)

Cases: the masks transformers 5.23 passes in training (``use_cache=False``): packed rows with restarting positions
and padded batches get a boolean mask; a single unpadded row gets none (``is_causal``); Gemma-3's full-attention
layers without a mask use ``enable_gqa``, its masked ones repeat k and v to every head first.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

# name, batch rows, query heads, key/value heads, row length, head size, mask, dtype
CASES = [
    ("gemma-3-270m sliding window 512 in a 2048 row", 1, 4, 4, 2048, 256, "sliding", torch.bfloat16),
    ("gemma-3-270m full attention, GQA, no mask", 1, 4, 1, 2048, 256, None, torch.bfloat16),
    ("gemma-3-270m packed rows of 512", 3, 4, 4, 512, 256, "packed", torch.bfloat16),
    ("polyglot-ko-5.8b packed rows of 512", 2, 16, 16, 512, 256, "packed", torch.bfloat16),
    ("polyglot-ko-5.8b packed row of 2048", 1, 16, 16, 2048, 256, "packed", torch.bfloat16),
    ("polyglot-ko-5.8b one row, no mask", 2, 16, 16, 512, 256, None, torch.bfloat16),
    ("polyglot-ko-12.8b packed rows of 512", 2, 40, 40, 512, 128, "packed", torch.bfloat16),
    ("polyglot-ko-5.8b blog batch, padded to 130, fp16", 2, 16, 16, 130, 256, "causal", torch.float16),
    ("polyglot-ko-12.8b blog batch, padded to 130, fp16", 2, 40, 40, 130, 128, "causal", torch.float16),
]
KERNEL_WORDS = ("fmha", "flash", "cudnn", "attention", "softmax", "bmm", "cutlass")


def boolean_mask(kind: str, rows: int, length: int, device, window: int = 512):
    """True where a query may attend: causal, within a sliding window, or within its own half of a packed row."""
    position = torch.arange(length, device=device)
    allowed = position[:, None] >= position[None, :]
    if kind == "sliding":
        allowed &= position[:, None] - position[None, :] < window
    elif kind == "packed":  # two examples end to end
        example = (position >= length // 2).long()
        allowed &= example[:, None] == example[None, :]
    return allowed.expand(rows, 1, length, length).contiguous()


def measure(name, rows, heads, kv_heads, length, head_dim, mask_kind, dtype, device) -> dict:
    q, k, v = (torch.randn(rows, n, length, head_dim, device=device, dtype=dtype, requires_grad=True)
               for n in (heads, kv_heads, kv_heads))
    mask = boolean_mask(mask_kind, rows, length, device) if mask_kind else None
    arguments = dict(attn_mask=mask, is_causal=mask is None, enable_gqa=kv_heads != heads)
    saved = {}

    def keep(tensor):  # unique storages autograd keeps, q, k and v included
        saved[tensor.untyped_storage().data_ptr()] = (list(tensor.shape), str(tensor.dtype),
                                                      tensor.untyped_storage().nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        out = F.scaled_dot_product_attention(q, k, v, **arguments)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as profiler:
        F.scaled_dot_product_attention(q, k, v, **arguments).sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()
    kernels = sorted({event.key[:100] for event in profiler.key_averages()
                      if any(word in event.key.lower() for word in KERNEL_WORDS)})
    tokens = rows * length
    inputs = {t.untyped_storage().data_ptr() for t in (q, k, v, out)}
    beyond_inputs = sum(nbytes for ptr, (_, _, nbytes) in saved.items() if ptr not in inputs)
    return {"case": name, "device": device, "dtype": str(dtype), "tokens": tokens, "length": length,
            "head_dim": head_dim, "mask": mask_kind or "none (is_causal)",
            "saved_beyond_qkv_and_output_bytes_per_token": beyond_inputs / tokens,
            "scores_would_be_bytes_per_token": heads * length * dtype.itemsize,
            "saved": [entry for entry in saved.values() if entry[2] * 100 > tokens], "kernels": kernels}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--result", type=Path, required=True, help="the JSON file written")
    parser.add_argument("--tiny", action="store_true", help="lengths of 64 (CPU-sized, for tests)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for name, batch, heads, kv_heads, length, head_dim, mask_kind, dtype in CASES:
        if args.tiny:
            length, head_dim = 64, head_dim // 8
        row = measure(name, batch, heads, kv_heads, length, head_dim, mask_kind, dtype, device)
        print(f"{name}: kept beyond q/k/v/output {row['saved_beyond_qkv_and_output_bytes_per_token']:,.0f} bytes a "
              f"token (scores would be {row['scores_would_be_bytes_per_token']:,}); {'; '.join(row['kernels'][:2])}")
        rows.append(row)
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(json.dumps({"torch": torch.__version__, "device": gpu, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
