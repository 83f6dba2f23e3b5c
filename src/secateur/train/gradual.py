"""Gradual pruning during training (Zhu & Gupta 2017, "To prune, or not to prune").

The sparsity of the block layers follows the cubic schedule

    s_t = s_f + (s_i − s_f) · (1 − (t − t0) / (n·Δt))³,   t = t0, t0 + Δt, ..., t0 + n·Δt,

and is held in between: every Δt optimizer steps from step t0, for n updates, the masks are
recomputed so that a fraction s_t of each layer's weights is zero (s_i: the sparsity the model
starts with). Weights pruned once stay pruned (they rank first: zero weights score lowest), their
gradients are masked from then on and their optimizer moments cleared, so they never come back.

N:M: at fixed M, the number kept per group N_t falls from M towards the final N as the same cubic
schedule asks (N_t = M − round(s_t·M), never below the final N), and ends exactly on N:M.

Scores: `magnitude` |W| per layer (the paper); `wanda` |W|·‖x‖ per output row, with ‖x‖ the running
input norm of each column over every training token seen so far (a forward hook, no extra pass);
`taylor` |W·g| per layer, with g the gradient accumulated over the steps since the last update.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from secateur.config import NM
from secateur.sparsity.masks import nm_mask, per_layer_mask, per_row_mask

SCORES = ("magnitude", "wanda", "taylor")


def cubic_sparsity(step: int, initial: float, final: float, start: int, every: int, updates: int) -> float:
    """The schedule's target after optimizer step `step` (piecewise constant between updates)."""
    if step < start:
        return initial
    k = min((step - start) // every, updates)
    return final + (initial - final) * (1.0 - k / updates) ** 3


def kept_per_group(sparsity: float, n: int, m: int) -> int:
    """N_t of the N:M schedule: M − round(s_t·M), never below the final N."""
    return max(n, m - int(round(sparsity * m)))


@dataclass
class GradualPlan:
    """When updates happen (after optimizer steps start, start + every, ..., start + updates·every)
    and what they aim for."""

    initial: float
    final: float
    start: int
    every: int
    updates: int
    pattern: NM | None = None

    def due(self, step: int) -> bool:
        offset = step - self.start
        return offset >= 0 and offset % self.every == 0 and offset // self.every <= self.updates

    def target(self, step: int) -> float:
        return cubic_sparsity(step, self.initial, self.final, self.start, self.every, self.updates)

    @property
    def end(self) -> int:
        return self.start + self.updates * self.every


@dataclass
class GradualPruner:
    """Recomputes the masks of the target layers at the plan's updates (see module docstring)."""

    layers: list[tuple[str, nn.Module]]  # (parameter name of the weight, module)
    plan: GradualPlan
    score: str = "magnitude"
    norms: dict[str, Tensor] = field(default_factory=dict)  # wanda: Σ x² per input column
    grads: dict[str, Tensor] = field(default_factory=dict)  # taylor: Σ g since the last update
    events: list[dict] = field(default_factory=list)
    _hooks: list = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise ValueError(f"unknown gradual pruning score {self.score!r}")
        if self.score == "wanda":
            for name, module in self.layers:
                self._hooks.append(module.register_forward_pre_hook(self._norm_hook(name)))

    def _norm_hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().float()
            squares = x.reshape(-1, x.shape[-1]).pow(2).sum(0)
            self.norms[name] = squares if name not in self.norms else self.norms[name] + squares
        return hook

    def state_dict(self) -> dict:
        return {"norms": self.norms, "grads": self.grads, "events": self.events}

    def load_state_dict(self, state: dict) -> None:
        self.norms, self.grads, self.events = dict(state["norms"]), dict(state["grads"]), list(state["events"])

    def close(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    @torch.no_grad()
    def accumulate_gradients(self) -> None:
        """taylor: called after the gradients of a step are ready (before they are masked)."""
        if self.score != "taylor":
            return
        for name, module in self.layers:
            g = module.weight.grad
            if g is not None:
                self.grads[name] = g.detach().float() if name not in self.grads else self.grads[name] + g.float()

    def _scores(self, name: str, weight: Tensor) -> Tensor:
        w = weight.detach().float()
        if self.score == "wanda":
            norm = self.norms.get(name)
            return w.abs() * (norm.sqrt()[None] if norm is not None else 1.0)
        if self.score == "taylor":
            g = self.grads.get(name)
            return (w * g).abs() if g is not None else w.abs()
        return w.abs()

    @torch.no_grad()
    def update(self, step: int, masks: dict[str, Tensor]) -> dict[str, Tensor]:
        """New keep-masks for every layer at optimizer step `step`; existing zeros stay pruned."""
        target = self.plan.target(step)
        out = {}
        zeros = total = 0
        for name, module in self.layers:
            weight = module.weight
            scores = self._scores(name, weight).masked_fill(weight == 0, -1.0)  # pruned first, ties aside
            if self.plan.pattern is not None:
                n = kept_per_group(target, self.plan.pattern.n, self.plan.pattern.m)
                prune = nm_mask(scores, n, self.plan.pattern.m) if n < self.plan.pattern.m else torch.zeros_like(
                    scores, dtype=torch.bool)  # fmt: skip
                prune |= weight == 0
            elif self.score == "wanda":
                prune = per_row_mask(scores, target)
            else:
                prune = per_layer_mask(scores, target)
            keep = ~prune
            if name in masks:
                keep &= masks[name].to(keep.device)
            out[name] = keep
            zeros += int((~keep).sum())
            total += keep.numel()
        self.grads.clear()
        record = {"step": step, "target": target, "sparsity": zeros / max(total, 1)}
        if self.plan.pattern is not None:
            record["pattern"] = f"{kept_per_group(target, self.plan.pattern.n, self.plan.pattern.m)}:{self.plan.pattern.m}"
        self.events.append(record)
        return out
