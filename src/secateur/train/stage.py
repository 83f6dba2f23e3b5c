"""The recovery stage kind: training after pruning (and pruning during training)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from secateur.config import CalibConfig
from secateur.errors import ConfigError
from secateur.recipe import StageContext, StageKind, register
from secateur.schema import fill, flatten, options_of
from secateur.train import TrainConfig, train


def _calibration(config: TrainConfig) -> CalibConfig:
    """Training and validation windows, drawn together (disjoint, outside the evaluation region)."""
    return CalibConfig(samples=config.windows + config.val_windows, seq_len=config.train_seq_len)


def _run(model: nn.Module, config: TrainConfig, data: Tensor | None, ctx: StageContext) -> dict[str, Any]:
    need = config.windows + config.val_windows
    if data is None or len(data) < need or data.shape[1] != config.train_seq_len:
        raise ConfigError(f"recovery needs {need} windows of {config.train_seq_len} tokens (training and validation)")
    parameters = sum(p.numel() for p in model.parameters())
    result = train(model, config, data[: config.windows], data[config.windows : need], teacher=ctx.teacher,
                   device=ctx.device, workdir=ctx.workdir, resume=ctx.resume, progress=ctx.progress)  # fmt: skip
    if config.prune_width is None and sum(p.numel() for p in model.parameters()) != parameters:
        raise RuntimeError("recovery changed the parameter count")  # LoRA must be merged away
    return {**result.record, "metrics": str(result.metrics) if result.metrics else None}


def _summary(record: dict[str, Any]) -> str:
    r = record["result"]
    best = r["best"]
    line = (f"recovery ({r['mode']}, {r['precision']}): {r['tokens']:,} tokens in {r['steps']} steps, loss "
            f"{r['loss']['first']:.4f} -> {r['loss']['last']:.4f}, best validation perplexity {best['perplexity']:.3f} "
            f"at step {best['step']}, {r['tokens_per_s']:.0f} tokens/s, {record['seconds']:.1f} s")
    if r["masks"]["layers"]:
        line += f"\nmasks kept: {r['masks']['kept_after']:,} of {r['masks']['size']:,} weights non-zero (was {r['masks']['kept']:,})"
    if r.get("curve"):
        line += f"\ncurve: {r['curve']}, metrics: {r['metrics']}"
    return line


KIND = register(StageKind(
    "recovery", TrainConfig, lambda: ("recovery",), lambda method: options_of(TrainConfig),
    lambda method, settings: fill(TrainConfig, settings), flatten, _run,
    lambda config: True, _calibration, calib_fixed=("calib_samples", "calib_seq_len"),
    summary=_summary,
    describe=lambda result: f"recovery ({result.get('mode')}, {result.get('tokens', 0):,} tokens)",
    leaves_zeros=lambda settings: bool(settings.get("prune_to") or settings.get("prune_pattern")),
    leaves_nm=lambda settings: bool(settings.get("prune_pattern")),
    removes_columns=lambda settings: settings.get("prune_width") is not None,
))  # fmt: skip
