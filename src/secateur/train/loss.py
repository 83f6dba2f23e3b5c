"""Recovery losses: knowledge distillation from the dense teacher's logits, mixed with cross-entropy.

With p = softmax(teacher / T) and q = softmax(student / T) at every position,

    distillation = T² · mean over positions of KL(p ‖ q) = T² · mean Σ_v p_v (log p_v − log q_v)

(forward KL, Hinton's T² so that gradients keep their scale across temperatures), and

    loss = kd_weight · distillation + (1 − kd_weight) · cross-entropy(student, next token)
           + hidden_weight · layer-wise distillation.

The layer-wise term is SquareHead (Kurtic et al. 2023, "Sparse Fine-tuning for Inference
Acceleration of Large Language Models"): for the output f_l of every decoder block l = 1..L,

    layer-wise = Σ_l MSE(f_l^student, f_l^teacher) / MSE(f_l^teacher, 0)

each block's squared error normalised by the teacher's mean square there, so that blocks with large
activations do not drown the others (`normalise="block"`). Within a block, though, that mean square
can belong to one position: in SmolLM2-135M the outputs of blocks 12 to 28 keep 70-98% of their
energy at the first position of a window (an attention sink, mostly in one channel;
benchmarks/sink_energy.py), so the other positions' errors count for almost nothing.
`normalise="position"` divides each position's squared error by the teacher's squared norm at that
position instead,

    layer-wise = Σ_l mean over positions p of ‖f_lp^student − f_lp^teacher‖² / ‖f_lp^teacher‖²

(every position weighs the same). Both need a student with the teacher's blocks and hidden size
(sparse and head/channel-pruned models; not depth- or hidden-pruned ones).

With top-k teacher logits (values and vocabulary indices, cached once), p is the teacher's softmax
renormalised over its k largest logits and q the student's full softmax read at those k entries:
the k tokens outside the teacher's top k are dropped from the sum (their teacher mass is lost, the
student's is still normalised over the whole vocabulary).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

Normalise = Literal["block", "position"]  # layer-wise distillation: what each squared error is divided by
NORMALISE = get_args(Normalise)


def kl_distillation(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """T² · mean over positions of KL(softmax(teacher/T) ‖ softmax(student/T)); logits (..., vocab)."""
    log_q = F.log_softmax(student.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher.float() / temperature, dim=-1)
    per_position = (log_p.exp() * (log_p - log_q)).sum(-1)
    return temperature**2 * per_position.mean()


def topk_distillation(student: Tensor, values: Tensor, indices: Tensor, temperature: float = 1.0) -> Tensor:
    """The same loss from the teacher's top-k logits only: values, indices (..., k)."""
    log_q = F.log_softmax(student.float() / temperature, dim=-1).gather(-1, indices.long())
    log_p = F.log_softmax(values.float() / temperature, dim=-1)
    per_position = (log_p.exp() * (log_p - log_q)).sum(-1)
    return temperature**2 * per_position.mean()


def layerwise_distillation(student: Sequence[Tensor], teacher: Sequence[Tensor],
                           normalise: Normalise = "block") -> Tensor:
    """Σ over blocks of each block's squared error to the teacher, normalised by the teacher's mean
    square over the block (SquareHead) or at each position; one (..., hidden) tensor per block."""
    if len(student) != len(teacher):
        raise ValueError(f"layer-wise distillation pairs blocks: the student has {len(student)}, the teacher "
                         f"{len(teacher)}")
    if normalise not in NORMALISE:
        raise ValueError(f"normalise is one of {NORMALISE}, not {normalise!r}")
    terms = []
    for s, t in zip(student, teacher):
        error, energy = (s.float() - t.float()).pow(2), t.float().pow(2)
        if normalise == "block":
            terms.append(error.mean() / energy.mean().clamp_min(1e-12))
        else:
            terms.append((error.sum(-1) / energy.sum(-1).clamp_min(1e-12)).mean())
    return torch.stack(terms).sum()


def next_token_cross_entropy(logits: Tensor, ids: Tensor) -> Tensor:
    """Mean cross-entropy of each position's prediction of the next token (the last position has none)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def top_k(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest logits per position (float16 values, int32 indices: what the cache keeps)."""
    values, indices = torch.topk(logits.float(), k, dim=-1)
    return values.to(torch.float16), indices.to(torch.int32)
