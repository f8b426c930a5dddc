"""Project-level promises: pins agree, notebooks are committed clean and parameterized, bad parameters fail clearly."""
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import tomli
import yaml

from helpers.outputs import project_root

ROOT = project_root()


def _pins(lines):
    return {m.group(1).lower(): m.group(2) for line in lines if (m := re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)$", line))}


def test_environment_yml_and_pyproject_pin_the_same_versions():
    project = tomli.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = _pins(project["dependencies"] + project["optional-dependencies"]["dev"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    in_env = _pins(pip_section)
    assert declared, "pyproject pins nothing"
    for name, pinned in declared.items():
        assert in_env.get(name) == pinned, f"{name}: pyproject {pinned}, environment.yml {in_env.get(name)}"
    assert set(in_env) - set(declared) == {"torch"}  # torch is a range in pyproject (its build depends on the machine)


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.name)
def test_notebooks_are_clean_and_parameterized(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and not c.get("execution_count") for c in code), "committed with outputs"
    assert "parameters" in code[0]["metadata"].get("tags", []), "first code cell must be tagged 'parameters'"
    params = "".join(code[0]["source"])
    assert "output_dir" in params and "outputs/" in params
    assert "write_summary" in "".join(code[-1]["source"]), "last cell must write summary.json"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    command = re.search(r"^(make test)\b", readme, re.M).group(1)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command in [line.strip() for line in ci]


def test_bad_training_parameters_fail_with_one_clear_error():
    from helpers.recipes import blog_recipe
    from helpers.training import train

    with pytest.raises(ValueError, match="max_steps must be > 0"):
        blog_recipe(max_steps=0)
    with pytest.raises(ValueError, match="unknown precision 'fp12'"):
        blog_recipe(precision="fp12")
    from helpers.data import DataError
    with pytest.raises(DataError, match="data file not found"):
        train(blog_recipe(quantization="none"), data="missing.jsonl", model=object(), tokenizer=None,
              out_dir=Path("/tmp/never"), report_to="none", verbose=False)


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.name)
def test_papermill_reads_every_parameter(path):
    # papermill silently skips a parameter line it cannot parse (an "=" inside its comment, say); -p then still
    # injects the value but papermill no longer lists or validates that parameter
    import papermill

    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    cell = next(c for c in cells if "parameters" in c["metadata"].get("tags", []))
    lines = "".join(cell["source"]).splitlines()
    assigned = [line.split("=")[0].strip() for line in lines if re.match(r"\w+ = ", line)]
    assert list(papermill.inspect_notebook(str(path))) == assigned


def test_torch_spec_reaches_pip_as_separate_arguments(tmp_path):
    # The README's CUDA line passes an index with the spec; quoted as one pip argument it was "Invalid requirement".
    spec = "torch==2.13.0 --index-url https://wheels.example/cu130"
    printed = subprocess.run(["make", "-n", "-B", "setup", f"TORCH_SPEC={spec}", f"VENV={tmp_path / 'venv'}"],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout
    torch_line = next(line for line in printed.splitlines() if "pip install" in line and "torch==" in line)
    arguments = shlex.split(torch_line)
    assert arguments[-3:] == ["torch==2.13.0", "--index-url", "https://wheels.example/cu130"]


def test_code_runs_on_the_oldest_python_the_readme_promises():
    # README and pyproject promise Python 3.10+; vermin finds the newest language feature or module each file uses
    # (tomllib, 3.11, was imported by this very file).
    promised = re.search(r'requires-python = ">=(3\.\d+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    found = subprocess.run([str(Path(sys.executable).parent / "vermin"), f"--target={promised}-", "--violations", "--no-tips",
                            "--quiet", "helpers", "tests"], cwd=ROOT, capture_output=True, text=True)
    assert found.returncode == 0, found.stdout + found.stderr


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.name)
def test_notebooks_have_cell_ids_and_pass_the_commit_filter_unchanged(path):
    # A cell without an id gets one from JupyterLab on opening, which marks the notebook changed; the nbstripout
    # filter that .gitattributes names must leave a committed notebook exactly as it is.
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    assert all(cell.get("id") for cell in cells), "a cell has no id"
    stripped = subprocess.run([sys.executable, "-m", "nbstripout", "--keep-id", "-t"], input=path.read_text("utf-8"),
                              capture_output=True, text=True, check=True).stdout
    assert stripped == path.read_text(encoding="utf-8")
    assert "*.ipynb filter=nbstripout" in (ROOT / ".gitattributes").read_text()


def test_every_summary_records_peak_gpu_memory(tmp_path):
    from helpers.outputs import write_summary

    summary = json.loads(write_summary(tmp_path, {"notebook": "x"}).read_text(encoding="utf-8"))
    assert {"peak_gpu_allocated_gib", "peak_gpu_reserved_gib"} <= set(summary)
    kept = json.loads(write_summary(tmp_path, {"peak_gpu_allocated_gib": 1.5}).read_text(encoding="utf-8"))
    assert kept["peak_gpu_allocated_gib"] == 1.5  # a run's own figure is not replaced
