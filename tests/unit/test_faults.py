"""Faults a long run meets: killed mid-save, damaged checkpoints, two runs in one folder, a killed run's lock, a full
disk, a read-only folder, changed data, an earlier run's files. Nothing is lost, and nothing runs that should not."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager

import pytest
from transformers import TrainerCallback

from helpers.checkpoints import checkpoint_problem
from helpers.diagnostics import read_trace
from helpers.recipes import blog_recipe
from helpers.training import train

RECIPE = dict(quantization="none", precision="fp32", labels="answer_only", learning_rate=1e-3, logging_steps=100,
              optimizer="adamw_torch", gradient_checkpointing=False)

# A run whose torch.save is cut at its second optimizer.pt (the second checkpoint): half the bytes reach the file,
# then the process is SIGKILLed mid-write, as a power cut or an out-of-memory kill would.
KILLED_WHILE_SAVING = textwrap.dedent("""
    import io, os, signal, sys
    import torch
    from helpers.recipes import blog_recipe
    from helpers.training import train

    real_save, optimizer_saves = torch.save, []

    def save_then_die(obj, f, *args, **kwargs):
        if str(f).endswith("optimizer.pt"):
            optimizer_saves.append(f)
            if len(optimizer_saves) == 2 and os.environ.get("KILL_IN_SECOND_CHECKPOINT"):
                buffer = io.BytesIO()
                real_save(obj, buffer, *args, **kwargs)
                with open(f, "wb") as handle:
                    handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                    handle.flush()
                    os.fsync(handle.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *args, **kwargs)

    torch.save = save_then_die
    recipe = blog_recipe(**{RECIPE}, max_steps=int(sys.argv[4]), save_steps=4)
    train(recipe, model_id=sys.argv[1], data=sys.argv[2], out_dir=sys.argv[3], report_to="none", resume=True,
          verbose=False, save_adapter=False)
""").replace("{RECIPE}", repr(RECIPE))


def _rows(path, n=40, answer="답은"):
    with path.open("w", encoding="utf-8") as handle:
        for i in range(n):
            handle.write(json.dumps({"instruction": f"{i}번 질문입니다. 답은 무엇인가요?",
                                     "output": f"{i}번 {answer} {i * 3}입니다."}, ensure_ascii=False) + "\n")
    return path


def _subprocess(tiny_model_dir, data, out_dir, max_steps, **env):
    return subprocess.Popen([sys.executable, "-c", KILLED_WHILE_SAVING, str(tiny_model_dir), str(data), str(out_dir),
                             str(max_steps)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, **env}, start_new_session=True)


def _train(tiny_model_dir, data, out_dir, max_steps, save_steps=2, **kwargs):
    recipe = blog_recipe(**RECIPE, max_steps=max_steps, save_steps=save_steps)
    kwargs = {"save_adapter": False, "verbose": False, **kwargs}
    return train(recipe, model_id=str(tiny_model_dir), data=str(data), out_dir=out_dir, report_to="none", **kwargs)


def _steps(out_dir):
    return [r.step for r in read_trace(out_dir / "trace.jsonl")]


def _checkpoints(out_dir):
    return sorted(p.name for p in (out_dir / "checkpoints").iterdir())


class _AtStep(TrainerCallback):
    """Runs ``action`` at the end of optimizer step ``step``, after the run's monitor has traced it."""

    def __init__(self, step, action):
        self.step, self.action = step, action

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.action()


def test_a_run_killed_while_saving_a_checkpoint_resumes_from_the_previous_one(tiny_model_dir, tmp_path):
    data, out = _rows(tmp_path / "rows.jsonl"), tmp_path / "run"
    victim = _subprocess(tiny_model_dir, data, out, 12, KILL_IN_SECOND_CHECKPOINT="1")
    assert victim.wait(timeout=600) == -signal.SIGKILL, victim.stderr.read().decode()[-2000:]
    assert _checkpoints(out) == ["checkpoint-4", "staging"]  # the half checkpoint-8 never got its name

    resumed = _subprocess(tiny_model_dir, data, out, 12)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read().decode()[-2000:]
    card = json.loads((out / "run_card.json").read_text())
    assert card["resumed_from"] == os.path.join("checkpoints", "checkpoint-4") and card["global_step"] == 12
    assert _steps(out) == list(range(1, 13))
    assert _checkpoints(out) == ["checkpoint-12", "checkpoint-8"]


def _truncate_adapter(folder):
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _drop_trainer_state(folder):
    (folder / "trainer_state.json").unlink()


@pytest.mark.parametrize("damage, problem", [(_truncate_adapter, r"adapter_model\.safetensors has \d+ bytes, its "
                                                                  r"header describes \d+"),
                                             (_drop_trainer_state, "no trainer_state.json")])
