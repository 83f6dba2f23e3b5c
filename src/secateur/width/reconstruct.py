"""Least-squares reconstruction of the output projections after heads or MLP channels go.

Slicing input columns K out of a layer y = x·Wᵀ + b (o_proj after heads go, down_proj after MLP
channels go) leaves the kept columns as they were. Refitting them on calibration activations
recovers what the removed columns carried where it is linear in the kept ones:

    W'_K, b' = argmin Σ‖x_K·W'_Kᵀ + b' − (x·Wᵀ + b)‖² + λ‖[W'_K, b'] − [W_K, b]‖²,
    λ = damp · mean diag(x_Kᵀx_K)

(the structured OBS update of ZipLM and SlimGPT without the ridge; FLAP's bias compensation is the
special case that refits b' alone). Only the Gram matrix of [x, 1] is needed. Blocks are refitted in
order on the activations of the model as pruned so far, so each fit also absorbs the error of the
blocks before it (SparseGPT's sequential scheme).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from secateur.calibrate.ridge import NormalEquations, ridge_towards, with_ones
from secateur.calibrate.stats import Hessian
from secateur.calibrate.disk import disk_store
from secateur.calibrate.processes import reduce
from secateur.calibrate.stream import BlockState, StopForward, run_block, stream_blocks
from secateur.models import Adapter, read_weight


def refit_columns(gram: Tensor, weight: Tensor, bias: Tensor | None, keep: Tensor,
                  damp: float) -> tuple[Tensor, Tensor | None, float, float]:  # fmt: skip
    """The kept columns' weights (out, |K|) and the bias that best reproduce the layer's full output.

    gram: Σ aᵀa over calibration tokens, a = [x, 1] when the layer has a bias, x otherwise
    ((n+1)² or n²); weight: (out, n); keep: the kept input columns. Returns the new weights, the new
    bias (None without one), and the relative output error ‖ŷ − y‖ / ‖y‖ of plain slicing and of the
    fit (the fit is dropped for plain slicing where it does not do better)."""
    n = weight.shape[1]
    gram = gram.double()
    full = weight.T.double()  # (n, out): the coefficients on every input feature
    features = keep.to(torch.long)
    if bias is not None:
        full = torch.cat([full, bias.double()[None]])  # (n + 1, out)
        features = torch.cat([features, torch.tensor([n], device=features.device)])
    if gram.shape[0] != full.shape[0]:
        raise ValueError(f"gram is {tuple(gram.shape)} for a layer of {n} inputs{' and a bias' if bias is not None else ''}")
    target_sq = float((full * (gram @ full)).sum())
    rows = gram[features]  # (kept, n): indexed once (at 8B widths each such copy is a gigabyte)
    del gram
    eq = NormalEquations(rows[:, features], rows @ full, target_sq)
    del rows
    prior = full[features]
    coef = ridge_towards(eq, prior, damp)
    before, after = eq.error(prior), eq.error(coef)
    if after >= before:
        coef, after = prior, before
    total = max(eq.target_sq, 1e-30)
    new_weight = coef[: len(keep)].T.to(weight.dtype)
    new_bias = coef[-1].to(bias.dtype) if bias is not None else None
    return new_weight, new_bias, max(before, 0.0) ** 0.5 / total**0.5, max(after, 0.0) ** 0.5 / total**0.5


@torch.no_grad()
def refit_layer(module: nn.Module, keep: Tensor, gram: Hessian, damp: float) -> dict[str, float]:
    """Refit `module`'s kept input columns in place (the caller slices them afterwards); `gram`, the
    accumulated Gram matrix, is emptied (its float64 copy lives only as long as the fit needs it)."""
    weight, bias = read_weight(module), getattr(module, "bias", None)
    new_weight, new_bias, before, after = refit_columns(gram.take(torch.float64), weight, bias, keep, damp)
    weight[:, keep] = new_weight  # a view of the parameter (transposed for Conv1D)
    if bias is not None:
        bias.data.copy_(new_bias)
    return {"error_before": before, "error_after": after}


Cut = Callable[[nn.Module, Hessian | None], dict[str, Any]]
"""Refits and slices one branch of a block, given the block and the Gram of its consumer's inputs."""


@torch.no_grad()
def stream_refits(model: nn.Module, adapter: Adapter, cuts: dict[int, list[tuple[str, Cut]]], calibration: Tensor,
                  batch_size: int, device: torch.device,
                  resumed: dict[str, Any] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Block by block on the model as pruned so far: for each (consumer name, cut) of a block, in
    order, gather the Gram of [x, 1] (x alone where the consumer has no bias) over the calibration
    activations entering the block, then call the cut; the activations then pass on through the
    pruned block (up to the last block cut: the rest only pass by, to be written where the blocks
    stay on disk). Returns the cuts' records, with the layer's name. `resumed`: the state an
    interrupted pass over a model on disk saved (`DiskBlocks.resume_point`): the pass goes on from
    there."""
    store = disk_store(model)
    records: list[dict[str, Any]] = list(resumed["reports"]) if resumed else []
    start = BlockState(resumed["index"], resumed["hidden"]) if resumed else None
    last = max(cuts, default=-1)
    for index, block, inputs in stream_blocks(model, adapter, calibration, batch_size, device, "width reconstruction",
                                              start):  # fmt: skip
        extras = inputs.extras[index]
        for name, cut in cuts.get(index, []):
            gram = _consumer_gram(block, name, inputs.hidden, extras, device)
            records.append({"layer": f"{adapter.blocks}.{index}.{name}", **cut(block, gram)})
        if index < last:
            inputs.hidden = [run_block(block, h, e) for h, e in zip(inputs.hidden, extras)]
        if store is not None:
            store.reached(index + 1, inputs.hidden, records, [])
    return records


def _consumer_gram(block: nn.Module, name: str, hidden: list[Tensor], extras: list, device: torch.device) -> Hessian:
    """Σ aᵀa of the consumer's inputs over every batch; the block stops at the consumer."""
    module = block.get_submodule(name)
    with_bias = getattr(module, "bias", None) is not None
    gram = Hessian(read_weight(module).shape[1] + with_bias, device)

    def feed(_: nn.Module, args: tuple) -> None:
        gram.update(with_ones(args[0]) if with_bias else args[0])
        raise StopForward  # what follows the consumer does not change its input

    handle = module.register_forward_pre_hook(feed)
    try:
        for h, e in zip(hidden, extras):
            try:
                run_block(block, h, e)
            except StopForward:
                pass
    finally:
        handle.remove()
    reduce(gram)  # summed over the processes, each of which fed its own windows
    return gram
