"""What one training step minimises: distillation from the teacher's logits (full, or its cached top-k),
cross-entropy, and layer-wise distillation of the block outputs, mixed by the config's weights."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from secateur.errors import TrainError
from secateur.train.config import TrainConfig
from secateur.train.loss import (kl_distillation, layerwise_distillation, next_token_cross_entropy, top_k,
                                 topk_distillation)


def router_weight(model: nn.Module, adapter: Any) -> float:
    """The weight of a mixture of experts' load-balancing loss in recovery: the coefficient its family
    trains with (`router_aux_loss_coef`); 0 for a dense model."""
    return float(getattr(model.config, "router_aux_loss_coef", 0.0) or 0.0) if adapter.experts is not None else 0.0


def step_loss(out: Any, ids: Tensor, rows: Tensor, config: TrainConfig, teacher: nn.Module | None,
              cache: tuple[Tensor, Tensor] | None, aux_weight: float = 0.0) -> tuple[Tensor, float, float, float]:
    """(loss, its distillation, cross-entropy and layer-wise parts) of one micro-batch, from the
    student's outputs `out` (with hidden states when config.hidden_weight > 0). A mixture of experts'
    load-balancing loss (`out.aux_loss`, computed when the model is asked for its router logits) is
    added with `aux_weight`."""
    logits = out.logits
    kd = ce = layers = target = None
    if teacher is not None and cache is None and config.needs_teacher:
        with torch.no_grad():
            target = teacher(input_ids=ids, output_hidden_states=config.hidden_weight > 0)
    if config.kd_weight > 0:
        if cache is not None:
            values, indices = cache[0][rows].to(ids.device), cache[1][rows].to(ids.device)
            kd = topk_distillation(logits, values, indices, config.temperature)
        else:
            kd = kl_distillation(logits, target.logits, config.temperature)
    if config.kd_weight < 1:
        ce = next_token_cross_entropy(logits, ids)
    if config.hidden_weight > 0:  # block outputs: hidden_states[0] is the embeddings
        layers = layerwise_distillation(out.hidden_states[1:], target.hidden_states[1:], config.hidden_norm)
    aux = getattr(out, "aux_loss", None) if aux_weight else None
    loss = sum(w * part for w, part in ((config.kd_weight, kd), (1 - config.kd_weight, ce),
                                        (config.hidden_weight, layers), (aux_weight, aux)) if part is not None)  # fmt: skip
    return loss, *(float(p.detach()) if p is not None else 0.0 for p in (kd, ce, layers))


@torch.no_grad()
def teacher_cache(teacher: nn.Module, windows: Tensor, config: TrainConfig, acc: Any) -> tuple[Tensor, Tensor]:
    """The teacher's top-k logits of every training window, once (float16 values, int32 indices)."""
    values, indices = [], []
    for start in tqdm(range(0, len(windows), config.micro_batch), desc="teacher top-k", unit="batch",
                      disable=not acc.is_main_process):  # fmt: skip
        with acc.autocast():
            logits = teacher(input_ids=windows[start : start + config.micro_batch].to(acc.device)).logits
        v, i = top_k(logits, config.top_k)
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
