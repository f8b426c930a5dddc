"""A training run killed part-way resumes from its last checkpoint: no lost steps, and the curve continues."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from helpers.diagnostics import read_trace

SCRIPT = textwrap.dedent("""
    import sys
    from helpers.recipes import blog_recipe
    from helpers.training import train
    recipe = blog_recipe(quantization="none", precision="fp32", labels="answer_only", learning_rate=1e-3, max_steps=40,
                         save_steps=16, logging_steps=4, optimizer="adamw_torch", gradient_checkpointing=False,
                         group_by_length=True, labelled_logits_only=True)  # as notebook 03's fixed recipe
    train(recipe, model_id=sys.argv[1], data=sys.argv[2], out_dir=sys.argv[3], report_to="none", resume=True,
          verbose=False, save_adapter=False)
""")


def _rows(path, n=60):
    with path.open("w", encoding="utf-8") as handle:
        for i in range(n):
            handle.write(json.dumps({"instruction": f"{i}번 질문입니다. 답은 무엇인가요?",
                                     "output": f"{i}번 답은 {i * 3}입니다."}, ensure_ascii=False) + "\n")
    return path


def _steps_traced(path):
    """Whole lines only: the run may be writing the next one."""
    return path.read_text().count("\n") if path.exists() else 0


def _train(tiny_model_dir, data, out_dir):
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(tiny_model_dir), str(data), str(out_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def test_killed_run_resumes_without_lost_steps(tiny_model_dir, tmp_path):
    data = _rows(tmp_path / "rows.jsonl")
    # The reference: the same run, never interrupted.
    reference = _train(tiny_model_dir, data, tmp_path / "reference")
    assert reference.wait(timeout=600) == 0, reference.stderr.read().decode()[-2000:]
    full = read_trace(tmp_path / "reference" / "trace.jsonl")

    # The run under test: killed (SIGKILL, no clean-up) two steps after its first checkpoint, so that there is
    # work to lose; the next checkpoint is 14 steps further, a margin that a fixed sleep on a fast machine lacked.
    out = tmp_path / "killed"
    victim = _train(tiny_model_dir, data, out)
    deadline = time.time() + 600
    while not ((out / "checkpoints" / "checkpoint-16" / "trainer_state.json").exists()
               and _steps_traced(out / "trace.jsonl") >= 18):
        assert victim.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.01)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    before = read_trace(out / "trace.jsonl")
    assert 18 <= len(before) < 32, f"killed at step {len(before)}"

    resumed = _train(tiny_model_dir, data, out)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read().decode()[-2000:]
    card = json.loads((out / "run_card.json").read_text())
    assert card["global_step"] == 40 and card["resumed_from"].endswith("checkpoint-16")
    trace = read_trace(out / "trace.jsonl")
    assert [r.step for r in trace] == list(range(1, 41))  # every step once: none lost, none repeated
    # The resumed curve continues the uninterrupted one: same data order, same weights, same losses.
    for mine, theirs in zip(trace, full):
        assert mine.raw_loss == pytest.approx(theirs.raw_loss, rel=1e-4, abs=1e-4), f"step {mine.step}"
        assert mine.learning_rate == pytest.approx(theirs.learning_rate, rel=1e-6)


def test_resuming_a_finished_run_trains_no_step_past_its_schedule(tiny_model_dir, tmp_path):
    # A second `make run` finds notebook 03's finished run and resumes from its last checkpoint: nothing to train.
    from safetensors.torch import load_file

    from helpers.recipes import fixed_recipe
    from helpers.training import train

    recipe = fixed_recipe(quantization="none", precision="fp32", max_steps=4, save_steps=2, logging_steps=1,
                          batch_size=2)  # 4 of the 8 steps of an epoch: the stop falls mid-epoch
    out = tmp_path / "run"
    adapters = []
    for _ in range(2):
        run = train(recipe, model_id=str(tiny_model_dir), data=_rows(tmp_path / "rows.jsonl", 16), out_dir=out,
                    report_to="none", resume=True, verbose=False)
        adapters.append(load_file(out / "adapter" / "adapter_model.safetensors"))
        assert run.summary["global_step"] == 4 and len(read_trace(out / "trace.jsonl")) == 4
    assert run.summary["resumed_from"].endswith("checkpoint-4")
    assert adapters[0].keys() == adapters[1].keys()
    assert all((adapters[0][key] == adapters[1][key]).all() for key in adapters[0])  # the finished run's weights
