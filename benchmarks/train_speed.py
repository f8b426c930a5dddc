"""How fast each recipe trains, and what it costs in memory and in loss: the blog recipe, the fast recipe and the
fast recipe without one technique at a time, on the same model and data.

Every configuration runs in its own process, one after another (timings never share the GPU), and appends one CSV
row to ``benchmarks/results/train_speed.csv``:

    python -m benchmarks.train_speed all --shape gemma-3-270m --model embedded --weights real
    python -m benchmarks.train_speed all --shape polyglot-ko-12.8b --model outputs/real_shapes/work/polyglot-ko-12.8b \\
        --weights random --train-tokens 8000 --tokens-per-step 16384 --memory-budget-gib 22
    (build that folder first, random weights: python -m benchmarks.real_shapes build polyglot-ko-12.8b)

The data is the shipped split (~60k tokens), on which the fast recipe's floor of 60 steps an epoch makes its step
~1,000 tokens; ``--tokens-per-step 16384`` measures the step a user's larger data gets.

Rows (``--rows``, default all): ``blog`` (blog_recipe), ``baseline`` (answer-only labels, bf16, batch 2, no packing:
fixed_recipe(batch_size=2)), ``fast`` (fast_recipe), then fast minus one technique: ``fast-no-packing`` (padded
batches grouped by length), ``fast-small-steps`` (batch 2 instead of 16,384 tokens a step), ``fast-fused-adamw``
(fused instead of plain AdamW), ``fast-unchunked-loss`` (every labelled logit at once), ``fast-all-logits`` (the
model's own loss over every position), ``fast-fp32`` (no bf16), ``fast-checkpointing`` (always on),
``fast-compile`` (with torch.compile, which the fast recipe leaves off), ``fast-bf16-weights`` (no 4-bit
quantization) and ``fast-fp32-unquantized`` (peft's fp32 norms and embeddings, and with them an fp32 residual
stream, instead of the fast recipe's bf16 ones). Rows are named after what they changed in the fast recipe of their
day (the settings columns say what ran): on 2026-12-02 it had fused AdamW and no compile (``fast-adamw`` ran plain
AdamW, ``fast-compile`` fused AdamW compiled); on 2026-12-07 it compiled on a GPU (``fast-no-compile`` did not),
and later that day it kept fp32 norms and embeddings (``fast-bf16-unquantized`` kept bf16 ones, as it now does);
until that night, where a step needed checkpointing, the fast rows had it (``fast`` now accumulates micro-batches
instead, where they keep 4,096 tokens or more; ``fast-checkpointing`` is the old way; see gradient_accumulation).
``--tokens-per-step`` replaces the fast rows' step size and turns off their floor of 60 steps an epoch, so a row
measures exactly the step it names.

What each column measures:

- tokens_per_s: real (not padding) training tokens over the wall time of the steps after ``--warmup-steps``, with a
  device synchronisation at both ends; the evaluation pause is left out. LabTrainer counts the tokens on the host
  (transformers' ``include_num_input_tokens_seen="non_padding"`` exists in 5.23 but reads a device value every
  step, and counts a packed batch's padding run). seconds_per_step over the same steps.
- peak_gib: ``torch.cuda.max_memory_allocated`` over training (the evaluation is left out); estimated_peak_gib:
  helpers.memory's estimate for the run's largest likely micro-batch.
- mfu: model FLOPs per second over the bf16 peak measured in the same process (the mean of 10 products of two
  8192 x 8192 bf16 matrices after 3 warm-ups; on a CPU 1024 x 1024 in fp32, the CPU's training dtype). FLOPs per
  real token: 2N forward + 2N backward (LoRA freezes the base weights: gradients of the inputs only, not of the
  weights) + 2N when gradient checkpointing recomputes the forward, with N every weight a token is multiplied by:
  the decoder's projections and the output layer (not the embedding lookup; LoRA's own rank-8 products omitted).
  The attention's quadratic term (4 x length x heads x head_dim a token and layer) is omitted, and a recipe that
  computes the output layer at labelled positions only is credited with it at every position: the same count for
  every row, so mfu ranks the rows as tokens/s does, up to the recompute.
- eval_loss: the answer-only loss on the eval split (ln of helpers.evaluation.answer_perplexity) when the run has
  seen ``--train-tokens`` real training tokens (eval_at_tokens: the count at that step), the same measurement for
  every row. A row that needs more steps to be timed goes on training after it; its learning-rate schedule spans
  all its steps. With random weights (``--weights random``) the loss says little.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from transformers import TrainerCallback

from benchmarks.results_csv import append_rows

RESULTS = Path("benchmarks/results/train_speed.csv")
ROWS = ("blog", "baseline", "fast", "fast-no-packing", "fast-small-steps", "fast-fused-adamw", "fast-unchunked-loss",
        "fast-all-logits", "fast-fp32", "fast-checkpointing", "fast-compile", "fast-bf16-weights",
        "fast-fp32-unquantized")
SETTINGS = ["tokens_per_step", "batch_size", "packing", "gradient_checkpointing", "optimizer", "loss_chunk_rows",
            "labelled_logits_only", "precision", "quantization", "torch_compile", "labels", "learning_rate",
            "memory_budget_gib", "fp32_unquantized"]
COLUMNS = ["date", "gpu", "model_shape", "weights", "recipe", "tokens_per_s", "seconds_per_step", "peak_gib",
           "estimated_peak_gib", "mfu", "eval_loss", "eval_at_tokens", "torch", "transformers", "peft", "bitsandbytes",
           *SETTINGS[:-1], "attn_implementation", "timed_steps", "steps", "train_tokens", "flops_per_token",
           "peak_tflops", SETTINGS[-1], "gradient_accumulation"]  # the last two came later (2026-12-07)


def row_recipe(row: str, **overrides):
    """The recipe of a benchmark row (see the module docstring)."""
    from helpers.recipes import blog_recipe, fast_recipe, fixed_recipe

    if row == "blog":
        return blog_recipe(**overrides)
    if row == "baseline":
        return fixed_recipe(batch_size=2, **overrides)
    without = {"fast": {}, "fast-no-packing": {"packing": False, "group_by_length": True},
               "fast-small-steps": {"tokens_per_step": 0, "batch_size": 2},
               "fast-fused-adamw": {"optimizer": "adamw_torch_fused"}, "fast-unchunked-loss": {"loss_chunk_rows": 0},
               "fast-all-logits": {"labelled_logits_only": False, "loss_chunk_rows": 0},
               "fast-fp32": {"precision": "fp32"}, "fast-checkpointing": {"gradient_checkpointing": True},
               "fast-compile": {"torch_compile": True}, "fast-bf16-weights": {"quantization": "none"},
               "fast-fp32-unquantized": {"fp32_unquantized": True}}[row]
    return fast_recipe(**{**without, **overrides})


def matmul_peak_flops(size: int | None = None, repeats: int = 10, warmups: int = 3) -> float:
    """FLOP/s of a square matrix product, the mean of ``repeats`` after ``warmups``: bf16 8192 on a GPU, fp32 1024
    on a CPU (the dtype it trains in)."""
    cuda = torch.cuda.is_available()
    size = size or (8192 if cuda else 1024)
    dtype, device = (torch.bfloat16, "cuda") if cuda else (torch.float32, "cpu")
    a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
    for _ in range(warmups):
        a @ b
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if cuda:
        torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - started)


def _synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepClock(TrainerCallback):
    """Times the steps after ``warmup_steps`` (wall clock, real tokens from TrainerState.num_input_tokens_seen,
    which LabTrainer keeps) and evaluates once when ``eval_tokens`` real tokens have been trained, outside the
    timing and the training's peak memory; with ``mid_run=False`` only after the last step."""

    def __init__(self, warmup_steps: int, eval_tokens: int, evaluate, mid_run: bool = True):
        self.warmup_steps, self.eval_tokens, self.evaluate = warmup_steps, eval_tokens, evaluate
        self.mid_run = mid_run
        self.start = self.end = None  # (seconds, seconds paused for the evaluation so far, tokens, step)
        self.paused = 0.0
        self.eval_loss = self.eval_at_tokens = None
        self.training_peak = 0

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.warmup_steps:
            _synchronize()
            self.start = (time.perf_counter(), self.paused, state.num_input_tokens_seen, state.global_step)
        if self.eval_loss is None and ((self.mid_run and state.num_input_tokens_seen >= self.eval_tokens)
                                       or state.global_step >= state.max_steps):
            _synchronize()
            paused = time.perf_counter()
            self.run_evaluation(kwargs["model"], state.num_input_tokens_seen)
            self.paused += time.perf_counter() - paused
        if state.global_step >= state.max_steps:
            _synchronize()
            self.end = (time.perf_counter(), self.paused, state.num_input_tokens_seen, state.global_step)

    def run_evaluation(self, model, tokens: int):
        if torch.cuda.is_available():
            self.training_peak = max(self.training_peak, torch.cuda.max_memory_allocated())
        self.eval_loss, self.eval_at_tokens = self.evaluate(model), tokens
        model.train()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def timed(self) -> dict:
        if self.start is None or self.end is None or self.end[3] <= self.start[3]:
            raise RuntimeError("no step was timed: the run needs more steps than --warmup-steps")
        (started, paused, tokens, step), (ended, end_paused, end_tokens, end_step) = self.start, self.end
        seconds = ended - started - (end_paused - paused)
        return {"tokens_per_s": (end_tokens - tokens) / seconds, "seconds_per_step": seconds / (end_step - step),
                "timed_steps": end_step - step}


