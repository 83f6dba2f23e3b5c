"""Block streaming and input statistics: what every kind of pruning reads from calibration data.

`capture_inputs` records the first block's inputs and every block's extra arguments (masks, rotary
tables; they can differ per block, e.g. Gemma 3's sliding layers) by running the model with each
block's forward replaced by a recorder. `stream_blocks` then hands out one block at a time on the
compute device with its inputs, so only that block and the activations need to fit there.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from secateur.calibrate.processes import reduce
from secateur.models import Adapter, read_weight
from secateur.models.shapes import submodule


@dataclass
class BlockInputs:
    """Calibration activations entering one block, in batches, with each batch's extra arguments."""

    hidden: list[Tensor]  # (batch, seq, hidden) per batch
    extras: list[list[tuple[tuple, dict[str, Any]]]] = field(default_factory=list)  # [block][batch] -> (args, kwargs)


@dataclass
class BlockState:
    """The calibration activations entering block `index` of a model, one tensor per batch: a
    streamed pass can start there instead of at the first block (the blocks before it unchanged)."""

    index: int
    hidden: list[Tensor]


Observer = Callable[[int, list[Tensor]], None]  # (block index, the activations entering it, per batch)
Finished = Callable[[int, nn.Module, dict[str, Any]], None]  # (block index, the block, the statistics so far)


class StopForward(Exception):
    """Raised inside a hook to end a forward pass early."""


