"""Pruning methods: each is one config type, the statistics it needs, and a group handler.

A *group* is the set of layers of a block that read the same input (q/k/v, gate/up): they share
their input statistics. A handler turns the group's weights (rows = outputs, cols = inputs) into
pruned weights and prune masks, one target per layer (layer-wise allocation gives layers different
sparsities). A new method is one handler plus one `register` call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from collections.abc import Iterable
from typing import Any, Callable

import torch
from torch import Tensor

from secateur.config import (
    NM,
    ConfigError,
    GBLMConfig,
    MagnitudeConfig,
    RIAConfig,
    SparseGPTConfig,
    Target,
    Unstructured,
    WandaConfig,
)
from secateur.calibrate.gradients import gradient_norms
from secateur.calibrate.stats import WORK_DTYPE, Hessian, InputNormSq
from secateur.sparsity.masks import nm_mask, per_layer_mask, per_row_mask
from secateur.sparsity.obs import inverse_hessian_factor, sparsegpt_prune
from secateur.sparsity.refine import reconstruct

Pruned = list[tuple[Tensor, Tensor]]  # (new weight, prune mask) per layer of the group


@dataclass
class GroupJob:
    """What a handler gets for one group: per-layer names, weights and targets, the finished input
    statistics (by type) and per-layer auxiliary tensors (e.g. calibration-loss gradients)."""

    names: list[str]
    weights: list[Tensor]
    targets: list[Target]
    stats: dict[type, Any] = field(default_factory=dict)
    aux: dict[str, Tensor] = field(default_factory=dict)

    def input_norm(self) -> Tensor:
        """||X_j||_2 per input feature, from whichever statistic the group has."""
        if InputNormSq in self.stats:
            return self.stats[InputNormSq].norm
        for stat in self.stats.values():
            if hasattr(stat, "norm"):
                return stat.norm
        raise KeyError("the group has no input statistic with a norm")


GroupHandler = Callable[[Any, GroupJob], Pruned]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_type: type
    statistics: tuple[type, ...]  # accumulators fed with the group's input; () = no calibration needed
    prune_group: GroupHandler
    # The per-weight score used to compare weights before pruning (global allocation, N:M permutations):
    # score(config, weight, input_norm or None).
    score: Callable[[Any, Tensor, Tensor | None], Tensor] = lambda config, w, norm: wanda_scores(w, norm)
    # Work before the block pass that needs the whole model (e.g. gradients): returns aux tensors by layer name.
    prepare: Callable[..., dict[str, Tensor]] | None = None
    # Each layer's result depends on that layer alone (a score per weight, no shared solve): the engine
    # may run the handler one layer at a time, which bounds the temporaries to one layer's.
    layerwise: bool = False


REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    REGISTRY[spec.name] = spec
    return spec


def spec_for(method_config: Any) -> MethodSpec:
    for spec in REGISTRY.values():
        if isinstance(method_config, spec.config_type):
            return spec
    raise ConfigError(f"no registered method takes a {type(method_config).__name__}")


# --- score-based methods: a score per weight, then a mask -----------------------------------------

MASKERS: dict[str, Callable[[Tensor, float], Tensor]] = {"per_row": per_row_mask, "per_layer": per_layer_mask}


def select_mask(scores: Tensor, target: Target, scope: str, frozen: Tensor | None = None) -> Tensor:
    """Prune mask for one layer's scores; N:M ignores the scope (the group of M is the scope).

    `frozen` (True = already zero, e.g. pruned by an earlier stage) entries rank below every score and
    stay pruned even where they exceed the target (a group of M with more zeros than M - N keeps them).
    """
    if frozen is not None and not bool(frozen.any()):
        frozen = None  # nothing to keep pruned: no copy of the scores (large layers)
    if frozen is not None:
        scores = scores.masked_fill(frozen, float("-inf"))
    if isinstance(target, NM):
        mask = nm_mask(scores, target.n, target.m)
    elif scope not in MASKERS:
        raise ConfigError(f"scope {scope!r} ranks across layers; use --allocation global instead")
    else:
        mask = MASKERS[scope](scores, target.fraction)
    return mask if frozen is None else mask | frozen


def magnitude_scores(weight: Tensor) -> Tensor:
    return weight.abs().to(WORK_DTYPE)


def wanda_scores(weight: Tensor, input_norm: Tensor) -> Tensor:
    """|W_ij| * ||X_j||_2 (the norm, not its square)."""
    return weight.abs().to(WORK_DTYPE).mul_(input_norm[None, :])  # |W| is a new tensor: scaled in place


def ria_scores(weight: Tensor, input_norm: Tensor, alpha: float = 0.5) -> Tensor:
    """RIA (Zhang et al. 2024): (|W_ij| / sum_k |W_kj| + |W_ij| / sum_k |W_ik|) * ||X_j||_2 ** alpha.

    The first term normalises by the input channel's column sum over all outputs, the second by the
    output row's sum over all inputs; empty rows or columns score zero.
    """
    w = weight.abs().to(WORK_DTYPE)
    column = w.sum(dim=0, keepdim=True)
    row = w.sum(dim=1, keepdim=True)
    relative = torch.nan_to_num(w / column) + torch.nan_to_num(w / row)
    return relative * input_norm[None, :].pow(alpha)


def gblm_scores(weight: Tensor, input_norm: Tensor, gradient_norm: Tensor, alpha: float) -> Tensor:
    """GBLM-Pruner-style: |W_ij| * (alpha * ||G_ij|| + ||X_j||_2), where ||G_ij|| is the L2 norm over
    calibration samples of each sample's calibration-loss gradient."""
    w = weight.abs().to(WORK_DTYPE)
    return w * (alpha * gradient_norm.to(WORK_DTYPE) + input_norm[None, :])


