"""The code paths of notebooks 02, 03 and 05 on the shapes of real Korean base models, with random weights.

The hub is unreachable where the lab is developed, so polyglot-ko-5.8B/12.8B (GPT-NeoX) and Llama-3-8B are built
from their public configs with RANDOM weights, beside a byte-level BPE tokenizer trained on the shipped data
(the real tokenizers cannot be downloaded either), filled up to the real vocabulary size. Every figure from
this script comes from such a model: speed, memory and adapter size are real, losses and answers are not.

Each step runs in its own process, one after another (timings never share the GPU):

    python -m benchmarks.real_shapes all polyglot-ko-5.8b [--parts build,blog,fixed,eval] [--steps 20]
    python -m benchmarks.real_shapes table --out outputs/real_shapes     # markdown table of the results

  build   random-weight model folder + stand-in tokenizer (pad == eos for polyglot-ko, no pad for Llama-3)
  blog    notebook 02: blog_recipe(), real fp16 autocast on a GPU, 4-bit
  fixed   notebook 03: fixed_recipe() with a short max_steps and a checkpoint, 4-bit
  eval    notebook 05 in a fresh process: 4-bit base + adapter answers one question and scores answer
          perplexity on a few rows; then the adapter merged into a bf16 copy and checked (helpers.adapters)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

# Public configs (config.json of each hub repository), the fields that set the shape.
SHAPES = {
    "polyglot-ko-5.8b": {"model_type": "gpt_neox", "hidden_size": 4096, "num_hidden_layers": 28,
                         "num_attention_heads": 16, "intermediate_size": 16384, "vocab_size": 30080,
                         "rotary_pct": 0.5, "max_position_embeddings": 2048, "use_parallel_residual": True,
                         "tie_word_embeddings": False, "layer_norm_eps": 1e-5, "hidden_act": "gelu"},
    "polyglot-ko-12.8b": {"model_type": "gpt_neox", "hidden_size": 5120, "num_hidden_layers": 40,
                          "num_attention_heads": 40, "intermediate_size": 20480, "vocab_size": 30080,
                          "rotary_pct": 0.5, "max_position_embeddings": 2048, "use_parallel_residual": True,
                          "tie_word_embeddings": False, "layer_norm_eps": 1e-5, "hidden_act": "gelu"},
    "llama-3-8b": {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                   "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256,
                   "rope_theta": 500000.0, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
                   "tie_word_embeddings": False, "hidden_act": "silu"},
    # Tiny versions of the same architectures, for the CPU test of this script.
    "tiny-gpt-neox": {"model_type": "gpt_neox", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                      "intermediate_size": 128, "vocab_size": 2048, "rotary_pct": 0.5,
                      "max_position_embeddings": 2048, "use_parallel_residual": True, "tie_word_embeddings": False},
    "tiny-llama": {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 2048,
                   "max_position_embeddings": 2048, "tie_word_embeddings": False},
}
# polyglot-ko's tokenizer has no pad of its own (users set pad = eos); Llama-3's base tokenizer has none at all.
PAD_POLICY = {"gpt_neox": "eos", "llama": "none"}
EOS, BOS = "<|endoftext|>", "<|begin_of_text|>"


def build_tokenizer(vocab_size: int, pad: str):
    """A byte-level BPE trained on the shipped data, filled up to ``vocab_size`` entries.

    The shipped data runs out of merges near 19k tokens; the rest of the vocabulary is filled with never-produced
    ``<unused_N>`` entries (as real vocabularies keep reserved tokens), so the tokenizer has the real size.
    """
    import tempfile

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from helpers.data import load_instructions

    dataset, _ = load_instructions("shipped", verbose=False)
    texts = [r["instruction"] + "\n" + r["output"] for split in dataset.values() for r in split]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, BOS],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    with tempfile.TemporaryDirectory() as scratch:
        vocab_file, merges_file = bpe.model.save(scratch)
        vocab = json.loads(Path(vocab_file).read_text(encoding="utf-8"))
        vocab.update({f"<unused_{i}>": i for i in range(len(vocab), vocab_size)})
        merges = models.BPE.read_file(vocab_file, merges_file)[1]
    filled = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    filled.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    filled.decoder = decoders.ByteLevel()
    filled.add_special_tokens([EOS, BOS])
    return PreTrainedTokenizerFast(tokenizer_object=filled, bos_token=BOS, eos_token=EOS,
                                   pad_token=EOS if pad == "eos" else None)


def build(shape: str, folder: Path) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(SHAPES[shape])
    tokenizer = build_tokenizer(spec["vocab_size"], PAD_POLICY[spec["model_type"]])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU takes seconds where the CPU takes minutes
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return {"parameters": sum(p.numel() for p in model.parameters()), "tokenizer_tokens": len(tokenizer),
            "pad": PAD_POLICY[config.model_type], "model_vocab_size": config.vocab_size}


def run_recipe(which: str, folder: Path, out_dir: Path, steps: int) -> dict:
    from helpers.recipes import blog_recipe, fixed_recipe
    from helpers.training import train

    if which == "blog":  # notebook 02's defaults: fp16 (real on a GPU), 4-bit, batch 2, lr 1e-4, blog labels
        recipe = blog_recipe(max_steps=steps, logging_steps=5)
    else:  # notebook 03's defaults, short, with one checkpoint on the way
        recipe = fixed_recipe(max_steps=steps, batch_size=4, logging_steps=5, save_steps=steps // 2)
    run = train(recipe, model_id=str(folder), data="shipped", out_dir=out_dir, report_to="none", on_collapse="record")
    card = run.summary
    adapter = out_dir / "adapter"
    return {"seconds_per_step": card["seconds_per_step"], "global_step": card["global_step"],
            "peak_gpu_allocated_gib": card.get("peak_gpu_allocated_gib"),
            "peak_gpu_reserved_gib": card.get("peak_gpu_reserved_gib"),
            "adapter_mb": round(sum(f.stat().st_size for f in adapter.iterdir()
                                    if f.name.startswith("adapter_model")) / 1e6, 2),
            "adapter_keys_lora_only": _lora_only(adapter / "adapter_model.safetensors"),
            "final_train_loss": card["final_train_loss"], "collapse": card["collapse_text"]}


def _lora_only(path: Path) -> bool:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return all("lora_" in key for key in f.keys())


def evaluate(folder: Path, adapter: Path) -> dict:
    """Notebook 05's path: reload in this fresh process, answer, score, then merge and check."""
    from helpers.adapters import load_adapter, merge_check
    from helpers.data import load_instructions
    from helpers.evaluation import answer_perplexity, ask
    from helpers.models import load_model
    from helpers.outputs import peak_gpu_memory

    rows = list(load_instructions("shipped", verbose=False)[0]["eval"])[:8]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    base, tokenizer = load_model(str(folder), quantization="4bit", verbose=False)
    model, _ = load_adapter(base, adapter)
    model.eval()
    answer = ask(model, tokenizer, rows[0]["instruction"], stream=False, max_new_tokens=32, do_sample=False)
    perplexity = answer_perplexity(model, tokenizer, rows)
    peak_4bit = peak_gpu_memory()["peak_gpu_allocated_gib"]
    del model, base
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    report, _, _ = merge_check(str(folder), adapter, rows[:4])
    return {"reload_4bit_tokens_per_s": answer["tokens_per_s"], "answer_perplexity_random_weights": perplexity,
            "reload_4bit_peak_gib": peak_4bit, "merge": report}


