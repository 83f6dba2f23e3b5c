"""The width stage kind: remove attention heads, MLP channels and hidden channels."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from secateur.config import CalibConfig
from secateur.errors import ConfigError
from secateur.models import adapter_for
from secateur.models.shapes import LayerWidth, widths_of
from secateur.recipe import Section, Settings, StageContext, StageKind, Streaming, Structure, register
from secateur.schema import fill, flatten, options_of
from secateur.width import WidthConfig, apply_widths, width_prune


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
    if width.get("remote_code"):
        line += ("\nper-block widths differ: load with secateur.load(path) or "
                 "AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)")
    return line


WIDTH_KEYS = ("attention_heads", "key_value_heads", "channels")


def _report(record: dict[str, Any]) -> Section:
    """The heads and channels every block kept, against what it had."""
    width, s = record["result"], record["settings"]
    text = (f"removed {width['removed_fraction']:.1%} of the block parameters ({width['parameters_before']:,} -> "
            f"{width['parameters_after']:,} parameters in the model), heads {width['heads']}, bias compensation "
            f"{'on' if width['bias_compensation'] else 'off'}"
            + (f", hidden size {width['hidden_before']} -> {width['hidden_after']}"
               if width["hidden_after"] != width["hidden_before"] else "") + ".")
    shown = lambda a, b: "-" if b is None else (str(b) if a == b else f"{a} -> {b}")  # noqa: E731
    rows = tuple((str(i), *(shown(a[k], b[k]) for k in WIDTH_KEYS))
                 for i, (a, b) in enumerate(zip(width["layers_before"], width["layers"])))  # fmt: skip
    return Section(f"Width ({s['importance']}, {s['allocation']})", text,
                   ("block", "query heads", "key/value heads", "MLP channels"), rows)


def _record(model: nn.Module) -> dict[str, Any]:
    adapter = adapter_for(model)
    widths = [w.to_dict() for w in widths_of(model, adapter)] if adapter.width else []
    uniform = all(len({w[k] for w in widths if w[k] is not None}) <= 1 for k in ("attention_heads", "channels"))
    return {"uniform_widths": uniform, "widths": widths}  # uniform False: `secateur.load` shapes each block


def _widths_problem(section: dict[str, Any]) -> str | None:
    widths = section.get("widths", [])
    if not isinstance(widths, list) or not all(isinstance(w, dict) and set(w) == set(WIDTH_KEYS) and
                                               all(v is None or isinstance(v, int) for v in w.values())
                                               for w in widths):  # fmt: skip
        return "structure.widths is not a list of per-block widths"
    return None


def _show(section: dict[str, Any]) -> str | None:
    if section.get("uniform_widths", True):
        return None
    shapes = sorted({(w["attention_heads"], w["key_value_heads"], w["channels"]) for w in section["widths"]}, key=str)
    return (f"per-block widths (query heads, key/value heads, MLP channels; load with secateur.load): "
            f"{shapes[:6]}{' ...' if len(shapes) > 6 else ''}")


def _legacy(manifest: dict[str, Any]) -> dict[str, Any]:
    section = manifest.get("width")
    if not isinstance(section, dict) or not section:
        return {}
    return {"uniform_widths": section.get("uniform", True), "widths": section.get("layers", [])}


# per-block widths: a stock config holds one width per kind, so a loader shapes each block as recorded
STRUCTURE = Structure(
    record=_record,
    needed=lambda section: None if section.get("uniform_widths", True) else section["widths"],
    rebuild=lambda model, widths: apply_widths(model, adapter_for(model), [LayerWidth(**w) for w in widths]),
    problem=_widths_problem,
    show=_show,
    legacy=_legacy,
)


def _why_not_stream(config: WidthConfig) -> str | None:
    from secateur.width.disk import streamable

    return streamable(config)


def _stream(*args: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    from secateur.width.disk import streamed

    return streamed(*args)


KIND = register(StageKind(
    "width", WidthConfig, lambda: ("width",), lambda method: options_of(WidthConfig), _build, flatten, _run,
    lambda config: config.needs_calibration, lambda config: CalibConfig(),
    summary=_summary,
    describe=lambda result: f"width {result.get('removed_fraction', 0):.1%} of block parameters",
    report=_report,
    removes_columns=lambda settings: True,
    reshapes=lambda settings: bool(settings.get("hidden_fraction")),
    structure=STRUCTURE,
    streaming=Streaming(_why_not_stream, _stream),
))  # fmt: skip
