"""Which experts a block loses: a score per expert (the lowest go) or a search over kept sets.

frequency: tokens routed to the expert. reap: REAP (Lasby et al. 2025), the mean over the tokens
routed to j of gate_j(x) x ||f_j(x)||_2. random: a seeded draw (the floor any criterion must beat).
naee: NAEE-style search (Lu et al. 2024, "Not All Experts are Equal"): the kept set whose block
output, routed among the kept experts only, is closest to the block's output on calibration tokens;
every kept set is tried when there are at most `EXHAUSTIVE` of them, else experts go one at a time,
each time the one whose removal costs least.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from secateur.experts.stats import ExpertStats

EXHAUSTIVE = 5000  # kept sets tried one by one up to this many (Mixtral's 8 choose 4 is 70)
Error = Callable[[list[int]], float]  # kept experts -> squared error of the block's routed output


@dataclass(frozen=True)
class Criterion:
    help: str
    score: Callable[[ExpertStats, int], Tensor] | None = None  # (stats, seed) -> (experts,), low goes first
    search: bool = False  # chooses the kept set from the reconstruction error instead


def _random(stats: ExpertStats, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(len(stats.count), generator=generator, dtype=torch.float64)


CRITERIA: dict[str, Criterion] = {
    "reap": Criterion("mean over routed tokens of gate weight x expert output norm (REAP)",
                      lambda stats, seed: stats.mean(stats.reap)),
    "frequency": Criterion("tokens routed to the expert", lambda stats, seed: stats.count.clone()),
    "random": Criterion("a seeded random draw (the baseline)", _random),
    "naee": Criterion("the kept set that best reproduces the block's routed output (NAEE-style search)", search=True),
}


def lowest(scores: Tensor, remove: int) -> list[int]:
    """The `remove` experts of lowest score; ties go to the lower index."""
    order = sorted(range(len(scores)), key=lambda j: (float(scores[j]), j))
    return sorted(order[:remove])


def search_removal(experts: int, remove: int, error: Error) -> list[int]:
    """The experts whose removal leaves the smallest `error` of the kept rest (exhaustive when the
    kept sets are few, else greedy one expert at a time)."""
    keep = experts - remove
    if math.comb(experts, keep) <= EXHAUSTIVE:
        best = min(itertools.combinations(range(experts), keep), key=lambda kept: error(list(kept)))
        return sorted(set(range(experts)) - set(best))
    kept = list(range(experts))
    for _ in range(remove):
        drop = min(kept, key=lambda j: error([k for k in kept if k != j]))
        kept.remove(drop)
    return sorted(set(range(experts)) - set(kept))


def cluster(similarity: Tensor, groups: int) -> list[list[int]]:
    """Agglomerative clustering with average linkage: `similarity` (n, n) -> `groups` clusters, each
    sorted, in the order of their smallest member."""
    clusters = [[j] for j in range(similarity.shape[0])]
    while len(clusters) > groups:
        pairs = itertools.combinations(range(len(clusters)), 2)
        a, b = max(pairs, key=lambda p: (float(similarity[clusters[p[0]]][:, clusters[p[1]]].mean()), -p[0], -p[1]))
        clusters[a] = sorted(clusters[a] + clusters.pop(b))
    return sorted(clusters)
