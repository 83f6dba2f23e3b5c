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
        self.value += rows.square().sum(dim=0)  # 5x faster than vector_norm(dim=0) on CPU
        self.tokens += rows.shape[0]

    @property
    def norm(self) -> Tensor:
        """||X_j||_2 per input feature j: what Wanda multiplies |W_ij| by."""
        return self.value.sqrt()

    def permute(self, order: Tensor) -> None:
        """Reorder the features (N:M channel permutation): feature i becomes old feature order[i]."""
        self.value = self.value[order]

    def uninformed(self) -> None:
        """Unit energy on every feature: what a method reads reduces to weight magnitude (for an
        expert routed too few calibration tokens to measure)."""
        self.value = torch.ones_like(self.value)


PANEL = 256  # features per row panel of the symmetric Hessian update (measured best for 576..1536)


class Hessian:
    """H = X^T X summed over calibration tokens (the layer-wise reconstruction Hessian, up to 2/n).

    SparseGPT's damping is relative to the mean diagonal, so the overall scale does not matter.
    Wide inputs (>= 2 panels) accumulate only the upper block triangle, panel by panel (about 2/3 of
    the GEMM work for 3 panels, tending to 1/2); reading `value` mirrors it into a full matrix.
    """

    def __init__(self, features: int, device: torch.device | str) -> None:
        self._sum = torch.zeros(features, features, dtype=WORK_DTYPE, device=device)
        self.tokens = 0

    def update(self, x: Tensor) -> None:
        rows = _rows(x)  # (tokens, features)
        features = rows.shape[1]
        if features < 2 * PANEL:
            self._sum.addmm_(rows.T, rows)
        else:
            for start in range(0, features, PANEL):
                end = min(start + PANEL, features)
                self._sum[start:end, start:].addmm_(rows[:, start:end].T, rows[:, start:])
        self.tokens += rows.shape[0]

    @property
    def value(self) -> Tensor:
        """The full symmetric matrix (updates never touch the mirrored blocks, so this is idempotent)."""
        features = self._sum.shape[0]
        if features >= 2 * PANEL:
            for start in range(0, features, PANEL):
                end = min(start + PANEL, features)
                self._sum[end:, start:end] = self._sum[start:end, end:].T
        return self._sum

    @property
    def norm(self) -> Tensor:
        return self.value.diagonal().sqrt()

    def take(self, dtype: torch.dtype) -> Tensor:
        """The full matrix as `dtype`, the accumulator emptied: where the type changes, the sums are
        freed before the caller's work on the copy (at 8B widths each is a gigabyte)."""
        value = self.value.to(dtype)
        self._sum = None
        return value

    def permute(self, order: Tensor) -> None:
        full = self.value
        self._sum = full[order][:, order].contiguous()

    def uninformed(self) -> None:
        """H = I: uncorrelated features of unit energy, so OBS selects by weight magnitude and updates
        nothing (for an expert routed too few calibration tokens to measure)."""
        self._sum = torch.eye(self._sum.shape[0], dtype=self._sum.dtype, device=self._sum.device)


def check_finite(name: str, tensor: Tensor) -> None:
    """Stop the run with the layer named when a statistic or weight holds NaN or Inf."""
    if not torch.isfinite(tensor).all():
        raise FloatingPointError(
            f"non-finite values (NaN/Inf) in {name}: check the model's weights, or run in float32 (--dtype float32)"
        )


class Moments:
    """Per-feature sum and sum of squares over calibration tokens (float64): mean and variance of
    each input feature (FLAP's fluctuation, bias compensation) and its squared L2 norm (Wanda)."""

    def __init__(self, features: int, device: torch.device | str) -> None:
        self.sum = torch.zeros(features, dtype=torch.float64, device=device)
        self.sumsq = torch.zeros(features, dtype=torch.float64, device=device)
        self.tokens = 0

    def update(self, x: Tensor) -> None:
        rows = _rows(x)  # (tokens, features)
        self.sum += rows.sum(dim=0, dtype=torch.float64)
        self.sumsq += rows.square().sum(dim=0, dtype=torch.float64)
        self.tokens += rows.shape[0]

    @property
    def mean(self) -> Tensor:
        return (self.sum / max(self.tokens, 1)).to(WORK_DTYPE)

    @property
    def variance(self) -> Tensor:
        """Population variance over tokens: E[x^2] - E[x]^2, clamped at zero against rounding."""
        n = max(self.tokens, 1)
        return (self.sumsq / n - (self.sum / n).square()).clamp_min(0).to(WORK_DTYPE)

    @property
    def norm(self) -> Tensor:
        """||X_j||_2 over all tokens."""
        return self.sumsq.sqrt().to(WORK_DTYPE)

    @property
    def value(self) -> Tensor:
        return self.sumsq

    def permute(self, order: Tensor) -> None:
        self.sum, self.sumsq = self.sum[order], self.sumsq[order]

    def uninformed(self) -> None:
        """Zero mean and unit energy on every feature, from one token (see `InputNormSq.uninformed`)."""
        self.sum, self.sumsq, self.tokens = torch.zeros_like(self.sum), torch.ones_like(self.sumsq), 1
