"""Helpers for the Korean QLoRA lab notebooks.

models       load the embedded gemma-3-270m, hub ids, local folders and .gguf files; quantization; LoRA targets
data         instruction, text and messages rows: reading, validation report, prompt templates, label recipes
recipes      Recipe; the blog, fixed and fast recipes; named_recipe()
precision    the dtypes a model loads and computes in; a training run's precision plan
training     train(): a recipe run into an output folder, resume, run card
trainer      LabTrainer and the TrainingArguments a recipe gives it
collators    a run's batches: packed rows, or the label recipe's padding; each counts its real tokens
losses       the loss from labelled logits only
checkpoints  a run's output folder: checkpoints whole or set aside, resume checks, space checks
fp16_emulation  fp16 autocast range and loss scaling emulated on CPU
diagnostics  collapse monitor, headroom probe, diagnosis
evaluation   ask() with timing, and answer metrics
adapters     load a trained adapter with its tokenizer; merge into bf16 and check the merge
plots        the figures the notebooks show
outputs      output folders, environment record, summary.json, atomic writes, full-disk messages
run_lock     one run at a time per output folder
notebooks    run the series with papermill, prepare nbval copies, the max_steps sweep
"""
