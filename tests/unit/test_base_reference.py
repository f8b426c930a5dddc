"""Adapters name their base by hub id and revision, never by a folder of the machine that trained them."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.models.base_reference import (EMBEDDED_HUB_ID, base_model_reference, embedded_revision,
                                           register_in_hub_cache)
from helpers.models.embedded import packaged_sha256


def test_each_kind_of_base_is_named_without_a_machine_path(tmp_path):
    snapshot = tmp_path / "hub" / "models--EleutherAI--polyglot-ko-5.8b" / "snapshots" / ("a" * 40)
    plain = tmp_path / "my_models" / "polyglot-ko-5.8b-local"
    revision = embedded_revision("0" * 64)
    cases = {
        "embedded": (("embedded", None, {"kind": "embedded", "path": str(tmp_path), "revision": revision}),
                     (EMBEDDED_HUB_ID, revision)),
        "hub pinned": (("beomi/Llama-3-Open-Ko-8B", "main", {"kind": "hub", "path": "beomi/Llama-3-Open-Ko-8B"}),
                       ("beomi/Llama-3-Open-Ko-8B", "main")),
        "hub cache folder": ((str(snapshot), None, {"kind": "folder", "path": str(snapshot)}),
                             ("EleutherAI/polyglot-ko-5.8b", "a" * 40)),
        "plain folder": ((str(plain), None, {"kind": "folder", "path": str(plain)}), ("polyglot-ko-5.8b-local", None)),
        "gguf": ((str(tmp_path / "m.gguf"), None, {"kind": "gguf", "path": str(tmp_path), "gguf_file": "m.gguf"}),
                 ("m.gguf", None)),
    }
    for case, (arguments, expected) in cases.items():
        name, revision_found, note = base_model_reference(*arguments)
        assert (name, revision_found) == expected, case
        assert str(tmp_path) not in name + note, case
    # a hub load that pinned nothing records the commit it resolved
    assert base_model_reference("org/name", None, {"kind": "hub", "path": "org/name"}, "b" * 40)[1] == "b" * 40
    assert len(revision) == 40 and revision == embedded_revision("0" * 64) != embedded_revision("1" * 64)


def test_a_registered_folder_loads_by_name_and_commit_from_the_hub_cache(tmp_path):
    from transformers import AutoConfig, GPT2Config

    folder = tmp_path / "model"
    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(folder)
    revision = embedded_revision("abc")
    snapshot = register_in_hub_cache(folder, "someone/tiny", revision, cache_dir=tmp_path / "hub")
    assert snapshot == tmp_path / "hub" / "models--someone--tiny" / "snapshots" / revision
    assert register_in_hub_cache(folder, "someone/tiny", revision, cache_dir=tmp_path / "hub") == snapshot
    assert not list(snapshot.parent.glob("*.partial*"))
    config = AutoConfig.from_pretrained("someone/tiny", revision=revision, cache_dir=tmp_path / "hub")
    assert config.n_embd == 8


@pytest.mark.slow
def test_auto_peft_model_loads_a_trained_adapter_in_a_fresh_process(tmp_path, monkeypatch):
    from helpers.recipes import fixed_recipe
    from helpers.training import train

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # registration goes to a cache of this test only
    out = tmp_path / "run"
    train(fixed_recipe(max_steps=2, batch_size=2, quantization="none", logging_steps=1), model_id="embedded",
          out_dir=out, report_to="none", max_rows=8, verbose=False)
    adapter = out / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == (EMBEDDED_HUB_ID,
                                                                       embedded_revision(packaged_sha256()))
    for text in [(adapter / name).read_text(encoding="utf-8") for name in ("adapter_config.json", "README.md")]:
        assert str(Path.home()) not in text and str(tmp_path) not in text
    readme = (adapter / "README.md").read_text(encoding="utf-8")
    assert f"base_model: \"{EMBEDDED_HUB_ID}\"" in readme and "optimizer steps" in readme
    assert "### 답변:" in json.dumps(json.loads((adapter / "tokenizer_config.json").read_text()), ensure_ascii=False) \
        or "### 답변:" in (adapter / "chat_template.jinja").read_text(encoding="utf-8")
    code = ("import sys; from peft import AutoPeftModelForCausalLM; from transformers import AutoTokenizer\n"
            "m = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1]); t = AutoTokenizer.from_pretrained(sys.argv[1])\n"
            "ids = t.apply_chat_template([{'role': 'user', 'content': '안녕?'}], add_generation_prompt=True, "
            "return_tensors='pt', return_dict=True)\n"
            "print(type(m).__name__, t.decode(ids['input_ids'][0]), m(**ids).logits.shape[-1])")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub")}
    env.pop("HF_HUB_OFFLINE", None)  # no hub is reachable here: the cached commit must be enough
    done = subprocess.run([sys.executable, "-c", code, str(adapter)], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("PeftModelForCausalLM") and "### 질문: 안녕?" in done.stdout
