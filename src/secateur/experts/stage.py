"""The experts stage kind: remove routed experts from a mixture-of-experts model."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from secateur.config import CalibConfig
from secateur.experts import ExpertsConfig, prune_experts
from secateur.recipe import Section, Settings, StageContext, StageKind, register
from secateur.schema import fill, flatten, options_of


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
    return (f"\n{few} experts (over {sum(bool(b.get('few_tokens')) for b in result['blocks'])} blocks) were routed fewer "
            f"than the --min-tokens calibration tokens; scored on what they saw, {gone} of them removed. More "
            "calibration (--calib-samples) measures them better")


def _summary(record: dict[str, Any]) -> str:
    r = record["result"]
    return (f"experts ({r['criterion']}): {r['experts_before']} -> {r['experts_after']} routed experts in each of "
            f"{len(r['blocks'])} MoE blocks (top-{r['top_k']} routing kept), {r['parameters_before']:,} -> "
            f"{r['parameters_after']:,} parameters in {record['seconds']:.1f} s" + _few(r))


def _report(record: dict[str, Any]) -> Section:
    r = record["result"]
    text = (f"{r['experts_before']} -> {r['experts_after']} routed experts per MoE block by {r['criterion']}, "
            f"{r['parameters_before']:,} -> {r['parameters_after']:,} parameters; every token is still routed to "
            f"{r['top_k']} experts.")
    rows = tuple((str(b["block"]), ", ".join(map(str, b["removed"])),
                  ", ".join(str(int(t)) for t in b.get("tokens_routed", [])) or "-",
                  ", ".join(map(str, b.get("few_tokens", []))) or "-") for b in r["blocks"])  # fmt: skip
    return Section(f"Experts ({r['criterion']})", text,
                   ("block", "removed experts", "calibration tokens routed per expert", "few tokens"), rows)


KIND = register(StageKind(
    "experts", ExpertsConfig, lambda: ("experts",), lambda method: options_of(ExpertsConfig),
    lambda method, settings: fill(ExpertsConfig, settings), flatten, _run,
    lambda config: config.needs_calibration, lambda config: CalibConfig(),
    summary=_summary,
    describe=lambda result: f"experts {result['experts_before']} -> {result['experts_after']} per block",
    report=_report,
))  # fmt: skip
