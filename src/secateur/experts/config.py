"""Typed configuration of an expert-pruning stage."""

from __future__ import annotations

from dataclasses import dataclass

from secateur.errors import ConfigError
from secateur.experts.criteria import CRITERIA
from secateur.schema import Requires, option, refuse_inapplicable


@dataclass(frozen=True)
class ExpertsConfig:
    """Remove routed experts from every MoE block: `fraction` of them, or `count` per block.

    criterion: reap (default; REAP's gate-weighted output norm over the tokens routed to the
      expert), frequency (tokens routed), naee (the kept set that best reproduces the block's routed
      output), random (the baseline). Every MoE block keeps the same number of experts, so the stock
      config and `from_pretrained` reload the output.
    min_tokens: experts routed fewer calibration tokens than this in a block are reported (their
      scores rest on little data); they are scored on what they saw.
    search_tokens: naee reconstructs the block's output on this many calibration tokens per block
      (every expert's output on all of them is held in memory).
    """

    criterion: str = option("reap", "expert score: reap, frequency, naee or random", choices=lambda: tuple(CRITERIA))
    fraction: float | None = option(None, "fraction of every MoE block's routed experts to remove", key="remove_fraction")
    count: int | None = option(None, "routed experts to remove from every MoE block", key="remove_experts")
    min_tokens: int = option(16, "report experts routed fewer calibration tokens than this")
    search_tokens: int = option(4096, "naee: calibration tokens per block the search reconstructs",
                                requires=Requires(lambda c: c.criterion == "naee", "--criterion naee"))
    draw_seed: int = option(0, "random: the draw's seed", requires=Requires(lambda c: c.criterion == "random",
                                                                              "--criterion random"))

    def __post_init__(self) -> None:
        refuse_inapplicable(self)
        if self.criterion not in CRITERIA:
            raise ConfigError(f"--criterion must be one of {', '.join(CRITERIA)}, got {self.criterion!r}")
        if (self.fraction is None) == (self.count is None):
            raise ConfigError("expert pruning needs exactly one of --remove-fraction (of every MoE block's experts) "
                              "and --remove-experts (per block)")
        if self.fraction is not None and not 0 < self.fraction < 1:
            raise ConfigError(f"--remove-fraction must be in (0, 1), got {self.fraction}")
        if self.count is not None and self.count < 1:
            raise ConfigError(f"--remove-experts must be at least 1, got {self.count}")
        if self.min_tokens < 0 or self.search_tokens < 1:
            raise ConfigError("--min-tokens must be at least 0 and --search-tokens at least 1")

    @property
    def method_name(self) -> str:
        return "experts"

    @property
    def needs_calibration(self) -> bool:
        return self.criterion != "random"

    def removed(self, experts: int, top_k: int) -> int:
        """How many of a block's `experts` go; the rest must still hold the `top_k` each token needs."""
        remove = self.count if self.count is not None else round(self.fraction * experts)
        if remove < 1:
            raise ConfigError(f"--remove-fraction {self.fraction} of {experts} experts removes none; ask for more")
        if experts - remove < top_k:
            raise ConfigError(f"removing {remove} of {experts} experts leaves {experts - remove}, fewer than the "
                              f"{top_k} every token is routed to: remove at most {experts - top_k}")
        return remove
