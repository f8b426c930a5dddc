"""The training speed benchmark at a tiny size on the CPU, so that it cannot rot between GPU sessions."""
import csv
import json
import math
import subprocess
import sys

import pytest

from helpers.outputs import project_root

ROWS = ["blog", "baseline", "fast"]


def benchmark(*args):
    # benchmarks/ is run as the README says, from the project root (it is not part of the installed package)
    return subprocess.run([sys.executable, "-m", *args], cwd=project_root(), capture_output=True, text=True)


@pytest.mark.slow
def test_each_recipe_is_timed_in_its_own_process_and_lands_in_the_csv(tmp_path):
    built = benchmark("benchmarks.real_shapes", "build", "tiny-gpt-neox", "--work", str(tmp_path),
                      "--result", str(tmp_path / "build.json"))
    assert built.returncode == 0, built.stderr[-2000:]
    results = tmp_path / "train_speed.csv"
    done = benchmark("benchmarks.train_speed", "all", "--shape", "tiny-gpt-neox",
                     "--model", str(tmp_path / "tiny-gpt-neox"), "--weights", "random", "--rows", ",".join(ROWS),
                     "--train-tokens", "600", "--warmup-steps", "1", "--timed-steps", "2", "--tokens-per-step", "1024",
                     "--results", str(results), "--work", str(tmp_path / "work"))
    assert done.returncode == 0, done.stderr[-3000:]
    with results.open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["recipe"] for r in rows] == ROWS
    assert {"date", "gpu", "model_shape", "weights", "recipe", "tokens_per_s", "seconds_per_step", "peak_gib",
            "estimated_peak_gib", "mfu", "eval_loss", "torch", "transformers", "peft", "bitsandbytes",
            "tokens_per_step", "packing", "gradient_checkpointing", "optimizer"} <= set(rows[0])
    for row in rows:
        assert row["weights"] == "random" and row["model_shape"] == "tiny-gpt-neox"
        assert float(row["tokens_per_s"]) > 0 and float(row["seconds_per_step"]) > 0 and int(row["timed_steps"]) >= 2
        assert 0 < float(row["mfu"]) and float(row["estimated_peak_gib"]) > 0
        # every row is evaluated the same way, after at least the same training tokens
        assert math.isfinite(float(row["eval_loss"])) and int(row["eval_at_tokens"]) >= 600
    by_name = {r["recipe"]: r for r in rows}
    assert by_name["fast"]["packing"] == "True" and by_name["baseline"]["packing"] == "False"
    assert by_name["fast"]["tokens_per_step"] == "1024" and by_name["baseline"]["batch_size"] == "2"
    assert by_name["blog"]["labels"] == "blog" and by_name["fast"]["labels"] == "answer_only"
    # a packed step of ~1,024 real tokens: tokens/s x seconds/step gives the tokens of a timed step back
    fast = by_name["fast"]
    assert float(fast["tokens_per_s"]) * float(fast["seconds_per_step"]) == pytest.approx(1024, rel=0.5)


@pytest.mark.slow
def test_the_profiler_profiles_the_fast_recipe_at_the_step_asked(tmp_path):
    built = benchmark("benchmarks.real_shapes", "build", "tiny-gpt-neox", "--work", str(tmp_path),
                      "--result", str(tmp_path / "build.json"))
    assert built.returncode == 0, built.stderr[-2000:]
    done = benchmark("benchmarks.profile_train", str(tmp_path / "tiny-gpt-neox"), "--recipe", "fast",
                     "--tokens-per-step", "512", "--out", str(tmp_path / "profile"))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "profile" / "summary_fast_512tok_none.json").read_text())
    assert summary["recipe"] == "fast" and summary["tokens_per_step"] == 512 and summary["torch_compile"] is False
    assert summary["seconds_per_profiled_step"] > 0
    assert "aten::" in (tmp_path / "profile" / "ops_by_cpu_fast_512tok_none.txt").read_text()
