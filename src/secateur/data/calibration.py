"""Calibration and evaluation windows cut from a text source for a model (its tokenizer, and the BOS
token its family puts first)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from secateur.config import CalibConfig
from secateur.data.sources import load_text, needs_holdout
from secateur.data.windows import calibration_windows, evaluation_windows, tokenize, uses_bos
from secateur.models import adapter_for


def bos_token(model: nn.Module, tokenizer: Any) -> int | None:
    return tokenizer.bos_token_id if uses_bos(tokenizer, adapter_for(model).needs_bos) else None


def calibration_data(model: nn.Module, tokenizer: Any, calib: CalibConfig) -> Tensor:
    """Seeded calibration windows; when the text is the evaluation text, its eval region is skipped."""
    text = load_text(calib.source, "calibration", calib.text_field)
    tokens = tokenize(tokenizer, text)
    bos = bos_token(model, tokenizer)
    skip = 0
    if needs_holdout(calib.source):
        skip = calib.holdout_windows * (calib.holdout_seq_len - (bos is not None))
    return calibration_windows(tokens, calib.seq_len, calib.samples, calib.seed, skip=skip, bos=bos)


def evaluation_data(model: nn.Module, tokenizer: Any, source: str, seq_len: int, windows: int, field: str = "text") -> Tensor:
    tokens = tokenize(tokenizer, load_text(source, "evaluation", field))
    return evaluation_windows(tokens, seq_len, windows, bos=bos_token(model, tokenizer))
