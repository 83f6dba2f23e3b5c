"""Training-free refinement after a layer's mask: pure tensor functions, each keeping the pattern.

- `dsnot_mask` (Zhang et al. 2023, "Dynamic Sparse No Training"): per output row, swap a pruned and a
  kept weight while that shrinks the expected output change eps_i = sum_{j pruned} W_ij E[x_j]; grow
  candidates are ranked by W_ij E[x_j] / Var(x_j)^p, prune candidates by their Wanda score.
- `reconstruct`: for a fixed mask, re-fit the kept weights to minimise ||X W^T - X W_hat^T||^2, i.e.
  tr((W_hat - W) H (W_hat - W)^T) with H = X^T X, by preconditioned conjugate gradients on the kept
  entries of every row at once (rows are independent problems sharing H).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from secateur.calibrate.stats import WORK_DTYPE, Hessian, Moments
from secateur.config import NM, RefineConfig


def reconstruction_error(weight: Tensor, dense: Tensor, hessian: Tensor) -> Tensor:
    """Per row: (w_hat - w)^T H (w_hat - w) = ||X (w_hat - w)||^2."""
    delta = (weight - dense).to(WORK_DTYPE)
    return ((delta @ hessian) * delta).sum(dim=1)


def reconstruct(dense: Tensor, weight: Tensor, mask: Tensor, hessian: Tensor, iters: int = 40, damp: float = 0.01) -> Tensor:
    """Kept entries of `weight` re-fitted to the dense layer's outputs; pruned entries stay zero.

    CG runs on H + damp * mean(diag H) * I (Jacobi-preconditioned); each row then keeps whichever of
    its start and its CG result has the lower *undamped* error, so no row's error ever grows.
    """
    h = hessian.to(WORK_DTYPE)
    w = dense.to(WORK_DTYPE)
    keep = (~mask).to(WORK_DTYPE)
    start = weight.to(WORK_DTYPE) * keep
    damped = h + damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    diag = damped.diagonal()
    inv_diag = torch.where(diag > 0, 1.0 / diag, torch.zeros_like(diag))[None, :]
    x = start.clone()
    r = -((x - w) @ damped) * keep  # negative gradient of the damped objective (halved)
    z = r * inv_diag
    p = z.clone()
    rz = (r * z).sum(dim=1)
    for _ in range(iters):
        ap = (p @ damped) * keep
        curvature = (p * ap).sum(dim=1)
        alpha = torch.where(curvature > 0, rz / curvature.clamp_min(torch.finfo(WORK_DTYPE).tiny), torch.zeros_like(rz))
        x.addcmul_(alpha[:, None], p)
        r.addcmul_(alpha[:, None], ap, value=-1.0)
        z = r * inv_diag
        rz_next = (r * z).sum(dim=1)
        beta = torch.where(rz > 0, rz_next / rz.clamp_min(torch.finfo(WORK_DTYPE).tiny), torch.zeros_like(rz))
        p = z + beta[:, None] * p
        rz = rz_next
    x = x * keep
    better = reconstruction_error(x, w, h) < reconstruction_error(start, w, h)
    return torch.where(better[:, None], x, start).to(weight.dtype)


@torch.no_grad()
def dsnot_mask(dense: Tensor, mask: Tensor, mean: Tensor, variance: Tensor, norm: Tensor, cycles: int = 50,
               threshold: float = 0.1, var_power: float = 1.0, nm: tuple[int, int] | None = None) -> Tensor:
    """A new prune mask (True = pruned) with the same count per row (and the same N:M pattern).

    Each cycle, every still-active row grows one pruned weight and prunes one kept weight, chosen to
    move eps towards zero; a row stops for good once |eps| <= threshold or a swap would not reduce |eps|.
    """
    w = dense.to(WORK_DTYPE)
    mask = mask.clone()
    rows, cols = w.shape
    metric = w * mean[None, :]  # each weight's expected contribution to its output
    eps = (metric * mask).sum(dim=1)  # (rows,) expected dense - pruned output
    grow_key = metric / variance.clamp_min(1e-12).pow(var_power)[None, :] if var_power else metric.clone()
    wanda = w.abs() * norm[None, :]
    row_ids = torch.arange(rows, device=w.device)
    active = eps.abs() > threshold
    # grow candidates: the pruned entries of each row by grow key (kept entries sorted after them, never reached)
    pruned_count = mask.sum(dim=1)
    kept_count = cols - pruned_count
    grow_sorted = grow_key.masked_fill(~mask, float("inf")).argsort(dim=1, stable=True)  # pruned ascending, kept last
    low, high = torch.zeros(rows, dtype=torch.long, device=w.device), pruned_count - 1
    if nm is None:
        order = wanda.masked_fill(mask, float("inf")).argsort(dim=1, stable=True)
        prune_sorted = _kept_by_sign(metric, order, kept_count)
        plow, phigh = torch.zeros(rows, dtype=torch.long, device=w.device), kept_count - 1
    locked = torch.zeros_like(mask)  # N:M: entries already swapped once
    for _ in range(cycles):
        if not bool(active.any()):
            break
        positive = eps > 0
        grow_pos = torch.where(positive, high, low).clamp(0, cols - 1)
        grow_idx = grow_sorted.gather(1, grow_pos[:, None]).squeeze(1)
        grow_m = metric[row_ids, grow_idx]
        if nm is None:
            prune_pos = torch.where(positive, plow, phigh).clamp(0, cols - 1)
            prune_idx = prune_sorted.gather(1, prune_pos[:, None]).squeeze(1)
            valid = (low <= high) & (plow <= phigh)
        else:
            n, m = nm
            start = grow_idx - grow_idx % m
            block = start[:, None] + torch.arange(m, device=w.device)[None, :]
            candidates = wanda.gather(1, block).masked_fill(mask.gather(1, block) | locked.gather(1, block), float("inf"))
            best = candidates.min(dim=1)
            prune_idx = start + best.indices
            valid = (low <= high) & torch.isfinite(best.values) & ~locked[row_ids, grow_idx]
        prune_m = metric[row_ids, prune_idx]
        after = eps + prune_m - grow_m
        update = active & valid & (after.abs() < eps.abs())
        mask[row_ids[update], grow_idx[update]] = False
        mask[row_ids[update], prune_idx[update]] = True
        if nm is not None:
            locked[row_ids[update], grow_idx[update]] = True
            locked[row_ids[update], prune_idx[update]] = True
        eps = torch.where(update, after, eps)
        # grow pointers move past the candidate taken (taken or refused, it is not offered again)
        step = active & valid
        low = torch.where(step & ~positive, low + 1, low)
        high = torch.where(step & positive, high - 1, high)
        if nm is None:
            plow = torch.where(step & positive, plow + 1, plow)
            phigh = torch.where(step & ~positive, phigh - 1, phigh)
        active = update & (eps.abs() > threshold)
    return mask


def _kept_by_sign(metric: Tensor, order: Tensor, kept_count: Tensor) -> Tensor:
    """Per row, the kept entries (the first kept_count of `order`, lowest Wanda first) arranged as
    negative-metric ones ascending then positive ones descending; the rest of the row is padding."""
    rows, cols = order.shape
    values = metric.gather(1, order)
    position = torch.arange(cols, device=order.device).expand(rows, cols)
    is_kept = position < kept_count[:, None]
    key = torch.where(values < 0, position, 2 * cols - position).to(torch.float64)
    key = torch.where(is_kept, key, torch.full_like(key, float(4 * cols)))  # padding last
    return order.gather(1, key.argsort(dim=1, stable=True))


# --- refinement steps as the engine runs them on a group ---------------------------------------------


@dataclass(frozen=True)
class Refiner:
    statistics: tuple[type, ...]
    run: Callable[[RefineConfig, Any, list[tuple[Tensor, Tensor]]], list[tuple[Tensor, Tensor]]]


def _dsnot(config: RefineConfig, job: Any, results: list[tuple[Tensor, Tensor]]) -> list[tuple[Tensor, Tensor]]:
    moments = job.stats[Moments]
    out = []
    for dense, (_, mask), target in zip(job.weights, results, job.targets):
        nm = (target.n, target.m) if isinstance(target, NM) else None
        new = dsnot_mask(dense, mask, moments.mean, moments.variance, moments.norm, config.dsnot_cycles,
                         config.dsnot_threshold, config.dsnot_var_power, nm)  # fmt: skip
        out.append((dense.masked_fill(new, 0), new))
    return out


def _reconstruct(config: RefineConfig, job: Any, results: list[tuple[Tensor, Tensor]]) -> list[tuple[Tensor, Tensor]]:
    sizes = [w.shape[0] for w in job.weights]
    masks = torch.cat([mask for _, mask in results])
    fitted = reconstruct(torch.cat(job.weights), torch.cat([w for w, _ in results]), masks, job.stats[Hessian].value,
                         config.reconstruct_iters, config.reconstruct_damp)  # fmt: skip
    return list(zip(fitted.split(sizes), masks.split(sizes)))


REFINERS: dict[str, Refiner] = {
    "dsnot": Refiner((Moments,), _dsnot),
    "reconstruct": Refiner((Hessian,), _reconstruct),
}
