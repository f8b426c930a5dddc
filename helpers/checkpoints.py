"""A run's output folder: one run at a time, checkpoints that are whole or set aside, the checks before a resume,
an earlier run moved aside, the space a run needs, and the adapter written whole."""
from __future__ import annotations

import json
import os
import shutil
import time
import warnings
import zipfile
from dataclasses import asdict
from pathlib import Path

from helpers.outputs import (atomic_write_text, check_free_space, folder_bytes, publish_folder, restore_replaced,
                             shown_path, writing_into)
from helpers.recipes import Recipe
from helpers.run_lock import RunLock, describe_holder

SAVE_TOTAL_LIMIT = 2  # checkpoints kept in out_dir/checkpoints
STAGING_NAME = "staging"                 # checkpoints/staging/checkpoint-N while Trainer writes it
ADAPTER_STAGING_NAME = "adapter.partial"  # the adapter while it is written; renamed to adapter/ when whole
COMPLETION_MARKER = "checkpoint_complete.json"
INVALID_CHECKPOINTS = "invalid_checkpoints"
EARLIER_RUNS = "earlier_runs"
# What one run writes into its out_dir; a run starting from step 0 moves an earlier run's copy of these aside
# (with its recipe.json and data.json).
RUN_STATE = ("checkpoints", INVALID_CHECKPOINTS, "trace.jsonl", "adapter", "last_good", "run_card.json")


def lock_output_folder(out_dir: Path) -> RunLock:
    with writing_into(out_dir, "its lock file"):
        out_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock(out_dir).acquire()
    if lock.took_over:
        warnings.warn(f"{shown_path(out_dir)}: took over the lock of an earlier run ({describe_holder(lock.took_over)}"
                      "), which is no longer running", stacklevel=3)
    return lock


def tidy_interrupted_writes(out_dir: Path):
    """What a run killed while saving leaves behind: half-written folders (deleted: nothing in them was ever
    published) and an adapter caught between the two renames of publish_folder (put back)."""
    shutil.rmtree(out_dir / "checkpoints" / STAGING_NAME, ignore_errors=True)
    shutil.rmtree(out_dir / ADAPTER_STAGING_NAME, ignore_errors=True)
    restore_replaced(out_dir / "adapter")
    for replaced in (out_dir / "checkpoints").glob("checkpoint-*.replaced"):
        restore_replaced(replaced.with_suffix(""))


