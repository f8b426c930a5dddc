"""The collapse monitor: a Trainer callback that records every optimizer step into ``trace.jsonl``, and the detection
of the collapse signature in such a trace."""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback

from helpers.diagnostics.early_warning import ActivationWatch, EarlyWarning, WarningRule
from helpers.diagnostics.rescue import TrainingSnapshot, switch_to_safe_precision


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
    # The early warning (fp16 runs only; see helpers.diagnostics.early_warning): the tightest watched layer's fp16
    # headroom in bits, its name, the estimated steps of margin, and whether the warning was on at this step.
    headroom_bits: float | None = None
    headroom_layer: str | None = None
    margin_steps: float | None = None
    warning: bool = False
    precision: str | None = None  # the precision this step ran in (a rescue changes it mid-run)
    event: str | None = None      # what the monitor did at this step (a rescue)


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

    Use with :class:`helpers.trainer.LabTrainer` (which hands it the raw loss before the logging filter).
    on_collapse: ``"record"`` keeps training and records; ``"stop"`` ends the run once the collapse is certain
    (see :meth:`collapse_is_certain`), puts back the adapter weights of the last step with a finite loss, and saves them to ``out_dir/last_good``.
    ``"rescue"`` (fp16 runs) rolls back to the last good state once the early warning is certain or a loss is not
    finite, and goes on in a safe precision (:mod:`helpers.diagnostics.rescue`); the switch is the step's ``event``.

    In an fp16 run (real or emulated) the early warning (:mod:`helpers.diagnostics.early_warning`) measures every
    step's fp16 headroom on the MLP ``down_proj`` layers; the first warning is printed, recorded in the trace and
    passed to ``Trainer.log`` (so wandb gets it where a run reports there).
    """

    def __init__(self, out_dir: str | Path, on_collapse: str = "record", streak: int = 10, wandb_log: bool = False,
                 previous: list[StepRecord] | None = None, rule: WarningRule | None = None, snapshot_every: int = 5):
        if on_collapse not in ("record", "stop", "rescue"):
            raise ValueError("on_collapse must be 'record', 'stop' or 'rescue'")
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
        self.rule, self.snapshot_every = rule or WarningRule(), snapshot_every
        self.precision: str | None = None
        self.watch: ActivationWatch | None = None
        self.early: EarlyWarning | None = None
        self.rescue: dict | None = None
        self._snapshot: TrainingSnapshot | None = None

    def attach(self, trainer):
        self.trainer = trainer
        return self

    # LabTrainer calls these two
    def record_micro_loss(self, loss: torch.Tensor):
        value = float(loss.detach().float().item())
        self._pending.setdefault("losses", []).append(value)

    def record_grad_norm(self, grad_norm):
        self._pending["grad_norm"] = None if grad_norm is None else float(grad_norm)

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        emulated = getattr(trainer, "loss_scaler", None) is not None
        self.precision = "fp16_emulated" if emulated else "fp16" if args.fp16 else "bf16" if args.bf16 else "fp32"
        if self.precision.startswith("fp16") and self.watch is None:
            self.watch = ActivationWatch(kwargs.get("model") or trainer.model)
            self.early = EarlyWarning(self.rule)

    def on_train_end(self, args, state, control, **kwargs):
        if self.watch is not None:
            self.watch.remove()
            self.watch = None

    def on_step_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        losses = self._pending.get("losses", [float("nan")])
        raw = sum(losses) / len(losses)
        scale = trainer.loss_scale()
        record = StepRecord(step=state.global_step, raw_loss=raw, finite=math.isfinite(raw),
                            skipped=bool(trainer.accelerator.optimizer_step_was_skipped),
                            learning_rate=float(trainer.lr_scheduler.get_last_lr()[0]), loss_scale=scale,
                            grad_norm=self._pending.get("grad_norm"),
                            seconds=round(time.perf_counter() - self._started, 3), precision=self.precision)
        self._pending = {}
        self.records.append(record)
        model = kwargs.get("model") or trainer.model
        assessment = self._assess(record)
        if self.on_collapse == "rescue" and self.rescue is None and self.watch is not None:
            healthy = record.finite and not record.skipped and not record.warning
            if healthy and (self._snapshot is None or record.step % self.snapshot_every == 0):
                self._snapshot = TrainingSnapshot(trainer, model, record.step)
            if not record.finite or (assessment is not None and assessment.certain):
                self._rescue(record, model, "non-finite loss" if not record.finite else "warning certain")
        if record.finite and not record.skipped and self.on_collapse == "stop":
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

    def _assess(self, record: StepRecord):
        if self.watch is None:
            return None
        assessment = self.early.assess(record.step, self.watch.read())
        if assessment is None:
            return None
        record.headroom_bits, record.headroom_layer = assessment.headroom_bits, assessment.layer
        record.margin_steps, record.warning = assessment.margin_steps, assessment.warning
        if assessment.warning and self.early.first_step == record.step:
            print(self.early.first_text)
            self._log({"early_warning/step": record.step, "early_warning/headroom_bits": assessment.headroom_bits,
                       "early_warning/margin_steps": assessment.margin_steps})
        return assessment

    def _rescue(self, record: StepRecord, model, reason: str):
        """Roll back to the last snapshot and go on in the safe precision (helpers.diagnostics.rescue)."""
        snapshot = self._snapshot
        if snapshot is not None:
            snapshot.restore(self.trainer, model)
        switched_to = switch_to_safe_precision(self.trainer, model)
        self.watch.remove()
        self.watch = None
        self.rescue = {"step": record.step, "reason": reason, "rolled_back_to": snapshot.step if snapshot else None,
                       "from": self.precision, "to": switched_to}
        record.event = (f"rescue ({reason}): rolled back to step {self.rescue['rolled_back_to']}, "
                        f"{self.precision} -> {switched_to}")
        self.precision = switched_to
        print(f"step {record.step}: {record.event}")
        self._log({"rescue/step": record.step, "rescue/rolled_back_to": self.rescue["rolled_back_to"]})

    def _log(self, values: dict):
        # Through Trainer.log, so every reporting callback (wandb among them) gets it as it gets the loss.
        if self.trainer is not None and hasattr(self.trainer, "log"):
            self.trainer.log({k: v for k, v in values.items() if v is not None})

    def card(self) -> dict:
        """What the run card keeps of the early warning and the rescue."""
        warned = self.early is not None and self.early.first_step is not None
        return {"early_warning": {"active": self.early is not None, "rule": vars(self.rule),
                                  "first_step": self.early.first_step if warned else None,
                                  "text": self.early.first_text if warned else None},
                "rescue": self.rescue}

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
        # as the run's own adapter is written (helpers.checkpoints.write_adapter): LoRA weights only, safetensors
        model.save_pretrained(path, safe_serialization=True, save_embedding_layers=False)
        (path / "step.txt").write_text(str(self._good_step))
        return path

    def finding(self) -> CollapseFinding:
        return detect_collapse(self.records, self.streak)


def _wandb_log(values: dict):
    # No explicit step: transformers' WandbCallback uses train/global_step as the step metric, and an explicit
    # step behind wandb's own counter would be dropped.
    try:
        import wandb  # optional: logging to wandb only where it is installed
    except ImportError:
        return
    if wandb.run is not None:
        wandb.log({k: v for k, v in values.items() if v is not None})


def read_trace(path: str | Path) -> list[StepRecord]:
    return [StepRecord(**json.loads(line)) for line in Path(path).read_text().splitlines() if line.strip()]
