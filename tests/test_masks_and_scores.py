"""Hand-computed cases that tell the formulas apart, and exactness properties of the masks."""

import pytest
import torch

from secateur.config import NM, ConfigError, Unstructured
from secateur.sparsity.masks import global_masks, nm_mask, per_layer_mask, per_row_mask, smallest_k
from secateur.sparsity.methods import select_mask, wanda_scores
from secateur.calibrate.stats import InputNormSq


def test_smallest_k_is_exact_under_ties():
    scores = torch.tensor([1.0, 1.0, 1.0, 1.0, 2.0, 0.5])
    mask = smallest_k(scores, 3)
    assert mask.tolist() == [True, True, False, False, False, True]  # 0.5, then ties by lowest index


def test_per_row_and_per_layer_differ():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
    assert per_row_mask(scores, 0.5).tolist() == [[True, True, False, False], [True, True, False, False]]
    assert per_layer_mask(scores, 0.5).tolist() == [[True, True, True, True], [False, False, False, False]]


def test_per_row_count_is_exact_when_rows_do_not_divide():
    scores = torch.rand(3, 5)
    mask = per_row_mask(scores, 0.5)  # round(7.5) = 8 entries: rows get 3, 3, 2
    assert int(mask.sum()) == 8
    assert sorted(mask.sum(1).tolist()) == [2, 3, 3]


def test_nm_mask_keeps_n_largest_of_every_m():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.1, 0.4, 0.3, 0.2]])
    assert nm_mask(scores, 2, 4).tolist() == [[False, True, False, True, True, False, False, True]]
    with pytest.raises(ValueError, match="multiple of 4"):
        nm_mask(torch.rand(2, 6), 2, 4)


def test_global_mask_ranks_across_layers_exactly():
    a, b = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 0.5, 4.0, 5.0]])
    masks = global_masks([a, b], 0.5)
    assert masks[0].tolist() == [[True, True]] and masks[1].tolist() == [[False, True, False, False]]


def test_wanda_uses_the_input_norm_per_row_not_per_layer_nor_squared():
    # |W| = [[1, 2], [8, 3]]; input features have norms ||x_0|| = 3, ||x_1|| = 1 (squared: 9, 1).
    weight = torch.tensor([[1.0, -2.0], [8.0, 3.0]])
    x = torch.tensor([[3.0, 1.0]])  # one token
    stat = InputNormSq(2, "cpu")
    stat.update(x)
    scores = wanda_scores(weight, stat.norm)  # [[3, 2], [24, 3]]
    assert torch.allclose(scores, torch.tensor([[3.0, 2.0], [24.0, 3.0]]))
    mask = select_mask(scores, Unstructured(0.5), "per_row")
    # per row: prune w01 (2 < 3) and w11 (3 < 24)
    assert mask.tolist() == [[False, True], [False, True]]
    # a per-layer ranking would prune row 0 entirely; the squared norm would keep w01 less (2 < 9):
    assert select_mask(scores, Unstructured(0.5), "per_layer").tolist() == [[True, True], [False, False]]
    squared = weight.abs() * stat.value[None, :]  # [[9, 2], [72, 3]]
    assert per_row_mask(squared, 0.5).tolist() == mask.tolist()  # same here, so pin a case where it differs:
    w2 = torch.tensor([[1.0, 2.5]])
    stat2 = InputNormSq(2, "cpu")
    stat2.update(torch.tensor([[2.0, 1.0]]))  # norms 2, 1: scores 2 vs 2.5 -> prune w0; squared 4 vs 2.5 -> w1
    assert select_mask(wanda_scores(w2, stat2.norm), Unstructured(0.5), "per_row").tolist() == [[True, False]]


def test_magnitude_global_scope_is_refused_inside_a_layer():
    with pytest.raises(ConfigError, match="across layers"):
        select_mask(torch.rand(2, 4), Unstructured(0.5), "global")


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_sparsity_outside_range_is_refused(bad):
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        Unstructured(bad)


@pytest.mark.parametrize("n,m", [(4, 4), (5, 4), (0, 4)])
def test_bad_nm_is_refused(n, m):
    with pytest.raises(ConfigError):
        NM(n, m)


def test_input_norm_accumulates_over_batches():
    stat = InputNormSq(3, "cpu")
    x = torch.randn(5, 7, 3)
    stat.update(x[:2])
    stat.update(x[2:])
    assert torch.allclose(stat.norm, x.reshape(-1, 3).norm(dim=0), rtol=1e-5)


def test_magnitude_scopes_on_a_hand_computed_layer():
    from secateur.config import MagnitudeConfig
    from secateur.sparsity.methods import GroupJob, magnitude_group

    weight = torch.tensor([[0.1, -0.2, 0.3, 0.4], [5.0, -6.0, 7.0, 0.05]])
    [(per_layer, mask)] = magnitude_group(MagnitudeConfig("per_layer"), GroupJob(["w"], [weight], [Unstructured(0.5)]))
    assert mask.tolist() == [[True, True, True, False], [False, False, False, True]]  # 0.05, 0.1, 0.2, 0.3
    assert per_layer.tolist()[1] == [5.0, -6.0, 7.0, 0.0]
    [(_, mask)] = magnitude_group(MagnitudeConfig("per_row"), GroupJob(["w"], [weight], [Unstructured(0.5)]))
    assert mask.tolist() == [[True, True, False, False], [True, False, False, True]]
    [(_, mask)] = magnitude_group(MagnitudeConfig("per_layer"), GroupJob(["w"], [weight], [NM(2, 4)]))
    assert mask.tolist() == [[True, True, False, False], [True, False, False, True]]


def test_per_row_selection_in_chunks_of_rows_equals_the_whole_matrix_with_ties(monkeypatch):
    """Rows ranked a few at a time (ENTRIES) and the tie rule applied only to rows with ties left out give
    the mask of the one-shot formula: below the k-th value, then the lowest-index ties."""
    from secateur.sparsity import masks

    generator = torch.Generator().manual_seed(0)
    for trial in range(100):
        rows, cols = torch.randint(1, 12, (2,), generator=generator).tolist()
        scores = torch.randint(0, 4, (rows, cols), generator=generator).float()  # many ties
        k = int(torch.randint(1, cols + 1, (1,), generator=generator))
        threshold = scores.kthvalue(k, dim=1, keepdim=True).values
        below, tied = scores < threshold, scores == threshold
        expected = below | (tied & (tied.cumsum(1) <= k - below.sum(1, keepdim=True)))
        monkeypatch.setattr(masks, "ENTRIES", int(torch.randint(1, 30, (1,), generator=generator)))
        assert torch.equal(masks._smallest_per_row(scores, k), expected)
        assert int(expected.sum()) == rows * k
