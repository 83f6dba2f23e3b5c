"""Typed, frozen configuration for a pruning run.

CLI flags and recipe files only build these objects; the engine and the methods read them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import tomllib

from secateur.errors import SecateurError

Scope = Literal["per_row", "per_layer", "global"]
SCOPES: tuple[str, ...] = ("per_row", "per_layer", "global")
BLOCK_STATS: tuple[str, ...] = ("sequential", "dense")


class ConfigError(SecateurError):
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
    # Gradual: reach the target in `steps` OBS passes of rising sparsity (unstructured: k/steps of the
    # target; N:M: N falls towards the target), the kept weights re-fitted to the dense layer's outputs
    # (conjugate gradients, `refit_iters`) after every pass but the last. 1 = the paper's one shot.
    steps: int = 1
    refit_iters: int = 40

    def __post_init__(self) -> None:
        if self.steps < 1 or self.refit_iters < 1 or self.block_size < 1 or self.damp < 0:
            raise ConfigError("SparseGPT needs steps, refit_iters and block_size >= 1 and damp >= 0")


@dataclass(frozen=True)
class RIAConfig:
    """RIA (Zhang et al. 2024): relative importance times input norm to a power, ranked per row."""

    scope: Scope = "per_row"
    alpha: float = 0.5  # the paper's exponent of ||X_j||_2


@dataclass(frozen=True)
class GBLMConfig:
    """Gradient-informed score in the spirit of GBLM-Pruner: |W| * (alpha * ||G|| + ||X||)."""

    scope: Scope = "per_row"
    alpha: float = 100.0  # weight of the gradient term (GBLM-Pruner's scale)
    gradient_samples: int = 32  # calibration windows whose loss gradients are accumulated


ALLOCATIONS: tuple[str, ...] = ("uniform", "owl", "global")
MODULE_TYPES: tuple[str, ...] = ("attention", "mlp")


@dataclass(frozen=True)
class AllocationConfig:
    """How the overall sparsity is spread over layers; the achieved total always equals the target.

    uniform: every layer at the target. owl (Yin et al. 2023): a block's share of Wanda scores above
    `owl_m` times the block mean (its outlier ratio) sets its sparsity within +-`owl_lambda` of the
    target, more outliers -> denser. global: one ranking of the method's scores across all layers,
    no layer above `max_layer_sparsity` (default: target + (1 - target) / 2).
    `module_sparsity` pins attention and/or MLP layers to a sparsity; the other layers absorb the rest.
    """

    kind: str = "uniform"
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    max_layer_sparsity: float | None = None
    module_sparsity: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ALLOCATIONS:
            raise ConfigError(f"allocation must be one of {ALLOCATIONS}, got {self.kind!r}")
        if self.owl_m <= 0 or not 0 <= self.owl_lambda < 0.5:
            raise ConfigError(f"OWL needs owl_m > 0 and 0 <= owl_lambda < 0.5; got {self.owl_m}, {self.owl_lambda}")
        if self.max_layer_sparsity is not None and not 0 < self.max_layer_sparsity < 1:
            raise ConfigError(f"max_layer_sparsity must be in (0, 1), got {self.max_layer_sparsity}")
        for kind, value in self.module_sparsity:
            if kind not in MODULE_TYPES:
                raise ConfigError(f"module_sparsity keys are {MODULE_TYPES}, got {kind!r}")
            if not 0 <= value < 1:
                raise ConfigError(f"module sparsity for {kind} must be in [0, 1), got {value}")

    @property
    def is_uniform(self) -> bool:
        return self.kind == "uniform" and not self.module_sparsity


REFINE_STEPS: tuple[str, ...] = ("dsnot", "reconstruct")


@dataclass(frozen=True)
class RefineConfig:
    """Training-free steps after a layer's mask, in order; both keep the exact sparsity / N:M pattern.

    dsnot (Zhang et al. 2023): swap pruned and kept weights row by row to cancel the expected output
    change (W - W_hat) E[x], up to `dsnot_cycles` swaps per row or until it falls below `dsnot_threshold`.
    reconstruct: re-fit the kept weights to minimise ||W X - W_hat X||^2 on calibration inputs for the
    fixed mask (conjugate gradients on the damped normal equations, `reconstruct_iters` iterations);
    the result is kept only where it lowers the undamped error, so it never raises it.
    """

    steps: tuple[str, ...] = ()
    dsnot_cycles: int = 50
    dsnot_threshold: float = 0.1
    dsnot_var_power: float = 1.0
    reconstruct_iters: int = 40
    reconstruct_damp: float = 0.01

    def __post_init__(self) -> None:
        unknown = [step for step in self.steps if step not in REFINE_STEPS]
        if unknown:
            raise ConfigError(f"unknown refinement {unknown}; choose from {REFINE_STEPS}")
        if self.dsnot_cycles < 1 or self.reconstruct_iters < 1 or self.reconstruct_damp < 0:
            raise ConfigError("dsnot_cycles and reconstruct_iters must be >= 1, reconstruct_damp >= 0")


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
    allocation: AllocationConfig = AllocationConfig()
    refine: RefineConfig = RefineConfig()
    # N:M only: permute the input channels of layers fed by an MLP or attention inner dimension (the
    # producing rows move with them) so more score mass survives the pattern.
    permute: bool = False
    # After each block, the relative error of its output against the dense block's on one batch; a
    # block above this is reported as collapsed (warned and recorded).
    collapse_threshold: float = 1.0

    def __post_init__(self) -> None:
        if self.block_stats not in BLOCK_STATS:
            raise ConfigError(f"block_stats must be one of {BLOCK_STATS}, got {self.block_stats!r}")
        if isinstance(self.target, NM) and not self.allocation.is_uniform:
            raise ConfigError("an N:M pattern is the same in every layer: use --allocation uniform and no module sparsity")
        if self.permute and not isinstance(self.target, NM):
            raise ConfigError("--permute chooses channel orders for an N:M pattern; give --pattern N:M")

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
            "allocation": dataclasses.asdict(self.allocation), "refine": dataclasses.asdict(self.refine),
            "permute": self.permute,
        }  # fmt: skip


# --- building configs from flat key/value settings (CLI flags and recipe files) ----------------

RECIPE_KEYS = {
    "method", "sparsity", "pattern", "scope", "block_size", "damp", "ignore", "block_stats",
    "calib", "calib_samples", "calib_seq_len", "calib_batch_size", "seed", "text_field",
    "dtype", "device", "eval", "eval_windows", "eval_seq_len",
    "remove_blocks", "remove_sublayers", "remove_fraction", "positions", "compensate", "compensate_damp",
    "steps", "refit_iters", "alpha", "gradient_samples", "allocation", "owl_m", "owl_lambda", "max_layer_sparsity",
    "module_sparsity",
    "refine", "dsnot_cycles", "dsnot_threshold", "dsnot_var_power", "reconstruct_iters", "reconstruct_damp",
    "permute", "importance", "heads", "bias_compensation", "round_to", "hidden_fraction",
}  # fmt: skip
SPARSITY_ONLY_KEYS = ("owl_m", "owl_lambda", "max_layer_sparsity", "module_sparsity", "refine", "dsnot_cycles",
                      "dsnot_threshold", "dsnot_var_power", "reconstruct_iters", "reconstruct_damp", "permute", "alpha",
                      "gradient_samples")
ALLOCATION_KEYS = {"allocation": "kind", "owl_m": "owl_m", "owl_lambda": "owl_lambda", "max_layer_sparsity": "max_layer_sparsity"}
REFINE_KEYS = ("dsnot_cycles", "dsnot_threshold", "dsnot_var_power", "reconstruct_iters", "reconstruct_damp")


def _module_sparsity(value: Any) -> tuple[tuple[str, float], ...]:
    """{"attention": 0.4} or "attention=0.4,mlp=0.6" -> (("attention", 0.4), ...)."""
    if not value:
        return ()
    if isinstance(value, str):
        try:
            value = dict((k.strip(), float(v)) for k, v in (part.split("=") for part in value.split(",")))
        except ValueError:
            raise ConfigError(f"module sparsity must look like attention=0.4,mlp=0.6; got {value!r}") from None
    return tuple((str(k), float(v)) for k, v in dict(value).items())


def _steps(value: Any) -> tuple[str, ...]:
    if not value:
        return ()
    parts = value.split(",") if isinstance(value, str) else value
    return tuple(str(part).strip() for part in parts if str(part).strip())


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
    allocation = AllocationConfig(
        **{field: settings[key] for key, field in ALLOCATION_KEYS.items() if settings.get(key) is not None},
        module_sparsity=_module_sparsity(settings.get("module_sparsity")),
    )
    refine = RefineConfig(steps=_steps(settings.get("refine")),
                          **{key: settings[key] for key in REFINE_KEYS if settings.get(key) is not None})
    return PruneConfig(method=method, target=target, ignore=ignore, block_stats=settings.get("block_stats") or "sequential",
                       allocation=allocation, refine=refine, permute=bool(settings.get("permute") or False))


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
    "AllocationConfig", "GBLMConfig", "RIAConfig", "RefineConfig",
    "CalibConfig", "ConfigError", "MagnitudeConfig", "NM", "PruneConfig", "SparseGPTConfig",
    "Target", "Unstructured", "WandaConfig", "build_calib_config", "build_prune_config", "read_recipe",
]  # fmt: skip
