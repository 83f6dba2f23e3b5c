"""Depth-pruning scores as pure tensor functions, one value per token (callers average).

- Block Influence (ShortGPT): 1 - cos(x_in, x_out) between a block's input and output hidden states.
- Angular distance (Gromov et al., "The Unreasonable Ineffectiveness of the Deeper Layers"):
  arccos(cos(x_l, x_{l+n})) / pi between the states entering block l and leaving block l+n-1.
- Jensen-Shannon divergence between two next-token distributions given as logits (FinerCut's
  "change of the model output"), in nats, bounded by log 2.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

WORK_DTYPE = torch.float32


def cosine_per_token(a: Tensor, b: Tensor) -> Tensor:
    """(..., hidden) x (..., hidden) -> (...,) cosine similarity, in float32."""
    return F.cosine_similarity(a.to(WORK_DTYPE), b.to(WORK_DTYPE), dim=-1, eps=1e-8)


def block_influence(h_in: Tensor, h_out: Tensor) -> Tensor:
    """(..., hidden) -> (...,): 1 - cos(input, output) of a block; 0 for a block that changes nothing."""
    return 1.0 - cosine_per_token(h_in, h_out)


def angular_distance(h_start: Tensor, h_end: Tensor) -> Tensor:
    """(..., hidden) -> (...,): arccos(cos) / pi, in [0, 1]."""
    return torch.arccos(cosine_per_token(h_start, h_end).clamp(-1.0, 1.0)) / math.pi


def js_divergence(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """(..., vocab) x (..., vocab) -> (...,): JS(P, Q) = KL(P||M)/2 + KL(Q||M)/2 with M = (P + Q)/2."""
    log_p = F.log_softmax(logits_p.to(WORK_DTYPE), dim=-1)
    log_q = F.log_softmax(logits_q.to(WORK_DTYPE), dim=-1)
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(-1)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(-1)
    return 0.5 * (kl_pm + kl_qm)


def lowest(scores: list[float], count: int) -> list[int]:
    """Indices of the `count` smallest scores, ties broken by the lower index."""
    return sorted(range(len(scores)), key=lambda i: (scores[i], i))[:count]
