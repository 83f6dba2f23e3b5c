"""What a training run reads and at which rate: the order of the windows (fixed by the seed and the
step alone, so a resumed run reads what an uninterrupted one would), the number of optimizer steps,
and the learning-rate schedule (linear warm-up, then cosine decay to a floor)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from secateur.errors import TrainError

# full fine-tuning's peak learning rate by the start's distance from its teacher: MILD_LR for a start
# within MILD_GAP nats per token (validation perplexity within e^MILD_GAP, about 20x, of the teacher's),
# DAMAGED_LR beyond. Chosen on held-out corpora at 131,072 tokens of the mixture (docs/benchmarks.md,
# "The default recipe, chosen on the never-trained corpora"): 3e-4 did better than 1e-3 on SmolLM2
# depth 20% (gap 0.86 on the mixture's validation windows) and width 20% (2.34), 1e-3 better than 3e-4
# on width 50% (4.46)
MILD_LR, DAMAGED_LR, MILD_GAP = 3e-4, 1e-3, 3.0


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


def peak_lr_for(gap: float) -> float:
    """Full fine-tuning's peak learning rate for a start `gap` nats per token above its teacher on the
    validation windows (log of the ratio of their perplexities): the milder rate close to the teacher,
    where 1e-3 undoes more than it repairs, the larger one for a heavily damaged start."""
    return MILD_LR if gap < MILD_GAP else DAMAGED_LR


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
