"""A model held for autocast: under bfloat16 autocast, block matmuls read every weight in bfloat16.

Autocast runs a linear layer in bfloat16, casting a float32 weight (and bias) to bfloat16 at every
call, the same rounding as `Tensor.to(torch.bfloat16)`. A teacher that only ever runs under
autocast (distillation targets, its top-k cache, self-data sampling) can therefore hold the linear
layers of its decoder blocks in bfloat16 from the start: the same outputs, bit for bit, for half the
memory of those weights (0.21 GB of SmolLM2-135M's 0.54 GB) and no cast per step. The embeddings,
norms and output head stay as loaded (the chunked head loss reads the teacher's head outside
autocast). What stays in float32 is copied out of the checkpoint's file mapping, so that the mapping,
which the loaded tensors keep alive, and its pages go away.
"""

from __future__ import annotations

import torch
from torch import nn

from secateur.models.base import adapter_for


@torch.no_grad()
def hold_for_autocast(model: nn.Module) -> int:
    """Hold the weights and biases of `model`'s block linear layers in bfloat16 and copy everything
    else out of the file mapping; returns the bytes the linear layers no longer hold."""
    saved = 0
    for block in adapter_for(model).block_list(model):
        for module in block.modules():
            if isinstance(module, nn.Linear) and module.weight.dtype == torch.float32:
                saved += sum(p.numel() for p in module.parameters(recurse=False)) * 2
                module.to(torch.bfloat16)
    for param in model.parameters():
        if param.dtype != torch.bfloat16:
            param.data = param.data.clone()
    return saved
