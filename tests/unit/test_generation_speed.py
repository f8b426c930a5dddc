"""The generation benchmark at a tiny size on the CPU, so that it cannot rot between GPU sessions."""
import csv
import subprocess
import sys

import pytest

from helpers.outputs import project_root

METHODS = ["generate", "static", "blog"]


def benchmark(*args):
    # benchmarks/ is run as the README says, from the project root (it is not part of the installed package)
    return subprocess.run([sys.executable, "-m", *args], cwd=project_root(), capture_output=True, text=True)


@pytest.mark.slow
def test_every_method_is_timed_at_every_batch_and_lands_in_the_csv(tmp_path):
    built = benchmark("benchmarks.real_shapes", "build", "tiny-gpt-neox", "--work", str(tmp_path),
                      "--result", str(tmp_path / "build.json"))
    assert built.returncode == 0, built.stderr[-2000:]
    results = tmp_path / "generation_speed.csv"
    done = benchmark("benchmarks.generation_speed", "all", "--shape", "tiny-gpt-neox",
                     "--model", str(tmp_path / "tiny-gpt-neox"), "--weights", "random", "--batches", "1", "2",
                     "--new-tokens", "8", "--repeats", "1", "--results", str(results), "--work", str(tmp_path / "work"))
    assert done.returncode == 0, done.stderr[-2000:]
    with results.open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["method"], r["batch"]) for r in rows] == [(m, b) for m in METHODS for b in ("1", "2")]
    assert {"date", "gpu", "model_shape", "method", "batch", "new_tokens", "seconds", "tokens_per_s",
            "bandwidth_floor_s"} <= set(rows[0])
    for row in rows:
        assert float(row["tokens_per_s"]) == pytest.approx(int(row["batch"]) * 8 / float(row["seconds"]), rel=0.05)
    # the static cache decodes the same greedy answers as the dynamic one (same weights, same arithmetic on a CPU)
    assert all(r["matches_generate"] == "1.0" for r in rows if r["method"] in ("generate", "static"))
