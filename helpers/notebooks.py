"""Run the notebook series with papermill (the main job), prepare parameterized copies for nbval, and sweep.

    python -m helpers.notebooks run [NAMES...] [-p KEY VALUE ...]   # executed notebooks go to outputs/<name>/
    python -m helpers.notebooks prepare --params tests/notebook_params.json --into outputs/nbval
    python -m helpers.notebooks sweep --max-steps 500 600 1000 2000 5000
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from helpers.outputs import output_dir, project_root

SERIES = ["01_inference", "02_qlora_smoke", "03_full_train", "04_loss_collapse_investigation", "05_inference_eval"]
# The main job: each notebook at its defaults, plus notebook 03 a second time with the blog recipe on the same
# steps and data, so that notebook 05 can compare the two adapters.
MAIN_JOB = [
    ("01_inference", {}, None),
    ("02_qlora_smoke", {}, None),
    ("03_full_train", {}, "03_full_train_fixed"),
    # The blog recipe (its own labels, precision and learning rate) on the same steps and batch size; no eval loss
    # (its labels score the prompt too, so it compares with nothing; notebook 05 measures both adapters alike).
    # Grouped by length and without checkpointing as the fixed run is: both then train on the same batches.
    ("03_full_train", {"recipe_name": "blog", "eval_steps": 0, "output_dir": "outputs/03_full_train/blog",
                       "recipe_overrides": {"group_by_length": True, "gradient_checkpointing": False}},
     "03_full_train_blog"),
    ("04_loss_collapse_investigation", {}, None),
    ("05_inference_eval", {}, None),
]
SWEEP_NOTEBOOK = "04_loss_collapse_investigation"


def notebook_path(name: str) -> Path:
    return project_root() / "notebooks" / f"{name}.ipynb"


def available(names=None) -> list[str]:
    return [n for n in (names or SERIES) if notebook_path(n).exists()]


def run_notebook(name: str, parameters: dict | None = None, out_name: str | None = None) -> Path:
    """Execute one notebook with papermill into outputs/<name>/<out_name>.ipynb; return that path."""
    import papermill

    out = output_dir(f"outputs/{name}") / f"{out_name or name}.ipynb"
    papermill.execute_notebook(str(notebook_path(name)), str(out), parameters=parameters or {},
                               cwd=str(project_root() / "notebooks"), progress_bar=True, kernel_name="python3")
    return out


def prepare(params_file: str, into: str) -> list[Path]:
    """Write copies of the notebooks with the test parameters injected (not executed), for nbval."""
    import papermill

    params = json.loads(Path(params_file).read_text(encoding="utf-8"))
    folder = output_dir(into)
    written = []
    for name in available():
        target = folder / f"{name}.ipynb"
        papermill.execute_notebook(str(notebook_path(name)), str(target), parameters=params.get(name, {}),
                                   prepare_only=True, kernel_name="python3")
        written.append(target)
    return written


def sweep(max_steps: list[int], extra: dict | None = None) -> list[dict]:
    """Run notebook 04 once per max_steps value and draw first collapse step against max_steps."""
    import pandas as pd

    from helpers import plots

    rows = []
    for steps in max_steps:
        tag = f"sweep_max_steps_{steps}"
        out_dir = f"outputs/{SWEEP_NOTEBOOK}/{tag}"
        started = time.time()
        run_notebook(SWEEP_NOTEBOOK, {**(extra or {}), "max_steps": steps, "output_dir": out_dir,
                                      "compare_safe": False}, out_name=tag)
        summary = json.loads((project_root() / out_dir / "summary.json").read_text(encoding="utf-8"))
        fp16 = summary["runs"]["blog"]
        rows.append({"max_steps": steps, "steps_run": fp16["global_step"],
                     "first_nonfinite_step": fp16["collapse"]["first_nonfinite_step"],
                     "collapsed": fp16["collapse"]["collapsed"], "stopped_early": fp16["stopped_at"] is not None,
                     "final_learning_rate": fp16["final_learning_rate"], "minutes": round((time.time() - started) / 60, 1)})
        print(rows[-1], flush=True)
    folder = output_dir(f"outputs/{SWEEP_NOTEBOOK}")
    table = pd.DataFrame(rows)
    table.to_csv(folder / "sweep.csv", index=False)
    plots.sweep(rows, path=folder / "sweep.png")
    print(table.to_string(index=False))
    return rows


def _parameters(pairs) -> dict:
    import yaml

    return {key: yaml.safe_load(value) for key, value in pairs or []}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers.notebooks")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute the series (or the named notebooks) into outputs/")
    run.add_argument("names", nargs="*")
    run.add_argument("-p", "--parameter", nargs=2, action="append", metavar=("KEY", "VALUE"),
                     help="papermill parameter for every notebook run")
    prep = sub.add_parser("prepare", help="parameterized, unexecuted copies for nbval")
    prep.add_argument("--params", required=True)
    prep.add_argument("--into", required=True)
    sw = sub.add_parser("sweep", help="notebook 04 over several max_steps values")
    sw.add_argument("--max-steps", type=int, nargs="+", default=[500, 600, 1000, 2000, 5000])
    sw.add_argument("-p", "--parameter", nargs=2, action="append", metavar=("KEY", "VALUE"))
    args = parser.parse_args(argv)
    if args.command == "run":
        jobs = [job for job in MAIN_JOB if job[0] in available(args.names)]
        started_all = time.time()
        for name, params, out_name in jobs:
            started = time.time()
            print(f"== {out_name or name}", flush=True)
            out = run_notebook(name, {**params, **_parameters(args.parameter)}, out_name)
            print(f"== {out_name or name}: {out} ({(time.time() - started) / 60:.1f} min)", flush=True)
        print(f"== series done in {(time.time() - started_all) / 60:.1f} min", flush=True)
    elif args.command == "prepare":
        for path in prepare(args.params, args.into):
            print(path)
    else:
        sweep(args.max_steps, _parameters(args.parameter))
    return 0


if __name__ == "__main__":
    sys.exit(main())
