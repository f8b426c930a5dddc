"""Training on several processes: the command line and notebook 03 share one mapping of parameters; two processes
(gloo, on the CPU) see the data and the losses of one process with twice the batch; a two-process run killed
part-way resumes on two processes; a collapse that starts on one process stops both; FSDP-QLoRA's 4-bit storage."""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import yaml

from helpers.diagnostics import read_trace
from helpers.distributed import for_fsdp, quantized_device_map
from helpers.models.quantization import quantization_config
from helpers.outputs import project_root
from helpers.run_config import PARAMETERS, RunConfigError, load_run_config, run_config

# Runs helpers.train's command line in each process, recording what each optimizer step's batches held; environment
# variables make one process's forward non-finite from a step on (POISON_RANK, POISON_FROM), or slow the steps
# from one on (PAUSE_FROM) so that a test can kill the run between two checkpoints.
DRIVER = textwrap.dedent("""
    import json, os, sys, time
    import torch
    from helpers import train as command_line
    from helpers.trainer import LabTrainer

    rank, record = int(os.environ.get("RANK", "0")), sys.argv[2]
    poison_rank, poison_from = int(os.environ.get("POISON_RANK", "-1")), int(os.environ.get("POISON_FROM", "0"))
    pause_from = int(os.environ.get("PAUSE_FROM", "0"))
    original = LabTrainer.training_step

    def recorded(self, model, inputs, num_items_in_batch=None):
        step = self.state.global_step + 1
        rows = [ids[mask.bool()].tolist() for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"])]
        with open(os.path.join(record, f"rank{rank}.jsonl"), "a") as handle:
            handle.write(json.dumps({"step": step, "rows": rows}) + "\\n")
        if rank == poison_rank and step >= poison_from:
            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))
        if pause_from and step >= pause_from:
            time.sleep(0.5)
        return original(self, model, inputs, num_items_in_batch)

    LabTrainer.training_step = recorded
    sys.exit(command_line.main(["--config", sys.argv[1]]))
""")
MAX_STEPS, SAVE_STEPS = 24, 8


