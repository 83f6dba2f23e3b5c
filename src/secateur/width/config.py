"""Typed configuration of a width-pruning run: what to remove, how to score it, how to allocate it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from secateur.config import ConfigError
from secateur.width.scores import IMPORTANCE

HeadMode = Literal["kv-groups", "queries", "none"]
Allocation = Literal["uniform", "adaptive"]
HEAD_MODES = ("kv-groups", "queries", "none")
ALLOCATIONS = ("uniform", "adaptive")


@dataclass(frozen=True)
class WidthConfig:
    """Remove `fraction` of the decoder blocks' parameters as whole attention heads and MLP channels.

    heads: `kv-groups` removes whole key/value groups with their query heads (smaller KV cache);
      `queries` removes the same number of query heads from every group (KV cache unchanged);
      `none` prunes MLP channels only.
    allocation: `uniform` removes the same number of units from every block (stock config, stock
      `from_pretrained`, vLLM-compatible shapes); `adaptive` ranks the units of all blocks together
      on scores standardised per block and branch (FLAP), so widths differ per block.
    bias_compensation: fold the removed channels' mean contribution into the output projection's
      bias (FLAP); on by default for `fluctuation`, whose scores measure exactly what it cannot fold.
    round_to: uniform MLP widths (and the hidden size) are multiples of this (kernels favour aligned sizes).
    hidden_fraction: also remove this fraction of the hidden (embedding) channels, everywhere in the
      model (RMSNorm families). It counts towards `fraction`: heads and MLP channels make up the rest.
    """

    fraction: float
    importance: str = "fluctuation"
    allocation: Allocation = "uniform"
    heads: HeadMode = "kv-groups"
    bias_compensation: bool | None = None  # None: on for fluctuation, off otherwise
    round_to: int = 8
    hidden_fraction: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.fraction < 1:
            raise ConfigError(f"--remove-fraction must be in (0, 1), got {self.fraction}")
        if self.importance not in IMPORTANCE:
            raise ConfigError(f"--importance must be one of {', '.join(IMPORTANCE)}, got {self.importance!r}")
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"--allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}")
        if self.heads not in HEAD_MODES:
            raise ConfigError(f"--heads must be one of {', '.join(HEAD_MODES)}, got {self.heads!r}")
        if not 0 <= self.hidden_fraction < 1:
            raise ConfigError(f"--hidden-fraction must be in [0, 1), got {self.hidden_fraction}")
        if self.round_to < 1:
            raise ConfigError(f"--round-to must be at least 1, got {self.round_to}")

    @property
    def compensate(self) -> bool:
        return self.importance == "fluctuation" if self.bias_compensation is None else self.bias_compensation

    @property
    def needs_moments(self) -> bool:
        """Input moments: for activation / fluctuation scores and for bias compensation."""
        return IMPORTANCE[self.importance].activations or self.compensate

    @property
    def needs_calibration(self) -> bool:
        return self.needs_moments or IMPORTANCE[self.importance].gradients

    @property
    def method_name(self) -> str:
        return "width"

    def to_dict(self) -> dict[str, Any]:
        return {"method": "width", **asdict(self), "bias_compensation": self.compensate}


WIDTH_ONLY_KEYS = ("importance", "allocation", "heads", "bias_compensation", "round_to", "hidden_fraction")


def build_width_config(settings: dict[str, Any]) -> WidthConfig:
    """From merged recipe/flag settings (keys as the CLI flags, dashes as underscores)."""
    if "remove_fraction" not in settings:
        raise ConfigError("width pruning needs --remove-fraction: the fraction of decoder-block parameters to remove")
    keys = {k: settings[k] for k in WIDTH_ONLY_KEYS if settings.get(k) is not None}
    return WidthConfig(fraction=float(settings["remove_fraction"]), **keys)
