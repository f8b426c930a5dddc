"""Where a model is loaded from: the embedded model, a local folder, a .gguf file or a hub id; a mistyped local
path is reported missing, never sent to the hub; and the hub errors a user can act on."""
from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

from helpers.models.base_reference import EMBEDDED_HUB_ID, embedded_revision, register_in_hub_cache
from helpers.models.embedded import EMBEDDED_MODEL, embedded_model_path, packaged_sha256
from helpers.models.errors import ModelLoadError


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
    if model_id in (EMBEDDED_MODEL, EMBEDDED_HUB_ID):
        folder = embedded_model_path(cache_dir, verbose)
        revision = embedded_revision(packaged_sha256())
        # under its stable name too, so that adapters name it without a machine path (helpers.models.base_reference)
        register_in_hub_cache(folder, EMBEDDED_HUB_ID, revision)
        return {"path": str(folder), "gguf_file": None, "kind": "embedded", "revision": revision}
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
    from huggingface_hub import constants  # slow to import, so imported when a load needs it

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
    from huggingface_hub import constants, try_to_load_from_cache  # slow to import, so imported when a load needs it

    if isinstance(try_to_load_from_cache(model_id, "config.json", revision=revision), str):
        return
    if constants.HF_HUB_OFFLINE:
        raise _hub_error(model_id, revision, FileNotFoundError("not in the local cache"))
    try:
        urllib.request.urlopen(constants.ENDPOINT, timeout=5).close()
    except urllib.error.HTTPError:
        return  # the hub answered
    except OSError as err:
        raise _hub_error(model_id, revision, err) from None
