"""The sparsity stage kind: zero individual weights (unstructured or N:M), registered for recipes."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from secateur.config import NM, AllocationConfig, CalibConfig, PruneConfig, RefineConfig, Target, Unstructured
from secateur.errors import ConfigError
from secateur.recipe import Settings, StageContext, StageKind, register
from secateur.schema import Option, fill, flatten, options_of
from secateur.sparsity.methods import REGISTRY
from secateur.sparsity.prune import needs_calibration, sparsify

TARGET_OPTIONS = {
    "sparsity": Option("sparsity", float, "fraction of the weights to remove, in [0, 1)", 0.5),
    "pattern": Option("pattern", str, "N:M semi-structured sparsity: keep N of every M consecutive inputs, e.g. 2:4",
                      None),
}


def _options(method: str) -> dict[str, Option]:
    nested = (REGISTRY[method].config_type, PruneConfig, AllocationConfig, RefineConfig)
    return {**TARGET_OPTIONS, **{k: o for t in nested for k, o in options_of(t).items()}}


def _target(settings: Settings) -> Target:
    sparsity, pattern = (TARGET_OPTIONS[k].check(settings[k]) if settings.get(k) is not None else None
                         for k in ("sparsity", "pattern"))  # fmt: skip
    if sparsity is not None and pattern is not None:
        raise ConfigError("give either --sparsity (unstructured) or --pattern N:M, not both")
    return NM.parse(pattern) if pattern is not None else Unstructured(0.5 if sparsity is None else sparsity)


def _build(method: str, settings: Settings) -> PruneConfig:
    spec = REGISTRY[method]
    return fill(PruneConfig, settings, method=fill(spec.config_type, settings), target=_target(settings),
                allocation=fill(AllocationConfig, settings), refine=fill(RefineConfig, settings))  # fmt: skip


def _settings(config: PruneConfig) -> Settings:
    target = {"pattern": str(config.target)} if isinstance(config.target, NM) else {"sparsity": config.target.sparsity}
    return {**target, **flatten(config.method), **flatten(config), **flatten(config.allocation), **flatten(config.refine)}


def _run(model: nn.Module, config: PruneConfig, calibration: Tensor | None, ctx: StageContext) -> dict[str, Any]:
    report = sparsify(model, None, config, calibration, device=ctx.device, batch_size=ctx.batch_size)
    return report.to_dict()


def _summary(record: dict[str, Any]) -> str:
    result = record["result"]
    return (f"{result['method']} {result['target']}: sparsity {result['sparsity']:.4f} of the target layers in "
            f"{record['seconds']:.1f} s")


KIND = register(StageKind(
    "sparsity", PruneConfig, lambda: tuple(REGISTRY), _options, _build, _settings, _run, needs_calibration,
    lambda config: CalibConfig(),
    summary=_summary,
    describe=lambda result: f"{result.get('method')} {result.get('target')}",
    leaves_zeros=lambda settings: True,
    leaves_nm=lambda settings: "pattern" in settings,
))  # fmt: skip
