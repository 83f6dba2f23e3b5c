"""Linear compensation for removed blocks (the training-free fix of ReplaceMe / LLM-Streamline).

A run of consecutive blocks s..e is removed. The block before it, s-1, ends with its MLP's output
projection W (`down_proj`), whose output M = a·Wᵀ is added to the residual state Y:

    state leaving s-1 = Y + a·Wᵀ            state leaving e (dense) = L

W is re-fitted so that block s-1 alone lands where the dense model was after block e:

    W' = argmin ‖a·W'ᵀ − (L − Y)‖² + λ‖W' − W‖²,   λ = damp · mean diag(aᵀa)

a ridge towards the original weights, so that λ → ∞ is plain removal. The fit folds into an existing
layer of the same shape: no parameter is added and the result stays a stock model. The projection's
bias, when it has one, is fitted with it (a column of ones in a).

Post-norm families (Gemma 2 / 3) normalise the MLP output before the residual add: the block adds
n(M) = u ⊙ s, with u = M / rms(M) and s the norm's scale (offset + weight; Gemma's offset is 1). A
linear map cannot fold into W there (the norm divides it out), but the scale can be re-fitted,
channel by channel, in closed form:

    s'_j = (Σ_t u_tj r_tj + λ s_j) / (Σ_t u_tj² + λ),   r = L − Y,   λ = damp · mean_j Σ_t u_tj²

the same ridge towards the original scale; it folds into the norm's own weight (w' = s' − offset).
A scale alone cannot turn the block's output (on Gemma 3 the 13–16 run's error fell only from 0.999
to 0.962), but W can, before the norm: the norm keeps a token's direction and discards its length,
so W is fitted by the same ridge as above to the pre-norm outputs whose direction, once scaled by s,
is closest to r,

    M*_t = rms(M_t) · g_t / rms(g_t),   g_t = r_t / s   (|s| floored at 5% of its mean),

at M's own length per token (the least-squares weight of each token stays what it was), and the
scale is re-fitted on the new direction. Fitting g with the original scale and with the first fitted
one gives two candidates; the one of scale alone, the two with W, and no change are compared by
their error on the calibration tokens and the lowest is kept.

Runs are compensated in order, each on the already-compensated model before it, in one streamed
pass: the blocks of a run still compute during the pass, to give their target L.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from secateur.calibrate.ridge import NormalEquations, ridge_consuming, with_ones
from secateur.calibrate.stream import BlockState, run_block, stream_blocks
from secateur.depth.structure import DepthError
from secateur.models import Adapter
from secateur.models.base import read_weight, write_weight

log = logging.getLogger(__name__)


def runs(blocks: list[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive indices, as (first, last)."""
    out: list[tuple[int, int]] = []
    for index in sorted(set(blocks)):
        if out and index == out[-1][1] + 1:
            out[-1] = (out[-1][0], index)
        else:
            out.append((index, index))
    return out


@dataclass
class _Pending:
    """A run being compensated: the inputs of the block before it, kept to re-run that block."""

    first: int
    last: int
    inputs: list[Tensor]
    extras: list[Any]


def _mlp_output(block: nn.Module, consumer: str, hidden: Tensor, extra: Any) -> tuple[Tensor, Tensor, Tensor]:
    """(consumer's input a, consumer's output M, block output) of one batch (the consumer: the layer the
    fit folds into)."""
    seen: dict[str, Tensor] = {}
    module = block.get_submodule(consumer)

    def hook(_: nn.Module, args: tuple, out: Tensor) -> None:
        seen["a"], seen["m"] = args[0], out

    handle = module.register_forward_hook(hook)
    try:
        out = run_block(block, hidden, extra)
    finally:
        handle.remove()
    a, m = seen["a"], seen["m"]  # OPT's MLP runs on (batch * seq, features): back to the block's (batch, seq)
    return a.reshape(*out.shape[:-1], a.shape[-1]), m.reshape(out.shape), out


