"""`width_prune(model, config, calibration)`: score heads and MLP channels, allocate, slice in place.

1. Statistics: one streamed pass over the dense blocks records each projection's input moments
   (for activation / fluctuation scores and bias compensation); Taylor scores take gradients of the
   calibration loss with the whole model on the device.
2. Units and scores per block (`secateur.width.units`); allocation: uniform or adaptive.
3. Per block: fold the removed channels' mean into the output bias (if asked), then slice.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from secateur.calibrate.gradients import weight_gradients
from secateur.calibrate.processes import reduce_tensor, share
from secateur.calibrate.stats import Hessian, Moments
from secateur.calibrate.disk import disk_store
from secateur.calibrate.stream import BlockState, Observer, collect_input_stats, each_block
from secateur.models import Adapter, Width, adapter_for, read_weight, refuse_experts
from secateur.width.config import WidthConfig
from secateur.width.hidden import (add_scores, block_hidden_scores, check_hidden, checked_scores, hidden_channel_parameters,
                                   hidden_count, hidden_scores, keep_hidden)  # fmt: skip
from secateur.width.reconstruct import Cut, refit_layer, stream_refits
from secateur.models.remote import declare_reshaped
from secateur.width.scores import IMPORTANCE
from secateur.models.shapes import LayerWidth, attention_heads, head_dim, submodule, widths_of
from secateur.width.structure import (
    Sliced,
    WidthError,
    bias_flag_needed,
    compensate,
    enable_biases,
    head_rows,
    keep_channels,
    keep_heads,
    write_uniform_config,
)
from secateur.width.units import (
    Units,
    adaptive_removals,
    removals_to,
    unit_count,
    with_unit_counts,
    attention_cost,
    attention_units,
    head_keep,
    layer_scorer,
    mlp_cost,
    mlp_units,
    uniform_attention_removal,
    uniform_removals,
)

log = logging.getLogger(__name__)


@dataclass
class WidthReport:
    before: list[LayerWidth]
    after: list[LayerWidth] = field(default_factory=list)
    block_parameters_before: int = 0
    block_parameters_after: int = 0
    uniform: bool = True
    head_dim: int = 0
    hidden_before: int = 0
    hidden_after: int = 0
    remote_code: bool = False  # non-uniform widths that stock transformers builds with trust_remote_code=True
    seconds: float = 0.0
    bias_compensation: bool = False  # as run (the defaults resolve per family)
    heads: str = "kv-groups"
    variant: str | None = None  # why the family's variant differs from the default, if it does
    reconstruction: list[dict] = field(default_factory=list)  # per refitted layer: relative output error before/after

    @property
    def removed_fraction(self) -> float:
        return 1 - self.block_parameters_after / max(self.block_parameters_before, 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "uniform": self.uniform,
            "head_dim": self.head_dim,
            "hidden_before": self.hidden_before,
            "hidden_after": self.hidden_after,
            "block_parameters_before": self.block_parameters_before,
            "block_parameters_after": self.block_parameters_after,
            "removed_fraction": self.removed_fraction,
            "layers_before": [w.to_dict() for w in self.before],
            "layers": [w.to_dict() for w in self.after],  # what `secateur.load` reshapes to
            "remote_code": self.remote_code,
            "seconds": self.seconds,
            "bias_compensation": self.bias_compensation,
            "heads": self.heads,
            "variant": self.variant,
            "reconstruction": self.reconstruction,
        }


def width_of(model: nn.Module, adapter: Adapter, config: WidthConfig) -> Width:
    """The family's width description, checked against the request before any work."""
    width, model_type = adapter.width, model.config.model_type
    refuse_experts(adapter, "width pruning")
    if width is None:
        raise WidthError(f"width pruning is not available for {model_type}")
    if config.heads != "none" and width.attention is None:
        raise WidthError(f"{model_type} derives its head size from hidden_size / heads, so removing heads would "
                         f"need a non-stock config; pass --heads none to prune MLP channels only")
    if config.heads != "none" and width.attention.fused and config.allocation == "adaptive":
        raise WidthError(f"{model_type}'s fused qkv_proj reads the head count from the shared config, so every block "
                         f"must keep the same heads; use --allocation uniform or --heads none")
    if config.heads != "none" and width.attention.fused and config.reconstruct:
        raise WidthError(f"{model_type}'s fused qkv_proj reads the head count from the shared config, so its blocks "
                         f"cannot run one by one with fewer heads while --reconstruct refits them; add --heads none "
                         f"or drop --reconstruct")
    if config.hidden_fraction:
        check_hidden(model, adapter)
    if config.compensate:
        for kind in ("mlp", "attention") if config.heads != "none" else ("mlp",):
            bias_flag_needed(model, adapter, kind)
    return width


