"""Masks that hold through training: the zeros of the decoder blocks' linear layers stay exactly zero.

Gradients are masked before each optimizer step, and the weights once more after it. Masking the
gradient is what keeps the optimizer honest: a pruned weight then never gets a gradient, so Adam's
first and second moments for it stay zero and its update is exactly 0 (with decoupled weight decay
a zero also stays zero). Masking only after the step would let the moments of pruned weights build
up from gradients they never use: the surviving weights' updates are the same either way, but the
optimizer state describes weights that do not exist, and a mask that changes during training
(gradual pruning) would then revive weights with stale momentum. The weights are masked after the
step too as a guarantee that does not depend on the optimizer (any optimizer, fused or not).

Zeros kept are every exact zero of a target layer (and of a mixture of experts' fused expert
weights), so N:M patterns hold as they are (the zeros of an N:M model are its pattern). Layers
without zeros get no mask.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from secateur.models import Adapter
from secateur.sparsity.prune import target_layers


def weight_masks(model: nn.Module, adapter: Adapter) -> dict[str, Tensor]:
    """{parameter name: bool mask of the weights to keep} for every target layer that has zeros."""
    names = {id(p): n for n, p in model.named_parameters()}
    masks = {}
    for weight in [module.weight for _, module in target_layers(model, adapter)] + fused_experts(model, adapter):
        keep = weight != 0
        if not bool(keep.all()):
            masks[names[id(weight)]] = keep
    return masks


def fused_experts(model: nn.Module, adapter: Adapter) -> list[nn.Parameter]:
    """The fused 3-D expert weights of a mixture of experts (sparsity reaches them, see
    `models.linear_experts`), which are not linear layers."""
    if adapter.experts is None:
        return []
    blocks = adapter.block_list(model)
    experts = [blocks[i].get_submodule(adapter.experts.experts) for i in adapter.experts.sparse_blocks(blocks)]
    return [param for module in experts for param in (module.gate_up_proj, module.down_proj)]


class MaskHolder:
    """Applies `masks` (by parameter name) to a model's gradients and weights."""

    def __init__(self, model: nn.Module, masks: dict[str, Tensor]):
        self.rebind(model, masks)

    def rebind(self, model: nn.Module, masks: dict[str, Tensor]) -> None:
        """Hold `masks` on the model's current parameters (after slicing replaced some)."""
        self.params = dict(model.named_parameters())
        self.replace(masks)

    def replace(self, masks: dict[str, Tensor]) -> None:
        self.masks = {name: mask.to(self.params[name].device) for name, mask in masks.items()}
        self.pairs = [(self.params[name], mask) for name, mask in self.masks.items()]

    @torch.no_grad()
    def clear_moments(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero the optimizer's per-weight state (Adam's moments) where the masks prune: the weights a
        new mask removes must not keep momentum from before."""
        for param, mask in self.pairs:
            for value in optimizer.state.get(param, {}).values():
                if isinstance(value, Tensor) and value.shape == mask.shape:
                    value.mul_(mask)

    @torch.no_grad()
    def gradients(self) -> None:
        for param, mask in self.pairs:
            if param.grad is not None:
                param.grad.mul_(mask)

    @torch.no_grad()
    def weights(self) -> None:
        for param, mask in self.pairs:
            param.mul_(mask)

    @property
    def kept(self) -> int:
        return sum(int(mask.sum()) for _, mask in self.pairs)

    @property
    def size(self) -> int:
        return sum(mask.numel() for _, mask in self.pairs)
