"""Mixtures of text sources: calibration and training windows drawn from several corpora in fixed
proportions, each corpus's evaluation region skipped, interleaved so that every run of consecutive
windows (the validation windows at the end included) holds the corpora in proportion."""

from __future__ import annotations

from dataclasses import dataclass

from secateur.errors import DataError


@dataclass(frozen=True)
class Mixture:
    parts: tuple[tuple[str, float], ...]  # (source, weight); weights sum to 1
    description: str

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.parts)


# encyclopedic prose, discussion, code and technical documentation; news-sample and legal-sample are
# never in it, so they stay domains no mixture-trained model has seen
MIXTURES: dict[str, Mixture] = {
    "offline-mix": Mixture(
        (("enwiki-sample", 0.4), ("newsgroups-sample", 0.2), ("code-sample", 0.2), ("docs-sample", 0.2)),
        "offline mixture: 40% enwiki-sample, 20% each newsgroups-sample, code-sample, docs-sample",
    ),
}


def shares(count: int, weights: tuple[float, ...]) -> list[int]:
    """`count` split by `weights` with the largest-remainder rule (ties to the earlier part)."""
    total = sum(weights)
    exact = [count * w / total for w in weights]
    counts = [int(e) for e in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: count - sum(counts)]:
        counts[i] += 1
    return counts


def interleave(counts: list[int]) -> list[int]:
    """The part of each position, so that every prefix holds each part as close to its share as whole
    windows allow: position k goes to the part furthest behind its share of k + 1 (ties to the earlier)."""
    total, taken, order = sum(counts), [0] * len(counts), []
    for k in range(total):
        behind = [c * (k + 1) / total - t if t < c else float("-inf") for c, t in zip(counts, taken)]
        part = max(range(len(counts)), key=lambda i: (behind[i], -i))
        taken[part] += 1
        order.append(part)
    return order


def labels(source: str, count: int) -> list[str]:
    """The corpus of each of the `count` windows a mixture gives, in the order they come."""
    mixture = MIXTURES[source]
    order = interleave(shares(count, tuple(w for _, w in mixture.parts)))
    return [mixture.parts[i][0] for i in order]


def expand(sources: tuple[str, ...] | list[str]) -> list[str]:
    """Evaluation sources with every mixture replaced by its corpora (each scored on its own)."""
    out: list[str] = []
    for source in sources:
        for name in MIXTURES[source].sources if source in MIXTURES else (source,):
            if name not in out:
                out.append(name)
    if not out:
        raise DataError("give at least one evaluation source")
    return out
