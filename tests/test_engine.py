"""End to end on tiny random models of every family: exact sparsity, N:M, save -> reload, one pass."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import FAMILIES, calibration_ids, tiny_model, tiny_tokenizer
from secateur import NM, MagnitudeConfig, PruneConfig, SparseGPTConfig, Unstructured, WandaConfig, prune, save
from secateur.methods import select_mask, wanda_scores
from secateur.models import adapter_for, read_weight
from secateur.prune import target_layers
from secateur.stats import InputNormSq

CASES = [
    (WandaConfig(), Unstructured(0.5)),
    (SparseGPTConfig(block_size=32), NM(2, 4)),
]


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method,target", CASES, ids=["wanda-50", "sparsegpt-2:4"])
def test_every_family_prunes_exactly_and_reloads(family, method, target, tmp_path):
    model = tiny_model(family)
    embedding = model.get_input_embeddings().weight.clone()
    report = prune(model, None, PruneConfig(method, target), calibration_ids())
    layers = target_layers(model, adapter_for(model))
    assert len(report.layers) == len(layers) == 2 * len(adapter_for(model).layer_names())
    for name, module in layers:
        weight = read_weight(module)
        if isinstance(target, NM):
            assert ((weight != 0).reshape(weight.shape[0], -1, 4).sum(-1) <= 2).all(), name
        else:
            assert int((weight == 0).sum()) >= weight.numel() // 2, name
    assert all(abs(r.sparsity - target.fraction) < 1e-9 for r in report.layers)
    assert torch.equal(model.get_input_embeddings().weight, embedding)  # tied lm_head never prunes it
    save(model, None, tmp_path / "out", {"test": True})
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = calibration_ids(2, 16, seed=1)
    assert torch.equal(logits(model, ids), logits(reloaded, ids))


def reference_wanda(model, calibration, fraction):
    """Textbook sequential Wanda: one full block forward per group to get its inputs."""
    adapter = adapter_for(model)
    blocks = adapter.block_list(model)
    hidden = model.get_input_embeddings()(calibration)
    position_ids = torch.arange(calibration.shape[1])[None]
    rotary = model.model.rotary_emb(hidden, position_ids)
    for block in blocks:
        for group in adapter.groups:
            first = block.get_submodule(group[0])
            seen = []
            handle = first.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
            with torch.no_grad():
                block(hidden, position_embeddings=rotary, position_ids=position_ids, attention_mask=None)
            handle.remove()
            stat = InputNormSq(seen[0].shape[-1], "cpu")
            stat.update(seen[0])
            for name in group:
                module = block.get_submodule(name)
                mask = select_mask(wanda_scores(module.weight, stat.norm), Unstructured(fraction), "per_row")
                module.weight.data[mask] = 0
        with torch.no_grad():
            hidden = block(hidden, position_embeddings=rotary, position_ids=position_ids, attention_mask=None)
    return model


@pytest.mark.parametrize("batch_size", [0, 3])
def test_single_pass_engine_matches_textbook_sequential_pruning(batch_size):
    calibration = calibration_ids()
    expected = reference_wanda(tiny_model("llama"), calibration, 0.5)
    model = tiny_model("llama")
    prune(model, None, PruneConfig(WandaConfig(), Unstructured(0.5)), calibration, batch_size=batch_size)
    for (name, a), (_, b) in zip(target_layers(model, adapter_for(model)), target_layers(expected, adapter_for(expected))):
        assert torch.equal(a.weight == 0, b.weight == 0), name


def test_magnitude_needs_no_calibration_and_global_scope_is_exact():
    model = tiny_model("llama")
    report = prune(model, None, PruneConfig(MagnitudeConfig(scope="global"), Unstructured(0.3)))
    assert abs(report.sparsity - 0.3) < 1e-4
    sizes = [r.shape[0] * r.shape[1] for r in report.layers]
    assert round(report.sparsity * sum(sizes)) == round(0.3 * sum(sizes))
    assert len({round(r.sparsity, 3) for r in report.layers}) > 1  # global: layers differ


def test_ignored_layers_stay_dense():
    model = tiny_model("llama")
    before = model.model.layers[0].mlp.down_proj.weight.clone()
    config = PruneConfig(WandaConfig(), Unstructured(0.5), ignore=("*.0.mlp.down_proj",))
    report = prune(model, None, config, calibration_ids())
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, before)
    assert "model.layers.0.mlp.down_proj" not in {r.name for r in report.layers}


def test_pruning_needs_calibration_for_wanda():
    from secateur import ConfigError

    with pytest.raises(ConfigError, match="needs calibration"):
        prune(tiny_model("llama"), None, PruneConfig(WandaConfig(), Unstructured(0.5)))


def test_bfloat16_model_prunes_in_float32_statistics():
    model = tiny_model("llama").to(torch.bfloat16)
    report = prune(model, tiny_tokenizer(), PruneConfig(SparseGPTConfig(), Unstructured(0.5)), calibration_ids())
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert abs(report.sparsity - 0.5) < 1e-9


def reference_dense_block_wanda(model, calibration, fraction):
    """The reference code's order: every layer of a block calibrated on the dense block."""
    adapter = adapter_for(model)
    hidden = model.get_input_embeddings()(calibration)
    position_ids = torch.arange(calibration.shape[1])[None]
    rotary = model.model.rotary_emb(hidden, position_ids)
    kwargs = dict(position_embeddings=rotary, position_ids=position_ids, attention_mask=None)
    for block in adapter.block_list(model):
        seen = {}
        handles = [block.get_submodule(g[0]).register_forward_pre_hook(lambda m, a, g=g: seen.__setitem__(g, a[0]))
                   for g in adapter.groups]  # fmt: skip
        with torch.no_grad():
            block(hidden, **kwargs)
        for handle in handles:
            handle.remove()
        for group in adapter.groups:
            stat = InputNormSq(seen[group].shape[-1], "cpu")
            stat.update(seen[group])
            for name in group:
                weight = block.get_submodule(name).weight
                weight.data[select_mask(wanda_scores(weight, stat.norm), Unstructured(fraction), "per_row")] = 0
        with torch.no_grad():
            hidden = block(hidden, **kwargs)
    return model


@pytest.mark.parametrize("batch_size", [0, 3])
def test_dense_block_stats_match_the_reference_order(batch_size):
    calibration = calibration_ids()
    expected = reference_dense_block_wanda(tiny_model("llama"), calibration, 0.5)
    model = tiny_model("llama")
    config = PruneConfig(WandaConfig(), Unstructured(0.5), block_stats="dense")
    prune(model, None, config, calibration, batch_size=batch_size)
    sequential = tiny_model("llama")
    prune(sequential, None, PruneConfig(WandaConfig(), Unstructured(0.5)), calibration)
    pairs = zip(target_layers(model, adapter_for(model)), target_layers(expected, adapter_for(expected)))
    for (name, a), (_, b) in pairs:
        assert torch.equal(a.weight == 0, b.weight == 0), name
    differ = [not torch.equal(a.weight, b.weight) for (_, a), (_, b) in
              zip(target_layers(model, adapter_for(model)), target_layers(sequential, adapter_for(sequential)))]
    assert any(differ)  # the two orders are really different
