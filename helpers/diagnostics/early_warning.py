"""The early warning: fp16 headroom measured on a few layers every step, its trend, and the rule that warns before
the first overflow.

Decisions, and why:

- **What is measured.** Forward hooks on the MLP ``down_proj`` modules (the layer the replays of notebook 04 find
  overflowing first, on the CPU emulation and on the H100) record the largest |output| of each training forward, as
  a tensor (``amax``), so the hooks cost one small reduction per layer and no device read. The monitor reads all of
  them once per optimizer step, together with the loss it reads anyway. Evaluation and ``no_grad`` forwards are
  not measured: they are not what the optimizer steps on.
- **Headroom** of a layer at a step: ``log2(65504 / max|x|)``, in bits: each bit is one doubling of the activation
  left before fp16's maximum. An overflowed (inf) or NaN output has headroom ``-inf``.
- **Margin.** The tightest layer's headroom over the last ``window`` steps, fitted by least squares: where it falls,
  the margin is the headroom over the fall per step, an estimate of the steps left before the overflow.
- **Where it runs.** Only in fp16 runs (real on a GPU, emulated on the CPU): bf16 and fp32 have fp32's range, and
  measuring them against fp16's would warn about an overflow that cannot happen.
- **The rule** (:class:`WarningRule`) is tuned on the CPU runs of ``benchmarks/early_warning.py``; its thresholds
  and what they were measured on are in ``docs/measurements/early_warning.csv`` and the class's docstring.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FP16_MAX = float(torch.finfo(torch.float16).max)
WATCHED_SUFFIXES = ("mlp.down_proj",)


def headroom_bits(max_abs: float) -> float:
    """log2(65504 / max|x|): the doublings left before fp16's maximum (-inf for an overflowed or NaN value)."""
    if not math.isfinite(max_abs) or max_abs > FP16_MAX:
        return -math.inf
    return math.log2(FP16_MAX / max_abs) if max_abs > 0 else math.inf


def short_name(module_name: str) -> str:
    """``base_model.model.model.layers.3.mlp.down_proj`` -> ``layers.3.mlp.down_proj``."""
    index = module_name.find("layers.")
    return module_name[index:] if index >= 0 else module_name


class ActivationWatch:
    """Forward hooks keeping, per watched module, the largest |output| of the training forwards since the last
    :meth:`read` (a tensor on the model's device until then)."""

    def __init__(self, model, suffixes: tuple[str, ...] = WATCHED_SUFFIXES):
        self._peaks: dict[str, torch.Tensor] = {}
        watched = [(name, module) for name, module in model.named_modules()
                   if name.endswith(suffixes) and "lora_" not in name and "base_layer" not in name]
        self.names = [short_name(name) for name, _ in watched]
        self._handles = [module.register_forward_hook(self._hook(short_name(name))) for name, module in watched]

    def _hook(self, name):
        def record(module, inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            if not (module.training and torch.is_grad_enabled() and isinstance(out, torch.Tensor)
                    and out.is_floating_point() and out.numel()):
                return
            peak = out.detach().abs().amax().float()
            previous = self._peaks.get(name)
            # torch.maximum keeps a NaN: a NaN output counts as an overflow
            self._peaks[name] = peak if previous is None else torch.maximum(previous, peak)
        return record

    def read(self) -> dict[str, float]:
        """Largest |output| per module since the last read (one device read for all of them), then reset."""
        if not self._peaks:
            return {}
        names = list(self._peaks)
        values = torch.stack([self._peaks[n] for n in names]).cpu().tolist()
        self._peaks = {}
        return dict(zip(names, values))

    def remove(self):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._peaks = {}


def margin_steps(history: list[float], window: int) -> float | None:
    """Steps until the headroom reaches 0 at the least-squares trend of the last ``window`` values (None where the
    headroom does not fall, or too few finite values to fit a trend)."""
    points = [(i, h) for i, h in enumerate(history[-window:]) if math.isfinite(h)]
    if len(points) < 3:
        return None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / spread
    if slope >= 0:
        return None
    return max(0.0, history[-1] / -slope) if math.isfinite(history[-1]) else 0.0


@dataclass(frozen=True)
class WarningRule:
    """When the early warning fires, from the tightest watched layer's headroom (bits) and its margin (steps).

    It fires when the headroom is below ``low_bits``, or below ``falling_bits`` while the margin is at most
    ``margin_steps``. It is *certain* (the rescue acts) when the headroom is below ``certain_bits`` or the step
    already overflowed.

    falling_bits 5: on the H200's real-fp16 sweep of notebook 04's settings (max_steps 300/500/1000/2000, lr 1e-2)
    3 bits warned 3 steps ahead at max_steps 2000, 5 bits 6 steps; the runs that never overflow (lr 1e-4, bf16) kept
    more than 9 bits on every step (docs/measurements/early_warning.csv).
    """

    low_bits: float = 1.0
    falling_bits: float = 5.0
    margin_steps: float = 10.0
    certain_bits: float = 0.25
    window: int = 8

    def fires(self, headroom: float, margin: float | None) -> bool:
        return headroom < self.low_bits or (headroom < self.falling_bits and margin is not None
                                            and margin <= self.margin_steps)

    def certain(self, headroom: float) -> bool:
        return headroom < self.certain_bits


@dataclass
class Assessment:
    headroom_bits: float
    layer: str
    margin_steps: float | None
    warning: bool
    certain: bool

    def text(self, step: int) -> str:
        margin = "unknown" if self.margin_steps is None else f"~{self.margin_steps:.0f} steps"
        return (f"early warning at step {step}: {self.layer} has {self.headroom_bits:.2f} bits of fp16 headroom "
                f"left, estimated margin {margin}")


class EarlyWarning:
    """The running assessment of one fp16 run: feed it each step's peaks, it says whether to warn."""

    def __init__(self, rule: WarningRule | None = None):
        self.rule = rule or WarningRule()
        self.history: list[float] = []  # the tightest layer's headroom, one value a step
        self.first_step: int | None = None
        self.first_text: str | None = None

    def assess(self, step: int, peaks: dict[str, float]) -> Assessment | None:
        if not peaks:
            return None
        bits = {name: headroom_bits(value) for name, value in peaks.items()}
        layer = min(bits, key=bits.get)
        tightest = bits[layer]
        self.history.append(tightest)
        margin = margin_steps(self.history, self.rule.window)
        warning = self.rule.fires(tightest, margin)
        result = Assessment(tightest, layer, margin, warning, self.rule.certain(tightest))
        if warning and self.first_step is None:
            self.first_step, self.first_text = step, result.text(step)
        return result


def first_warning_step(records, rule: WarningRule | None = None) -> int | None:
    """The step at which ``rule`` first fires on a trace's recorded headroom (None: never). A trace recorded with
    another rule is re-assessed from its ``headroom_bits``, so a rule can be tuned without training again."""
    rule = rule or WarningRule()
    history = []
    for record in records:
        if record.headroom_bits is None:
            continue
        history.append(record.headroom_bits)
        if rule.fires(record.headroom_bits, margin_steps(history, rule.window)):
            return record.step
    return None
