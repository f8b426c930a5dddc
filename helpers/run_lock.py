"""One run at a time per output folder: :class:`RunLock`, and the message a second run gets."""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from helpers.outputs import shown_path

try:
    import fcntl
except ImportError:  # Windows: runs there go without the folder lock
    fcntl = None

LOCK_NAME = "run.lock"


class OutputFolderBusy(RuntimeError):
    """Another run is writing the same output folder."""


class RunLock:
    """An exclusive lock on a run's output folder, held while the run writes there.

    ``fcntl.flock`` on ``out_dir/run.lock``: the kernel releases it when its process ends in any way, so the lock
    of a killed run (the file is left behind, nothing holds it) is taken over; ``took_over`` then describes that
    run. The file records pid, host and start time, for the message a second run gets.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.took_over: dict | None = None
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        if fcntl is None:
            return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = self._holder()
                raise OutputFolderBusy(
                    f"{shown_path(self.folder)} is in use by another training run ({describe_holder(holder)}); "
                    "wait for it to end or choose another out_dir") from None
            # A run releasing its lock deletes the file: if this one was deleted meanwhile, lock the new one.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self._fd = fd
        earlier = self._holder()
        if earlier:
            self.took_over = earlier
        mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(mine).encode(), 0)
        os.fsync(fd)
        return self

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text() or "null")
        except (OSError, ValueError):
            return None

    def release(self):
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still held, so no other run locks the file being deleted
        except OSError:
            pass
        os.close(self._fd)  # closing releases the flock
        self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def describe_holder(holder: dict | None) -> str:
    if not holder:
        return "pid unknown"
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
