"""Typed, frozen configuration for a pruning run.

CLI flags and recipe files only build these objects; the engine and the methods read them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Union, get_args

from secateur.errors import ConfigError
from secateur.data.sources import has_fields
from secateur.schema import Requires, option, refuse_inapplicable

Scope = Literal["per_row", "per_layer", "global"]
BlockStats = Literal["sequential", "dense"]
BLOCK_STATS: tuple[str, ...] = get_args(BlockStats)


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

    name: ClassVar[str] = "magnitude"  # the registry key, flag value and recipe value

    scope: Scope = option("per_layer", "ranking scope: per_row, per_layer (the classic baseline) or global (one "
                                       "ranking over all layers)")


@dataclass(frozen=True)
class WandaConfig:
    """Wanda (Sun et al. 2023): score |W_ij| * ||X_j||_2, ranked within each output row."""

    name: ClassVar[str] = "wanda"  # the registry key, flag value and recipe value

    scope: Scope = option("per_row", "ranking scope: per_row (the paper's) or per_layer (its ablation)")


@dataclass(frozen=True)
class SparseGPTConfig:
    """SparseGPT (Frantar & Alistarh 2023): blockwise OBS pruning with weight updates."""

    name: ClassVar[str] = "sparsegpt"  # the registry key, flag value and recipe value

    block_size: int = option(128, "columns per lazy-update block, also the mask-selection block")
    damp: float = option(0.01, "damping added to the Hessian diagonal, relative to its mean")
    # Gradual: reach the target in `steps` OBS passes of rising sparsity (unstructured: k/steps of the
    # target; N:M: N falls towards the target), the kept weights re-fitted to the dense layer's outputs
    # (conjugate gradients, `refit_iters`) after every pass but the last. 1 = the paper's one shot.
    steps: int = option(1, "reach the target in this many OBS passes, re-fitting the kept weights between them")
    refit_iters: int = option(40, "conjugate-gradient iterations of each re-fit between passes")

    def __post_init__(self) -> None:
        if self.steps < 1 or self.refit_iters < 1 or self.block_size < 1 or self.damp < 0:
            raise ConfigError("SparseGPT needs steps, refit_iters and block_size >= 1 and damp >= 0")


@dataclass(frozen=True)
class RIAConfig:
    """RIA (Zhang et al. 2024): relative importance times input norm to a power, ranked per row."""

    name: ClassVar[str] = "ria"  # the registry key, flag value and recipe value

    scope: Scope = option("per_row", "ranking scope: per_row (the paper's) or per_layer")
    alpha: float = option(0.5, "exponent of the input norm (the paper's)")


@dataclass(frozen=True)
class GBLMConfig:
    """Gradient-informed score in the spirit of GBLM-Pruner: |W| * (alpha * ||G|| + ||X||)."""

    name: ClassVar[str] = "gblm"  # the registry key, flag value and recipe value

    scope: Scope = option("per_row", "ranking scope: per_row or per_layer")
    alpha: float = option(100.0, "weight of the gradient term (GBLM-Pruner's scale)")
    gradient_samples: int = option(32, "calibration windows whose loss gradients are accumulated")


def _module_sparsity(value: Any) -> tuple[tuple[str, float], ...]:
    """{"attention": 0.4} or "attention=0.4,mlp=0.6" -> (("attention", 0.4), ...)."""
    if not value:
        return ()
    try:
        if isinstance(value, str):
            value = dict((k.strip(), float(v)) for k, v in (part.split("=") for part in value.split(",")))
        return tuple((str(k), float(v)) for k, v in dict(value).items())
    except (ValueError, TypeError):
        raise ConfigError(f"module_sparsity must look like attention=0.4,mlp=0.6; got {value!r}") from None


Allocation = Literal["uniform", "owl", "global"]
ALLOCATIONS: tuple[str, ...] = get_args(Allocation)
OWL = Requires(lambda c: c.kind == "owl", "--allocation owl")
GLOBAL = Requires(lambda c: c.kind == "global", "--allocation global")
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

    kind: Allocation = option(
        "uniform", "how the sparsity is spread over layers: uniform, owl (outlier-weighted per block) or global "
        "(one ranking of all layers)", key="allocation")
    owl_m: float = option(5.0, "OWL: outlier threshold, times the block's mean Wanda score", requires=OWL)
    owl_lambda: float = option(0.08, "OWL: per-block sparsity stays within +-lambda of the target", requires=OWL)
    max_layer_sparsity: float | None = option(None, "global allocation: no layer above this (default: target + "
                                                    "(1 - target) / 2)", requires=GLOBAL)
    module_sparsity: tuple[tuple[str, float], ...] = option(
        (), "pin module types, e.g. attention=0.4; the other layers make up the total",
        parse=_module_sparsity, flatten=dict)

    def __post_init__(self) -> None:
        refuse_inapplicable(self)
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
DSNOT = Requires(lambda c: "dsnot" in c.steps, "--refine dsnot")
RECONSTRUCT = Requires(lambda c: "reconstruct" in c.steps, "--refine reconstruct")


@dataclass(frozen=True)
class RefineConfig:
    """Training-free steps after a layer's mask, in order; both keep the exact sparsity / N:M pattern.

    dsnot (Zhang et al. 2023): swap pruned and kept weights row by row to cancel the expected output
    change (W - W_hat) E[x], up to `dsnot_cycles` swaps per row or until it falls below `dsnot_threshold`.
    reconstruct: re-fit the kept weights to minimise ||W X - W_hat X||^2 on calibration inputs for the
    fixed mask (conjugate gradients on the damped normal equations, `reconstruct_iters` iterations);
    the result is kept only where it lowers the undamped error, so it never raises it.
    """

    steps: tuple[str, ...] = option(
        (), "after each layer's mask, in order (comma list): dsnot, reconstruct", key="refine")
    dsnot_cycles: int = option(50, "DSnoT: at most this many swaps per row", requires=DSNOT)
    dsnot_threshold: float = option(0.1, "DSnoT: stop a row once |expected error| is below this", requires=DSNOT)
    dsnot_var_power: float = option(1.0, "DSnoT: power of the input variance dividing the grow score", requires=DSNOT)
    reconstruct_iters: int = option(40, "reconstruct: conjugate-gradient iterations", requires=RECONSTRUCT)
    reconstruct_damp: float = option(0.01, "reconstruct: damping relative to the mean Hessian diagonal",
                                     requires=RECONSTRUCT)

    def __post_init__(self) -> None:
        refuse_inapplicable(self)
        unknown = [step for step in self.steps if step not in REFINE_STEPS]
        if unknown:
            raise ConfigError(f"unknown refinement {unknown}; choose from {REFINE_STEPS}")
        if self.dsnot_cycles < 1 or self.reconstruct_iters < 1 or self.reconstruct_damp < 0:
            raise ConfigError("dsnot_cycles and reconstruct_iters must be >= 1, reconstruct_damp >= 0")


@dataclass(frozen=True)
class CalibConfig:
    """Where calibration text comes from and how windows are drawn from it."""

    source: str = option("enwiki-sample", "calibration text: offline enwiki-sample, newsgroups-sample, code-sample, "
                                          "docs-sample, news-sample, legal-sample or offline-mix (a mixture of the "
                                          "first four); wikitext2, c4 (need the internet); a text file, a .jsonl file "
                                          "or a datasets directory", key="calib")
    samples: int = option(64, "calibration windows", key="calib_samples")
    seq_len: int = option(512, "tokens per calibration window", key="calib_seq_len")
    seed: int = option(0, "seed for drawing calibration windows")
    text_field: str = option("text", "field holding the text in JSONL / datasets sources",
                             requires=Requires(lambda c: has_fields(c.source), "a .jsonl or `datasets` source"))
    # Calibration never overlaps the evaluation windows when both come from one source: the first
    # `holdout_windows` windows of `holdout_seq_len` tokens are reserved for evaluation.
    holdout_windows: int = 64
    holdout_seq_len: int = 512
    batch_size: int = option(4, "windows per forward call (0 = all at once; all batches stay in flight, so each "
                                "block runs once)", key="calib_batch_size")

    def __post_init__(self) -> None:
        refuse_inapplicable(self)
        if self.samples < 1 or self.seq_len < 2 or self.batch_size < 0:
            raise ConfigError("calibration needs at least 1 sample of at least 2 tokens, and a batch size >= 0")


@dataclass(frozen=True)
class PruneConfig:
    """One pruning run: the method (with its options), the sparsity target and the layer filter."""

    method: Any  # one of the registered method configs
    target: Target
    ignore: tuple[str, ...] = option((), "fnmatch pattern of layer names to keep dense, e.g. '*.mlp.down_proj' "
                                         "(repeatable)")
    # Inside a block, a layer's statistic comes from inputs that went through its already-pruned
    # predecessors ("sequential": one forward per block) or through the dense block ("dense": two
    # forwards per block, what the SparseGPT/Wanda reference code and llm-compressor do).
    block_stats: BlockStats = option("sequential", "inside a block, calibrate each layer on inputs through its "
                                                   "already-pruned predecessors (sequential: one pass) or through the "
                                                   "dense block (dense: two passes, as the reference code)")
    allocation: AllocationConfig = AllocationConfig()
    refine: RefineConfig = RefineConfig()
    # N:M only: permute the input channels of layers fed by an MLP or attention inner dimension (the
    # producing rows move with them) so more score mass survives the pattern.
    permute: bool = option(False, "N:M: permute inner channels (MLP, attention values) so more score survives")
    # After each block, the relative error of its output against the dense block's on one batch; a
    # block above this is reported as collapsed (warned and recorded).
    collapse_threshold: float = option(1.0, "warn about blocks whose output error exceeds this share of the dense "
                                            "block's update")
    # Mixtures of experts: each expert is calibrated on the tokens routed to it; one that few tokens
    # reach has statistics too thin to trust, so its layers fall back to weight magnitude (reported).
    expert_min_tokens: int = option(16, "mixture of experts: an expert routed fewer calibration tokens than this is "
                                        "pruned by weight magnitude (and listed)")

    def __post_init__(self) -> None:
        if self.block_stats not in BLOCK_STATS:
            raise ConfigError(f"block_stats must be one of {BLOCK_STATS}, got {self.block_stats!r}")
        if isinstance(self.target, NM) and not self.allocation.is_uniform:
            raise ConfigError("an N:M pattern is the same in every layer: use --allocation uniform and no module sparsity")
        if self.permute and not isinstance(self.target, NM):
            raise ConfigError("--permute chooses channel orders for an N:M pattern; give --pattern N:M")
        if self.expert_min_tokens < 0:
            raise ConfigError(f"--expert-min-tokens must be >= 0, got {self.expert_min_tokens}")

    @property
    def method_name(self) -> str:
        return self.method.name


__all__ = [
    "AllocationConfig", "GBLMConfig", "RIAConfig", "RefineConfig",
    "CalibConfig", "ConfigError", "MagnitudeConfig", "NM", "PruneConfig", "SparseGPTConfig",
    "Target", "Unstructured", "WandaConfig",
]  # fmt: skip
