"""`prune(model, tokenizer, config, calibration)`: the Python entry point of a pruning run."""

from __future__ import annotations

from contextlib import nullcontext

import fnmatch
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from secateur.calibrate.disk import DiskBlocks, disk_store
from secateur.calibrate.processes import require_single, share
from secateur.calibrate.stream import BlockState, stream_blocks
from secateur.models.shapes import submodule
from secateur.config import NM, ConfigError, PruneConfig, Target
from secateur.models import Adapter, adapter_for, read_weight, write_weight
from secateur.models.linear_experts import block_groups, linear_experts
from secateur.sparsity.allocation import allocate_targets
from secateur.sparsity.engine import LayerReport, Plan, prune_block
from secateur.sparsity.masks import global_masks
from secateur.sparsity.methods import GroupJob, magnitude_scores, spec_for
from secateur.sparsity.refine import REFINERS

log = logging.getLogger(__name__)


@dataclass
class PruneReport:
    method: str
    target: str
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0  # wall time of the pruning itself (capture + all blocks)
    calibration_tokens: int = 0
    allocation: dict[str, Any] = field(default_factory=dict)
    block_errors: list[float] = field(default_factory=list)  # collapse check per block (see engine.update_error)
    collapsed: list[int] = field(default_factory=list)  # blocks whose error passed the threshold

    @property
    def sparsity(self) -> float:
        """Fraction of the target layers' weights removed, weighted by layer size."""
        sizes = [r.shape[0] * r.shape[1] for r in self.layers]
        return sum(r.sparsity * n for r, n in zip(self.layers, sizes)) / max(sum(sizes), 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "target": self.target,
            "sparsity": self.sparsity,
            "seconds": self.seconds,
            "calibration_tokens": self.calibration_tokens,
            "allocation": self.allocation,
            "block_errors": self.block_errors,
            "collapsed_blocks": self.collapsed,
            "magnitude_fallback": [r.name for r in self.layers if r.magnitude_fallback],
            "layers": [asdict(r) for r in self.layers],
        }


def target_layers(model: nn.Module, adapter: Adapter, ignore: tuple[str, ...] = ()) -> list[tuple[str, nn.Module]]:
    """Every linear layer of the decoder blocks named by the adapter, minus the ignored ones."""
    layers = []
    for index, block in enumerate(adapter.block_list(model)):
        for name in (name for group in block_groups(block, adapter) for name in group):
            full = f"{adapter.blocks}.{index}.{name}"
            module = submodule(block, name)
            if module is not None and not any(fnmatch.fnmatch(full, pattern) for pattern in ignore):
                layers.append((full, module))
    return layers


def sparsity_table(model: nn.Module) -> list[tuple[str, tuple[int, int], float]]:
    """(name, shape, fraction of zeros) of every prunable layer, as found in the weights."""
    rows, adapter = [], adapter_for(model)
    with linear_experts(model, adapter):
        for name, module in target_layers(model, adapter):
            weight = read_weight(module)
            rows.append((name, tuple(weight.shape), float((weight == 0).float().mean())))
    return rows


def streamed_table(model: nn.Module, table: dict[str, tuple]) -> list[tuple[str, tuple[int, int], float]]:
    """The same rows as `sparsity_table` for a model streamed from disk (on the meta device), from the
    counts made as its blocks were written (`DiskBlocks.table`): every routed expert's layers too."""
    adapter = adapter_for(model)
    with linear_experts(model, adapter):
        return [(name, *table[name + ".weight"]) for name, _ in target_layers(model, adapter)]


def _check_ignore(layers: list[tuple[str, nn.Module]], ignore: tuple[str, ...]) -> None:
    """An --ignore pattern that matches no layer is a typo, not a choice."""
    for pattern in ignore:
        if not any(fnmatch.fnmatch(name, pattern) for name, _ in layers):
            raise ConfigError(f"--ignore {pattern!r} matches no layer; names look like {layers[0][0]!r} "
                              "(fnmatch patterns, e.g. '*.mlp.down_proj')")


def _check_shapes(layers: list[tuple[str, nn.Module]], config: PruneConfig) -> None:
    if isinstance(config.target, NM):
        bad = [name for name, module in layers if read_weight(module).shape[1] % config.target.m]
        if bad:
            raise ConfigError(f"N:M with M={config.target.m} needs input sizes divisible by M; not so for {bad[:3]}")


def _prune_without_data(layers: list[tuple[str, nn.Module]], config: PruneConfig,
                        targets: dict[str, Target]) -> list[LayerReport]:
    """Methods that need no calibration (magnitude) prune every layer directly, one at a time."""
    spec = spec_for(config.method)
    shared_masks: list[Tensor] | None = None
    if getattr(config.method, "scope", None) == "global" and not isinstance(config.target, NM):
        scores = [magnitude_scores(read_weight(module)) for _, module in layers]
        shared_masks = global_masks(scores, config.target.fraction)
        del scores
    reports = []
    for index, (name, module) in enumerate(layers):
        start = time.perf_counter()
        weight = read_weight(module)
        if shared_masks is not None:
            mask = shared_masks[index] | (weight == 0)  # zeros already there stay pruned
            weight = weight.masked_fill(mask, 0)
        else:
            [(weight, mask)] = spec.prune_group(config.method, GroupJob([name], [weight], [targets[name]]))
        write_weight(module, weight)
        reports.append(LayerReport(name, tuple(weight.shape), float(mask.float().mean()), time.perf_counter() - start))
    return reports


