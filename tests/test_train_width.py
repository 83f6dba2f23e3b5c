"""Incremental width pruning during training (Adapt-Pruner): the end shape is the one-shot uniform
shape, widths only shrink, the optimizer's moments follow the units kept, masks hold, a resumed run
equals an uninterrupted one, and the output saves and reloads with stock code."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import calibration_ids, killed_and_resumed, tiny_model
from torch import nn

import secateur
from secateur.cli import main
from secateur.models import adapter_for
from secateur.sparsity.prune import target_layers
from secateur.train import TrainConfig, train
from secateur.train.width import adapt_pruner_shares, between, offset_shares, slice_optimizer, widths_of
from secateur.width import LayerWidth, WidthConfig, width_prune
from secateur.width.prune import uniform_widths
from secateur.width.structure import slice_layer
from secateur.width.units import Units

SMALL = dict(tokens=32 * 16, train_seq_len=16, micro_batch=4, val_windows=2)


def _run(model, **settings):
    dense = copy.deepcopy(model)
    config = TrainConfig(lr=1e-3, epochs=2, prune_every=2, **{**SMALL, **settings})
    return train(model, config, calibration_ids(32, 16), calibration_ids(2, 16, seed=1), teacher=dense,
                 progress=False).record  # fmt: skip


@pytest.mark.parametrize("family, share", [("llama", 0.5), ("qwen3", 0.3), ("gpt2", 0.4)])
def test_uniform_widths_are_the_one_shot_widths(family, share):
    model = tiny_model(family)
    predicted = uniform_widths(model, WidthConfig(share))
    width_prune(model, WidthConfig(share, importance="magnitude"), None)
    assert predicted == widths_of(model, adapter_for(model))


def test_between_holds_units_removed_and_the_end_shape():
    wanted = [LayerWidth(4, 2, 96), LayerWidth(2, 1, 50)]
    previous = [LayerWidth(4, 2, 88), LayerWidth(4, 2, 128)]
    final = [LayerWidth(2, 1, 64), LayerWidth(2, 1, 100)]
    assert between(wanted, previous, final) == [LayerWidth(4, 2, 88), LayerWidth(2, 1, 100)]


def test_heads_go_in_proportion_to_the_share_removed():
    """3 key/value groups, 50%: the end shape keeps 1 group (round(1.5) = 2 removed). After update k of
    8 the share removed is 0.5 (1 − (1 − k/8)³), i.e. x = 0.330, 0.578, 0.756, ... of the end's; a
    block has lost round(2x) groups: 1, 1, 2, ... (a one-shot prune of each share would keep all 3
    groups until the last update: round(3 · share) < 1.5 before it)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from secateur.train.gradual import GradualPlan
    from secateur.train.width import IncrementalWidth

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=256,
                                                         num_hidden_layers=2, num_attention_heads=6,
                                                         num_key_value_heads=3))  # fmt: skip
    plan = GradualPlan(0.0, 0.5, 0, 1, 8)
    pruner = IncrementalWidth.build(model, adapter_for(model), plan, WidthConfig(0.5))
    assert [t[0].key_value_heads for t in pruner.targets] == [2, 2, 1, 1, 1, 1, 1, 1]
    assert pruner.targets[-1] == uniform_widths(model, WidthConfig(0.5))


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
def test_incremental_width_ends_on_the_one_shot_shape(family):
    """Widths only shrink from update to update; the last update leaves the one-shot uniform shape,
    and the config describes it (stock code rebuilds the same shapes)."""
    model = tiny_model(family)
    expected = uniform_widths(model, WidthConfig(0.5))
    record = _run(model, prune_width=0.5)
    events = record["width"]["events"]
    assert [e["step"] for e in events] == [2, 4, 6, 8, 10, 12]
    assert events[-1]["target"] == pytest.approx(0.5)
    shapes = [[LayerWidth(**w) for w in e["widths"]] for e in events]
    for a, b in zip(shapes, shapes[1:]):
        assert all(x.channels >= y.channels and (x.attention_heads or 0) >= (y.attention_heads or 0)
                   for x, y in zip(a, b))  # fmt: skip
    assert shapes[0] != shapes[-1] == expected == widths_of(model, adapter_for(model))
    rebuilt = type(model)(model.config)
    assert [p.shape for p in rebuilt.parameters()] == [p.shape for p in model.parameters()]


def test_adaptive_incremental_width_removes_the_share():
    model = tiny_model("qwen2")
    before = sum(p.numel() for p in adapter_for(model).block_list(model).parameters())
    record = _run(model, prune_width=0.4, width_allocation="adaptive", width_importance="magnitude")
    after = sum(p.numel() for p in adapter_for(model).block_list(model).parameters())
    assert 1 - after / before == pytest.approx(0.4, abs=0.02)
    assert record["width"]["events"][-1]["removed"] == pytest.approx(1 - after / before)
    assert len({(w.attention_heads, w.channels) for w in widths_of(model, adapter_for(model))}) > 1


