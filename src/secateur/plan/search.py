"""Pure parts of the search: the Pareto front, the boundary of what meets a target, successive
halving's cut, and the rank correlation that validates the proxy."""

from __future__ import annotations

import math
from typing import Sequence


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates, both coordinates minimised (a point is
    dominated by one at least as good in both and better in one), sorted by the second coordinate."""
    front = []
    for i, (a, b) in enumerate(points):
        if not any((c <= a and d <= b) and (c < a or d < b) for j, (c, d) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: (points[i][1], points[i][0]))


def undominated(points: Sequence[tuple[object, tuple[float, ...]]]) -> list[int]:
    """Indices of the (group, removal) points no other point of the same group dominates: one that
    removes at most as much in every coordinate, and less in one. Among candidates that all meet a
    target, the dominated ones remove more than needed and score worse (quality falls with every kind
    of removal), so only the boundary is searched."""
    out = []
    for i, (group, mine) in enumerate(points):
        if not any(g == group and theirs != mine and all(t <= m for t, m in zip(theirs, mine))
                   for j, (g, theirs) in enumerate(points) if j != i):  # fmt: skip
            out.append(i)
    return out


def halve(scores: dict[str, float], keep: float = 0.5, least: int = 1) -> list[str]:
    """Successive halving's cut: the best `keep` share of the keys by score (lower is better), at
    least `least` of them; ties at the cut stay in."""
    if not scores:
        return []
    ranked = sorted(scores, key=lambda k: scores[k])
    count = min(len(ranked), max(least, math.ceil(len(ranked) * keep)))
    cut = scores[ranked[count - 1]]
    return [k for k in ranked if scores[k] <= cut]


def ranks(values: Sequence[float]) -> list[float]:
    """Ranks from 1, ties given the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's correlation of the ranks."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError("rank correlation needs two sequences of the same length, at least 2")
    x, y = ranks(a), ranks(b)
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cov = sum((p - mx) * (q - my) for p, q in zip(x, y))
    vx, vy = sum((p - mx) ** 2 for p in x), sum((q - my) ** 2 for q in y)
    return cov / math.sqrt(vx * vy) if vx and vy else float("nan")