def statistics_for(config: PruneConfig) -> tuple[type, ...]:
    """Input statistics the method and the refinement steps need, each once."""
    kinds = list(spec_for(config.method).statistics)
    for step in config.refine.steps:
        kinds += [k for k in REFINERS[step].statistics if k not in kinds]
    return tuple(kinds)


def needs_calibration(config: PruneConfig) -> bool:
    """True when the run reads calibration data: statistics, gradients, OWL, or data-driven global allocation."""
    spec = spec_for(config.method)
    return bool(statistics_for(config)) or spec.prepare is not None or config.allocation.kind == "owl" or (
        config.allocation.kind == "global" and bool(spec.statistics))


@torch.no_grad()
def sparsify(
    model: nn.Module,
    tokenizer: Any,
    config: PruneConfig,
    calibration: Tensor | None = None,
    *,
    device: str | torch.device | None = None,
    batch_size: int = 4,
) -> PruneReport:
    """Prune `model` in place. `calibration` is a (samples, seq_len) tensor of token ids. For a model
    whose blocks stay on disk (`calibrate.disk.DiskBlocks.open`), every block is read from disk,
    pruned and written out in one streamed pass.

    `batch_size` samples go through a block per forward call (0 = all at once); memory holds all
    batches' activations of one block either way.
    The tokenizer is not used by the pruning itself; it is accepted so callers keep model and
    tokenizer together (and for methods that will need it).
    """
    adapter = adapter_for(model)
    if adapter.experts is None and config.expert_min_tokens != PruneConfig.expert_min_tokens:
        raise ConfigError(f"--expert-min-tokens applies to mixtures of experts; {adapter.family} has none")
    store = disk_store(model)
    if adapter.experts is not None:
        require_single(f"sparsity inside {adapter.family}'s experts")
    with linear_experts(model, adapter):  # the fused experts as one linear layer per projection and expert
        return _sparsify(model, adapter, config, calibration, device, batch_size, store)


def _sparsify(model: nn.Module, adapter: Adapter, config: PruneConfig, calibration: Tensor | None,
              device: str | torch.device | None, batch_size: int, store: DiskBlocks | None) -> PruneReport:
    spec = spec_for(config.method)
    layers = target_layers(model, adapter, config.ignore)
    _check_ignore(target_layers(model, adapter), config.ignore)
    _check_shapes(layers, config)
    report = PruneReport(config.method_name, str(config.target))
    start = time.perf_counter()
    model.eval()
    device = torch.device(device or "cpu")
    calibrated = needs_calibration(config)
    if calibrated:
        if calibration is None or calibration.ndim != 2 or len(calibration) == 0:
            raise ConfigError(f"this run ({report.method}, allocation {config.allocation.kind}, refine "
                              f"{list(config.refine.steps)}) needs calibration: a (samples, seq_len) tensor of token ids")
        report.calibration_tokens = calibration.numel()
        calibration = share(calibration)  # this process's windows (all of them in one process)
    with store.reading() if store is not None else nullcontext():  # the dense model: nothing written yet
        targets, report.allocation = allocate_targets(model, adapter, layers, config, spec.score, calibration, device,
                                                      batch_size, needs_norms=bool(spec.statistics))  # fmt: skip
    if not calibrated and not config.permute and store is None:
        report.layers = _prune_without_data(layers, config, targets)
    else:
        aux = {}
        if spec.prepare is not None:
            aux = spec.prepare(config.method, model, adapter, calibration, device, [name for name, _ in layers])
        plan = Plan(spec, config, targets, aux, statistics_for(config))
        report.layers, report.block_errors = _prune_sequential(model, adapter, plan, calibration, device, batch_size,
                                                               store)  # fmt: skip
        report.collapsed = [i for i, e in enumerate(report.block_errors) if e > config.collapse_threshold]
        fallback = [r.name for r in report.layers if r.magnitude_fallback]
        if fallback:
            log.warning("%d expert layers were routed fewer than %d calibration tokens and were pruned by weight "
                        "magnitude: %s; more calibration windows reach more experts", len(fallback),
                        config.expert_min_tokens, ", ".join(fallback[:6]) + (" ..." if len(fallback) > 6 else ""))  # fmt: skip
        if report.collapsed:
            log.warning("blocks %s collapsed: their output error exceeds %g of the dense block's update (errors %s); "
                        "lower the sparsity or spread it with --allocation owl", report.collapsed, config.collapse_threshold,
                        [round(report.block_errors[i], 3) for i in report.collapsed])  # fmt: skip
    report.seconds = time.perf_counter() - start
    return report


def _prune_sequential(
    model: nn.Module, adapter: Adapter, plan: Plan, calibration: Tensor, device: torch.device, batch_size: int,
    store: DiskBlocks | None = None,
) -> tuple[list[LayerReport], list[float]]:
    """Prune block by block; each block's pruned outputs are the next block's inputs."""
    reports: list[LayerReport] = []
    errors: list[float] = []
    desc = f"{plan.config.method_name} {plan.config.target}"
    point, start = store.resume_point() if store is not None else None, None
    if point is not None:  # an interrupted streamed run: go on from its last saved block
        reports = [LayerReport(**{**r, "shape": tuple(r["shape"])}) for r in point["reports"]]
        errors, start = list(point["errors"]), BlockState(point["index"], point["hidden"])
    for index, block, inputs in stream_blocks(model, adapter, calibration, batch_size, device, desc, start):
        inputs.hidden, block_reports, error = prune_block(block, index, adapter, plan, inputs)
        reports += block_reports
        errors.append(error)
        if store is not None:
            store.reached(index + 1, inputs.hidden, reports, errors)
    return reports, errors
