"""Token windows: evaluation takes the first N non-overlapping windows of a text; calibration draws
seeded, non-overlapping windows from the text after the evaluation region."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from secateur.data.sources import DataError


def tokenize(tokenizer: Any, text: str) -> Tensor:
    """The whole text as one stream of token ids, without special tokens."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def uses_bos(tokenizer: Any, family_needs_bos: bool) -> bool:
    """BOS goes first in each window when the family needs it or the tokenizer adds it by default."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    if family_needs_bos:
        return True
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(probe) and probe[0] == bos


def with_bos(windows: Tensor, bos: int | None) -> Tensor:
    if bos is None:
        return windows
    return torch.cat([torch.full((len(windows), 1), bos, dtype=windows.dtype), windows], dim=1)


def evaluation_windows(tokens: Tensor, seq_len: int, count: int, bos: int | None = None) -> Tensor:
    """The first `count` non-overlapping windows of `seq_len` tokens (BOS included when given)."""
    span = seq_len - (bos is not None)
    needed = span * count
    if count < 1 or seq_len < 2:
        raise DataError("evaluation needs at least one window of at least 2 tokens")
    if len(tokens) < needed:
        raise DataError(
            f"the text has {len(tokens)} tokens; {count} windows of {seq_len} need {needed}: "
            "use fewer --windows, a shorter --seq-len or a longer text"
        )
    return with_bos(tokens[:needed].view(count, span), bos)


def calibration_windows(
    tokens: Tensor, seq_len: int, count: int, seed: int, skip: int = 0, bos: int | None = None
) -> Tensor:
    """`count` non-overlapping windows drawn with `seed` from tokens[skip:] (skip = eval region)."""
    span = seq_len - (bos is not None)
    pool = tokens[skip:]
    slots = len(pool) // span
    if slots < count:
        raise DataError(
            f"calibration needs {count} windows of {seq_len} tokens but the text has room for {slots} "
            f"({len(pool)} tokens after the {skip} held out for evaluation): use fewer samples or more text"
        )
    generator = torch.Generator().manual_seed(seed)
    offset = int(torch.randint(0, len(pool) - slots * span + 1, (1,), generator=generator))
    chosen = torch.randperm(slots, generator=generator)[:count].sort().values
    starts = offset + chosen * span  # (count,)
    return with_bos(torch.stack([pool[s : s + span] for s in starts.tolist()]), bos)
