"""The first failing step of a run, replayed: the batch whose loss first turned non-finite, run forward again with
the adapter weights and dropout masks it met, under the precision the run trained in, with a headroom probe on
every linear and norm layer."""
from __future__ import annotations

import contextlib

import torch

from helpers.diagnostics.replay import HeadroomProbe, replay_batch
from helpers.fp16_emulation import fp16_range


def replay_context(precision: str):
    """The forward context a training precision ran under: the lab's fp16 range emulation, real fp16 autocast on
    the GPU, or none (bf16 and fp32 runs have fp32's range, so the probe reports their fp16 headroom)."""
    if precision == "fp16_emulated":
        return fp16_range()
    if precision == "fp16":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def replay_first_failure(run) -> tuple[dict | None, HeadroomProbe | None]:
    """``(failing, probe)`` for a finished :func:`helpers.training.train` run: the kept first non-finite batch
    (its ``step``, ``batch``, ``weights`` and ``rng_state``) and the probe of its replay; ``(None, None)`` when no
    step had a non-finite loss."""
    failing = run.trainer.first_nonfinite_batch
    if not failing:
        return None, None
    probe = replay_batch(run.model, failing["batch"], context=replay_context(run.precision),
                         weights=failing["weights"], rng_state=failing["rng_state"])
    return failing, probe
