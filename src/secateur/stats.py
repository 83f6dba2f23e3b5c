"""Calibration statistics: small accumulators fed with a layer's input activations.

Forward hooks only call `update(x)`; the methods read the finished statistic. Accumulation runs in
float32 whatever the model's dtype (WORK_DTYPE), so bfloat16 models get the same statistics.
"""

from __future__ import annotations

import torch
from torch import Tensor

WORK_DTYPE = torch.float32  # precision of every statistic and weight update


def _rows(x: Tensor) -> Tensor:
    """Flatten (..., features) activations to (tokens, features) in the working precision."""
    return x.reshape(-1, x.shape[-1]).to(WORK_DTYPE)


class InputNormSq:
    """Squared L2 norm of each input feature over all calibration tokens: sum_t x_tj^2."""

    def __init__(self, features: int, device: torch.device | str) -> None:
        self.value = torch.zeros(features, dtype=WORK_DTYPE, device=device)
        self.tokens = 0

    def update(self, x: Tensor) -> None:
        rows = _rows(x)  # (tokens, features)
        self.value += rows.pow(2).sum(dim=0)
        self.tokens += rows.shape[0]

    @property
    def norm(self) -> Tensor:
        """||X_j||_2 per input feature j: what Wanda multiplies |W_ij| by."""
        return self.value.sqrt()


class Hessian:
    """H = X^T X summed over calibration tokens (the layer-wise reconstruction Hessian, up to 2/n).

    SparseGPT's damping is relative to the mean diagonal, so the overall scale does not matter.
    """

    def __init__(self, features: int, device: torch.device | str) -> None:
        self.value = torch.zeros(features, features, dtype=WORK_DTYPE, device=device)
        self.tokens = 0

    def update(self, x: Tensor) -> None:
        rows = _rows(x)  # (tokens, features)
        self.value.addmm_(rows.T, rows)
        self.tokens += rows.shape[0]


def check_finite(name: str, tensor: Tensor) -> None:
    """Stop the run with the layer named when a statistic or weight holds NaN or Inf."""
    if not torch.isfinite(tensor).all():
        raise FloatingPointError(
            f"non-finite values (NaN/Inf) in {name}: check the model's weights, or run in float32 (--dtype float32)"
        )
