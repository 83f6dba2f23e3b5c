"""One-shot pruning over several processes (`torchrun`, one per GPU) through `torch.distributed`.

Each process holds the whole model (or streams it from disk) and a contiguous share of the
calibration windows (`share`). The statistics a pass gathers (input norms, moments, Hessians,
Gram matrices) are sums over tokens, so each is summed over the processes (`reduce`, one
`all_reduce` per tensor) at the point where a single process would read it: every process then
computes the same masks and weights from the same sums, and passes its own windows on through the
pruned block. With one process, or none initialised, both are the identity.

Only where a pass reads the sums is this wired: sparsity (the sequential engine and the
allocation's norms) and width (scores, compensation means, the refit's Gram matrices). Depth's
distances and the experts' routing statistics are not reduced yet: `require_single` refuses them.

The command line joins the group torchrun sets up (`start`): every process runs the same checks
and the same stages, process 0 alone claims and writes the output (`agree` tells the others when
its claim failed, so every process stops with the same line) and evaluates it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import Tensor

from secateur.errors import ConfigError


def world() -> tuple[int, int]:
    """(this process's rank, the number of processes); (0, 1) without an initialised process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def share(calibration: Tensor | None) -> Tensor | None:
    """This process's contiguous share of the calibration windows (all of them with one process)."""
    rank, size = world()
    if calibration is None or size == 1:
        return calibration
    if len(calibration) < size:
        raise ConfigError(f"{len(calibration)} calibration windows for {size} processes: give every process at "
                          "least one (more --calib-samples)")
    return calibration.tensor_split(size)[rank]


def reduce(stat: Any) -> None:
    """Sum a statistic's tensors and token count over the processes, in place (every field of the
    accumulators in `calibrate.stats` is a sum over tokens)."""
    import torch.distributed as dist

    if world()[1] == 1:
        return
    device = None
    for name, value in vars(stat).items():
        if isinstance(value, Tensor):
            dist.all_reduce(value)
            device = value.device
    for name, value in vars(stat).items():
        if isinstance(value, int) and not isinstance(value, bool):
            count = torch.tensor(value, dtype=torch.int64, device=device)
            dist.all_reduce(count)
            setattr(stat, name, int(count))


def reduce_tensor(value: Tensor) -> Tensor:
    """A tensor summed over the processes, in place (returned for convenience)."""
    import torch.distributed as dist

    if world()[1] > 1:
        dist.all_reduce(value)
    return value


def require_single(what: str) -> None:
    """Refuse, in one line, work whose statistics are not summed over processes yet."""
    if world()[1] > 1:
        raise ConfigError(f"{what} does not sum its statistics over processes yet: run it in one process "
                          f"(without torchrun)")


def several_processes() -> bool:
    """Whether this process is one of several that torchrun (or `accelerate launch`) started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def start(device: str = "auto") -> bool:
    """Join the process group that `torchrun` (or `accelerate launch`) describes in the environment:
    gloo on CPU, NCCL on CUDA with this process on `cuda:LOCAL_RANK`; the processes but the first go
    quiet (no progress bars, errors only). Returns whether this is one of several processes."""
    import torch.distributed as dist

    if not several_processes():
        return False
    if not dist.is_initialized():
        cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    if dist.get_rank() != 0:
        os.environ["TQDM_DISABLE"] = "1"
        logging.getLogger("secateur").setLevel(logging.ERROR)
    return True


def main_process() -> bool:
    """Whether this process writes and evaluates (the only one, or the first of several)."""
    return world()[0] == 0


def agree(error: str | None) -> None:
    """Process 0's error (None: none), told to every process: the others raise it as a ConfigError
    (process 0 raises its own)."""
    import torch.distributed as dist

    if world()[1] == 1:
        return
    box = [error]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None and not main_process():
        raise ConfigError(box[0])


def stop() -> None:
    """Leave the process group `start` joined (nothing when there is none)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every process (nothing with one): what they checked before it, none has written yet."""
    import torch.distributed as dist

    if world()[1] > 1:
        dist.barrier()