def test_adapt_pruner_shares_at_hand_computed_values():
    """Importances 0.1, 0.2, 0.6: centred -0.2, -0.1, 0.3, over the largest magnitude -2/3, -1/3, 1;
    increment 0.1, A = 0.03: 0.1 + 0.02, 0.1 + 0.01, 0.1 - 0.03 (the most important block loses least)."""
    shares = adapt_pruner_shares([0.0, 0.0, 0.0], [0.1, 0.2, 0.6], 0.1, 0.03)
    assert shares == pytest.approx([0.12, 0.11, 0.07])
    assert adapt_pruner_shares([0.98, 0.0], [0.5, 0.5], 0.1, 0.03) == pytest.approx([0.99, 0.1])  # capped; equal
    assert adapt_pruner_shares([0.0, 0.05], [0.0, 1.0], 0.01, 0.03) == pytest.approx([0.04, 0.03])  # no floor hit
    assert adapt_pruner_shares([0.0, 0.0], [0.0, 1.0], 0.01, 0.03) == pytest.approx([0.04, 0.0])  # floored at 0


def test_attention_units_go_whole():
    """3 key/value groups: a group goes only once the share covers it (floor(0.516 x 3) = 1 removed,
    where rounding the kept 1.45 half up would remove 2); MLP channels round half up."""
    from secateur.train.width import kept_units

    assert kept_units(3, 3, 0.516, whole=True) == 2 and kept_units(3, 3, 0.516) == 1
    assert kept_units(3, 3, 2 / 3, whole=True) == 1 and kept_units(3, 2, 0.0, whole=True) == 2
    assert kept_units(10, 10, 0.25) == 8 and kept_units(10, 10, 0.99, whole=True) == 1


def test_offset_shares_reaches_the_target_with_one_offset():
    """Two blocks of 10 channels (1 parameter each) at shares 0.1 and 0.3: at c = 0 they keep 9 and 7
    (4 removed); the target 6 needs c just above 0.05, where round(8.5-) = 8 and round(6.5-) = 6."""
    units = [Units(0, "mlp", torch.zeros(10), 1), Units(1, "mlp", torch.zeros(10), 1)]
    counts = {(0, "mlp"): 10, (1, "mlp"): 10}
    kept, c = offset_shares(units, counts, counts, [0.1, 0.3], 6)
    assert kept == {(0, "mlp"): 8, (1, "mlp"): 6} and c == pytest.approx(0.05, abs=1e-6)
    # a block never regrows past its current units, and keeps at least one
    kept, _ = offset_shares(units, counts, {(0, "mlp"): 5, (1, "mlp"): 10}, [0.0, 0.0], 0)
    assert kept == {(0, "mlp"): 5, (1, "mlp"): 10}
    kept, _ = offset_shares(units, counts, counts, [0.0, 0.0], 100)
    assert kept == {(0, "mlp"): 1, (1, "mlp"): 1}


def test_adapt_pruner_incremental_width_removes_the_share_by_block_importance():
    """Per-block widths from the blocks' input-output cosine: the schedule's share is removed at every
    update (to rounding), widths only shrink, and the events carry the importances and shares."""
    model = tiny_model("llama")
    adapter = adapter_for(model)
    before = sum(p.numel() for p in adapter.block_list(model).parameters())
    record = _run(model, prune_width=0.5, width_allocation="adapt-pruner", width_amplitude=0.2)
    after = sum(p.numel() for p in adapter.block_list(model).parameters())
    assert 1 - after / before == pytest.approx(0.5, abs=0.02)
    events = record["width"]["events"]
    assert record["width"]["allocation"] == "adapt-pruner" and record["width"]["amplitude"] == 0.2
    for event in events:
        assert event["removed"] == pytest.approx(event["target"], abs=0.03)
        assert len(event["influence"]) == len(event["shares"]) == model.config.num_hidden_layers
    # the more important block (higher 1 - cos) ends with the smaller share
    influence, shares = events[0]["influence"], events[-1]["shares"]
    assert (shares[0] < shares[1]) == (influence[0] > influence[1])
    shapes = [[LayerWidth(**w) for w in e["widths"]] for e in events]
    for a, b in zip(shapes, shapes[1:]):
        assert all(x.channels >= y.channels and x.attention_heads >= y.attention_heads for x, y in zip(a, b))


