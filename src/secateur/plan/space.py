"""The search space: how many blocks to remove, then which share of the rest as heads and MLP
channels, how that share splits between attention and MLP, and how much of it goes as hidden
channels; for a mixture of experts, how many blocks and which share of every MoE block's routed
experts; for either, how many tokens of the vocabulary to keep. Grids come from `0,0.1,0.2` or `0:0.5:0.1`; depth also takes `0:0.5`, every block count
in between; the split also takes `default` (the width stage's own rounding)."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from secateur.errors import ConfigError

if TYPE_CHECKING:
    from secateur.width import WidthConfig


def split_order(split: float | None) -> tuple[bool, float]:
    """Sorts attention splits: the default (None) first, then by fraction."""
    return split is not None, split or 0.0


@functools.total_ordering
@dataclass(frozen=True)
class Candidate:
    """Remove `blocks` decoder blocks (the angular span, compensated), then `width` of the remaining
    blocks' parameters as whole key/value groups and MLP channels (uniform widths), `hidden` of the
    hidden channels counting towards it; `attention`: the fraction of every block's key/value groups
    among them (the width stage's --attention-fraction; None: its default rounding of `width`);
    `reconstruct`: the width stage refits the output projections (a setting of the whole plan, like
    `round_to`: not part of the key); `experts`: the fraction of every MoE block's routed experts
    removed after the blocks (the experts stage, REAP); `vocabulary`: the tokens kept in the embedding
    and LM head, last (the vocabulary stage's --keep-tokens; 0: all)."""

    blocks: int
    width: float
    hidden: float = 0.0
    round_to: int = 8  # MLP widths and the hidden size are multiples of this
    attention: float | None = None
    reconstruct: bool = False
    experts: float = 0.0
    vocabulary: int = 0

    def _order(self) -> tuple:
        return (self.blocks, self.width, self.hidden, self.round_to, *split_order(self.attention), self.experts,
                -self.vocabulary if self.vocabulary else -math.inf)

    def __lt__(self, other: "Candidate") -> bool:
        return self._order() < other._order()

    @property
    def stage(self) -> "Candidate":
        """The width stage alone (no blocks removed): uniform widths do not depend on the depth, so
        every candidate of one stage has the same block shape."""
        return dataclasses.replace(self, blocks=0, vocabulary=0)

    @property
    def key(self) -> str:
        split = "" if self.attention is None else f"-a{self.attention:g}"
        experts = f"-e{self.experts:g}" if self.experts else ""  # absent for dense models: their caches stay valid
        vocabulary = f"-v{self.vocabulary}" if self.vocabulary else ""  # absent likewise
        return f"d{self.blocks}-w{self.width:g}-h{self.hidden:g}{split}{experts}{vocabulary}"

    @property
    def kind(self) -> str:
        """depth, width, hidden, experts, vocabulary, or a mix of them (the single-kind baselines are
        depth, width, experts and vocabulary)."""
        parts = [name for name, on in (("depth", self.blocks), ("width", self.width and not self.hidden),
                                       ("width+hidden", self.hidden), ("experts", self.experts),
                                       ("vocabulary", self.vocabulary)) if on]  # fmt: skip
        return " + ".join(parts) or "dense"

    def width_config(self) -> "WidthConfig":
        """The width stage's settings (the stage's recipe table says the same)."""
        from secateur.width import WidthConfig

        return WidthConfig(self.width, hidden_fraction=self.hidden, round_to=self.round_to,
                           attention_fraction=self.attention, reconstruct=self.reconstruct)

    def stages(self, counting: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """The candidate as recipe [[stage]] tables (depth first: width then scores the shallower model;
        the vocabulary last, so the other stages calibrate on the ids the planner scored them on).
        `counting`: the vocabulary stage's calibration settings (the text whose tokens it counts)."""
        tables: list[dict[str, Any]] = []
        if self.blocks:
            tables.append({"method": "angular", "remove_blocks": self.blocks})
        if self.experts:
            tables.append({"method": "experts", "remove_fraction": self.experts})
        if self.width:
            width: dict[str, Any] = {"method": "width", "remove_fraction": self.width}
            if self.hidden:
                width["hidden_fraction"] = self.hidden
            if self.attention is not None:
                width["attention_fraction"] = self.attention
            width["round_to"] = self.round_to
            if self.reconstruct:
                width["reconstruct"] = True
            tables.append(width)
        if self.vocabulary:
            tables.append({"method": "vocabulary", "keep_tokens": self.vocabulary, **(counting or {})})
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


def parse_splits(text: str) -> tuple[float | None, ...]:
    """`--attention`: `default` and fractions of the key/value groups (`default,0,0.34`, `0:0.5:0.25`);
    None stands for `default`."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    default = "default" in parts
    rest = ",".join(p for p in parts if p != "default")
    if ":" in rest and "," in rest:
        raise ConfigError(f"--attention {text!r}: give default,a,b,c or start:stop:step")
    fractions = parse_grid(rest, "attention") if rest else ()
    if not default and not fractions:
        raise ConfigError(f"--attention {text!r}: give default and/or fractions of the key/value groups")
    return ((None,) if default else ()) + fractions


def parse_vocabulary(text: str, vocab_size: int) -> tuple[int, ...]:
    """`--vocabulary`: token counts to keep (`32768,49152`), each below the model's vocabulary; the
    whole vocabulary (0) comes first. Empty: no vocabulary axis."""
    try:
        sizes = sorted({int(p) for p in text.split(",") if p.strip()})
    except ValueError:
        raise ConfigError(f"--vocabulary {text!r}: give token counts to keep, e.g. 32768,49152") from None
    wrong = [n for n in sizes if not 0 < n < vocab_size]
    if wrong:
        raise ConfigError(f"--vocabulary {wrong[0]}: the tokens kept must be more than 0 and fewer than the "
                          f"model's {vocab_size:,}")
    return (0, *sizes)


def candidates(depths: tuple[int, ...], widths: tuple[float, ...], hiddens: tuple[float, ...],
               round_to: int = 8, splits: tuple[float | None, ...] = (None,),
               reconstruct: bool = False, experts: tuple[float, ...] = (0.0,),
               vocabularies: tuple[int, ...] = (0,)) -> list[Candidate]:  # fmt: skip
    """Every combination but the dense model; hidden channels and attention splits only come with
    some width (they are shares of it)."""
    out = []
    for blocks, width, hidden, split, share, tokens in itertools.product(depths, widths, hiddens, splits, experts,
                                                                         vocabularies):  # fmt: skip
        if (hidden or split is not None) and not width:
            continue
        if blocks or width or share or tokens:
            out.append(Candidate(blocks, width, hidden, round_to, split, reconstruct and bool(width), share, tokens))
    return out
