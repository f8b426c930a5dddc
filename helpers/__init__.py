"""Helpers for the Korean QLoRA lab notebooks.

models          load the embedded gemma-3-270m, hub ids, local folders and .gguf files; quantization; LoRA targets
data            instruction, text and messages rows: reading, validation report, prompt templates, label recipes
recipes         Recipe; the blog, fixed and fast recipes; named_recipe()
run_config      notebook 03's parameters (or a YAML file of the same names) checked and turned into a recipe
train           the command line: python -m helpers.train --config run.yaml
precision       the dtypes a model loads and computes in; a training run's precision plan
memory          the GPU memory of a training step, estimated before training
training        train(): a recipe run into an output folder, resume, run card
trainer         LabTrainer and the TrainingArguments a recipe gives it
collators       a run's batches: packed rows, or the label recipe's padding; each counts its real tokens
losses          the loss from labelled logits only
distributed     several processes: which one this is, its device, decisions taken together
multi_process   what train() does differently on several processes
checkpoints     a run's output folder: checkpoints whole or set aside, resume checks, space checks
fp16_emulation  fp16 autocast range and loss scaling emulated on CPU
diagnostics     collapse monitor, early warning, rescue, headroom probe, replay, diagnosis
evaluation      ask() with timing, and answer metrics
comparison      notebook 05's measurement of the base model and each adapter
adapters        load a trained adapter with its tokenizer; merge into bf16 and check the merge
chat_template   the chat template that renders the training prompt
model_card      the adapter's README, written from its run card
export          GGUF export with llama.cpp's converter and quantizer; export_check: checked by llama.cpp
summaries       each notebook's summary.json
reports         the sentences each notebook ends with, computed from its run
plots           the figures the notebooks show
outputs         output folders, environment record, summary.json, atomic writes, full-disk messages
run_lock        one run at a time per output folder
notebooks       run the series with papermill, prepare nbval copies, the max_steps sweep
"""
