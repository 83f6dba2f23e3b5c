"""Token pruning of long prompts: GemFilter (Shi et al. 2024, "Discovering the Gems in Early Layers").

An early layer already knows which prompt tokens the answer needs. GemFilter runs the first
`filter_layer + 1` blocks on the whole prompt and reads, in block `filter_layer`, the attention
logits of the prompt's last token: for each key position j, the sum over heads of q_last . k_j (keys
with their rotary embedding, a key/value group read by every head of its group). A moving average of
width `pool` smooths these scores, the `budget` highest positions are kept in their original order,
and the whole model then reads only those tokens as a fresh prompt: positions are re-indexed from 0,
so the rotary embedding is recomputed for the short prompt. Prompts no longer than the budget are
read whole.

The scores are read through transformers' attention interface: during the filter pass the model runs
an attention function that is scaled dot-product attention in every block but the filter block,
where it records the scores and stops the forward. A family whose attention does not go through that
interface is refused in one line.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from secateur.errors import ConfigError, SecateurError
from secateur.schema import REQUIRED, option

CAPTURE = "secateur_filter"  # the attention implementation of the filter pass


@dataclass(frozen=True)
class TokenPruning:
    """GemFilter's settings; flags and settings-file keys are generated from these fields."""

    filter_layer: int = option(REQUIRED, "the block (0-based) whose attention at the prompt's last token picks the "
                                         "kept tokens (secateur filter-layer MODEL recommends one)")
    budget: int = option(1024, "prompt tokens the whole model reads, kept in their order")
    pool: int = option(5, "width of the moving average over the scores before the top-k (odd; 1: none)")

    def __post_init__(self) -> None:
        if self.filter_layer < 0:
            raise ConfigError(f"--filter-layer must be at least 0, got {self.filter_layer}")
        if self.budget < 1:
            raise ConfigError(f"--budget must be at least 1, got {self.budget}")
        if self.pool < 1 or self.pool % 2 == 0:
            raise ConfigError(f"--pool must be an odd number of at least 1, got {self.pool}")


# --- the math ----------------------------------------------------------------------------------------


