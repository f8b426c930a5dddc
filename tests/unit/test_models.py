"""The loader: embedded model, local folders and .gguf files, hub ids offline, precision and quantization settings."""
import time

import pytest
import torch

from helpers import models
from helpers import precision as lab_precision
from helpers.models import ModelLoadError, lora_targets, quantization_config, resolve_source
from helpers.precision import resolve_precision


def test_precision_auto_is_fp32_on_cpu_and_says_so(capsys):
    chosen = resolve_precision("auto")
    assert (chosen.name, chosen.dtype) == ("fp32", torch.float32)
    assert "fp32" in capsys.readouterr().out


def test_precision_auto_picks_bf16_where_the_gpu_has_it(monkeypatch):
    monkeypatch.setattr(lab_precision, "has_bf16", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "test GPU")
    assert resolve_precision("auto", verbose=False).dtype == torch.bfloat16


def test_unknown_precision_and_quantization_are_refused():
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        resolve_precision("fp8")
    with pytest.raises(ValueError, match="unknown quantization '3bit'"):
        quantization_config("3bit")


def test_quantization_config_from_plain_parameters():
    assert quantization_config("none") is None
    four = quantization_config("4bit", compute_dtype=torch.bfloat16)
    assert four.load_in_4bit and four.bnb_4bit_quant_type == "nf4" and four.bnb_4bit_use_double_quant
    assert four.bnb_4bit_compute_dtype == torch.bfloat16
    assert quantization_config("8bit").load_in_8bit


def test_embedded_second_load_is_fast_and_cached():
    models.embedded_model_path()  # converted once (or already)
    started = time.perf_counter()
    model, tokenizer = models.load_model("embedded", verbose=False)
    seconds = time.perf_counter() - started
    assert model.config.model_type == "gemma3_text" and tokenizer.eos_token_id == 1 and tokenizer.pad_token_id == 0
    assert seconds < 60, f"cached load took {seconds:.1f} s"


