"""Where runs write (only under ``outputs/``), what they record about the environment, and summary.json.

Also how they write there without losing anything: files and folders appear whole or not at all
(:func:`atomic_write_text`, :func:`publish_folder`), and a full disk or an unwritable folder ends a run with one
message that names the folder (:func:`explain_write_error`). One run at a time per folder: :mod:`helpers.run_lock`.
"""
from __future__ import annotations

import errno
import json
import math
import os
import platform
import shutil
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PACKAGES = ["torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "papermill", "wandb",
            "kiwipiepy", "matplotlib"]


def project_root() -> Path:
    """The checkout this package is installed from (editable install), else the current folder."""
    here = Path(__file__).resolve().parent.parent
    return here if (here / "pyproject.toml").exists() else Path.cwd()


def output_dir(path: str | Path) -> Path:
    """Resolve a run's output folder against the project root and create it."""
    path = Path(path)
    path = path if path.is_absolute() else project_root() / path
    path.mkdir(parents=True, exist_ok=True)
    return path


def package_versions() -> dict:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def environment() -> dict:
    """Package versions and the device, for the first cell of every notebook and for run cards."""
    # torch is slow to import: imported here so that `import helpers.outputs` (the notebook runner) stays fast
    import torch

    from helpers.precision import device_description

    return {**package_versions(), "device": device_description(), "cuda": torch.version.cuda}


def _clean(value):
    # json cannot hold NaN/inf; record them as strings so a reader sees them instead of a parse error
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_summary(out_dir: str | Path, summary: dict) -> Path:
    """Write ``summary.json`` (with the environment and, unless the summary has them, the process's peak GPU
    memory added) into ``out_dir`` and return its path."""
    out = output_dir(out_dir)
    path = out / "summary.json"
    data = {**peak_gpu_memory(), **summary, "environment": environment()}
    atomic_write_text(path, json.dumps(_clean(data), ensure_ascii=False, indent=1, default=str))
    return path


def peak_gpu_memory() -> dict:
    """Peak GPU memory since the last ``torch.cuda.reset_peak_memory_stats()`` (train() resets it when it starts),
    in GiB: allocated by tensors, and reserved by PyTorch's caching allocator (what nvidia-smi shows). None on CPU."""
    import torch  # slow to import; see environment()

    if not torch.cuda.is_available():
        return {"peak_gpu_allocated_gib": None, "peak_gpu_reserved_gib": None}
    return {"peak_gpu_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
            "peak_gpu_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3)}


def shown_path(path: str | Path, base: str | Path | None = None) -> str:
    """A path as run cards and messages show it: relative to the project, else to ``base``, else as given."""
    path = Path(path)
    if not path.is_absolute():
        return str(path)
    for root in (project_root(), base):
        if root is not None:
            try:
                return str(path.relative_to(os.path.abspath(root)))
            except ValueError:
                pass
    return str(path)


# --------------------------------------------------------------------------------------------- safe writes

def _fsync_dir(folder: Path):
    # the rename itself is durable only once the folder's entry is on disk
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to a temporary name beside ``path``, then rename it over ``path``: a reader (or an
    interrupted run) sees the old file or the new one, never half of one."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with temporary.open("w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def fsync_folder(folder: str | Path):
    """Flush every file of a freshly written folder to disk, so that its rename publishes whole files."""
    for file in Path(folder).rglob("*"):
        if file.is_file():
            with file.open("rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(Path(folder))


REPLACED_SUFFIX = ".replaced"


def publish_folder(staged: str | Path, final: str | Path) -> Path:
    """Rename a fully written folder to its final name, replacing a folder already there.

    A folder cannot be renamed over a non-empty one, so the old one first moves to ``<final>.replaced`` and is
    deleted after; an interruption between the two renames leaves it there, and :func:`restore_replaced` puts it
    back at the next start."""
    staged, final = Path(staged), Path(final)
    fsync_folder(staged)
    replaced = final.with_name(final.name + REPLACED_SUFFIX)
    if final.exists():
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
    os.replace(staged, final)
    _fsync_dir(final.parent)
    shutil.rmtree(replaced, ignore_errors=True)
    return final


def restore_replaced(final: str | Path):
    """Undo half of an interrupted :func:`publish_folder`: the old folder goes back under its name."""
    final = Path(final)
    replaced = final.with_name(final.name + REPLACED_SUFFIX)
    if replaced.exists():
        if final.exists():
            shutil.rmtree(replaced)
        else:
            os.replace(replaced, final)


def folder_bytes(folder: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def megabytes(n: float) -> str:
    """A size for a message: MiB, or KiB / GiB where MiB would read 0.0 or run to many digits."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n / 2**10:,.1f} KiB"


def free_bytes(folder: str | Path) -> int:
    return shutil.disk_usage(folder).free


class OutputFolderError(OSError):
    """A run cannot write its output folder: full, read-only or not permitted. The message says which and what to do."""

    def __str__(self):
        return self.args[0] if self.args else ""


NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}


def explain_write_error(error: OSError, folder: str | Path, what: str, needed: int | None = None,
                        intact: str | None = None) -> OSError:
    """One message for an OSError met while writing under ``folder``: the folder, and for a full disk the
    space needed and free. Other errors come back unchanged."""
    folder = Path(folder)
    where = shown_path(folder)
    kept = f"; {intact} is intact" if intact else ""
    if error.errno in NO_SPACE:
        try:
            free = megabytes(free_bytes(folder if folder.exists() else folder.parent))
        except OSError:
            free = "unknown"
        need = f"about {megabytes(needed)} needed, {free} free" if needed else f"{free} free"
        return OutputFolderError(f"no space left in {where} while writing {what} ({need}){kept}; free some space "
                                 "or choose another out_dir, then run again (resume=True continues from the last "
                                 "checkpoint)")
    if error.errno in NOT_WRITABLE:
        return OutputFolderError(f"cannot write to {where} ({error.strerror}) while writing {what}{kept}; "
                                 "choose another out_dir or make this one writable")
    return error


@contextmanager
def writing_into(folder: str | Path, what: str, needed: int | None = None, intact: str | None = None,
                 partial: str | Path | None = None):
    """Turn a full disk or an unwritable folder met inside the block into one :class:`OutputFolderError`
    (see :func:`explain_write_error`), after deleting ``partial``, the half-written file or folder."""
    try:
        yield
    except OSError as error:
        if partial is not None and Path(partial).is_dir():
            shutil.rmtree(partial, ignore_errors=True)
        elif partial is not None:
            Path(partial).unlink(missing_ok=True)
        explained = explain_write_error(error, folder, what, needed, intact)
        if explained is error:
            raise
        raise explained from error


def check_free_space(folder: str | Path, needed: int, what: str):
    """Stop before a run starts when its folder has not the room for what it will write."""
    free = free_bytes(folder)
    if free < needed:
        raise OutputFolderError(f"not enough free space in {shown_path(folder)} for {what}: about "
                                f"{megabytes(needed)} needed, {megabytes(free)} free; free some space or choose "
                                "another out_dir")
