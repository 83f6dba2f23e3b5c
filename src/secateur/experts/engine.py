"""Expert pruning block by block: each MoE block is measured on the calibration activations of the
model pruned so far (its own router decides which tokens reach which expert), loses its experts,
and hands its pruned outputs to the next block."""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from secateur.calibrate.processes import require_single
from secateur.calibrate.disk import disk_store
from secateur.calibrate.stream import BlockInputs, BlockState, each_block, run_block, stream_blocks
from secateur.experts.allocation import global_counts
from secateur.experts.config import ExpertsConfig
from secateur.experts.criteria import CRITERIA, cluster, lowest, search_removal
from secateur.experts.prune import (ExpertsError, keep_experts, merge_experts, routed_output, router_over, set_count,
                                    slim_experts, slim_shared)
from secateur.experts.stats import ExpertStats, expert_output
from secateur.models import Adapter, adapter_for
from secateur.models.remote import declare_reshaped


@dataclass
class ExpertsReport:
    method: str  # experts or expert-width
    criterion: str  # reap, frequency, naee, random or merge (experts)
    experts_before: int | None  # per MoE block (None: blocks differ, see each block's record)
    experts_after: int | None
    top_k: int
    allocation: str = "uniform"  # uniform or global (experts): how many experts each block loses
    width_before: int | None = None  # expert-width: channels per expert
    width_after: int | None = None
    shared_width_before: int | None = None  # expert-width with the shared expert: its channels
    shared_width_after: int | None = None
    blocks: list[dict[str, Any]] = field(default_factory=list)  # per MoE block: what went, scores, statistics
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "criterion": self.criterion, "experts_before": self.experts_before,
                "experts_after": self.experts_after, "top_k": self.top_k, "allocation": self.allocation, "width_before": self.width_before,
                "width_after": self.width_after, "shared_width_before": self.shared_width_before,
                "shared_width_after": self.shared_width_after, "blocks": self.blocks, "seconds": self.seconds}  # fmt: skip