def _check_additive(block: nn.Module, consumer: str, hidden: Tensor, extra: Any, family: str) -> None:
    """The fit folds into the consumer only if its output is added straight to the residual state
    (no norm or scale after it): zeroing it must take exactly M off the block's output."""
    _, m, out = _mlp_output(block, consumer, hidden, extra)
    handle = block.get_submodule(consumer).register_forward_hook(lambda _, __, o: torch.zeros_like(o))
    try:
        without = run_block(block, hidden, extra)
    finally:
        handle.remove()
    scale = float(out.abs().max()) + 1e-6
    # the sum's own rounding: 1e-3 of the largest value in float32, a few units in the last place in
    # bfloat16 (2^-8 each; a norm after the MLP would change the output by its whole size)
    tolerance = max(1e-3, 4 * torch.finfo(out.dtype).eps)
    if float((out - without - m).abs().max()) > tolerance * scale:
        raise DepthError(f"{family}: the MLP output ({consumer}) is not added straight to the residual stream "
                         "(a norm follows it), so the compensation cannot fold into it; drop --compensate")


def unavailable(adapter: Adapter) -> str | None:
    """Why the fit cannot fold into this family's layers, or None where it can."""
    if adapter.width is None:
        return f"{adapter.family}: no MLP output projection is known"
    mlp = adapter.width.mlp
    if mlp.post_norm is not None and adapter.width.hidden is None:
        return (f"{adapter.family}: the MLP output ({mlp.consumer}) passes through {mlp.post_norm} before it is added "
                "to the residual stream, and the norm's weight convention is not known to fit its scale")
    return None


def fitted_layer(adapter: Adapter) -> str:
    """What the fit folds into: the MLP's post-norm scale where the family has one, else its output
    projection."""
    return adapter.width.mlp.post_norm or adapter.width.mlp.consumer


def scale_fit(uu: Tensor, ur: Tensor, rr: Tensor, prior: Tensor, damp: float) -> tuple[Tensor, float, float]:
    """The per-channel scale s' = (Σ u·r + λ s) / (Σ u² + λ), λ = damp · mean Σ u², from the sums over
    tokens of u², u·r and r² per channel; returns (s', the squared error at `prior`, at s')."""
    lam = damp * float(uu.mean())
    scale = (ur + lam * prior) / (uu + lam).clamp_min(1e-30)
    error = lambda s: float((uu * s * s - 2 * s * ur + rr).sum())  # noqa: E731  Σ_t (u s − r)²
    return scale, error(prior), error(scale)


def _rms_unit(x: Tensor, eps: float) -> Tensor:
    """x / rms(x) over the last dimension, in float32 (what an RMSNorm scales)."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@torch.no_grad()
def compensate(model: nn.Module, adapter: Adapter, removed: list[int], calibration: Tensor, batch_size: int,
               device: torch.device, damp: float = 0.1, start: BlockState | None = None,
               targets: dict[int, list[Tensor]] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Re-fit the MLP output projection of the block before each run of `removed` blocks (original
    numbering) so that it reproduces the dense state leaving the run; the blocks are not removed
    here. Returns one record per run: the fitted layer and the relative error of the state passed on,
    ‖state − L‖ / ‖L − Y‖ on the calibration tokens, before and after the fit. With `start` (the
    dense activations entering a block no later than the first fitted one), the pass begins there.
    `targets`: the dense states leaving some blocks (per calibration batch): the first fitted run,
    if it ends at one of them, is fitted without running its blocks (the same fit: its target is the
    dense state); later runs' targets follow the fits before them, so their blocks run."""
    why = unavailable(adapter)
    if why is not None:
        raise DepthError(f"{why}; drop --compensate")
    consumer = fitted_layer(adapter)
    spans = runs(removed)
    starts = {first - 1: (first, last) for first, last in spans if first > 0}
    if start is not None and any(index < start.index for index in starts):
        raise ValueError(f"the pass starts at block {start.index}, after block {min(starts)} that is fitted")
    records = [{"run": [first, last], "fitted": None, "why": "the run starts at block 0: no block before it to fit"}
               for first, last in spans if first == 0]  # fmt: skip
    for first, last in spans:
        if first == 0:
            log.warning("blocks 0..%d removed without compensation: no block before them", last)
    targets = targets or {}
    pending: _Pending | None = None
    skip_to = -1  # the last block of a run fitted from its known target: its blocks need not run
    blocks = adapter.block_list(model)
    for index, block, inputs in stream_blocks(model, adapter, calibration, batch_size, device, "compensation", start):
        if index <= skip_to:
            continue
        extras = inputs.extras[index]
        target: list[Tensor] | None = None
        if index in starts:
            _check_additive(block, consumer, inputs.hidden[0], extras[0], adapter.family)
            pending = _Pending(*starts[index], list(inputs.hidden), list(extras))
            if pending.last in targets and index == min(starts):  # later runs' targets follow earlier fits
                target, skip_to = [t.to(device) for t in targets[pending.last]], pending.last
        if target is None:
            inputs.hidden = [run_block(block, h, e) for h, e in zip(inputs.hidden, extras)]
            if pending is None or pending.last != index:
                continue
            target = inputs.hidden
        fit = _fit_post_norm if adapter.width.mlp.post_norm else _fit
        record = fit(blocks[pending.first - 1], consumer, pending, target, device, damp, adapter)
        record["fitted"] = ", ".join(f"{adapter.blocks}.{pending.first - 1}.{name}" for name in record.pop("layers", [consumer]))
        records.append(record)
        fitted = blocks[pending.first - 1]
        home = next(fitted.parameters()).device
        fitted.to(device)
        try:  # the compensated state goes on, as if the run were gone
            inputs.hidden = [run_block(fitted, h, e) for h, e in zip(pending.inputs, pending.extras)]
        finally:
            fitted.to(home)
        last, pending = pending.last, None
        if all(end <= last for first, end in spans if first > 0):
            break  # every run is fitted: the blocks after the last one need no pass
    return sorted(records, key=lambda r: r["run"])