def _rows(path, n=80):
    with path.open("w", encoding="utf-8") as handle:
        for i in range(n):
            handle.write(json.dumps({"instruction": f"{i}번 질문입니다. 답은 무엇인가요?" + " 자세히" * (i % 5),
                                     "output": f"{i}번 답은 {i * 3}입니다."}, ensure_ascii=False) + "\n")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(folder, model_dir, data, processes, batch_size, env=None):
    """Start a run of the fixed recipe (fp32, no dropout: the same math however the batch is split) in
    folder/out with `processes` processes; returns the Popen. Its batches are recorded in folder/batches."""
    (folder / "batches").mkdir(parents=True, exist_ok=True)
    config = {"model_id": str(model_dir), "data": str(data), "recipe_name": "fixed", "max_steps": MAX_STEPS,
              "batch_size": batch_size, "eval_steps": 0, "save_steps": SAVE_STEPS, "report_to": "none",
              "output_dir": str(folder / "out"),
              "recipe_overrides": {"quantization": "none", "precision": "fp32", "learning_rate": 1e-3,
                                   "lora_dropout": 0.0, "logging_steps": 2, "optimizer": "adamw_torch"}}
    (folder / "run.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    (folder / "driver.py").write_text(DRIVER, encoding="utf-8")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                "--master_port", str(_free_port())] if processes > 1 else [sys.executable]
    return subprocess.Popen([*launcher, str(folder / "driver.py"), str(folder / "run.yaml"), str(folder / "batches")],
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)


def _kill(process):
    """SIGKILL the launcher and its workers, as a crash would: torch.distributed.run starts each worker in a session
    of its own, so killing the launcher's process group alone leaves them training."""
    children = f"/proc/{process.pid}/task/{process.pid}/children"
    for pid in open(children).read().split() if os.path.exists(children) else []:
        os.killpg(int(pid), signal.SIGKILL)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _finish(process, timeout=1800):  # minutes on a loaded 2-core machine; seconds on a quiet one
    try:
        _, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(process)
        raise AssertionError("the run did not end (a process waiting for another that stopped?)") from None
    assert process.returncode == 0, err.decode()[-3000:]


def _batches(folder, ranks):
    """Step -> the sorted real tokens of every example of that step, over all ranks."""
    steps = {}
    for rank in range(ranks):
        for line in (folder / "batches" / f"rank{rank}.jsonl").read_text().splitlines():
            record = json.loads(line)
            steps.setdefault(record["step"], []).extend(record["rows"])
    return {step: sorted(rows) for step, rows in steps.items()}


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """The same run twice, uninterrupted: two processes of batch 2, one process of batch 4."""
    root = tmp_path_factory.mktemp("multi_process")
    data = _rows(root / "rows.jsonl")
    two, one, scratch = root / "two", root / "one", root / "tmp"
    scratch.mkdir()
    _finish(_start(two, tiny_model_dir, data, processes=2, batch_size=2, env={"TMPDIR": str(scratch)}))
    _finish(_start(one, tiny_model_dir, data, processes=1, batch_size=4))
    return {"data": data, "two": two, "one": one, "scratch": scratch}


def test_two_processes_match_one_with_twice_the_batch(runs):
    two, one = runs["two"], runs["one"]
    assert _batches(two, 2) == _batches(one, 1)  # step by step, the same examples
    card_two = json.loads((two / "out" / "run_card.json").read_text())
    card_one = json.loads((one / "out" / "run_card.json").read_text())
    assert card_two["processes"] == 2 and card_one["processes"] == 1
    assert card_two["global_step"] == card_one["global_step"] == MAX_STEPS
    assert card_two["real_tokens"] == card_one["real_tokens"]  # summed over both processes
    trace_two, trace_one = read_trace(two / "out" / "trace.jsonl"), read_trace(one / "out" / "trace.jsonl")
    assert [r.step for r in trace_two] == list(range(1, MAX_STEPS + 1))
    for mine, theirs in zip(trace_two, trace_one):
        assert mine.raw_loss == pytest.approx(theirs.raw_loss, rel=1e-4, abs=1e-5), f"step {mine.step}"
        assert mine.grad_norm == pytest.approx(theirs.grad_norm, rel=1e-3, abs=1e-5), f"step {mine.step}"
        assert mine.learning_rate == pytest.approx(theirs.learning_rate, rel=1e-6)
    assert trace_one[-1].raw_loss < trace_one[0].raw_loss  # it trained
    # The main process alone wrote the folder: one trace, the adapter, checkpoints with each rank's random state.
    assert (two / "out" / "adapter" / "adapter_model.safetensors").exists()
    assert {p.name for p in (two / "out" / "checkpoints" / f"checkpoint-{MAX_STEPS}").glob("rng_state*")} == \
        {"rng_state_0.pth", "rng_state_1.pth"}
    assert not list(runs["scratch"].glob("monitor-rank*"))  # the other process's monitor cleaned up after itself


def test_two_process_run_killed_resumes_on_two(runs, tiny_model_dir, tmp_path):
    folder = tmp_path / "killed"
    victim = _start(folder, tiny_model_dir, runs["data"], processes=2, batch_size=2,
                    env={"PAUSE_FROM": str(SAVE_STEPS + 1)})
    trace = folder / "out" / "trace.jsonl"
    deadline = time.time() + 1800
    while not ((folder / "out" / "checkpoints" / f"checkpoint-{SAVE_STEPS}" / "trainer_state.json").exists()
               and trace.exists() and trace.read_text().count("\n") >= SAVE_STEPS + 2):
        assert victim.poll() is None, victim.stderr.read().decode()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    _kill(victim)
    assert SAVE_STEPS + 2 <= len(read_trace(trace)) < 2 * SAVE_STEPS

    _finish(_start(folder, tiny_model_dir, runs["data"], processes=2, batch_size=2))
    card = json.loads((folder / "out" / "run_card.json").read_text())
    assert card["global_step"] == MAX_STEPS and card["resumed_from"].endswith(f"checkpoint-{SAVE_STEPS}")
    resumed, full = read_trace(trace), read_trace(runs["two"] / "out" / "trace.jsonl")
    assert [r.step for r in resumed] == list(range(1, MAX_STEPS + 1))  # none lost, none repeated
    for mine, theirs in zip(resumed, full):
        assert mine.raw_loss == pytest.approx(theirs.raw_loss, rel=1e-4, abs=1e-5), f"step {mine.step}"


def test_collapse_on_one_process_stops_both(runs, tiny_model_dir, tmp_path):
    folder = tmp_path / "poisoned"
    run = _start(folder, tiny_model_dir, runs["data"], processes=2, batch_size=2,
                 env={"POISON_RANK": "1", "POISON_FROM": "3"})
    _finish(run)  # a process that stopped alone would leave the other waiting: the run would not end
    card = json.loads((folder / "out" / "run_card.json").read_text())
    assert card["collapse"]["collapsed"] and card["collapse"]["first_nonfinite_step"] == 3
    assert card["stopped_at"] is not None and card["global_step"] == card["stopped_at"] < MAX_STEPS
    steps = {rank: max(json.loads(line)["step"] for line in
                       (folder / "batches" / f"rank{rank}.jsonl").read_text().splitlines()) for rank in (0, 1)}
    assert steps == {0: card["stopped_at"], 1: card["stopped_at"]}  # both stopped after the same step
    assert (folder / "out" / "last_good" / "step.txt").read_text() == "2"


def test_notebook_03_parameters_are_the_command_line_settings():
    notebook = json.loads((project_root() / "notebooks" / "03_full_train.ipynb").read_text(encoding="utf-8"))
    cell = next(c for c in notebook["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    values = {}
    exec("".join(cell["source"]), {}, values)
    assert values == {name: default for name, (default, _) in PARAMETERS.items()}


def test_run_configuration_errors_name_the_setting(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("recipe_name: fixed\nlearning_rat: 0.001\n", encoding="utf-8")
    with pytest.raises(RunConfigError, match="unknown setting 'learning_rat' \\(a Recipe field: set 'learning_rate' "
                                             "under recipe_overrides\\)"):
        load_run_config(path, create_output_dir=False)
    with pytest.raises(RunConfigError, match="unknown setting 'max_step' \\(did you mean 'max_steps'\\?\\)"):
        run_config({"max_step": 3}, create_output_dir=False)
    with pytest.raises(RunConfigError, match="batch_size: 'four' is not a int"):
        run_config({"batch_size": "four"}, create_output_dir=False)
    with pytest.raises(RunConfigError, match="unknown precision 'fp8'"):
        run_config({"recipe_overrides": {"precision": "fp8"}}, create_output_dir=False)
    with pytest.raises(RunConfigError, match="recipe_overrides: 'max_steps' is set by its own top-level setting"):
        run_config({"recipe_overrides": {"max_steps": 3}}, create_output_dir=False)
    config = run_config({"recipe_name": "fast", "recipe_overrides": {"lora_r": 16, "lora_alpha": 64,
                                                                      "lora_dropout": 0.0}},
                        create_output_dir=False)
    assert (config.recipe.name, config.recipe.lora_alpha, config.recipe.lora_dropout) == ("fast", 64, 0.0)
    assert config.train_kwargs()["on_collapse"] == "stop"


def test_shipped_run_configurations_check():
    for name in ("run.yaml", "run_fsdp_qlora.yaml"):
        config = load_run_config(project_root() / "configs" / name, create_output_dir=False)
        assert config.recipe.validate()
    assert load_run_config(project_root() / "configs" / "run_fsdp_qlora.yaml", False).parameters["fsdp"]


def test_fsdp_qlora_stores_4bit_weights_in_the_compute_dtype(monkeypatch):
    stored = for_fsdp(quantization_config("4bit", compute_dtype=torch.bfloat16), torch.bfloat16, fsdp=True)
    assert stored.bnb_4bit_quant_storage == torch.bfloat16 and stored.to_dict()["bnb_4bit_quant_storage"] == "bfloat16"
    plain = for_fsdp(quantization_config("4bit", compute_dtype=torch.bfloat16), torch.bfloat16, fsdp=False)
    assert plain.bnb_4bit_quant_storage == torch.uint8
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert quantized_device_map() is None  # FSDP places the shards itself
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert quantized_device_map() == {"": 1 if torch.cuda.is_available() else "cpu"}  # each process its own GPU
