"""fp16 autocast emulated on CPU: fp16's range in the forward pass and a dynamic loss scale, at fp32 speed.

Why our own: on CPU, ``Trainer(fp16=True)`` trains in plain fp32 (no autocast, no GradScaler), and real fp16
matrix products there are ~200x slower than fp32. The collapse the blog users hit comes from fp16's *range*
(values above 65504 become inf, then NaN), so this module reproduces the range, not the rounding cost:

- forward: the ops autocast runs in fp16 on a GPU (linear, matmul, bmm, baddbmm, addmm, attention, and
  bitsandbytes' 4-bit product) compute in fp32, and their floating activations (inputs and outputs; not the
  weights) are rounded to fp16 values (so an overflow becomes inf exactly where the GPU's would); gradients pass
  straight through in fp32. Rounding in the backward as well made gradients overflow far more often than on the
  real GPU, so it is not done.
- regions where the model turns autocast off (transformers computes rotary angles with autocast disabled) are
  left alone: the emulation enters a CPU autocast context only as a marker and acts only while
  ``torch.is_autocast_enabled("cpu")`` is true; the ops themselves run with autocast off, in fp32.
- attention masks hold the dtype's most negative value; they are passed through untouched.
- :class:`DynamicLossScale` follows torch.amp.GradScaler's policy (start 65536, halve on overflow, double after
  2000 clean steps). A step overflows if a gradient is non-finite or if the scaled gradient would exceed fp16's
  range, as fp16 activation gradients on the GPU would.
"""
from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

FP16_MAX = float(torch.finfo(torch.float16).max)  # 65504

_F = torch.nn.functional
AUTOCAST_FP16_OPS = {
    _F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm,
    torch.baddbmm, torch.Tensor.baddbmm, torch.addmm, torch.Tensor.addmm, torch.mm, torch.Tensor.mm,
    _F.scaled_dot_product_attention,
}

# bitsandbytes' 4-bit matmul custom op, where bitsandbytes is installed (see Fp16RangeMode)
QUANTIZED_MATMUL_OPS = set()
try:
    import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)
    QUANTIZED_MATMUL_OPS = {torch.ops.bitsandbytes.gemm_4bit, torch.ops.bitsandbytes.gemm_4bit.default}
except (ImportError, AttributeError, RuntimeError):
    pass


class _RoundToFp16(torch.autograd.Function):
    """Round to the nearest fp16 value (out-of-range becomes inf) in the forward; identity gradient."""

    @staticmethod
    def forward(ctx, tensor):
        return tensor.to(torch.float16).to(tensor.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad


def round_to_fp16(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float16:
        return _RoundToFp16.apply(value)
    return value


class Fp16RangeMode(TorchFunctionMode):
    """Inside this mode (and a CPU autocast marker) autocast-eligible ops see and produce fp16-range values."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (func not in AUTOCAST_FP16_OPS and func not in QUANTIZED_MATMUL_OPS) or not torch.is_autocast_enabled("cpu"):
            return func(*args, **kwargs)
        if func is _F.linear or func in QUANTIZED_MATMUL_OPS:
            # bitsandbytes' 4-bit product is a custom op whose own matmul this mode cannot see: left to itself it ran
            # under the bf16 marker, in CPU bf16 (60x slower than fp32 on a CPU without bf16 instructions).
            # Only the activation is rounded: weights sit far inside fp16's range, and rounding them would cost a
            # pass over the 168M-entry tied embedding every step while changing nothing about range.
            args = (round_to_fp16(args[0]),) + tuple(args[1:])
        elif func is _F.scaled_dot_product_attention:
            mask = kwargs.pop("attn_mask", None)  # keep the mask's -inf/min values as they are
            args = tuple(round_to_fp16(a) for a in args)
            kwargs = {k: round_to_fp16(v) for k, v in kwargs.items()}
            if mask is not None:
                kwargs["attn_mask"] = mask
        else:
            args = tuple(round_to_fp16(a) for a in args)
            kwargs = {k: round_to_fp16(v) for k, v in kwargs.items()}
        with torch.autocast("cpu", enabled=False):
            out = func(*args, **kwargs)
        return round_to_fp16(out)


@contextlib.contextmanager
def fp16_range():
    """Context manager for a forward pass with emulated fp16 autocast range."""
    # The bf16 CPU autocast context is only a marker that regions with autocast disabled can switch off;
    # every op the mode intercepts runs with autocast off, so nothing is computed in bf16.
    with torch.autocast("cpu", dtype=torch.bfloat16), Fp16RangeMode():
        yield


class DynamicLossScale:
    """GradScaler's dynamic loss scale policy, applied to fp32 gradients."""

    def __init__(self, init_scale: float = 65536.0, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000):
        self.scale = init_scale
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        self._clean_steps = 0

    def unscale_and_check(self, parameters) -> bool:
        """Divide gradients of ``scale * loss`` by the scale; return True if the step must be skipped."""
        grads = [p.grad for p in parameters if p.grad is not None]
        overflow = False
        for grad in grads:
            if not torch.isfinite(grad).all() or grad.abs().max().item() > FP16_MAX:
                overflow = True
                break
        if not overflow:
            for grad in grads:
                grad.div_(self.scale)
        return overflow

    def update(self, overflow: bool):
        if overflow:
            self.scale *= self.backoff_factor
            self._clean_steps = 0
        else:
            self._clean_steps += 1
            if self._clean_steps % self.growth_interval == 0:
                self.scale *= self.growth_factor
