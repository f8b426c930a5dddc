"""Collapse diagnostics: a per-step monitor for any Trainer run, and a probe of fp16 headroom per layer.

The monitor sees what the Trainer's logs hide. ``logging_nan_inf_filter`` (on by default) replaces a NaN step
loss with the window's running mean, which is 0 right after each log, so a dead fp16 run logs exactly 0.0.
The monitor records the raw loss of every optimizer step, the loss scale, skipped steps, the learning rate and
the gradient norm into ``trace.jsonl``, and names the collapse signature it sees.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback

FP_MAX = {torch.float16: float(torch.finfo(torch.float16).max), torch.bfloat16: float(torch.finfo(torch.bfloat16).max),
          torch.float32: float(torch.finfo(torch.float32).max)}


@dataclass
class StepRecord:
    step: int
    raw_loss: float
    finite: bool
    skipped: bool
    learning_rate: float
    loss_scale: float | None
    grad_norm: float | None
    logged_loss: float | None = None
    seconds: float | None = None  # wall time since the monitor started


@dataclass
class CollapseFinding:
    """Which parts of the collapse signature a run showed, each with the step it began (None: not seen)."""

    collapsed: bool
    first_nonfinite_step: int | None
    nonfinite_streak_from: int | None
    fake_zero_log_step: int | None
    lr_frozen_from: int | None
    scale_to_zero_step: int | None
    steps_seen: int
    steps_skipped: int
    nonfinite_steps: int

    def signs(self) -> list[str]:
        names = {"nonfinite_streak_from": "non-finite loss streak", "fake_zero_log_step": "logged 0.0 that is not a real 0",
                 "lr_frozen_from": "learning rate frozen while steps advance",
                 "scale_to_zero_step": "loss scale fallen to ~0"}
        return [f"{text} from step {getattr(self, key)}" for key, text in names.items() if getattr(self, key) is not None]

    def text(self) -> str:
        if not self.collapsed:
            return (f"no collapse in {self.steps_seen} steps ({self.nonfinite_steps} non-finite, "
                    f"{self.steps_skipped} skipped)")
        return (f"collapse: first non-finite loss at step {self.first_nonfinite_step}; " + "; ".join(self.signs())
                + f"; {self.steps_skipped} of {self.steps_seen} optimizer steps skipped")


def detect_collapse(records: list[StepRecord], streak: int = 10, scale_floor: float = 1e-3) -> CollapseFinding:
    """Find the collapse signature in a trace.

    streak: consecutive non-finite steps that make a collapse certain (a healthy fp16 run skips a step now
    and then while its loss scale settles, but never many in a row).
    """
    first_nonfinite = next((r.step for r in records if not r.finite), None)
    streak_from, run = None, 0
    for r in records:
        run = run + 1 if not r.finite else 0
        if run == streak and streak_from is None:
            streak_from = r.step - streak + 1
    # A logged 0.0 is fake when its logging window (since the previous log) held a non-finite step.
    fake_zero, window_start = None, 0
    for r in records:
        if r.logged_loss is None:
            continue
        if r.logged_loss == 0.0 and any(not q.finite for q in records if window_start < q.step <= r.step):
            fake_zero = r.step
            break
        window_start = r.step
    lr_frozen, run = None, 0
    for prev, cur in zip(records, records[1:]):
        run = run + 1 if (cur.skipped and cur.learning_rate == prev.learning_rate) else 0
        if run == streak and lr_frozen is None:
            lr_frozen = cur.step - streak + 1
    scale_zero = next((r.step for r in records if r.loss_scale is not None and r.loss_scale < scale_floor), None)
    collapsed = streak_from is not None
    return CollapseFinding(collapsed, first_nonfinite, streak_from, fake_zero, lr_frozen, scale_zero, len(records),
                           sum(r.skipped for r in records), sum(not r.finite for r in records))


class CollapseMonitor(TrainerCallback):
    """Trainer callback that traces every optimizer step and detects the collapse.

    Use with :class:`helpers.training.LabTrainer` (which hands it the raw loss before the logging filter).
    on_collapse: ``"record"`` keeps training and records; ``"stop"`` ends the run once the collapse is certain
    (see :meth:`collapse_is_certain`), puts back the adapter weights of the last step with a finite loss, and saves them to ``out_dir/last_good``.
    """

    def __init__(self, out_dir: str | Path, on_collapse: str = "record", streak: int = 10, wandb_log: bool = False,
                 previous: list[StepRecord] | None = None):
        if on_collapse not in ("record", "stop"):
            raise ValueError("on_collapse must be 'record' or 'stop'")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.trace_path = self.out_dir / "trace.jsonl"
        self.records: list[StepRecord] = list(previous or [])
        self._rewrite_trace()
        self.on_collapse, self.streak, self.wandb_log = on_collapse, streak, wandb_log
        self.trainer = None
        self.stopped_at: int | None = None
        self._good_state: dict | None = None
        self._good_step: int | None = None
        self._pending: dict = {}
        self._started = time.perf_counter()

    def attach(self, trainer):
        self.trainer = trainer
        return self

    # LabTrainer calls these two
    def record_micro_loss(self, loss: torch.Tensor):
        value = float(loss.detach().float().item())
        self._pending.setdefault("losses", []).append(value)

    def record_grad_norm(self, grad_norm):
        self._pending["grad_norm"] = None if grad_norm is None else float(grad_norm)

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        losses = self._pending.get("losses", [float("nan")])
        raw = sum(losses) / len(losses)
        scale = trainer.loss_scale()
        record = StepRecord(step=state.global_step, raw_loss=raw, finite=math.isfinite(raw),
                            skipped=bool(trainer.accelerator.optimizer_step_was_skipped),
                            learning_rate=float(trainer.lr_scheduler.get_last_lr()[0]), loss_scale=scale,
                            grad_norm=self._pending.get("grad_norm"),
                            seconds=round(time.perf_counter() - self._started, 3))
        self._pending = {}
        self.records.append(record)
        if record.finite and not record.skipped:
            model = kwargs.get("model") or trainer.model
            self._good_state = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
            self._good_step = record.step
        with self.trace_path.open("a") as handle:
            handle.write(json.dumps(asdict(record)) + "\n")
        if self.wandb_log and state.is_world_process_zero:
            _wandb_log({"monitor/raw_loss": raw if record.finite else None, "monitor/finite": int(record.finite),
                        "monitor/skipped": int(record.skipped), "monitor/loss_scale": scale,
                        "monitor/learning_rate": record.learning_rate, "train/global_step": record.step})
        if self.on_collapse == "stop" and self.stopped_at is None and self.collapse_is_certain():
            self.stopped_at = record.step
            control.should_training_stop = True
            self.restore_last_good(kwargs.get("model") or trainer.model)
        return control

    def collapse_is_certain(self) -> bool:
        """A non-finite streak, and the rest of the signature shown: a logged 0.0 and, where there is a loss
        scaler, its scale near 0. A streak five times the threshold is enough on its own."""
        finding = detect_collapse(self.records, self.streak)
        if not finding.collapsed:
            return False
        trailing = next((i for i, r in enumerate(reversed(self.records)) if r.finite), len(self.records))
        if trailing >= 5 * self.streak:
            return True
        has_scaler = self.records[-1].loss_scale is not None
        return finding.fake_zero_log_step is not None and (not has_scaler or finding.scale_to_zero_step is not None)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            for record in reversed(self.records):
                if record.step == state.global_step:
                    record.logged_loss = float(logs["loss"])
                    break
            self._rewrite_trace()  # steps are appended as they end; the logged loss arrives just after

    def _rewrite_trace(self):
        partial = self.trace_path.with_suffix(".partial")
        partial.write_text("".join(json.dumps(asdict(r)) + "\n" for r in self.records))
        partial.replace(self.trace_path)

    def restore_last_good(self, model):
        """Put back the adapter weights of the last finite step and save them under out_dir/last_good."""
        if self._good_state is None:
            return None
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in self._good_state.items():
                params[name].copy_(value)
        path = self.out_dir / "last_good"
        model.save_pretrained(path)
        (path / "step.txt").write_text(str(self._good_step))
        return path

    def finding(self) -> CollapseFinding:
        return detect_collapse(self.records, self.streak)


def _wandb_log(values: dict):
    # No explicit step: transformers' WandbCallback uses train/global_step as the step metric, and an explicit
    # step behind wandb's own counter would be dropped.
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        wandb.log({k: v for k, v in values.items() if v is not None})


def read_trace(path: str | Path) -> list[StepRecord]:
    return [StepRecord(**json.loads(line)) for line in Path(path).read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------- headroom probe

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
        import pandas as pd

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
    import contextlib

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
              fixed_finding: CollapseFinding | None = None, fixed_precision: str | None = None,
              fixed_records: list[StepRecord] | None = None) -> str:
    """A plain-language diagnosis built only from a run's measurements (nothing here is fixed text about the
    outcome: each sentence is chosen and filled from the trace)."""
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
    if fixed_finding is not None and fixed_records:
        first, last = fixed_records[0].raw_loss, fixed_records[-1].raw_loss
        if not fixed_finding.collapsed and finding.collapsed:
            lines.append(f"The same settings in {fixed_precision} ran {fixed_finding.steps_seen} steps with "
                         f"{fixed_finding.nonfinite_steps} non-finite losses (raw loss {first:.3f} -> {last:.3f}): the "
                         f"failure comes from fp16's range, and a precision with fp32's range fixes it.")
        elif fixed_finding.collapsed:
            lines.append(f"The {fixed_precision} run collapsed too ({fixed_finding.text()}): fp16's range is not the "
                         f"whole story at these settings; look at the learning rate.")
        else:
            lines.append(f"The {fixed_precision} run was healthy as well ({first:.3f} -> {last:.3f}).")
    return "\n".join(lines)
