"""Ridge least squares from running sums: the linear fits that compensate removed structure
(a removed run of blocks, pruned channels) by re-fitting a layer that stays."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class NormalEquations:
    """Σ aᵀa, Σ aᵀr and Σ‖r‖² of a least-squares fit of targets r from features a (float64)."""

    gram: Tensor
    cross: Tensor
    target_sq: float = 0.0

    @classmethod
    def empty(cls, features: int, outputs: int, device: torch.device) -> "NormalEquations":
        dtype = torch.float32 if device.type == "mps" else torch.float64
        return cls(torch.zeros(features, features, dtype=dtype, device=device),
                   torch.zeros(features, outputs, dtype=dtype, device=device))  # fmt: skip

    def update(self, a: Tensor, r: Tensor) -> None:
        a = a.reshape(-1, a.shape[-1]).to(self.gram.dtype)
        r = r.reshape(-1, r.shape[-1]).to(self.gram.dtype)
        self.gram += a.T @ a
        self.cross += a.T @ r
        self.target_sq += float((r * r).sum())

    def error(self, coef: Tensor) -> float:
        """‖a·coef − r‖² over everything seen, from the sums alone (coef: features x outputs)."""
        coef = coef.to(self.gram.dtype)
        return float((coef * (self.gram @ coef)).sum() - 2 * (coef * self.cross).sum()) + self.target_sq


def ridge_towards(eq: NormalEquations, prior: Tensor, damp: float) -> Tensor:
    """argmin_X ‖aX − r‖² + λ‖X − prior‖², λ = damp · mean diag(aᵀa); prior, X: features x outputs."""
    lam = damp * float(eq.gram.diagonal().mean())
    if lam <= 0:
        lam = 1e-8 * max(float(eq.gram.diagonal().abs().max()), 1.0)
    gram = eq.gram.clone()  # + lam I, without an identity matrix as large as the Gram matrix beside it
    gram.diagonal().add_(lam)
    return torch.linalg.solve(gram, eq.cross + lam * prior.to(eq.gram.dtype))


def with_ones(a: Tensor) -> Tensor:
    return torch.cat([a, torch.ones(*a.shape[:-1], 1, dtype=a.dtype, device=a.device)], dim=-1)
