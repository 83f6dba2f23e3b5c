"""Depth methods: the registry binding each config type to its search and to the unit it removes."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import Tensor, nn

from secateur.calibrate.processes import require_single
from secateur.config import ConfigError
from secateur.depth.compensate import compensate, unavailable
from secateur.depth.config import (
    Amount,
    AngularConfig,
    BlockInfluenceConfig,
    DepthConfig,
    FinerCutConfig,
    GreedyLossConfig,
)
from secateur.depth.search import (
    Selection,
    budget_for,
    count_for,
    select_angular_span,
    select_block_influence,
    select_finercut,
    select_greedy_loss,
)
from secateur.depth.structure import KINDS, DepthError, branch_parameters, is_removed, remove_blocks, remove_sublayers
from secateur.models import Adapter, adapter_for

log = logging.getLogger(__name__)

# (model, adapter, method config, amount, calibration, batch size, device, protected blocks) -> selection
Search = Callable[[nn.Module, Adapter, object, Amount, Tensor, int, torch.device, frozenset[int]], Selection]


@dataclass(frozen=True)
class DepthSpec:
    name: str
    config_type: type
    unit: str  # "block" or "sublayer"
    search: Search
    calib_samples: int  # default calibration windows: one-pass scores are cheap, greedy searches are not
    calib_seq_len: int


def _blocks(model: nn.Module, adapter: Adapter, amount: Amount, protected: frozenset[int]) -> int:
    blocks = len(adapter.block_list(model))
    count = count_for(amount.count, amount.fraction, blocks)
    if count >= blocks:
        raise ConfigError(f"cannot remove {count} of {blocks} blocks; keep at least one")
    if count > blocks - len(protected):
        raise ConfigError(f"cannot remove {count} of {blocks} blocks with blocks {sorted(protected)} kept (the final "
                          "block, and global-attention blocks with --keep-full-attention); ask for fewer, or pass "
                          "--remove-last")
    return count


def _bi(model, adapter, method, amount, calibration, batch_size, device, protected) -> Selection:
    count = _blocks(model, adapter, amount, protected)
    return select_block_influence(model, adapter, calibration, count, batch_size, device, protected)


def _angular(model, adapter, method, amount, calibration, batch_size, device, protected) -> Selection:
    return select_angular_span(model, adapter, calibration, _blocks(model, adapter, amount, protected), batch_size,
                               device, positions=method.positions, protected=protected)  # fmt: skip


def _greedy(model, adapter, method, amount, calibration, batch_size, device, protected) -> Selection:
    count = _blocks(model, adapter, amount, protected)
    return select_greedy_loss(model, adapter, calibration, count, batch_size, device, protected)


def _finercut(model, adapter, method, amount, calibration, batch_size, device, protected) -> Selection:
    budget = budget_for(model, adapter, amount.fraction) if amount.fraction is not None else None
    _check_removable(model, adapter, amount.count, budget, protected)
    return select_finercut(model, adapter, calibration, amount.count, budget, batch_size, device, protected)


def _check_removable(model: nn.Module, adapter: Adapter, count: int | None, budget: int | None,
                     protected: frozenset[int]) -> None:  # fmt: skip
    """FinerCut keeps one attention branch: refuse a request beyond what the other branches hold."""
    blocks = adapter.block_list(model)
    sizes = {(i, k): branch_parameters(b, adapter, k) for i, b in enumerate(blocks) for k in KINDS
             if not is_removed(b, adapter, k) and i not in protected}  # fmt: skip
    attention = [n for (_, k), n in sizes.items() if k == "attention"]
    kept = any(not is_removed(blocks[i], adapter, "attention") for i in protected)  # a kept block's attention stays
    reserve = 0 if kept or not attention else min(attention)
    most, limit = sum(sizes.values()) - reserve, len(sizes) - (0 if kept else bool(attention))
    if count is not None and count > limit:
        raise DepthError(f"finercut can remove at most {limit} of the branches left (one attention stays, and those "
                         f"of the kept blocks {sorted(protected)}); --remove-sublayers {count} asks for more")
    if budget is not None and budget > most:
        raise DepthError(f"--remove-fraction asks for {budget:,} parameters, more than the {most:,} that the removable "
                         "branches hold (one attention stays); lower it")


REGISTRY: dict[str, DepthSpec] = {
    spec.name: spec
    for spec in (
        DepthSpec(BlockInfluenceConfig.name, BlockInfluenceConfig, "block", _bi, 16, 512),
        DepthSpec(AngularConfig.name, AngularConfig, "block", _angular, 16, 512),
        DepthSpec(GreedyLossConfig.name, GreedyLossConfig, "block", _greedy, 8, 256),
        DepthSpec(FinerCutConfig.name, FinerCutConfig, "sublayer", _finercut, 4, 256),
    )
}


def spec_of(config: DepthConfig) -> DepthSpec:
    return REGISTRY[config.method.name]


@torch.no_grad()
def select_removals(model: nn.Module, config: DepthConfig, calibration: Tensor, *,
                    device: str | torch.device = "cpu", batch_size: int = 4) -> Selection:
    """Choose the blocks or branches to remove from calibration data; the model is left as it was."""
    spec = spec_of(config)
    if calibration is None or calibration.ndim != 2 or len(calibration) == 0:
        raise ConfigError(f"method {spec.name!r} needs calibration: a (samples, seq_len) tensor of token ids")
    model.eval()
    start = time.perf_counter()
    protected = protected_blocks(model, config)
    selection = spec.search(model, adapter_for(model), config.method, config.amount, calibration, batch_size,
                            torch.device(device), protected)  # fmt: skip
    selection.seconds = time.perf_counter() - start
    selection.kept = sorted(protected)
    return selection


FULL_ATTENTION = "full_attention"  # transformers' name for a global layer in `config.layer_types`


def protected_blocks(model: nn.Module, config: DepthConfig) -> frozenset[int]:
    """Blocks no search may remove: the final one (unless `remove_last`), and with `keep_full_attention`
    every global-attention block of a family that mixes sliding-window and global layers."""
    blocks = model.config.num_hidden_layers
    protected = set() if config.remove_last else {blocks - 1}
    if config.keep_full_attention:
        types = getattr(model.config, "layer_types", None)
        if not types or len(set(types)) < 2:
            raise ConfigError(f"--keep-full-attention keeps the global-attention blocks of a family that mixes "
                              f"sliding-window and global layers; {model.config.model_type} does not")
        protected |= {i for i, kind in enumerate(types) if kind == FULL_ATTENTION}
    return frozenset(protected)


def resolve_compensation(model: nn.Module, config: DepthConfig, after_sparsity: bool = False) -> tuple[DepthConfig, str | None]:
    """`compensate` left to its default (None) made definite: on for block methods where the fit can
    fold into the family's layers and no earlier sparsity stage (`after_sparsity`) has zeros it would
    fill, off elsewhere. Returns the config and, where it is off although the method could use it,
    the reason (also logged)."""
    if config.compensate is not None:
        return config, None
    if spec_of(config).unit != "block":  # not applicable: left as None
        return config, None
    why = unavailable(adapter_for(model))
    if why is None and after_sparsity:
        why = "an earlier sparsity stage left zeros that the dense re-fit would fill"
    if why is not None:
        log.warning("depth: compensation off: %s", why)
    return replace(config, compensate=why is None), why


def depth_prune(model: nn.Module, config: DepthConfig, calibration: Tensor, *, device: str | torch.device = "cpu",
                batch_size: int = 4) -> Selection:
    """Choose the blocks or branches to remove from calibration data, compensate (see
    `resolve_compensation` for the default), then remove them in place."""
    require_single("depth pruning")
    config, why = resolve_compensation(model, config)
    selection = select_removals(model, config, calibration, device=device, batch_size=batch_size)
    selection.compensated, selection.variant = config.compensate, why
    if config.compensate:
        start = time.perf_counter()
        selection.compensation = compensate(model, adapter_for(model), selection.blocks, calibration, batch_size,
                                            torch.device(device), config.compensate_damp)  # fmt: skip
        selection.seconds += time.perf_counter() - start
    apply_selection(model, adapter_for(model), selection)
    return selection


def apply_selection(model: nn.Module, adapter: Adapter, selection: Selection) -> None:
    """Remove the chosen branches, then the chosen blocks; a block that lost both branches is removed
    whole (a stock layer fewer instead of two skipped branches)."""
    chosen = set(selection.sublayers)
    emptied = {i for i, _ in chosen if all((i, kind) in chosen for kind in KINDS)}
    remove_sublayers(model, adapter, sorted(u for u in chosen if u[0] not in emptied))
    blocks = sorted(set(selection.blocks) | emptied)
    if blocks:
        remove_blocks(model, adapter, blocks)
