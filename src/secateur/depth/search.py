"""Choosing what to remove, from calibration data.

One-pass scores (Block Influence, angular distance) stream the model block by block, like the
pruning engine: only the current block must sit on the device.

Greedy searches (loss, FinerCut) evaluate every remaining candidate at every step. Each candidate
only changes the computation from its own block onward, so every step first records the input of
each block under the removals so far; a candidate at block j then runs the model from that state.
The model runs through its own forward (masks, rotary tables, final norm, soft-capping), with block
forwards patched: blocks before j return the recorded state, removed blocks pass their input on.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from secateur.calibrate.stream import run_block, stream_blocks
from secateur.depth.scores import angular_distance, block_influence, js_divergence, lowest
from secateur.depth.structure import KINDS, DepthError, block_parameters, branch_parameters, is_removed, without
from secateur.models import Adapter

log = logging.getLogger(__name__)

# Candidates are scored on the next-token predictions at every SCORE_STRIDE-th position: the LM head
# over a large vocabulary would otherwise cost as much as half the blocks (every position still
# runs through the blocks, so attention sees full windows).
SCORE_STRIDE = 4

Unit = Union[int, tuple[int, str]]  # a block index, or (block index, "attention" | "mlp")


@dataclass
class Step:
    unit: Unit  # in the original model's numbering
    score: float  # the method's score of this unit when it was chosen (lower = removed first)
    parameters: int  # parameters the unit held


@dataclass
class Selection:
    """What a search chose, in removal order, and what its scores mean."""

    metric: str
    steps: list[Step] = field(default_factory=list)
    seconds: float = 0.0
    compensation: list[dict[str, Any]] | None = None  # one record per compensated run, when asked
    compensated: bool | None = None  # set by depth_prune: whether the removed runs were compensated
    kept: list[int] = field(default_factory=list)  # blocks the search could not remove (the final one, ...)
    variant: str | None = None  # why compensation is off where the method could have used it

    @property
    def blocks(self) -> list[int]:
        return sorted(s.unit for s in self.steps if isinstance(s.unit, int))

    @property
    def sublayers(self) -> list[tuple[int, str]]:
        return sorted(s.unit for s in self.steps if isinstance(s.unit, tuple))

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "seconds": self.seconds,
            "kept": self.kept,
            "removed": [{"step": i + 1, "unit": s.unit, "score": s.score, "parameters": s.parameters}
                        for i, s in enumerate(self.steps)],
            **({"compensation": self.compensation} if self.compensation is not None else {}),
            **({"compensated": self.compensated, "variant": self.variant} if self.compensated is not None else {}),
        }  # fmt: skip


# --- one pass: the hidden state at every block boundary ----------------------------------------------


@torch.no_grad()
def boundary_states(model: nn.Module, adapter: Adapter, calibration: Tensor, batch_size: int,
                    device: torch.device) -> Iterator[tuple[int, list[Tensor]]]:
    """Yield (l, states entering block l) for l = 0..L (L: leaving the last block), per batch."""
    first = True
    for index, block, inputs in stream_blocks(model, adapter, calibration, batch_size, device, "block states"):
        if first:
            yield 0, inputs.hidden
            first = False
        inputs.hidden = [run_block(block, h, extra) for h, extra in zip(inputs.hidden, inputs.extras[index])]
        yield index + 1, inputs.hidden


def _mean(values: list[Tensor]) -> float:
    return float(torch.cat([v.reshape(-1) for v in values]).mean())


def block_influences(model: nn.Module, adapter: Adapter, calibration: Tensor, batch_size: int,
                     device: torch.device) -> list[float]:
    """Every block's Block Influence, 1 - cos(block input, block output), mean over the calibration tokens."""
    scores: list[float] = []
    previous: list[Tensor] | None = None
    for _, states in boundary_states(model, adapter, calibration, batch_size, device):
        if previous is not None:
            scores.append(_mean([block_influence(a, b) for a, b in zip(previous, states)]))
        previous = states
    return scores


def select_block_influence(model: nn.Module, adapter: Adapter, calibration: Tensor, count: int,
                           batch_size: int, device: torch.device, protected: frozenset[int] = frozenset()) -> Selection:
    """The `count` blocks with the lowest mean Block Influence (computed once, on the dense model),
    `protected` blocks aside."""
    scores = block_influences(model, adapter, calibration, batch_size, device)
    blocks = adapter.block_list(model)
    allowed = [s if i not in protected else math.inf for i, s in enumerate(scores)]
    steps = [Step(i, scores[i], block_parameters(blocks[i])) for i in lowest(allowed, count)]
    return Selection("block influence: 1 - cos(block input, block output), mean over calibration tokens", steps)


