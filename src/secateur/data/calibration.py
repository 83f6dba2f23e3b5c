"""Calibration and evaluation windows cut from a text source for a model (its tokenizer, and the BOS
token its family puts first)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from secateur.config import CalibConfig
from secateur.data.mixture import MIXTURES, interleave, shares
from secateur.data.sources import DataError, load_text, needs_holdout
from secateur.data.windows import with_bos, calibration_windows, evaluation_windows, tokenize, uses_bos
from secateur.models import adapter_for


def bos_token(model: nn.Module, tokenizer: Any) -> int | None:
    return tokenizer.bos_token_id if uses_bos(tokenizer, adapter_for(model).needs_bos) else None


def calibration_data(model: nn.Module, tokenizer: Any, calib: CalibConfig) -> Tensor:
    """Seeded calibration windows; when the text is the evaluation text, its eval region is skipped. A
    mixture draws each corpus's share (its part of the windows, seed + its index) the same way and
    interleaves them (`mixture.labels` names the corpus of each window)."""
    if calib.source in MIXTURES:
        mixture = MIXTURES[calib.source]
        counts = shares(calib.samples, tuple(weight for _, weight in mixture.parts))
        drawn = [_windows(model, tokenizer, replace(calib, source=name, samples=count, seed=calib.seed + i))
                 if count else None for i, (name, count) in enumerate(zip(mixture.sources, counts))]  # fmt: skip
        taken, rows = [0] * len(counts), []
        for part in interleave(counts):
            rows.append(drawn[part][taken[part]])
            taken[part] += 1
        return torch.stack(rows)
    return _windows(model, tokenizer, calib)


def _windows(model: nn.Module, tokenizer: Any, calib: CalibConfig) -> Tensor:
    text = load_text(calib.source, "calibration", calib.text_field)
    tokens = tokenize(tokenizer, text)
    bos = bos_token(model, tokenizer)
    skip = 0
    if needs_holdout(calib.source):
        skip = calib.holdout_windows * (calib.holdout_seq_len - (bos is not None))
    try:
        return calibration_windows(tokens, calib.seq_len, calib.samples, calib.seed, skip=skip, bos=bos)
    except DataError as exc:
        raise DataError(f"{calib.source}: {exc}") from None


def evaluation_data(model: nn.Module, tokenizer: Any, source: str, seq_len: int, windows: int, field: str = "text") -> Tensor:
    if source in MIXTURES:
        raise DataError(f"{source} is a mixture: evaluate on its corpora one by one ({', '.join(MIXTURES[source].sources)})")
    tokens = tokenize(tokenizer, load_text(source, "evaluation", field))
    return evaluation_windows(tokens, seq_len, windows, bos=bos_token(model, tokenizer))


def retokenize(windows: Tensor, old: Any, new: Any, model: nn.Module) -> Tensor:
    """The texts of `windows` (ids of tokenizer `old`) in the ids of tokenizer `new`: each window's text
    tokenized anew, the streams joined and cut into windows of the same length (BOS first again when
    the family uses it). A new vocabulary that splits text more finely covers a little less text per
    window; there are fewer windows only if the texts no longer fill them."""
    old_bos, new_bos = bos_token(model, old), bos_token(model, new)
    body = windows[:, 1:] if old_bos is not None and bool((windows[:, 0] == old_bos).all()) else windows
    span = windows.shape[1] - (new_bos is not None)
    texts = [old.decode(row.tolist(), clean_up_tokenization_spaces=False) for row in body]
    stream = torch.cat([tokenize(new, text) for text in texts])
    count = min(len(windows), len(stream) // span)
    if count < 1:
        raise DataError(f"the windows' text is {len(stream)} tokens in the new vocabulary, less than one window of {span}")
    return with_bos(stream[: count * span].view(count, span), new_bos)
