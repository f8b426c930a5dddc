"""A training run described by plain parameters: the names of notebook 03's ``parameters`` cell, read from the
notebook or from a YAML file (``python -m helpers.train --config run.yaml``), checked, and turned into the
:class:`~helpers.recipes.Recipe` and the ``train()`` arguments in one place (:func:`run_config`), so the notebook
and the command line cannot drift apart.

The parameters name what a run changes most (model, data, recipe, length of training, evaluation, checkpoints,
output); every other Recipe field (labels, precision, quantization, learning rate, LoRA rank and targets,
gradient accumulation, checkpointing, seed, ...) goes into ``recipe_overrides``, so the notebook's parameters cell
stays short and a new Recipe field needs no new parameter. A YAML file may also carry what only the command line
needs: ``on_collapse`` and ``fsdp`` (see helpers.distributed).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from helpers.outputs import output_dir as make_output_dir
from helpers.recipes import NAMED_RECIPES, Recipe, named_recipe

NUMBER = (int, float)
# Notebook 03's parameters, with its defaults and the types a value may have (None is allowed where the default is
# None). tests/unit/test_multi_process.py checks that the notebook's parameters cell has exactly these.
PARAMETERS = {
    "model_id": ("embedded", str),
    "revision": (None, str),
    "data": ("shipped", str),
    "recipe_name": ("auto", str),
    "epochs": (1, NUMBER),
    "max_steps": (0, int),
    "batch_size": (4, int),
    "recipe_overrides": ({}, dict),   # any other Recipe field: {"learning_rate": 2e-4, "gradient_accumulation": 8}
    "attn_implementation": (None, str),
    "eval_steps": (100, int),
    "save_steps": (50, int),
    "resume": (True, (bool, str)),
    "max_rows": (None, int),
    "report_to": ("wandb", str),
    "output_dir": ("outputs/03_full_train/fixed", str),
}
# Only in a YAML file: what the notebook sets in its own cells.
COMMAND_LINE_ONLY = {
    "on_collapse": ("stop", str),     # stop | record (see helpers.diagnostics.CollapseMonitor); notebook 03 stops
    "fsdp": (False, bool),            # true: FSDP-QLoRA, launched with configs/accelerate_fsdp_qlora.yaml
}
REPORT_TO = ("wandb", "none")


class RunConfigError(ValueError):
    """A run configuration that names an unknown setting or gives one a value it cannot take."""


@dataclass
class RunConfig:
    """What one training run needs: the recipe, the output folder and the other ``train()`` arguments."""

    parameters: dict
    recipe: Recipe
    out_dir: Path

    def train_kwargs(self) -> dict:
        """The keyword arguments of ``helpers.training.train`` besides the recipe (notebook 03 passes the same)."""
        p = self.parameters
        return {"model_id": p["model_id"], "revision": p["revision"], "data": p["data"], "out_dir": self.out_dir,
                "report_to": p["report_to"], "on_collapse": p["on_collapse"], "max_rows": p["max_rows"],
                "resume": p["resume"], "attn_implementation": p["attn_implementation"]}


def _type_name(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(t.__name__ for t in types)


def _check_value(name: str, value, default, types):
    if value is None and default is None:
        return
    wanted = types if isinstance(types, tuple) else (types,)
    is_bool = isinstance(value, bool)
    if not isinstance(value, wanted) or (is_bool and bool not in wanted):
        raise RunConfigError(f"{name}: {value!r} is not a {_type_name(types)}"
                             + (" (None is allowed: the recipe's own value)" if default is None else ""))


def check_parameters(given: dict, where: str = "the run configuration") -> dict:
    """Every parameter, with defaults filled in; unknown names and values of the wrong type are refused with a
    message that names them (and the closest known name)."""
    known = {**PARAMETERS, **COMMAND_LINE_ONLY}
    recipe_fields = [f.name for f in fields(Recipe) if f.name != "name" and f.name not in PARAMETERS]
    unknown = [name for name in given if name not in known]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(str(name), [*known, *recipe_fields], n=1)
            if close and close[0] in recipe_fields:
                hints.append(f"{name!r} (a Recipe field: set {close[0]!r} under recipe_overrides)")
            else:
                hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise RunConfigError(f"{where}: unknown setting {', '.join(hints)}; known settings: {', '.join(known)}")
    values = {}
    for name, (default, types) in known.items():
        value = given.get(name, default)
        _check_value(name, value, default, types)
        values[name] = dict(value) if isinstance(value, dict) else value
    if values["recipe_name"] not in NAMED_RECIPES:
        raise RunConfigError(f"recipe_name: {values['recipe_name']!r}; choose one of {', '.join(NAMED_RECIPES)}")
    if values["report_to"] not in REPORT_TO:
        raise RunConfigError(f"report_to: {values['report_to']!r}; choose one of {', '.join(REPORT_TO)}")
    if values["on_collapse"] not in ("stop", "record"):
        raise RunConfigError(f"on_collapse: {values['on_collapse']!r}; choose stop or record")
    for name in values["recipe_overrides"]:
        if name in PARAMETERS:
            raise RunConfigError(f"recipe_overrides: {name!r} is set by its own top-level setting; set it there")
        if name not in recipe_fields:
            close = difflib.get_close_matches(str(name), recipe_fields, n=1)
            raise RunConfigError(f"recipe_overrides: {name!r} is not a Recipe field"
                                 + (f" (did you mean {close[0]!r}?)" if close else ""))
    return values


def recipe_from_parameters(values: dict) -> Recipe:
    """The named recipe with the settings the parameters give; a recipe field the parameters leave out keeps the
    recipe's own value."""
    return named_recipe(values["recipe_name"], epochs=values["epochs"], max_steps=values["max_steps"],
                        batch_size=values["batch_size"], eval_steps=values["eval_steps"],
                        save_steps=values["save_steps"], **values["recipe_overrides"])


def run_config(given: dict, where: str = "the run configuration", create_output_dir: bool = True) -> RunConfig:
    """Check ``given`` (parameter name -> value) and build the run: the recipe and the output folder (resolved
    against the project root, as notebooks do; created unless ``create_output_dir`` is False)."""
    values = check_parameters(given, where)
    try:
        recipe = recipe_from_parameters(values)
    except (ValueError, TypeError) as err:
        raise RunConfigError(f"{where}: {err}") from None
    if values["fsdp"] and recipe.quantization == "8bit":
        raise RunConfigError(f"{where}: fsdp needs quantization 4bit or none (8-bit weights cannot be sharded)")
    out = Path(values["output_dir"])
    out_dir = make_output_dir(out) if create_output_dir else out
    return RunConfig(values, recipe, out_dir)


def load_run_config(path: str | Path, create_output_dir: bool = True) -> RunConfig:
    """Read a YAML run configuration (a mapping of parameter names to values) and check it."""
    path = Path(path)
    try:
        given = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunConfigError(f"no run configuration at {path}") from None
    except yaml.YAMLError as err:
        raise RunConfigError(f"{path.name} is not valid YAML: {err}") from None
    if given is None:
        given = {}
    if not isinstance(given, dict):
        raise RunConfigError(f"{path.name}: expected a mapping of settings (name: value), got {type(given).__name__}")
    return run_config(given, where=path.name, create_output_dir=create_output_dir)
