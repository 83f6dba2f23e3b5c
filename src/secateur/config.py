"""Typed, frozen configuration for a pruning run.

CLI flags and recipe files only build these objects; the engine and the methods read them.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

Scope = Literal["per_row", "per_layer", "global"]
SCOPES: tuple[str, ...] = ("per_row", "per_layer", "global")
BLOCK_STATS: tuple[str, ...] = ("sequential", "dense")


class ConfigError(ValueError):
    """A configuration value is out of range or inconsistent; the message says how to fix it."""


@dataclass(frozen=True)
class Unstructured:
    """Zero a fraction `sparsity` of the weights of every target layer, anywhere in the matrix."""

    sparsity: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"sparsity must be in [0, 1), got {self.sparsity}")

    @property
    def fraction(self) -> float:
        return self.sparsity

    def __str__(self) -> str:
        return f"{self.sparsity:g} unstructured"


@dataclass(frozen=True)
class NM:
    """Semi-structured sparsity: *keep* `n` weights of every `m` consecutive inputs of a row."""

    n: int
    m: int

    def __post_init__(self) -> None:
        if self.m < 1 or self.n < 1:
            raise ConfigError(f"N:M needs positive N and M, got {self.n}:{self.m}")
        if self.n >= self.m:
            raise ConfigError(f"N:M keeps N of every M weights, so N must be < M; got {self.n}:{self.m}")

    @property
    def fraction(self) -> float:
        return 1.0 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    @classmethod
    def parse(cls, text: str) -> "NM":
        try:
            n, m = (int(part) for part in text.split(":"))
        except ValueError:
            raise ConfigError(f"pattern must look like N:M (e.g. 2:4), got {text!r}") from None
        return cls(n, m)


Target = Union[Unstructured, NM]


# --- method configurations, one per registered method --------------------------------------------


@dataclass(frozen=True)
class MagnitudeConfig:
    """Prune the smallest |W|; `scope` says over what set of weights the ranking runs."""

    scope: Scope = "per_layer"  # the classic magnitude baseline ranks within each layer


@dataclass(frozen=True)
class WandaConfig:
    """Wanda (Sun et al. 2023): score |W_ij| * ||X_j||_2, ranked within each output row."""

    scope: Scope = "per_row"  # the paper's choice; per_layer is the ablation


@dataclass(frozen=True)
class SparseGPTConfig:
    """SparseGPT (Frantar & Alistarh 2023): blockwise OBS pruning with weight updates."""

    block_size: int = 128  # columns per lazy-update block; also the mask-selection block
    damp: float = 0.01  # added to the Hessian diagonal, relative to its mean


@dataclass(frozen=True)
class CalibConfig:
    """Where calibration text comes from and how windows are drawn from it."""

    source: str = "enwiki-sample"
    samples: int = 64
    seq_len: int = 512
    seed: int = 0
    text_field: str = "text"
    # Calibration never overlaps the evaluation windows when both come from one source: the first
    # `holdout_windows` windows of `holdout_seq_len` tokens are reserved for evaluation.
    holdout_windows: int = 64
    holdout_seq_len: int = 512
    batch_size: int = 4  # samples per forward call (all batches stay in flight: one pass per block)


@dataclass(frozen=True)
class PruneConfig:
    """One pruning run: the method (with its options), the sparsity target and the layer filter."""

    method: Any  # one of the registered method configs
    target: Target
    ignore: tuple[str, ...] = ()  # fnmatch patterns of layer names to leave dense
    # Inside a block, a layer's statistic comes from inputs that went through its already-pruned
    # predecessors ("sequential": one forward per block) or through the dense block ("dense": two
    # forwards per block, what the SparseGPT/Wanda reference code and llm-compressor do).
    block_stats: str = "sequential"

    def __post_init__(self) -> None:
        if self.block_stats not in BLOCK_STATS:
            raise ConfigError(f"block_stats must be one of {BLOCK_STATS}, got {self.block_stats!r}")

    @property
    def method_name(self) -> str:
        from secateur.methods import name_of

        return name_of(self.method)

    def to_dict(self) -> dict[str, Any]:
        target: dict[str, Any] = (
            {"pattern": str(self.target)} if isinstance(self.target, NM) else {"sparsity": self.target.sparsity}
        )
        return {
            "method": self.method_name, **dataclasses.asdict(self.method), **target,
            "ignore": list(self.ignore), "block_stats": self.block_stats,
        }  # fmt: skip


# --- building configs from flat key/value settings (CLI flags and recipe files) ----------------

RECIPE_KEYS = {
    "method", "sparsity", "pattern", "scope", "block_size", "damp", "ignore", "block_stats",
    "calib", "calib_samples", "calib_seq_len", "calib_batch_size", "seed", "text_field",
    "dtype", "device", "eval", "eval_windows", "eval_seq_len",
    "remove_blocks", "remove_sublayers", "remove_fraction", "positions",
}  # fmt: skip


def read_recipe(path: str | Path) -> dict[str, Any]:
    """A recipe is a flat TOML table whose keys mirror the `prune` flags (dashes or underscores)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"recipe {path} is not valid TOML: {exc}") from None
    settings = {key.replace("-", "_"): value for key, value in raw.items()}
    unknown = sorted(set(settings) - RECIPE_KEYS)
    if unknown:
        raise ConfigError(f"recipe {path} has unknown keys {unknown}; known keys: {sorted(RECIPE_KEYS)}")
    return settings


def build_prune_config(settings: dict[str, Any]) -> PruneConfig:
    """Build a PruneConfig from flat settings; unknown method options for a method are refused."""
    from secateur.methods import method_config

    if settings.get("pattern") and settings.get("sparsity") is not None:
        raise ConfigError("give either --sparsity (unstructured) or --pattern N:M, not both")
    if settings.get("pattern"):
        target: Target = NM.parse(str(settings["pattern"]))
    else:
        target = Unstructured(float(settings.get("sparsity", 0.5)))
    method = method_config(str(settings.get("method", "wanda")), settings)
    ignore = settings.get("ignore") or ()
    ignore = tuple([ignore] if isinstance(ignore, str) else ignore)
    return PruneConfig(method=method, target=target, ignore=ignore, block_stats=settings.get("block_stats") or "sequential")


def build_calib_config(settings: dict[str, Any], defaults: CalibConfig | None = None) -> CalibConfig:
    defaults = defaults or CalibConfig()
    pick = lambda key, default: default if settings.get(key) is None else settings[key]  # noqa: E731
    config = CalibConfig(
        source=str(pick("calib", defaults.source)),
        samples=int(pick("calib_samples", defaults.samples)),
        seq_len=int(pick("calib_seq_len", defaults.seq_len)),
        seed=int(pick("seed", defaults.seed)),
        text_field=str(pick("text_field", defaults.text_field)),
        holdout_windows=int(pick("eval_windows", defaults.holdout_windows)),
        holdout_seq_len=int(pick("eval_seq_len", defaults.holdout_seq_len)),
        batch_size=int(pick("calib_batch_size", defaults.batch_size)),
    )
    if config.samples < 1 or config.seq_len < 2:
        raise ConfigError("calibration needs at least 1 sample of at least 2 tokens")
    return config


__all__ = [
    "CalibConfig", "ConfigError", "MagnitudeConfig", "NM", "PruneConfig", "SparseGPTConfig",
    "Target", "Unstructured", "WandaConfig", "build_calib_config", "build_prune_config", "read_recipe",
]  # fmt: skip
