"""How many experts each MoE block loses under global allocation: one ranking of every block's
experts, each by its criterion score as a share of its block's total, so that blocks whose routing
concentrates on few experts give up more of them than blocks that use all of theirs."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def shares(scores: Tensor) -> Tensor:
    """A block's scores (experts,) as shares of their sum (equal shares where the sum is not positive:
    a block with nothing measured gives no evidence either way)."""
    scores = scores.double().clamp(min=0)
    total = scores.sum()
    return scores / total if total > 0 else torch.full_like(scores, 1 / len(scores))


def global_counts(scores: Sequence[Tensor], remove: int, floors: Sequence[int]) -> list[int]:
    """The experts each block loses when the `remove` lowest shares of all blocks go (`shares`), block
    i keeping at least `floors[i]` experts. Ties go to the earlier block, then the lower expert."""
    capacity = [len(s) - f for s, f in zip(scores, floors)]
    if remove > sum(max(c, 0) for c in capacity):
        raise ValueError(f"{remove} experts cannot go while every block keeps its floor ({sum(capacity)} can)")
    ranked = sorted((float(v), b, j) for b, s in enumerate(scores) for j, v in enumerate(shares(s).tolist()))
    counts = [0] * len(scores)
    for _, block, _ in ranked:
        if remove == 0:
            break
        if counts[block] < capacity[block]:
            counts[block] += 1
            remove -= 1
    return counts
