"""The sequential layer-by-layer engine, shared by every method and every model family.

1. Capture the inputs of the first decoder block, and the extra arguments every block receives
   (masks, rotary embeddings: they can differ per block, e.g. Gemma 3's sliding layers), by running
   the model with each block's forward replaced by a recorder: no block computes anything.
2. For each block: pre-hooks on its linear layers feed the group statistics and prune each group
   *when its first layer is about to run* for every batch, so every layer is calibrated on the
   outputs of its already-pruned predecessors, in a single forward per block and batch.
3. The block's outputs under its pruned weights become the next block's inputs.

Only the block being pruned must sit on the compute device.
"""

from __future__ import annotations

import fnmatch
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import greenlet
import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from secateur.calibrate.processes import reduce
from secateur.calibrate.stats import WORK_DTYPE, check_finite
from secateur.calibrate.stream import BlockInputs, StopForward, run_block
from secateur.models.shapes import submodule
from secateur.config import PruneConfig, Target
from secateur.models import Adapter, read_weight, write_weight
from secateur.models.linear_experts import expert_groups, rebind
from secateur.runtime import release_free_memory
from secateur.sparsity.methods import GroupJob, MethodSpec
from secateur.sparsity.permute import Permuter, permuter_for
from secateur.sparsity.refine import REFINERS


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    sparsity: float  # fraction of weights the mask removed
    seconds: float  # time spent computing the mask and the update
    # an expert routed fewer than expert_min_tokens calibration tokens: pruned by weight magnitude
    magnitude_fallback: bool = False


# --- one block ---------------------------------------------------------------------------------------


@dataclass
class Plan:
    """What the engine needs to prune a group: the method, each layer's target, auxiliary tensors
    (gradients), and the input statistics the method and the refinement steps need."""

    spec: MethodSpec
    config: PruneConfig
    targets: dict[str, Target]
    aux: dict[str, Tensor] = field(default_factory=dict)
    statistics: tuple[type, ...] = ()


@dataclass
class _Group:
    names: list[str]  # qualified names of the prunable layers
    modules: list[nn.Module]
    stats: dict[type, Any] = field(default_factory=dict)
    done: bool = False
    permuter: Permuter | None = None  # N:M channel permutation of a layer fed by an inner dimension
    perm: Tensor | None = None  # the column order chosen, once pruned
    expert: bool = False  # a routed expert's layer: its statistics count only the tokens routed to it


def _groups(block: nn.Module, index: int, adapter: Adapter, config: PruneConfig) -> list[_Group]:
    groups, experts = [], expert_groups(block, adapter)
    routed = set(experts)  # a routed expert's layer: its statistics count only the tokens routed to it
    for group in adapter.groups + experts:
        names = [f"{adapter.blocks}.{index}.{name}" for name in group]
        modules = [submodule(block, name) for name in group]  # None: the branch was removed by depth pruning
        keep = [i for i, name in enumerate(names)
                if modules[i] is not None and not any(fnmatch.fnmatch(name, p) for p in config.ignore)]  # fmt: skip
        if keep:
            permuter = permuter_for(block, adapter, group[0], config.target) if config.permute and len(group) == 1 else None
            groups.append(_Group([names[i] for i in keep], [modules[i] for i in keep], permuter=permuter,
                                 expert=group in routed))
    return groups


def _prune_group(group: _Group, plan: Plan, reports: list[LayerReport]) -> None:
    start = time.perf_counter()
    for stat in group.stats.values():
        reduce(stat)  # summed over the processes (each fed its own windows): every process prunes alike
    fallback = group.expert and any(s.tokens < plan.config.expert_min_tokens for s in group.stats.values())
    for kind, stat in group.stats.items():
        if fallback:
            stat.uninformed()
        check_finite(f"input statistic ({kind.__name__}) of {group.names[0]}", stat.value)
    # a method whose layers do not share work (a score per weight) runs one layer at a time: the same
    # masks, with one layer's float32 copy, scores and masks resident instead of the group's (gate and
    # up of Llama-3.1-8B: 2 x 235 MB each)
    layerwise = plan.spec.layerwise and not plan.config.refine.steps and group.permuter is None
    parts = [[i] for i in range(len(group.modules))] if layerwise else [list(range(len(group.modules)))]
    pruned = [layer for part in parts for layer in _prune_layers(group, plan, part)]
    seconds = (time.perf_counter() - start) / len(group.modules)
    reports.extend(LayerReport(name, shape, sparsity, seconds, fallback) for name, shape, sparsity in pruned)
    group.stats, group.done = {}, True  # free the statistics (Hessians can be large)
    # the free pages its temporaries left, handed back: otherwise the heap climbs by gigabytes within an
    # 8B-shaped block, by an amount that varies from run to run (docs/benchmarks.md)
    release_free_memory()


