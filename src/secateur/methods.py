"""Pruning methods: each is one config type, the statistic it needs, and a group handler.

A *group* is the set of layers of a block that read the same input (q/k/v, gate/up): they share one
statistic. A handler turns the group's weights (rows = outputs, cols = inputs) into pruned weights
and prune masks. A new method is one handler plus one `register` call.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from secateur.config import NM, ConfigError, MagnitudeConfig, SparseGPTConfig, Target, WandaConfig, SCOPES
from secateur.masks import nm_mask, per_layer_mask, per_row_mask
from secateur.obs import inverse_hessian_factor, sparsegpt_prune
from secateur.stats import WORK_DTYPE, Hessian, InputNormSq

Pruned = list[tuple[Tensor, Tensor]]  # (new weight, prune mask) per layer of the group
GroupHandler = Callable[[Any, list[Tensor], Any, Target, list[str]], Pruned]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_type: type
    statistic: type | None  # accumulator fed with the group's input; None = no calibration needed
    prune_group: GroupHandler


REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    REGISTRY[spec.name] = spec
    return spec


def spec_for(method_config: Any) -> MethodSpec:
    for spec in REGISTRY.values():
        if isinstance(method_config, spec.config_type):
            return spec
    raise ConfigError(f"no registered method takes a {type(method_config).__name__}")


def name_of(method_config: Any) -> str:
    return spec_for(method_config).name


def method_config(name: str, settings: dict[str, Any]) -> Any:
    """Build the named method's config from flat settings, keeping only the fields it declares."""
    if name not in REGISTRY:
        raise ConfigError(f"unknown method {name!r}; choose one of: {', '.join(sorted(REGISTRY))}")
    config_type = REGISTRY[name].config_type
    fields = {f.name for f in dataclasses.fields(config_type)}
    options = {f.name for spec in REGISTRY.values() for f in dataclasses.fields(spec.config_type)}
    foreign = sorted(k for k in options - fields if settings.get(k) is not None)
    if foreign:
        raise ConfigError(f"method {name!r} has no option {foreign}; its options: {sorted(fields) or 'none'}")
    config = config_type(**{k: settings[k] for k in fields if settings.get(k) is not None})
    scope = getattr(config, "scope", None)
    if scope is not None and scope not in SCOPES:
        raise ConfigError(f"scope must be one of {SCOPES}, got {scope!r}")
    return config


# --- score-based methods: a score per weight, then a mask -----------------------------------------

MASKERS: dict[str, Callable[[Tensor, float], Tensor]] = {"per_row": per_row_mask, "per_layer": per_layer_mask}


def select_mask(scores: Tensor, target: Target, scope: str) -> Tensor:
    """Prune mask for one layer's scores; N:M ignores the scope (the group of M is the scope)."""
    if isinstance(target, NM):
        return nm_mask(scores, target.n, target.m)
    if scope not in MASKERS:
        raise ConfigError(f"scope {scope!r} ranks across layers; only magnitude supports it (no calibration)")
    return MASKERS[scope](scores, target.fraction)


def magnitude_scores(weight: Tensor) -> Tensor:
    return weight.abs().to(WORK_DTYPE)


def wanda_scores(weight: Tensor, input_norm: Tensor) -> Tensor:
    """|W_ij| * ||X_j||_2 (the norm, not its square)."""
    return weight.abs().to(WORK_DTYPE) * input_norm[None, :]


def _apply(weight: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    return weight.masked_fill(mask, 0), mask


def magnitude_group(config: MagnitudeConfig, weights: list[Tensor], stat: None, target: Target, names: list[str]) -> Pruned:
    return [_apply(w, select_mask(magnitude_scores(w), target, config.scope)) for w in weights]


def wanda_group(config: WandaConfig, weights: list[Tensor], stat: InputNormSq, target: Target, names: list[str]) -> Pruned:
    norm = stat.norm
    return [_apply(w, select_mask(wanda_scores(w, norm), target, config.scope)) for w in weights]


def sparsegpt_group(config: SparseGPTConfig, weights: list[Tensor], stat: Hessian, target: Target, names: list[str]) -> Pruned:
    factor, dead = inverse_hessian_factor(stat.value, config.damp, name=names[0])  # shared by the group
    sizes = [w.shape[0] for w in weights]
    stacked, mask = sparsegpt_prune(torch.cat(weights), factor, dead, target, config.block_size, segments=sizes)
    return list(zip(stacked.split(sizes), mask.split(sizes)))


register(MethodSpec("magnitude", MagnitudeConfig, None, magnitude_group))
register(MethodSpec("wanda", WandaConfig, InputNormSq, wanda_group))
register(MethodSpec("sparsegpt", SparseGPTConfig, Hessian, sparsegpt_group))

__all__ = ["REGISTRY", "MethodSpec", "register", "spec_for", "method_config", "select_mask"]
