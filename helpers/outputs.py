"""Where runs write (only under ``outputs/``), what they record about the environment, and summary.json."""
from __future__ import annotations

import json
import math
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PACKAGES = ["torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "papermill", "wandb",
            "kiwipiepy", "matplotlib"]


def project_root() -> Path:
    """The checkout this package is installed from (editable install), else the current folder."""
    here = Path(__file__).resolve().parent.parent
    return here if (here / "pyproject.toml").exists() else Path.cwd()


def output_dir(path: str | Path) -> Path:
    """Resolve a run's output folder against the project root and create it."""
    path = Path(path)
    path = path if path.is_absolute() else project_root() / path
    path.mkdir(parents=True, exist_ok=True)
    return path


def package_versions() -> dict:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def environment() -> dict:
    """Package versions and the device, for the first cell of every notebook and for run cards."""
    import torch

    from helpers.models import device_description

    return {**package_versions(), "device": device_description(), "cuda": torch.version.cuda}


def _clean(value):
    # json cannot hold NaN/inf; record them as strings so a reader sees them instead of a parse error
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_summary(out_dir: str | Path, summary: dict) -> Path:
    """Write ``summary.json`` (with the environment added) into ``out_dir`` and return its path."""
    out = output_dir(out_dir)
    path = out / "summary.json"
    data = {**summary, "environment": environment()}
    path.write_text(json.dumps(_clean(data), ensure_ascii=False, indent=1, default=str), encoding="utf-8")
    return path
