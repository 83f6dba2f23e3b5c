"""Calibration and evaluation text."""

from secateur.data.sources import NAMED, DataError, check_text_field, has_fields, load_text, needs_holdout
from secateur.data.windows import calibration_windows, evaluation_windows, tokenize, uses_bos

__all__ = [
    "NAMED", "DataError", "calibration_windows", "check_text_field", "has_fields", "evaluation_windows", "load_text", "needs_holdout", "tokenize",
    "uses_bos",
]  # fmt: skip
