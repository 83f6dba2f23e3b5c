"""Incremental width pruning during training (Adapt-Pruner's Adapt-Accel: remove a few percent of the
units at a time and train in between, instead of one large cut before training).

The removed share of the decoder blocks' parameters follows the cubic schedule of gradual pruning
(`GradualPlan`): f_t = f_final · (1 − (1 − k/n)³) after update k of n, so most units go early, while
the model is most redundant, and the last updates are small. Heads go in proportion: after update k a
block has lost round(a · f_t / f_final) of the a attention units it loses by the end. At each update the lowest-scoring heads
and MLP channels go, scored on the current (trained) weights and input statistics of a few training
windows, with the width stage's importance (FLAP's fluctuation by default, its bias compensation
included). Uniform allocation prunes every block to the widths a one-shot uniform prune of f_t would
give the original model (so the end shape is the one-shot one, stock config); adaptive allocation
ranks units across blocks for the parameters still to go. Adapt-Pruner's allocation (`adapt-pruner`)
gives each block its own removed share r_l: at every update

    r_l ← clamp(r_l + Δ − A · Î_l, 0, 0.99),

Δ the schedule's increment of the share, A the amplitude (0.03, the paper code's default) and Î_l
the block's importance, the negated mean cosine similarity of its input and output over the
statistics windows, centred over the blocks and divided by its largest magnitude (so in [−1, 1]):
blocks that change the residual stream more lose less. Each block then loses floor(r_l · its
original attention units) (whole key/value groups or query heads, a few per block: one goes once the
share covers it, as Adapt-Pruner's code counts heads) and keeps round((1 − r_l − c) · its original
MLP channels), never more units than it has, with one offset c for all blocks that makes the update
remove the schedule's share of the parameters (rounding and the clamps would otherwise drift from
it); units within a block go by the width importance as before.

Slicing replaces parameters: the optimizer's moments and the masks are sliced with them (the units
kept keep their Adam state), so training goes on where it was. The shapes after each update are
written with the checkpoint, so a resumed run rebuilds them before loading the weights.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from secateur.models.shapes import submodule
from secateur.depth.search import block_influences
from secateur.models import Adapter, refuse_experts
from secateur.train.gradual import GradualPlan
from secateur.width import LayerWidth, WidthConfig, apply_widths, width_prune
from secateur.models.shapes import widths_of
from secateur.width.prune import block_parameters, describe_widths, resolve_variant, shape_units, uniform_widths
from secateur.width.structure import Sliced, Take, enable_biases
from secateur.width.units import Units, unit_count, with_unit_counts

log = logging.getLogger(__name__)

STATISTICS_WINDOWS = 8  # training windows whose input moments score the units at each update
MAX_SHARE = 0.99  # Adapt-Pruner's cap on one block's removed share


def adapt_pruner_shares(shares: list[float], influence: list[float], increment: float,
                        amplitude: float) -> list[float]:  # fmt: skip
    """Adapt-Pruner's update of every block's removed share: r_l + Δ − A · Î_l, clamped to [0, 0.99],
    with Î_l = (I_l − mean I) / max |I − mean I| for the blocks' importances I (1 − mean cosine of
    each block's input and output, or any score where higher means more important)."""
    mean = sum(influence) / len(influence)
    centred = [i - mean for i in influence]
    scale = max(abs(c) for c in centred)
    normalised = [c / scale if scale > 0 else 0.0 for c in centred]
    return [min(max(r + increment - amplitude * n, 0.0), MAX_SHARE) for r, n in zip(shares, normalised)]


def kept_units(original: int, current: int, share: float, whole: bool = False) -> int:
    """Units a block keeps at removed share `share` of its `original` ones: at least one, at most the
    `current` ones (a unit removed stays removed). `whole`: a unit goes only once the share covers
    all of it (floor(share x original) removed, as Adapt-Pruner's code counts heads); else the kept
    count is rounded half up."""
    kept = original - math.floor(share * original + 1e-9) if whole else math.floor((1 - share) * original + 0.5)
    return max(1, min(current, kept))


def offset_shares(units: list[Units], original: dict[tuple[int, str], int], current: dict[tuple[int, str], int],
                  shares: list[float], target: float) -> tuple[dict[tuple[int, str], int], float]:  # fmt: skip
    """The units every block keeps: attention units at share r_l, a unit going once r_l covers it (a
    few whole heads per block: rounding half up or an offset would move them in large steps, past the
    schedule's share, which MLP channels that never regrow could not give back), MLP channels at
    r_l + c, with the one offset c in [-1, 1] for which the
    parameters removed from the original shapes first reach `target` (units: each block's units of
    each kind with their cost; original / current: unit counts by (block, kind)). Returns (kept, c)."""

    def kept(c: float) -> dict[tuple[int, str], int]:
        return {(u.block, u.kind): kept_units(original[(u.block, u.kind)], current[(u.block, u.kind)],
                                              min(max(shares[u.block] + (c if u.kind == "mlp" else 0.0), 0.0),
                                                  MAX_SHARE), whole=u.kind == "attention") for u in units}  # fmt: skip

    def removed(c: float) -> float:
        counts = kept(c)
        return sum((original[(u.block, u.kind)] - counts[(u.block, u.kind)]) * u.cost for u in units)

    low, high = -1.0, 1.0
    for _ in range(60):  # removed(c) grows with c: the smallest c that reaches the target
        middle = (low + high) / 2
        low, high = (low, middle) if removed(middle) >= target else (middle, high)
    return kept(high), high


