"""Plots the notebooks show. Each returns the matplotlib Figure and, given ``path``, saves it as PNG."""
from __future__ import annotations

import math

import matplotlib.pyplot as plt


def _save(fig, path):
    if path:
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig


def loss_and_lr(log_history: list[dict], title: str = "", path=None):
    """Logged training loss (and eval loss, if any) and learning rate against the step."""
    train = [h for h in log_history if "loss" in h]
    evals = [h for h in log_history if "eval_loss" in h]
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax_loss.plot([h["step"] for h in train], [h["loss"] for h in train], marker="o", label="train (logged)")
    if evals:
        ax_loss.plot([h["step"] for h in evals], [h["eval_loss"] for h in evals], marker="s", label="eval")
    ax_loss.set_xlabel("step"); ax_loss.set_ylabel("loss"); ax_loss.legend(); ax_loss.set_title(title or "loss")
    ax_lr.plot([h["step"] for h in train], [h["learning_rate"] for h in train], marker=".")
    ax_lr.set_xlabel("step"); ax_lr.set_ylabel("learning rate"); ax_lr.set_title("learning rate")
    fig.tight_layout()
    return _save(fig, path)


def collapse_timeline(records, title: str = "", path=None, compare=None, compare_label: str = "safe precision",
                      rescue=None):
    """Logged vs raw loss, learning rate, loss scale, skipped steps and (in an fp16 run) the early warning's fp16
    headroom on one time axis; a dashed line marks the first warning, a dotted one a rescue.

    records: the monitor's StepRecords of the run; compare: StepRecords of the same run in a safe precision (optional);
    rescue: StepRecords of the same settings run with ``on_collapse="rescue"`` (optional).
    """
    steps = [r.step for r in records]
    watched = any(r.headroom_bits is not None for r in records)
    fig, axes = plt.subplots(5 if watched else 4, 1, figsize=(10, 11 if watched else 9), sharex=True)
    raw = [r.raw_loss if math.isfinite(r.raw_loss) else float("nan") for r in records]
    axes[0].plot(steps, raw, lw=0.8, label="raw step loss (finite only)")
    logged = [(r.step, r.logged_loss) for r in records if r.logged_loss is not None]
    if logged:
        axes[0].plot(*zip(*logged), "o-", label="logged loss (what Trainer prints)")
    bad = [r.step for r in records if not r.finite]
    if bad:
        axes[0].scatter(bad, [0] * len(bad), marker="x", color="red", s=12, label="non-finite step")
    for other, label in ((compare, f"raw loss, {compare_label}"), (rescue, "raw loss, rescued run")):
        if other:
            axes[0].plot([r.step for r in other], [r.raw_loss if math.isfinite(r.raw_loss) else float("nan")
                                                   for r in other], lw=0.8, label=label)
    axes[0].set_ylabel("loss"); axes[0].set_title(title)
    axes[1].plot(steps, [r.learning_rate for r in records], label="fp16 run")
    if compare:
        axes[1].plot([r.step for r in compare], [r.learning_rate for r in compare], label=compare_label)
    axes[1].set_ylabel("learning rate"); axes[1].legend(fontsize=8)
    scales = [(r.step, r.loss_scale) for r in records if r.loss_scale is not None]
    if scales:
        axes[2].semilogy(*zip(*[(s, max(v, 1e-30)) for s, v in scales]))
    axes[2].set_ylabel("loss scale")
    skipped = [int(r.skipped) for r in records]
    axes[3].bar(steps, skipped, width=1.0, color="tab:red")
    axes[3].set_ylabel("step skipped")
    if watched:
        for run, label in ((records, "fp16 run"), (rescue, "rescued run")):
            points = [(r.step, max(r.headroom_bits, -1.0)) for r in run or [] if r.headroom_bits is not None]
            if points:
                axes[4].plot(*zip(*points), lw=0.8, label=label)
        axes[4].axhline(0.0, color="black", lw=0.8)
        axes[4].set_ylabel("fp16 headroom (bits)"); axes[4].legend(fontsize=8)
    warned = next((r.step for r in records if r.warning), None)
    rescued = next((r.step for r in rescue or [] if r.event), None)
    for ax in axes:
        if warned is not None:
            ax.axvline(warned, color="tab:orange", ls="--", lw=0.8, label="early warning" if ax is axes[0] else None)
        if rescued is not None:
            ax.axvline(rescued, color="tab:green", ls=":", lw=1.0, label="rescue" if ax is axes[0] else None)
    axes[0].legend(fontsize=8)
    axes[-1].set_xlabel("optimizer step")
    fig.tight_layout()
    return _save(fig, path)


def headroom(table, top: int = 30, title: str = "fp16 headroom per module", path=None):
    """Bar chart of dtype max / largest |activation| per module (log scale; below 1 means overflow)."""
    import numpy as np

    rows = table.sort_values("headroom").head(top)
    fig, ax = plt.subplots(figsize=(10, max(3, 0.25 * len(rows))))
    values = np.clip(rows["headroom"].to_numpy(dtype=float), 1e-3, 1e12)
    colors = ["tab:red" if v <= 1 or nf else "tab:blue" for v, nf in zip(values, rows["nonfinite"])]
    ax.barh(rows["module"], values, color=colors)
    ax.set_xscale("log"); ax.axvline(1.0, color="black", lw=0.8)
    ax.set_xlabel("headroom = dtype max / max |activation|  (red: overflowed)"); ax.set_title(title)
    ax.invert_yaxis()
    fig.tight_layout()
    return _save(fig, path)


def length_histogram(stats: dict, max_length: int, path=None):
    """Token length histogram per split (from helpers.data.sequence_stats)."""
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for split, s in stats.items():
        ax.hist(s["lengths"], bins=40, alpha=0.6, label=f"{split} (n={s['rows']}, p95={s['p95']:.0f})")
    ax.axvline(max_length, color="red", lw=0.8, label=f"max_length {max_length}")
    ax.set_xlabel("tokens per example"); ax.set_ylabel("examples"); ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def sweep(rows: list[dict], path=None):
    """First collapse step (or none) against max_steps."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    xs = [r["max_steps"] for r in rows]
    ys = [r["first_nonfinite_step"] if r["first_nonfinite_step"] is not None else float("nan") for r in rows]
    ax.plot(xs, ys, "o-", label="first non-finite step")
    for x, y in zip(xs, ys):
        if y != y:
            ax.annotate("none", (x, 0), textcoords="offset points", xytext=(0, 5), ha="center")
    ax.plot(xs, xs, ":", color="grey", label="max_steps")
    ax.set_xlabel("max_steps"); ax.set_ylabel("step"); ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def loss_scales(traces: dict, title: str = "", path=None):
    """The loss scale of each run against the step (log scale); traces: run name -> StepRecords."""
    fig, ax = plt.subplots(figsize=(8, 3))
    for name, records in traces.items():
        scaled = [(r.step, max(r.loss_scale, 1e-8)) for r in records if r.loss_scale is not None]
        if scaled:
            ax.semilogy(*zip(*scaled), label=name)
    ax.set(xlabel="optimizer step", ylabel="loss scale", title=title)
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def metric_bars(metrics, columns: list[str], path=None):
    """One bar chart per metric column, a bar per model (the index of ``metrics``)."""
    fig, axes = plt.subplots(1, len(columns), figsize=(3.2 * len(columns), 3))
    for ax, column in zip(axes, columns):
        metrics[column].plot.bar(ax=ax, title=column, rot=30)
    fig.tight_layout()
    return _save(fig, path)
