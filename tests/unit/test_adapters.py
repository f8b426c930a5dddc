"""Merged-model export: whole or not at all."""
import errno

import pytest
from transformers import AutoModelForCausalLM

from helpers.adapters import save_merged
from helpers.models import load_tokenizer
from helpers.outputs import OutputFolderError


def test_merged_export_is_whole_and_a_failed_one_keeps_the_earlier(tiny_model_dir, tmp_path, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = load_tokenizer(str(tiny_model_dir), verbose=False)
    folder = save_merged(model, tokenizer, tmp_path / "merged")
    assert (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    earlier = {p.name: p.read_bytes() for p in folder.iterdir()}

    def disk_full(*args, **kwargs):  # the disk fills after the weights, while the tokenizer is written
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tokenizer, "save_pretrained", disk_full)
    with pytest.raises(OutputFolderError, match="no space left .* while writing the merged model"):
        save_merged(model, tokenizer, tmp_path / "merged")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no half-written folder beside it
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == earlier
