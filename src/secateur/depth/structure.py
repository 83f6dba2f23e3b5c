"""Depth surgery: remove whole decoder blocks, or a block's attention / MLP branch.

Whole blocks are physically deleted, the remaining blocks renumbered (each attention's `layer_idx`
indexes the KV cache) and every per-block config list (`layer_types`, ...) sliced with them, so the
result is a stock model of fewer layers.

A removed branch is replaced by `Removed` modules that compute nothing: the branch adds a scalar
zero to the residual stream. A removed attention still counts the tokens it has seen in the KV cache
(with zero-width keys and values, no memory), so cache positions and masks stay right even when the
first block's attention is gone.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

from torch import Tensor, nn

from secateur.errors import SecateurError
from secateur.models import Adapter

KINDS = ("attention", "mlp")
Sublayer = tuple[int, str]  # (block index, "attention" | "mlp")


class DepthError(SecateurError):
    """A removal request does not fit the model (index out of range, nothing left, ...)."""


# --- whole blocks ------------------------------------------------------------------------------------


def remove_blocks(model: nn.Module, adapter: Adapter, indices: Sequence[int]) -> None:
    """Delete blocks `indices` in place; renumber the rest and update the config to match."""
    blocks = adapter.block_list(model)
    drop = sorted(set(indices))
    if any(not 0 <= i < len(blocks) for i in drop):
        raise DepthError(f"block indices {drop} out of range for a model of {len(blocks)} blocks")
    if len(drop) >= len(blocks):
        raise DepthError(f"cannot remove all {len(blocks)} blocks; keep at least one")
    keep = [i for i in range(len(blocks)) if i not in drop]
    kept = [blocks[i] for i in keep]
    for new_index, block in enumerate(kept):
        _renumber(block, new_index)
    parent, _, name = adapter.blocks.rpartition(".")
    model.get_submodule(parent)._modules[name] = nn.ModuleList(kept)
    config = model.config
    for name in adapter.per_layer_config:
        values = getattr(config, name, None)
        if isinstance(values, (list, tuple)) and len(values) == len(blocks):
            setattr(config, name, [values[i] for i in keep])
    if adapter.experts is not None:  # which of the kept blocks are dense, renumbered
        adapter.experts.sync_layers(config, model.get_submodule(adapter.blocks))
    config.num_hidden_layers = len(kept)


def _renumber(block: nn.Module, index: int) -> None:
    """Every submodule that knows its block's index (attention's KV-cache slot, ...) gets the new one."""
    for module in block.modules():
        if isinstance(getattr(module, "layer_idx", None), int):
            module.layer_idx = index


# --- attention / MLP branches ------------------------------------------------------------------------


class Removed(nn.Module):
    """Stands in for a module of a removed branch and computes nothing: the branch's main module
    returns a scalar zero (added to the residual stream), its norms pass their input through."""

    def __init__(self, kind: str, main: bool = True) -> None:
        super().__init__()
        self.kind, self.main = kind, main

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        hidden = args[0] if args else kwargs.get("hidden_states")
        return hidden.new_zeros(()) if self.main else hidden

    def extra_repr(self) -> str:
        return f"removed {self.kind} branch" + ("" if self.main else " (pass-through)")


class RemovedAttention(Removed):
    """A removed attention: returns (0, None) like an attention module, and advances the KV cache's
    token count for its block with zero-width keys and values (the model reads positions from it)."""

    def __init__(self, layer_idx: int | None) -> None:
        super().__init__("attention")
        self.layer_idx = layer_idx

    def forward(self, *args: Any, **kwargs: Any) -> tuple[Tensor, None]:
        hidden = args[0] if args else kwargs["hidden_states"]  # (batch, seq, hidden)
        cache = next((kwargs[k] for k in ("cache", "past_key_values", "layer_past") if kwargs.get(k) is not None), None)
        if cache is not None and self.layer_idx is not None and hasattr(cache, "update"):
            empty = hidden.new_zeros(hidden.shape[0], 1, hidden.shape[1], 0)  # (batch, 1 head, seq, 0)
            cache.update(empty, empty, self.layer_idx)
        return hidden.new_zeros(()), None


def _check_branches(block: nn.Module) -> None:
    if getattr(block, "do_layer_norm_before", True) is False:  # OPT-350m: norms sit on the residual stream
        raise DepthError("this model normalises the residual stream after each branch, so a branch cannot be "
                         "dropped on its own; remove whole blocks instead")


def _replacement(block: nn.Module, name: str, kind: str, adapter: Adapter) -> nn.Module:
    main = name == adapter.branches.of(kind)[0]
    if kind == "attention" and main:
        return RemovedAttention(getattr(block.get_submodule(name), "layer_idx", None))
    return Removed(kind, main)


def _swap(block: nn.Module, name: str, module: nn.Module) -> nn.Module:
    parent_name, _, child = name.rpartition(".")
    parent = block.get_submodule(parent_name) if parent_name else block
    old = parent._modules[child]
    parent._modules[child] = module
    return old


def remove_sublayers(model: nn.Module, adapter: Adapter, sublayers: Sequence[Sublayer]) -> None:
    """Replace each (block, kind) branch by `Removed` modules, in place; their weights are freed."""
    blocks = adapter.block_list(model)
    for index, kind in sublayers:
        if kind not in KINDS or not 0 <= index < len(blocks):
            raise DepthError(f"no sublayer ({index}, {kind!r}); blocks 0..{len(blocks) - 1}, kinds {KINDS}")
        block = blocks[index]
        _check_branches(block)
        for name in adapter.branches.of(kind):
            _swap(block, name, _replacement(block, name, kind, adapter))
    attention_left = sum(not is_removed(b, adapter, "attention") for b in blocks)
    if attention_left == 0:
        raise DepthError("every attention branch would be removed; keep at least one (or remove whole blocks)")


def is_removed(block: nn.Module, adapter: Adapter, kind: str) -> bool:
    return isinstance(block.get_submodule(adapter.branches.of(kind)[0]), Removed)


def removed_sublayers(model: nn.Module, adapter: Adapter) -> list[Sublayer]:
    return [(i, kind) for i, block in enumerate(adapter.block_list(model)) for kind in KINDS if is_removed(block, adapter, kind)]


@contextmanager
def without(block: nn.Module, adapter: Adapter, kind: str | None) -> Iterator[None]:
    """Run `block` with one branch removed (None: the whole block is skipped by the caller)."""
    if kind is None or is_removed(block, adapter, kind):
        yield
        return
    _check_branches(block)
    saved = [(name, _swap(block, name, _replacement(block, name, kind, adapter))) for name in adapter.branches.of(kind)]
    try:
        yield
    finally:
        for name, module in reversed(saved):
            _swap(block, name, module)


def branch_parameters(block: nn.Module, adapter: Adapter, kind: str) -> int:
    """Parameters a branch holds (0 once removed): the compute it costs per token, for budgets."""
    return sum(p.numel() for name in adapter.branches.of(kind) for p in block.get_submodule(name).parameters())


def block_parameters(block: nn.Module) -> int:
    return sum(p.numel() for p in block.parameters())

