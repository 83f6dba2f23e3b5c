"""The sparsity stage kind: zero individual weights (unstructured or N:M), registered for recipes."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from secateur.config import NM, AllocationConfig, CalibConfig, PruneConfig, RefineConfig, Target, Unstructured
from secateur.errors import ConfigError
from secateur.recipe import Section, Settings, StageContext, StageKind, Streaming, register
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


def _report(record: dict[str, Any]) -> Section:
    """Sparsity per block (the heat map below has it per layer), and the block errors where measured."""
    result = record["result"]
    blocks: dict[str, list[tuple[float, int]]] = {}
    for layer in result.get("layers", []):
        block = next((p for p in layer["name"].split(".") if p.isdigit()), "?")
        blocks.setdefault(block, []).append((layer["sparsity"], layer["shape"][0] * layer["shape"][1]))
    errors = result.get("block_errors") or []
    rows = tuple((block, f"{sum(s * n for s, n in found) / max(sum(n for _, n in found), 1):.4f}",
                  f"{min(s for s, _ in found):.4f}", f"{max(s for s, _ in found):.4f}",
                  f"{errors[i]:.4g}" if i < len(errors) and isinstance(errors[i], (int, float)) else "")
                 for i, (block, found) in enumerate(blocks.items()))  # fmt: skip
    collapsed = result.get("collapsed_blocks")
    text = (f"{result['method']} {result['target']}: sparsity {result['sparsity']:.4f} of the target layers, "
            + (f"{result['calibration_tokens']:,} calibration tokens, " if result.get("calibration_tokens") else "")
            + f"in {record.get('seconds', 0):.1f} s"
            + (f"; collapsed blocks {collapsed}" if collapsed else "") + ".")
    return Section(f"Sparsity ({result['method']} {result['target']})", text,
                   ("block", "sparsity", "least", "most", "block error"), rows, heatmap=True)


def _why_not_stream(config: PruneConfig) -> str | None:
    from secateur.sparsity.disk import streamable

    return streamable(config)


def _stream(*args: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    from secateur.sparsity.disk import streamed

    return streamed(*args)


KIND = register(StageKind(
    "sparsity", PruneConfig, lambda: tuple(REGISTRY), _options, _build, _settings, _run, needs_calibration,
    lambda config: CalibConfig(),
    summary=_summary,
    describe=lambda result: f"{result.get('method')} {result.get('target')}",
    report=_report,
    leaves_zeros=lambda settings: True,
    leaves_nm=lambda settings: "pattern" in settings,
    streaming=Streaming(_why_not_stream, _stream),
))  # fmt: skip
