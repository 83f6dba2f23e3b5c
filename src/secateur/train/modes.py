"""What recovery trains: every weight (`full`), LoRA adapters on the block projections (`lora`),
only norms and biases (`perp`, after PERP), or both (`perp-lora`).

LoRA here is a parametrization of each target weight, W_eff = W + s · (B A) ⊙ M with s = alpha / r,
A (r x in) random, B (out x r) zero at the start, and M the layer's mask of non-zeros when the layer
is sparse (all ones otherwise: no product). Training and merging compute the same W_eff, so the
merged model gives the trained model's logits and keeps its zeros exactly (W is zero where M is, and
so is the masked delta). PEFT's LoRA adds s · B(A x) to the layer's output instead, which cannot be
masked without forming B A; its merge of a sparse layer fills the zeros (wanda #83: 40% -> 32.7%),
and masking only at the merge would give a model that differs from the trained one. The price of
forming B A: the weight gradient of each target layer is computed as in a full fine-tune (about a
third of the step's matmul work); the optimizer state is only that of A and B.
"""

from __future__ import annotations

import math
from typing import get_args

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from secateur.models import Adapter
from secateur.sparsity.prune import target_layers
from secateur.train.config import Mode

MODES: tuple[str, ...] = get_args(Mode)


class LowRankDelta(nn.Module):
    """The parametrization W -> W + scale · (B A) ⊙ mask, in the weight's own layout (rows x cols)."""

    def __init__(self, rows: int, cols: int, rank: int, alpha: float, mask: Tensor | None, generator: torch.Generator,
                 dtype: torch.dtype):  # fmt: skip
        super().__init__()
        a = torch.empty(rank, cols, dtype=torch.float32)
        bound = 1.0 / math.sqrt(cols)  # nn.Linear's (and PEFT's) uniform init of A
        a.uniform_(-bound, bound, generator=generator)
        self.lora_a = nn.Parameter(a.to(dtype))
        self.lora_b = nn.Parameter(torch.zeros(rows, rank, dtype=dtype))
        self.scale = alpha / rank
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, weight: Tensor) -> Tensor:
        delta = (self.lora_b @ self.lora_a) * self.scale
        if self.mask is not None:
            delta = delta * self.mask
        return weight + delta.to(weight.dtype)


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def norm_and_bias_parameters(model: nn.Module) -> list[str]:
    """Names of every norm's parameters and every bias (PERP's trainable set)."""
    names = []
    for module_name, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            if _is_norm(module) or name == "bias":
                names.append(f"{module_name}.{name}" if module_name else name)
    return names


def add_lora(model: nn.Module, adapter: Adapter, rank: int, alpha: float, masks: dict[str, Tensor], seed: int) -> int:
    """Parametrize every target layer's weight with a LowRankDelta (masked where `masks` has the
    layer's weight); returns the number of adapter parameters."""
    generator = torch.Generator().manual_seed(seed)
    added = 0
    for name, module in target_layers(model, adapter):
        weight = module.weight
        rows, cols = weight.shape
        delta = LowRankDelta(rows, cols, rank, alpha, masks.get(f"{name}.weight"), generator, weight.dtype)
        parametrize.register_parametrization(module, "weight", delta.to(weight.device))
        added += delta.lora_a.numel() + delta.lora_b.numel()
    return added


def merge_lora(model: nn.Module) -> int:
    """Fold every LowRankDelta into its weight (the trained W_eff, exactly); returns how many."""
    merged = 0
    for module in list(model.modules()):
        if parametrize.is_parametrized(module, "weight") and any(
                isinstance(p, LowRankDelta) for p in module.parametrizations["weight"]):  # fmt: skip
            with torch.no_grad():
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            merged += 1
    return merged


def select_trainable(model: nn.Module, adapter: Adapter, mode: str, rank: int, alpha: float,
                     masks: dict[str, Tensor], seed: int) -> dict[str, int]:  # fmt: skip
    """Set requires_grad for `mode` (adding LoRA where asked); returns parameter counts."""
    if mode not in MODES:
        raise ValueError(f"unknown training mode {mode!r}")
    total = sum(p.numel() for p in model.parameters())
    if mode == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return {"trainable": total, "total": total, "adapter": 0}
    for p in model.parameters():
        p.requires_grad_(False)
    if mode in ("perp", "perp-lora"):
        params = dict(model.named_parameters())
        for name in norm_and_bias_parameters(model):
            params[name].requires_grad_(True)
    added = add_lora(model, adapter, rank, alpha, masks, seed) if mode in ("lora", "perp-lora") else 0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": total, "adapter": added}