@dataclass
class IncrementalWidth:
    """Prunes heads and MLP channels at the plan's updates (see module docstring)."""

    plan: GradualPlan  # initial 0, final: the share of the original block parameters to remove
    width: WidthConfig  # importance, allocation, heads and compensation of every update
    original: int  # block parameters before training
    targets: list[list[LayerWidth]] = field(default_factory=list)  # uniform: the widths after each update
    events: list[dict[str, Any]] = field(default_factory=list)
    amplitude: float | None = None  # Adapt-Pruner's allocation: A (None: uniform or adaptive)
    shares: list[float] = field(default_factory=list)  # Adapt-Pruner's allocation: every block's r_l
    units: list[Units] = field(default_factory=list)  # Adapt-Pruner's allocation: the original units and costs

    @classmethod
    def build(cls, model: nn.Module, adapter: Adapter, plan: GradualPlan, width: WidthConfig,
              amplitude: float | None = None) -> "IncrementalWidth":  # fmt: skip
        refuse_experts(adapter, "width pruning during training (--prune-width)")
        width, _ = resolve_variant(model, adapter, width)
        pruner = cls(plan, width, block_parameters(model, adapter), amplitude=amplitude)
        if amplitude is not None:
            if width.allocation != "adaptive":
                raise ValueError("Adapt-Pruner's allocation gives per-block widths: the width config must be adaptive")
            pruner.units = shape_units(model, width)[1]
            pruner.shares = [0.0] * len(adapter.block_list(model))
        if width.allocation == "uniform":  # the shapes are known up front
            final = uniform_widths(model, replace(width, fraction=plan.final))
            previous = widths_of(model, adapter)
            heads = next((attention_units(a, b, width.heads) for a, b in zip(previous, final)
                          if a.attention_heads is not None), None)  # fmt: skip
            for k in range(1, plan.updates + 1):
                share = plan.target(plan.start + k * plan.every)
                count = None if heads is None else math.floor(heads * share / plan.final + 0.5)
                previous = between(uniform_widths(model, replace(width, fraction=share), count), previous, final)
                pruner.targets.append(previous)
        return pruner

    def state_dict(self) -> dict[str, Any]:
        return {"events": self.events, "shares": self.shares}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.events = list(state["events"])
        self.shares = list(state.get("shares", self.shares))

    def update(self, model: nn.Module, adapter: Adapter, step: int, windows: Tensor, device: torch.device,
               batch_size: int, on_slice: Sliced) -> dict[str, Any]:  # fmt: skip
        """Prune `model` to the schedule's share after optimizer step `step`; returns the event."""
        share = self.plan.target(step)
        k = (step - self.plan.start) // self.plan.every
        before = block_parameters(model, adapter)
        left = share * self.original - (self.original - before)  # parameters still to remove
        extra: dict[str, Any] = {}
        was_training = model.training
        model.eval()
        if self.targets:  # uniform: the widths of update k
            widths = self.targets[k - 1] if k >= 1 else widths_of(model, adapter)
            changes = widths != widths_of(model, adapter)
        elif self.amplitude is not None:  # Adapt-Pruner: per-block shares from the blocks' importance
            widths, extra = self._adapt_pruner(model, adapter, step, share, windows, device, batch_size)
            changes = widths != widths_of(model, adapter)
        else:  # adaptive: rank units across blocks for what is left
            widths, changes = None, k >= 1 and left > 0
        if changes:
            config = replace(self.width, fraction=min(max(left / before, 1e-6), 0.999))
            width_prune(model, config, windows, device=device, batch_size=batch_size, widths=widths,
                        on_slice=on_slice)  # fmt: skip
        model.train(was_training)
        after = block_parameters(model, adapter)
        event = {"step": step, "target": share, "removed": 1 - after / self.original, "pruned": bool(changes),
                 "widths": [w.to_dict() for w in widths_of(model, adapter)], **extra}  # fmt: skip
        self.events.append(event)
        return event

    def _adapt_pruner(self, model: nn.Module, adapter: Adapter, step: int, share: float, windows: Tensor,
                      device: torch.device, batch_size: int) -> tuple[list[LayerWidth], dict[str, Any]]:  # fmt: skip
        """The widths of the update after `step` (schedule share `share`) under Adapt-Pruner's
        allocation (see the module docstring)."""
        now = widths_of(model, adapter)
        if step <= self.plan.start:
            return now, {}
        # higher influence (1 - cos) = more important, as Adapt-Pruner's -cos
        influence = block_influences(model, adapter, windows, batch_size, device)
        increment = share - self.plan.target(step - self.plan.every)  # the plan's target at its start is 0
        self.shares = adapt_pruner_shares(self.shares, influence, increment, self.amplitude)
        original = {(u.block, u.kind): len(u.scores) for u in self.units}
        current = {(u.block, u.kind): unit_count(now[u.block], u.kind, self.width.heads) for u in self.units}
        # the formula's shares are kept: the offset only corrects this update's rounding
        kept, offset = offset_shares(self.units, original, current, self.shares, share * self.original)
        widths = with_unit_counts(now, kept, self.width.heads)
        return widths, {"influence": influence, "shares": list(self.shares), "offset": offset}


