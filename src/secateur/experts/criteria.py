"""Which experts a block loses: a score per expert (the lowest go) or a search over kept sets.

frequency: tokens routed to the expert. reap: REAP (Lasby et al. 2025), the mean over the tokens
routed to j of gate_j(x) x ||f_j(x)||_2. random: a seeded draw (the floor any criterion must beat).
naee: NAEE-style search (Lu et al. 2024, "Not All Experts are Equal"): the kept set whose block
output, routed among the kept experts only, is closest to the block's output on calibration tokens;
every kept set is tried when there are at most `EXHAUSTIVE` of them, else experts go one at a time,
each time the one whose removal costs least. stun: STUN's expert stage (Lee et al. 2025,
"Structured-Then-Unstructured Pruning for Scalable MoE Pruning", its released code's default): experts
whose router rows lie close behave alike, so they are clustered by single linkage on the L2 distance
between router rows until as many clusters remain as experts stay, and each cluster keeps the member
whose weights lie closest to the cluster's mean weights; no calibration pass.
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
    # chooses from the weights alone: (router (experts, hidden), every expert's weights flattened
    # (experts, n), how many go) -> the experts removed
    weights: Callable[[Tensor, Tensor, int], list[int]] | None = None

    @property
    def calibrated(self) -> bool:
        """Whether the criterion reads calibration statistics."""
        return self.search or (self.score is not None and self.score is not _random)


def _random(stats: ExpertStats, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(len(stats.count), generator=generator, dtype=torch.float64)


def single_linkage(distance: Tensor, groups: int) -> list[list[int]]:
    """Agglomerative clustering with single linkage (clusters as far apart as their closest members):
    `distance` (n, n) -> `groups` clusters, each sorted, in the order of their smallest member; ties
    merge the pair of lower indices first."""
    clusters = [[j] for j in range(distance.shape[0])]
    while len(clusters) > groups:
        pairs = itertools.combinations(range(len(clusters)), 2)
        a, b = min(pairs, key=lambda p: (float(distance[clusters[p[0]]][:, clusters[p[1]]].min()), p))
        clusters[a] = sorted(clusters[a] + clusters.pop(b))
    return sorted(clusters)


def closest_to_mean(clusters: list[list[int]], weights: Tensor) -> list[int]:
    """Per cluster, the member whose weights (experts, n) lie closest (L2) to the members' mean; ties
    go to the lower index."""
    kept = []
    for members in clusters:
        rows = weights[members].double()  # (members, n)
        distance = (rows - rows.mean(dim=0)).norm(dim=1)
        kept.append(members[int(torch.argmin(distance))])  # argmin returns the first of equal minima
    return kept


def stun_removal(router: Tensor, weights: Tensor, remove: int) -> list[int]:
    """STUN's expert stage: cluster router rows (experts, hidden) by single linkage on L2 distance
    into experts - remove clusters, keep each cluster's member closest to its mean weights."""
    rows = router.double()
    clusters = single_linkage(torch.cdist(rows, rows), rows.shape[0] - remove)
    kept = closest_to_mean(clusters, weights)
    return sorted(set(range(rows.shape[0])) - set(kept))


CRITERIA: dict[str, Criterion] = {
    "reap": Criterion("mean over routed tokens of gate weight x expert output norm (REAP)",
                      lambda stats, seed: stats.mean(stats.reap)),
    "frequency": Criterion("tokens routed to the expert", lambda stats, seed: stats.count.clone()),
    "random": Criterion("a seeded random draw (the baseline)", _random),
    "naee": Criterion("the kept set that best reproduces the block's routed output (NAEE-style search)", search=True),
    "stun": Criterion("STUN: experts clustered by their router rows, one kept per cluster (no calibration)",
                      weights=stun_removal),
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
