"""What the loader refuses, and what it picks: custom code, missing tokenizers, mistyped paths, attention."""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import models
from helpers.models import loading as model_loading
from helpers.models import ModelLoadError, load_model, load_tokenizer, resolve_source

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_VOCAB = 100


def tiny_tokenizer():
    """A word-level tokenizer of TINY_VOCAB tokens, built offline."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, "<eos>": 2, **{f"w{i}": i for i in range(3, TINY_VOCAB)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<eos>")


def save_tiny_model(folder: Path, model_type: str, with_tokenizer: bool = True, **overrides) -> Path:
    """A randomly initialised two-layer model of ``model_type`` saved as a local folder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dims = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 1, "head_dim": 16, "vocab_size": TINY_VOCAB, **overrides}
    config = AutoConfig.for_model(model_type, **dims)
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:2]
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    if with_tokenizer:
        tiny_tokenizer().save_pretrained(folder)
    return folder


def run_python(code: str, stdin: str = "", env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], input=stdin, capture_output=True, text=True, timeout=180,
                          cwd=REPO_ROOT, env={**os.environ, **(env or {})})


# --- custom code is never run ------------------------------------------------------------------------------------

MARKER_CODE = "import pathlib\npathlib.Path({marker!r}).write_text('custom code ran')\n"


