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

`head_loss` computes the distillation and cross-entropy terms from the student's last hidden states
and its output head a chunk of positions at a time, with the gradients of the hidden states and of
the head worked out chunk by chunk in the forward pass (the fused linear loss of Liger-Kernel and
Cut Cross-Entropy), so that no batch x sequence x vocabulary tensor is ever held. With s the
(soft-capped) logits of a position, q = softmax(s / T), p the teacher's distribution at T and
y the next token:

    d(T² KL(p ‖ q)) / ds = T (q − p)          d(−log softmax(s)_y) / ds = softmax(s) − onehot(y)

(p scattered onto its k indices for top-k targets, where Σ p = 1 over them), each term divided by its
number of positions and weighted as above; soft-capping s = c tanh(z / c) multiplies by 1 − tanh²(z / c).
The logits are computed in the autocast dtype as the head module would; everything after them in
float32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from secateur.models.head import Head

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


def load_balance(logits: Sequence[Tensor], top_k: int) -> Tensor:
    """Switch Transformer's load-balancing loss (Fedus et al. 2021, eqs. 4-6) of every router, averaged:
    for a router of E experts with logits (tokens, E), f_j the share of tokens among whose top-k j is
    (summed over the k slots) and P_j the mean softmax probability of j, E x sum_j f_j P_j. A family's
    own loss pools all blocks into one E-way count, which blocks of different expert counts cannot
    share; with one router the two agree."""
    losses = []
    for layer in logits:
        probability = layer.float().softmax(dim=-1)  # (tokens, E)
        chosen = probability.topk(top_k, dim=-1).indices
        share = torch.zeros_like(probability).scatter_add_(1, chosen, torch.ones_like(chosen, dtype=probability.dtype))
        losses.append(layer.shape[-1] * (share.mean(dim=0) * probability.mean(dim=0)).sum())
    return torch.stack(losses).mean()


def next_token_cross_entropy(logits: Tensor, ids: Tensor) -> Tensor:
    """Mean cross-entropy of each position's prediction of the next token (the last position has none)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def top_k(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest logits per position (float16 values, int32 indices: what the cache keeps)."""
    values, indices = torch.topk(logits.float(), k, dim=-1)
    return values.to(torch.float16), indices.to(torch.int32)


@dataclass(frozen=True)
class Targets:
    """What the head loss compares the student's logits with, for n flattened positions: the next
    token (`labels`, IGNORE where there is none), and for distillation either the teacher's logits of
    any rows (`teacher(start, stop)`) or its cached top-k (`values`, `indices`, (n, k))."""

    labels: Tensor  # (n,)
    kd_weight: float = 1.0
    temperature: float = 1.0
    teacher: Callable[[int, int], Tensor] | None = None
    values: Tensor | None = None
    indices: Tensor | None = None


IGNORE = -100  # a position with no next token


def next_token_labels(ids: Tensor) -> Tensor:
    """(batch, seq) ids -> (batch x seq,) the token each position predicts; IGNORE at a window's end."""
    labels = torch.full_like(ids, IGNORE)
    labels[:, :-1] = ids[:, 1:]
    return labels.flatten()


