"""Training on several processes at once (``accelerate launch`` or ``torchrun``, one process per GPU): which
process this is, the device it trains on, what only the main process writes, and decisions every process takes
together.

- Each process loads its model on its own GPU (``LOCAL_RANK``), not on GPU 0: :func:`quantized_device_map`.
- Under FSDP (``accelerate launch --config_file configs/accelerate_fsdp_qlora.yaml``) a 4-bit base stores its
  packed weights in the compute dtype (``bnb_4bit_quant_storage``), as PEFT's FSDP-QLoRA guide and bitsandbytes'
  ``fsdp_qlora`` page describe: FSDP shards floating-point tensors only. :func:`for_fsdp`.
- The output folder (lock, recipe.json, checkpoints' publishing, trace, adapter, run card) is written by the main
  process; the others wait at :func:`barrier` where they must see what it wrote.
- Every process's collapse monitor sees the step loss averaged over all processes (:func:`mean_across_processes`,
  from LabTrainer), so they reach the same verdict at the same step; ``StopTogether`` makes any other stop
  asked on one process a stop of all (a DDP process that stopped alone would leave the others waiting for it);
  it and the run folder's preparation across processes are in helpers.multi_process.

Data order: Trainer shards each epoch's seeded permutation batch by batch (accelerate's seedable sampler), so N
processes of ``batch_size`` examples see, step by step, the examples one process of N x ``batch_size`` would.
``batch_size`` and ``tokens_per_step`` of a recipe are per process.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

FSDP_ENVIRONMENT = "ACCELERATE_USE_FSDP"  # set by accelerate launch when its config says distributed_type: FSDP


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def process_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    return process_rank() == 0


def launched_with_fsdp() -> bool:
    return os.environ.get(FSDP_ENVIRONMENT, "false").lower() in ("1", "true")


def local_device() -> torch.device:
    """The device this process trains on: its own GPU (cuda:LOCAL_RANK), or the CPU."""
    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def quantized_device_map(fsdp: bool | None = None):
    """Where ``load_model`` puts a quantized model: all of it on this process's own device. None under FSDP,
    which places and shards the weights itself (with ``fsdp_cpu_ram_efficient_loading`` only the main process
    reads them from disk)."""
    fsdp = launched_with_fsdp() if fsdp is None else fsdp
    if fsdp:
        return None
    return {"": local_rank() if torch.cuda.is_available() else "cpu"}


def for_fsdp(quantization_config, compute_dtype: torch.dtype, fsdp: bool | None = None):
    """``quantization_config`` (a BitsAndBytesConfig, or None) made fit for FSDP when the run is launched with it:
    a 4-bit base stores its packed weights in the compute dtype (``bnb_4bit_quant_storage``), the dtype the model
    is loaded in, so that every tensor FSDP shards is of one floating dtype (PEFT's FSDP-QLoRA guide). Without
    FSDP it stays as it is (bitsandbytes' default uint8 storage)."""
    fsdp = launched_with_fsdp() if fsdp is None else fsdp
    if fsdp and quantization_config is not None and getattr(quantization_config, "load_in_4bit", False):
        quantization_config.bnb_4bit_quant_storage = compute_dtype
    return quantization_config


def check_launch(fsdp_asked: bool):
    """A run configuration that asks for FSDP must be launched with an FSDP accelerate config, and one launched
    so must say fsdp: true (the 4-bit storage dtype is chosen from it)."""
    launched = launched_with_fsdp()
    if fsdp_asked and not launched:
        raise RuntimeError("fsdp: true needs an FSDP launch: accelerate launch --config_file "
                           "configs/accelerate_fsdp_qlora.yaml -m helpers.train --config <run.yaml>")
    if launched and not fsdp_asked:
        raise RuntimeError("launched with an FSDP accelerate config, but the run configuration has fsdp: false; "
                           "set fsdp: true (a 4-bit base then stores its weights in the compute dtype)")


def start_processes():
    """Join the process group of a multi-process launch before any training code runs (train() prepares the
    output folder with barriers before a Trainer exists). Through accelerate's PartialState, which the Trainer's
    Accelerator then reuses: gloo on CPUs, NCCL on GPUs. Nothing to do in a single process."""
    if world_size() <= 1:
        return
    from accelerate import PartialState  # only a multi-process run needs it here; Trainer imports it anyway

    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    PartialState()


def end_processes():
    """Leave the process group once every process is done (a process that exits while holding it can keep the
    others, or the launcher, waiting). Nothing to do in a single process."""
    if _active():
        dist.barrier()
        dist.destroy_process_group()


def _active() -> bool:
    return world_size() > 1 and dist.is_available() and dist.is_initialized()


def barrier():
    """Wait until every process gets here (nothing in a single process)."""
    if _active():
        dist.barrier()


def _reduce(value: float, op) -> float:
    if not _active():
        return value
    device = local_device()  # NCCL (GPUs) reduces CUDA tensors; gloo (CPUs) CPU ones
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=op)
    return float(tensor.item())


def mean_across_processes(value: float) -> float:
    """The mean of ``value`` over every process (a non-finite value on one makes the mean non-finite)."""
    return _reduce(value, dist.ReduceOp.SUM) / world_size() if _active() else value


def sum_across_processes(value: float) -> float:
    return _reduce(value, dist.ReduceOp.SUM) if _active() else value


def any_process(flag: bool) -> bool:
    return _reduce(1.0 if flag else 0.0, dist.ReduceOp.MAX) > 0 if _active() else flag
