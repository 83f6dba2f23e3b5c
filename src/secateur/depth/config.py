"""Typed configuration of a depth-pruning run: which units to score, how, and how many to remove."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Union

from secateur.errors import ConfigError
from secateur.schema import option


@dataclass(frozen=True)
class BlockInfluenceConfig:
    """ShortGPT: remove the blocks whose output is most similar to their input (one pass)."""

    name: ClassVar[str] = "block-influence"


@dataclass(frozen=True)
class AngularConfig:
    """Remove the span of consecutive blocks whose entering and leaving states are closest (one pass).

    The paper measures the last token of each window; averaging over every token (`all`, default)
    uses the whole calibration set and is steadier on short calibration runs.
    """

    name: ClassVar[str] = "angular"

    positions: Literal["all", "last"] = option("all", "tokens the angular distance averages over: all, or the last "
                                                     "of each window (the paper's)")

    def __post_init__(self) -> None:
        if self.positions not in ("all", "last"):
            raise ConfigError(f"angular positions must be 'all' or 'last', got {self.positions!r}")


@dataclass(frozen=True)
class GreedyLossConfig:
    """Remove the block whose removal raises the calibration loss least; re-score; repeat."""

    name: ClassVar[str] = "greedy-loss"


@dataclass(frozen=True)
class FinerCutConfig:
    """Attention and MLP branches are separate candidates; remove the one whose removal changes the
    model's next-token distributions least (Jensen-Shannon divergence to the original model);
    re-score; repeat."""

    name: ClassVar[str] = "finercut"


DepthMethod = Union[BlockInfluenceConfig, AngularConfig, GreedyLossConfig, FinerCutConfig]


@dataclass(frozen=True)
class Amount:
    """How much to remove: a count of units (blocks, or branches for sublayer methods) or a fraction.

    For block methods the fraction is of the blocks (rounded to the nearest count); for sublayer
    methods it is of the decoder blocks' parameters, i.e. the same per-token compute budget as
    removing that fraction of blocks: branches are removed until at least that much is gone.
    """

    count: int | None = None
    fraction: float | None = None

    def __post_init__(self) -> None:
        if (self.count is None) == (self.fraction is None):
            raise ConfigError("give exactly one of a count (--remove-blocks / --remove-sublayers) or --remove-fraction")
        if self.count is not None and self.count < 1:
            raise ConfigError(f"the number of units to remove must be at least 1, got {self.count}")
        if self.fraction is not None and not 0.0 < self.fraction < 1.0:
            raise ConfigError(f"--remove-fraction must be in (0, 1), got {self.fraction}")

    def __str__(self) -> str:
        return f"{self.count} units" if self.count is not None else f"{self.fraction:g} of the blocks"


@dataclass(frozen=True)
class DepthConfig:
    """`compensate`: after choosing, re-fit the MLP output projection of the block before each run of
    removed blocks to reproduce the state leaving the run (see `secateur.depth.compensate`), with a
    ridge of `compensate_damp` x the mean Gram diagonal towards the original weights. None (the
    default) compensates wherever it can: block methods, on families whose MLP output is added
    straight to the residual stream, with no earlier sparsity stage whose zeros the fit would fill;
    elsewhere it is off and the reason recorded. True where it cannot work is refused."""

    method: DepthMethod
    amount: Amount
    compensate: bool | None = option(None, "block methods: re-fit the MLP output projection of the block before "
                                            "each removed run to reproduce the state leaving it (linear, no new "
                                            "parameters; default: on where the family and earlier stages allow)")
    compensate_damp: float = option(0.1, "compensate: ridge towards the original weights, times the mean Gram "
                                         "diagonal")
    remove_last: bool = option(False, "let the search remove the final block (kept by default: the depth literature "
                                      "removes spans that end before it, and removing it broke Gemma 3)")
    keep_full_attention: bool = option(False, "never remove a block whose attention is global (full) where the "
                                              "family mixes sliding-window and global layers (Gemma 2 / 3)")

    def __post_init__(self) -> None:
        if self.compensate_damp < 0:
            raise ConfigError(f"--compensate-damp must be >= 0, got {self.compensate_damp}")
        if self.compensate and isinstance(self.method, FinerCutConfig):
            raise ConfigError(f"--compensate re-fits the block before each removed run of blocks; {self.method_name} "
                              "removes branches: use a block method (block-influence, angular, greedy-loss)")

    @property
    def method_name(self) -> str:
        return self.method.name


