"""Typed configuration of a width-pruning run: what to remove, how to score it, how to allocate it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from secateur.errors import ConfigError
from secateur.schema import REQUIRED, Requires, option, refuse_inapplicable
from secateur.width.scores import IMPORTANCE

HeadMode = Literal["kv-groups", "queries", "none"]
Allocation = Literal["uniform", "adaptive"]
HEAD_MODES: tuple[str, ...] = get_args(HeadMode)
ALLOCATIONS: tuple[str, ...] = get_args(Allocation)


@dataclass(frozen=True)
class WidthConfig:
    """Remove `fraction` of the decoder blocks' parameters as whole attention heads and MLP channels.

    heads: `kv-groups` removes whole key/value groups with their query heads (smaller KV cache);
      `queries` removes the same number of query heads from every group (KV cache unchanged);
      `none` prunes MLP channels only. Unset: kv-groups where the family keeps an explicit head size,
      none where it derives it from hidden_size / heads (GPT-2, OPT, GPT-NeoX).
    allocation: `uniform` removes the same number of units from every block (stock config, stock
      `from_pretrained`, vLLM-compatible shapes); `adaptive` ranks the units of all blocks together
      on scores standardised per block and branch (FLAP), so widths differ per block.
    bias_compensation: fold the removed channels' mean contribution into the output projection's
      bias (FLAP); on by default for `fluctuation`, whose scores measure exactly what it cannot fold.
    round_to: MLP widths (and the hidden size) are multiples of this (kernels favour aligned sizes; an
      N:M stage after width needs M to divide them); unset: 8 for uniform widths and the hidden size,
      no rounding for adaptive widths.
    hidden_fraction: also remove this fraction of the hidden (embedding) channels, everywhere in the
      model (RMSNorm families). It counts towards `fraction`: heads and MLP channels make up the rest.
    attention_fraction: under uniform allocation, every block loses round(this x its attention units)
      instead of round(fraction x units); the MLP channels make up the parameter target. With few
      key/value groups the default rounding is coarse (SmolLM2-135M's 3 groups at fraction 0.5: 2 go),
      so this chooses the attention/MLP split (Minitron searches it; 1/3 keeps 2 of 3 groups).
    reconstruct: refit every pruned block's output projections (o_proj, down_proj) on their kept
      inputs by ridge least squares, block by block on the pruned model's calibration activations
      (`secateur.width.reconstruct`); the bias is refitted too where it exists (bias compensation on).
      One more streamed calibration pass; the shapes and the saved config are unchanged.
    reconstruct_damp: the ridge towards the original weights, times the mean Gram diagonal.
    """

    fraction: float = option(REQUIRED, "fraction of the decoder blocks' parameters to remove", key="remove_fraction")
    importance: str = option("fluctuation", "unit score: magnitude, activation, fluctuation (FLAP) or taylor",
                             choices=lambda: tuple(IMPORTANCE))
    allocation: Allocation = option("uniform", "uniform (the same widths in every block: stock config) or adaptive "
                                               "(per-block widths)")
    heads: HeadMode | None = option(None, "remove whole key/value groups (kv-groups), query heads per group "
                                          "(queries), or no heads (none); default kv-groups where the family's head "
                                          "size is explicit, none otherwise")
    bias_compensation: bool | None = option(None, "fold removed channels' mean output into a bias (default: on for "
                                                  "fluctuation)")
    round_to: int | None = option(None, "MLP widths (and the hidden size) are multiples of this; default 8 for "
                                        "uniform widths and the hidden size, 1 (no rounding) for adaptive widths")
    hidden_fraction: float = option(0.0, "also remove this fraction of the hidden (embedding) channels everywhere "
                                         "(RMSNorm families); counts towards remove_fraction")
    attention_fraction: float | None = option(None, "uniform allocation: remove this fraction of every block's "
                                                    "attention units (default: remove_fraction); the MLP channels "
                                                    "make up the rest of the parameters")
    reconstruct: bool | None = option(None, "refit each pruned block's output projections on their kept inputs by "
                                            "least squares on calibration (block by block on the pruned model); "
                                            "default: on for Gemma 3 (its config cannot hold the bias compensation's "
                                            "biases; measured to help), off elsewhere")
    reconstruct_damp: float | None = option(None, "reconstruct: ridge towards the original weights, times the mean "
                                                  "Gram diagonal (default 0.01)",
                                            requires=Requires(lambda c: c.reconstruct is not False, "--reconstruct"))

    def __post_init__(self) -> None:
        refuse_inapplicable(self)
        if not 0 < self.fraction < 1:
            raise ConfigError(f"--remove-fraction must be in (0, 1), got {self.fraction}")
        if self.importance not in IMPORTANCE:
            raise ConfigError(f"--importance must be one of {', '.join(IMPORTANCE)}, got {self.importance!r}")
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"--allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}")
        if self.heads is not None and self.heads not in HEAD_MODES:
            raise ConfigError(f"--heads must be one of {', '.join(HEAD_MODES)}, got {self.heads!r}")
        if not 0 <= self.hidden_fraction < 1:
            raise ConfigError(f"--hidden-fraction must be in [0, 1), got {self.hidden_fraction}")
        if self.attention_fraction is not None:
            if not 0 <= self.attention_fraction < 1:
                raise ConfigError(f"--attention-fraction must be in [0, 1), got {self.attention_fraction}")
            if self.allocation != "uniform":
                raise ConfigError("--attention-fraction applies to uniform allocation only: drop it or use "
                                  "--allocation uniform")
            if self.heads == "none":
                raise ConfigError("--attention-fraction needs heads to remove, and --heads none keeps them all: drop one")
        if self.reconstruct_damp is not None and self.reconstruct_damp < 0:  # without --reconstruct: its `requires`
            raise ConfigError(f"--reconstruct-damp must be at least 0, got {self.reconstruct_damp}")
        if self.round_to is not None and self.round_to < 1:
            raise ConfigError(f"--round-to must be at least 1, got {self.round_to}")

    @property
    def mlp_multiple(self) -> int:
        return self.round_to if self.round_to is not None else (8 if self.allocation == "uniform" else 1)

    @property
    def hidden_multiple(self) -> int:
        return self.round_to if self.round_to is not None else 8

    @property
    def attention_share(self) -> float:
        """The fraction of attention units uniform allocation removes from every block."""
        return self.fraction if self.attention_fraction is None else self.attention_fraction

    @property
    def compensate(self) -> bool:
        return self.importance == "fluctuation" if self.bias_compensation is None else self.bias_compensation

    @property
    def damp(self) -> float:
        """The reconstruction's ridge (see `reconstruct_damp`)."""
        return 0.01 if self.reconstruct_damp is None else self.reconstruct_damp

    @property
    def needs_moments(self) -> bool:
        """Input moments: for activation / fluctuation scores and for bias compensation."""
        return IMPORTANCE[self.importance].activations or self.compensate

    @property
    def needs_calibration(self) -> bool:
        return self.needs_moments or IMPORTANCE[self.importance].gradients or self.reconstruct is not False

    @property
    def method_name(self) -> str:
        return "width"


