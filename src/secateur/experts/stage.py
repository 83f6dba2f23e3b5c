"""The experts stage kind: remove routed experts from a mixture-of-experts model."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from secateur.config import CalibConfig
from secateur.experts import ExpertsConfig, prune_experts
from secateur.experts.config import METHODS
from secateur.recipe import Section, Settings, StageContext, StageKind, register
from secateur.schema import Option, fill, flatten, options_of


WIDTH_KEYS = ("remove_fraction", "min_tokens", "round_to")


def _options(method: str) -> dict[str, Option]:
    options = options_of(ExpertsConfig)
    if method == "expert-width":
        return {k: options[k] for k in WIDTH_KEYS}
    return {k: o for k, o in options.items() if k != "round_to"}


def _build(method: str, settings: Settings) -> ExpertsConfig:
    return fill(ExpertsConfig, settings, width=method == "expert-width")


def _run(model: nn.Module, config: ExpertsConfig, calibration: Tensor | None, ctx: StageContext) -> dict[str, Any]:
    parameters_before = sum(p.numel() for p in model.parameters())
    report = prune_experts(model, config, calibration, device=ctx.device, batch_size=ctx.batch_size)
    return {"parameters_before": parameters_before, "parameters_after": sum(p.numel() for p in model.parameters()),
            **report.to_dict()}  # fmt: skip


def _few(result: dict[str, Any]) -> str:
    """What the stage says of experts that saw few calibration tokens."""
    few = sum(len(b.get("few_tokens", [])) for b in result["blocks"])
    if not few:
        return ""
    gone = sum(len(b.get("few_tokens_removed", [])) for b in result["blocks"])
    blocks = sum(bool(b.get("few_tokens")) for b in result["blocks"])
    return (f"\n{few} experts (in {blocks} block{'s' * (blocks != 1)}) were routed fewer "
            f"than the --min-tokens calibration tokens; scored on what they saw, {gone} of them removed. More "
            "calibration (--calib-samples) measures them better")


def _what(r: dict[str, Any]) -> str:
    if r["method"] == "expert-width":
        return f"{r['width_before']} -> {r['width_after']} channels in every routed expert"
    verb = "merged into" if r["criterion"] == "merge" else "->"
    return f"{r['experts_before']} {verb} {r['experts_after']} routed experts"


def _summary(record: dict[str, Any]) -> str:
    r = record["result"]
    how = "" if r["method"] == "expert-width" else f" ({r['criterion']})"
    return (f"{r['method']}{how}: {_what(r)} in each of {len(r['blocks'])} MoE blocks (top-{r['top_k']} routing "
            f"kept), {r['parameters_before']:,} -> {r['parameters_after']:,} parameters in {record['seconds']:.1f} s"
            + _few(r))


def _gone(block: dict[str, Any]) -> str:
    if "clusters" in block:
        return " ".join("+".join(map(str, c)) for c in block["clusters"] if len(c) > 1)
    return ", ".join(map(str, block.get("removed", []))) or "-"


def _report(record: dict[str, Any]) -> Section:
    """What every MoE block lost (experts removed, clusters merged) and how many calibration tokens each
    expert was routed."""
    r = record["result"]
    text = (f"{_what(r)} per MoE block, {r['parameters_before']:,} -> {r['parameters_after']:,} parameters; every "
            f"token is still routed to {r['top_k']} experts.")
    routed = lambda b: ", ".join(str(int(t)) for t in b.get("tokens_routed", [])) or "-"  # noqa: E731
    few = lambda b: ", ".join(map(str, b.get("few_tokens", []))) or "-"  # noqa: E731
    if r["method"] == "expert-width":
        return Section("Expert width", text, ("block", "calibration tokens routed per expert", "few tokens"),
                       tuple((str(b["block"]), routed(b), few(b)) for b in r["blocks"]))  # fmt: skip
    gone = "merged experts" if r["criterion"] == "merge" else "removed experts"
    return Section(f"Experts ({r['criterion']})", text, ("block", gone, "calibration tokens routed per expert",
                                                        "few tokens"),
                   tuple((str(b["block"]), _gone(b), routed(b), few(b)) for b in r["blocks"]))  # fmt: skip


KIND = register(StageKind(
    "experts", ExpertsConfig, lambda: METHODS, _options, _build, flatten, _run,
    lambda config: config.needs_calibration, lambda config: CalibConfig(),
    summary=_summary,
    describe=_what,
    report=_report,
))  # fmt: skip
