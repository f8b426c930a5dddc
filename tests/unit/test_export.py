"""GGUF export: a tiny Gemma-3 converted by llama.cpp's converter and quantizer, read back by llama.cpp, answers as
the transformers model does; the Modelfile renders the training prompt in Ollama's template language; errors say
what to do."""
import io
import json
import shutil
import subprocess
import tarfile
from importlib.metadata import PackageNotFoundError

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import helpers.export as export
from helpers.chat_template import chat_template
from helpers.data import load_instructions
from helpers.data.prompts import conversation_segments, format_prompt
from helpers.export import ExportError, check_merged_dir, export_gguf, modelfile_text, ollama_template, write_modelfile
from helpers.export_check import check_gguf, check_table, meets_targets, round_trip, transformers_reference
from helpers.models import embedded_model_path

CONVERSATION = [
    {"role": "system", "content": "당신은 요리 선생님입니다."},
    {"role": "user", "content": "된장찌개에 뭘 넣나요?"},
    {"role": "assistant", "content": "두부, 애호박, 양파를 넣어요."},
    {"role": "user", "content": "멸치 육수는 몇 분 끓여요?"},
]
FILE_TYPES = {"f16": 1, "q8_0": 7, "Q4_K_M": 15}  # llama.cpp's llama_ftype of each file


# ------------------------------------------------------------------------- fast: messages and the Modelfile

def test_a_folder_without_safetensors_is_refused_with_the_reason(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ExportError, match="no .safetensors weights"):
        check_merged_dir(tmp_path)
    with pytest.raises(ExportError, match="no config.json"):
        check_merged_dir(tmp_path / "missing")


def test_without_llama_cpp_the_error_gives_the_pip_line(monkeypatch):
    def not_installed(name):
        raise PackageNotFoundError(name)

    monkeypatch.setattr(export, "version", not_installed)
    with pytest.raises(ExportError, match=r"pip install llama-cpp-python==0\.3\.36"):
        export.converter_dir()


def test_only_the_converter_is_unpacked_from_the_sdist(tmp_path):
    files = {"vendor/llama.cpp/convert_hf_to_gguf.py": b"print()", "vendor/llama.cpp/conversion/gemma.py": b"",
             "vendor/llama.cpp/gguf-py/gguf/__init__.py": b"", "vendor/llama.cpp/src/llama.cpp": b"",
             "vendor/llama.cpp/gguf-py/gguf/../../../../escaped.py": b""}
    archive = tmp_path / "llama_cpp_python-0.0.1.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in files.items():
            member = tarfile.TarInfo(f"llama_cpp_python-0.0.1/{name}")
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    export._unpack_converter(archive, tmp_path / "converter")
    unpacked = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.py"))
    assert unpacked == ["converter/conversion/gemma.py", "converter/convert_hf_to_gguf.py",
                        "converter/gguf-py/gguf/__init__.py"]


def test_the_modelfile_loads_the_gguf_with_the_template_and_stops():
    text = modelfile_text("model-q8_0.gguf", "<eos>")
    assert "FROM ./model-q8_0.gguf\n" in text
    assert 'TEMPLATE """' + ollama_template("<eos>") + '"""\n' in text
    assert text.endswith('PARAMETER stop "<eos>"\nPARAMETER stop "### 질문:"\n')
    assert '{{ "### 맥락: " }}{{ $context }}' in ollama_template("<eos>")


def _result(identical, perplexity_difference):
    return {"megabytes": 1.0, "identical_share": identical, "mean_matching_prefix": identical, "perplexity": 10.0,
            "reference_perplexity": 10.0, "perplexity_relative_difference": perplexity_difference,
            "same_prompt_tokenization_share": 1.0, "questions": 32}


def test_the_check_table_says_which_file_missed_its_targets():
    assert meets_targets(_result(0.96, -0.009), "f16") and not meets_targets(_result(0.94, 0.0), "f16")
    assert meets_targets(_result(0.5, 0.029), "q8_0") and not meets_targets(_result(1.0, -0.031), "q8_0")
    assert meets_targets(_result(0.0, 0.5), "Q4_K_M")  # no target: reported, not judged
    table = check_table({"f16": _result(1.0, 0.001), "q8_0": _result(0.9, 0.05)}).splitlines()
    assert table[1].startswith("f16") and table[1].endswith("met")
    assert table[2].startswith("q8_0") and table[2].endswith("MISSED") and "+5.00%" in table[2]


GO_RENDER = """package main

import ("encoding/json"; "os"; "text/template")

func main() {
	text, _ := os.ReadFile(os.Args[1])
	var data map[string]any
	json.NewDecoder(os.Stdin).Decode(&data)
	parsed := template.Must(template.New("").Option("missingkey=zero").Parse(string(text)))
	if err := parsed.Execute(os.Stdout, data); err != nil {
		panic(err)
	}
}
"""