STEPS = ("build", "blog", "fixed", "eval")


def run_all(shape: str, work: Path, out: Path, steps: int, parts=STEPS) -> dict:
    """Each of ``parts`` in its own process, one after another; results gathered into ``out/<shape>.json``
    (merged with what an earlier call of the same shape left there)."""
    folder, summary_path = work / shape, out / f"{shape}.json"
    out.mkdir(parents=True, exist_ok=True)
    result = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    result.update(shape=shape, date=time.strftime("%Y-%m-%d"), weights="random (public config)", steps=steps)
    for step in parts:
        started = time.time()
        part = work / f"{shape}.{step}.json"
        command = [sys.executable, "-m", "benchmarks.real_shapes", step, shape, "--work", str(work),
                   "--steps", str(steps), "--result", str(part)]
        done = subprocess.run(command)
        result[step] = json.loads(part.read_text()) if done.returncode == 0 and part.exists() else \
            {"failed": f"exit code {done.returncode}"}
        result[step]["wall_s"] = round(time.time() - started, 1)
        summary_path.write_text(json.dumps(result, indent=1, default=str))
        if "failed" in result[step] and step in ("build", "fixed"):
            break
    return result


def markdown_table(results_dir: Path) -> str:
    """One row per shape and recipe, from the JSON files ``all`` wrote (every figure from random weights)."""
    lines = ["| shape (random weights) | pad | notebook path | ran | s/step | peak GiB allocated / reserved | "
             "adapter MB (LoRA keys only) | merge check (merged vs unmerged bf16 mean logit error, top-1) |",
             "|---|---|---|---|---|---|---|---|"]
    for path in sorted(results_dir.glob("*.json")):
        result = json.loads(path.read_text())
        merge = result.get("eval", {}).get("merge")
        for recipe, notebook in (("blog", "02 blog, real fp16"), ("fixed", "03 fixed, bf16")):
            run = result.get(recipe, {})
            ran = "failed" not in run and run.get("global_step") == result["steps"]
            merged = "" if recipe == "blog" or not merge else (
                f"{'passed' if merge['within_tolerance'] else 'FAILED'}: {merge['mean_abs_error_merged_bf16']:.4f} vs "
                f"{merge['mean_abs_error_unmerged_bf16']:.4f}, top-1 {merge['top1_agreement_merged_vs_fp32']:.1%}")
            lines.append(f"| {result['shape']} | {result['build']['pad']} | {notebook} | "
                         f"{'yes' if ran else 'no'}, {run.get('global_step')} steps | {run.get('seconds_per_step')} | "
                         f"{run.get('peak_gpu_allocated_gib')} / {run.get('peak_gpu_reserved_gib')} | "
                         f"{run.get('adapter_mb')} ({'yes' if run.get('adapter_keys_lora_only') else 'NO'}) | {merged} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("step", choices=("all", "table") + STEPS)
    parser.add_argument("shape", nargs="?", choices=sorted(SHAPES), help="(table: not needed)")
    parser.add_argument("--work", type=Path, default=Path("outputs/real_shapes/work"), help="model folders")
    parser.add_argument("--out", type=Path, default=Path("outputs/real_shapes"), help="result JSON files")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps of each training run")
    parser.add_argument("--result", type=Path, help="(one step) where to write its JSON")
    parser.add_argument("--parts", default=",".join(STEPS), help="(all) which steps to run, comma-separated")
    args = parser.parse_args(argv)
    if args.step == "table":
        print(markdown_table(args.out))
        return 0
    folder = args.work / args.shape
    if args.step == "all":
        print(json.dumps(run_all(args.shape, args.work, args.out, args.steps, args.parts.split(",")), indent=1,
                         default=str))
        return 0
    from helpers.precision import device_description
    from helpers.outputs import package_versions

    if args.step == "build":
        result = build(args.shape, folder)
    elif args.step in ("blog", "fixed"):
        result = run_recipe(args.step, folder, args.work / f"{args.shape}-{args.step}", args.steps)
    else:
        result = evaluate(folder, args.work / f"{args.shape}-fixed" / "adapter")
    result.update(device=device_description(), versions=package_versions())
    args.result.write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