def head_loss(hidden: Tensor, head: Head, targets: Targets, chunk: int) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, distillation, cross-entropy) from the student's last hidden states (..., hidden) and its
    head, `chunk` positions at a time: the same values and gradients as the losses above on the full
    logits (`kd_weight` · distillation + (1 − kd_weight) · cross-entropy). The two parts carry no
    gradient."""
    if head.fold is not None:
        raise ValueError("the student's head cannot fold its logits")
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    return _HeadLoss.apply(hidden, head.weight, head.bias, head.softcap, targets, chunk)


class _HeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, softcap: float | None,
                targets: Targets, chunk: int) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        flat = hidden.reshape(-1, hidden.shape[-1])  # (n, hidden)
        with torch.autocast(device, enabled=False):
            w, b = weight.to(dtype), bias.to(dtype) if bias is not None else None
            sums, grad_h, grad_w, grad_b = _chunks(flat.to(dtype), w, b, softcap, targets, chunk)
        ctx.save_for_backward(grad_h.to(hidden.dtype).reshape(hidden.shape), grad_w.to(weight.dtype),
                              grad_b.to(bias.dtype) if bias is not None else None)  # fmt: skip
        kd, ce = sums
        loss = targets.kd_weight * kd + (1 - targets.kd_weight) * ce
        ctx.mark_non_differentiable(kd, ce)
        return loss, kd, ce

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _kd: Tensor, _ce: Tensor) -> tuple[Tensor | None, ...]:
        grad_h, grad_w, grad_b = ctx.saved_tensors
        return (grad_h * grad_loss, grad_w * grad_loss, grad_b * grad_loss if grad_b is not None else None,
                None, None, None)  # fmt: skip


def _chunks(flat: Tensor, w: Tensor, b: Tensor | None, softcap: float | None, targets: Targets,
            chunk: int) -> tuple[tuple[Tensor, Tensor], Tensor, Tensor, Tensor]:  # fmt: skip
    """The loss parts' values and the gradients of the hidden states, weight and bias, chunk by chunk
    (in place where a chunk's tensor is not read again: a few (chunk, vocabulary) floats live at once)."""
    n, kd_w = len(flat), targets.kd_weight
    valid = int((targets.labels != IGNORE).sum())
    grad_h = torch.empty_like(flat)
    grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
    grad_b = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device)
    kd = flat.new_zeros((), dtype=torch.float32)
    ce = flat.new_zeros((), dtype=torch.float32)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        s = F.linear(flat[start:stop], w, b).float()  # (c, vocabulary)
        capped = None
        if softcap is not None:
            capped = s.div_(softcap).tanh_()
            s = capped * softcap
        grad = None
        if kd_w < 1 and valid:
            part, grad = _cross_entropy(s, targets.labels[start:stop])
            ce += part / valid
            grad.mul_((1 - kd_w) / valid)
        if kd_w > 0:
            part, g = _distillation(s, targets, start, stop)
            del s
            kd += part / n
            grad = g.mul_(kd_w / n) if grad is None else grad.add_(g, alpha=kd_w / n)
            del g
        if capped is not None:
            grad.mul_(1 - capped.square_())
            del capped
        grad = grad.to(w.dtype)
        grad_h[start:stop] = grad @ w
        if grad.dtype == torch.float32:
            grad_w.addmm_(grad.T, flat[start:stop])
        else:
            grad_w += grad.T @ flat[start:stop]
        grad_b += grad.sum(0)
    return (kd, ce), grad_h, grad_w, grad_b


def _distillation(s: Tensor, targets: Targets, start: int, stop: int) -> tuple[Tensor, Tensor]:
    """Σ over the chunk's positions of T² KL(p ‖ q), and its gradient T (q − p) by the logits."""
    t = targets.temperature
    log_q = F.log_softmax(s / t if t != 1 else s, dim=-1)  # (c, vocabulary)
    if targets.teacher is not None:
        theirs = targets.teacher(start, stop).float()
        log_p = F.log_softmax(theirs.div_(t) if t != 1 else theirs, dim=-1)
        del theirs
        p = log_p.exp()
        total = log_p.sub_(log_q).mul_(p).sum()
        del log_p
    else:
        indices = targets.indices[start:stop].to(s.device).long()  # (c, k)
        log_p = F.log_softmax(targets.values[start:stop].to(s.device).float() / t, dim=-1)
        p_k = log_p.exp()
        total = (p_k * (log_p - log_q.gather(-1, indices))).sum()
        p = torch.zeros_like(s).scatter_(-1, indices, p_k)
    return t**2 * total, log_q.exp_().sub_(p).mul_(t)


def _cross_entropy(s: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Σ over the chunk's positions with a next token of −log softmax(s)_y, and its gradient."""
    keep = labels != IGNORE
    log_q = F.log_softmax(s, dim=-1)
    safe = labels.clamp_min(0).unsqueeze(-1)
    total = -(log_q.gather(-1, safe).squeeze(-1) * keep).sum()
    grad = log_q.exp_().scatter_add_(-1, safe, torch.full_like(safe, -1, dtype=s.dtype))
    return total, grad.mul_(keep.unsqueeze(-1))