def attention_units(start: LayerWidth, final: LayerWidth, heads: str | None) -> int | None:
    """Attention units (key/value groups, or query heads per group) one block loses by the end; None
    where heads are not pruned. Updates remove them in proportion to the share removed so far, so that
    heads go a few at a time like the MLP channels (not all at the last update, as the rounding of a
    one-shot prune of each share would have it)."""
    if heads in (None, "none") or start.attention_heads is None or final.attention_heads is None:
        return None
    if heads == "kv-groups":
        return start.key_value_heads - final.key_value_heads
    return start.attention_heads // start.key_value_heads - final.attention_heads // final.key_value_heads


def between(wanted: list[LayerWidth], previous: list[LayerWidth], final: list[LayerWidth]) -> list[LayerWidth]:
    """The one-shot uniform widths of a share, held between the last update's widths and the final
    ones: rounding (MLP widths to multiples, whole key/value groups) can make the one-shot widths of a
    larger share wider in one kind; a unit removed stays removed, and none goes below the end shape."""

    def clamp(w: int | None, p: int | None, f: int | None) -> int | None:
        return None if w is None else max(f, min(p, w))

    return [LayerWidth(*(clamp(getattr(w, k), getattr(p, k), getattr(f, k)) for k in ("attention_heads",
                                                                                    "key_value_heads", "channels")))
            for w, p, f in zip(wanted, previous, final)]  # fmt: skip


def shape_record(model: nn.Module, adapter: Adapter) -> dict[str, Any]:
    """What a resumed run needs to rebuild the shapes before loading a checkpoint's weights."""
    width, blocks = adapter.width, adapter.block_list(model)
    consumers = {"mlp": width.mlp.consumer, "attention": width.attention.o if width.attention else None}
    biases = [kind for kind, name in consumers.items()
              if name is not None and any(getattr(submodule(b, name), "bias", None) is not None for b in blocks)]
    return {"widths": [w.to_dict() for w in widths_of(model, adapter)], "biases": biases}


def reshape(model: nn.Module, adapter: Adapter, record: dict[str, Any]) -> None:
    """Shape a freshly loaded model as `shape_record` saw it (the values are loaded over it)."""
    widths = [LayerWidth(**w) for w in record["widths"]]
    for kind in record["biases"]:  # compensation biases added by earlier updates (no-op where present)
        enable_biases(model, adapter, kind)
    if widths == widths_of(model, adapter):
        return
    apply_widths(model, adapter, widths)
    describe_widths(model, adapter, widths)


def slice_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module,
                    sliced: dict[nn.Parameter, tuple[nn.Parameter, Take]]) -> None:  # fmt: skip
    """Point the optimizer at the model's current trainable parameters: a sliced parameter keeps its
    state, sliced the same way; a new one (a compensation bias) starts with none."""
    if len(optimizer.param_groups) != 1:
        raise RuntimeError("incremental width pruning expects one parameter group")
    state = {}
    for param, values in optimizer.state.items():
        if param in sliced:  # parameters hash by identity
            param, take = sliced[param]
            values = {k: take(v) if isinstance(v, Tensor) and v.dim() else v for k, v in values.items()}
        state[param] = values
    optimizer.param_groups[0]["params"] = [p for p in model.parameters() if p.requires_grad]
    optimizer.state.clear()
    optimizer.state.update(state)

def prune_width_step(widener: IncrementalWidth, model: nn.Module, adapter: Any, step: int, windows: Tensor,
                 config: Any, acc: Any, optimizer: Any, holder: Any) -> list[nn.Parameter]:  # fmt: skip
    """One incremental width update: slice the model, then the optimizer's moments and the masks with
    it. Returns the trainable parameters (for clipping)."""
    names = {p: n for n, p in model.named_parameters()}
    sliced: dict[nn.Parameter, tuple[nn.Parameter, Any]] = {}

    def on_slice(old: nn.Parameter, new: nn.Parameter, take: Any) -> None:
        sliced[old] = (new, take)

    chosen = torch.randperm(len(windows), generator=torch.Generator().manual_seed(config.seed + 1 + step))
    statistics = windows[chosen[:STATISTICS_WINDOWS]]
    event = widener.update(model, adapter, step, statistics, acc.device, config.micro_batch, on_slice)
    inner = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
    slice_optimizer(inner, model, sliced)
    masks = dict(holder.masks)
    for old, (_, take) in sliced.items():
        name = names.get(old)
        if name in masks:
            masks[name] = take(masks[name])
    holder.rebind(model, masks)
    log.info("width: step %d, %.1f%% of the block parameters removed", step, 100 * event["removed"])
    return [p for p in model.parameters() if p.requires_grad]
