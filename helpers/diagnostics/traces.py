"""Per-step traces as tables: traces measured elsewhere (a CSV of one row per step, several runs) read back into
the monitor's StepRecords, and a run's own trace shown as the Trainer's logs against what happened at each log."""
from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path

import pandas as pd

from helpers.diagnostics.collapse import StepRecord

RECORD_FIELDS = [field.name for field in fields(StepRecord)]


def _value(value):
    # A CSV cell left empty reads as NaN; a StepRecord says "not measured" with None.
    return None if isinstance(value, float) and math.isnan(value) else value


def records_from_rows(rows: pd.DataFrame) -> list[StepRecord]:
    """StepRecords from a table with one row per optimizer step and the StepRecord fields as columns (extra
    columns are ignored; empty cells become None)."""
    present = [name for name in RECORD_FIELDS if name in rows.columns]
    return [StepRecord(**{name: _value(value) for name, value in row.items()})
            for row in rows[present].astype(object).to_dict("records")]


def read_trace_table(path: str | Path, run_column: str = "run") -> dict[str, list[StepRecord]]:
    """The traces of several runs kept in one CSV (a ``run`` column names each row's run): run name -> records,
    in the order the runs first appear in the file."""
    table = pd.read_csv(path)
    return {str(name): records_from_rows(group) for name, group in table.groupby(run_column, sort=False)}


def logged_steps(records: list[StepRecord]) -> pd.DataFrame:
    """The steps where the Trainer logged a loss, with what the monitor saw at the same step: the logged loss
    beside the raw loss, whether it was finite, the skipped flag, learning rate, loss scale and gradient norm."""
    return pd.DataFrame([{"step": r.step, "logged loss": r.logged_loss, "raw loss": r.raw_loss, "finite": r.finite,
                          "skipped": r.skipped, "learning rate": r.learning_rate, "loss scale": r.loss_scale,
                          "grad norm": r.grad_norm} for r in records if r.logged_loss is not None])


def learning_rate_bounds(sweep: pd.DataFrame) -> dict:
    """From a table of fp16 runs (columns ``lr`` and ``first_nonfinite``, empty where the run never overflowed):
    the lowest learning rate that collapsed and the highest that did not (None where no run did)."""
    collapsed = sweep[sweep["first_nonfinite"].notna()]["lr"]
    healthy = sweep[sweep["first_nonfinite"].isna()]["lr"]
    return {"lowest_lr_collapsed": float(collapsed.min()) if len(collapsed) else None,
            "highest_lr_healthy": float(healthy.max()) if len(healthy) else None}
