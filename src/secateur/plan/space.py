"""The search space: how many blocks to remove, then which share of the rest as heads and MLP
channels, and how much of that as hidden channels. Grids come from `0,0.1,0.2` or `0:0.5:0.1`; depth also takes `0:0.5`, every block count in between."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from secateur.errors import ConfigError

if TYPE_CHECKING:
    from secateur.width import WidthConfig


@dataclass(frozen=True, order=True)
class Candidate:
    """Remove `blocks` decoder blocks (the angular span, compensated), then `width` of the remaining
    blocks' parameters as whole key/value groups and MLP channels (uniform widths), `hidden` of the
    hidden channels counting towards it."""

    blocks: int
    width: float
    hidden: float = 0.0
    round_to: int = 8  # MLP widths and the hidden size are multiples of this

    @property
    def key(self) -> str:
        return f"d{self.blocks}-w{self.width:g}-h{self.hidden:g}"

    @property
    def kind(self) -> str:
        """depth, width, hidden, or a mix of them (the single-kind baselines are the first two)."""
        parts = [name for name, on in (("depth", self.blocks), ("width", self.width and not self.hidden),
                                       ("width+hidden", self.hidden)) if on]  # fmt: skip
        return " + ".join(parts) or "dense"

    def width_config(self) -> "WidthConfig":
        """The width stage's settings (the stage's recipe table says the same)."""
        from secateur.width import WidthConfig

        return WidthConfig(self.width, hidden_fraction=self.hidden, round_to=self.round_to)

    def stages(self) -> list[dict[str, Any]]:
        """The candidate as recipe [[stage]] tables (depth first: width then scores the shallower model)."""
        tables: list[dict[str, Any]] = []
        if self.blocks:
            tables.append({"method": "angular", "remove_blocks": self.blocks})
        if self.width:
            width: dict[str, Any] = {"method": "width", "remove_fraction": self.width}
            if self.hidden:
                width["hidden_fraction"] = self.hidden
            width["round_to"] = self.round_to
            tables.append(width)
        return tables


def parse_grid(text: str, name: str, *, upper: float = 1.0) -> tuple[float, ...]:
    """`a,b,c` or `start:stop:step` (stop included) as sorted distinct fractions in [0, upper)."""
    text = text.strip()
    try:
        if ":" in text:
            start, stop, step = (float(p) for p in text.split(":"))
            if step <= 0:
                raise ValueError
            count = math.floor((stop - start) / step + 1e-9) + 1
            values = [round(start + i * step, 10) for i in range(max(count, 0))]
        else:
            values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ConfigError(f"--{name} {text!r}: give fractions as a,b,c or start:stop:step") from None
    if not values or any(not 0 <= v < upper for v in values):
        raise ConfigError(f"--{name} {text!r}: every fraction must be in [0, {upper:g})")
    return tuple(sorted(set(values)))


def block_counts(fractions: tuple[float, ...], blocks: int) -> tuple[int, ...]:
    """Depth fractions as distinct block counts (rounded), keeping at least one block."""
    return tuple(sorted({min(round(f * blocks), blocks - 1) for f in fractions}))


def depth_counts(text: str, blocks: int) -> tuple[int, ...]:
    """`--depth` as block counts: `start:stop` is every count from round(start * blocks) to
    round(stop * blocks); otherwise a grid of fractions (`parse_grid`), rounded."""
    parts = text.strip().split(":")
    if len(parts) != 2:
        return block_counts(parse_grid(text, "depth"), blocks)
    (start,), (stop,) = (parse_grid(part, "depth") for part in parts)
    if start > stop:
        raise ConfigError(f"--depth {text!r}: start:stop needs start <= stop")
    return tuple(range(round(start * blocks), min(round(stop * blocks), blocks - 1) + 1))


def candidates(depths: tuple[int, ...], widths: tuple[float, ...], hiddens: tuple[float, ...],
               round_to: int = 8) -> list[Candidate]:  # fmt: skip
    """Every combination but the dense model; hidden channels only come with some width (they count
    towards it)."""
    out = []
    for blocks, width, hidden in itertools.product(depths, widths, hiddens):
        if hidden and not width:
            continue
        if blocks or width:
            out.append(Candidate(blocks, width, hidden, round_to))
    return out