def _prune_layers(group: _Group, plan: Plan, part: list[int]) -> list[tuple[str, tuple[int, int], float]]:
    """Prune the layers `part` of the group in one job and write them; returns (name, shape, fraction
    of the weights the mask removed) per layer."""
    names, modules = [group.names[i] for i in part], [group.modules[i] for i in part]
    weights = [read_weight(module).to(WORK_DTYPE) for module in modules]
    for name, weight in zip(names, weights):
        check_finite(f"weight of {name}", weight)
    job = GroupJob(names, weights, [plan.targets[n] for n in names], group.stats,
                   {n: plan.aux[n] for n in names if n in plan.aux})
    perm = None
    if group.permuter is not None:
        scores = plan.spec.score(plan.config.method, weights[0], job.input_norm() if group.stats else None)
        perm = group.permuter.find(scores)
        job.weights = [weights[0][:, perm]]
        for stat in group.stats.values():
            stat.permute(perm)
    results = plan.spec.prune_group(plan.config.method, job)
    for step in plan.config.refine.steps:
        results = REFINERS[step].run(plan.config.refine, job, results)
    frozen = [w == 0 for w in job.weights]  # an earlier stage's zeros: no method or refinement revives them
    results = [(w.masked_fill_(f, 0), m.logical_or_(f)) for (w, m), f in zip(results, frozen)]  # in place: large
    del frozen, job, weights  # layers are the peak of a streamed run
    if perm is not None:
        group.permuter.reorder_producers(perm)
        group.perm = perm
    done = []
    for name, module, (weight, mask) in zip(names, modules, results):
        check_finite(f"pruned weight of {name}", weight)
        if perm is not None:
            module.weight.data = _with_columns(module, weight)
        else:
            write_weight(module, weight)
        done.append((name, tuple(weight.shape), int(mask.count_nonzero()) / mask.numel()))
    return done


def _with_columns(module: nn.Module, weight: Tensor) -> Tensor:
    """The module's storage layout of a (rows, cols) weight (GPT-2's Conv1D stores it transposed)."""
    stored = weight.T if isinstance(module, Conv1D) else weight
    return stored.to(module.weight.dtype).contiguous()


def _feed(group: _Group, plan: Plan, x: Tensor) -> None:
    """Add one batch of the group's (shared) input to its statistics."""
    for kind in plan.statistics:
        if kind not in group.stats:
            group.stats[kind] = kind(x.shape[-1], x.device)
        group.stats[kind].update(x)


