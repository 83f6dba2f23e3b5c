"""Ancestral sampling of whole windows: each prompt continued by the model's own next-token
distribution (temperature 1, no truncation), one forward per token with the KV cache, a batch of
prompts at a time. Recovery uses it to let the teacher write its student's training text
(self-data distillation)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor, nn

from secateur.models.cache import cache_of, with_cache


def spread(count: int, share: float) -> list[int]:
    """The positions of floor(count x share) of `count` windows, spread evenly: window i is chosen when
    floor((i + 1) x share) passes an integer, so every run of consecutive windows holds its share as
    closely as whole windows allow (a mixture's proportions stay as they were)."""
    return [i for i in range(count) if int((i + 1) * share + 1e-9) > int(i * share + 1e-9)]


@torch.inference_mode()
def sample_continuations(model: nn.Module, prompts: Tensor, length: int, generator: torch.Generator, *,
                         batch: int = 16, autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
                         device: torch.device | None = None) -> Tensor:  # fmt: skip
    """`prompts` (n, p) token ids, each continued to `length` tokens by sampling x_t ~ softmax(logits_t)
    from `model`, `batch` prompts at a time; returns (n, length) ids on the prompts' device. The draws
    come from `generator` (on the model's device) in row order, so a run is repeatable."""
    n, p = prompts.shape
    if not 0 < p <= length:
        raise ValueError(f"prompts of {p} tokens cannot be continued to {length}")
    device = device or next(model.parameters()).device
    scope = autocast or contextlib.nullcontext
    out = []
    for rows in prompts.split(batch):
        ids = rows.to(device)
        pieces, cache, step = [ids], None, ids
        with scope():
            for _ in range(length - p):
                result = model(input_ids=step, **with_cache(model, cache), logits_to_keep=1)
                cache = cache_of(result)
                probs = torch.softmax(result.logits[:, -1].float(), dim=-1)
                step = torch.multinomial(probs, 1, generator=generator)
                pieces.append(step)
        out.append(torch.cat(pieces, dim=1).to(prompts.device))
        del cache
    return torch.cat(out) if out else prompts.new_zeros((0, length))
