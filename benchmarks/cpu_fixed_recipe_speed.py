"""Side-by-side, in one process: what the fixed recipe's two speed options do on this machine.

1. labelled_logits_only: seconds per optimizer step with and without it, on the same batches (random order).
2. group_by_length: padded tokens per epoch under each sampler (no model needed: it is a count).

    python benchmarks/cpu_fixed_recipe_speed.py [--steps 12] [--model embedded]

Prints the result and writes it to outputs/benchmarks/fixed_recipe_speed.json, with device, versions and date.
"""
import argparse
import datetime
import json

import torch

from helpers import data as lab_data
from helpers.models import load_tokenizer
from helpers.outputs import output_dir, package_versions
from helpers.precision import device_description
from helpers.recipes import fixed_recipe
from helpers.training import train


def padded_tokens_per_epoch(recipe, model_id: str, scratch_dir) -> dict:
    from transformers import TrainingArguments, Trainer

    tokenizer = load_tokenizer(model_id, verbose=False)
    lab_data.prepare_tokenizer(tokenizer, recipe.labels)
    dataset, _ = lab_data.load_instructions("shipped", seed=recipe.seed, verbose=False)
    train_set = lab_data.tokenize_dataset(dataset, tokenizer, recipe.labels)["train"]
    lengths = [len(ids) for ids in train_set["input_ids"]]
    counts = {}
    for strategy in ("random", "group_by_length"):
        args = TrainingArguments(output_dir=str(scratch_dir), per_device_train_batch_size=recipe.batch_size,
                                 train_sampling_strategy=strategy, seed=recipe.seed, report_to="none",
                                 use_cpu=not torch.cuda.is_available())
        order = list(Trainer(model=torch.nn.Linear(1, 1), args=args, train_dataset=train_set)._get_train_sampler())
        batches = [order[i:i + recipe.batch_size] for i in range(0, len(order), recipe.batch_size)]
        padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
        counts[strategy] = {"padded_tokens": padded, "real_tokens": sum(lengths),
                            "padding_share": round(1 - sum(lengths) / padded, 3)}
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--model", default="embedded")
    args = parser.parse_args()
    out = output_dir("outputs/benchmarks")
    result = {"date": datetime.date.today().isoformat(), "device": device_description(),
              "threads": torch.get_num_threads(), "versions": package_versions(), "steps": args.steps}
    for labelled in (False, True):
        recipe = fixed_recipe(max_steps=args.steps, group_by_length=False, labelled_logits_only=labelled,
                              logging_steps=args.steps)
        run = train(recipe, model_id=args.model, out_dir=out / f"labelled_logits_{labelled}", report_to="none",
                    save_adapter=False, verbose=False)
        result[f"seconds_per_step_labelled_logits_{labelled}"] = run.summary["seconds_per_step"]
        result[f"first_losses_labelled_logits_{labelled}"] = [round(r.raw_loss, 4) for r in run.monitor.records[:5]]
    result["padding"] = padded_tokens_per_epoch(fixed_recipe(), args.model, out / "sampler")
    print(json.dumps(result, indent=1, ensure_ascii=False))
    (out / "fixed_recipe_speed.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
