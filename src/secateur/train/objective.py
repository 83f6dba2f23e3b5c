"""What one training step minimises: distillation from the teacher's logits (full, or its cached top-k),
cross-entropy, and layer-wise distillation of the block outputs, mixed by the config's weights."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from secateur.errors import TrainError
from secateur.train.config import TrainConfig
from secateur.models.head import Head, hidden_out
from secateur.train.loss import (Targets, head_loss, kl_distillation, layerwise_distillation, next_token_cross_entropy,
                                 next_token_labels, top_k, topk_distillation)


def router_weight(model: nn.Module, adapter: Any) -> float:
    """The weight of a mixture of experts' load-balancing loss in recovery: the coefficient its family
    trains with (`router_aux_loss_coef`); 0 for a dense model."""
    return float(getattr(model.config, "router_aux_loss_coef", 0.0) or 0.0) if adapter.experts is not None else 0.0


def uneven_routers(model: nn.Module, adapter: Any) -> list[nn.Module]:
    """The routers of a mixture of experts whose blocks hold different expert counts (global
    allocation), whose family's load-balancing loss cannot pool them; [] otherwise."""
    if adapter.experts is None:
        return []
    blocks = adapter.block_list(model)
    counts = adapter.experts.counts(blocks)
    if len(set(counts.values())) <= 1:
        return []
    return [blocks[i].get_submodule(adapter.experts.router) for i in counts]


@contextmanager
def router_logits(routers: list[nn.Module]) -> Iterator[list[Tensor]]:
    """The logits (tokens, experts) every router in `routers` computes while the block runs."""
    seen: list[Tensor] = []
    handles = [r.register_forward_hook(lambda module, args, output: seen.append(output[0])) for r in routers]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def step_loss(out: Any, ids: Tensor, rows: Tensor, config: TrainConfig, teacher: nn.Module | None,
              cache: tuple[Tensor, Tensor] | None, aux_weight: float = 0.0, head: Head | None = None,
              chunk: int = 0, aux_loss: Tensor | None = None) -> tuple[Tensor, float, float, float]:  # fmt: skip
    """(loss, its distillation, cross-entropy and layer-wise parts) of one micro-batch, from the
    student's outputs `out` (with hidden states when config.hidden_weight > 0). A mixture of experts'
    load-balancing loss (`aux_loss`, else `out.aux_loss`, computed when the model is asked for its router
    logits) is added with `aux_weight`. With `head` (the student ran inside `hidden_out`: `out.logits` are its last
    hidden states), the logit losses are computed `chunk` positions at a time (`loss.head_loss`), the
    teacher's logits too."""
    kd = ce = layers = target = None
    teacher_head = None
    if teacher is not None and cache is None and config.needs_teacher:
        with torch.no_grad(), hidden_out(teacher) if head is not None else nullcontext() as teacher_head:
            target = teacher(input_ids=ids, output_hidden_states=config.hidden_weight > 0)
    if head is not None:
        loss, kd, ce = _chunked(out.logits, head, ids, rows, config, target, teacher_head, cache, chunk)
        kd, ce = (kd if config.kd_weight > 0 else None), (ce if config.kd_weight < 1 else None)
    else:
        logits = out.logits
        if config.kd_weight > 0:
            if cache is not None:
                values, indices = cache[0][rows].to(ids.device), cache[1][rows].to(ids.device)
                kd = topk_distillation(logits, values, indices, config.temperature)
            else:
                kd = kl_distillation(logits, target.logits, config.temperature)
        if config.kd_weight < 1:
            ce = next_token_cross_entropy(logits, ids)
        loss = None
    if config.hidden_weight > 0:  # block outputs: hidden_states[0] is the embeddings
        layers = layerwise_distillation(out.hidden_states[1:], target.hidden_states[1:], config.hidden_norm)
    aux = (aux_loss if aux_loss is not None else getattr(out, "aux_loss", None)) if aux_weight else None
    terms = [(1.0, loss)] if loss is not None else [(config.kd_weight, kd), (1 - config.kd_weight, ce)]
    loss = sum(w * part for w, part in (*terms, (config.hidden_weight, layers), (aux_weight, aux)) if part is not None)
    return loss, *(float(p.detach()) if p is not None else 0.0 for p in (kd, ce, layers))


def _chunked(hidden: Tensor, head: Head, ids: Tensor, rows: Tensor, config: TrainConfig, target: Any,
             teacher_head: Head | None, cache: tuple[Tensor, Tensor] | None, chunk: int) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """The weighted logit losses from the student's last hidden states, `chunk` positions at a time."""
    teacher = values = indices = None
    if config.kd_weight > 0 and cache is not None:
        values, indices = (c[rows].flatten(0, 1) for c in cache)
    elif config.kd_weight > 0:
        theirs = target.logits.flatten(0, -2)  # (positions, teacher hidden)
        teacher = lambda start, stop: teacher_head(theirs[start:stop])  # noqa: E731  (the teacher's logits of rows)
    targets = Targets(next_token_labels(ids), config.kd_weight, config.temperature, teacher, values, indices)
    return head_loss(hidden, head, targets, chunk)


@torch.no_grad()
def teacher_cache(teacher: nn.Module, windows: Tensor, config: TrainConfig, acc: Any,
                  chunk: int = 0) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The teacher's top-k logits of every training window, once (float16 values, int32 indices);
    with `chunk`, the logits of `chunk` positions at a time."""
    values, indices = [], []
    for start in tqdm(range(0, len(windows), config.micro_batch), desc="teacher top-k", unit="batch",
                      disable=not acc.is_main_process):  # fmt: skip
        ids = windows[start : start + config.micro_batch].to(acc.device)
        with acc.autocast(), hidden_out(teacher) if chunk else nullcontext() as head:
            out = teacher(input_ids=ids).logits  # (batch, seq, vocabulary), or hidden with a head
            if head is None:
                v, i = top_k(out, config.top_k)
            else:
                parts = [top_k(logits, config.top_k) for _, logits in head.chunks(out.flatten(0, 1), chunk)]
        if head is not None:  # joined outside autocast, which refuses to concatenate float16 values under bfloat16
            v, i = (torch.cat(p).unflatten(0, out.shape[:2]) for p in zip(*parts))
        values.append(v.cpu())
        indices.append(i.cpu())
    return torch.cat(values), torch.cat(indices)


def check_layerwise(teacher: Any, student: Any) -> None:
    """Layer-wise distillation pairs block l of the student with block l of the teacher: both configs
    must have the same number of blocks and hidden size."""
    shapes = [(c.num_hidden_layers, c.hidden_size) for c in (teacher, student)]
    if shapes[0] != shapes[1]:
        raise TrainError(f"--hidden-weight pairs the student's blocks with the teacher's, but the teacher has "
                         f"{shapes[0][0]} blocks of width {shapes[0][1]} and the student {shapes[1][0]} of width "
                         f"{shapes[1][1]} (depth- or hidden-pruned): distil from the logits only (--hidden-weight 0)")
