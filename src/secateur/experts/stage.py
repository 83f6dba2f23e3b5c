"""The experts stage kind: remove routed experts from a mixture-of-experts model."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from secateur.config import CalibConfig
from secateur.experts import ExpertsConfig, prune_experts
from secateur.experts.config import METHODS
from secateur.experts.prune import ExpertsError, keep_experts
from secateur.models import adapter_for
from secateur.recipe import Section, Settings, StageContext, StageKind, Streaming, Structure, register
from secateur.schema import Option, fill, flatten, options_of


WIDTH_KEYS = ("remove_fraction", "min_tokens", "round_to", "shared_expert")


def _options(method: str) -> dict[str, Option]:
    options = options_of(ExpertsConfig)
    if method == "expert-width":
        return {k: options[k] for k in WIDTH_KEYS}
    return {k: o for k, o in options.items() if k not in ("round_to", "shared_expert")}


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
        shared = (f", the shared expert's {r['shared_width_before']} -> {r['shared_width_after']}"
                  if r.get("shared_width_after") is not None else "")
        return f"{r['width_before']} -> {r['width_after']} channels in every routed expert{shared}"
    verb = "merged into" if r["criterion"] == "merge" else "->"
    if r.get("experts_after") is None:  # global allocation: per-block counts
        before = sum(b["experts_before"] for b in r["blocks"])
        kept = [b["experts_after"] for b in r["blocks"]]
        return f"{before} -> {sum(kept)} routed experts over the MoE blocks ({min(kept)} to {max(kept)} per block)"
    return f"{r['experts_before']} {verb} {r['experts_after']} routed experts"


def _summary(record: dict[str, Any]) -> str:
    r = record["result"]
    how = "" if r["method"] == "expert-width" else f" ({r['criterion']})"
    uneven = r["method"] == "experts" and r.get("experts_after") is None  # global allocation: per-block counts
    where = "" if uneven else f" in each of {len(r['blocks'])} MoE blocks"
    per_block = ("\nexpert counts differ per block: load with secateur.load(path) or "
                 "AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)" if uneven else "")
    return (f"{r['method']}{how}: {_what(r)}{where} (top-{r['top_k']} routing kept), {r['parameters_before']:,} -> "
            f"{r['parameters_after']:,} parameters in {record['seconds']:.1f} s" + _few(r) + per_block)


def _gone(block: dict[str, Any]) -> str:
    if "clusters" in block:
        return " ".join("+".join(map(str, c)) for c in block["clusters"] if len(c) > 1)
    return ", ".join(map(str, block.get("removed", []))) or "-"


def _report(record: dict[str, Any]) -> Section:
    """What every MoE block lost (experts removed, clusters merged) and how many calibration tokens each
    expert was routed."""
    r = record["result"]
    text = (f"{_what(r)}{' per MoE block' if r.get('experts_after') is not None else ''} ({r.get('allocation', 'uniform')} "
            f"allocation), {r['parameters_before']:,} -> {r['parameters_after']:,} parameters; every "
            f"token is still routed to {r['top_k']} experts.")
    routed = lambda b: ", ".join(str(int(t)) for t in b.get("tokens_routed", [])) or "-"  # noqa: E731
    few = lambda b: ", ".join(map(str, b.get("few_tokens", []))) or "-"  # noqa: E731
    if r["method"] == "expert-width":
        return Section("Expert width", text, ("block", "calibration tokens routed per expert", "few tokens"),
                       tuple((str(b["block"]), routed(b), few(b)) for b in r["blocks"]))  # fmt: skip
    gone = "merged experts" if r["criterion"] == "merge" else "removed experts"
    kept = lambda b: f"{b['experts_before']} -> {b['experts_after']}" if "experts_after" in b else "-"  # noqa: E731
    return Section(f"Experts ({r['criterion']})", text, ("block", "experts", gone,
                                                        "calibration tokens routed per expert", "few tokens"),
                   tuple((str(b["block"]), kept(b), _gone(b), routed(b), few(b)) for b in r["blocks"]))  # fmt: skip


def _counts(model: nn.Module) -> list[int | None]:
    """Every block's routed-expert count (None: a dense block)."""
    adapter = adapter_for(model)
    if adapter.experts is None:
        return []
    blocks = adapter.block_list(model)
    counts = adapter.experts.counts(blocks)
    return [counts.get(i) for i in range(len(blocks))]


def _record(model: nn.Module) -> dict[str, Any]:
    counts = _counts(model)
    return {"experts_per_block": counts} if len({c for c in counts if c is not None}) > 1 else {}


def _rebuild(model: nn.Module, counts: list[int | None]) -> None:
    """Shape every MoE block of a model built from its config to its recorded expert count."""
    adapter = adapter_for(model)
    blocks = adapter.block_list(model)
    if adapter.experts is None or len(counts) != len(blocks):
        raise ExpertsError(f"the manifest records expert counts for {len(counts)} blocks; the config builds "
                           f"{len(blocks)} blocks{'' if adapter.experts else ' without experts'}")
    for block, count in zip(blocks, counts):
        if count is not None:
            keep_experts(block, adapter, range(count))


def _counts_problem(section: dict[str, Any]) -> str | None:
    counts = section.get("experts_per_block", [])
    if not isinstance(counts, list) or not all(c is None or (isinstance(c, int) and c > 0) for c in counts):
        return "structure.experts_per_block is not a list of per-block expert counts"
    return None


def _stream(*args: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    from secateur.experts.disk import streamed

    return streamed(*args)


# per-block expert counts (global allocation): a stock config holds one count, so a loader slices
# every block's router and experts to the recorded count before the weights load
STRUCTURE = Structure(
    record=_record,
    needed=lambda section: section.get("experts_per_block") or None,
    rebuild=_rebuild,
    problem=_counts_problem,
    show=lambda section: (f"routed experts per block (load with secateur.load): {section['experts_per_block']}"
                          if section.get("experts_per_block") else None),
)


KIND = register(StageKind(
    "experts", ExpertsConfig, lambda: METHODS, _options, _build, flatten, _run,
    lambda config: config.needs_calibration, lambda config: CalibConfig(),
    summary=_summary,
    describe=_what,
    report=_report,
    structure=STRUCTURE,
    streaming=Streaming(lambda config: None, _stream),  # every method and criterion works one block at a time
))  # fmt: skip