def write_completion_marker(folder: Path):
    """List every file of a finished checkpoint with its size; checkpoint_problem compares them."""
    files = {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*")) if f.is_file()}
    (folder / COMPLETION_MARKER).write_text(json.dumps({"files": files}, indent=1))


def checkpoint_problem(folder: str | Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from, or None when it can: it needs its trainer state, a whole
    adapter, the optimizer and scheduler, and (when it has one) files of the sizes its completion marker lists."""
    folder = Path(folder)
    state = folder / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json"
    try:
        step = json.loads(state.read_text())["global_step"]
    except (ValueError, KeyError, OSError):
        return "trainer_state.json is unreadable"
    if step != checkpoint_step(folder):
        return f"trainer_state.json is of step {step}"
    for name in ("adapter_config.json", "optimizer.pt", "scheduler.pt"):
        if not (folder / name).is_file():
            return f"no {name}"
    problem = _safetensors_problem(folder / "adapter_model.safetensors")
    if problem:
        return problem
    for name in ("optimizer.pt", "scheduler.pt"):
        if not zipfile.is_zipfile(folder / name):  # torch.save writes a zip whose directory is at its end
            return f"{name} is cut short or damaged"
    marker = folder / COMPLETION_MARKER
    if marker.is_file():
        try:
            listed = json.loads(marker.read_text())["files"]
        except (ValueError, KeyError, OSError):
            return f"{COMPLETION_MARKER} is unreadable"
        for name, size in listed.items():
            actual = (folder / name).stat().st_size if (folder / name).is_file() else None
            if actual != size:
                return f"{name} has {actual} bytes, {size} were written"
    return None


def _safetensors_problem(path: Path) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header, then the tensors it lists: a file cut short
    (or padded) no longer matches the size its header describes."""
    if not path.is_file():
        return f"no {path.name}"
    size = path.stat().st_size
    try:
        with path.open("rb") as handle:
            header_length = int.from_bytes(handle.read(8), "little")
            if size < 8 or header_length > size - 8:
                raise ValueError
            header = json.loads(handle.read(header_length))
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError):
        return f"{path.name} is damaged (no readable header)"
    if 8 + header_length + end != size:
        return f"{path.name} has {size} bytes, its header describes {8 + header_length + end}"
    return None


def choose_checkpoint(out_dir: Path, resume, verbose: bool) -> tuple[Path | None, list]:
    """The checkpoint to resume from: the newest valid one. Newer invalid ones move to invalid_checkpoints/ (so
    that Trainer's rotation and the next resume do not meet them) with a warning that says why."""
    if not resume:
        return None, []
    if isinstance(resume, (str, Path)):
        problem = checkpoint_problem(resume)
        if problem:
            raise ValueError(f"cannot resume from {shown_path(resume, out_dir)}: {problem}")
        return Path(resume), []
    folder = out_dir / "checkpoints"
    found = sorted((f for f in folder.glob("checkpoint-*") if f.is_dir() and f.name.split("-")[-1].isdigit()),
                   key=checkpoint_step, reverse=True)
    chosen, skipped = None, []
    for candidate in found:
        problem = checkpoint_problem(candidate)
        if problem is None:
            chosen = candidate
            break
        skipped.append({"checkpoint": candidate.name, "problem": problem})
    for entry in skipped:
        destination = out_dir / INVALID_CHECKPOINTS / entry["checkpoint"]
        shutil.rmtree(destination, ignore_errors=True)
        destination.parent.mkdir(exist_ok=True)
        os.replace(folder / entry["checkpoint"], destination)
        warnings.warn(f"resume: skipped {entry['checkpoint']} ({entry['problem']}); moved it to "
                      f"{INVALID_CHECKPOINTS}/", stacklevel=3)
    if verbose:
        print(f"resume: from {chosen.name}, the newest valid checkpoint" if chosen else
              f"resume: no valid checkpoint in {shown_path(folder)}, starting from step 0")
    return chosen, skipped


def set_aside_earlier_run(out_dir: Path, verbose: bool) -> str | None:
    """Move an earlier run's files out of the way of a run that starts from step 0; returns where to."""
    present = [name for name in RUN_STATE if (out_dir / name).exists()]
    if not present:
        return None
    present += [name for name in ("recipe.json", "data.json") if (out_dir / name).exists()]
    started = out_dir / ("recipe.json" if "recipe.json" in present else present[0])  # written when that run began
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(started.stat().st_mtime))
    destination = out_dir / EARLIER_RUNS / stamp
    suffix = 1
    while destination.exists():
        suffix += 1
        destination = out_dir / EARLIER_RUNS / f"{stamp}-{suffix}"
    destination.mkdir(parents=True)
    for name in present:
        os.replace(out_dir / name, destination / name)
    where = shown_path(destination, out_dir)
    if verbose:
        print(f"starting from step 0: the earlier run in this folder ({', '.join(present)}) moved to {where}")
    return where


# Fields a resumed run may change: how long it runs and how often it logs, evaluates and saves.
RESUMABLE_CHANGES = {"max_steps", "epochs", "logging_steps", "eval_steps", "save_steps"}