def _fit(block: nn.Module, consumer: str, pending: _Pending, targets: list[Tensor], device: torch.device,
         damp: float, adapter: Adapter) -> dict[str, Any]:
    """Fit the consumer of `block` (the one before the run) on the targets leaving the run. The block
    runs again on its kept inputs rather than keeping its MLP activations from the streamed pass:
    those are MLP-width per token, the kept inputs only hidden-width."""
    home = next(block.parameters()).device
    block.to(device)
    try:
        module = block.get_submodule(consumer)
        weight = read_weight(module)
        bias = getattr(module, "bias", None)
        eq: NormalEquations | None = None
        for hidden, extra, target in zip(pending.inputs, pending.extras, targets):
            a, m, out = _mlp_output(block, consumer, hidden, extra)
            if bias is not None:
                a = with_ones(a)
            if eq is None:
                eq = NormalEquations.empty(a.shape[-1], weight.shape[0], device)
            eq.update(a, target - (out - m))  # r = L − Y
        prior = weight.T if bias is None else torch.cat([weight.T, bias[None]], dim=0)
        total = max(eq.target_sq, 1e-30)
        coef, before, after = ridge_consuming(eq, prior, damp)
        if after < before:
            write_weight(module, coef[: weight.shape[1]].T.to(weight.dtype))
            if bias is not None:
                bias.data.copy_(coef[-1].to(bias.dtype))
        else:
            log.warning("compensation of blocks %d..%d did not lower the calibration error; weights kept",
                        pending.first, pending.last)
        return {"run": [pending.first, pending.last], "error_before": _relative(before, total),
                "error_after": _relative(min(after, before), total), "damp": damp}  # fmt: skip
    finally:
        block.to(home)


def direction_targets(m: Tensor, r: Tensor, scale: Tensor, floor: float = 0.05) -> Tensor:
    """The pre-norm outputs M* whose direction, scaled by the norm's `scale`, is closest to the targets r
    (tokens x channels): M*_t = rms(M_t) · g_t / rms(g_t), g = r / s, with |s| floored at `floor` times
    its mean (a channel the norm nearly silences cannot be asked for much)."""
    low = floor * float(scale.abs().mean())
    safe = torch.where(scale.abs() < low, torch.where(scale < 0, -low, low), scale)
    g = r / safe
    length = m.float().pow(2).mean(-1, keepdim=True).sqrt()
    return length * g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True).clamp_min(1e-30))


Sums = tuple[Tensor, Tensor, Tensor]  # Σ u², Σ u·r, Σ r² per channel


