"""Removable units of one block (MLP channels, heads or key/value groups), their scores and parameter
costs; and the two allocations that decide how many units each block loses."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor, nn

from secateur.models import MLP, Attention, read_weight
from secateur.models.shapes import LayerWidth
from secateur.width.scores import Importance, standardize
from secateur.width.structure import WidthError, head_rows

LayerScore = Callable[[str, Literal["rows", "columns"]], Tensor]  # (block-relative layer name, side) -> scores


@dataclass
class Units:
    """A block's units of one kind; removing k units removes the k lowest-scoring ones."""

    block: int
    kind: Literal["attention", "mlp"]
    scores: Tensor  # (n,)
    cost: int  # parameters one unit holds
    head_scores: Tensor | None = None  # (kv groups, query heads per group), `queries` mode only

    def keep(self, removed: int) -> Tensor:
        """Indices of the units kept (ascending)."""
        return self.scores.argsort()[removed:].sort().values


def layer_scorer(block: nn.Module, prefix: str, importance: Importance, stats: dict, grads: dict,
                 compensated: bool = True) -> LayerScore:  # fmt: skip
    """Row / column scores of the block's layers; `compensated`: whether bias compensation will take up
    the removed columns' mean (if not, columns are scored with the mean's error too)."""

    columns = importance.columns if compensated else importance.columns_without_compensation

    def score(name: str, side: str) -> Tensor:
        full = f"{prefix}.{name}"
        weight = read_weight(block.get_submodule(name)).float()
        fn = importance.rows if side == "rows" else columns
        return fn(weight, stats.get(full), grads.get(full)).float().cpu()

    return score


def _row_cost(layer: nn.Module) -> int:
    """Parameters one output row holds (its weights and bias entry)."""
    return read_weight(layer).shape[1] + (layer.bias is not None)


def mlp_cost(block: nn.Module, mlp: MLP) -> int:
    """Parameters one MLP channel holds: a column of the consumer, a row of every producer."""
    cost = read_weight(block.get_submodule(mlp.consumer)).shape[0]
    return cost + sum(mlp.stacked * _row_cost(block.get_submodule(name)) for name in mlp.producers)


def attention_cost(block: nn.Module, attention: Attention, size: int, q_heads: int, kv_heads: int, mode: str) -> int:
    """Parameters one attention unit holds: a key/value group (its query heads, key and value) or a
    query-head slot (one query head of every group)."""
    head_cost = size * (_row_cost(block.get_submodule(attention.q)) + read_weight(block.get_submodule(attention.o)).shape[0])
    if mode == "queries":
        return kv_heads * head_cost
    return q_heads // kv_heads * head_cost + 2 * size * _row_cost(block.get_submodule(attention.k))


def mlp_units(block: nn.Module, index: int, mlp: MLP, score: LayerScore) -> Units:
    channels = read_weight(block.get_submodule(mlp.consumer)).shape[1]
    total = score(mlp.consumer, "columns")  # (channels,)
    for name in mlp.producers:
        total = total + score(name, "rows").view(mlp.stacked, channels).sum(dim=0)
    return Units(index, "mlp", total, mlp_cost(block, mlp))


def attention_units(block: nn.Module, index: int, attention: Attention, size: int, q_heads: int, kv_heads: int,
                    mode: str, score: LayerScore) -> Units:  # fmt: skip
    """Scores per key/value group (`kv-groups`) or per query-head slot (`queries`: slot s holds the
    s-th weakest query head of every group, so removing k slots removes k heads from each group)."""
    group = q_heads // kv_heads
    per_head = score(attention.o, "columns").view(q_heads, size).sum(dim=1)
    if attention.fused:
        rows = score(attention.q, "rows")
        q_rows, k_rows, v_rows = rows.split([q_heads * size, kv_heads * size, kv_heads * size])
    else:
        q_rows, k_rows, v_rows = (score(name, "rows") for name in (attention.q, attention.k, attention.v))
    per_head = per_head + q_rows.view(q_heads, size).sum(dim=1)  # (q_heads,)
    cost = attention_cost(block, attention, size, q_heads, kv_heads, mode)
    if mode == "queries":
        by_group = per_head.view(kv_heads, group)
        slots = by_group.sort(dim=1).values.sum(dim=0)  # (group,) ascending by construction
        return Units(index, "attention", slots, cost, head_scores=by_group)
    kv_scores = (k_rows + v_rows).view(kv_heads, size).sum(dim=1)
    return Units(index, "attention", per_head.view(kv_heads, group).sum(dim=1) + kv_scores, cost)


def head_keep(units: Units, removed: int, q_heads: int, kv_heads: int) -> tuple[Tensor, Tensor]:
    """(query heads kept, key/value heads kept) after removing `removed` units."""
    group = q_heads // kv_heads
    if units.head_scores is None:  # kv-groups
        kv_keep = units.keep(removed)
        return head_rows(kv_keep, group), kv_keep
    kept = units.head_scores.argsort(dim=1)[:, removed:].sort(dim=1).values  # (kv, group - removed)
    q_keep = (kept + torch.arange(kv_heads)[:, None] * group).flatten()
    return q_keep, torch.arange(kv_heads)


