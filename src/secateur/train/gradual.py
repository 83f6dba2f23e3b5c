"""Gradual pruning during training (Zhu & Gupta 2017, "To prune, or not to prune"), split as
torch.ao.pruning splits it: a scheduler (`GradualPlan`: when the masks update and which sparsity
they aim for) and a sparsifier (`Sparsifier`: where the masks come from).

The schedule: the sparsity of the block layers follows the cubic

    s_t = s_f + (s_i − s_f) · (1 − (t − t0) / (n·Δt))³,   t = t0, t0 + Δt, ..., t0 + n·Δt,

and is held in between: every Δt optimizer steps from step t0, for n updates, the masks are
recomputed so that a fraction s_t of each layer's weights is zero (s_i: the sparsity the model
starts with). Weights pruned once stay pruned (they rank below every score and stay in the mask),
their gradients are masked from then on and their optimizer moments cleared, so they never come back.
N:M: at fixed M, the number kept per group N_t falls from M towards the final N as the same cubic
schedule asks (N_t = M − round(s_t·M), never below the final N), and ends exactly on N:M.

The sparsifier's scores are the sparsity stage's: a method of the sparsity registry whose score
needs at most the input norms (magnitude |W| per layer, the paper's; wanda |W|·‖x‖ per output row;
ria) ranks with that method's own score and scope, its input statistic (`InputNormSq`, the one-shot
engine's accumulator) fed by a forward pre-hook over every training token seen so far, summed over
processes at each update. `taylor` |W·g| per layer, with g the gradient accumulated over the steps
since the last update, is the one score only training has.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from secateur.calibrate.stats import InputNormSq
from secateur.config import NM, Unstructured
from secateur.errors import TrainError
from secateur.models import refuse_experts
from secateur.sparsity.methods import REGISTRY, select_mask
from secateur.sparsity.prune import target_layers

TAYLOR = "taylor"


def scores() -> tuple[str, ...]:
    """The scores gradual pruning takes: the sparsity methods whose score needs at most input norms
    (and no pass of its own), then taylor."""
    usable = (name for name, spec in REGISTRY.items() if set(spec.statistics) <= {InputNormSq} and spec.prepare is None)
    return (*usable, TAYLOR)


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


def plan_for(steps: int, start_fraction: float, end_fraction: float, every: int | None, initial: float, final: float,
             pattern: NM | None = None) -> GradualPlan:  # fmt: skip
    """The updates between `start_fraction` and `end_fraction` of `steps` optimizer steps, every
    `every` steps (None: 10 updates); a last update after the run is refused."""
    start = int(start_fraction * steps)
    end = max(start + 1, int(round(end_fraction * steps)))
    every = every or max(1, (end - start) // 10)
    updates = max(1, (end - start) // every)
    if start + updates * every > steps:
        raise TrainError(f"the last pruning update (step {start + updates * every}) comes after the run's {steps} "
                         "steps: lower --prune-every or --prune-end, or train longer")
    return GradualPlan(initial, final, start, every, updates, pattern)


@dataclass
class Sparsifier:
    """Recomputes the masks of the target layers at the plan's updates (see the module docstring)."""

    layers: list[tuple[str, nn.Module]]  # (parameter name of the weight, module)
    plan: GradualPlan
    score: str = "magnitude"
    statistics: dict[str, InputNormSq] = field(default_factory=dict)  # input norms, per layer
    grads: dict[str, Tensor] = field(default_factory=dict)  # taylor: Σ g since the last update
    events: list[dict] = field(default_factory=list)
    _hooks: list = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.score not in scores():
            raise ValueError(f"unknown gradual pruning score {self.score!r}; choose one of {', '.join(scores())}")
        self.method = None if self.score == TAYLOR else REGISTRY[self.score]
        self.config = self.method.config_type() if self.method is not None else None
        if self.method is not None and self.method.statistics:
            for name, module in self.layers:
                self._hooks.append(module.register_forward_pre_hook(self._input_hook(name)))

    def _input_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            if name not in self.statistics:
                self.statistics[name] = InputNormSq(x.shape[-1], x.device)
            self.statistics[name].update(x)
        return hook

    def state_dict(self) -> dict:
        return {"norms": {k: s.value for k, s in self.statistics.items()}, "grads": self.grads, "events": self.events}

    def load_state_dict(self, state: dict) -> None:
        self.statistics = {}
        for name, value in state["norms"].items():
            self.statistics[name] = InputNormSq(value.shape[0], value.device)
            self.statistics[name].value = value
        self.grads, self.events = dict(state["grads"]), list(state["events"])

    def close(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    @torch.no_grad()
    def accumulate_gradients(self) -> None:
        """taylor: called after the gradients of a step are ready (before they are masked)."""
        if self.score != TAYLOR:
            return
        for name, module in self.layers:
            g = module.weight.grad
            if g is not None:
                self.grads[name] = g.detach().float() if name not in self.grads else self.grads[name] + g.float()

    def _scores(self, name: str, weight: Tensor, reduce: Callable[[Tensor], Tensor]) -> tuple[Tensor, str]:
        """A layer's scores and the scope they are ranked in."""
        w = weight.detach()
        if self.method is None:  # taylor
            g = self.grads.get(name)
            return ((w.float() * g).abs() if g is not None else w.float().abs()), "per_layer"
        stat = self.statistics.get(name)
        norm = reduce(stat.value.clone()).sqrt() if stat is not None else None
        if norm is None and self.method.statistics:  # no token seen yet: weights alone
            norm = torch.ones(w.shape[1], device=w.device)
        return self.method.score(self.config, w, norm), getattr(self.config, "scope", "per_layer")

    @torch.no_grad()
    def update(self, step: int, masks: dict[str, Tensor],
               reduce: Callable[[Tensor], Tensor] = lambda t: t) -> dict[str, Tensor]:  # fmt: skip
        """New keep-masks for every layer at optimizer step `step`; existing zeros stay pruned.
        `reduce` sums an input statistic over processes (each saw other tokens)."""
        fraction = self.plan.target(step)
        pattern = self.plan.pattern
        target = NM(kept_per_group(fraction, pattern.n, pattern.m), pattern.m) if pattern else Unstructured(fraction)
        out, zeros, total = {}, 0, 0
        for name, module in self.layers:
            weight = module.weight
            scores, scope = self._scores(name, weight, reduce)
            keep = ~select_mask(scores, target, scope, frozen=weight == 0)
            if name in masks:
                keep &= masks[name].to(keep.device)
            out[name] = keep
            zeros += int((~keep).sum())
            total += keep.numel()
        self.grads.clear()
        record = {"step": step, "target": fraction, "sparsity": zeros / max(total, 1)}
        if pattern is not None:
            record["pattern"] = f"{target.n}:{target.m}"
        self.events.append(record)
        return out


def sparsifier_for(layers: list[tuple[str, nn.Module]], score: str, steps: int, start_fraction: float,
                   end_fraction: float, every: int | None, final: float | None, pattern: NM | None) -> Sparsifier:  # fmt: skip
    """The sparsifier of `layers`, from the sparsity they already have to `final` (or `pattern`)."""
    zeros = sum(int((m.weight == 0).sum()) for _, m in layers)
    initial = zeros / max(sum(m.weight.numel() for _, m in layers), 1)
    final = 1 - pattern.n / pattern.m if pattern else final
    if final <= initial:
        raise TrainError(f"gradual pruning to {final:.3f} from a model already at {initial:.3f} sparsity")
    return Sparsifier(layers, plan_for(steps, start_fraction, end_fraction, every, initial, final, pattern), score)


def gradual_pruning(model: nn.Module, adapter: Any, config: Any, steps: int) -> Sparsifier:
    """Gradual pruning of every target layer, on the schedule of `config` over `steps` optimizer steps."""
    refuse_experts(adapter, "gradual pruning (--prune-to)")
    layers = [(f"{name}.weight", module) for name, module in target_layers(model, adapter)]
    pattern = NM.parse(config.prune_pattern) if config.prune_pattern else None
    return sparsifier_for(layers, config.prune_score, steps, config.prune_start, config.prune_end, config.prune_every,
                          config.prune_to, pattern)


__all__ = ["GradualPlan", "Sparsifier", "cubic_sparsity", "kept_per_group", "gradual_pruning", "plan_for", "scores", "sparsifier_for"]
