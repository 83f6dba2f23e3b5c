"""Training and evaluation that fit: the output head apart from the model, the logit losses a chunk of
positions at a time (the same values and gradients as on the full logits), activation checkpointing."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES, MOE_FAMILIES, calibration_ids, tiny_model

from secateur.evaluate import perplexity
from secateur.models.head import Head, chunk_positions, hidden_out
from secateur.train import TrainConfig, TrainError, train
from secateur.train.loss import (IGNORE, Targets, head_loss, kl_distillation, next_token_cross_entropy,
                                 next_token_labels, topk_distillation)

SMALL = dict(tokens=8 * 16, train_seq_len=16, micro_batch=4, val_windows=2, precision="float32")


@pytest.mark.parametrize("family", FAMILIES + MOE_FAMILIES)
def test_the_head_applied_to_the_hidden_states_gives_the_model_logits(family):
    model = tiny_model(family).eval()
    ids = calibration_ids(2, 16)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        with hidden_out(model) as head:
            hidden = model(input_ids=ids).logits
        assert hidden.shape[-1] == model.config.hidden_size or family == "opt"
        torch.testing.assert_close(head(hidden), logits)
        torch.testing.assert_close(model(input_ids=ids).logits, logits)  # the model is itself again


def test_soft_capping_is_applied_by_the_head_and_restored_in_the_config():
    model = tiny_model("gemma3_text", final_logit_softcapping=0.5).eval()
    ids = calibration_ids(2, 16)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        assert logits.abs().max() <= 0.5
        with hidden_out(model) as head:
            assert head.softcap == 0.5 and model.config.final_logit_softcapping is None
            torch.testing.assert_close(head(model(input_ids=ids).logits), logits)
    assert model.config.final_logit_softcapping == 0.5


def test_the_labels_are_the_next_tokens_with_none_at_a_window_end():
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    assert next_token_labels(ids).tolist() == [6, 7, IGNORE, 9, 10, IGNORE]


def test_the_cross_entropy_gradient_is_softmax_minus_one_hot_by_hand():
    """One position, hidden = identity of size 3, W = I: the logits are h; the gradient by h of
    −log softmax(h)_y is softmax(h) − e_y, here with h = (0, ln 2, ln 3) and y = 2: (1/6, 2/6, −1/2)."""
    hidden = torch.tensor([[[0.0, math.log(2), math.log(3)], [0.0, 0.0, 0.0]]], requires_grad=True)
    head = Head(torch.eye(3), None)
    targets = Targets(torch.tensor([2, IGNORE]), kd_weight=0.0)
    loss, _, ce = head_loss(hidden, head, targets, chunk=1)
    assert float(loss.detach()) == pytest.approx(math.log(2)) and float(ce) == pytest.approx(math.log(2))  # −log(3/6)
    loss.backward()
    torch.testing.assert_close(hidden.grad, torch.tensor([[[1 / 6, 2 / 6, -1 / 2], [0.0, 0.0, 0.0]]]))


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("kd_weight", [1.0, 0.0, 0.3])
@pytest.mark.parametrize("target", ["full", "top-k"])
def test_chunked_loss_equals_the_full_logits_loss_values_and_gradients(softcap, kd_weight, target):
    """Against the losses on the full logits, through autograd: every chunk size (one that does not
    divide the positions too), bias, soft-capping, temperature 2."""
    torch.manual_seed(0)
    b, s, h, v, k, t = 2, 5, 4, 7, 3, 2.0
    hidden = torch.randn(b, s, h, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(v, dtype=torch.float64, requires_grad=True)
    ids, teacher = torch.randint(0, v, (b, s)), 2 * torch.randn(b, s, v, dtype=torch.float64)
    head = Head(weight, bias, softcap)
    logits = head(hidden)
    values, indices = torch.topk(teacher, k, dim=-1)
    kd = (kl_distillation(logits, teacher, t) if target == "full" else topk_distillation(logits, values, indices, t))
    reference = kd_weight * kd + (1 - kd_weight) * next_token_cross_entropy(logits, ids)
    expected = torch.autograd.grad(reference, (hidden, weight, bias))
    flat = teacher.flatten(0, 1)
    targets = Targets(next_token_labels(ids), kd_weight, t, teacher=(lambda a, z: flat[a:z]) if target == "full" else None,
                      values=values.flatten(0, 1) if target == "top-k" else None,
                      indices=indices.flatten(0, 1) if target == "top-k" else None)  # fmt: skip
    for chunk in (1, 3, 10, 64):
        loss, kd_part, _ = head_loss(hidden, head, targets, chunk)
        assert float(loss.detach()) == pytest.approx(float(reference.detach()), rel=1e-6)
        if kd_weight:
            assert float(kd_part) == pytest.approx(float(kd), rel=1e-6)
        for got, want in zip(torch.autograd.grad(loss, (hidden, weight, bias)), expected):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_a_folding_head_is_refused_for_the_student():
    head = Head(torch.eye(3), None, fold=lambda x: x)
    with pytest.raises(ValueError, match="fold"):
        head_loss(torch.zeros(1, 1, 3), head, Targets(torch.tensor([0])), 1)


def test_the_default_chunk_holds_about_two_to_the_24_logits():
    model = tiny_model("llama")  # vocabulary 128
    assert chunk_positions(model) == 2**24 // 128 and chunk_positions(model, logits=1000) == 7


def test_perplexity_is_the_same_computed_in_chunks():
    model = tiny_model("llama").eval()
    windows = calibration_ids(3, 16)
    with torch.no_grad():
        logits = model(input_ids=windows).logits
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), windows[:, 1:].flatten())
    assert perplexity(model, windows, batch_size=2)["perplexity"] == pytest.approx(math.exp(float(nll)), rel=1e-6)
    import secateur.evaluate as evaluate

    small = evaluate.chunk_positions
    try:  # chunks of 5 positions: several per window
        evaluate.chunk_positions = lambda m: 5
        assert perplexity(model, windows, batch_size=2)["perplexity"] == pytest.approx(math.exp(float(nll)), rel=1e-6)
    finally:
        evaluate.chunk_positions = small


def _trained(family: str, teacher: bool = True, **config) -> tuple[dict, dict]:
    model = tiny_model(family)
    result = train(model, TrainConfig(**{**SMALL, **config}), calibration_ids(8, 16), calibration_ids(2, 16, seed=1),
                   teacher=tiny_model(family, seed=1) if teacher else None, device="cpu", progress=False)  # fmt: skip
    return model.state_dict(), result.record


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("recipe", [{}, {"kd_weight": 0.5, "temperature": 2.0}, {"top_k": 8}])
def test_training_with_chunked_losses_equals_training_on_the_full_logits(family, recipe):
    chunked, record = _trained(family, loss_chunk=7, **recipe)
    whole, whole_record = _trained(family, loss_chunk=0, **recipe)
    assert record["loss_chunk"] == 7 and whole_record["loss_chunk"] == 0
    assert record["loss"]["first"] == pytest.approx(whole_record["loss"]["first"], rel=1e-5)
    # AdamW divides by the gradient's own scale: a weight whose gradient is float32 rounding noise moves by
    # up to the learning rate (1e-3) either way, so a few weights may differ by that much, not more
    for name, value in whole.items():
        close = torch.isclose(chunked[name], value, rtol=1e-4, atol=1e-5)
        assert close.float().mean() > 0.999 and (chunked[name] - value).abs().max() < 2e-3, name


def test_the_default_chunk_is_used_and_recorded():
    _, record = _trained("llama")
    assert record["loss_chunk"] == 2**24 // 128


def test_activation_checkpointing_trains_the_same_weights_and_is_switched_off_after():
    plain, _ = _trained("llama")
    model = tiny_model("llama")
    result = train(model, TrainConfig(**SMALL, activation_checkpointing=True), calibration_ids(8, 16),
                   calibration_ids(2, 16, seed=1), teacher=tiny_model("llama", seed=1), device="cpu", progress=False)  # fmt: skip
    assert result.record["activation_checkpointing"] and not model.is_activation_checkpointing
    for name, value in plain.items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=1e-5, atol=1e-6)


def test_a_chunk_asked_for_where_it_cannot_work_is_refused():
    from accelerate.utils import DistributedType

    from secateur.train.loop import _loss_chunk

    model = tiny_model("llama")
    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP, unwrap_model=lambda m: m)
    with pytest.raises(TrainError, match="FSDP shards the output head.*--loss-chunk 0"):
        _loss_chunk(TrainConfig(loss_chunk=64), fsdp, model, None)
    assert _loss_chunk(TrainConfig(), fsdp, model, None) == 0  # the default steps aside
    assert _loss_chunk(TrainConfig(loss_chunk=0), fsdp, model, None) == 0
    one = SimpleNamespace(distributed_type=DistributedType.NO, unwrap_model=lambda m: m)
    assert _loss_chunk(TrainConfig(loss_chunk=64), one, model, None) == 64