# --- allocation ---------------------------------------------------------------------------------------


def _half_up(x: float) -> int:
    return math.floor(x + 0.5)


def uniform_attention_removal(units: int, fraction: float) -> int:
    """Attention units every block loses under uniform allocation (at least one stays)."""
    return min(_half_up(fraction * units), units - 1)


def uniform_removals(units: list[Units], fraction: float, target: float, round_to: int) -> dict[tuple[int, str], int]:
    """Every block loses the same number of units of each kind: attention loses round(fraction x its
    units) (keeping at least one); the MLP channels then make up the parameter target, with each
    block's kept width rounded to a multiple of `round_to`."""
    removals: dict[tuple[int, str], int] = {}
    attention = [u for u in units if u.kind == "attention"]
    mlp = [u for u in units if u.kind == "mlp"]
    for u in attention:
        removals[(u.block, u.kind)] = uniform_attention_removal(len(u.scores), fraction)
    left = target - sum(removals[(u.block, u.kind)] * u.cost for u in attention)
    if mlp:
        per_block = max(left, 0) / sum(u.cost for u in mlp)
        for u in mlp:
            n = len(u.scores)
            kept = _half_up(n - per_block)
            if round_to < n:
                kept = max(round_to, _half_up(kept / round_to) * round_to)
            removals[(u.block, u.kind)] = min(max(n - kept, 0), n - 1)
    return removals


def adaptive_removals(units: list[Units], target: float, round_to: int = 1) -> dict[tuple[int, str], int]:
    """Rank all blocks' units together on scores standardised per block and kind (FLAP); remove the
    lowest until `target` parameters are gone, every block keeping at least one unit of each kind.
    With `round_to` > 1, each block's kept MLP width is then rounded to a multiple of it (so that,
    e.g., an N:M stage with M dividing it can follow)."""
    entries = []
    for u in units:
        z = standardize(u.scores)
        entries += [(float(value), u.cost, (u.block, u.kind), len(u.scores)) for value in z.tolist()]
    entries.sort(key=lambda e: e[0])
    removals = {(u.block, u.kind): 0 for u in units}
    removed = 0
    for _, cost, key, n in entries:
        if removed >= target:
            break
        if removals[key] < n - 1:
            removals[key] += 1
            removed += cost
    for u in units:
        n = len(u.scores)
        if u.kind == "mlp" and 1 < round_to < n:
            kept = max(round_to, _half_up((n - removals[(u.block, u.kind)]) / round_to) * round_to)
            removals[(u.block, u.kind)] = n - min(kept, n - n % round_to)
    return removals


# --- unit counts per block, against widths ---------------------------------------------------------


def unit_count(width: LayerWidth, kind: str, heads: str | None) -> int | None:
    """A block's units of one kind in `width`: MLP channels, or attention units (key/value groups with
    `kv-groups` heads, else query heads per group)."""
    if kind == "mlp":
        return width.channels
    if width.attention_heads is None:
        return None
    if heads == "kv-groups":
        return width.key_value_heads
    return width.attention_heads // width.key_value_heads


def with_unit_count(width: LayerWidth, kind: str, count: int, heads: str | None) -> LayerWidth:
    """`width` with `count` units of one kind (counted as `unit_count` counts them)."""
    q, kv, channels = width.attention_heads, width.key_value_heads, width.channels
    if kind == "mlp":
        channels = count
    elif heads == "kv-groups":
        q, kv = count * (q // kv), count
    else:  # queries: the same number in every group
        q = count * kv
    return LayerWidth(q, kv, channels)


def with_unit_counts(widths: list[LayerWidth], counts: dict[tuple[int, str], int],
                     heads: str | None) -> list[LayerWidth]:
    """`widths` with the unit counts `counts` gives by (block, kind); the others as they are."""
    result = []
    for index, width in enumerate(widths):
        for kind in ("attention", "mlp"):
            if (index, kind) in counts:
                width = with_unit_count(width, kind, counts[(index, kind)], heads)
        result.append(width)
    return result


def removals_to(units: list[Units], before: list[LayerWidth], widths: list[LayerWidth]) -> dict[tuple[int, str], int]:
    """Units each block loses to go from `before` to `widths` (attention units are key/value groups or,
    with `queries` units, query heads per group); refuses a width above the current one."""
    removals = {}
    for u in units:
        heads = "kv-groups" if u.head_scores is None else "queries"
        have, want = unit_count(before[u.block], u.kind, heads), unit_count(widths[u.block], u.kind, heads)
        if want is None or not 0 < want <= have:
            raise WidthError(f"block {u.block}: cannot prune {u.kind} from {have} to {want} units")
        removals[(u.block, u.kind)] = have - want
    return removals