def resolve_variant(model: nn.Module, adapter: Adapter, config: WidthConfig) -> tuple[WidthConfig, str | None]:
    """The family's best variant of the settings left to their defaults: heads are removed as key/value
    groups where the family has an explicit head size (MLP channels only otherwise), and bias
    compensation (on by default for fluctuation) is turned off where the family's config cannot hold
    the biases, the fluctuation score then measuring the uncompensated error. Explicit choices are
    kept (and refused by `width_of` where they cannot work). Returns the config and the reasons."""
    if adapter.width is None:
        return config, None
    reasons = []
    if config.heads is None:
        heads = "kv-groups" if adapter.width.attention is not None else "none"
        if heads == "none" and config.attention_fraction is not None:
            raise WidthError(f"{model.config.model_type} derives its head size from hidden_size / heads, so its heads "
                             f"are not pruned: drop --attention-fraction")
        config = replace(config, heads=heads)
        if heads == "none":
            reasons.append(f"{model.config.model_type} derives its head size from hidden_size / heads: MLP channels only")
    if config.bias_compensation is None and config.compensate:
        for kind in ("mlp", "attention") if config.heads != "none" else ("mlp",):
            try:
                bias_flag_needed(model, adapter, kind)
            except WidthError:
                reasons.append(f"{model.config.model_type} cannot hold a bias on the {kind} output projection: bias "
                               "compensation off, channels scored by the error they leave uncompensated")
                config = replace(config, bias_compensation=False)
                break
    config, why = _stock_heads(model, adapter, config)
    if why:
        reasons.append(why)
    if config.reconstruct is None:
        if config.reconstruct_damp is not None and not adapter.width.refit:
            raise WidthError(f"--reconstruct-damp applies only with --reconstruct, off by default for "
                             f"{model.config.model_type}: add --reconstruct")
        config = replace(config, reconstruct=adapter.width.refit)
        if adapter.width.refit:
            reasons.append(f"{model.config.model_type}: each pruned block's output projections are refitted by least "
                           "squares (--reconstruct), its family's default")
    for why in reasons:
        log.warning("width: %s", why)
    return config, "; ".join(reasons) or None


def _accepts(model_config: Any, q_heads: int, kv_heads: int) -> bool:
    """Whether the family's stock config validates with these head counts (Llama's wants hidden_size
    divisible by the query heads, whatever its head size)."""
    import copy

    trial = copy.deepcopy(model_config)
    try:
        trial.num_attention_heads, trial.num_key_value_heads = q_heads, kv_heads
        validate = getattr(trial, "validate", None)
        if validate is not None:
            validate()
    except Exception:  # noqa: BLE001 - huggingface_hub's strict validation error derives from none of ValueError's
        return False
    return True