def test_resume_skips_a_damaged_newest_checkpoint(tiny_model_dir, tmp_path, damage, problem):
    data, out = _rows(tmp_path / "rows.jsonl"), tmp_path / "run"
    _train(tiny_model_dir, data, out, max_steps=4)
    damage(out / "checkpoints" / "checkpoint-4")
    with pytest.warns(UserWarning, match=rf"resume: skipped checkpoint-4 \({problem}\); moved it to "
                                         r"invalid_checkpoints/"):
        run = _train(tiny_model_dir, data, out, max_steps=6, resume=True)
    assert run.summary["resumed_from"] == os.path.join("checkpoints", "checkpoint-2")
    assert run.summary["global_step"] == 6 and _steps(out) == [1, 2, 3, 4, 5, 6]
    assert checkpoint_problem(out / "invalid_checkpoints" / "checkpoint-4")  # kept for a look, out of the way
    assert _checkpoints(out) == ["checkpoint-4", "checkpoint-6"]


def test_resume_drops_a_trace_line_torn_by_a_kill(tiny_model_dir, tmp_path):
    data, out = _rows(tmp_path / "rows.jsonl"), tmp_path / "run"
    _train(tiny_model_dir, data, out, max_steps=4)
    with (out / "trace.jsonl").open("a") as trace:  # a kill in the middle of appending step 5
        trace.write('{"step": 5, "raw_loss": 3.1')
    run = _train(tiny_model_dir, data, out, max_steps=6, resume=True)
    assert run.summary["resumed_from"] == os.path.join("checkpoints", "checkpoint-4")
    assert _steps(out) == [1, 2, 3, 4, 5, 6]


def _started_long_run(tiny_model_dir, tmp_path, out):
    run = _subprocess(tiny_model_dir, _rows(tmp_path / "rows.jsonl"), out, 100_000)
    deadline = time.time() + 600
    while not (out / "trace.jsonl").exists() or not (out / "trace.jsonl").read_text().count("\n"):
        assert run.poll() is None, run.stderr.read().decode()[-2000:]
        assert time.time() < deadline
        time.sleep(0.05)
    return run


