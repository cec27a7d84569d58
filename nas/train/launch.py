"""One process or several: the `Accelerator` of a training, whichever launcher started it.

`nas train`, `torchrun --nproc_per_node N -m nas train` and
`accelerate launch --multi_gpu --num_processes N -m nas train` run the same code. Each process of a
multi-process launch builds one `Accelerator`; accelerate's `PartialState` joins them into one
process group: NCCL on CUDA GPUs, gloo on CPUs.

Why `cpu=True` on a CPU-only machine: `PartialState` picks a multi-process type from the launcher's
variables (LOCAL_RANK, WORLD_SIZE) only for a device with a collective backend (CUDA: NCCL) or when
told `cpu=True` (then MULTI_CPU over gloo). Without it, torchrun's N processes on a CPU each became
a separate one-process training (`processes: 1` in env.json, N trainings into one folder).

`accelerate launch --cpu --num_processes N` starts one process, not N: accelerate runs several CPU
processes only through MPI (`--mpirun_hostfile`). That launch is refused in one line naming the
launchers that work, instead of silently training on one process.
"""

from __future__ import annotations

import os
import sys

import torch

from nas.core.errors import NasError

# Variables that launchers set in each process of a multi-process run: torchrun (and
# `accelerate launch --multi_gpu`, which calls it), MPI implementations.
_WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def world_size_from_env() -> int:
    """The process count a launcher announced (1 when started plainly)."""
    for name in _WORLD_SIZE_VARS:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return 1


def launched() -> bool:
    """Started by a multi-process launcher (torchrun sets LOCAL_RANK even for one process)."""
    return "LOCAL_RANK" in os.environ or world_size_from_env() > 1


def _has_collective_device() -> bool:
    """An accelerator with a collective backend (CUDA: NCCL; XPU, NPU, HPU: theirs)."""
    from accelerate.utils import get_distributed_backend, get_torch_accelerator_backend

    device_type, _ = get_torch_accelerator_backend()
    return device_type is not None and get_distributed_backend(device_type) is not None


def check_launch() -> None:
    """Refuse `accelerate launch --cpu --num_processes N` (N > 1), which starts a single process:
    its simple launcher sets ACCELERATE_USE_CPU and, only for N > 1, MASTER_ADDR, but no rank."""
    from accelerate.utils import parse_flag_from_env

    if parse_flag_from_env("ACCELERATE_USE_CPU") and "MASTER_ADDR" in os.environ and not launched():
        raise NasError(
            "accelerate launch --cpu --num_processes N starts one process, not N (accelerate runs"
            " several CPU processes only through MPI); use `accelerate launch --multi_gpu"
            " --num_processes N -m nas train ...` or `torchrun --nproc_per_node N -m nas train ...`"
            " (one gloo process group on CPUs; docs/training.md)"
        )


def make_accelerator(config):
    """Accelerator with the config's autocast; `auto`: bf16 (or fp16) on CUDA, fp32 elsewhere.
    Under a multi-process launcher on a machine without GPUs: one gloo group of CPU processes."""
    from accelerate import Accelerator

    check_launch()
    precision = config.mixed_precision
    if precision == "auto":
        precision = "no"
        if torch.cuda.is_available():
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    cpu = launched() and not _has_collective_device()
    try:
        accelerator = Accelerator(mixed_precision=precision, cpu=cpu)
    except ValueError as exc:  # e.g. a second run in one process asking for another precision
        raise NasError(f"mixed_precision: {exc}") from None
    expected = world_size_from_env()
    if accelerator.num_processes != expected:  # never N separate trainings into one folder
        raise NasError(
            f"the launcher started {expected} processes but they formed a group of"
            f" {accelerator.num_processes} (accelerate state {accelerator.distributed_type});"
            " launch with torchrun or `accelerate launch --multi_gpu` (docs/training.md)"
        )
    return accelerator


def say(accelerator, line: str) -> None:
    """One line on stderr, from the main process only."""
    if accelerator.is_main_process:
        print(line, file=sys.stderr, flush=True)


def from_main(accelerator, value):
    """The main process's `value` on every process (a picklable object; a no-op on one process)."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def gather(accelerator, value) -> list:
    """Every process's `value`, on every process, in rank order."""
    if accelerator.num_processes == 1:
        return [value]
    from accelerate.utils import gather_object

    return list(gather_object([value]))
