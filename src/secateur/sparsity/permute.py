"""Input-channel permutations for N:M sparsity (Pool & Yu 2021, "Channel Permutations for N:M Sparsity").

An N:M pattern keeps N of every M *consecutive* inputs of a row. Reordering a layer's input channels
changes which channels share a group, and so how much score mass the pattern can keep. Where the
input comes from an inner dimension (MLP channels, attention value heads), the producing layer's
output rows are reordered the same way, so the model computes exactly the same function before
pruning. The search is pure tensor math: random pairs of groups try every single-column swap
between them and keep the best one that raises the kept mass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from secateur.config import NM, Target
from secateur.models import Adapter, read_weight


def kept_mass(scores: Tensor, n: int, m: int) -> Tensor:
    """Score mass an N:M pattern keeps: the sum over rows and groups of the n largest of each group."""
    rows, cols = scores.shape
    return scores.reshape(rows, cols // m, m).topk(n, dim=2).values.sum()


def _sorted_desc(columns: list[Tensor]) -> list[Tensor]:
    """Elementwise descending sort of m same-shaped tensors (odd-even transposition network: only
    max/min, far faster than torch.sort along a dimension of size 4 or 8)."""
    v = list(columns)
    for step in range(len(v)):
        for i in range(step % 2, len(v) - 1, 2):
            v[i], v[i + 1] = torch.maximum(v[i], v[i + 1]), torch.minimum(v[i], v[i + 1])
    return v


def _without_each(columns: list[Tensor], v: list[Tensor], k: int) -> Tensor:
    """m tensors (P, rows) of a group's columns and their elementwise descending sort -> (P, m, rows):
    for each column i, the sum of the k largest of the *other* columns: the k largest overall, minus
    column i and plus the (k+1)-th when i is among them (ties give the same value either way)."""
    if k == 0:
        return torch.zeros(columns[0].shape[0], len(columns), columns[0].shape[1], dtype=columns[0].dtype)
    top_k = torch.stack(v[:k]).sum(dim=0)  # (P, rows)
    next_value = v[k] if k < len(v) else torch.zeros_like(v[0])
    kth = v[k - 1]
    return torch.stack([torch.where(x >= kth, top_k - x + next_value, top_k) for x in columns], dim=1)


def nm_permutation(scores: Tensor, n: int, m: int, rounds: int = 40, seed: int = 0) -> Tensor:
    """A column order `perm` (scores[:, perm] is the permuted layer) with kept_mass at least that of
    the identity: each round pairs the groups at random and applies, per pair, the single-column
    swap that raises the pair's kept mass most (if any). A group that receives value x for its
    column i keeps, per row, max(top_n(others), top_{n-1}(others) + x): every swap is scored from
    two precomputed sums, with no re-sorting."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"N:M with M={m} needs the input size to be a multiple of {m}; got {cols}")
    groups = cols // m
    perm = torch.arange(cols, device=scores.device)
    if groups < 2:
        return perm
    s = scores.float().T.contiguous()  # (cols, rows): a column's scores are contiguous
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.arange(m, device=scores.device)
    for _ in range(rounds):
        order = torch.randperm(groups, generator=generator).to(scores.device)
        pairs = order[: groups // 2 * 2].view(-1, 2)  # (P, 2)
        a_cols = pairs[:, 0:1] * m + offsets  # (P, m) positions in perm
        b_cols = pairs[:, 1:2] * m + offsets
        a = s[perm[a_cols]]  # (P, m, rows)
        b = s[perm[b_cols]]
        a_columns, b_columns = list(a.unbind(dim=1)), list(b.unbind(dim=1))
        a_sorted, b_sorted = _sorted_desc(a_columns), _sorted_desc(b_columns)
        before = (sum(a_sorted[:n]) + sum(b_sorted[:n])).sum(dim=-1)  # (P,)
        a_n, a_n1 = _without_each(a_columns, a_sorted, n), _without_each(a_columns, a_sorted, n - 1)  # (P, m, rows)
        b_n, b_n1 = _without_each(b_columns, b_sorted, n), _without_each(b_columns, b_sorted, n - 1)
        a_in, b_in = b, a  # (P, m, rows): the values a swap brings in
        # (P, i, j): a's column i <-> b's column j
        new_a = torch.maximum(a_n[:, :, None], a_n1[:, :, None] + a_in[:, None, :]).sum(dim=-1)
        new_b = torch.maximum(b_n[:, None, :], b_n1[:, None, :] + b_in[:, :, None]).sum(dim=-1)
        gain = (new_a + new_b - before[:, None, None]).reshape(len(pairs), m * m)
        best, which = gain.max(dim=1)
        improve = best > 1e-6 * before.abs().clamp_min(1e-30)
        if not bool(improve.any()):
            continue
        p = improve.nonzero().squeeze(1)
        pos_a = a_cols[p, which[p] // m]
        pos_b = b_cols[p, which[p] % m]
        perm[pos_a], perm[pos_b] = perm[pos_b].clone(), perm[pos_a].clone()
    return perm


def head_permutation(scores: Tensor, n: int, m: int, q_heads: int, kv_heads: int, head_size: int,
                     rounds: int = 40, seed: int = 0) -> Tensor:
    """A column order for an attention output projection whose inputs are q_heads heads of head_size:
    one within-head order per key/value group, shared by the group's query heads (what reordering
    the value projection's rows within each value head produces). Returns the full column order."""
    per_group = q_heads // kv_heads
    rows = scores.shape[0]
    heads = scores.reshape(rows, q_heads, head_size)
    perm = torch.arange(q_heads * head_size, device=scores.device).view(q_heads, head_size)
    within = []
    for g in range(kv_heads):
        block = heads[:, g * per_group:(g + 1) * per_group, :].permute(1, 0, 2).reshape(per_group * rows, head_size)
        sigma = nm_permutation(block, n, m, rounds, seed + g)
        within.append(sigma)
        perm[g * per_group:(g + 1) * per_group] = perm[g * per_group:(g + 1) * per_group][:, sigma]
    return perm.reshape(-1)


def value_row_permutation(within_heads: Tensor, kv_heads: int, head_size: int) -> Tensor:
    """The value projection's row order matching a `head_permutation` result (taken from the first
    query head of each group)."""
    q_heads = within_heads.numel() // head_size
    per_group = q_heads // kv_heads
    heads = within_heads.view(q_heads, head_size)
    return torch.cat([heads[g * per_group] - g * per_group * head_size + g * head_size for g in range(kv_heads)])


# --- applying a permutation to a block's layers ------------------------------------------------------



def reorder_rows(module: nn.Module, order: Tensor) -> None:
    """Reorder a layer's output rows (and its bias) in place: row i becomes old row order[i]."""
    new = read_weight(module)[order]
    with torch.no_grad():
        module.weight.data = (new.T if isinstance(module, Conv1D) else new).contiguous()
        if getattr(module, "bias", None) is not None:
            module.bias.data = module.bias.data[order].contiguous()


@dataclass
class Permuter:
    """Finds a column order for one consumer layer and moves its producers' rows to match."""

    find: Callable[[Tensor], Tensor]  # scores (rows, cols) -> column order
    reorder_producers: Callable[[Tensor], None]


def permuter_for(block: nn.Module, adapter: Adapter, layer: str, target: Target) -> Permuter | None:
    """A permuter when `layer` reads an inner dimension that secateur can reorder exactly: the MLP's
    down projection (gate/up rows move) or a separate-projection attention output (value rows move,
    one within-head order per key/value group). None for layers reading the residual stream."""
    if not isinstance(target, NM) or adapter.width is None:
        return None
    n, m = target.n, target.m
    mlp = adapter.width.mlp
    if layer == mlp.consumer:
        producers = [block.get_submodule(p) for p in mlp.producers]

        def move_mlp(order: Tensor) -> None:
            for producer in producers:
                rows = read_weight(producer).shape[0]
                size = rows // mlp.stacked
                reorder_rows(producer, torch.cat([order + k * size for k in range(mlp.stacked)]))

        return Permuter(lambda scores: nm_permutation(scores, n, m), move_mlp)
    attention = adapter.width.attention
    if attention is not None and not attention.fused and layer == attention.o:
        module = block.get_submodule(attention.module)
        size = getattr(module, "head_dim", None)
        o_cols = read_weight(block.get_submodule(attention.o)).shape[1]
        v_rows = read_weight(block.get_submodule(attention.v)).shape[0]
        if not size or size % m or o_cols % size or v_rows % size:
            return None
        q_heads, kv_heads = o_cols // size, v_rows // size
        value = block.get_submodule(attention.v)

        def find(scores: Tensor) -> Tensor:
            return head_permutation(scores, n, m, q_heads, kv_heads, size)

        def move_values(order: Tensor) -> None:
            reorder_rows(value, value_row_permutation(order, kv_heads, size))

        return Permuter(find, move_values)
    return None
