"""Importance of structured units, as pure functions of weights, input statistics and gradients.

A unit (an MLP channel, an attention head) owns output rows of its producers (gate/up, q/k/v) and
input columns of its consumer (down, o). Every importance scores rows and columns separately; a unit's
score is the sum over what it owns (see `secateur.width.units`). Weights are (out, in).

- magnitude: squared L2 norm of the unit's weights.
- activation (Wanda per group): sum of |W_ij| * ||X_j||_2 over the unit's weights, X being each
  layer's own input.
- fluctuation (FLAP): for each consumer input channel j, the variance of X_j over the calibration
  tokens times the squared norm of column j; producers do not count. The variance is what bias
  compensation cannot restore; where no compensation follows (bias compensation off, or the hidden
  dimension's readers), the column's expected output error is the second moment E[X_j^2] times the
  squared norm, mean included.
- taylor (LLM-Pruner, first order): sum of |W_ij * dL/dW_ij| over the unit's weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor

from secateur.calibrate.stats import Moments

RowScore = Callable[[Tensor, Moments | None, Tensor | None], Tensor]  # (out, in), stats of the input, grad -> (out,)
ColumnScore = Callable[[Tensor, Moments | None, Tensor | None], Tensor]  # -> (in,)


@dataclass(frozen=True)
class Importance:
    name: str
    rows: RowScore
    columns: ColumnScore
    activations: bool  # needs input statistics from a calibration pass
    gradients: bool  # needs calibration-loss gradients of the weights
    summary: str
    uncompensated_columns: ColumnScore | None = None  # columns whose mean no bias restores; None: `columns`

    def columns_without_compensation(self, weight: Tensor, stats: Moments | None, grad: Tensor | None) -> Tensor:
        return (self.uncompensated_columns or self.columns)(weight, stats, grad)


def magnitude_rows(weight: Tensor, stats: Moments | None = None, grad: Tensor | None = None) -> Tensor:
    return weight.square().sum(dim=1)


def magnitude_columns(weight: Tensor, stats: Moments | None = None, grad: Tensor | None = None) -> Tensor:
    return weight.square().sum(dim=0)


def activation_rows(weight: Tensor, stats: Moments, grad: Tensor | None = None) -> Tensor:
    return weight.abs() @ stats.norm  # (out, in) @ (in,) -> (out,)


def activation_columns(weight: Tensor, stats: Moments, grad: Tensor | None = None) -> Tensor:
    return weight.abs().sum(dim=0) * stats.norm


def fluctuation_rows(weight: Tensor, stats: Moments | None = None, grad: Tensor | None = None) -> Tensor:
    return weight.new_zeros(weight.shape[0])


def fluctuation_columns(weight: Tensor, stats: Moments, grad: Tensor | None = None) -> Tensor:
    return stats.variance * weight.square().sum(dim=0)


def second_moment_columns(weight: Tensor, stats: Moments, grad: Tensor | None = None) -> Tensor:
    """E[||W_:,j X_j||^2] = E[X_j^2] ||W_:,j||^2: the output error of dropping column j with no bias."""
    return (stats.variance + stats.mean.square()) * weight.square().sum(dim=0)


def taylor_rows(weight: Tensor, stats: Moments | None, grad: Tensor) -> Tensor:
    return (weight * grad).abs().sum(dim=1)


def taylor_columns(weight: Tensor, stats: Moments | None, grad: Tensor) -> Tensor:
    return (weight * grad).abs().sum(dim=0)


IMPORTANCE: dict[str, Importance] = {
    imp.name: imp
    for imp in (
        Importance("magnitude", magnitude_rows, magnitude_columns, False, False, "squared L2 norm of the unit's weights"),
        Importance("activation", activation_rows, activation_columns, True, False,
                   "sum of |W_ij| * ||X_j||_2 over the unit's weights (Wanda per group)"),
        Importance("fluctuation", fluctuation_rows, fluctuation_columns, True, False,
                   "variance of each consumer input channel times its column's squared norm (FLAP)",
                   uncompensated_columns=second_moment_columns),
        Importance("taylor", taylor_rows, taylor_columns, False, True,
                   "sum of |W * dL/dW| over the unit's weights (LLM-Pruner, first order)"),
    )
}  # fmt: skip


def standardize(scores: Tensor) -> Tensor:
    """(s - mean) / std over one layer's units, so layers can be ranked together (FLAP)."""
    if scores.numel() < 2:
        return scores - scores.mean()
    std = scores.std()
    return (scores - scores.mean()) / (std if std > 0 else 1)
