"""Does the early warning fire before the collapse, and never in a run that does not collapse?

Trains notebook 04's blog recipe (its defaults: LoRA on all seven projections, lr 1e-2, seed 42) with the collapse
monitor, then writes one row per run into docs/measurements/early_warning.csv, computed from the run's trace:

    python benchmarks/early_warning.py run fp16_lr1e-2_max300                       # notebook 04's defaults
    python benchmarks/early_warning.py run fp32_lr1e-2_max60 --precision fp32 --max-steps 60
    python benchmarks/early_warning.py run fp16_lr1e-4_max300 --learning-rate 1e-4 --stop-after 80
    python benchmarks/early_warning.py table      # rewrite the CSV from every trace under outputs/early_warning/

``table`` re-assesses each trace's recorded headroom with today's :class:`WarningRule`, so a rule can be tuned
without training again; ``run`` also records the warning the monitor gave online, which is the same at the same rule.
fp16 runs use ``on_collapse="stop"`` (they end ~20 steps after the first non-finite loss, as notebook 04's do);
``--stop-after`` ends a run early without changing its LR schedule (which decays over ``--max-steps``).
``--on-collapse rescue`` runs the rescue instead; ``--lora-targets attention`` the blog's own targets; ``--model``
another base (a folder, a .gguf). On a GPU ``fp16`` is real fp16 autocast with the GradScaler.

Columns beyond the obvious: ``lead_steps`` = first_nonfinite_step - warning_step; ``warning_headroom_bits`` and
``min_headroom_bits`` the tightest watched layer's fp16 headroom at the warning and over the run's finite steps;
``nonfinite_after_rescue`` counts non-finite steps after the rescue's step; ``first_raw_loss`` and
``last_raw_loss`` (the mean of the last 5 finite steps) say whether the run learned; ``eval_loss`` the answer-only
loss on the eval split after the run (a collapsed run is measured with its last good adapter, and in real fp16
that can be nan); ``finished`` is false where the run was cut short before its end (its last traced step is
``steps_run``).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.results_csv import append_rows  # noqa: E402
from helpers.diagnostics import detect_collapse, read_trace  # noqa: E402
from helpers.diagnostics.early_warning import WarningRule, first_warning_step  # noqa: E402
from helpers.diagnostics.rescue import StopAfter  # noqa: E402
from helpers.outputs import package_versions, project_root  # noqa: E402
from helpers.precision import device_description, effective_precision  # noqa: E402
from helpers.recipes import named_recipe  # noqa: E402

RUNS = project_root() / "outputs" / "early_warning"
CSV = project_root() / "docs" / "measurements" / "early_warning.csv"
COLUMNS = ["run", "device", "precision", "learning_rate", "lora_targets", "max_steps", "steps_run", "collapsed",
           "warning_step", "first_nonfinite_step", "lead_steps", "warning_layer", "warning_headroom_bits",
           "min_headroom_bits", "rescued_at", "nonfinite_after_rescue", "first_raw_loss", "last_raw_loss", "eval_loss",
           "finished", "date", "versions"]


def run(name: str, precision: str, learning_rate: float, max_steps: int, stop_after: int | None, on_collapse: str,
        model_id: str = "embedded", lora_targets: str = "all"):
    # Imports transformers and torch's training stack: only ``run`` needs it.
    from helpers.data import load_instructions
    from helpers.evaluation import answer_perplexity
    from helpers.training import train

    recipe = named_recipe("blog", max_steps=max_steps, learning_rate=learning_rate, precision=precision,
                          lora_targets=lora_targets, seed=42, logging_steps=10)
    result = train(recipe, model_id=model_id, out_dir=RUNS / name, report_to="none", save_adapter=False,
                   on_collapse=on_collapse if precision.startswith("fp16") else "record",
                   callbacks=[StopAfter(stop_after)] if stop_after else None)
    # The quality a rescue must keep: answer-only loss on the eval split (notebook 05's measure), after the run
    # (a stopped fp16 run is measured with its last good adapter put back).
    dataset, _ = load_instructions("shipped", tokenizer=result.tokenizer, max_length=recipe.max_length, verbose=False)
    eval_loss = math.log(answer_perplexity(result.model, result.tokenizer, list(dataset["eval"])))
    meta = {"precision": result.precision, "learning_rate": learning_rate, "max_steps": max_steps,
            "lora_targets": lora_targets, "device": result.summary["device"], "versions": result.summary["versions"],
            "date": datetime.date.today().isoformat(), "online_warning": result.summary["early_warning"],
            "rescue": result.summary["rescue"], "final_train_loss": result.summary["final_train_loss"],
            "eval_loss": round(eval_loss, 4)}
    (RUNS / name / "benchmark.json").write_text(json.dumps(meta, indent=1, default=str))
    print(json.dumps(row(RUNS / name), indent=1))


def row(folder: Path, rule: WarningRule | None = None) -> dict:
    """The CSV row of one run folder, from its trace and recipe.json (and benchmark.json where the run finished;
    a run ended by hand once its collapse was on record has none: its device and versions are this machine's; one
    ended by a time limit elsewhere gets a benchmark.json by hand, with ``"finished": false``)."""
    recipe = json.loads((folder / "recipe.json").read_text())
    done = folder / "benchmark.json"
    meta = json.loads(done.read_text()) if done.exists() else {
        "precision": effective_precision(recipe["precision"]), "device": device_description(),
        "versions": package_versions(), "date": datetime.date.today().isoformat(), "rescue": None}
    records = read_trace(folder / "trace.jsonl")
    finding = detect_collapse(records)
    warned = first_warning_step(records, rule)
    at = next((r for r in records if r.step == warned), None)
    headrooms = [r.headroom_bits for r in records if r.headroom_bits is not None and r.finite]
    finite = [r.raw_loss for r in records if r.finite]
    first_bad = finding.first_nonfinite_step
    rescued_at = next((r.step for r in records if (r.event or "").startswith("rescue")), None)
    versions = meta["versions"]
    return {"run": folder.name, "device": meta["device"].split(":")[0] + (" (fp16 emulated)" if meta["precision"]
                                                                          == "fp16_emulated" else ""),
            "precision": meta["precision"], "learning_rate": recipe["learning_rate"],
            "lora_targets": recipe["lora_targets"],
            "max_steps": recipe["max_steps"], "steps_run": len(records), "collapsed": finding.collapsed,
            "warning_step": warned, "first_nonfinite_step": first_bad,
            "lead_steps": first_bad - warned if warned is not None and first_bad is not None else None,
            "warning_layer": at.headroom_layer if at else None,
            "warning_headroom_bits": round(at.headroom_bits, 2) if at else None,
            "min_headroom_bits": round(min(headrooms), 2) if headrooms else None,
            "rescued_at": rescued_at, "nonfinite_after_rescue": None if rescued_at is None else sum(
                not r.finite for r in records if r.step > rescued_at),
            # does the run learn? the raw loss of its first step, and the mean of its last 5 finite steps
            "first_raw_loss": round(records[0].raw_loss, 3) if records else None,
            "last_raw_loss": round(sum(finite[-5:]) / len(finite[-5:]), 3) if finite else None,
            "eval_loss": meta.get("eval_loss"), "finished": meta.get("finished", done.exists()),
            "date": meta["date"],
            "versions": " ".join(f"{k} {versions.get(k)}" for k in ("torch", "transformers", "peft"))}


def table():
    """Rewrite the CSV: a row for every trace under outputs/early_warning/, and the rows of earlier runs whose traces
    are not on this machine kept as they are (runs made elsewhere: another session, the GPU)."""
    rows = [row(folder) for folder in sorted(RUNS.iterdir()) if (folder / "trace.jsonl").exists()]
    here = {r["run"] for r in rows}
    kept = []
    if CSV.exists():
        with CSV.open(encoding="utf-8") as handle:
            kept = [r for r in csv.DictReader(handle) if r["run"] not in here]
        CSV.unlink()
    append_rows(CSV, kept + rows, COLUMNS)
    for r in rows:
        print({k: r[k] for k in ("run", "collapsed", "warning_step", "first_nonfinite_step", "lead_steps")})


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("run")
    one.add_argument("name")
    one.add_argument("--precision", default="fp16")
    one.add_argument("--learning-rate", type=float, default=1e-2)
    one.add_argument("--max-steps", type=int, default=300)
    one.add_argument("--stop-after", type=int, default=None)
    one.add_argument("--on-collapse", default="stop", help="stop | rescue | record (fp16 runs)")
    one.add_argument("--model", default="embedded", help="model id, folder or .gguf (helpers.models.load_model)")
    one.add_argument("--lora-targets", default="all", help="attention | all | comma-separated names")
    sub.add_parser("table")
    args = parser.parse_args()
    if args.command == "run":
        run(args.name, args.precision, args.learning_rate, args.max_steps, args.stop_after, args.on_collapse,
            args.model, args.lora_targets)
    else:
        table()


if __name__ == "__main__":
    main()
