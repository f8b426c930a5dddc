import copy
import inspect

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


# Tests that load a model or a tokenizer, or start a Python process that does (seconds each on a CPU), are marked
# slow, so `pytest -m "not slow"` is the fast loop; `make test` runs everything.
MODEL_FIXTURES = {"embedded_tokenizer", "tokenizer", "tiny_model_dir"}
MODEL_CALLS = ("subprocess", "_check(", "load_model(", "load_tokenizer(", "embedded_model_path(", "from_pretrained(")


def _sources(item):
    """The test function's source and that of every fixture it uses (pytest's fixture info, stable since 3.x)."""
    functions = [item.function] if hasattr(item, "function") else []
    fixture_info = getattr(item, "_fixtureinfo", None)  # absent on items of other plugins (nbval's cells)
    for definitions in (fixture_info.name2fixturedefs.values() if fixture_info else ()):
        functions += [definition.func for definition in definitions]
    for function in functions:
        try:
            yield inspect.getsource(function)
        except (OSError, TypeError):  # built-in fixtures of pytest itself
            continue


def pytest_collection_modifyitems(config, items):
    for item in items:
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())) or \
                any(call in source for source in _sources(item) for call in MODEL_CALLS):
            item.add_marker(pytest.mark.slow)
