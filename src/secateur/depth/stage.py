"""The depth stage kind: remove whole decoder blocks or their attention / MLP branches."""

from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor, nn

from secateur.config import CalibConfig
from secateur.depth import (REGISTRY, Amount, DepthConfig, depth_prune, remove_sublayers, removed_sublayers,
                            resolve_compensation)
from secateur.errors import ConfigError
from secateur.models import adapter_for
from secateur.recipe import Section, Settings, StageContext, StageKind, Streaming, Structure, register, sparsifies
from secateur.schema import Option, fill, flatten, options_of

AMOUNT_OPTIONS = {
    "remove_blocks": Option("remove_blocks", int, "number of decoder blocks to remove", None),
    "remove_sublayers": Option("remove_sublayers", int, "finercut: number of attention / MLP branches to remove", None),
    "remove_fraction": Option("remove_fraction", float, "fraction of the blocks to remove (finercut: of the blocks' "
                                                        "parameters)", None),
}


def _options(method: str) -> dict[str, Option]:
    spec = REGISTRY[method]
    count = "remove_blocks" if spec.unit == "block" else "remove_sublayers"
    amount = {k: o for k, o in AMOUNT_OPTIONS.items() if k in (count, "remove_fraction")}
    options = {**amount, **options_of(spec.config_type), **options_of(DepthConfig)}
    if spec.unit != "block":  # compensation re-fits the block before a removed run of whole blocks
        options = {k: o for k, o in options.items() if not k.startswith("compensate")}
    return options


def _build(method: str, settings: Settings) -> DepthConfig:
    spec = REGISTRY[method]
    given = {k: AMOUNT_OPTIONS[k].check(settings[k]) for k in AMOUNT_OPTIONS if settings.get(k) is not None}
    count = given.get("remove_blocks", given.get("remove_sublayers"))
    amount = Amount(count=count, fraction=given.get("remove_fraction"))
    if settings.get("compensate_damp") is not None and settings.get("compensate") is False:
        raise ConfigError("--compensate-damp sets the compensation, which --no-compensate turns off")
    return fill(DepthConfig, settings, method=fill(spec.config_type, settings), amount=amount)


def _settings(config: DepthConfig) -> Settings:
    unit = REGISTRY[config.method_name].unit
    amount = ({"remove_fraction": config.amount.fraction} if config.amount.fraction is not None
              else {f"remove_{unit}s": config.amount.count})  # fmt: skip
    rest = flatten(config)
    if unit != "block":
        rest = {k: v for k, v in rest.items() if not k.startswith("compensate")}
    return {**amount, **flatten(config.method), **rest}


def _run(model: nn.Module, config: DepthConfig, calibration: Tensor | None, ctx: StageContext) -> dict[str, Any]:
    blocks_before = model.config.num_hidden_layers
    parameters_before = sum(p.numel() for p in model.parameters())
    selection = depth_prune(model, config, calibration, device=ctx.device, batch_size=ctx.batch_size)
    return {
        "blocks_before": blocks_before,
        "blocks_after": model.config.num_hidden_layers,
        "parameters_before": parameters_before,
        "parameters_after": sum(p.numel() for p in model.parameters()),
        "removed_blocks": selection.blocks,  # numbered as in this stage's input
        "removed_sublayers": [list(u) for u in removed_sublayers(model, adapter_for(model))],  # as saved
        **selection.to_dict(),
    }


def _resolve(model: nn.Module, config: DepthConfig,
             earlier: Sequence[tuple[str, Settings]]) -> tuple[DepthConfig, str | None]:  # fmt: skip
    return resolve_compensation(model, config, after_sparsity=any(sparsifies(kind, s) for kind, s in earlier))


def _summary(record: dict[str, Any]) -> str:
    depth = record["result"]
    what = f"blocks {depth['removed_blocks']}" + (f", sublayers {depth['removed_sublayers']} (numbered as saved)"
                                                  if depth["removed_sublayers"] else "")
    compensated = {True: ", compensated", False: ", not compensated"}.get(depth.get("compensated"), "")
    line = (f"{record['settings']['method']}: removed {what}{compensated}: {depth['blocks_before']} -> "
            f"{depth['blocks_after']} blocks, {depth['parameters_before']:,} -> {depth['parameters_after']:,} "
            f"parameters in {record['seconds']:.1f} s")
    if depth.get("variant"):
        line += f"\ncompensation off: {depth['variant']}"
    return line


def _describe(result: dict[str, Any]) -> str:
    parts = [f"blocks {result['removed_blocks']}"] if result.get("removed_blocks") else []
    parts += [f"branches {result['removed_sublayers']}"] if result.get("removed_sublayers") else []
    return "; ".join(parts)


def _report(record: dict[str, Any]) -> Section:
    """Which blocks and branches went, in the order the search removed them, with their scores."""
    depth = record["result"]
    compensated = {True: "; compensation on", False: "; not compensated"}.get(depth.get("compensated"), "")
    text = (f"{depth['blocks_before']} -> {depth['blocks_after']} blocks, {depth['parameters_before']:,} -> "
            f"{depth['parameters_after']:,} parameters; blocks removed {depth['removed_blocks']} (numbered as in "
            f"the stage's input), branches skipped {depth['removed_sublayers']} (numbered as saved){compensated}. "
            f"Score: {depth.get('metric', '?')}.")
    rows = tuple((str(r["step"]), str(r["unit"]), f"{r['score']:.4g}", f"{r['parameters']:,}")
                 for r in depth.get("removed", []))  # fmt: skip
    return Section(f"Depth ({record['settings']['method']})", text,
                   ("step", "removed", "score", "parameters"), rows)


def _removed_problem(section: dict[str, Any]) -> str | None:
    removed = section.get("removed_sublayers", [])
    if not isinstance(removed, list) or not all(isinstance(u, list) and len(u) == 2 and isinstance(u[0], int)
                                                and isinstance(u[1], str) for u in removed):  # fmt: skip
        return "structure.removed_sublayers is not a list of [block, branch] pairs"
    return None


def _legacy(manifest: dict[str, Any]) -> dict[str, Any]:
    section = manifest.get("depth")
    return {"removed_sublayers": section.get("removed_sublayers", [])} if isinstance(section, dict) else {}


# removed attention / MLP branches: stock code builds every block whole, so a loader replaces them again
STRUCTURE = Structure(
    record=lambda model: {"removed_sublayers": [list(u) for u in removed_sublayers(model, adapter_for(model))]},
    needed=lambda section: [tuple(u) for u in section.get("removed_sublayers", [])] or None,
    rebuild=lambda model, removed: remove_sublayers(model, adapter_for(model), removed),
    problem=_removed_problem,
    show=lambda section: (f"branches skipped (as saved): {section['removed_sublayers']}"
                          if section.get("removed_sublayers") else None),
    legacy=_legacy,
)


def _why_not_stream(config: DepthConfig) -> str | None:
    from secateur.depth.disk import streamable

    return streamable(config)


def _stream(*args: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    from secateur.depth.disk import streamed

    return streamed(*args)


KIND = register(StageKind(
    "depth", DepthConfig, lambda: tuple(REGISTRY), _options, _build, _settings, _run,
    lambda config: True,
    lambda config: CalibConfig(samples=REGISTRY[config.method_name].calib_samples,
                               seq_len=REGISTRY[config.method_name].calib_seq_len),
    _resolve,
    summary=_summary,
    describe=_describe,
    report=_report,
    refits_dense=lambda settings: bool(settings.get("compensate")),
    reshapes=lambda settings: True,
    structure=STRUCTURE,
    streaming=Streaming(_why_not_stream, _stream),
))  # fmt: skip