def test_local_folder_and_gguf_file_and_missing_paths(tiny_model_dir, tmp_path):
    assert resolve_source(str(tiny_model_dir))["kind"] == "folder"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    assert resolve_source(str(gguf)) == {"path": str(tmp_path), "gguf_file": "m.gguf", "kind": "gguf"}
    with pytest.raises(ModelLoadError, match="no such file: "):
        resolve_source(str(tmp_path / "absent.gguf"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_source(str(tmp_path))
    with pytest.raises(ModelLoadError, match="no such folder: "):
        resolve_source("./no/such/model")
    model, _ = models.load_model(str(tiny_model_dir), verbose=False)
    assert model.config.num_hidden_layers == 2


def test_uncached_hub_id_offline_gives_one_clear_error(tmp_path):
    # As a user runs it: HF_HUB_OFFLINE=1 in the environment before anything is imported.
    import os
    import subprocess
    import sys

    code = ("from helpers.models import load_model\n"
            "load_model('EleutherAI/polyglot-ko-5.8b', revision='main', verbose=False)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("helpers.models.ModelLoadError")
    assert "EleutherAI/polyglot-ko-5.8b" in last and "HF_HUB_OFFLINE" in last and "embedded" in last
    assert "hf download EleutherAI/polyglot-ko-5.8b --revision main" in last  # the hub client's command
    assert done.stderr.count("Traceback") == 1  # one error, not a chain of retries


def test_unreachable_or_unknown_hub_id_fails_fast(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    started = time.perf_counter()
    with pytest.raises(ModelLoadError, match="lab-test/no-such-model"):
        models.load_model("lab-test/no-such-model", verbose=False)
    assert time.perf_counter() - started < 30


def test_lora_targets_per_architecture(tiny_model_dir):
    model, _ = models.load_model(str(tiny_model_dir), verbose=False)
    assert lora_targets(model) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert lora_targets(model, "all") == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert lora_targets(model, "q_proj,v_proj") == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match="none of the LoRA targets"):
        lora_targets(model, ["query_key_value"])


def test_gpt_neox_targets_its_fused_projection():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                           vocab_size=100)
    assert lora_targets(GPTNeoXForCausalLM(config)) == ["query_key_value"]


def test_architecture_outside_the_table_gets_its_attention_projections():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    assert lora_targets(model) == ["c_attn"]
    assert lora_targets(model, "c_attn,c_fc") == ["c_attn", "c_fc"]


def _tiny_llama_with_a_4bit_projection():
    import bitsandbytes as bnb
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, vocab_size=128, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    four_bit = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    four_bit.weight = bnb.nn.Params4bit(torch.randn(64, 64) * 0.1, requires_grad=False, quant_type="nf4")
    model.model.layers[0].self_attn.q_proj = four_bit.to("cpu")  # quantizes the weight
    return model


@pytest.mark.parametrize("fp32_unquantized", [True, False])
def test_a_bf16_run_may_keep_what_4bit_leaves_unquantized_in_bf16_and_still_trains_fp32_lora(fp32_unquantized):
    from helpers.recipes import fast_recipe
    from helpers.training import prepare_lora

    model = _tiny_llama_with_a_4bit_projection()
    packed = model.model.layers[0].self_attn.q_proj.weight.data.clone()
    model = prepare_lora(model, fast_recipe(fp32_unquantized=fp32_unquantized, gradient_checkpointing=False), "bf16")
    base = [p for n, p in model.named_parameters() if "lora_" not in n and p.__class__.__name__ != "Params4bit"]
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert {p.dtype for p in base} == {torch.float32 if fp32_unquantized else torch.bfloat16}  # peft's upcast, or not
    assert lora and {p.dtype for p in lora} == {torch.float32} and all(p.requires_grad for p in lora)
    assert torch.equal(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.data, packed)
    ids = torch.randint(0, 128, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None and torch.isfinite(p.grad).all() for p in lora)


def test_bf16_unquantized_layer_norms_run_in_bf16_where_autocast_would_run_them_in_fp32():
    import bitsandbytes as bnb
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from helpers.models.quantization import layer_norm_in_weight_dtype
    from helpers.recipes import fast_recipe
    from helpers.training import prepare_lora

    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(64).to(torch.bfloat16)
    hidden = torch.randn(3, 64) * 5 + 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        normed = layer_norm_in_weight_dtype(norm, hidden)
    exact = torch.nn.functional.layer_norm(hidden, (64,), norm.weight.float(), norm.bias.float())
    assert normed.dtype == torch.bfloat16 and torch.allclose(normed.float(), exact, atol=0.02)

    config = GPTNeoXConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                           vocab_size=128)
    model = GPTNeoXForCausalLM(config).to(torch.bfloat16)
    four_bit = bnb.nn.Linear4bit(64, 192, compute_dtype=torch.bfloat16, quant_type="nf4")
    four_bit.weight = bnb.nn.Params4bit(torch.randn(192, 64) * 0.1, requires_grad=False, quant_type="nf4")
    four_bit.bias = torch.nn.Parameter(torch.zeros(192, dtype=torch.bfloat16), requires_grad=False)
    model.gpt_neox.layers[0].attention.query_key_value = four_bit.to("cpu")
    model = prepare_lora(model, fast_recipe(fp32_unquantized=False, gradient_checkpointing=False), "bf16")
    norms = [module for module in model.modules() if isinstance(module, torch.nn.LayerNorm)]
    assert len(norms) == 5 and all(norm(torch.randn(2, 64)).dtype == torch.bfloat16 for norm in norms)  # fp32 in
    norm_outputs = []
    for norm in norms:
        norm.register_forward_hook(lambda _module, _args, output: norm_outputs.append(output.dtype))
    ids = torch.randint(0, 128, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=ids, output_hidden_states=True)
    out.loss.backward()
    assert len(norm_outputs) == 5 and set(norm_outputs) == {torch.bfloat16}  # two a layer and the final one
    assert {h.dtype for h in out.hidden_states} == {torch.bfloat16}  # the residual stream
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for n, p in model.named_parameters() if "lora_" in n)
