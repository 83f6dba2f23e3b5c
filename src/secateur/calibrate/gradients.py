"""Per-weight calibration-loss gradient norms, for gradient-informed scores (GBLM-Pruner style).

Each calibration window is its own sample: its mean next-token loss is backpropagated alone, and the
squared gradient of every target weight is added to a float32 accumulator on the host, so the
result is ||G_ij|| = sqrt(sum over samples of g_ij^2). Memory: the model and one window's
activations on the device, plus one float32 copy of the target weights on the host. Only the
target weights require gradients.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D


@contextmanager
def weight_gradients(model: nn.Module, layers: list[nn.Module], device: torch.device) -> Iterator[None]:
    """Inside: the whole model on `device`, gradients enabled, and only the layers' weights requiring
    them. Afterwards every flag is restored, gradients dropped and the model back where it was."""
    wanted = {id(m.weight) for m in layers}
    flags = {p: p.requires_grad for p in model.parameters()}
    home = next(model.parameters()).device
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in wanted)
            p.grad = None
        model.to(device)
        with torch.enable_grad():
            yield
    finally:
        for p, flag in flags.items():
            p.grad = None
            p.requires_grad_(flag)
        model.to(home)


def gradient_norms(model: nn.Module, calibration: Tensor, names: list[str], device: torch.device,
                   samples: int | None = None) -> dict[str, Tensor]:
    """{layer name: (out, in) tensor of per-weight gradient L2 norms over `samples` windows}."""
    layers = {name: model.get_submodule(name) for name in names}
    sums = {name: torch.zeros(m.weight.shape, dtype=torch.float32) for name, m in layers.items()}
    with weight_gradients(model, list(layers.values()), device):
        for window in calibration[: samples or len(calibration)]:
            ids = window[None].to(device)
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            for name, module in layers.items():
                sums[name] += module.weight.grad.float().square().cpu()
                module.weight.grad = None
    return {name: (total.T if isinstance(layers[name], Conv1D) else total).sqrt() for name, total in sums.items()}