@pytest.mark.skipif(shutil.which("go") is None, reason="renders Ollama's template with Go's text/template")
@pytest.mark.parametrize("messages", [CONVERSATION[3:], CONVERSATION[:2], CONVERSATION])
def test_ollama_renders_the_training_prompt(tmp_path, messages):
    (tmp_path / "render.go").write_text(GO_RENDER)
    (tmp_path / "template.txt").write_text(ollama_template("<eos>"), encoding="utf-8")
    data = json.dumps({"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]})
    rendered = subprocess.run(["go", "run", "render.go", "template.txt"], cwd=tmp_path, input=data, text=True,
                              capture_output=True, check=True).stdout

    class Named:
        eos_token = "<eos>"

    system = messages[0]["content"] if messages[0]["role"] == "system" else ""
    answered = messages + [{"role": "assistant", "content": "ANSWER"}]
    training_text = "".join(piece for piece, _ in conversation_segments(answered, Named()))
    assert rendered == training_text[: -len(" ANSWER")]
    if len(answered) == 2 + bool(system):
        assert rendered == format_prompt(messages[-1]["content"], system)


# ------------------------------------------------------------------------- slow: a real export of a tiny model

@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="GGUF export needs llama-cpp-python")


@pytest.fixture(scope="module")
def tiny_merged_dir(tmp_path_factory, embedded_tokenizer):
    """A tiny random Gemma-3 with the embedded tokenizer. Six layers, the sixth global, and the embedded model's
    head size (256, its query_pre_attn_scalar too), as every Gemma-3 is laid out: the converter writes neither the
    per-layer pattern nor the attention scale, and llama.cpp (like transformers' GGUF loader) assumes these."""
    folder = tmp_path_factory.mktemp("tiny_merged")
    config = AutoConfig.from_pretrained(embedded_model_path())
    config.update({"num_hidden_layers": 6, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
                   "num_key_value_heads": 1, "initializer_range": 0.1,
                   "layer_types": ["sliding_attention"] * 5 + ["full_attention"]})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    embedded_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def exported(llama_cpp, tiny_merged_dir, tmp_path_factory):
    return export_gguf(tiny_merged_dir, tmp_path_factory.mktemp("gguf"), verbose=False)


@pytest.fixture(scope="module")
def eval_rows():
    return list(load_instructions("shipped", verbose=False)[0]["eval"].select(range(8)))


@pytest.fixture(scope="module")
def reference(tiny_merged_dir, eval_rows):
    return transformers_reference(tiny_merged_dir, eval_rows, max_new_tokens=8)


def test_each_type_is_written_and_read_by_llama_cpp(llama_cpp, exported):
    assert list(exported) == ["f16", "q8_0", "Q4_K_M"]
    for gguf_type, path in exported.items():
        assert path.name == f"model-{gguf_type}.gguf"
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, verbose=False)
        assert llm.metadata["general.file_type"] == str(FILE_TYPES[gguf_type])
    assert exported["Q4_K_M"].stat().st_size < exported["q8_0"].stat().st_size < exported["f16"].stat().st_size
    assert not list(exported["f16"].parent.glob(".*"))  # no partial files or staging folders left


# Measured on this model: f16 all 8 answers identical, perplexity +0.004%, worst token log-likelihood 0.004 apart;
# q8_0 7 of 8, +0.02%, 0.11; Q4_K_M 3 of 8, +1.1%, 0.70. A broken export (the attention scale wrong) moved the
# logits by up to 3 and changed 6 of 7 next-token choices on one prompt.
@pytest.mark.parametrize("gguf_type, identical, perplexity, token_nll", [
    ("f16", 1.0, 0.01, 0.02), ("q8_0", 0.75, 0.03, 0.3), ("Q4_K_M", 0.25, 0.05, 1.5)])
def test_llama_cpp_answers_as_the_merged_model(exported, tiny_merged_dir, eval_rows, reference, gguf_type, identical,
                                               perplexity, token_nll):
    result = check_gguf(exported[gguf_type], tiny_merged_dir, eval_rows, max_new_tokens=8, reference=reference)
    assert result["identical_share"] >= identical
    assert abs(result["perplexity_relative_difference"]) < perplexity
    assert result["max_token_nll_difference"] < token_nll
    assert result["same_prompt_tokenization_share"] == 1.0


def test_the_gguf_carries_the_chat_template(llama_cpp, exported):
    llm = llama_cpp.Llama(model_path=str(exported["f16"]), n_ctx=64, verbose=False)
    assert llm.metadata["tokenizer.chat_template"] == chat_template()


def test_transformers_reads_the_gguf_back(exported, eval_rows, reference):
    trip = round_trip(exported["f16"], eval_rows, reference, max_new_tokens=8)
    assert trip["loaded"], trip.get("error")
    assert trip["identical_share"] == 1.0


def test_write_modelfile_uses_the_merged_tokenizers_eos(exported, tiny_merged_dir):
    modelfile = write_modelfile(exported["q8_0"].parent, exported["q8_0"], tiny_merged_dir)
    assert modelfile.read_text(encoding="utf-8") == modelfile_text("model-q8_0.gguf", "<eos>")