def test_a_second_run_into_a_busy_folder_stops_and_names_the_first(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    first = _started_long_run(tiny_model_dir, tmp_path, out)
    try:
        with pytest.raises(RuntimeError, match=rf"run is in use by another training run \(pid {first.pid} on "
                                               r"\S+, started [\d-]+ [\d:]+\); wait for it to end or choose another"):
            _train(tiny_model_dir, tmp_path / "rows.jsonl", out, max_steps=2, resume=True)
        assert first.poll() is None  # the first run goes on, untouched
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()


def test_the_lock_of_a_killed_run_is_taken_over(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    killed = _started_long_run(tiny_model_dir, tmp_path, out)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    with pytest.warns(UserWarning, match=rf"took over the lock of an earlier run \(pid {killed.pid} on \S+, "
                                         r"started [\d-]+ [\d:]+\), which is no longer running"):
        run = _train(tiny_model_dir, tmp_path / "rows.jsonl", out, max_steps=2)
    assert run.summary["took_over_lock_of"]["pid"] == killed.pid and run.summary["global_step"] == 2
    assert not (out / "run.lock").exists()  # released when the run ended


def test_a_fresh_run_sets_an_earlier_run_aside_and_its_resume_never_uses_that_runs_checkpoints(tiny_model_dir,
                                                                                               tmp_path):
    data, out = _rows(tmp_path / "rows.jsonl"), tmp_path / "run"
    _train(tiny_model_dir, data, out, max_steps=6)  # leaves checkpoint-4 and checkpoint-6

    def interrupt():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # a new run from step 0, stopped after its own checkpoint-2
        _train(tiny_model_dir, data, out, max_steps=6, callbacks=[_AtStep(3, interrupt)])
    run = _train(tiny_model_dir, data, out, max_steps=6, resume=True)
    assert run.summary["resumed_from"] == os.path.join("checkpoints", "checkpoint-2")
    assert _steps(out) == [1, 2, 3, 4, 5, 6]  # no gap where the earlier run's checkpoint-6 would have left one
    earlier = list((out / "earlier_runs").iterdir())
    assert len(earlier) == 1 and sorted(p.name for p in (earlier[0] / "checkpoints").iterdir()) == \
        ["checkpoint-4", "checkpoint-6"]
    assert [r.step for r in read_trace(earlier[0] / "trace.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_a_different_data_file_and_names_it(tiny_model_dir, tmp_path):
    data, out = _rows(tmp_path / "rows.jsonl"), tmp_path / "run"
    _train(tiny_model_dir, data, out, max_steps=2)
    other = _rows(tmp_path / "other.jsonl", answer="정답은")
    with pytest.raises(ValueError, match=r"different recipe or data \(data: 'rows.jsonl' \(sha256 [0-9a-f]{12}\) -> "
                                         r"'other.jsonl' \(sha256 [0-9a-f]{12}\)\)"):
        _train(tiny_model_dir, other, out, max_steps=4, resume=True)
    same = shutil.copy(data, tmp_path / "moved.jsonl")  # the same rows under another name resume
    run = _train(tiny_model_dir, same, out, max_steps=4, resume=True)
    assert run.summary["resumed_from"] == os.path.join("checkpoints", "checkpoint-2")


# ------------------------------------------------------------------------------------- full and read-only disks

@contextmanager
def _small_disk(folder, megabytes):
    """A tmpfs of the given size: a disk that fills up for real. Needs root and mount."""
    folder.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a full disk needs a small tmpfs, which needs root and mount")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mount -t tmpfs failed: {done.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _fill(disk):
    """Write a file until the disk is full, in shrinking pieces so that not even a page is left."""
    with (disk / "filler").open("ab", buffering=0) as handle:  # unbuffered: nothing left to fail at close
        for size in (2**20, 2**12, 1):
            try:
                while True:
                    handle.write(b"\0" * size)
            except OSError:
                pass


def test_a_full_disk_at_a_checkpoint_leaves_the_earlier_one_and_says_what_is_needed(tiny_model_dir, tmp_path):
    data = _rows(tmp_path / "rows.jsonl")
    with _small_disk(tmp_path / "disk", 200) as disk:
        out = disk / "run"
        with pytest.raises(OSError, match=r"^no space left in \S+run/checkpoints while writing checkpoint-4 \(about "
                                          r"[\d.,]+ [KMG]iB needed, [\d.,]+ [KMG]iB free\); every earlier checkpoint is "
                                          r"intact; free some space or choose another out_dir"):
            _train(tiny_model_dir, data, out, max_steps=6, callbacks=[_AtStep(4, lambda: _fill(disk))])
        assert _checkpoints(out) == ["checkpoint-2"] and checkpoint_problem(out / "checkpoints" / "checkpoint-2") \
            is None
        (disk / "filler").unlink()
        run = _train(tiny_model_dir, data, out, max_steps=6, resume=True)
        assert run.summary["resumed_from"] == os.path.join("checkpoints", "checkpoint-2")
        assert _steps(out) == [1, 2, 3, 4, 5, 6]


def test_a_disk_too_small_for_the_run_stops_it_before_training(tiny_model_dir, tmp_path):
    data = _rows(tmp_path / "rows.jsonl")
    with _small_disk(tmp_path / "disk", 60) as disk:  # room for the tokenizer, not for three checkpoints beside it
        out = disk / "run"
        with pytest.raises(OSError, match=r"^not enough free space in \S+run for this run's checkpoints and adapter: "
                                          r"about [\d.,]+ [KMG]iB needed, [\d.,]+ [KMG]iB free; free some space or "
                                          r"choose another out_dir$"):
            _train(tiny_model_dir, data, out, max_steps=6, save_adapter=True)
        assert not (out / "checkpoints").exists() and not (out / "adapter.partial").exists()
        assert not (out / "trace.jsonl").exists() or not _steps(out)  # no training time spent


def test_a_full_disk_at_the_final_save_leaves_the_earlier_adapter_whole(tiny_model_dir, tmp_path):
    data = _rows(tmp_path / "rows.jsonl")
    with _small_disk(tmp_path / "disk", 200) as disk:
        out = disk / "run"
        _train(tiny_model_dir, data, out, max_steps=2, save_adapter=True)
        before = {p.name: p.read_bytes() for p in (out / "adapter").iterdir()}
        with pytest.raises(OSError, match=r"^no space left in \S+run while writing the adapter \(about [\d.,]+ [KMG]iB "
                                          r"needed, [\d.,]+ [KMG]iB free\); the earlier adapter/ \(if any\) is intact"):
            _train(tiny_model_dir, data, out, max_steps=3, save_steps=0, save_adapter=True, resume=True,
                   callbacks=[_AtStep(3, lambda: _fill(disk))])  # no checkpoint at the end: the adapter meets it
        assert {p.name: p.read_bytes() for p in (out / "adapter").iterdir()} == before
        assert not (out / "adapter.partial").exists()
        (disk / "filler").unlink()
        run = _train(tiny_model_dir, data, out, max_steps=3, save_steps=0, save_adapter=True, resume=True)
        assert run.summary["global_step"] == 3 and (out / "adapter" / "adapter_model.safetensors").exists()


def test_a_read_only_out_dir_stops_at_once_with_one_message(tiny_model_dir, tmp_path):
    data = _rows(tmp_path / "rows.jsonl")
    with _small_disk(tmp_path / "disk", 200) as disk:
        out = disk / "run"
        _train(tiny_model_dir, data, out, max_steps=2)
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        with pytest.raises(OSError, match=r"^cannot write to \S+run \(Read-only file system\) while writing its lock "
                                          r"file; choose another out_dir or make this one writable"):
            _train(tiny_model_dir, data, out, max_steps=4, resume=True, model=object())  # fails before any load
        assert checkpoint_problem(out / "checkpoints" / "checkpoint-2") is None
