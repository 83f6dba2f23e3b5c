"""Width pruning: remove attention heads (GQA-aware) and MLP channels, slicing weights and config."""

from secateur.width.config import WidthConfig
from secateur.width.prune import Statistics, WidthReport, gather_statistics, width_prune
from secateur.width.scores import IMPORTANCE
from secateur.models.shapes import LayerWidth
from secateur.width.structure import WidthError, apply_widths

__all__ = [
    "IMPORTANCE", "LayerWidth", "Statistics", "WidthConfig", "WidthError", "WidthReport",
    "apply_widths", "gather_statistics", "width_prune",
]  # fmt: skip
