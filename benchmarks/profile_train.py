"""Where a training step's time goes: torch.profiler around a few steps of ``train()`` (GPU or CPU).

    python -m benchmarks.profile_train MODEL_FOLDER [--batch-size 16] [--quantization none] [--out outputs/profile]
    python -m benchmarks.profile_train MODEL_FOLDER --recipe fast [--memory-budget-gib 22] [--tokens-per-step 16384]

Runs ``fixed_recipe`` (batch ``--batch-size``, no checkpointing) or ``fast_recipe`` (as notebook 03 trains on a GPU:
its own step size and checkpointing; ``torch_compile`` as the recipe has it) on MODEL_FOLDER with the shipped data,
profiles optimizer steps 10-14 (after warm-up), and writes the top operators by self CPU time and by device time,
with the step time, to ``--out``. A model built with
random weights from a public config profiles the same as the real one: the arithmetic does not depend on the values.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import TrainerCallback

from helpers.outputs import package_versions
from helpers.precision import device_description
from helpers.recipes import fast_recipe, fixed_recipe
from helpers.training import train

FIRST_PROFILED_STEP, PROFILED_STEPS = 10, 5


class ProfileSteps(TrainerCallback):
    """Starts the profiler at the beginning of one step and stops it at the end of a later one."""

    def __init__(self):
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self.profiler = profile(activities=activities)
        self.started_at = self.wall = None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == FIRST_PROFILED_STEP:
            self.profiler.__enter__()
            self.started_at = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == FIRST_PROFILED_STEP + PROFILED_STEPS and self.started_at is not None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.wall = time.perf_counter() - self.started_at
            self.profiler.__exit__(None, None, None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="model folder (or 'embedded')")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--quantization", default="none", choices=("none", "4bit", "8bit"))
    parser.add_argument("--recipe", default="fixed", choices=("fixed", "fast"))
    parser.add_argument("--memory-budget-gib", type=float, default=0.0, help="(fast) the recipe's memory budget")
    parser.add_argument("--tokens-per-step", type=int, default=0,
                        help="(fast) this step instead of the shipped data's floor of 60 steps an epoch (~1,000 tokens)")
    parser.add_argument("--fp32-unquantized", action="store_true",
                        help="(fast, 4/8-bit, bf16) peft's fp32 norms and embeddings, not the fast recipe's bf16 ones")
    parser.add_argument("--out", type=Path, default=Path("outputs/profile"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    probe = ProfileSteps()
    steps = FIRST_PROFILED_STEP + PROFILED_STEPS + 1
    if args.recipe == "fast":
        step = {"tokens_per_step": args.tokens_per_step, "min_steps_per_epoch": 0} if args.tokens_per_step else {}
        recipe = fast_recipe(max_steps=steps, quantization=args.quantization, memory_budget_gib=args.memory_budget_gib,
                             logging_steps=5, fp32_unquantized=args.fp32_unquantized, **step)
    else:
        recipe = fixed_recipe(max_steps=steps, batch_size=args.batch_size, quantization=args.quantization,
                              gradient_checkpointing=False, logging_steps=5)
    run = train(recipe, model_id=args.model, out_dir=args.out / "run", report_to="none", callbacks=[probe],
                save_adapter=False, verbose=False)
    device_column = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    averages = probe.profiler.key_averages()
    plan = run.summary["step_plan"]
    tag = (f"fast_{plan['tokens_per_step']}tok_{args.quantization}" if args.recipe == "fast"
           else f"bs{args.batch_size}_{args.quantization}") + ("_fp32_unquantized" if args.fp32_unquantized else "")
    (args.out / f"ops_by_cpu_{tag}.txt").write_text(averages.table(sort_by="self_cpu_time_total", row_limit=30))
    (args.out / f"ops_by_device_{tag}.txt").write_text(averages.table(sort_by=device_column, row_limit=30))
    summary = {"recipe": args.recipe, "batch_size": run.recipe.batch_size, "tokens_per_step": plan["tokens_per_step"],
               "gradient_checkpointing": run.recipe.gradient_checkpointing, "torch_compile": run.recipe.torch_compile,
               "quantization": args.quantization, "fp32_unquantized": run.recipe.fp32_unquantized,
               "profiled_steps": PROFILED_STEPS,
               "seconds_per_profiled_step": round(probe.wall / PROFILED_STEPS, 4) if probe.wall else None,
               "run_seconds_per_step": run.summary["seconds_per_step"], "device": device_description(),
               "versions": package_versions(), "date": time.strftime("%Y-%m-%d")}
    (args.out / f"summary_{tag}.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
