"""Load base models: the embedded gemma-3-270m, a hub id, a local folder or a local .gguf file.

One function, :func:`load_model`, serves every notebook. Every load passes ``trust_remote_code=False``: a model
folder's own Python files are never run (transformers would otherwise ask "run the custom code? [y/N]", and one
"y" typed or piped into that prompt executes them). It takes a ``revision`` for hub ids and builds the
bitsandbytes config from plain parameters.

errors       ModelLoadError
quantization quantization_config (precision and the device: helpers.precision), keep_unquantized_in
embedded     the embedded model's converted cache (embedded_model_path) and convert_gguf
sources      resolve_source: embedded, folder, .gguf file or hub id; hub errors
custom_code  the refusal of models that need their own Python code
loading      load_model, load_tokenizer, attention_implementation
lora         lora_targets and the linear layers they are found among
"""
from helpers.models.embedded import (
    CONVERSION_MARKER,
    DEFAULT_CACHE_DIR,
    EMBEDDED_FOLDER_NAME,
    EMBEDDED_MODEL,
    convert_gguf,
    embedded_model_path,
)
from helpers.models.errors import ModelLoadError
from helpers.models.loading import ATTENTION_IMPLEMENTATIONS, attention_implementation, load_model, load_tokenizer
from helpers.models.lora import ATTENTION_TARGETS, MLP_TARGETS, all_linear_names, attention_projections, lora_targets
from helpers.models.quantization import QUANTIZATIONS, keep_unquantized_in, quantization_config
from helpers.models.sources import resolve_source

__all__ = [
    "ATTENTION_IMPLEMENTATIONS", "ATTENTION_TARGETS", "CONVERSION_MARKER", "DEFAULT_CACHE_DIR", "EMBEDDED_FOLDER_NAME",
    "EMBEDDED_MODEL", "MLP_TARGETS", "QUANTIZATIONS", "ModelLoadError", "all_linear_names", "attention_implementation",
    "attention_projections", "convert_gguf", "embedded_model_path", "keep_unquantized_in", "lora_targets",
    "load_model", "load_tokenizer", "quantization_config", "resolve_source",
]
