"""The README.md saved beside an adapter, written from its run card (PEFT's own is a template of empty fields)."""
from __future__ import annotations

import json

from helpers.models.base_reference import EMBEDDED_HUB_ID


def adapter_readme(card: dict) -> str:
    """Markdown with front matter the hub understands, from ``train()``'s run card: what the adapter was trained
    on and how, what the run measured, and how to load it."""
    recipe, base = card["recipe"], card["base_model"]
    revision = f", revision `{base['revision']}`" if base.get("revision") else ""
    loss = lambda value: "not measured" if value is None else f"{value:.4f}"  # noqa: E731
    front = {"base_model": base["name"], "library_name": "peft", "pipeline_tag": "text-generation",
             "language": ["ko"], "tags": ["lora", "qlora" if recipe["quantization"] != "none" else "lora-16bit"]}
    lines = [
        "---",
        *(f"{key}: {json.dumps(value, ensure_ascii=False)}" for key, value in front.items()),
        "---",
        f"# LoRA adapter for `{base['name']}`",
        "",
        f"Trained by the {recipe['name']} recipe of the Korean QLoRA lab on `{base['name']}`{revision}.",
        *(["The base is the lab's embedded gemma-3-270m (dequantized from its packaged Q4_K_M GGUF); installing "
           "the lab registers it under this name in the local hub cache, where the loader below finds it."]
          if base["name"] == EMBEDDED_HUB_ID else []),
        *([base["note"]] if base.get("note") else []),
        "",
        "## Training",
        f"- data: `{card['data']}` (sha256 `{card['data_sha256']}`), {card['train_rows']} training and "
        f"{card['eval_rows']} eval rows",
        f"- labels: {recipe['labels']}; prompt template: {recipe['template']}; max length {recipe['max_length']}",
        f"- precision: {card['precision']}; base weights: {recipe['quantization']}; LoRA r {recipe['lora_r']}, "
        f"alpha {recipe['lora_alpha']}, on {recipe['lora_targets']}",
        f"- {card['global_step']} optimizer steps of {recipe['batch_size']} x {recipe['gradient_accumulation']} "
        f"examples, learning rate {recipe['learning_rate']} ({recipe['lr_scheduler']}), seed {recipe['seed']}",
        "",
        "## What the run measured",
        f"- final training loss {loss(card['final_train_loss'])}, final eval loss {loss(card['final_eval_loss'])}",
        f"- {card['collapse_text']}",
        f"- {card['wall_seconds']} s on {card['device']}",
        "",
        "## Loading it",
        "```python",
        "from peft import AutoPeftModelForCausalLM",
        "from transformers import AutoTokenizer",
        "",
        'model = AutoPeftModelForCausalLM.from_pretrained("path/to/this/folder")',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")  # carries the prompt as its chat template',
        'messages = [{"role": "user", "content": "질문"}]',
        "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors='pt', "
        "return_dict=True)",
        "```",
        "",
        f"Versions: {', '.join(f'{k} {v}' for k, v in card['versions'].items())}.",
        "",
    ]
    return "\n".join(lines)