def last_query_scores(query: Tensor, key: Tensor) -> Tensor:
    """(batch, positions) sum over heads of the last query's dot product with every key.

    `query` (batch, heads, queries, dim), `key` (batch, kv_heads, positions, dim): head h reads key
    group h // (heads / kv_heads), as grouped-query attention does."""
    heads, groups = query.shape[1], key.shape[1]
    if heads % groups:
        raise ValueError(f"{heads} query heads cannot share {groups} key/value groups")
    last = query[:, :, -1].float()  # (batch, heads, dim)
    keys = key.float().repeat_interleave(heads // groups, dim=1)  # (batch, heads, positions, dim)
    return torch.einsum("bhd,bhnd->bn", last, keys)


def select(scores: Tensor, budget: int, pool: int = 5) -> Tensor:
    """The positions kept from one prompt's (positions,) scores: the `budget` highest after a moving
    average of width `pool` (zeros beyond the ends, as average pooling pads), in increasing order."""
    if scores.dim() != 1:
        raise ValueError(f"select takes one prompt's scores (positions,), got shape {tuple(scores.shape)}")
    if budget >= scores.numel():
        return torch.arange(scores.numel(), device=scores.device)
    smooth = scores.float()
    if pool > 1:
        smooth = F.avg_pool1d(smooth.view(1, 1, -1), pool, stride=1, padding=pool // 2).view(-1)
    return smooth.topk(budget).indices.sort().values


# --- reading the scores ------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised inside the forward once every requested block's scores are read."""


@dataclass
class _Capture:
    layers: dict[int, int]  # id(attention module) -> block index, for the blocks to read
    last: int  # the forward stops after this block
    scores: dict[int, Tensor] = field(default_factory=dict)


_ACTIVE: list[_Capture] = []


def _capture_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    capture = _ACTIVE[-1] if _ACTIVE else None
    block = capture.layers.get(id(module)) if capture is not None else None
    if block is not None:
        capture.scores[block] = last_query_scores(query, key)
        if block == capture.last:
            raise _Stop
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(CAPTURE, _capture_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(CAPTURE, sdpa_mask)


def check_layers(layers: Sequence[int], blocks: int) -> list[int]:
    """The filter blocks asked for, sorted and distinct; each must be one of the model's `blocks`."""
    wanted = sorted(set(layers))
    if not wanted or wanted[0] < 0 or wanted[-1] >= blocks:
        raise ConfigError(f"filter layers must lie in 0..{blocks - 1} (the model has {blocks} blocks), got "
                          f"{list(layers)}")
    return wanted


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Each block's attention module, in block order."""
    from secateur.models import adapter_for

    adapter = adapter_for(model)
    name = adapter.branches.of("attention")[0]
    return [block.get_submodule(name) for block in adapter.block_list(model)]


@torch.inference_mode()
def filter_scores(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None,
                  layers: Sequence[int] = (0,)) -> dict[int, Tensor]:  # fmt: skip
    """{block: (batch, positions) GemFilter scores} for `layers`, from one forward that stops after the
    last of them (the blocks after it and the LM head never run)."""
    modules = attention_modules(model)
    wanted = check_layers(layers, len(modules))
    _register()
    # left padding: each prompt's positions count from its first real token, as generation counts them
    positions = None if attention_mask is None else (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    before = model.config._attn_implementation
    capture = _Capture({id(modules[i]): i for i in wanted}, wanted[-1])
    model.set_attn_implementation(CAPTURE)
    try:
        if model.config._attn_implementation != CAPTURE:
            raise SecateurError(f"token pruning reads attention through transformers' attention interface, which "
                                f"{type(model).__name__} does not use")
        _ACTIVE.append(capture)
        try:
            model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False)
        except _Stop:
            pass
        finally:
            _ACTIVE.pop()
    finally:
        model.set_attn_implementation(before)
    if len(capture.scores) != len(wanted):
        raise SecateurError(f"{type(model).__name__}'s attention never reached the filter block; token pruning "
                            "cannot read this family's attention")
    return capture.scores


# --- pruning prompts and generating ------------------------------------------------------------------


def left_pad(prompts: Sequence[Sequence[int]], pad: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """(input_ids, attention_mask), each (batch, longest), the prompts aligned on their last token."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, longest - len(prompt):] = torch.as_tensor(list(prompt))
            mask[row, longest - len(prompt):] = 1
    return ids.to(device), mask.to(device)


def prune_prompts(model: nn.Module, prompts: Sequence[Sequence[int]], settings: TokenPruning,
                  pad: int = 0) -> list[list[int]]:  # fmt: skip
    """Each prompt's kept token ids (the whole prompt where it fits the budget). The prompts over the
    budget go through the filter blocks together, left-padded."""
    if any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt needs at least one token")
    kept = [list(p) for p in prompts]
    long = [i for i, p in enumerate(prompts) if len(p) > settings.budget]
    if not long:
        return kept
    device = next(model.parameters()).device
    ids, mask = left_pad([prompts[i] for i in long], pad, device)
    scores = filter_scores(model, ids, mask, [settings.filter_layer])[settings.filter_layer]
    for row, i in enumerate(long):
        length = len(prompts[i])
        chosen = select(scores[row, -length:], settings.budget, settings.pool)
        kept[i] = [prompts[i][j] for j in chosen.tolist()]
    return kept


@dataclass
class Generated:
    tokens: list[list[int]]  # each prompt's new tokens (up to its first end-of-sequence token)
    kept: list[int]  # prompt tokens the whole model read, per prompt
    prompt_tokens: list[int]  # prompt tokens given, per prompt
    seconds: float  # filtering, prefill and decoding together


@torch.inference_mode()
def generate(model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64,
             pruning: TokenPruning | None = None, pad: int | None = None,
             eos: int | Sequence[int] | None = None) -> Generated:  # fmt: skip
    """Greedy continuations of a batch of tokenized prompts of any lengths; with `pruning`, each long
    prompt is first cut to its GemFilter budget."""
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if not prompts:
        raise ConfigError("no prompt to generate from")
    start = time.perf_counter()
    pad = pad if pad is not None else (model.config.pad_token_id or 0)
    kept = prune_prompts(model, prompts, pruning, pad) if pruning is not None else [list(p) for p in prompts]
    device = next(model.parameters()).device
    ids, mask = left_pad(kept, pad, device)
    stops = {eos} if isinstance(eos, int) else set(eos or ())
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=pad, eos_token_id=sorted(stops) or None, top_p=None, top_k=None,
                         temperature=None)  # fmt: skip
    tokens = []
    for row in out[:, ids.shape[1]:].tolist():
        cut = next((i for i, t in enumerate(row) if t in stops), len(row))
        tokens.append(row[:cut])
    return Generated(tokens, [len(k) for k in kept], [len(p) for p in prompts], time.perf_counter() - start)


# --- evaluation: what the cut prompt costs -----------------------------------------------------------


@torch.inference_mode()
def continuation_perplexity(model: nn.Module, windows: Tensor, score_tokens: int, pruning: TokenPruning | None,
                            batch_size: int = 4, pad: int = 0) -> dict[str, Any]:  # fmt: skip
    """Perplexity of the last `score_tokens` tokens of every window (n, seq_len), each predicted from
    the window's tokens before it: the prompt (the window's first seq_len - score_tokens tokens),
    cut by GemFilter to its budget where `pruning` is given, then the scored tokens before it. The
    whole model reads the kept prompt as a fresh sequence (positions from 0), as generation does."""
    if not 0 < score_tokens < windows.shape[1]:
        raise ConfigError(f"--score-tokens must be between 1 and the window's {windows.shape[1] - 1}, got {score_tokens}")
    model.eval()
    device = next(model.parameters()).device
    start = time.perf_counter()
    total, kept_tokens = 0.0, 0
    for batch in windows.split(batch_size):
        prompts, tail = batch[:, :-score_tokens].tolist(), batch[:, -score_tokens:].to(device)
        kept = prune_prompts(model, prompts, pruning, pad) if pruning is not None else prompts
        prompt = torch.tensor(kept, dtype=torch.long, device=device)  # every window's prompt: one length
        logits = model(input_ids=torch.cat([prompt, tail], dim=1), use_cache=False).logits
        predictions = logits[:, prompt.shape[1] - 1 : -1].float()  # (b, score_tokens, vocab)
        total += float(F.cross_entropy(predictions.flatten(0, 1), tail.flatten(), reduction="sum"))
        kept_tokens += prompt.numel()
    mean = total / (len(windows) * score_tokens)
    return {"perplexity": math.exp(mean), "mean_nll": mean, "windows": len(windows), "score_tokens": score_tokens,
            "prompt_tokens": windows.shape[1] - score_tokens, "kept_prompt_tokens": kept_tokens / len(windows),
            "seconds": time.perf_counter() - start}  # fmt: skip
