"""SparseGPT: OBS updates against closed-form least squares, and reconstruction error vs Wanda/magnitude."""

import pytest
import torch

from secateur.config import NM, Unstructured
from secateur.sparsity.methods import select_mask, wanda_scores
from secateur.sparsity.obs import inverse_hessian_factor, sparsegpt_prune
from secateur.calibrate.stats import Hessian, InputNormSq


def correlated_inputs(tokens=512, features=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(tokens, 8, generator=generator)
    mix = torch.randn(8, features, generator=generator)
    return base @ mix + 0.1 * torch.randn(tokens, features, generator=generator)  # low-rank + noise


def reconstruction_error(weight, pruned, x):
    return float((x @ weight.T - x @ pruned.T).norm())


def test_fixed_mask_matches_least_squares_when_pruned_columns_come_first():
    x = correlated_inputs(features=6)
    weight = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    hessian = x.T @ x
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[:, :2] = True  # prune the first two inputs of every row
    factor, dead = inverse_hessian_factor(hessian, damp=1e-9)
    pruned, _ = sparsegpt_prune(weight, factor, dead, Unstructured(0.0), block_size=4, fixed_mask=mask)
    # closed form: w'_K = w_K + w_P H_PK H_KK^-1, w'_P = 0
    h = hessian.double()
    w = weight.double()
    keep, drop = slice(2, 6), slice(0, 2)
    expected = torch.zeros_like(w)
    expected[:, keep] = w[:, keep] + w[:, drop] @ h[drop, keep] @ torch.linalg.inv(h[keep, keep])
    assert torch.allclose(pruned.double(), expected, atol=1e-3, rtol=1e-3)


def test_lazy_blocks_do_not_change_the_result():
    x = correlated_inputs()
    weight = torch.randn(16, 32)
    factor, dead = inverse_hessian_factor(x.T @ x, damp=0.01)
    mask = torch.rand(16, 32) < 0.5
    a, _ = sparsegpt_prune(weight, factor, dead, Unstructured(0.5), block_size=32, fixed_mask=mask)
    b, _ = sparsegpt_prune(weight, factor, dead, Unstructured(0.5), block_size=4, fixed_mask=mask)
    assert torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("target", [Unstructured(0.5), NM(2, 4), NM(4, 8)])
def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude(target):
    x = correlated_inputs()
    weight = torch.randn(24, 32)
    hessian, norm = Hessian(32, "cpu"), InputNormSq(32, "cpu")
    hessian.update(x)
    norm.update(x)
    factor, dead = inverse_hessian_factor(hessian.value, damp=0.01)
    sgpt, mask = sparsegpt_prune(weight, factor, dead, target, block_size=8)
    wanda = weight.masked_fill(select_mask(wanda_scores(weight, norm.norm), target, "per_row"), 0)
    magnitude = weight.masked_fill(select_mask(weight.abs(), target, "per_layer"), 0)
    errors = [reconstruction_error(weight, w, x) for w in (sgpt, wanda, magnitude)]
    assert errors[0] < errors[1] and errors[0] < errors[2], errors
    assert int(mask.sum()) == 24 * 16 and torch.equal(sgpt == 0, mask | (weight == 0))


def test_nm_pattern_holds_in_sparsegpt():
    x = correlated_inputs()
    weight = torch.randn(8, 32)
    factor, dead = inverse_hessian_factor(x.T @ x, damp=0.01)
    pruned, mask = sparsegpt_prune(weight, factor, dead, NM(2, 4), block_size=8)
    assert ((pruned != 0).reshape(8, 8, 4).sum(-1) <= 2).all()
    assert (mask.reshape(8, 8, 4).sum(-1) == 2).all()


def test_dead_inputs_are_pruned_first_and_do_not_break_cholesky():
    x = correlated_inputs()
    x[:, 3] = 0.0  # an input that never fires
    weight = torch.randn(4, 32)
    factor, dead = inverse_hessian_factor(x.T @ x, damp=0.01)
    assert dead[3] and dead.sum() == 1
    _, mask = sparsegpt_prune(weight, factor, dead, Unstructured(0.25), block_size=32)
    assert mask[:, 3].all()


def test_singular_hessian_raises_damping_instead_of_silent_identity(caplog):
    x = torch.ones(10, 4)  # rank one, positive diagonal: needs damping
    factor, dead = inverse_hessian_factor(x.T @ x, damp=0.0)
    assert torch.isfinite(factor).all() and not dead.any()
    assert "used damp" in caplog.text


def test_stacked_layers_match_separate_calls():
    x = correlated_inputs()
    factor, dead = inverse_hessian_factor(x.T @ x, damp=0.01)
    q, k = torch.randn(12, 32), torch.randn(4, 32)
    for target in (Unstructured(0.6), NM(2, 4)):
        stacked, mask = sparsegpt_prune(torch.cat([q, k]), factor, dead, target, block_size=8, segments=[12, 4])
        alone = torch.cat([sparsegpt_prune(w, factor, dead, target, block_size=8)[0] for w in (q, k)])
        assert torch.allclose(stacked, alone, atol=1e-5)
        assert int(mask[12:].sum()) == round(4 * 32 * target.fraction)


def test_panelled_hessian_equals_the_full_product():
    x = torch.randn(3, 50, 700)  # wide enough for the symmetric panel update
    stat = Hessian(700, "cpu")
    stat.update(x[:2])
    stat.update(x[2:])
    flat = x.reshape(-1, 700)
    assert torch.allclose(stat.value, flat.T @ flat, rtol=1e-4, atol=1e-3)
    assert torch.equal(stat.value, stat.value.T)
