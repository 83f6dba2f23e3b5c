"""Learning-rate schedule: linear warm-up, then cosine decay to a floor."""

from __future__ import annotations

import math


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
