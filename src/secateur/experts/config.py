"""Typed configuration of an expert-pruning stage."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from secateur.errors import ConfigError
from secateur.experts.criteria import CRITERIA
from secateur.schema import Requires, option, refuse_inapplicable

COUNT = Requires(lambda c: not c.width, "--method experts")
WIDTH = Requires(lambda c: c.width, "--method expert-width")
GLOBAL = Requires(lambda c: c.allocation == "global", "--allocation global")
METHODS = ("experts", "expert-width")


@dataclass(frozen=True)
class ExpertsConfig:
    """Prune the routed experts of every MoE block along one axis.

    `--method experts` removes `fraction` of every block's experts (or `count` of them) with their
    router rows; criterion: reap (default; REAP's gate-weighted output norm over the tokens routed to
    the expert), frequency (tokens routed), naee (the kept set that best reproduces the block's
    routed output), stun (clusters of experts with close router rows, one kept per cluster: STUN's
    expert stage, no calibration), random (the baseline). With `merge`, clusters of experts that behave alike (their
    outputs on the same calibration tokens) are merged instead, each into one expert: the members'
    weights averaged by how many tokens each was routed, the router row of the most-routed member
    (M-SMoE / HC-SMoE).
    allocation: `uniform` (default) removes the same number of experts from every MoE block, so the
      stock config and `from_pretrained` reload the output. `global` ranks the experts of all blocks
      together, each by its criterion score as a share of its block's total (the share of the
      block's routed tokens for frequency, of its REAP mass for reap), measured in one pass over the
      unpruned model; the lowest shares go, no block losing more than `max_block_fraction` of its
      experts or keeping fewer than the top-k. Blocks then hold different expert counts: the output
      loads with `secateur.load` or `from_pretrained(..., trust_remote_code=True)`, not with stock
      code alone, vLLM or llama.cpp (one expert count per model).
    `--method expert-width` removes `fraction` of every expert's MLP channels (Minitron's expert FFN
    axis), the same number in every expert (a stock config holds one expert width); a channel's score
    is the sum over the tokens routed to its expert of gate weight x |activation| x the norm of its
    down-projection column. With `shared_expert`, the shared expert (a family whose config holds its
    own width) loses the same fraction of its channels, scored alike over every token (its gate:
    the sigmoid of its scalar gate where it has one).
    min_tokens: experts routed fewer calibration tokens than this in a block are reported (their
      scores rest on little data); they are scored on what they saw.
    search_tokens: naee and merge compare every expert's output on this many calibration tokens per
      block (held in memory: experts x tokens x hidden floats).
    """

    criterion: str = option("reap", "expert score: reap, frequency, naee, stun or random", choices=lambda: tuple(CRITERIA),
                            requires=Requires(lambda c: not c.width and not c.merge, "--method experts without --merge"))
    fraction: float | None = option(None, "experts: fraction of every MoE block's routed experts to remove; "
                                          "expert-width: fraction of every expert's channels", key="remove_fraction")
    count: int | None = option(None, "routed experts to remove from every MoE block", key="remove_experts", requires=COUNT)
    merge: bool = option(False, "merge clusters of similar experts (weights averaged by routed tokens) instead of "
                                "removing experts", requires=COUNT)
    allocation: Literal["uniform", "global"] = option(
        "uniform", "uniform (every MoE block loses the same number of experts: stock config) or global (one ranking "
        "of all blocks' experts by their share of the block's score: per-block counts)", requires=Requires(
            lambda c: not c.width and not c.merge, "--method experts without --merge"))
    max_block_fraction: float | None = option(None, "global allocation: no MoE block loses more than this fraction of "
                                                    "its experts (default: target + (1 - target) / 2)", requires=GLOBAL)
    min_tokens: int = option(16, "report experts routed fewer calibration tokens than this")
    search_tokens: int = option(4096, "naee and merge: calibration tokens per block on which experts' outputs are "
                                      "compared", requires=Requires(lambda c: c.criterion == "naee" or c.merge,
                                                                    "--criterion naee or --merge"))
    draw_seed: int = option(0, "random: the draw's seed", requires=Requires(lambda c: c.criterion == "random",
                                                                              "--criterion random"))
    round_to: int = option(8, "expert-width: expert widths are multiples of this", requires=WIDTH)
    shared_expert: bool = option(False, "expert-width: also remove the same fraction of the shared expert's channels "
                                        "(Qwen2-MoE)", requires=WIDTH)
    width: bool = False  # set by the method (expert-width), not an option

    def __post_init__(self) -> None:
        refuse_inapplicable(self)
        if self.criterion not in CRITERIA:
            raise ConfigError(f"--criterion must be one of {', '.join(CRITERIA)}, got {self.criterion!r}")
        if self.width and self.fraction is None:
            raise ConfigError("expert-width needs --remove-fraction: the fraction of every expert's channels to remove")
        if (self.fraction is None) == (self.count is None):
            raise ConfigError("expert pruning needs exactly one of --remove-fraction (of every MoE block's experts) "
                              "and --remove-experts (per block)")
        if self.fraction is not None and not 0 < self.fraction < 1:
            raise ConfigError(f"--remove-fraction must be in (0, 1), got {self.fraction}")
        if self.count is not None and self.count < 1:
            raise ConfigError(f"--remove-experts must be at least 1, got {self.count}")
        if self.allocation == "global" and CRITERIA[self.criterion].score is None:
            raise ConfigError(f"--allocation global ranks experts by a score: use --criterion reap, frequency or random "
                              f"({self.criterion} chooses kept sets per block)")
        if self.max_block_fraction is not None and not 0 < self.max_block_fraction < 1:
            raise ConfigError(f"--max-block-fraction must be in (0, 1), got {self.max_block_fraction}")
        if self.min_tokens < 0 or self.search_tokens < 1 or self.round_to < 1:
            raise ConfigError("--min-tokens must be at least 0, --search-tokens and --round-to at least 1")

    @property
    def method_name(self) -> str:
        return METHODS[self.width]

    @property
    def criterion_name(self) -> str:
        """How experts are chosen: the criterion, or merge."""
        return "merge" if self.merge else self.criterion

    @property
    def needs_calibration(self) -> bool:
        return self.width or self.merge or CRITERIA[self.criterion].calibrated

    @property
    def needs_sample(self) -> bool:
        """Whether every expert's output on a token sample is compared (naee, merge)."""
        return not self.width and (self.merge or CRITERIA[self.criterion].search)

    def removed(self, experts: int, top_k: int) -> int:
        """How many of a block's `experts` go; the rest must still hold the `top_k` each token needs."""
        remove = self.count if self.count is not None else round(self.fraction * experts)
        if remove < 1:
            raise ConfigError(f"--remove-fraction {self.fraction} of {experts} experts removes none; ask for more")
        if experts - remove < top_k:
            raise ConfigError(f"removing {remove} of {experts} experts leaves {experts - remove}, fewer than the "
                              f"{top_k} every token is routed to: remove at most {experts - top_k}")
        return remove

    def total_removed(self, experts: list[int], top_k: int) -> int:
        """Global allocation: how many of all MoE blocks' experts (`experts` per block) go."""
        remove = self.count * len(experts) if self.count is not None else round(self.fraction * sum(experts))
        if remove < 1:
            raise ConfigError(f"--remove-fraction {self.fraction} of {sum(experts)} experts removes none; ask for more")
        return remove

    def block_floor(self, experts: int, top_k: int) -> int:
        """Global allocation: the fewest experts a block of `experts` may keep."""
        target = self.fraction if self.fraction is not None else self.count / experts
        cap = self.max_block_fraction if self.max_block_fraction is not None else target + (1 - target) / 2
        return max(top_k, experts - math.floor(cap * experts + 1e-9))

    def kept_channels(self, width: int) -> int:
        """How many of an expert's `width` channels stay (a multiple of round_to, at least one multiple)."""
        keep = max(self.round_to, round((1 - self.fraction) * width / self.round_to) * self.round_to)
        if keep >= width:
            raise ConfigError(f"--remove-fraction {self.fraction} of {width} channels rounded to multiples of "
                              f"{self.round_to} removes none; ask for more or lower --round-to")
        return keep