def test_optimizer_moments_follow_the_rows_and_columns_kept():
    layer = nn.Linear(6, 4, bias=True)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1)
    layer(torch.randn(3, 6)).pow(2).sum().backward()
    optimizer.step()
    state = {name: {k: v.clone() for k, v in optimizer.state[p].items()} for name, p in layer.named_parameters()}
    sliced = {}
    rows, columns = torch.tensor([0, 2, 3]), torch.tensor([1, 4])
    slice_layer(layer, rows=rows, columns=columns, on_slice=lambda old, new, take: sliced.__setitem__(old, (new, take)))
    slice_optimizer(optimizer, layer, sliced)
    weight, bias = optimizer.state[layer.weight], optimizer.state[layer.bias]
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(weight[key], state["weight"][key][rows][:, columns], rtol=0, atol=0)
        torch.testing.assert_close(bias[key], state["bias"][key][rows], rtol=0, atol=0)
    assert float(weight["step"]) == 1.0 and len(optimizer.state) == 2
    assert optimizer.param_groups[0]["params"] == [layer.weight, layer.bias]
    layer(torch.randn(3, 2)).sum().backward()
    optimizer.step()  # goes on with the sliced state


def test_masks_of_a_sparse_model_hold_through_incremental_width():
    model = tiny_model("llama")
    secateur.prune(model, secateur.PruneConfig(secateur.MagnitudeConfig(), secateur.Unstructured(0.5)))
    record = _run(model, prune_width=0.3)
    layers = target_layers(model, adapter_for(model))
    zeros = sum(int((m.weight == 0).sum()) for _, m in layers) / sum(m.weight.numel() for _, m in layers)
    assert 0 < record["masks"]["kept_after"] < record["masks"]["kept"]  # the masks were sliced with the weights
    assert zeros == pytest.approx(0.5, abs=0.06)  # the kept rows and columns keep their zeros (no refill)


@pytest.mark.parametrize("allocation", ["uniform", "adapt-pruner"])
def test_incremental_width_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch, allocation):
    """Killed after three width updates (checkpoint at step 6), resumed: the same shapes and weights,
    bit for bit, as an uninterrupted run (Adapt-Pruner's per-block shares are restored too)."""
    config = TrainConfig(prune_width=0.5, prune_every=2, epochs=2, lr=1e-2, checkpoint_every=3, eval_every=16,
                         precision="float32", width_allocation=allocation, **SMALL)  # fmt: skip
    model = tiny_model("llama")
    whole, resumed, record = killed_and_resumed(tmp_path, monkeypatch, model, config, die_at=8)
    saved = json.loads((tmp_path / "b" / "checkpoint" / "shape.json").read_text())["widths"]
    assert saved != [w.to_dict() for w in widths_of(model, adapter_for(model))]  # a narrower model was saved
    assert record["resumed_at"] == 6
    assert [e["step"] for e in record["width"]["events"]] == [2, 4, 6, 8, 10, 12]
    assert whole.state_dict().keys() == resumed.state_dict().keys()
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_cli_train_with_incremental_width_saves_a_stock_model(tmp_path, model_dir, text_file):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    assert main(["train", str(model_dir("llama")), "--out", str(out), "--tokens", "512", "--train-seq-len", "16",
                 "--val-windows", "2", "--micro-batch", "4", "--eval-seq-len", "16", "--eval-windows", "4",
                 "--calib", str(text_file), "--eval", str(text_file), "--prune-width", "0.5",
                 "--prune-every", "2"]) == 0  # fmt: skip
    manifest = json.loads((out / "secateur.json").read_text())
    result = manifest["history"][-1]["result"]
    assert result["width"]["share"] == 0.5 and manifest["structure"]["uniform_widths"]
    ours, _ = secateur.load(out)
    stock = AutoModelForCausalLM.from_pretrained(out)
    ids = calibration_ids(2, 16)
    torch.testing.assert_close(stock(input_ids=ids).logits, ours(input_ids=ids).logits)
    assert manifest["structure"]["parameters"] == sum(p.numel() for p in stock.parameters())


@pytest.mark.parametrize("settings, message", [
    ({"prune_width": 0.5, "prune_to": 0.5}, "not both in one stage"),
    ({"width_importance": "taylor"}, "applies only with incremental width pruning \\(--prune-width\\)"),
    ({"prune_width": 0.5, "mode": "lora"}, "use --mode full"),
    ({"prune_width": 1.0}, "must be in \\(0, 1\\)"),
    ({"prune_width": 0.5, "prune_score": "wanda"}, "--width-importance"),
    ({"prune_width": 0.5, "width_amplitude": 0.1}, "applies only with --width-allocation adapt-pruner"),
    ({"prune_width": 0.5, "width_allocation": "adapt-pruner", "width_amplitude": 1.5}, "must be in \\[0, 1\\)"),
])
def test_incremental_width_settings_refused(settings, message):
    with pytest.raises(secateur.SecateurError, match=message):
        TrainConfig(**settings)


def test_incremental_width_after_nm_sparsity_is_refused():
    from secateur.recipe import check_order

    with pytest.raises(secateur.SecateurError, match="breaks the N:M groups"):
        check_order([("sparsity", {"method": "sparsegpt", "pattern": "2:4"}), ("recovery", {"prune_width": 0.3})])
