"""Mask selection: pure functions from scores to boolean *prune* masks (True = weight removed).

Every function removes an exact number of entries, whatever the ties: dequantized GGUF weights
repeat values a lot, and a threshold test (`score <= t`) would remove more than asked.
"""

from __future__ import annotations

import torch
from torch import Tensor


def prune_count(numel: int, fraction: float) -> int:
    """How many of `numel` weights a `fraction` removes (rounded to the nearest integer)."""
    return int(round(numel * fraction))


def smallest_k(scores: Tensor, k: int) -> Tensor:
    """Mask of exactly the `k` smallest entries of `scores` (any shape); ties go to lower indices."""
    flat = scores.reshape(-1)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if k <= 0:
        return mask.view_as(scores)
    if k >= flat.numel():
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = flat.kthvalue(k).values
    mask = flat < threshold
    missing = k - int(mask.sum())
    if missing > 0:  # fill the remainder from the tied entries, lowest index first
        tied = (flat == threshold).nonzero().squeeze(1)[:missing]
        mask[tied] = True
    return mask.view_as(scores)


ENTRIES = 2**22  # scores ranked at once by the per-row selection: bounds its temporaries on large layers


def _smallest_per_row(scores: Tensor, k: int) -> Tensor:
    """Exactly `k` smallest entries of every row (selection, not a sort); ties go to lower indices. Rows
    are independent: they are ranked a few at a time (ENTRIES scores), which bounds the copies the
    selection makes on a large layer and changes nothing in the result."""
    mask = torch.empty_like(scores, dtype=torch.bool)
    step = max(1, ENTRIES // max(scores.shape[1], 1))
    for start in range(0, scores.shape[0], step):
        mask[start : start + step] = _smallest_in_rows(scores[start : start + step], k)
    return mask


def _smallest_in_rows(scores: Tensor, k: int) -> Tensor:
    threshold = scores.kthvalue(k, dim=1, keepdim=True).values  # (rows, 1)
    below = scores < threshold
    tied = scores == threshold
    need = k - below.sum(dim=1, keepdim=True)  # how many tied entries each row still takes
    over = (tied.sum(dim=1, keepdim=True) > need).squeeze(1).nonzero().squeeze(1)  # rows with ties left out
    if len(over):  # the lowest indices among their ties
        kept = tied[over]
        tied[over] = kept & (kept.cumsum(dim=1) <= need[over])
    return below | tied


def per_row_mask(scores: Tensor, fraction: float) -> Tensor:
    """Remove the lowest-scoring entries within each row (dim 0 = outputs, dim 1 = inputs).

    The layer total is exact: round(fraction * numel) entries, spread as evenly as possible over the
    rows (the first `total % rows` rows take one more).
    """
    rows, cols = scores.shape
    total = prune_count(rows * cols, fraction)
    base, extra = divmod(total, rows)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    for k, part in ((base + 1, slice(0, extra)), (base, slice(extra, rows))):
        if k > 0 and part.stop > part.start:
            mask[part] = _smallest_per_row(scores[part], k)
    return mask


def per_layer_mask(scores: Tensor, fraction: float) -> Tensor:
    """Remove the lowest-scoring entries of the whole matrix."""
    return smallest_k(scores, prune_count(scores.numel(), fraction))


def nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """Keep the `n` highest-scoring entries of every `m` consecutive inputs of each row."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"N:M with M={m} needs the input size to be a multiple of {m}; got {cols}")
    groups = scores.reshape(rows, cols // m, m)  # (rows, groups, m)
    drop = groups.topk(m - n, dim=2, largest=False).indices  # (rows, groups, m - n)
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, drop, True)
    return mask.reshape(rows, cols)


def global_masks(scores: list[Tensor], fraction: float) -> list[Tensor]:
    """One ranking across all matrices: remove exactly round(fraction * total) entries overall."""
    sizes = [s.numel() for s in scores]
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    mask = smallest_k(flat, prune_count(flat.numel(), fraction))
    return [part.view_as(s) for part, s in zip(mask.split(sizes), scores)]