@contextmanager
def _pre_hooks(groups: list[_Group], hook_for: Callable[[_Group], Callable]) -> Iterator[None]:
    """Install `hook_for(group)` as a forward pre-hook on every layer of every group, for the block."""
    handles = [m.register_forward_pre_hook(hook_for(g)) for g in groups for m in g.modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _run_in_lockstep(tasks: list[greenlet.greenlet], on_parked: Callable[[_Group], None]) -> list[Tensor]:
    """Resume every batch until all are parked at the same group, call `on_parked`, repeat until
    every batch has finished; returns each batch's result."""
    outputs: list[Tensor | None] = [None] * len(tasks)
    try:
        while any(not task.dead for task in tasks):
            parked: list[_Group] = []
            for i, task in enumerate(tasks):
                if not task.dead:
                    result = task.switch()  # run this batch to the next unpruned group, or to the end
                    if task.dead:
                        outputs[i] = result
                    else:
                        parked.append(result)
            if parked:
                if any(g is not parked[0] for g in parked) or any(task.dead for task in tasks):
                    raise RuntimeError("batches of one block took different paths through it; cannot prune in one pass")
                on_parked(parked[0])
    finally:
        for task in tasks:
            if not task.dead:
                task.throw(greenlet.GreenletExit)
    return outputs  # type: ignore[return-value]


def update_error(hidden: Tensor, reference: Tensor, pruned: Tensor) -> float:
    """Collapse check: ||pruned - dense|| / ||dense - input|| for one batch, i.e. the error of the
    block's update to the residual stream relative to the dense update (the residual itself would
    hide any collapse)."""
    change = (reference - hidden).float().norm()
    return float((pruned - reference).float().norm() / change.clamp_min(1e-12))


@torch.no_grad()
def prune_block(
    block: nn.Module, index: int, adapter: Adapter, plan: Plan, inputs: BlockInputs
) -> tuple[list[Tensor], list[LayerReport], float]:
    """Prune one block in place; returns its outputs (under the pruned weights) and layer reports.

    Each batch's forward runs as a coroutine (greenlet). A pre-hook on the first layer of an
    unpruned group feeds the batch's input to the group statistic and parks the coroutine; once
    every batch is parked there, the group is pruned and all resume. So the block runs exactly once
    per batch, and each layer is calibrated on the outputs of its pruned predecessors.
    """
    rebind(block, adapter)  # the block was moved to the compute device: its exposed experts view its weights again
    groups = _groups(block, index, adapter, plan.config)
    reference = run_block(block, inputs.hidden[0], inputs.extras[index][0])  # dense output of one batch
    if plan.config.block_stats == "dense":
        outputs, reports = _prune_block_dense(block, index, groups, plan, inputs)
    else:
        outputs, reports = _prune_block_sequential(block, index, groups, plan, inputs)
    return outputs, reports, update_error(inputs.hidden[0], reference, outputs[0])


def _prune_block_sequential(
    block: nn.Module, index: int, groups: list[_Group], plan: Plan, inputs: BlockInputs
) -> tuple[list[Tensor], list[LayerReport]]:
    reports: list[LayerReport] = []

    def hook_for(group: _Group):
        def hook(module: nn.Module, args: tuple) -> None:
            if not group.done:
                _feed(group, plan, args[0])
                greenlet.getcurrent().parent.switch(group)  # park until the group is pruned
                if group.perm is not None:  # this input was computed before its producers were reordered
                    return (args[0][..., group.perm], *args[1:])

        return hook

    def runner(hidden: Tensor, extra: tuple[tuple, dict[str, Any]]):
        def run() -> Tensor:
            with torch.no_grad():
                return run_block(block, hidden, extra)

        return greenlet.greenlet(run)

    tasks = [runner(h, e) for h, e in zip(inputs.hidden, inputs.extras[index])]
    with _pre_hooks(groups, hook_for):
        outputs = _run_in_lockstep(tasks, lambda group: _prune_group(group, plan, reports))
    missing = [g.names[0] for g in groups if not g.done]
    if missing:
        raise RuntimeError(f"layers {missing} never ran in the block's forward; check the model adapter")
    return outputs, reports


def _prune_block_dense(
    block: nn.Module, index: int, groups: list[_Group], plan: Plan, inputs: BlockInputs
) -> tuple[list[Tensor], list[LayerReport]]:
    """Every group calibrated on the dense block: one forward for statistics (stopped once the last
    group has its input), prune all groups, one forward for the outputs."""
    reports: list[LayerReport] = []
    fed: set[int] = set()  # groups that saw the current batch

    def hook_for(group: _Group):
        def hook(module: nn.Module, args: tuple) -> None:
            if id(group) in fed:
                return
            _feed(group, plan, args[0])
            fed.add(id(group))
            if len(fed) == len(groups):
                raise StopForward  # the rest of the block adds nothing to the statistics

        return hook

    batches = list(zip(inputs.hidden, inputs.extras[index]))
    with _pre_hooks(groups, hook_for):
        for hidden, extra in batches:
            fed.clear()
            try:
                run_block(block, hidden, extra)
            except StopForward:
                pass
    for group in groups:
        _prune_group(group, plan, reports)
    return [run_block(block, hidden, extra) for hidden, extra in batches], reports
