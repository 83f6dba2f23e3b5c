"""SparseGPT: blockwise Optimal-Brain-Surgeon pruning with lazy weight updates (pure tensor math).

Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot", 2023.
Columns are processed left to right; pruning column j moves its error onto the not-yet-processed
columns through the upper Cholesky factor of H^-1, so the layer output X W^T is preserved as well
as a second-order model allows.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from secateur.calibrate.stats import WORK_DTYPE
from secateur.config import NM, Target
from secateur.sparsity.masks import prune_count, smallest_k

log = logging.getLogger(__name__)

MAX_DAMP_RETRIES = 6  # each retry multiplies the damping by 10


def inverse_hessian_factor(hessian: Tensor, damp: float, name: str = "layer") -> tuple[Tensor, Tensor]:
    """Upper Cholesky factor U of (H + λI)^-1 (so U^T U = H^-1) and the mask of dead inputs.

    Dead inputs (zero diagonal: the feature never fires on calibration data) get a unit diagonal so
    H stays invertible. λ = damp * mean(diag H); when the factorisation fails, λ grows tenfold
    (logged) rather than falling back silently to an identity.
    """
    h = hessian.to(WORK_DTYPE).clone()
    dead = h.diagonal() == 0  # (cols,)
    h[dead, dead] = 1.0
    cols = h.shape[0]
    eye = torch.eye(cols, dtype=h.dtype, device=h.device)
    mean_diag = h.diagonal().mean()
    for attempt in range(MAX_DAMP_RETRIES):
        factor = damp if attempt == 0 else max(damp, 1e-4) * 10**attempt
        lower, info = torch.linalg.cholesky_ex(h + factor * mean_diag * eye)
        if info == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info == 0:
                if attempt:
                    log.warning("%s: Hessian not positive definite at damp=%g; used damp=%g", name, damp, factor)
                return upper, dead
    raise torch.linalg.LinAlgError(
        f"{name}: Hessian stays singular even with damp={max(damp, 1e-4) * 10 ** (MAX_DAMP_RETRIES - 1):g}; "
        "calibrate on more (or more varied) tokens"
    )


def _block_prune_counts(rows: int, cols: int, fraction: float, block: int) -> list[int]:
    """Per-column-block prune counts that add up exactly to round(fraction * rows * cols)."""
    edges = list(range(0, cols, block)) + [cols]
    return [prune_count(rows * b, fraction) - prune_count(rows * a, fraction) for a, b in zip(edges, edges[1:])]


def sparsegpt_prune(
    weight: Tensor,
    inv_factor: Tensor,
    dead: Tensor,
    target: Target | list[Target],
    block_size: int = 128,
    fixed_mask: Tensor | None = None,
    segments: list[int] | None = None,
    frozen: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Prune `weight` (rows = outputs, cols = inputs) with OBS updates; returns (new weight, prune mask).

    Unstructured: the mask is chosen per block of `block_size` columns by the OBS saliency
    w^2 / [H^-1]_jj^2 over all rows of the block, with exact counts. N:M: inside the column loop,
    every group of M columns keeps the N entries of highest saliency per row, computed on the
    already-updated weights. With `fixed_mask` (True = prune) only the OBS updates run.
    `segments` (row counts) lets layers that share the Hessian (q/k/v) go through one column loop
    while each keeps its own unstructured count per block (and its own target, when `target` is a
    list with one entry per segment); rows never interact in OBS.
    `frozen` entries (True: zero before this call, e.g. from an earlier stage) are always pruned and
    rank first, so OBS moves their (updated) values onto the kept weights instead of reviving them.
    """
    w = weight.to(WORK_DTYPE).clone()  # (rows, cols)
    rows, cols = w.shape
    segments = segments or [rows]
    targets = list(target) if isinstance(target, (list, tuple)) else [target] * len(segments)
    if len(targets) != len(segments):
        raise ValueError(f"{len(targets)} targets for {len(segments)} segments")
    if len({type(t) for t in targets}) > 1 or (isinstance(targets[0], NM) and len(set(targets)) > 1):
        raise ValueError("layers that share a Hessian need one N:M pattern, or unstructured targets only")
    nm = targets[0] if isinstance(targets[0], NM) and fixed_mask is None else None
    if nm is not None and cols % nm.m:
        raise ValueError(f"N:M with M={nm.m} needs the input size to be a multiple of {nm.m}; got {cols}")
    counts = None
    if nm is None and fixed_mask is None:
        counts = [_block_prune_counts(n, cols, t.fraction, block_size) for n, t in zip(segments, targets)]
    mask = torch.zeros_like(w, dtype=torch.bool)
    for index, start in enumerate(range(0, cols, block_size)):
        end = min(start + block_size, cols)
        w_block = w[:, start:end].clone()  # (rows, b)
        u_block = inv_factor[start:end, start:end]  # (b, b)
        u_diag = u_block.diagonal()  # (b,)
        block_dead = dead[start:end]
        if fixed_mask is not None:
            block_mask = fixed_mask[:, start:end].clone()
        elif counts is not None:
            saliency = w_block.pow(2) / u_diag.pow(2)[None, :]
            saliency[:, block_dead] = 0.0  # inputs that never fire cost nothing to remove
            if frozen is not None:
                saliency.masked_fill_(frozen[:, start:end], -1.0)
            parts = saliency.split(segments)
            block_mask = torch.cat([smallest_k(part, c[index]) for part, c in zip(parts, counts)])
            if frozen is not None:
                block_mask |= frozen[:, start:end]
        else:
            block_mask = torch.zeros_like(w_block, dtype=torch.bool)
        scale = (block_mask / u_diag[None, :]).T.contiguous()  # (b, rows): error_j = w_j * scale_j
        w_t = w_block.T.contiguous()  # (b, rows): column j of the block is the contiguous row j
        errors = torch.empty_like(w_t)
        for j in range(end - start):
            if nm is not None and j % nm.m == 0:
                group = slice(j, j + nm.m)
                saliency = w_t[group].T.pow(2) / u_diag[group].pow(2)[None, :]  # (rows, m)
                saliency[:, block_dead[group]] = 0.0
                if frozen is not None:
                    saliency.masked_fill_(frozen[:, start + j : start + j + nm.m], -1.0)
                drop = saliency.topk(nm.m - nm.n, dim=1, largest=False).indices
                block_mask[:, group] = torch.zeros_like(saliency, dtype=torch.bool).scatter_(1, drop, True)
                if frozen is not None:
                    block_mask[:, group] |= frozen[:, start + j : start + j + nm.m]
                scale[group] = (block_mask[:, group] / u_diag[group][None, :]).T
            torch.mul(w_t[j], scale[j], out=errors[j])  # (rows,)
            w_t[j:].addr_(u_block[j, j:], errors[j], alpha=-1.0)  # column j becomes its pruned value
        w[:, start:end] = w_t.T
        w[:, end:].addmm_(errors.T, inv_factor[start:end, end:], alpha=-1.0)
        mask[:, start:end] = block_mask
    w.masked_fill_(mask, 0.0)
    return w.to(weight.dtype), mask
