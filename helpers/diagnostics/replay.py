"""Looking into one batch: a probe of each layer's headroom against fp16's range, the replay of a training step's
batch under it, and the plain-language diagnosis of a run from its trace and the replay."""
from __future__ import annotations

import contextlib

import torch

from helpers.diagnostics.collapse import CollapseFinding, StepRecord

FP_MAX = {torch.float16: float(torch.finfo(torch.float16).max), torch.bfloat16: float(torch.finfo(torch.bfloat16).max),
          torch.float32: float(torch.finfo(torch.float32).max)}


class HeadroomProbe:
    """Forward hooks recording, per module, the largest |activation| against the range of the dtype it ran in.

    ``fp16_range`` lets a probe on an fp32 run report the headroom the same values would have in fp16.
    The first module (in execution order) whose output held inf or NaN is ``first_nonfinite``.
    """

    def __init__(self, model, module_types: tuple = (torch.nn.Linear,), name_filter=None, assume_dtype=torch.float16):
        self.model = model
        self.assume_dtype = assume_dtype
        self.stats: dict[str, dict] = {}
        self.order: list[str] = []
        self.first_nonfinite: str | None = None
        self._handles = []
        for name, module in model.named_modules():
            is_linear = isinstance(module, module_types) or type(module).__name__ in ("Linear4bit", "Linear8bitLt")
            is_norm = type(module).__name__.endswith("RMSNorm") or isinstance(module, torch.nn.LayerNorm)
            if (is_linear or is_norm) and (name_filter is None or name_filter(name)) and "lora_" not in name:
                self._handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name):
        def record(module, inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            if not isinstance(out, torch.Tensor) or not out.is_floating_point():
                return
            with torch.no_grad():
                finite = torch.isfinite(out)
                all_finite = bool(finite.all())
                peak = float(out.detach().abs().masked_fill(~finite, 0).max()) if out.numel() else 0.0
            limit = FP_MAX.get(self.assume_dtype or out.dtype, FP_MAX[torch.float32])
            entry = self.stats.setdefault(name, {"module": name, "max_abs": 0.0, "nonfinite": False,
                                                 "dtype": str(self.assume_dtype or out.dtype).replace("torch.", "")})
            entry["max_abs"] = max(entry["max_abs"], peak)
            entry["headroom"] = limit / entry["max_abs"] if entry["max_abs"] > 0 else float("inf")
            if not all_finite:
                entry["nonfinite"] = True
                if self.first_nonfinite is None:
                    self.first_nonfinite = name
            if name not in self.order:
                self.order.append(name)
        return record

    def table(self):
        import pandas as pd  # imported when used: slow to import, and only the table needs it

        return pd.DataFrame([self.stats[name] for name in self.order])

    def remove(self):
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def rng_state() -> dict:
    """The random state of the CPU and of the current CUDA device, for :func:`replay_batch`."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def replay_batch(model, batch, context=None, assume_dtype=torch.float16, weights=None, rng_state=None):
    """Run one batch forward under ``context`` (e.g. emulated fp16) with a headroom probe; return the probe.

    ``weights`` (name -> tensor, e.g. the trainable weights a training step met) are swapped in for the replay
    and put back afterwards. With ``rng_state`` (from :func:`rng_state`, taken before that step) the replay
    runs in training mode and draws the same dropout masks as the step did; without it, it runs in eval mode
    (no dropout), which is deterministic but not the forward the step computed.
    """
    context = context or contextlib.nullcontext()
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    params = dict(model.named_parameters())
    unknown = sorted(set(weights or {}) - set(params))
    if unknown:
        raise ValueError(f"replay_batch: the model has no parameters named {unknown[:3]}")
    saved = {name: params[name].detach().clone() for name in weights or {}}
    was_training = model.training
    model.train(rng_state is not None)
    devices = [torch.cuda.current_device()] if rng_state is not None and rng_state["cuda"] is not None else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            for name, value in (weights or {}).items():
                params[name].copy_(value)
            if rng_state is not None:
                torch.set_rng_state(rng_state["cpu"])
                if devices:
                    torch.cuda.set_rng_state(rng_state["cuda"])
            with HeadroomProbe(model, assume_dtype=assume_dtype) as probe, context:
                out = model(**batch)
                probe.loss = float(out.loss.float()) if getattr(out, "loss", None) is not None else None
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)
        model.train(was_training)
    return probe


def diagnosis(finding: CollapseFinding, records: list[StepRecord], precision: str, probe=None,
              comparison_finding: CollapseFinding | None = None, comparison_precision: str | None = None,
              comparison_records: list[StepRecord] | None = None, rescue_records: list[StepRecord] | None = None) -> str:
    """A plain-language diagnosis built only from a run's measurements (nothing here is canned text about the
    outcome: each sentence is chosen and filled from the trace). ``rescue_records``: the trace of the same settings
    run with ``on_collapse="rescue"``, if there was one."""
    lines = []
    if not finding.collapsed:
        lines.append(f"The {precision} run did not collapse in {finding.steps_seen} steps "
                     f"({finding.nonfinite_steps} non-finite steps, {finding.steps_skipped} skipped optimizer steps).")
    else:
        finite_before = [r.raw_loss for r in records if r.finite and r.step < finding.first_nonfinite_step]
        lines.append(f"The {precision} run collapsed: its first non-finite loss came at step "
                     f"{finding.first_nonfinite_step}, and from step {finding.nonfinite_streak_from} every step was "
                     f"non-finite" + (f" (the last finite raw loss before it was {finite_before[-1]:.3f})."
                                      if finite_before else "."))
        zero_logs = [r for r in records if r.logged_loss == 0.0]
        logs = [r for r in records if r.logged_loss is not None]
        if zero_logs:
            lines.append(f"The Trainer logged exactly 0.0 in {len(zero_logs)} of {len(logs)} logs, from step "
                         f"{zero_logs[0].step}: those windows held only NaN losses, which logging_nan_inf_filter "
                         f"replaces by the running mean (0 right after a log). It is not a real loss of 0.")
        elif logs:
            lines.append(f"No logged loss was 0.0 in {len(logs)} logs (the run stopped before a whole logging "
                         f"window was non-finite, or it logged too rarely).")
        frozen = [r for r in records if r.step >= finding.nonfinite_streak_from]
        if frozen and len({r.learning_rate for r in frozen}) == 1:
            lines.append(f"The learning rate stayed at {frozen[0].learning_rate:.4g} for the last {len(frozen)} steps: "
                         f"every optimizer step was skipped ({finding.steps_skipped} of {finding.steps_seen} in all), "
                         f"and Trainer does not step the LR schedule after a skipped step.")
        scales = [r.loss_scale for r in records if r.loss_scale is not None]
        if scales:
            lines.append(f"The loss scale went from {max(scales):.4g} to {scales[-1]:.4g}"
                         + (" (effectively 0)." if scales[-1] < 1e-3 else "."))
    if probe is not None and probe.first_nonfinite:
        stats = probe.stats[probe.first_nonfinite]
        lines.append(f"Replaying the first failing batch, the first module whose output left fp16's range was "
                     f"{probe.first_nonfinite} (largest finite |activation| there {stats['max_abs']:.4g}; fp16 max 65504).")
    elif probe is not None:
        tightest = min(probe.stats.values(), key=lambda s: s["headroom"], default=None)
        if tightest:
            lines.append(f"The replay found no module overflowing; the least headroom was {tightest['headroom']:.3g}x "
                         f"at {tightest['module']}.")
    lines += _warning_lines(records, finding)
    if comparison_finding is not None and comparison_records:
        first, last = _loss_ends(comparison_records)
        diverged = first is not None and last > DIVERGED_RATIO * first
        if comparison_finding.collapsed:
            lines.append(f"The {comparison_precision} run collapsed too ({comparison_finding.text()}): fp16's range is "
                         f"not the whole story at these settings; look at the learning rate.")
        elif diverged:
            lines.append(f"The {comparison_precision} run had no non-finite loss but diverged as well (raw loss "
                         f"{first:.3f} -> {last:.3f}, means of its first and last {ENDS} steps): fp16's range is not "
                         f"the only problem at this learning rate, and the safe precision alone does not fix the run.")
        elif finding.collapsed:
            lines.append(f"The same settings in {comparison_precision} ran {comparison_finding.steps_seen} steps "
                         f"with {comparison_finding.nonfinite_steps} non-finite losses (raw loss {first:.3f} -> "
                         f"{last:.3f}): the failure comes from fp16's range, and a precision with fp32's range "
                         "fixes it.")
        else:
            lines.append(f"The {comparison_precision} run was healthy as well ({first:.3f} -> {last:.3f}).")
    if rescue_records:
        lines += _rescue_lines(rescue_records, "the rescue run")
    return "\n".join(lines)


DIVERGED_RATIO = 1.2  # a run whose raw loss ends 20% above where it began diverged (noise of a few steps is less)
ENDS = 5              # steps averaged at each end of a run for that comparison


def _loss_ends(records: list[StepRecord]) -> tuple[float | None, float | None]:
    """Mean raw loss of the first and of the last ENDS finite steps."""
    finite = [r.raw_loss for r in records if r.finite]
    if not finite:
        return None, None
    return sum(finite[:ENDS]) / len(finite[:ENDS]), sum(finite[-ENDS:]) / len(finite[-ENDS:])


def _warning_lines(records: list[StepRecord], finding: CollapseFinding) -> list[str]:
    """What the early warning and a rescue did in this run (nothing where the run had no fp16 to watch)."""
    if not any(r.headroom_bits is not None for r in records):
        return []
    warned = next((r for r in records if r.warning), None)
    first_bad = finding.first_nonfinite_step
    if warned is None:
        line = "The early warning did not fire" + (
            f", though a loss turned non-finite at step {first_bad}: the overflow came without the watched layers "
            "running out of headroom first." if first_bad else ".")
    else:
        lead = (f", {first_bad - warned.step} steps before the first non-finite loss" if first_bad and
                first_bad > warned.step else ", and no loss had turned non-finite by the end" if not first_bad
                else f", {warned.step - first_bad} steps after the first non-finite loss (too late)")
        line = (f"The early warning fired at step {warned.step}{lead}: {warned.headroom_layer} had "
                f"{warned.headroom_bits:.2f} bits of fp16 headroom left.")
    return [line] + _rescue_lines(records, "the run")


def _rescue_lines(records: list[StepRecord], which: str) -> list[str]:
    """A rescue in ``records``: when, what it switched, and whether the run in the safe precision went well."""
    event = next((r for r in records if r.event), None)
    if event is None:
        return [f"With on_collapse='rescue', {which} was never rescued ({len(records)} steps)."] \
            if which != "the run" else []
    after = [r for r in records if r.step > event.step]
    bad_after = sum(not r.finite for r in after)
    line = (f"At step {event.step} {which} was rescued: {event.event}; {len(after)} steps followed, {bad_after} of "
            "them non-finite")
    first, last = _loss_ends(after)
    if first is not None and last > DIVERGED_RATIO * first:
        return [line + f", and its raw loss rose from {first:.3f} to {last:.3f}: the rescued run diverges in the "
                       "safe precision too."]
    return [line + (f" (raw loss {first:.3f} -> {last:.3f})." if first is not None else ".")]
