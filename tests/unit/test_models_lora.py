"""LoRA targets for decoders that transformers ships, beyond the architectures named in the table.

Each model is built from its config with tiny dimensions (tens of thousands of parameters), so the whole file
runs in seconds.
"""
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from helpers.models import ATTENTION_TARGETS, lora_targets

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 16, "vocab_size": 128, "pad_token_id": 0}
# What a few configs need on top of TINY to be this small and still valid.
EXTRA = {
    "gemma4_text": {"per_layer_config": {}, "vocab_size_per_layer_input": 128, "hidden_size_per_layer_input": 8},
    "falcon": {"head_dim": None},
    "qwen3_next": {"layer_types": ["linear_attention", "full_attention"], "moe_intermediate_size": 32,
                   "num_experts": 4, "num_experts_per_tok": 2, "shared_expert_intermediate_size": 32},
    "qwen3_moe": {"moe_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2},
    "deepseek_v3": {"moe_intermediate_size": 32, "n_routed_experts": 4, "num_experts_per_tok": 2, "q_lora_rank": 16,
                    "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16},
    "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 2},
}
# Decoders the lab's users fine-tune (Korean: EXAONE, Qwen, Gemma, Llama) and a spread of attention layouts:
# separate q/k/v/o, fused query_key_value (GPT-NeoX), qkv_proj (Phi-3), c_attn (GPT-2), low-rank q/kv (DeepSeek-V3),
# and hybrids whose first layer is not attention (Qwen3-Next).
ARCHITECTURES = ["llama", "gpt_neox", "qwen3", "gemma3_text", "exaone4", "gemma4_text", "phi3", "mistral", "qwen2",
                 "olmo2", "granite", "smollm3", "cohere2", "falcon", "qwen3_moe", "phi", "starcoder2", "deepseek_v3",
                 "glm4", "exaone_moe", "qwen3_next", "gpt2"]


def tiny_model(model_type: str):
    settings = {**TINY, **EXTRA.get(model_type, {})}
    config = AutoConfig.for_model(model_type, **{k: v for k, v in settings.items() if v is not None})
    if getattr(config, "layer_types", None) and "layer_types" not in settings:
        config.layer_types = config.layer_types[:config.num_hidden_layers]
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def linear_names(model) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
            if isinstance(module, (torch.nn.Linear, Conv1D))}


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_attention_and_all_find_linear_layers_peft_accepts(model_type):
    model = tiny_model(model_type)
    attention = lora_targets(model, "attention")
    everything = lora_targets(model, "all")
    assert attention and set(attention) <= linear_names(model)
    assert set(attention) <= set(everything) <= linear_names(model)
    adapted = get_peft_model(model, LoraConfig(r=2, target_modules=everything))
    lora_layers = [name for name, _ in adapted.named_modules() if name.endswith("lora_A")]
    assert lora_layers
    assert not any(name.endswith("lm_head.lora_A") for name in lora_layers), "the output head is never adapted"


@pytest.mark.parametrize("model_type, expected", [
    ("qwen3", ["q_proj", "k_proj", "v_proj", "o_proj"]),
    ("exaone4", ["q_proj", "k_proj", "v_proj", "o_proj"]),
    ("gemma4_text", ["q_proj", "k_proj", "v_proj", "o_proj"]),
    ("phi3", ["o_proj", "qkv_proj"]),  # Phi-3 defines o_proj first
    ("deepseek_v3", ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]),
    ("qwen3_next", ["q_proj", "k_proj", "v_proj", "o_proj"]),
])
def test_attention_projections_found_from_the_attention_modules(model_type, expected):
    assert model_type not in ATTENTION_TARGETS  # found by looking, not from the table
    assert lora_targets(tiny_model(model_type), "attention") == expected


def test_all_adds_the_mlp_where_the_table_has_no_entry():
    assert lora_targets(tiny_model("qwen3"), "all") == ["q_proj", "k_proj", "v_proj", "o_proj",
                                                        "gate_proj", "up_proj", "down_proj"]
    assert lora_targets(tiny_model("phi3"), "all") == ["o_proj", "qkv_proj", "gate_up_proj", "down_proj"]


def test_gpt2_attention_leaves_out_the_name_its_mlp_shares():
    # GPT-2 calls both the attention output and the MLP output c_proj; PEFT matches names anywhere, so "attention"
    # keeps only c_attn and "all" takes all three.
    model = tiny_model("gpt2")
    assert lora_targets(model, "attention") == ["c_attn"]
    assert lora_targets(model, "all") == ["c_attn", "c_proj", "c_fc"]


def test_gpt_neox_keeps_the_blogs_fused_projection():
    assert lora_targets(tiny_model("gpt_neox"), "attention") == ["query_key_value"]


def test_model_without_attention_layers_is_refused_with_advice():
    model = tiny_model("llama")
    model.config.model_type = "lab_test_recurrent"  # not in the table, so it is looked for
    for layer in model.model.layers:
        layer.self_attn = torch.nn.Identity()
    with pytest.raises(ValueError, match="found no linear layers inside the attention modules"):
        lora_targets(model, "attention")