def _select(job: GroupJob, scores: Iterable[Tensor], scope: str) -> Pruned:
    """Each layer's mask from its scores; zeros the weights already have stay pruned. `scores` may be
    a generator: one layer's scores at a time (a large layer's are as large as its weight)."""
    pruned = []
    for weight, score, target in zip(job.weights, scores, job.targets):
        mask = select_mask(score, target, scope, frozen=weight == 0)
        pruned.append((weight.masked_fill(mask, 0), mask))
    return pruned


def magnitude_group(config: MagnitudeConfig, job: GroupJob) -> Pruned:
    return _select(job, (magnitude_scores(w) for w in job.weights), config.scope)


def wanda_group(config: WandaConfig, job: GroupJob) -> Pruned:
    norm = job.input_norm()
    return _select(job, (wanda_scores(w, norm) for w in job.weights), config.scope)


def ria_group(config: RIAConfig, job: GroupJob) -> Pruned:
    norm = job.input_norm()
    return _select(job, (ria_scores(w, norm, config.alpha) for w in job.weights), config.scope)


def gblm_group(config: GBLMConfig, job: GroupJob) -> Pruned:
    norm = job.input_norm()
    return _select(job, (gblm_scores(w, norm, job.aux[n], config.alpha) for n, w in zip(job.names, job.weights)),
                   config.scope)


def partial_target(target: Target, step: int, steps: int) -> Target:
    """The target of pass `step` of `steps` on the way to `target` (the last pass is the target itself)."""
    if isinstance(target, NM):
        return NM(target.m - math.ceil((target.m - target.n) * step / steps), target.m)
    return Unstructured(target.sparsity * step / steps)


def sparsegpt_group(config: SparseGPTConfig, job: GroupJob) -> Pruned:
    hessian = job.stats[Hessian].value
    factor, dead = inverse_hessian_factor(hessian, config.damp, name=job.names[0])  # shared by the group
    sizes = [w.shape[0] for w in job.weights]
    dense = torch.cat(job.weights)
    weight = dense
    for step in range(1, config.steps + 1):
        targets = [partial_target(t, step, config.steps) for t in job.targets]
        weight, mask = sparsegpt_prune(weight, factor, dead, targets, config.block_size, segments=sizes,
                                       frozen=weight == 0)  # zeros of earlier stages and passes stay pruned
        if step < config.steps:
            weight = reconstruct(dense, weight, mask, hessian, config.refit_iters, config.damp)
    return list(zip(weight.split(sizes), mask.split(sizes)))


def _gblm_prepare(config: GBLMConfig, model, adapter, calibration: Tensor, device, names: list[str]) -> dict[str, Tensor]:
    return gradient_norms(model, calibration, names, device, samples=config.gradient_samples)


register(MethodSpec(MagnitudeConfig.name, MagnitudeConfig, (), magnitude_group, score=lambda c, w, norm: magnitude_scores(w),
                    layerwise=True))
register(MethodSpec(WandaConfig.name, WandaConfig, (InputNormSq,), wanda_group, layerwise=True))
register(MethodSpec(SparseGPTConfig.name, SparseGPTConfig, (Hessian,), sparsegpt_group))
register(MethodSpec(RIAConfig.name, RIAConfig, (InputNormSq,), ria_group, score=lambda c, w, norm: ria_scores(w, norm, c.alpha),
                    layerwise=True))
register(MethodSpec(GBLMConfig.name, GBLMConfig, (InputNormSq,), gblm_group, prepare=_gblm_prepare, layerwise=True))

__all__ = ["REGISTRY", "GroupJob", "MethodSpec", "register", "spec_for", "select_mask"]
