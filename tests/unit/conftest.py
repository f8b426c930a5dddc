import copy

import pytest
import torch


@pytest.fixture(scope="session")
def embedded_tokenizer():
    from helpers.models import load_tokenizer

    return load_tokenizer("embedded")


@pytest.fixture
def tokenizer(embedded_tokenizer):
    return copy.deepcopy(embedded_tokenizer)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded_tokenizer):
    """A tiny random Gemma-3 model saved as a local folder: the same architecture as the embedded model,
    small enough that a training step takes milliseconds."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from helpers.models import embedded_model_path

    folder = tmp_path_factory.mktemp("tiny_gemma3")
    config = AutoConfig.from_pretrained(embedded_model_path())
    config.update({"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
                   "num_key_value_heads": 1, "head_dim": 32, "layer_types": ["sliding_attention", "full_attention"]})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    embedded_tokenizer.save_pretrained(folder)
    return folder