def check_resumable(out_dir: Path, recipe: Recipe, inputs: dict) -> None:
    """Refuse to resume a checkpoint of a different recipe or different data (a changed parameter or data file with
    the old output_dir would otherwise continue the old run silently), naming every changed field."""
    current = asdict(recipe)
    changes = []
    if (out_dir / "recipe.json").exists():
        previous = json.loads((out_dir / "recipe.json").read_text())
        changes += [f"{k}: {previous.get(k)!r} -> {current[k]!r}" for k in sorted(current)
                    if k not in RESUMABLE_CHANGES and previous.get(k) != current[k]]
    if (out_dir / "data.json").exists():  # recorded since data checks began; older runs have only recipe.json
        previous = json.loads((out_dir / "data.json").read_text())
        other_content = previous.get("data_sha256") != inputs["data_sha256"]
        other_hub_set = not inputs["local"] and previous.get("data_file") != inputs["data_file"]
        if other_content or other_hub_set:
            changes.append(f"data: {previous.get('data_file')!r} (sha256 {str(previous.get('data_sha256'))[:12]}) -> "
                           f"{inputs['data_file']!r} (sha256 {inputs['data_sha256'][:12]})")
        if previous.get("max_rows") != inputs["max_rows"]:
            changes.append(f"max_rows: {previous.get('max_rows')!r} -> {inputs['max_rows']!r}")
    if changes:
        raise ValueError(f"{shown_path(out_dir)} holds checkpoints of a run with a different recipe or data ("
                         + "; ".join(changes) + "); choose another output_dir, or resume=False to start over there "
                         f"(the earlier run then moves to {EARLIER_RUNS}/)")


def data_identity(data: str, sha256: str, max_rows) -> dict:
    """What a resume compares: a local file by its content (it may have moved), a hub data set by its id."""
    local = sha256 != "not a local file"
    return {"data_file": Path(data).name if local else data, "data_sha256": sha256, "local": local,
            "max_rows": max_rows}


def record_run_inputs(out_dir: Path, recipe: Recipe, inputs: dict):
    """recipe.json and data.json: what the next resume compares against."""
    atomic_write_text(out_dir / "recipe.json", json.dumps(asdict(recipe), indent=1))
    atomic_write_text(out_dir / "data.json", json.dumps(inputs, ensure_ascii=False, indent=1))


def check_space_for_run(out_dir: Path, recipe: Recipe, model, tokenizer, staged_adapter: Path,
                         save_adapter: bool) -> int:
    """Write the tokenizer (it does not change while training) where the adapter will go, then check that the
    disk has room for the checkpoints and the adapter, before any training time is spent. Returns the estimated
    size of one checkpoint."""
    adapter_weights = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    if not save_adapter and recipe.save_steps <= 0:
        check_free_space(out_dir, 2**20, "this run's trace and run card")
        return None
    with writing_into(out_dir, "the tokenizer of the adapter", partial=staged_adapter):
        tokenizer.save_pretrained(staged_adapter)
    tokenizer_bytes = folder_bytes(staged_adapter)
    if not save_adapter:
        shutil.rmtree(staged_adapter)
    # Trainer saves the collator's tokenizer into each checkpoint beside the adapter, the optimizer's two moments
    # per weight (Adam; 8-bit optimizers keep less) and small state files.
    checkpoint_bytes = tokenizer_bytes + 3 * adapter_weights + 2**16
    needed = (adapter_weights if save_adapter else 0) + 2**20  # the trace and the run card
    if recipe.save_steps > 0:
        existing = len(list((out_dir / "checkpoints").glob("checkpoint-*")))
        saves = recipe.max_steps // recipe.save_steps + 1 if recipe.max_steps > 0 else 2**31  # +1: at the end
        # Trainer writes the new checkpoint before it deletes the oldest beyond its limit
        needed += max(0, min(saves, SAVE_TOTAL_LIMIT + 1 - existing)) * checkpoint_bytes
    try:
        check_free_space(out_dir, needed, "this run's checkpoints and adapter")
    except OSError:
        shutil.rmtree(staged_adapter, ignore_errors=True)
        raise
    return checkpoint_bytes


def write_adapter(model, staged: Path, final: Path, readme: str | None = None):
    """Adapter weights beside the tokenizer already staged (and ``readme`` over PEFT's empty model card), then one
    rename: a full disk or a kill leaves the earlier adapter/ (if any) as it was and never an adapter/ that looks
    complete but is not."""
    needed = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    with writing_into(final.parent, "the adapter", needed=needed, intact="the earlier adapter/ (if any)",
                      partial=staged):
        model.save_pretrained(staged, safe_serialization=True, save_embedding_layers=False)
        if readme is not None:
            (staged / "README.md").write_text(readme, encoding="utf-8")
        publish_folder(staged, final)


def checkpoint_step(checkpoint) -> int:
    return int(Path(checkpoint).name.split("-")[-1]) if checkpoint else 0
