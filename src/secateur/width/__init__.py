"""Width pruning: remove attention heads (GQA-aware) and MLP channels, slicing weights and config."""

from secateur.width.config import WIDTH_ONLY_KEYS, WidthConfig, build_width_config
from secateur.width.prune import Statistics, WidthReport, gather_statistics, width_prune
from secateur.width.scores import IMPORTANCE
from secateur.width.structure import LayerWidth, WidthError, apply_widths

__all__ = [
    "IMPORTANCE", "WIDTH_ONLY_KEYS", "LayerWidth", "Statistics", "WidthConfig", "WidthError", "WidthReport",
    "apply_widths", "build_width_config", "gather_statistics", "width_prune",
]  # fmt: skip
