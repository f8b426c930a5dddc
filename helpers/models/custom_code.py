"""The refusal of a model folder whose config or tokenizer needs its own Python files (a class transformers does
not ship): this lab never runs a model's own code."""
from __future__ import annotations

import json
from pathlib import Path

from helpers.models.errors import ModelLoadError


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _code_files(auto_map: dict) -> list[str]:
    """The Python files an ``auto_map`` names: ``"modeling_x.XForCausalLM"`` -> ``modeling_x.py``."""
    references = []
    for value in auto_map.values():
        references += value if isinstance(value, (list, tuple)) else [value]
    return sorted({ref.split("--")[-1].rsplit(".", 1)[0] + ".py" for ref in references if isinstance(ref, str)})


def _custom_code_error(where: str, files: list[str], detail: str) -> ModelLoadError:
    names = ", ".join(files) if files else "its Python files"
    return ModelLoadError(
        f"{where} needs custom code to load: {detail}, so transformers would have to run {names} from it. "
        f"This lab never runs a model's own code (trust_remote_code=False on every load). To use it deliberately, "
        f"read those files first; if you trust them, load the model and tokenizer yourself with "
        f"from_pretrained(..., trust_remote_code=True) and pass them as model= and tokenizer= to "
        f"helpers.training.train, or pick a model whose architecture transformers ships.")


def _check_custom_code(folder: Path):
    """Refuse a local folder whose config or tokenizer is a class that transformers does not ship."""
    # slow to import, so imported when a load needs it
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    config = _read_json(folder / "config.json")
    model_type = config.get("model_type")
    config_map = config.get("auto_map") or {}
    if config_map and model_type not in CONFIG_MAPPING:
        raise _custom_code_error(str(folder), _code_files(config_map),
                                 f"config.json has an auto_map and model_type {model_type!r} is not one "
                                 f"transformers knows")
    tokenizer_config = _read_json(folder / "tokenizer_config.json")
    tokenizer_map = tokenizer_config.get("auto_map") or {}
    if isinstance(tokenizer_map, (list, tuple)):  # an older layout: [slow, fast] for AutoTokenizer
        tokenizer_map = {"AutoTokenizer": tokenizer_map}
    if "AutoTokenizer" in config_map:
        tokenizer_map = {**tokenizer_map, "AutoTokenizer": config_map["AutoTokenizer"]}
    tokenizer_class = tokenizer_config.get("tokenizer_class")
    if tokenizer_map and not (tokenizer_class and tokenizer_class_from_name(tokenizer_class) is not None):
        raise _custom_code_error(str(folder), _code_files(tokenizer_map),
                                 f"its tokenizer has an auto_map and tokenizer_class {tokenizer_class!r} is not "
                                 f"one transformers ships")
