"""Expert pruning for mixture-of-experts models: score every routed expert of every MoE block from
one streamed calibration pass, remove the lowest-scoring ones with their router rows.

Flow: `stats` (what the router and the experts do on calibration tokens, per expert, on the tokens
routed to it) -> `criteria` (a score per expert, or a kept set from a search) -> `prune` (slice the
fused expert weights and the router, update the config) -> `engine` (block by block) -> `stage`.
"""

from secateur.experts.config import ExpertsConfig
from secateur.experts.engine import ExpertsReport, prune_experts

__all__ = ["ExpertsConfig", "ExpertsReport", "prune_experts"]
