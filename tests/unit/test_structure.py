"""The shape of the house: small modules split by concern, no class hidden in a function, notebooks that teach."""
import ast
import json

import pytest

from helpers.outputs import project_root

ROOT = project_root()
# Known gaps, kept visible (strict: each fails the suite once it is fixed, so the mark comes off with the fix).
OVER_SIZE = {}
LONG_PARAMETERS = set()  # parameters cells over 15 lines


def _known(reason):
    return pytest.mark.xfail(strict=True, reason=reason)


MODULES = [pytest.param(p, marks=_known(OVER_SIZE[p.name])) if p.name in OVER_SIZE else p
           for p in sorted((ROOT / "helpers").rglob("*.py"))]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
SHORT_CELL_NOTEBOOKS = [pytest.param(p, marks=_known("parameters cell over 15 lines")) if p.name in LONG_PARAMETERS
                        else p for p in NOTEBOOKS]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_every_module_is_small_and_defines_classes_at_module_level(path):
    source = path.read_text(encoding="utf-8")
    assert len(source.splitlines()) <= 330, f"{path.name}: split it by concern"
    for function in (n for n in ast.walk(ast.parse(source)) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
        nested = [n.name for n in ast.walk(function) if isinstance(n, ast.ClassDef)]
        assert not nested, f"{path.name}: class {nested} defined inside {function.name}()"


def _cells(path):
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


@pytest.mark.parametrize("path", SHORT_CELL_NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_teach_in_short_cells(path):
    cells = _cells(path)
    code = [c for c in cells if c["cell_type"] == "code"]
    markdown = [c for c in cells if c["cell_type"] == "markdown"]
    long_cells = [i for i, c in enumerate(cells)
                  if c["cell_type"] == "code" and len("".join(c["source"]).splitlines()) > 15]
    assert not long_cells, f"code cells over 15 lines: {long_cells}"
    assert 2 * len(markdown) >= len(code), f"{len(markdown)} markdown cells for {len(code)} code cells"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_code_cell_follows_a_sentence_and_the_notebook_ends_with_what_the_run_showed(path):
    cells = _cells(path)
    for index, (before, cell) in enumerate(zip(cells, cells[1:]), start=1):
        if cell["cell_type"] == "code" and "parameters" not in cell["metadata"].get("tags", []):
            assert before["cell_type"] == "markdown", f"cell {index} has no sentence before it"
    last_code = "".join([c for c in cells if c["cell_type"] == "code"][-1]["source"])
    assert "from helpers.reports import" in last_code and "_conclusion" in last_code, \
        "the last code cell states what the run showed, computed by helpers.reports from the run's numbers"


def test_the_trainer_the_readme_names_exists_at_module_level():
    from transformers import Trainer

    from helpers.trainer import LabTrainer

    assert issubclass(LabTrainer, Trainer) and LabTrainer.__qualname__ == "LabTrainer"