def _stock_heads(model: nn.Module, adapter: Adapter, config: WidthConfig) -> tuple[WidthConfig, str | None]:
    """Uniform allocation writes the head counts into the stock config, which some families validate:
    where the default share would leave a count the config refuses, fewer attention units go (the
    largest count it accepts; the MLP makes up the rest), said; an explicit --attention-fraction that
    does is refused, before any work."""
    if config.allocation != "uniform" or config.heads == "none" or adapter.width.attention is None:
        return config, None
    q, kv = model.config.num_attention_heads, model.config.num_key_value_heads
    units = kv if config.heads == "kv-groups" else q // kv
    saved = lambda r: ((kv - r) * (q // kv), kv - r) if config.heads == "kv-groups" else (kv * (q // kv - r), kv)  # noqa: E731
    removed = uniform_attention_removal(units, config.attention_share)
    if _accepts(model.config, *saved(removed)) or not _accepts(model.config, q, kv):  # fine, or not the heads' fault
        return config, None
    fits = [r for r in range(units) if _accepts(model.config, *saved(r))]
    kind = model.config.model_type
    if config.attention_fraction is not None:
        raise WidthError(f"--attention-fraction {config.attention_fraction:g} leaves {saved(removed)[0]} query heads per "
                         f"block, which {kind}'s config refuses (hidden_size {model.config.hidden_size} must be a "
                         f"multiple): remove {', '.join(f'{r}/{units}' for r in fits)} of the {units} attention units")
    chosen = max(r for r in fits if r <= removed)
    config = replace(config, attention_fraction=chosen / units)
    return config, (f"{kind}'s config needs hidden_size ({model.config.hidden_size}) divisible by the query heads: "
                    f"{removed} of {units} attention units per block would leave {saved(removed)[0]}, so {chosen} go "
                    f"and the MLP channels make up the rest")


def block_parameters(model: nn.Module, adapter: Adapter) -> int:
    return sum(p.numel() for p in adapter.block_list(model).parameters())


def describe_widths(model: nn.Module, adapter: Adapter, widths: list[LayerWidth]) -> bool:
    """Make the config describe the blocks' `widths`: the stock config where they are uniform, a
    declaration for `trust_remote_code` loading otherwise (returns whether that was needed)."""
    if len(set(widths)) == 1:
        write_uniform_config(model, adapter.width, widths, head_dim(model.config))
        return False
    return declare_reshaped(model)


def _projection_names(width: Width, heads: bool) -> list[str]:
    names = [*width.mlp.producers, width.mlp.consumer]
    if heads:
        a = width.attention
        names += list(dict.fromkeys((a.q, a.k, a.v, a.o)))
    return names


@torch.no_grad()
def collect_moments(model: nn.Module, adapter: Adapter, names: list[str], calibration: Tensor, batch_size: int,
                    device: torch.device, start: BlockState | None = None,
                    observe: Observer | None = None) -> dict[str, Moments]:  # fmt: skip
    """Input moments of the named projections of every block (from `start`'s on), on the dense model."""
    return collect_input_stats(model, adapter, names, calibration, batch_size, device, Moments, "width statistics",
                               start=start, observe=observe)  # fmt: skip


def collect_gradients(model: nn.Module, adapter: Adapter, names: list[str], calibration: Tensor, batch_size: int,
                      device: torch.device) -> dict[str, Tensor]:  # fmt: skip
    """Calibration-loss gradients of the named projections' weights, as (out, in), summed over batches.
    Only those weights require gradients; the whole model sits on `device` for the backward pass."""
    layers = {f"{adapter.blocks}.{i}.{n}": submodule(b, n) for i, b in enumerate(adapter.block_list(model)) for n in names}
    layers = {k: m for k, m in layers.items() if m is not None}
    with weight_gradients(model, list(layers.values()), device):
        for batch in calibration.split(batch_size or len(calibration)):
            batch = batch.to(device)
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss * len(batch)
            loss.backward()
        return {k: reduce_tensor(m.weight.grad.T if isinstance(m, Conv1D) else m.weight.grad).float().cpu()
                for k, m in layers.items()}  # fmt: skip


@dataclass
class Statistics:
    """What scoring and compensation read from calibration, keyed by full layer name; one gathering
    on the dense model serves any number of configs (the benchmark prunes copies with it)."""

    moments: dict[str, Moments] = field(default_factory=dict)
    grads: dict[str, Tensor] = field(default_factory=dict)


def gather_statistics(model: nn.Module, calibration: Tensor, *, moments: bool, gradients: bool, heads: bool = True,
                      device: str | torch.device = "cpu", batch_size: int = 4, start: BlockState | None = None,
                      observe: Observer | None = None) -> Statistics:  # fmt: skip
    """`start` and `observe` as in `collect_input_stats` (moments only: gradients need the whole model)."""
    if gradients and (start is not None or observe is not None):
        raise ValueError("gradients come from whole forward and backward passes: no start state, no observer")
    adapter = adapter_for(model)
    names = _projection_names(adapter.width, heads and adapter.width.attention is not None)
    device = torch.device(device)
    return Statistics(
        collect_moments(model, adapter, names, calibration, batch_size, device, start, observe) if moments else {},
        collect_gradients(model, adapter, names, calibration, batch_size, device) if gradients else {},
    )


def _units(model: nn.Module, adapter: Adapter, width: Width, config: WidthConfig, statistics: Statistics) -> list[Units]:
    return [u for index, block in enumerate(adapter.block_list(model))
            for u in _block_units(model, adapter, width, config, statistics, index, block)]  # fmt: skip


def _block_units(model: nn.Module, adapter: Adapter, width: Width, config: WidthConfig, statistics: Statistics,
                 index: int, block: nn.Module) -> list[Units]:  # fmt: skip
    """Block `index`'s units (attention first, then MLP channels), scored on its weights and statistics."""
    size = head_dim(model.config)
    score = layer_scorer(block, f"{adapter.blocks}.{index}", IMPORTANCE[config.importance], statistics.moments,
                         statistics.grads, compensated=config.compensate)  # fmt: skip
    units = []
    heads = attention_heads(block, width.attention, size) if config.heads != "none" else None
    if heads is not None:
        units.append(attention_units(block, index, width.attention, size, *heads, config.heads, score))
    if submodule(block, width.mlp.consumer) is not None:
        units.append(mlp_units(block, index, width.mlp, score))
    return units


def scored_units(model: nn.Module, config: WidthConfig, calibration: Tensor | None, device: torch.device,
                 batch_size: int) -> tuple[Statistics, list[Units], Tensor | None]:  # fmt: skip
    """Statistics, every block's units and (with --hidden-fraction) the hidden channels' scores in one
    pass, each block scored while it is resident: what a model whose blocks stay on disk allows
    (`config` resolved by `resolve_variant`; gradients, which read the whole model, are not gathered)."""
    adapter = adapter_for(model)
    width, units, hidden = adapter.width, [], None
    importance = IMPORTANCE[config.importance]

    def score(index: int, block: nn.Module, moments: dict[str, Moments]) -> None:
        nonlocal units, hidden
        units += _block_units(model, adapter, width, config, Statistics(moments), index, block)
        if config.hidden_fraction:
            hidden = add_scores(hidden, block_hidden_scores(block, f"{adapter.blocks}.{index}", width, importance,
                                                            moments, {}))  # fmt: skip

    if not config.needs_moments:
        for index, block in each_block(model, adapter, device):
            score(index, block, {})
        return Statistics(), units, checked_scores(hidden) if config.hidden_fraction else None
    names = _projection_names(width, config.heads != "none" or config.hidden_fraction > 0)
    moments = collect_input_stats(model, adapter, names, calibration, batch_size, device, Moments, "width statistics",
                                  after=score)  # fmt: skip
    return Statistics(moments), units, checked_scores(hidden) if config.hidden_fraction else None


@dataclass(frozen=True)
class Refit:
    """Least-squares reconstruction of the output projections, on these calibration windows."""

    calibration: Tensor
    damp: float
    batch_size: int
    device: torch.device


@torch.no_grad()
def _apply(model: nn.Module, adapter: Adapter, width: Width, units: list[Units], removals: dict,
           means: dict[str, Tensor], compensate_bias: bool, on_slice: Sliced | None = None,
           refit: Refit | None = None, device: torch.device | None = None) -> list[dict]:  # fmt: skip
    """Slice every unit's removals (`means`: the consumers' input means, by layer name, for bias
    compensation); with `refit`, block by block on the model as pruned so far, each output projection
    refitted first (returns the refits' records). Where the blocks stay on disk, each block is read,
    cut and written in turn (on `device`); blocks an interrupted run wrote are cut in shape only."""
    if compensate_bias:
        for kind in {u.kind for u in units if removals[(u.block, u.kind)]}:
            enable_biases(model, adapter, kind)
    todo = [u for u in units if removals[(u.block, u.kind)]]
    cuts: dict[int, list] = {}
    for u in todo:  # attention before the MLP within a block (the order `_units` lists them in)
        cut = _cutter(model, adapter, width, u, removals[(u.block, u.kind)], means, compensate_bias, on_slice,
                      refit.damp if refit else None)  # fmt: skip
        cuts.setdefault(u.block, []).append((width.mlp.consumer if u.kind == "mlp" else width.attention.o, cut))
    store, resumed, done = disk_store(model), None, set()
    if store is not None and refit is not None:  # the refit goes on from its saved activations
        resumed = store.resume_point()
        done = set(range(resumed["index"])) if resumed else set()
    elif store is not None:  # plain cuts: every block written before is done
        done = store.written()
    blocks = adapter.block_list(model)
    for index in done:  # on the meta device: the shapes the written block has
        for _, cut in cuts.get(index, []):
            cut(blocks[index], None, shape_only=True)
    if refit is not None:
        return stream_refits(model, adapter, cuts, refit.calibration, refit.batch_size, refit.device, resumed)
    for index, block in each_block(model, adapter, device or torch.device("cpu"), skip=done):
        for _, cut in cuts.get(index, []):
            cut(block, None)
    return []


def _cutter(model: nn.Module, adapter: Adapter, width: Width, u: Units, removed: int, means: dict[str, Tensor],
            compensate_bias: bool, on_slice: Sliced | None, damp: float | None) -> Cut:  # fmt: skip
    """The cut of one unit's removals: given the block (and the Gram of its consumer's inputs, when
    refitting), refit the consumer or fold the removed channels' mean into its bias, then slice
    (`shape_only`: slice alone, on a block whose weights are elsewhere)."""
    size, prefix = head_dim(model.config), f"{adapter.blocks}.{u.block}"

    def cut(block: nn.Module, gram: Hessian | None, shape_only: bool = False) -> dict:
        if u.kind == "mlp":
            keep = u.keep(removed)
            name, columns = width.mlp.consumer, keep
        else:
            q_keep, kv_keep = head_keep(u, removed, *attention_heads(block, width.attention, size))
            name, columns = width.attention.o, head_rows(q_keep, size)
        consumer, record = block.get_submodule(name), {}
        if shape_only:
            pass
        elif gram is not None:
            record = refit_layer(consumer, columns, gram, damp)
        elif compensate_bias:
            gone = _complement(columns, read_weight(consumer).shape[1])
            compensate(consumer, gone, means[f"{prefix}.{name}"])
        if u.kind == "mlp":
            keep_channels(block, width.mlp, keep, on_slice)
        else:
            keep_heads(block, width.attention, size, q_keep, kv_keep, on_slice)
        return record

    return cut


def _saved_heads(model: nn.Module, config: WidthConfig, units: list[Units]) -> int:
    """The query-head count the saved config will hold (stock configs want hidden_size divisible by it)."""
    q, kv = model.config.num_attention_heads, model.config.num_key_value_heads
    attention = next((u for u in units if u.kind == "attention"), None)
    if config.allocation != "uniform" or attention is None:
        return q  # adaptive widths keep the original config; secateur.load reshapes the blocks
    removed = uniform_attention_removal(len(attention.scores), config.attention_share)
    return (kv - removed) * (q // kv) if config.heads == "kv-groups" else kv * (q // kv - removed)


def _prune_hidden(model: nn.Module, adapter: Adapter, width: Width, config: WidthConfig, statistics: Statistics,
                  units: list[Units], target: float) -> int:  # fmt: skip
    """Slice the lowest-scoring hidden channels (scores on the dense model); re-cost the head and MLP
    units at the new hidden size. Returns the block parameters removed; refuses, before touching the
    model, a hidden share above the `target`."""
    scores = hidden_scores(model, adapter, IMPORTANCE[config.importance], statistics.moments, statistics.grads)
    keep, removed = hidden_keep(model, adapter, config, scores, units, target)
    keep_hidden(model, adapter, keep)
    recost(model, adapter, width, config, units)
    return removed


def hidden_keep(model: nn.Module, adapter: Adapter, config: WidthConfig, scores: Tensor, units: list[Units],
                target: float) -> tuple[Tensor, int]:  # fmt: skip
    """The hidden channels kept (ascending: the highest `scores`) and the block parameters the others
    hold; refuses a hidden share above the `target` (shapes only: works on a model on the meta device)."""
    kept = hidden_count(len(scores), config.hidden_fraction, math.lcm(config.hidden_multiple, _saved_heads(model, config, units)))
    removed = (len(scores) - kept) * hidden_channel_parameters(model, adapter)
    if removed > target:
        raise WidthError(f"--hidden-fraction {config.hidden_fraction:g} alone removes more than --remove-fraction "
                         f"{config.fraction:g} of the block parameters; raise --remove-fraction")
    return scores.argsort()[len(scores) - kept:].sort().values, removed


def recost(model: nn.Module, adapter: Adapter, width: Width, config: WidthConfig, units: list[Units]) -> None:
    """Each unit's parameter count at the blocks' shapes now (after the hidden cut; shapes only: works
    on blocks on the meta device)."""
    size, blocks = head_dim(model.config), adapter.block_list(model)
    for unit in units:
        block = blocks[unit.block]
        unit.cost = (mlp_cost(block, width.mlp) if unit.kind == "mlp" else
                     attention_cost(block, width.attention, size, *attention_heads(block, width.attention, size),
                                    config.heads))  # fmt: skip


def shape_units(model: nn.Module, config: WidthConfig) -> tuple[WidthConfig, list[Units]]:
    """Every block's units as `config` counts them (attention units, MLP channels) with the parameters
    one unit holds, for allocation from shapes alone (scores are weight magnitudes: no data); and the
    config with its head mode resolved."""
    adapter = adapter_for(model)
    config, _ = resolve_variant(model, adapter, replace(config, importance="magnitude", bias_compensation=False))
    return config, _units(model, adapter, width_of(model, adapter, config), config, Statistics())


def uniform_widths(model: nn.Module, config: WidthConfig, attention_units: int | None = None) -> list[LayerWidth]:
    """The widths uniform allocation of `config.fraction` gives `model` (shapes only: no data, no scores);
    `attention_units`: remove that many attention units per block instead (the MLP makes up the rest)."""
    adapter = adapter_for(model)
    config, units = shape_units(model, config)
    share = config.attention_share
    attention = next((u for u in units if u.kind == "attention"), None)
    if attention_units is not None and attention is not None:
        share = attention_units / len(attention.scores)  # what uniform_removals reads the attention count from
    removals = uniform_removals(units, share, config.fraction * block_parameters(model, adapter), config.mlp_multiple)
    now = widths_of(model, adapter)
    counts = {(b, kind): unit_count(now[b], kind, config.heads) - gone for (b, kind), gone in removals.items() if gone}
    return with_unit_counts(now, counts, config.heads)


def _check_attention_share(config: WidthConfig, units: list[Units], target: float) -> None:
    """--attention-fraction must leave the MLP something to remove (the config has refused it without heads)."""
    if config.attention_fraction is None or config.allocation != "uniform":
        return
    attention = sum(uniform_attention_removal(len(u.scores), config.attention_share) * u.cost
                    for u in units if u.kind == "attention")
    if attention > target:
        raise WidthError(f"--attention-fraction {config.attention_fraction} removes {attention / 1e6:.2f}M attention "
                         f"parameters, more than the {target / 1e6:.2f}M that --remove-fraction {config.fraction} "
                         f"allows: lower it")


def _complement(keep: Tensor, n: int) -> Tensor:
    mask = torch.ones(n, dtype=torch.bool)
    mask[keep] = False
    return mask.nonzero().flatten()


def width_prune(model: nn.Module, config: WidthConfig, calibration: Tensor | None, *,
                device: str | torch.device = "cpu", batch_size: int = 4, statistics: Statistics | None = None,
                widths: list[LayerWidth] | None = None, on_slice: Sliced | None = None) -> WidthReport:  # fmt: skip
    """Prune heads, MLP channels and (if asked) hidden channels of `model` in place; the config follows
    the new shapes.
    `statistics` gathered beforehand on this (dense) model replace the calibration passes. `widths`:
    prune every block down to these widths (its lowest-scoring units go) instead of allocating
    `config.fraction` (a schedule that decides the shapes itself, e.g. incremental pruning during
    training). `on_slice` is told of every parameter replaced (see `slice_layer`)."""
    adapter = adapter_for(model)
    config, variant = resolve_variant(model, adapter, config)
    width = width_of(model, adapter, config)
    device = torch.device(device)
    calibration = share(calibration)  # this process's windows (all of them in one process)
    model.eval()
    start = time.perf_counter()
    if widths is None and config.attention_fraction is not None:  # before any calibration pass (shapes only)
        _check_attention_share(config, shape_units(model, config)[1], config.fraction * block_parameters(model, adapter))
    report = new_report(model, adapter, config, variant)
    check_calibration(config, calibration, gathered=statistics is not None)
    if statistics is None:
        statistics = gather_statistics(model, calibration, moments=config.needs_moments,
                                       gradients=IMPORTANCE[config.importance].gradients,
                                       heads=config.heads != "none" or config.hidden_fraction > 0,
                                       device=device, batch_size=batch_size)  # fmt: skip
    units = _units(model, adapter, width, config, statistics)
    target = config.fraction * report.block_parameters_before
    if config.hidden_fraction:
        target -= _prune_hidden(model, adapter, width, config, statistics, units, target)
        report.hidden_after = model.config.hidden_size
    removals = allocate(config, units, target, report.before, widths)
    refit = Refit(calibration, config.damp, batch_size, device) if config.reconstruct else None
    report.reconstruction = _apply(model, adapter, width, units, removals, means_of(statistics), config.compensate,
                                   on_slice, refit)  # fmt: skip
    return finish_report(model, adapter, report, start)


def check_calibration(config: WidthConfig, calibration: Tensor | None, gathered: bool = False) -> None:
    """Calibration is there where the run reads it (`gathered`: the statistics were given)."""
    has_calibration = calibration is not None and calibration.ndim == 2 and len(calibration) > 0
    if config.reconstruct and not has_calibration:
        raise WidthError("--reconstruct refits on calibration: pass a (samples, seq_len) tensor of token ids")
    if not gathered and config.needs_calibration and not has_calibration:
        raise WidthError(f"{config.importance} importance needs calibration: a (samples, seq_len) tensor of token ids")


def new_report(model: nn.Module, adapter: Adapter, config: WidthConfig, variant: str | None) -> WidthReport:
    """The report's figures before any cut (`config` resolved)."""
    return WidthReport(before=widths_of(model, adapter), block_parameters_before=block_parameters(model, adapter),
                       head_dim=head_dim(model.config), bias_compensation=config.compensate, heads=config.heads,
                       variant=variant, hidden_before=model.config.hidden_size,
                       hidden_after=model.config.hidden_size)  # fmt: skip


def allocate(config: WidthConfig, units: list[Units], target: float, before: list[LayerWidth],
             widths: list[LayerWidth] | None = None) -> dict[tuple[int, str], int]:  # fmt: skip
    """How many units each block loses: down to `widths` where given, else `target` parameters by the
    config's allocation."""
    if widths is not None:
        if config.hidden_fraction:
            raise WidthError("pruning to given widths keeps the hidden size: drop --hidden-fraction")
        return removals_to(units, before, widths)
    if config.allocation == "uniform":
        removals = uniform_removals(units, config.attention_share, target, config.mlp_multiple)
        _check_attention_share(config, units, target)
        return removals
    return adaptive_removals(units, target, config.mlp_multiple)


def means_of(statistics: Statistics) -> dict[str, Tensor]:
    return {name: moments.mean for name, moments in statistics.moments.items()}


def finish_report(model: nn.Module, adapter: Adapter, report: WidthReport, start: float) -> WidthReport:
    """The widths after the cuts, described in the config; the report completed."""
    report.after = widths_of(model, adapter)
    report.uniform = len(set(report.after)) == 1
    report.remote_code = describe_widths(model, adapter, report.after)
    report.block_parameters_after = block_parameters(model, adapter)
    report.seconds = time.perf_counter() - start
    return report