def custom_code_folder(folder: Path, marker: Path, where: str) -> Path:
    """A model folder whose auto_map points at Python files that write ``marker`` when imported.

    where="config": the architecture itself is custom (model_type unknown to transformers);
    where="tokenizer": a known architecture with a custom tokenizer class."""
    folder.mkdir()
    code = MARKER_CODE.format(marker=str(marker))
    for name in ("configuration_evil.py", "modeling_evil.py", "tokenization_evil.py"):
        (folder / name).write_text(code)
    if where == "config":
        config = {"model_type": "evil_lab_test", "architectures": ["EvilForCausalLM"],
                  "auto_map": {"AutoConfig": "configuration_evil.EvilConfig",
                               "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}}
        (folder / "config.json").write_text(json.dumps(config))
    else:
        save_tiny_model(folder, "llama", with_tokenizer=True)
        tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
        tokenizer_config.update({"tokenizer_class": "EvilTokenizer",
                                 "auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}})
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return folder


@pytest.mark.parametrize("where", ["config", "tokenizer"])
def test_custom_code_folder_is_refused_even_when_the_user_answers_yes(tmp_path, where):
    # The user runs the loader and "y" reaches transformers' "Do you wish to run the custom code? [y/N]" prompt
    # (typed, piped, or JupyterLab's input box): nothing from the folder may run.
    marker = tmp_path / "custom_code_ran.txt"
    folder = custom_code_folder(tmp_path / "evil_model", marker, where)
    done = run_python(f"from helpers.models import load_model\nload_model({str(folder)!r}, verbose=False)",
                      stdin="y\n" * 5)
    assert not marker.exists(), "the folder's Python code was executed"
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("helpers.models.ModelLoadError"), done.stderr[-2000:]
    assert "needs custom code" in last and "trust_remote_code" in last and "read those files first" in last
    assert ("modeling_evil.py" if where == "config" else "tokenization_evil.py") in last


def test_custom_code_refusal_names_folder_and_files(tmp_path):
    folder = custom_code_folder(tmp_path / "evil_model", tmp_path / "marker", "config")
    with pytest.raises(ModelLoadError) as refused:
        load_tokenizer(str(folder), verbose=False)
    message = str(refused.value)
    assert str(folder) in message
    assert "configuration_evil.py, modeling_evil.py" in message and "'evil_lab_test'" in message
    assert not (tmp_path / "marker").exists()


def test_every_from_pretrained_in_the_loader_passes_trust_remote_code_false():
    # Read the source rather than trust a single path through it: each call must say so itself. The syntax tree
    # sees calls only, so a docstring that names from_pretrained is not mistaken for one.
    calls = []
    for path in sorted(Path(models.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "from_pretrained":
                calls.append((path.name, node))
    assert len(calls) >= 3, "the loader calls from_pretrained for config, tokenizer and model"
    for file_name, call in calls:
        keywords = {keyword.arg: keyword.value for keyword in call.keywords}
        assert "trust_remote_code" in keywords, f"{file_name}:{call.lineno}"
        assert isinstance(keywords["trust_remote_code"], ast.Constant), f"{file_name}:{call.lineno}"
        assert keywords["trust_remote_code"].value is False, f"{file_name}:{call.lineno}"


# --- a folder without tokenizer files ----------------------------------------------------------------------------

def test_folder_without_tokenizer_files_is_refused(tmp_path):
    # transformers builds a 5-token Gemma tokenizer for such a folder: every Korean sentence becomes <unk>.
    folder = save_tiny_model(tmp_path / "weights_only", "gemma3_text", with_tokenizer=False, vocab_size=1000)
    with pytest.raises(ModelLoadError, match="has no usable tokenizer") as refused:
        load_model(str(folder), verbose=False)
    assert "1000" in str(refused.value) and str(folder) in str(refused.value)
    with pytest.raises(ModelLoadError, match="has no usable tokenizer"):
        load_tokenizer(str(folder), verbose=False)


def test_llama_folder_without_tokenizer_files_gets_the_same_refusal(tmp_path):
    folder = save_tiny_model(tmp_path / "weights_only", "llama", with_tokenizer=False)
    with pytest.raises(ModelLoadError, match="has no usable tokenizer"):
        load_tokenizer(str(folder), verbose=False)


def test_folder_with_its_tokenizer_loads(tmp_path):
    folder = save_tiny_model(tmp_path / "complete", "llama")
    model, tokenizer = load_model(str(folder), verbose=False)
    assert len(tokenizer) == model.config.vocab_size == TINY_VOCAB
    assert tokenizer("w5 w7").input_ids == [5, 7]


# --- mistyped local paths never reach the hub --------------------------------------------------------------------

@pytest.fixture
def no_hub(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a local path was sent to the hub")

    monkeypatch.setattr(model_loading, "_check_hub", refuse)  # where _load_config looks it up


def test_mistyped_subfolder_of_an_existing_folder_is_reported_missing(tmp_path, monkeypatch, no_hub):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    with pytest.raises(ModelLoadError) as refused:
        load_model("outputs/merged-modle", verbose=False)
    message = str(refused.value)
    assert message.startswith(f"no such folder: {tmp_path / 'outputs' / 'merged-modle'}")
    assert "parent folder outputs exists" in message


@pytest.mark.parametrize("model_id", ["./my-model", "../my-model", "~/no-such-lab-model", "models/a/b"])
def test_path_shaped_ids_are_reported_missing(tmp_path, monkeypatch, no_hub, model_id):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match="^no such folder: ") as refused:
        resolve_source(model_id)
    assert str(Path(model_id).expanduser().absolute()) in str(refused.value)


def test_missing_gguf_file_is_reported_missing(tmp_path, monkeypatch, no_hub):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match=f"^no such file: {tmp_path / 'gemma-q4.gguf'}"):
        load_model("gemma-q4.gguf", verbose=False)


def test_hub_ids_still_go_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_source("EleutherAI/polyglot-ko-5.8b") == {
        "path": "EleutherAI/polyglot-ko-5.8b", "gguf_file": None, "kind": "hub"}
    assert resolve_source("gpt2")["kind"] == "hub"


def test_offline_message_gives_the_hub_clients_download_command(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelLoadError) as refused:
        load_model("EleutherAI/polyglot-ko-5.8b", revision="v1.0", verbose=False)
    message = str(refused.value)
    assert "hf download EleutherAI/polyglot-ko-5.8b --revision v1.0 --local-dir FOLDER" in message
    assert "huggingface-cli" not in message


# --- attention implementation ------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_type, expected", [("llama", "sdpa"), ("gpt_neox", "sdpa"), ("qwen3", "sdpa"),
                                                  ("gemma3_text", "eager")])
def test_attention_is_transformers_default_except_where_the_model_needs_eager(tmp_path, model_type, expected):
    folder = save_tiny_model(tmp_path / model_type, model_type)
    model, _ = load_model(str(folder), verbose=False)
    assert model.config._attn_implementation == expected


def test_explicit_attention_overrides_the_table(tmp_path):
    llama = save_tiny_model(tmp_path / "llama", "llama")
    gemma = save_tiny_model(tmp_path / "gemma", "gemma3_text")
    assert load_model(str(llama), attn_implementation="eager", verbose=False)[0].config._attn_implementation == "eager"
    assert load_model(str(gemma), attn_implementation="sdpa", verbose=False)[0].config._attn_implementation == "sdpa"


def test_soft_capped_attention_gets_eager():
    from transformers import AutoConfig

    assert models.attention_implementation(AutoConfig.for_model("gemma2", attn_logit_softcapping=50.0)) == "eager"
    assert models.attention_implementation(AutoConfig.for_model("mistral")) is None
