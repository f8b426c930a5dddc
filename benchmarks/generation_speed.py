"""How fast an answer comes: the blog's way against plain ``generate`` and a static KV cache compiled into CUDA graphs.

Every configuration runs in its own process, one after another (timings never share the GPU), and appends one CSV
row per batch size to ``benchmarks/results/generation_speed.csv``:

    python -m benchmarks.generation_speed all --shape gemma-3-270m --model embedded
    python -m benchmarks.generation_speed all --shape polyglot-ko-12.8b \
        --model outputs/real_shapes/work/polyglot-ko-12.8b --weights random
    (build that folder first, random weights: python -m benchmarks.real_shapes build polyglot-ko-12.8b)

  blog      the blog's way: the base in 4-bit NF4 with the LoRA adapter unmerged, answered through a
            transformers ``pipeline("text-generation")``
  generate  the baseline: the adapter merged into a bf16 copy, plain ``model.generate`` (a dynamic KV cache)
  static    the same merged bf16 model with ``cache_implementation="static"``: on a GPU transformers then compiles
            the decoding step with ``torch.compile(mode="reduce-overhead")`` (CUDA graphs), so one step costs one
            graph launch instead of hundreds of kernel launches from Python

Every answer is forced to exactly ``--new-tokens`` tokens (EOS is suppressed until then) and decoded greedily, so the
methods do the same work. The adapter is a fresh LoRA (r 8 on the attention projections, as the fixed recipe); its
values do not change the work. ``matches_generate`` is the share of answers whose text equals plain ``generate``'s
(the blog's 4-bit weights answer differently by design), ``identical_prefix_tokens`` the mean number of leading
tokens they share.

Beside each row stands the bandwidth floor: every decoding step reads all weights once, so a step cannot take less
than weight bytes / copy bandwidth, with the copy bandwidth measured in the same process (bytes read + written).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.results_csv import append_rows

METHODS = ("generate", "static", "blog")
RESULTS = Path("benchmarks/results/generation_speed.csv")
COLUMNS = ["date", "gpu", "model_shape", "weights", "method", "batch", "new_tokens", "seconds", "tokens_per_s",
           "bandwidth_floor_s", "weight_gb", "copy_tb_per_s", "matches_generate", "identical_prefix_tokens", "torch",
           "transformers", "peft", "bitsandbytes"]


def copy_bandwidth(gigabytes: float = 2.0) -> float:
    """Bytes per second of a device-to-device copy, counting bytes read and written (the mean of 10 after 3)."""
    if not torch.cuda.is_available():
        return float("nan")
    source = torch.empty(int(gigabytes * 1e9), dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        target.copy_(source)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000 / 10
    del source, target
    torch.cuda.empty_cache()
    return 2 * gigabytes * 1e9 / seconds


def weight_bytes(model) -> int:
    """Bytes of every parameter and buffer (4-bit weights count their packed bytes and quantization state)."""
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def fresh_adapter(model):
    """A LoRA adapter as the fixed recipe trains it (r 8, alpha 32, attention projections)."""
    from peft import LoraConfig, get_peft_model

    from helpers.models.lora import lora_targets

    config = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                        target_modules=lora_targets(model, "attention"))
    return get_peft_model(model, config)


def load_for(method: str, model_id: str):
    """The model as the method answers with it: 4-bit base + unmerged adapter (blog), else merged into bf16."""
    from helpers.models import load_model

    if method == "blog":  # the blog computes in fp16 on top of its 4-bit weights
        model, tokenizer = load_model(model_id, quantization="4bit", precision="fp16", verbose=False)
        return fresh_adapter(model).eval(), tokenizer
    model, tokenizer = load_model(model_id, quantization="none", precision="auto", verbose=False)
    return fresh_adapter(model).merge_and_unload().eval(), tokenizer


def prompts(tokenizer, batch: int) -> list[str]:
    from helpers.data import format_prompt, load_instructions

    rows = list(load_instructions("shipped", verbose=False)[0]["eval"])
    picked = [rows[i % len(rows)] for i in range(batch)]
    return [format_prompt(row["instruction"], row.get("context", "")) for row in picked]


def answers(method: str, model, tokenizer, texts: list[str], new_tokens: int) -> list[str]:
    """The text of each answer, exactly ``new_tokens`` tokens long."""
    forced = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    tokenizer.padding_side = "left"  # a batch of prompts ends together, where the answers start
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if method == "blog":
        from transformers import pipeline

        generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
        outputs = generator(texts, batch_size=len(texts), return_full_text=False, **forced)
        return [o[0]["generated_text"] for o in outputs]
    inputs = tokenizer(texts, return_tensors="pt", padding=True).to(model.device)
    extra = {"cache_implementation": "static"} if method == "static" else {}
    output = model.generate(**inputs, **forced, **extra)
    return tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def timed(method, model, tokenizer, texts, new_tokens, repeats):
    """(median seconds, the answers of the last run) after one warm-up run: a full one for the static cache (its
    compilation and CUDA graphs are made for this cache length), a short one (kernels loaded) for the others."""
    answers(method, model, tokenizer, texts, new_tokens if method == "static" else min(new_tokens, 8))
    seconds = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        texts_out = answers(method, model, tokenizer, texts, new_tokens)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), texts_out


def measure_one(method: str, shape: str, model_id: str, batches: list[int], new_tokens: int, repeats: int,
                weights: str) -> list[dict]:
    """One method in this process: a row per batch size, with the plain answers kept to compare against."""
    from helpers.precision import device_description
    from helpers.outputs import package_versions

    torch.manual_seed(0)  # the fresh adapter is the same in every process
    model, tokenizer = load_for(method, model_id)
    bandwidth = copy_bandwidth()
    weight = weight_bytes(model)
    versions = package_versions()
    rows = []
    for batch in batches:
        seconds, texts = timed(method, model, tokenizer, prompts(tokenizer, batch), new_tokens, repeats)
        rows.append({
            "date": time.strftime("%Y-%m-%d"), "gpu": device_description(), "model_shape": shape, "weights": weights,
            "method": method, "batch": batch, "new_tokens": new_tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(batch * new_tokens / seconds, 1),
            "bandwidth_floor_s": round(new_tokens * weight / bandwidth, 3) if bandwidth == bandwidth else "",
            "weight_gb": round(weight / 1e9, 3),
            "copy_tb_per_s": round(bandwidth / 1e12, 2) if bandwidth == bandwidth else "",
            **{name: versions.get(name, "") for name in ("torch", "transformers", "peft", "bitsandbytes")},
            "answers": texts})
    return rows


def run_all(shape: str, model_id: str, methods, batches, new_tokens: int, repeats: int, weights: str,
            results: Path, work: Path) -> list[dict]:
    """Each method in its own process; rows appended to ``results`` with the share matching plain generate."""
    work.mkdir(parents=True, exist_ok=True)
    measured = {}
    for method in methods:
        part = work / f"{shape}.{method}.json"
        part.unlink(missing_ok=True)
        command = [sys.executable, "-m", "benchmarks.generation_speed", "one", "--method", method, "--shape", shape,
                   "--model", model_id, "--batches", *map(str, batches), "--new-tokens", str(new_tokens),
                   "--repeats", str(repeats), "--weights", weights, "--result", str(part)]
        print(f"== {shape} {method}", flush=True)
        done = subprocess.run(command)
        if done.returncode != 0 or not part.exists():
            print(f"{shape} {method}: failed with exit code {done.returncode}", flush=True)
            continue
        measured[method] = json.loads(part.read_text())
    reference = {row["batch"]: row["answers"] for row in measured.get("generate", [])}
    tokenizer = None
    rows = []
    for method_rows in measured.values():
        for row in method_rows:
            plain = reference.get(row["batch"])
            texts = row.pop("answers")
            row["matches_generate"] = "" if plain is None else round(
                sum(a == b for a, b in zip(texts, plain)) / len(plain), 3)
            if plain is not None:
                tokenizer = tokenizer or _tokenizer(model_id)
                row["identical_prefix_tokens"] = round(statistics.mean(
                    _identical_prefix(tokenizer, a, b) for a, b in zip(texts, plain)), 1)
            rows.append(row)
    append_rows(results, rows, COLUMNS)
    return rows


def _tokenizer(model_id: str):
    from helpers.models import load_tokenizer

    return load_tokenizer(model_id, verbose=False)


def _identical_prefix(tokenizer, answer: str, plain: str) -> int:
    """How many leading tokens of ``answer`` equal plain generate's (both re-tokenized with the same tokenizer).
    Greedy decoding in bf16 follows the first near-tie that two kernels round differently onto another path, so
    whole-answer equality says little past the point where the answer would have ended; the prefix says where."""
    ours, theirs = tokenizer(answer)["input_ids"], tokenizer(plain)["input_ids"]
    same = 0
    for a, b in zip(ours, theirs):
        if a != b:
            break
        same += 1
    return same


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("step", choices=("all", "one"))
    parser.add_argument("--shape", required=True, help="the model_shape column (gemma-3-270m, polyglot-ko-12.8b, ...)")
    parser.add_argument("--model", default="embedded", help="model id or folder (helpers.models.load_model)")
    parser.add_argument("--weights", default="real", help="the weights column: real or random")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--method", choices=METHODS, help="(one) the method to time")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", type=Path, default=RESULTS, help="(all) the CSV the rows are appended to")
    parser.add_argument("--work", type=Path, default=Path("outputs/generation_speed"), help="(all) per-process JSON")
    parser.add_argument("--result", type=Path, help="(one) where to write its JSON")
    args = parser.parse_args(argv)
    if args.step == "one":
        rows = measure_one(args.method, args.shape, args.model, args.batches, args.new_tokens, args.repeats,
                           args.weights)
        args.result.write_text(json.dumps(rows))
        return 0
    rows = run_all(args.shape, args.model, args.methods, args.batches, args.new_tokens, args.repeats, args.weights,
                   args.results, args.work)
    for row in rows:
        print(f"{row['model_shape']:<18} {row['method']:<9} batch {row['batch']:>3}: {row['seconds']:>7} s, "
              f"{row['tokens_per_s']:>8} tokens/s (floor {row['bandwidth_floor_s']} s, "
              f"matches generate {row['matches_generate']})")
    return 0 if len(rows) == len(args.methods) * len(args.batches) else 1


if __name__ == "__main__":
    sys.exit(main())