def _add_sums(sums: Sums | None, u: Tensor, r: Tensor) -> Sums:
    parts = ((u * u).sum(0), (u * r).sum(0), (r * r).sum(0))
    return parts if sums is None else (sums[0] + parts[0], sums[1] + parts[1], sums[2] + parts[2])


def _scale_sums(block: nn.Module, norm: str, pending: _Pending, residuals: list[Tensor], eps: float) -> Sums:
    """The scale fit's sums, u the unit-rms input of the norm as the block computes it now."""
    sums = None
    for hidden, extra, r in zip(pending.inputs, pending.extras, residuals):
        x, _, _ = _mlp_output(block, norm, hidden, extra)
        sums = _add_sums(sums, _rms_unit(x, eps).reshape(r.shape), r)
    return sums


def _relative(squared: float, total: float) -> float:
    """A fit's relative error from its squared error (which the closed forms can leave a hair below 0)."""
    return (max(squared, 0.0) / total) ** 0.5


def _fit_post_norm(block: nn.Module, norm: str, pending: _Pending, targets: list[Tensor], device: torch.device,
               damp: float, adapter: Adapter) -> dict[str, Any]:
    """Fit the MLP of `block` (the one before the run) whose output passes through a post-norm: the
    norm's scale alone, or the output projection's direction and then the scale (see the module
    docstring), whichever leaves the lowest error on the calibration tokens; the norm must be an
    RMSNorm of the family's convention."""
    home = next(block.parameters()).device
    block.to(device)
    try:
        module = block.get_submodule(norm)
        projection = block.get_submodule(adapter.width.mlp.consumer)
        offset, eps = adapter.width.hidden.norm_offset, getattr(module, "eps", getattr(module, "variance_epsilon", 1e-6))
        prior = module.weight.detach().float() + offset
        residuals, sums = [], None
        for hidden, extra, target in zip(pending.inputs, pending.extras, targets):
            x, n, out = _mlp_output(block, norm, hidden, extra)  # the norm's input, its output, the block's
            u = _rms_unit(x, eps).reshape(-1, x.shape[-1])
            if not torch.allclose(u * prior, n.float().reshape(u.shape), rtol=1e-2, atol=1e-3 * float(n.abs().max())):
                raise DepthError(f"{adapter.family}: {norm} is not an RMSNorm scaled by {offset:g} + weight, so its "
                                 "scale cannot be fitted; drop --compensate")
            residuals.append((target - (out - n)).float().reshape(u.shape))  # r = L − Y
            sums = _add_sums(sums, u, residuals[-1])
        total = max(float(sums[2].sum()), 1e-30)
        scale, before, after = scale_fit(*sums, prior, damp)
        original = read_weight(projection).clone()  # write_weight copies into the parameter
        best = (after, [norm], None, scale)
        for reference in (prior, scale):  # the direction asked for under the original scale and the fitted one
            eq: NormalEquations | None = None
            for hidden, extra, r in zip(pending.inputs, pending.extras, residuals):
                a, m, _ = _mlp_output(block, adapter.width.mlp.consumer, hidden, extra)
                if eq is None:
                    eq = NormalEquations.empty(a.shape[-1], original.shape[0], device)
                eq.update(a, direction_targets(m.reshape(r.shape), r, reference))
            coef, _, _ = ridge_consuming(eq, original.T, damp)
            weight = coef.T.to(original.dtype)
            write_weight(projection, weight)
            fitted, _, error = scale_fit(*_scale_sums(block, norm, pending, residuals, eps), prior, damp)
            if error < best[0]:
                best = (error, [adapter.width.mlp.consumer, norm], weight, fitted)
        error, layers, weight, scale = best
        if error < before:
            module.weight.data.copy_((scale - offset).to(module.weight.dtype))
        else:
            layers, weight = [norm], None
            log.warning("compensation of blocks %d..%d did not lower the calibration error; weights kept",
                        pending.first, pending.last)
        write_weight(projection, original if weight is None else weight)
        return {"run": [pending.first, pending.last], "error_before": _relative(before, total),
                "error_after": _relative(min(error, before), total), "damp": damp, "layers": layers,
                "fit": "post-norm scale" if layers == [norm] else "output direction and post-norm scale"}  # fmt: skip
    finally:
        block.to(home)
