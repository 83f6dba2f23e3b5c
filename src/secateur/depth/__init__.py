"""Depth pruning: remove whole decoder blocks, or their attention / MLP branches."""

from secateur.depth.config import (
    Amount,
    AngularConfig,
    BlockInfluenceConfig,
    DepthConfig,
    FinerCutConfig,
    GreedyLossConfig,
)
from secateur.depth.methods import REGISTRY, apply_selection, depth_prune, resolve_compensation, select_removals
from secateur.depth.search import Selection, Step
from secateur.depth.structure import DepthError, remove_blocks, remove_sublayers, removed_sublayers

__all__ = [
    "REGISTRY", "Amount", "AngularConfig", "BlockInfluenceConfig", "DepthConfig", "DepthError", "FinerCutConfig",
    "GreedyLossConfig", "Selection", "Step", "apply_selection", "depth_prune", "remove_blocks", "remove_sublayers",
    "removed_sublayers", "resolve_compensation", "select_removals",
]  # fmt: skip