def angular_distances(model: nn.Module, adapter: Adapter, calibration: Tensor, counts: list[int], batch_size: int,
                      device: torch.device, positions: str = "all") -> dict[int, list[float]]:
    """For each span length in `counts`, the angular distance of every span of that many consecutive
    blocks (entry l: blocks l .. l + count - 1), from one pass over the dense model."""
    window: deque[list[Tensor]] = deque(maxlen=max(counts) + 1)
    distances: dict[int, list[float]] = {count: [] for count in counts}
    for _, states in boundary_states(model, adapter, calibration, batch_size, device):
        window.append([s[:, -1] if positions == "last" else s for s in states])
        for count in counts:
            if len(window) > count:
                distances[count].append(_mean([angular_distance(a, b) for a, b in zip(window[-1 - count], window[-1])]))
    return distances


def select_angular_span(model: nn.Module, adapter: Adapter, calibration: Tensor, count: int, batch_size: int,
                        device: torch.device, positions: str = "all", protected: frozenset[int] = frozenset()) -> Selection:
    """The span of `count` consecutive blocks with the smallest angular distance between the state
    entering its first block and the state leaving its last one, among the spans that hold no
    `protected` block."""
    distances = angular_distances(model, adapter, calibration, [count], batch_size, device, positions)[count]
    allowed = [d if not protected & set(range(l, l + count)) else math.inf for l, d in enumerate(distances)]
    if not any(math.isfinite(d) for d in allowed):
        raise DepthError(f"no span of {count} consecutive blocks avoids the kept blocks {sorted(protected)}; ask for "
                         "fewer blocks")
    start = lowest(allowed, 1)[0]
    blocks = adapter.block_list(model)
    steps = [Step(i, distances[start], block_parameters(blocks[i])) for i in range(start, start + count)]
    return Selection(f"angular distance arccos(cos)/pi between the states entering block l and block l+{count}, "
                     f"{positions} tokens; all spans: {[round(d, 5) for d in distances]}", steps)


# --- greedy searches ---------------------------------------------------------------------------------


