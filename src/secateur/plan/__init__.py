"""`secateur plan`: from a budget (decode or prefill speedup in an engine, parameters, file size) to
the mix of depth, width and hidden pruning with the least damage, with the Pareto front to prove it."""

from secateur.plan.config import PlanConfig
from secateur.plan.planner import plan
from secateur.plan.targets import Target, parse_target

__all__ = ["PlanConfig", "Target", "parse_target", "plan"]
