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
        self.gram.addmm_(a.T, a)  # in place: no second matrix of the Gram's size
        self.cross.addmm_(a.T, r)
        self.target_sq += float((r * r).sum())

    def error(self, coef: Tensor) -> float:
        """‖a·coef − r‖² over everything seen, from the sums alone (coef: features x outputs)."""
        coef = coef.to(self.gram.dtype)
        return float((coef * (self.gram @ coef)).sum() - 2 * (coef * self.cross).sum()) + self.target_sq


def _ridge(gram: Tensor, damp: float) -> float:
    """λ = damp · mean diag(aᵀa), or a tiny positive one where that is not positive."""
    lam = damp * float(gram.diagonal().mean())
    return lam if lam > 0 else 1e-8 * max(float(gram.diagonal().abs().max()), 1.0)


def ridge_towards(eq: NormalEquations, prior: Tensor, damp: float) -> Tensor:
    """argmin_X ‖aX − r‖² + λ‖X − prior‖², λ = damp · mean diag(aᵀa); prior, X: features x outputs."""
    lam = _ridge(eq.gram, damp)
    gram = eq.gram.clone()  # + lam I, without an identity matrix as large as the Gram matrix beside it
    gram.diagonal().add_(lam)
    return torch.linalg.solve(gram, eq.cross + lam * prior.to(eq.gram.dtype))


def ridge_consuming(eq: NormalEquations, prior: Tensor, damp: float) -> tuple[Tensor, float, float]:
    """`ridge_towards`'s solution with the fit's squared errors at `prior` and at the solution, in the
    memory of the sums alone: the Gram matrix becomes its Cholesky factor in place and the cross sums
    the right-hand side, so `eq` is spent. (A 14,336-wide fit, Llama-3.1-8B's MLP output, holds a
    1.6 GB float64 Gram matrix; a copy to solve and the solver's own copy were two more.) The error
    at the solution c comes from the factor: with L Lᵀ = G + λI and X the cross sums,
    cᵀGc − 2c·X + Σ‖r‖² = ‖Lᵀc‖² − λ‖c‖² − 2c·X + Σ‖r‖²."""
    before = eq.error(prior)
    lam = _ridge(eq.gram, damp)
    prior = prior.to(eq.gram.dtype)
    eq.gram.diagonal().add_(lam)
    factor, info = torch.linalg.cholesky_ex(eq.gram, out=(eq.gram, torch.empty((), dtype=torch.int32,
                                                                               device=eq.gram.device)))  # fmt: skip
    if int(info):
        raise ValueError("the compensation's normal equations are not positive definite: raise its damping")
    rhs = eq.cross.add_(prior, alpha=lam)  # X + λ·prior
    coef = torch.cholesky_solve(rhs, factor)
    cross_dot = float((coef * rhs).sum()) - lam * float((coef * prior).sum())  # c·X
    after = float(factor.T.matmul(coef).square().sum()) - lam * float(coef.square().sum()) - 2 * cross_dot + eq.target_sq
    eq.gram = eq.cross = None  # type: ignore[assignment]  # spent
    return coef, before, after


def with_ones(a: Tensor) -> Tensor:
    return torch.cat([a, torch.ones(*a.shape[:-1], 1, dtype=a.dtype, device=a.device)], dim=-1)
