"""The width stage kind: remove attention heads, MLP channels and hidden channels."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from secateur.config import CalibConfig
from secateur.errors import ConfigError
from secateur.recipe import Settings, StageContext, StageKind, register
from secateur.schema import fill, flatten, options_of
from secateur.width import WidthConfig, width_prune


def _build(method: str, settings: Settings) -> WidthConfig:
    if settings.get("remove_fraction") is None:
        raise ConfigError("width pruning needs --remove-fraction: the fraction of decoder-block parameters to remove")
    return fill(WidthConfig, settings)


def _run(model: nn.Module, config: WidthConfig, calibration: Tensor | None, ctx: StageContext) -> dict[str, Any]:
    parameters_before = sum(p.numel() for p in model.parameters())
    report = width_prune(model, config, calibration, device=ctx.device, batch_size=ctx.batch_size)
    return {"parameters_before": parameters_before, "parameters_after": sum(p.numel() for p in model.parameters()),
            **report.to_dict()}  # fmt: skip


def _summary(record: dict[str, Any]) -> str:
    width, s = record["result"], record["settings"]
    line = (f"width ({s['importance']}, {s['allocation']}, heads {width['heads']}, bias compensation "
            f"{'on' if width['bias_compensation'] else 'off'}): removed {width['removed_fraction']:.4f} "
            f"of block parameters, {width['parameters_before']:,} -> {width['parameters_after']:,} parameters in "
            f"{record['seconds']:.1f} s")
    if width.get("variant"):
        line += f"\n{width['variant']}"
    if width["hidden_after"] != width["hidden_before"]:
        line += f"\nhidden size {width['hidden_before']} -> {width['hidden_after']}"
    return line


KIND = register(StageKind(
    "width", WidthConfig, lambda: ("width",), lambda method: options_of(WidthConfig), _build, flatten, _run,
    lambda config: config.needs_calibration, lambda config: CalibConfig(),
    summary=_summary,
    describe=lambda result: f"width {result.get('removed_fraction', 0):.1%} of block parameters",
    removes_columns=lambda settings: True,
    reshapes=lambda settings: bool(settings.get("hidden_fraction")),
))  # fmt: skip