def _identity(hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    return hidden_states


def _returning(state: Tensor) -> Callable[..., Tensor]:
    def forward(hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return state

    return forward


@contextmanager
def _patched(blocks: nn.ModuleList, forwards: dict[int, Callable[..., Tensor]]) -> Iterator[None]:
    for index, forward in forwards.items():
        blocks[index].forward = forward  # instance attribute shadows the class method
    try:
        yield
    finally:
        for index in forwards:
            del blocks[index].forward


class _Search:
    """The state of a greedy search: removed units so far, calibration batches, the distance metric."""

    def __init__(self, model: nn.Module, adapter: Adapter, calibration: Tensor, batch_size: int,
                 device: torch.device, metric: Callable[[Tensor, int], Tensor] | None = None,
                 protected: frozenset[int] = frozenset()) -> None:  # fmt: skip
        self.model, self.adapter, self.device, self.metric = model, adapter, device, metric
        self.protected = protected  # blocks (and their branches) that are never candidates
        self.blocks = adapter.block_list(model)
        self.batches = [b.to(device) for b in calibration.split(batch_size or len(calibration))]
        self.positions = torch.arange(0, calibration.shape[1] - 1, SCORE_STRIDE, device=device)  # scored positions
        self.removed_blocks: set[int] = set()
        self.removed_branches: set[tuple[int, str]] = set()

    def _skips(self) -> dict[int, Callable[..., Tensor]]:
        return {i: _identity for i in self.removed_blocks}

    @torch.no_grad()
    def block_inputs(self) -> list[list[Tensor]]:
        """[block][batch] -> the input of every block under the current removals."""
        inputs: list[list[Tensor]] = [[] for _ in self.blocks]
        handles = [b.register_forward_pre_hook(lambda m, a, k, i=i: inputs[i].append(a[0] if a else k["hidden_states"]),
                                               with_kwargs=True) for i, b in enumerate(self.blocks)]  # fmt: skip
        try:
            with self._branches_removed(), _patched(self.blocks, self._skips()):
                for batch in self.batches:
                    self.model(input_ids=batch, use_cache=False, logits_to_keep=1)  # only the block inputs matter
        finally:
            for handle in handles:
                handle.remove()
        return inputs

    @contextmanager
    def _branches_removed(self, extra: tuple[int, str] | None = None) -> Iterator[None]:
        with ExitStack() as stack:
            for index, kind in sorted(self.removed_branches | ({extra} if extra else set())):
                stack.enter_context(without(self.blocks[index], self.adapter, kind))
            yield

    @torch.no_grad()
    def score(self, unit: Unit, inputs: list[list[Tensor]]) -> float:
        """Mean metric over calibration tokens with `unit` removed on top of the current removals."""
        start = unit if isinstance(unit, int) else unit[0]
        total, count = 0.0, 0
        for b, batch in enumerate(self.batches):
            forwards = self._skips()
            if start > 0:  # blocks before `start` are replaced by the recorded state entering it
                forwards.update({i: _identity for i in range(1, start)})
                forwards[0] = _returning(inputs[start][b])
            if isinstance(unit, int):
                forwards[unit] = _identity
            branch = unit if isinstance(unit, tuple) else None
            with self._branches_removed(branch), _patched(self.blocks, forwards):
                logits = self.model(input_ids=batch, use_cache=False, logits_to_keep=self.positions).logits
            values = self.metric(logits, b)
            total, count = total + float(values.sum()), count + values.numel()
        return total / count


def _loss_metric(batches: list[Tensor], positions: Tensor) -> Callable[[Tensor, int], Tensor]:
    def metric(logits: Tensor, b: int) -> Tensor:  # logits: (batch, positions, vocab)
        targets = batches[b][:, positions + 1]  # (batch, positions)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")

    return metric


def _js_metric(reference: list[Tensor]) -> Callable[[Tensor, int], Tensor]:
    def metric(logits: Tensor, b: int) -> Tensor:
        return js_divergence(logits, reference[b])

    return metric


def _candidates(search: _Search, sublayers: bool) -> list[Unit]:
    alive = [i for i in range(len(search.blocks)) if i not in search.removed_blocks]
    if not sublayers:
        return [i for i in alive if i not in search.protected] if len(alive) > 1 else []
    units: list[Unit] = [(i, k) for i in alive for k in KINDS if (i, k) not in search.removed_branches
                         and not is_removed(search.blocks[i], search.adapter, k)]  # fmt: skip
    attention_left = sum(1 for u in units if u[1] == "attention")
    return [u for u in units if (u[1] != "attention" or attention_left > 1)  # keep one attention
            and u[0] not in search.protected]


def _unit_parameters(search: _Search, unit: Unit) -> int:
    if isinstance(unit, int):
        return block_parameters(search.blocks[unit])
    return branch_parameters(search.blocks[unit[0]], search.adapter, unit[1])


def greedy(search: _Search, done: Callable[[list[Step]], bool], sublayers: bool, desc: str) -> list[Step]:
    """Remove the best candidate, re-score the rest, until `done(steps)`."""
    steps: list[Step] = []
    while not done(steps):
        candidates = _candidates(search, sublayers)
        if not candidates:
            raise DepthError(f"{desc}: nothing left to remove after {len(steps)} units; ask for fewer")
        inputs = search.block_inputs()
        scores = [search.score(u, inputs) for u in tqdm(candidates, desc=f"{desc} step {len(steps) + 1}", unit="cand", leave=False)]
        best = lowest(scores, 1)[0]
        unit = candidates[best]
        steps.append(Step(unit, scores[best], _unit_parameters(search, unit)))
        (search.removed_branches.add if isinstance(unit, tuple) else search.removed_blocks.add)(unit)
        log.info("%s: removed %s (score %.5f)", desc, unit, scores[best])
    return steps


@torch.no_grad()
def select_greedy_loss(model: nn.Module, adapter: Adapter, calibration: Tensor, count: int, batch_size: int,
                       device: torch.device, protected: frozenset[int] = frozenset()) -> Selection:
    search = _Search(model, adapter, calibration, batch_size, device, protected=protected)
    search.metric = _loss_metric(search.batches, search.positions)
    steps = greedy(search, lambda s: len(s) >= count, sublayers=False, desc="greedy loss")
    return Selection("calibration loss (mean next-token NLL) of the model after removing this block too", steps)


@torch.no_grad()
def select_finercut(model: nn.Module, adapter: Adapter, calibration: Tensor, count: int | None,
                    budget: int | None, batch_size: int, device: torch.device,
                    protected: frozenset[int] = frozenset()) -> Selection:  # fmt: skip
    """Greedy over attention / MLP branches (those of `protected` blocks aside); stops after `count`
    branches or once the removed parameters reach `budget`."""
    search = _Search(model, adapter, calibration, batch_size, device, protected=protected)
    reference = [model(input_ids=batch, use_cache=False, logits_to_keep=search.positions).logits.float()
                 for batch in search.batches]
    search.metric = _js_metric(reference)

    def done(steps: list[Step]) -> bool:
        if count is not None:
            return len(steps) >= count
        return sum(s.parameters for s in steps) >= budget

    steps = greedy(search, done, sublayers=True, desc="finercut")
    return Selection("Jensen-Shannon divergence (nats) between the original and the pruned model's next-token "
                     "distributions, mean over calibration tokens", steps)


def count_for(amount_count: int | None, fraction: float | None, blocks: int) -> int:
    return amount_count if amount_count is not None else max(1, round(fraction * blocks))


def budget_for(model: nn.Module, adapter: Adapter, fraction: float) -> int:
    """Parameters removed by removing `fraction` of the blocks (FinerCut's compute budget)."""
    return math.ceil(fraction * sum(block_parameters(b) for b in adapter.block_list(model)))
