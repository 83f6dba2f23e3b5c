"""Routed experts seen as linear layers, so that everything which prunes `nn.Linear` layers (the
sparsity engine, its allocation, its reports) reaches the fused 3-D expert weights.

While `linear_experts(model, adapter)` is open, every MoE block's experts module holds one child
per expert, named by its index, with two `nn.Linear` layers whose weights are views of that
expert's slices of the fused parameters: `gate_up_proj` (2 x width, hidden) and `down_proj`
(hidden, width). Writing a view writes the fused parameter; nothing is copied back. The experts
module's forward calls them in expert order, each on the tokens its router sends it only: a forward
pre-hook on an expert's layer sees exactly that expert's calibration inputs (an expert calibrated on
tokens it never receives would be calibrated by the wrong formula). Every expert is called on every
forward, with no rows when no token reaches it, so that all batches take one path through a block.
On exit the children and the forward go; the model is a stock model again.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

from secateur.models.base import Adapter
from secateur.models.shapes import submodule

EXPERT_LAYERS = ("gate_up_proj", "down_proj")  # one expert's linear layers, in the order they run


def _bind(layer: nn.Linear, weight: Tensor) -> None:
    """Make `weight` itself the layer's weight (a view: writes reach its base)."""
    layer.weight = nn.Parameter(weight.detach(), requires_grad=weight.requires_grad)  # shares the storage


def _view(weight: Tensor) -> nn.Linear:
    """An `nn.Linear` (no bias) over `weight` (out, in)."""
    with torch.device("meta"):
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    _bind(layer, weight)
    return layer


class ExpertLayers(nn.Module):
    """One routed expert's projections as linear layers over its slices of the fused weights."""

    def __init__(self, experts: nn.Module, j: int) -> None:
        super().__init__()
        self.gate_up_proj = _view(experts.gate_up_proj[j])  # (2 x width, hidden): gate rows, then up rows
        self.down_proj = _view(experts.down_proj[j])  # (hidden, width)


def _exposed(experts: nn.Module | None) -> int:
    """How many experts of an experts module are exposed (its children named by index)."""
    return 0 if experts is None else sum(name.isdigit() for name in experts._modules)


def _forward(experts: nn.Module, count: int):
    """The stock experts forward (top-k routing, outputs weighted and summed), through the
    per-expert linear layers."""

    def forward(hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        out = torch.zeros_like(hidden_states)  # (tokens, hidden)
        for j in range(count):  # every expert, reached or not: each batch takes the same path
            layers = experts.get_submodule(str(j))
            token, slot = torch.where(top_k_index == j)  # the tokens routed to j and in which top-k slot
            gate, up = layers.gate_up_proj(hidden_states[token]).chunk(2, dim=-1)  # (n, width) each
            y = layers.down_proj(experts.act_fn(gate) * up) * top_k_weights[token, slot, None]  # (n, hidden)
            out.index_add_(0, token, y.to(out.dtype))
        return out

    return forward


def expert_groups(block: nn.Module, adapter: Adapter) -> tuple[tuple[str, ...], ...]:
    """One group per exposed expert layer of `block` (block-relative names); none when the block
    holds no experts or they are not exposed."""
    if adapter.experts is None:
        return ()
    count = _exposed(submodule(block, adapter.experts.experts))
    return tuple((f"{adapter.experts.experts}.{j}.{layer}",) for j in range(count) for layer in EXPERT_LAYERS)


def block_groups(block: nn.Module, adapter: Adapter) -> tuple[tuple[str, ...], ...]:
    """The linear groups of one block: the family's and, while exposed, every expert's."""
    return adapter.groups + expert_groups(block, adapter)


def stock_parameters(block: nn.Module, adapter: Adapter) -> Iterator[tuple[str, nn.Parameter]]:
    """The block's own parameters, by block-relative name: without the exposed experts' layers (views
    of the fused weights, which a checkpoint never stores)."""
    exposed = f"{adapter.experts.experts}." if adapter.experts is not None else None
    for name, param in block.named_parameters():
        if exposed is None or not name.startswith(exposed) or not name[len(exposed) :].split(".")[0].isdigit():
            yield name, param


def rebind(block: nn.Module, adapter: Adapter) -> None:
    """Make the exposed experts' layers views of the fused weights again: moving a block between
    devices or dtypes (`block.to(...)`) copies every parameter on its own, which separates them."""
    experts = submodule(block, adapter.experts.experts) if adapter.experts is not None else None
    for j in range(_exposed(experts)):
        for name in EXPERT_LAYERS:
            _bind(experts.get_submodule(f"{j}.{name}"), getattr(experts, name)[j])


@contextmanager
def linear_experts(model: nn.Module, adapter: Adapter) -> Iterator[None]:
    """Expose every MoE block's routed experts as linear layers (see the module docstring); a dense
    model passes through unchanged."""
    if adapter.experts is None:
        yield
        return
    blocks = adapter.block_list(model)
    exposed = []
    try:
        for index in adapter.experts.sparse_blocks(blocks):
            experts = blocks[index].get_submodule(adapter.experts.experts)
            count = experts.gate_up_proj.shape[0]
            for j in range(count):
                experts.add_module(str(j), ExpertLayers(experts, j))
            experts.forward = _forward(experts, count)  # an instance attribute shadows the class's forward
            exposed.append((experts, count))
        yield
    finally:
        for experts, count in exposed:
            for j in range(count):
                delattr(experts, str(j))
            del experts.forward
