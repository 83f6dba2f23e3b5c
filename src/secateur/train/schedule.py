"""What a training run reads and at which rate: the order of the windows (fixed by the seed and the
step alone, so a resumed run reads what an uninterrupted one would), the number of optimizer steps,
and the learning-rate schedule (linear warm-up, then cosine decay to a floor)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from secateur.errors import TrainError


def lr_factor(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based) of `total`.

    Warm-up: (step + 1) / warmup for the first `warmup` steps, so the first step already moves.
    Then cosine from 1 down to `floor` at the last step: floor + (1 − floor)(1 + cos(π·t)) / 2 with
    t = (step − warmup) / (total − warmup − 1), t = 0 right after warm-up and t = 1 at the end.
    """
    if step < warmup:
        return (step + 1) / warmup
    decay = total - warmup - 1
    t = 1.0 if decay <= 0 else min((step - warmup) / decay, 1.0)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def batch_rows(step: int, micro: int, config, windows: int, processes: int, rank: int) -> Tensor:
    """Indices of the training windows that process `rank` reads at micro-step `micro` of optimizer
    step `step` (0-based, counted over all epochs): each epoch is a seeded permutation of the windows,
    cut into global batches of micro_batch x accumulate x processes windows."""
    per_step = config.micro_batch * config.accumulate * processes
    steps_per_epoch = windows // per_step
    epoch, within = divmod(step, steps_per_epoch)
    order = torch.randperm(windows, generator=torch.Generator().manual_seed(config.seed + epoch))
    start = within * per_step + (micro * processes + rank) * config.micro_batch
    return order[start : start + config.micro_batch]


def total_steps(config, windows: int, processes: int) -> int:
    per_step = config.micro_batch * config.accumulate * processes
    if windows < per_step:
        raise TrainError(f"{windows} training windows do not fill one optimizer step of {per_step} windows "
                         "(--micro-batch x --accumulate x processes): give more --tokens or a smaller batch")
    return config.epochs * (windows // per_step)
