"""Helpers for the Korean QLoRA lab notebooks.

models       load the embedded gemma-3-270m, hub ids, local folders and .gguf files; quantization; LoRA targets
data         instruction, text and messages rows: reading, validation report, prompt templates, label recipes
training     the blog recipe and the fixed recipe, and train()
fp16_emulation  fp16 autocast range and loss scaling emulated on CPU
diagnostics  collapse monitor, headroom probe, diagnosis
evaluation   ask() with timing, and answer metrics
adapters     load a trained adapter with its tokenizer; merge into bf16 and check the merge
plots        the figures the notebooks show
outputs      output folders, environment record, summary.json, atomic writes, folder locks
notebooks    run the series with papermill, prepare nbval copies, the max_steps sweep
"""
