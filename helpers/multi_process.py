"""What ``train()`` does differently when several processes train one run (helpers.distributed says which process
is which): the main process alone prepares and writes the output folder, the others wait for it and read; every
process stops at the same step."""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainerCallback

from helpers import data as data_mod
from helpers.checkpoints import (check_resumable, choose_checkpoint, data_identity, lock_output_folder,
                                 record_run_inputs, set_aside_earlier_run, tidy_interrupted_writes)
from helpers.distributed import any_process, barrier, is_main_process, process_rank, world_size
from helpers.outputs import writing_into


@dataclass
class RunFolder:
    """An output folder ready for a run: the checkpoint to resume from (None: step 0) and what was found there."""

    lock: object            # the main process's RunLock; None on the others
    checkpoint: Path | None
    skipped: list           # newer checkpoints that were invalid, moved to invalid_checkpoints/
    set_aside: str | None   # where an earlier run's files went
    inputs: dict            # helpers.checkpoints.data_identity

    def release(self):
        if self.lock is not None:
            self.lock.release()


def open_run_folder(out_dir: Path, recipe, data: str, max_rows, resume, verbose: bool) -> RunFolder:
    """Lock ``out_dir``, tidy what an interrupted run left, choose the checkpoint (or move an earlier run aside) and
    record the run's recipe and data: on the main process. The others wait until it is done, then choose the same
    checkpoint without moving anything (the invalid ones are already gone)."""
    inputs = data_identity(data, data_mod.file_sha256(data), max_rows)
    main = is_main_process()
    lock = lock_output_folder(out_dir) if main else None
    try:
        skipped, set_aside = [], None
        if main:
            tidy_interrupted_writes(out_dir)
            checkpoint, skipped = choose_checkpoint(out_dir, resume, verbose)
            if checkpoint is not None:
                check_resumable(out_dir, recipe, inputs)
            else:
                set_aside = set_aside_earlier_run(out_dir, verbose)
            with writing_into(out_dir, "recipe.json"):
                record_run_inputs(out_dir, recipe, inputs)
        barrier()
        if not main:
            checkpoint, _ = choose_checkpoint(out_dir, resume, verbose=False)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return RunFolder(lock, checkpoint, skipped, set_aside, inputs)


def monitor_folder(out_dir: Path) -> Path:
    """Where this process's collapse monitor writes its trace: ``out_dir`` on the main process; a scratch folder
    on the others (their monitors see the same losses, see helpers.distributed, and must not write the trace)."""
    if is_main_process():
        return out_dir
    return Path(tempfile.mkdtemp(prefix=f"monitor-rank{process_rank()}-"))


class StopTogether(TrainerCallback):
    """When the callbacks of any process ask to stop (the collapse monitor, or a user's callback), every process
    stops after the same step: a DDP process that stopped alone would leave the others waiting for it in their next
    gradient all-reduce. train() adds it after every other callback."""

    def on_step_end(self, args, state, control, **kwargs):
        if world_size() > 1 and any_process(control.should_training_stop):
            control.should_training_stop = True
        return control