@torch.no_grad()
def capture_inputs(model: nn.Module, adapter: Adapter, windows: Tensor, batch_size: int, device: torch.device) -> BlockInputs:
    """Run the model up to its blocks and record each block's input and extra arguments."""
    blocks = adapter.block_list(model)
    batches = windows.split(batch_size or len(windows))
    captured = BlockInputs(hidden=[], extras=[[] for _ in blocks])

    def recorder(index: int):
        def forward(hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            if index == 0:
                captured.hidden.append(hidden_states)
            captured.extras[index].append((args, kwargs))
            if index == len(blocks) - 1:
                raise StopForward  # skip the final norm and the LM head
            return hidden_states

        return forward

    for index, block in enumerate(blocks):
        block.forward = recorder(index)  # instance attribute shadows the class method
    try:
        for batch in batches:
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except StopForward:
                pass
    finally:
        for block in blocks:
            del block.forward
    return captured


def run_block(block: nn.Module, hidden: Tensor, extra: tuple[tuple, dict[str, Any]]) -> Tensor:
    args, kwargs = extra
    out = block(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def move_outside_blocks(model: nn.Module, adapter: Adapter, device: torch.device) -> None:
    """Put embeddings, rotary tables and final norms on `device`; blocks stay where they are."""
    in_blocks = {id(t) for t in adapter.block_list(model).parameters()} | {
        id(t) for t in adapter.block_list(model).buffers()
    }
    for module in model.modules():
        for name, tensor in list(module._parameters.items()) + list(module._buffers.items()):
            if tensor is not None and id(tensor) not in in_blocks and tensor.device != device and not tensor.is_meta:
                tensor.data = tensor.data.to(device)


_BARS: ContextVar[bool] = ContextVar("secateur_block_bars", default=True)


@contextmanager
def block_bars(enabled: bool) -> Iterator[None]:
    """Show (or hide) the per-block progress bars of the streamed passes inside this context."""
    token = _BARS.set(enabled)
    try:
        yield
    finally:
        _BARS.reset(token)


def stream_blocks(model: nn.Module, adapter: Adapter, calibration: Tensor, batch_size: int, device: torch.device,
                  desc: str, start: BlockState | None = None) -> Iterator[tuple[int, nn.Module, BlockInputs]]:  # fmt: skip
    """Capture the first block's inputs, then yield (index, block on `device`, inputs) block by block;
    the caller sets `inputs.hidden` to the block's outputs. Only the current block and the calibration
    activations need to be on `device`; everything returns home afterwards. With `start`, the pass
    begins at its block, on its activations (those `calibration` leads to there). For a model whose
    blocks stay on disk (`calibrate.disk.DiskBlocks.open`), each block is read from disk when its
    turn comes and written out when the caller is done with it."""
    from secateur.calibrate.disk import disk_store

    store = disk_store(model)
    if store is not None:
        store.ready()
    home = next(model.parameters()).device
    move_outside_blocks(model, adapter, device)
    try:
        inputs = capture_inputs(model, adapter, calibration, batch_size, device)
        if store is not None:
            store.captured()  # what lies before the blocks is no longer needed
        first = 0
        if start is not None:
            if len(start.hidden) != len(inputs.hidden):
                raise ValueError(f"the start state has {len(start.hidden)} batches, the calibration {len(inputs.hidden)}")
            first, inputs.hidden = start.index, [h.to(device) for h in start.hidden]
        blocks = adapter.block_list(model)
        if store is not None:
            for index in range(first):
                store.recount(index)  # written by an interrupted run: its matrices counted from its file
        for index in tqdm(range(first, len(blocks)), desc=desc, unit="block", disable=not _BARS.get()):
            block = store.enter(index, device) if store is not None else blocks[index].to(device)
            try:
                yield index, block, inputs
            except BaseException:  # an error, or the caller stopped early: nothing is written
                block.to(home if store is None else "meta")
                raise
            if store is not None:
                store.leave(index)
            else:
                block.to(home)
            inputs.extras[index] = []  # this block's masks / rotary tables are no longer needed
    finally:
        move_outside_blocks(model, adapter, home)


def each_block(model: nn.Module, adapter: Adapter, device: torch.device,
               skip: set[int] = frozenset()) -> Iterator[tuple[int, nn.Module]]:  # fmt: skip
    """Every block but those in `skip`, in turn, with its weights, for work that needs no activations
    (slicing, scoring weights). A model in memory hands its blocks as they are; a model whose blocks
    stay on disk reads each one (on `device`) and writes it out when the caller is done with it."""
    from secateur.calibrate.disk import disk_store

    store = disk_store(model)
    blocks = adapter.block_list(model)
    for index in range(len(blocks)):
        if index in skip:
            if store is not None:
                store.recount(index)
            continue
        if store is None:
            yield index, blocks[index]
            continue
        block = store.enter(index, device)
        try:
            yield index, block
        except BaseException:
            block.to("meta")
            raise
        store.leave(index)


def collect_input_stats(model: nn.Module, adapter: Adapter, names: list[str], calibration: Tensor, batch_size: int,
                        device: torch.device, kind: type, desc: str, *, start: BlockState | None = None,
                        observe: Observer | None = None, after: Finished | None = None) -> dict[str, Any]:  # fmt: skip
    """One statistic of type `kind` per named (block-relative) layer of every block (from `start`'s
    on), fed with its inputs on the dense model: one streamed pass, nothing pruned. Keys are
    qualified layer names. `observe` sees each block's inputs before the block runs, `after` the
    block once it ran, while it is still resident, with the statistics gathered so far."""
    stats: dict[str, Any] = {}
    for index, block, inputs in stream_blocks(model, adapter, calibration, batch_size, device, desc, start):
        if observe is not None:
            observe(index, inputs.hidden)
        handles = []
        for name in names:
            module = submodule(block, name)
            if module is not None:
                stat = stats[f"{adapter.blocks}.{index}.{name}"] = kind(read_weight(module).shape[1], device)
                handles.append(module.register_forward_pre_hook(lambda _, args, s=stat: s.update(args[0])))
        try:
            inputs.hidden = [run_block(block, h, e) for h, e in zip(inputs.hidden, inputs.extras[index])]
        finally:
            for handle in handles:
                handle.remove()
        for name in names:  # summed over the processes, each of which fed its own windows
            if f"{adapter.blocks}.{index}.{name}" in stats:
                reduce(stats[f"{adapter.blocks}.{index}.{name}"])
        if after is not None:
            after(index, block, stats)
    return stats