class _Recorder:
    """Hooks on one block's router and experts feeding an `ExpertStats` (and a token sample for a search)."""

    def __init__(self, block: nn.Module, adapter: Adapter, stats: ExpertStats, sample: int,
                 shared: bool = False) -> None:  # fmt: skip
        self.router, self.experts = block.get_submodule(adapter.experts.router), block.get_submodule(adapter.experts.experts)
        self.norm = block.get_submodule(adapter.experts.norm)
        self.stats, self.sample, self.kept = stats, sample, []
        # the shared expert's channels, scored like a routed expert's: sum of gate x |activation|
        spec = adapter.experts
        self.shared = block.get_submodule(spec.shared) if shared else None
        self.shared_gate = block.get_submodule(spec.shared_gate) if shared and spec.shared_gate else None
        self.shared_channels: Tensor | None = None
        self._activation: Tensor | None = None
        self.logits: Tensor | None = None
        self.residuals: list[Tensor] = []  # per batch: the residual stream entering the MoE branch
        self.first: Tensor | None = None  # the dense block's output of the first batch

    def on_norm(self, module: nn.Module, args: tuple) -> None:
        self.residuals.append(args[0])

    def on_router(self, module: nn.Module, args: tuple, output: tuple) -> None:
        self.logits = output[0]

    def on_shared_down(self, module: nn.Module, args: tuple) -> None:
        self._activation = args[0].detach().abs().double().flatten(0, -2)  # (tokens, shared width)
        if self.shared_gate is None:
            self._accumulate(torch.ones_like(self._activation[:, :1]))

    def on_shared_gate(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        self._accumulate(torch.sigmoid(output.detach().double().flatten(0, -2)))  # (tokens, 1)

    def _accumulate(self, gate: Tensor) -> None:
        total = (gate * self._activation).sum(dim=0)
        self.shared_channels = total if self.shared_channels is None else self.shared_channels + total

    def experts_forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        """The experts module's forward while it is measured: every routed expert runs once, for its
        statistics and for the output."""
        experts = self.experts
        held = sum(len(t) for t in self.kept)
        if held < self.sample:
            self.kept.append(hidden_states[: self.sample - held].detach())
        return self.stats.update(hidden_states, self.logits, top_k_index, top_k_weights, experts.gate_up_proj,
                                 experts.down_proj, experts.act_fn)  # fmt: skip

    @contextmanager
    def attached(self) -> Iterator[None]:
        """The router hook and the measuring forward, while the block runs on calibration."""
        handles = [self.router.register_forward_hook(self.on_router), self.norm.register_forward_pre_hook(self.on_norm)]
        if self.shared is not None:
            handles.append(self.shared.down_proj.register_forward_pre_hook(self.on_shared_down))
        if self.shared_gate is not None:
            handles.append(self.shared_gate.register_forward_hook(self.on_shared_gate))
        self.experts.forward = self.experts_forward  # an instance attribute shadows the class's forward
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            del self.experts.forward

    def run(self, block: nn.Module, inputs: BlockInputs, index: int) -> list[Tensor]:
        """The block's outputs on every batch, measured."""
        with self.attached():
            outputs = [run_block(block, hidden, extra) for hidden, extra in zip(inputs.hidden, inputs.extras[index])]
        self.first = outputs[0] if outputs else None
        if len(self.residuals) != len(inputs.hidden):
            self.residuals = []  # the norm ran more or less than once per batch: not the pre-norm layout
        return outputs


def _moe_branch(block: nn.Module, adapter: Adapter, residual: Tensor) -> Tensor:
    """A pre-norm block's output from the residual stream entering its MoE branch: the residual plus
    the MoE module's output of it (what the decoder layer computes after its attention)."""
    out = block.get_submodule(adapter.experts.module)(block.get_submodule(adapter.experts.norm)(residual))
    return residual + (out[0] if isinstance(out, tuple) else out)


def _outputs(block: nn.Module, adapter: Adapter, recorder: _Recorder, inputs: BlockInputs, index: int,
             recomputable: bool) -> list[Tensor]:  # fmt: skip
    """The block's outputs under its pruned experts: its attention did not change, so only the MoE
    branch runs again, on the residuals the measuring pass kept (the whole block where they were not
    kept or did not reproduce the dense block)."""
    if recomputable:
        return [_moe_branch(block, adapter, residual) for residual in recorder.residuals]
    return [run_block(block, h, e) for h, e in zip(inputs.hidden, inputs.extras[index])]


def _sample_outputs(recorder: _Recorder) -> tuple[Tensor, Tensor]:
    """The sampled tokens (tokens, hidden) and every expert's output on them (experts, tokens, hidden)."""
    x = torch.cat(recorder.kept)
    experts = recorder.experts
    outputs = torch.stack([expert_output(experts.gate_up_proj[j], experts.down_proj[j], experts.act_fn, x)
                           for j in range(experts.gate_up_proj.shape[0])])  # fmt: skip
    return x, outputs


@torch.no_grad()
def _search(recorder: _Recorder, remove: int) -> list[int]:
    """NAEE-style: the removal whose kept experts, routed as the pruned router will route, best
    reproduce the experts module's output on the sampled tokens."""
    x, outputs = _sample_outputs(recorder)
    count = outputs.shape[0]

    def output(kept: list[int]) -> Tensor:
        _, weights, indices = router_over(recorder.router, kept)(x)
        return routed_output(outputs, indices, weights, kept)

    reference = output(list(range(count)))
    return search_removal(count, remove, lambda kept: float((output(kept) - reference).square().sum()))


def per_group(count: int, groups: int, remove: int, choose: Callable[[list[int], int], list[int]]) -> list[int]:
    """The experts removed when each of `groups` groups of consecutive experts loses remove / groups:
    `choose(members, k)` picks k of a group's members."""
    size = count // groups
    return sorted(j for g in range(groups) for j in choose(list(range(g * size, (g + 1) * size)), remove // groups))


def _remove(block: nn.Module, adapter: Adapter, config: ExpertsConfig, recorder: _Recorder | None, count: int,
            remove: int, index: int, groups: int = 1) -> dict[str, Any]:  # fmt: skip
    criterion = CRITERIA[config.criterion]
    scores = None
    if criterion.weights is not None:
        experts = block.get_submodule(adapter.experts.experts)
        flat = torch.cat([experts.gate_up_proj.detach().flatten(1), experts.down_proj.detach().flatten(1)], dim=1)
        router = block.get_submodule(adapter.experts.router).weight.detach()
        choose = lambda members, k: [members[j] for j in criterion.weights(router[members], flat[members], k)]  # noqa: E731
    elif criterion.search:  # refused for grouped routing (prune_experts)
        choose = lambda members, k: _search(recorder, k)  # noqa: E731
    else:
        stats = recorder.stats if recorder is not None else ExpertStats(count, "cpu")
        values = criterion.score(stats, config.draw_seed + index)
        scores = values.tolist()
        choose = lambda members, k: [members[j] for j in lowest(values[members], k)]  # noqa: E731
    removed = per_group(count, groups, remove, choose)
    keep_experts(block, adapter, [j for j in range(count) if j not in removed])
    return {"removed": removed, "scores": scores}


@torch.no_grad()
def _merge(block: nn.Module, adapter: Adapter, config: ExpertsConfig, recorder: _Recorder, count: int,
           remove: int, index: int, groups: int = 1) -> dict[str, Any]:  # fmt: skip
    """Cluster the experts by the cosine similarity of their outputs on the sampled tokens, merge each
    cluster, weighting members by the tokens routed to them."""
    _, outputs = _sample_outputs(recorder)
    flat = nn.functional.normalize(outputs.flatten(1).double(), dim=1)  # (experts, tokens x hidden)
    clusters = cluster(flat @ flat.T, count - remove)
    merge_experts(block, adapter, clusters, recorder.stats.count)
    return {"clusters": clusters, "removed": [j for c in clusters for j in c[1:]]}


def _slim(block: nn.Module, adapter: Adapter, config: ExpertsConfig, recorder: _Recorder, count: int,
          remove: int, index: int, groups: int = 1) -> dict[str, Any]:  # fmt: skip
    """Every expert keeps its channels of highest gate-weighted activation x down-projection norm."""
    experts = recorder.experts
    width = experts.down_proj.shape[2]
    keep = config.kept_channels(width)
    scores = recorder.stats.channels * experts.down_proj.detach().double().norm(dim=1)  # (experts, width)
    kept = scores.topk(keep, dim=1).indices.sort(dim=1).values.cpu()
    slim_experts(block, adapter, kept)
    done = {"width_before": width, "width_after": keep}
    if recorder.shared is not None:
        down = recorder.shared.down_proj.weight.detach()  # (hidden, shared width)
        shared_keep = config.kept_channels(down.shape[1])
        shared_scores = recorder.shared_channels.to(down.device) * down.double().norm(dim=0)
        slim_shared(recorder.shared, shared_scores.topk(shared_keep).indices.sort().values)
        done.update(shared_width_before=down.shape[1], shared_width_after=shared_keep)
    return done


def _apply(config: ExpertsConfig):
    return _slim if config.width else _merge if config.merge else _remove


def prune_experts(model: nn.Module, config: ExpertsConfig, calibration: Tensor | None, *,
                  device: str | torch.device = "cpu", batch_size: int = 4) -> ExpertsReport:  # fmt: skip
    """Remove, merge or slim the routed experts of every MoE block of `model` in place; the config
    follows (per-block expert counts, from global allocation, are declared for `trust_remote_code`)."""
    require_single("expert pruning")
    adapter = adapter_for(model)
    if adapter.experts is None:
        raise ExpertsError(f"{adapter.family} is not a mixture of experts: there are no experts to prune")
    blocks = adapter.block_list(model)
    counts = adapter.experts.counts(blocks)
    sparse = list(counts)
    if len(set(counts.values())) != 1 and (config.width or config.allocation != "global"):
        raise ExpertsError(f"the MoE blocks hold different expert counts {sorted(set(counts.values()))}; "
                           f"{config.method_name} prunes blocks of one count (--allocation global ranks experts "
                           "across blocks of any count)")
    top_k = getattr(model.config, adapter.experts.top_k_key)
    groups = adapter.experts.groups(model.config)
    if config.allocation == "global" and groups > 1:
        raise ExpertsError(f"the router picks experts within {groups} groups, which must stay of equal size in every "
                           "block; use --allocation uniform")
    if config.width:
        config.kept_channels(getattr(model.config, adapter.experts.width_key))  # refused before any pass
        if config.shared_expert and (adapter.experts.shared is None or adapter.experts.shared_width_key is None):
            raise ExpertsError(f"--shared-expert: {adapter.family} has no shared expert of its own width (one config "
                               "field) to slim")
        if config.shared_expert:
            config.kept_channels(getattr(model.config, adapter.experts.shared_width_key))
        if adapter.experts.shared_tied:
            raise ExpertsError(f"{adapter.family}'s config derives the shared expert's width from the routed experts' "
                               f"({adapter.experts.width_key}), so a stock config cannot hold narrower routed experts "
                               "beside a whole shared one; expert width is not built for it yet")
        remove = dict.fromkeys(sparse, 0)
    elif config.allocation == "uniform":
        remove = dict.fromkeys(sparse, config.removed(next(iter(counts.values())), top_k))
        if groups > 1:
            _check_groups(config, counts[sparse[0]], remove[sparse[0]], groups, top_k,
                          int(getattr(model.config, "topk_group", groups)))
    else:
        remove = {}  # chosen below, from the scores of all blocks
    has_calibration = calibration is not None and calibration.ndim == 2 and len(calibration) > 0
    if config.needs_calibration and not has_calibration:
        raise ExpertsError(f"{config.method_name} ({config.criterion_name}) needs calibration: a (samples, seq_len) "
                           "tensor of token ids")
    start = time.perf_counter()
    device = torch.device(device)
    model.eval()
    if not remove:
        remove = _allocate(model, adapter, config, calibration if has_calibration else None, counts, top_k,
                           device, batch_size)  # fmt: skip
    kept = {i: counts[i] - remove[i] for i in sparse}
    uniform = len(set(kept.values())) == 1
    report = ExpertsReport(config.method_name, config.criterion_name, counts[sparse[0]] if uniform else None,
                           kept[sparse[0]] if uniform else None, top_k, allocation=config.allocation)  # fmt: skip
    if not config.needs_calibration:
        # in memory only the MoE blocks are visited; on disk every block is read and written (a resumed run too)
        dense = set() if disk_store(model) is not None else set(range(len(blocks))) - set(sparse)
        for index, block in each_block(model, adapter, device, skip=dense):
            if index in sparse:
                report.blocks.append({"block": index, **_remove(block, adapter, config, None, counts[index],
                                                                remove[index], index, groups)})  # fmt: skip
    else:
        report.blocks = _prune_blocks(model, adapter, config, calibration, counts, remove, groups, device, batch_size)
    for done in report.blocks:
        done["experts_before"], done["experts_after"] = counts[done["block"]], kept[done["block"]]
    if config.width:
        report.width_before, report.width_after = report.blocks[0]["width_before"], report.blocks[0]["width_after"]
        setattr(model.config, adapter.experts.width_key, report.width_after)
        if config.shared_expert:
            report.shared_width_before = report.blocks[0]["shared_width_before"]
            report.shared_width_after = report.blocks[0]["shared_width_after"]
            setattr(model.config, adapter.experts.shared_width_key, report.shared_width_after)
    else:
        set_count(model, adapter, max(kept.values()))
        if not uniform:
            declare_reshaped(model)  # per-block counts: trust_remote_code builds them (secateur.load always does)
    report.seconds = time.perf_counter() - start
    return report


@torch.no_grad()
def _allocate(model: nn.Module, adapter: Adapter, config: ExpertsConfig, calibration: Tensor | None,
              counts: dict[int, int], top_k: int, device: torch.device, batch_size: int) -> dict[int, int]:  # fmt: skip
    """Global allocation: every MoE block's criterion scores, measured in one pass over the model as it
    is (no block pruned yet), ranked together as shares of their block's total (`global_counts`)."""
    criterion = CRITERIA[config.criterion]
    scores: dict[int, Tensor] = {}
    store = disk_store(model)
    if calibration is None:  # random: the draws the removal itself makes
        scores = {i: criterion.score(ExpertStats(n, "cpu"), config.draw_seed + i) for i, n in counts.items()}
    else:
        passes = stream_blocks(model, adapter, calibration, batch_size, device, "expert scores")
        with store.reading() if store is not None else nullcontext():  # the dense model, written nowhere
            for index, block, inputs in passes:
                if index in counts:
                    stats = ExpertStats(counts[index], next(block.parameters()).device)
                    recorder = _Recorder(block, adapter, stats, 0)
                    inputs.hidden = recorder.run(block, inputs, index)
                    scores[index] = criterion.score(recorder.stats, config.draw_seed + index).cpu()
                else:
                    inputs.hidden = [run_block(block, h, e) for h, e in zip(inputs.hidden, inputs.extras[index])]
    order = sorted(counts)
    total = config.total_removed([counts[i] for i in order], top_k)
    floors = [config.block_floor(counts[i], top_k) for i in order]
    try:
        removed = global_counts([scores[i] for i in order], total, floors)
    except ValueError:
        raise ExpertsError(f"removing {total} experts leaves some block below its floor (top-k {top_k}, "
                           f"--max-block-fraction): raise --max-block-fraction or remove fewer") from None
    return dict(zip(order, removed))


@torch.no_grad()
def _prune_blocks(model: nn.Module, adapter: Adapter, config: ExpertsConfig, calibration: Tensor,
                  counts: dict[int, int], remove: dict[int, int], groups: int, device: torch.device,
                  batch_size: int) -> list[dict[str, Any]]:  # fmt: skip
    """The pass that measures and prunes every MoE block on the activations of the model pruned so far
    (the dense blocks only run); a model on disk goes on from where an interrupted run saved."""
    store = disk_store(model)
    point = store.resume_point() if store is not None else None
    records, start = (list(point["reports"]), BlockState(point["index"], point["hidden"])) if point else ([], None)
    blocks = adapter.block_list(model)
    for record in records:  # pruned and written before the kill: their shapes, as that run left them
        _as_recorded(blocks[record["block"]], adapter, record)
    for index, block, inputs in stream_blocks(model, adapter, calibration, batch_size, device, "experts", start):
        if index in counts:
            done, inputs.hidden = _prune_block(block, adapter, config, inputs, index, counts[index], remove[index],
                                               groups)  # fmt: skip
            records.append(done)
        else:
            inputs.hidden = [run_block(block, h, e) for h, e in zip(inputs.hidden, inputs.extras[index])]
        if store is not None:
            store.reached(index + 1, inputs.hidden, records, [])
    return records


def _as_recorded(block: nn.Module, adapter: Adapter, record: dict[str, Any]) -> None:
    """Shape a block (on the meta device) as its record says it was pruned: its experts removed or
    merged, or its channels slimmed."""
    experts = block.get_submodule(adapter.experts.experts)
    count = experts.down_proj.shape[0]
    if "width_after" in record:
        slim_experts(block, adapter, torch.arange(record["width_after"]).expand(count, -1))
        if "shared_width_after" in record:
            slim_shared(block.get_submodule(adapter.experts.shared), torch.arange(record["shared_width_after"]))
        return
    kept = range(len(record["clusters"])) if "clusters" in record else \
        [j for j in range(count) if j not in record["removed"]]  # fmt: skip
    keep_experts(block, adapter, list(kept))


def _check_groups(config: ExpertsConfig, count: int, remove: int, groups: int, top_k: int, top_groups: int) -> None:
    """Group-limited routing (DeepSeek-V3): every group loses the same number of experts, keeps the two
    whose scores rank the group, and the groups a token may use still hold its top-k."""
    if config.merge or CRITERIA[config.criterion].search:
        raise ExpertsError(f"the router picks experts within {groups} groups; --merge and --criterion naee are not "
                           "built for group-limited routing: use reap, frequency, stun or random")
    kept = (count - remove) // groups
    if remove % groups or kept < 2 or kept * top_groups < top_k:
        raise ExpertsError(f"the router picks {top_k} experts within {top_groups} of {groups} groups of "
                           f"{count // groups}: remove a multiple of {groups} experts that leaves every group at least "
                           f"2 and {top_groups} groups at least {top_k} (asked: {remove})")


def _prune_block(block: nn.Module, adapter: Adapter, config: ExpertsConfig, inputs: BlockInputs, index: int,
                 count: int, remove: int, groups: int = 1) -> tuple[dict[str, Any], list[Tensor]]:  # fmt: skip
    """Measure, prune and run one MoE block: its record and its outputs under the pruned experts."""
    experts = block.get_submodule(adapter.experts.experts)
    stats = ExpertStats(count, next(block.parameters()).device, experts.down_proj.shape[2] if config.width else 0)
    recorder = _Recorder(block, adapter, stats, config.search_tokens if config.needs_sample else 0,
                         shared=config.width and config.shared_expert)
    recorder.run(block, inputs, index)
    recomputable = bool(recorder.residuals) and torch.allclose(
        _moe_branch(block, adapter, recorder.residuals[0]), recorder.first, rtol=1e-4, atol=1e-5)  # the dense block
    done = _apply(config)(block, adapter, config, recorder, count, remove, index, groups)
    outputs = _outputs(block, adapter, recorder, inputs, index, recomputable)
    few = [j for j in range(count) if stats.count[j] < config.min_tokens]
    return {"block": index, **done, "tokens": stats.tokens, "few_tokens": few,
            "few_tokens_removed": [j for j in few if j in done.get("removed", [])], **stats.to_dict()}, outputs
