"""How an adapter or a merged model names its base: a hub id and a revision, never a path on one machine.

PEFT writes ``base_model_name_or_path`` into ``adapter_config.json`` from the loaded model, which for a model loaded
from disk is a folder of the machine that trained it (for the embedded model, a cache folder under the user's home).
Such a name leaks the machine and loads nowhere else. Instead:

- the embedded model gets a stable hub-style name, :data:`EMBEDDED_HUB_ID`, at a revision derived from the packaged
  GGUF's sha256 (:func:`embedded_revision`), and the converted folder is registered under that name in the local
  hub cache (:func:`register_in_hub_cache`). ``AutoPeftModelForCausalLM.from_pretrained(adapter_dir)`` then loads
  the base through transformers' own cache lookup: a revision that is a commit hash whose files are in the cache is
  read from there without asking the hub (huggingface_hub's ``hf_hub_download`` short-cuts cached commit hashes),
  so it works offline and on the training machine; elsewhere the user installs the lab once, which registers it;
- a hub id keeps its id and the revision it was loaded at;
- a folder from the hub cache (``.../models--owner--name/snapshots/<commit>``) is named by that id and commit;
- any other folder is named by its folder name only, and the message says so: it loads where a folder of that name
  is the working directory's, or after the user edits the name.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

# Not a repository on the hub: a name that the local hub cache resolves (see the module docstring).
EMBEDDED_HUB_ID = "korean-qlora-lab/gemma-3-270m-q4_k_m-embedded"
_SNAPSHOT = re.compile(r"models--(?P<owner>[^/\\]+?)--(?P<name>[^/\\]+)[/\\]snapshots[/\\](?P<commit>[0-9a-f]{40})$")


def embedded_revision(source_sha256: str) -> str:
    """A 40-hex revision for the embedded model, the same on every machine for the same packaged GGUF."""
    return hashlib.sha1(f"{EMBEDDED_HUB_ID}@{source_sha256}".encode()).hexdigest()


def hub_cache_dir() -> Path:
    from huggingface_hub import constants  # read at call time: tests and users may point HF_HUB_CACHE elsewhere

    return Path(os.environ.get("HF_HUB_CACHE", constants.HF_HUB_CACHE))


def register_in_hub_cache(folder: str | Path, repo_id: str, revision: str, cache_dir: str | Path | None = None) -> Path:
    """Make ``folder``'s files the snapshot ``revision`` of ``repo_id`` in the local hub cache; return the snapshot.

    Files are hard-linked (copied where links are not possible); the snapshot is assembled under a temporary name
    and renamed when complete, so a killed registration leaves nothing that looks whole. Idempotent.
    """
    owner, name = repo_id.split("/")
    repo_dir = Path(cache_dir or hub_cache_dir()) / f"models--{owner}--{name}"
    snapshot = repo_dir / "snapshots" / revision
    files = sorted(p for p in Path(folder).iterdir() if p.is_file())
    if snapshot.is_dir() and {p.name for p in files} <= {p.name for p in snapshot.iterdir()}:
        return snapshot
    partial = snapshot.with_name(f"{revision}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for source in files:
        try:
            os.link(source, partial / source.name)
        except OSError:  # another file system, or links not allowed
            shutil.copy2(source, partial / source.name)
    shutil.rmtree(snapshot, ignore_errors=True)
    partial.rename(snapshot)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(revision)
    return snapshot


def base_model_reference(model_id: str, revision: str | None, source: dict,
                         loaded_commit: str | None = None) -> tuple[str, str | None, str]:
    """``(name, revision, note)`` to record for a base loaded as ``model_id`` from ``source``
    (:func:`helpers.models.sources.resolve_source`'s answer); ``loaded_commit`` is the commit a hub load resolved
    (``config._commit_hash``), recorded when no revision was pinned. ``note`` says what a reader must know, or ''."""
    if source["kind"] == "embedded":
        return EMBEDDED_HUB_ID, source["revision"], ""
    if source["kind"] == "hub":
        return model_id, revision or loaded_commit, ""
    if source["kind"] == "gguf":
        return source["gguf_file"], None, (f"the base was converted from the GGUF file {source['gguf_file']!r}; "
                                           "give that file when loading the adapter elsewhere")
    folder = Path(source["path"]).resolve()
    found = _SNAPSHOT.search(folder.as_posix())
    if found:
        return f"{found['owner']}/{found['name']}", found["commit"], ""
    return folder.name, None, (f"the base was loaded from a local folder; the adapter names it {folder.name!r} "
                               "(no machine path); give the folder or its hub id when loading it elsewhere")
