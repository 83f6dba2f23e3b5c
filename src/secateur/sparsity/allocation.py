"""Layer-wise sparsity allocation: how an overall target is spread over the layers.

Pure functions turn per-layer (or per-block) evidence into per-layer prune *counts* whose sum is
exactly round(target * total weights), whatever the allocation; `allocate_targets` gathers that
evidence (input norms on the dense model, one streamed pass) when an allocation needs it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from secateur.calibrate.stats import InputNormSq
from secateur.calibrate.stream import collect_input_stats, each_block
from secateur.config import AllocationConfig, ConfigError, PruneConfig, Target, Unstructured
from secateur.models import Adapter, read_weight
from secateur.sparsity.masks import prune_count
from secateur.sparsity.methods import wanda_scores

SAMPLE = 1 << 16  # scores kept per layer for the global ranking (a seeded random subset, sorted)


@dataclass(frozen=True)
class LayerInfo:
    name: str  # qualified name, as in the engine and the manifest
    block: int
    kind: str  # "attention" or "mlp"
    size: int  # number of weights


def exact_counts(fractions: list[float], sizes: list[int], total: int) -> list[int]:
    """Integer counts near fractions * sizes that add up to exactly `total` (largest remainders;
    ties to the lower index), each within [0, size]."""
    raw = [min(max(f, 0.0), 1.0) * n for f, n in zip(fractions, sizes)]
    counts = [int(math.floor(r)) for r in raw]
    deficit = total - sum(counts)
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    while deficit > 0:
        moved = False
        for i in order:
            if deficit and counts[i] < sizes[i]:
                counts[i] += 1
                deficit -= 1
                moved = True
        if not moved:
            raise ConfigError(f"cannot remove {total} weights from layers holding {sum(sizes)}")
    for i in reversed(order):  # too many (fractions summed above the target): take from the smallest remainders
        while deficit < 0 and counts[i] > 0:
            counts[i] -= 1
            deficit += 1
    return counts


def outlier_ratio(scores: list[Tensor], m: float) -> float:
    """OWL's layer outlier ratio: the share of scores above m times their mean (all of the block's layers together)."""
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    return float((flat > m * flat.mean()).float().mean())


def owl_sparsities(ratios: list[float], target: float, lam: float, sizes: list[int] | None = None) -> list[float]:
    """Per-block sparsity: outlier ratios mapped linearly onto a keep-ratio range of width 2 * lam,
    centred so the size-weighted mean sparsity is the target; more outliers -> less pruning."""
    r = torch.tensor(ratios, dtype=torch.float64)
    w = torch.tensor(sizes if sizes else [1] * len(ratios), dtype=torch.float64)
    if len(ratios) == 0 or float(r.max() - r.min()) == 0.0:
        return [target] * len(ratios)
    keep = (r - r.min()) / (r.max() - r.min()) * 2 * lam
    keep = keep - (keep * w).sum() / w.sum() + (1 - target)
    return [float(1 - k) for k in keep]


def global_fractions(samples: list[Tensor], sizes: list[int], target: float, cap: float) -> list[float]:
    """One threshold t over all layers' scores: layer l loses the share of its scores below t (read
    from its sorted sample), at most `cap`; t is chosen so the losses add up to target * total."""
    goal = target * sum(sizes)

    def removed(t: float) -> list[float]:
        return [min(float(torch.searchsorted(s, t)) / len(s), cap) if len(s) else 0.0 for s in samples]

    lo = min(float(s[0]) for s in samples if len(s))
    hi = max(float(s[-1]) for s in samples if len(s))
    hi = math.nextafter(hi, math.inf)
    for _ in range(100):
        mid = (lo + hi) / 2
        if sum(f * n for f, n in zip(removed(mid), sizes)) < goal:
            lo = mid
        else:
            hi = mid
    fractions = removed(hi)
    if sum(f * n for f, n in zip(fractions, sizes)) < goal - 1:
        raise ConfigError(f"global allocation cannot reach sparsity {target} with no layer above {cap}; raise max_layer_sparsity")
    return fractions


def sorted_sample(scores: Tensor, generator: torch.Generator) -> Tensor:
    flat = scores.reshape(-1).float()
    if flat.numel() > SAMPLE:
        flat = flat[torch.randint(flat.numel(), (SAMPLE,), generator=generator)]
    return flat.sort().values.cpu()


def split_target(layers: list[LayerInfo], target: float, config: AllocationConfig) -> tuple[dict[str, float], float]:
    """Pinned sparsities of the module types named in `config.module_sparsity`, and the sparsity the
    other layers need so that the total stays at `target`."""
    pinned_kinds = dict(config.module_sparsity)
    pinned = {layer.name: pinned_kinds[layer.kind] for layer in layers if layer.kind in pinned_kinds}
    total = sum(layer.size for layer in layers)
    rest = sum(layer.size for layer in layers if layer.name not in pinned)
    removed = sum(pinned[layer.name] * layer.size for layer in layers if layer.name in pinned)
    if rest == 0:
        if abs(removed - target * total) > 1:
            raise ConfigError(f"module sparsity {dict(pinned_kinds)} covers every layer but does not average to {target}")
        return pinned, target
    rest_target = (target * total - removed) / rest
    if not 0 <= rest_target < 1:
        raise ConfigError(
            f"module sparsity {dict(pinned_kinds)} leaves the other layers at sparsity {rest_target:.3f} to reach "
            f"{target}; choose values that keep it in [0, 1)"
        )
    return pinned, rest_target


def allocate(layers: list[LayerInfo], target: float, config: AllocationConfig,
             outliers: dict[int, float] | None = None, samples: dict[str, Tensor] | None = None) -> dict[str, int]:
    """Per-layer prune counts adding up to exactly round(target * total)."""
    pinned, rest_target = split_target(layers, target, config)
    free = [layer for layer in layers if layer.name not in pinned]
    fractions = {name: value for name, value in pinned.items()}
    if config.kind == "uniform" or not free:
        fractions.update({layer.name: rest_target for layer in free})
    elif config.kind == "owl":
        blocks = sorted({layer.block for layer in free})
        sizes = [sum(layer.size for layer in free if layer.block == b) for b in blocks]
        per_block = dict(zip(blocks, owl_sparsities([outliers[b] for b in blocks], rest_target, config.owl_lambda, sizes)))
        fractions.update({layer.name: per_block[layer.block] for layer in free})
    elif config.kind == "global":
        cap = config.max_layer_sparsity or rest_target + (1 - rest_target) / 2
        if cap < rest_target:
            raise ConfigError(f"max_layer_sparsity {cap} is below the sparsity {rest_target:.3f} the layers must reach")
        shares = global_fractions([samples[layer.name] for layer in free], [layer.size for layer in free], rest_target, cap)
        fractions.update({layer.name: f for layer, f in zip(free, shares)})
    total = prune_count(sum(layer.size for layer in layers), target)
    counts = exact_counts([fractions[layer.name] for layer in layers], [layer.size for layer in layers], total)
    return {layer.name: count for layer, count in zip(layers, counts)}


# --- gathering the evidence on the dense model -------------------------------------------------


def layer_infos(layers: list[tuple[str, nn.Module]], adapter: Adapter) -> list[LayerInfo]:
    prefix = adapter.blocks + "."
    infos = []
    for name, module in layers:
        block, _, relative = name[len(prefix):].partition(".")
        rows, cols = read_weight(module).shape
        infos.append(LayerInfo(name, int(block), adapter.module_type(relative), rows * cols))
    return infos


@torch.no_grad()
def allocate_targets(
    model: nn.Module,
    adapter: Adapter,
    layers: list[tuple[str, nn.Module]],
    config: PruneConfig,
    score: Callable[[Any, Tensor, Tensor | None], Tensor],
    calibration: Tensor | None,
    device: torch.device,
    batch_size: int,
    needs_norms: bool,
) -> tuple[dict[str, Target], dict[str, Any]]:
    """Each layer's target and a summary for the manifest. N:M and uniform allocations need no data;
    OWL needs the input norms of the dense model; global needs them when the method's score does."""
    if not isinstance(config.target, Unstructured):
        return {name: config.target for name, _ in layers}, {"kind": "uniform"}
    alloc = config.allocation
    infos = layer_infos(layers, adapter)
    if alloc.is_uniform:  # no data needed; the counts still add up exactly
        counts = allocate(infos, config.target.sparsity, alloc)
        return {i.name: Unstructured(counts[i.name] / i.size) for i in infos}, {"kind": "uniform"}
    pinned, _ = split_target(infos, config.target.sparsity, alloc)
    modules = dict(layers)
    outliers: dict[int, float] = {}
    samples: dict[str, Tensor] = {}
    generator = torch.Generator().manual_seed(0)

    def evidence(block: int, norms: dict[str, Tensor]) -> None:
        """Block `block`'s outlier ratio (OWL) or score samples (global), from its weights while they are
        resident (a pass over a model on disk holds one block at a time), on the CPU like the norms."""
        free = [info for info in infos if info.block == block and info.name not in pinned]
        if not free:
            return
        weights = {i.name: read_weight(modules[i.name]).to("cpu") for i in free}
        if alloc.kind == "owl":
            outliers[block] = outlier_ratio([wanda_scores(weights[i.name], norms[i.name]) for i in free], alloc.owl_m)
        elif alloc.kind == "global":
            for info in free:
                samples[info.name] = sorted_sample(score(config.method, weights[info.name], norms.get(info.name)),
                                                   generator)  # fmt: skip

    blocks = sorted({info.block for info in infos})
    if alloc.kind == "owl" or (alloc.kind == "global" and needs_norms):
        if calibration is None:
            raise ConfigError(f"allocation {alloc.kind!r} needs calibration data (input norms of the dense model)")
        # each block's evidence as soon as the pass has its norms, in block order
        dense_input_norms(model, adapter, layers, calibration, device, batch_size,
                          after=lambda index, norms: evidence(index, norms) if index in blocks else None)  # fmt: skip
    elif alloc.kind == "global":  # scores from the weights alone: a look at each block
        for index, _ in each_block(model, adapter, device, skip=set(range(len(adapter.block_list(model)))) - set(blocks)):
            evidence(index, {})
    counts = allocate(infos, config.target.sparsity, alloc, outliers, samples)
    targets = {info.name: Unstructured(counts[info.name] / info.size) for info in infos}
    summary = {"kind": alloc.kind, "outlier_ratios": {str(b): r for b, r in outliers.items()} or None,
               "layer_sparsity": {info.name: counts[info.name] / info.size for info in infos}}  # fmt: skip
    return targets, summary


def dense_input_norms(model: nn.Module, adapter: Adapter, layers: list[tuple[str, nn.Module]], calibration: Tensor,
                      device: torch.device, batch_size: int,
                      after: Callable[[int, dict[str, Tensor]], None] | None = None) -> dict[str, Tensor]:  # fmt: skip
    """||X_j||_2 of every target layer's input on the dense model (one streamed pass, no pruning);
    `after(block, norms so far)` once each block ran, while it is resident."""
    wanted = {name for name, _ in layers}
    relative = sorted({name.removeprefix(f"{adapter.blocks}.").split(".", 1)[1] for name in wanted})  # "3.mlp.x" -> "mlp.x"
    norms = lambda stats: {name: stat.norm.cpu() for name, stat in stats.items() if name in wanted}  # noqa: E731
    stats = collect_input_stats(model, adapter, relative, calibration, batch_size, device, InputNormSq, "input norms",
                                after=None if after is None else lambda index, _, stats: after(index, norms(stats)))  # fmt: skip
    return norms(stats)