def measure_one(row: str, shape: str, model_id: str, weights: str, train_tokens: int, warmup_steps: int,
                timed_steps: int, attn: str | None, work: Path, tokens_per_step: int | None = None,
                memory_budget_gib: float | None = None) -> dict:
    """One row in this process: train, time, evaluate; the CSV row as a dict."""
    from helpers.data import load_instructions, prepare_tokenizer, tokenize_dataset
    from helpers.evaluation import answer_perplexity
    from helpers.memory import ModelShape, epoch_capped_tokens
    from helpers.models import load_model
    from helpers.outputs import package_versions
    from helpers.precision import device_description, plan_precision
    from helpers.training import train

    peak_flops = matmul_peak_flops()
    recipe = row_recipe(row)
    if tokens_per_step and recipe.tokens_per_step:
        recipe = replace(recipe, tokens_per_step=tokens_per_step, min_steps_per_epoch=0)
    if memory_budget_gib:
        recipe = replace(recipe, memory_budget_gib=memory_budget_gib)
    plan = plan_precision(recipe.precision, recipe.compute_dtype, recipe.quantization)
    model, tokenizer = load_model(model_id, quantization=recipe.quantization, precision=plan.load_precision,
                                  attn_implementation=attn, verbose=False)
    # Steps enough to reach train_tokens, and to time timed_steps after the warm-up: the planned step size is
    # only known inside train(), so count with the recipe's own (a budget that lowers it leaves eval_at_tokens
    # short of train_tokens, and says so).
    prepare_tokenizer(tokenizer, recipe.labels)
    dataset, _ = load_instructions("shipped", tokenizer=tokenizer, max_length=recipe.max_length, verbose=False)
    lengths = [len(ids) for ids in tokenize_dataset(dataset["train"], tokenizer, recipe.labels, recipe.template,
                                                    recipe.max_length)["input_ids"]]
    per_step = recipe.batch_size * recipe.gradient_accumulation * statistics.fmean(lengths)
    if recipe.tokens_per_step:
        per_step = epoch_capped_tokens(recipe.tokens_per_step, lengths, recipe.min_steps_per_epoch)
    steps = max(warmup_steps + timed_steps, math.ceil(1.1 * train_tokens / per_step) + 1)  # steps vary in size
    recipe = replace(recipe, max_steps=steps, logging_steps=max(10, steps // 10), save_steps=0, eval_steps=0)

    eval_rows = list(dataset["eval"])

    def evaluate(model) -> float:
        return math.log(answer_perplexity(model, tokenizer, eval_rows))

    # On a CPU, bitsandbytes repacks 4-bit weights for inference at their first eval-mode forward, and a training
    # step after that fails ("a view of a leaf Variable ... in-place"): there the evaluation waits for the end.
    clock = StepClock(warmup_steps, train_tokens, evaluate,
                      mid_run=torch.cuda.is_available() or recipe.quantization == "none")
    run = train(recipe, model=model, tokenizer=tokenizer, model_id=model_id, data="shipped",
                out_dir=work / f"{shape}-{row}", report_to="none", save_adapter=False, verbose=False,
                callbacks=[clock])
    card, timing = run.summary, clock.timed()
    n = ModelShape.from_config(run.model.config).matmul_weights()
    flops_per_token = (4 + 2 * bool(run.recipe.gradient_checkpointing)) * n
    peak = max(clock.training_peak, torch.cuda.max_memory_allocated()) / 2**30 if torch.cuda.is_available() else None
    versions = package_versions()
    settings = {name: getattr(run.recipe, name) for name in SETTINGS if name != "optimizer"}
    return {
        "date": time.strftime("%Y-%m-%d"), "gpu": device_description(), "model_shape": shape, "weights": weights,
        "recipe": row, "tokens_per_s": round(timing["tokens_per_s"], 1),
        "seconds_per_step": round(timing["seconds_per_step"], 4), "peak_gib": round(peak, 3) if peak else "",
        "estimated_peak_gib": card["memory_estimate"]["total_gib"],
        "mfu": round(timing["tokens_per_s"] * flops_per_token / peak_flops, 4),
        "eval_loss": round(clock.eval_loss, 4), "eval_at_tokens": clock.eval_at_tokens,
        **{name: versions.get(name, "") for name in ("torch", "transformers", "peft", "bitsandbytes")},
        **settings, "tokens_per_step": card["step_plan"]["tokens_per_step"], "optimizer": card["optimizer"],
        "precision": run.precision, "attn_implementation": card["attn_implementation"],
        "gradient_accumulation": run.recipe.gradient_accumulation,
        "timed_steps": timing["timed_steps"], "steps": card["global_step"], "train_tokens": train_tokens,
        "flops_per_token": flops_per_token, "peak_tflops": round(peak_flops / 1e12, 4)}


def run_all(rows, shape: str, model_id: str, weights: str, train_tokens: int, warmup_steps: int, timed_steps: int,
            attn: str | None, results: Path, work: Path, tokens_per_step: int | None = None,
            memory_budget_gib: float | None = None) -> list[dict]:
    """Each row in its own process, one after another; each finished row appended to ``results`` at once."""
    work.mkdir(parents=True, exist_ok=True)
    measured = []
    for row in rows:
        part = work / f"{shape}.{row}.json"
        part.unlink(missing_ok=True)
        command = [sys.executable, "-m", "benchmarks.train_speed", "one", "--row", row, "--shape", shape,
                   "--model", model_id, "--weights", weights, "--train-tokens", str(train_tokens),
                   "--warmup-steps", str(warmup_steps), "--timed-steps", str(timed_steps), "--work", str(work),
                   "--result", str(part)] + (["--attn", attn] if attn else []) + \
            (["--tokens-per-step", str(tokens_per_step)] if tokens_per_step else []) + \
            (["--memory-budget-gib", str(memory_budget_gib)] if memory_budget_gib else [])
        print(f"== {shape} {row}", flush=True)
        started = time.time()
        done = subprocess.run(command)
        if done.returncode != 0 or not part.exists():
            print(f"{shape} {row}: failed with exit code {done.returncode}", flush=True)
            continue
        result = json.loads(part.read_text())
        append_rows(results, [result], COLUMNS)
        measured.append(result)
        print(f"{shape} {row}: {result['tokens_per_s']} tokens/s, {result['seconds_per_step']} s/step, peak "
              f"{result['peak_gib']} GiB (estimated {result['estimated_peak_gib']}), mfu {result['mfu']}, eval loss "
              f"{result['eval_loss']} ({time.time() - started:.0f} s)", flush=True)
    return measured


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("step", choices=("all", "one"))
    parser.add_argument("--shape", required=True, help="the model_shape column (gemma-3-270m, polyglot-ko-12.8b, ...)")
    parser.add_argument("--model", default="embedded", help="model id, folder or .gguf (helpers.models.load_model)")
    parser.add_argument("--weights", default="real", help="the weights column: real or random")
    parser.add_argument("--rows", default=",".join(ROWS), help="(all) comma-separated rows, in order")
    parser.add_argument("--row", choices=ROWS, help="(one) the row to measure")
    parser.add_argument("--train-tokens", type=int, default=60000,
                        help="real training tokens before the eval loss (the shipped train split: ~60k)")
    parser.add_argument("--warmup-steps", type=int, default=3, help="steps left out of the timing")
    parser.add_argument("--timed-steps", type=int, default=10, help="at least this many steps timed")
    parser.add_argument("--attn", help="attention implementation (default: the loader's choice per architecture)")
    parser.add_argument("--tokens-per-step", type=int, help="instead of the fast rows' 16,384 tokens a step")
    parser.add_argument("--memory-budget-gib", type=float, help="the recipes' memory budget (default: 85%% of the GPU)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="(all) the CSV the rows are appended to")
    parser.add_argument("--work", type=Path, default=Path("outputs/train_speed"), help="run folders, per-process JSON")
    parser.add_argument("--result", type=Path, help="(one) where to write its JSON")
    args = parser.parse_args(argv)
    if args.step == "one":
        result = measure_one(args.row, args.shape, args.model, args.weights, args.train_tokens, args.warmup_steps,
                             args.timed_steps, args.attn, args.work, args.tokens_per_step, args.memory_budget_gib)
        args.result.write_text(json.dumps(result, default=str))
        return 0
    rows = [row.strip() for row in args.rows.split(",") if row.strip()]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    measured = run_all(rows, args.shape, args.model, args.weights, args.train_tokens, args.warmup_steps,
                       args.timed_steps, args.attn, args.results, args.work, args.tokens_per_step,
                       args.memory_budget_gib)
    return 0 if len(measured) == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
