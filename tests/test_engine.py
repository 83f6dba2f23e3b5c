"""End to end on tiny random models of every family: exact sparsity, N:M, save -> reload, one pass."""

import pytest
import torch
from conftest import FAMILIES, calibration_ids, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

from secateur import NM, MagnitudeConfig, PruneConfig, RIAConfig, SparseGPTConfig, Unstructured, WandaConfig, save
from secateur.sparsity.methods import select_mask, wanda_scores
from secateur.models import adapter_for, read_weight
from secateur.sparsity.prune import sparsify, target_layers
from secateur.calibrate.stats import InputNormSq

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
    report = sparsify(model, None, PruneConfig(method, target), calibration_ids())
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


def _llama_stream(model, calibration):
    """First-block input and the keyword arguments every tiny-Llama block takes."""
    hidden = model.get_input_embeddings()(calibration)
    position_ids = torch.arange(calibration.shape[1])[None]
    rotary = model.model.rotary_emb(hidden, position_ids)
    return hidden, dict(position_embeddings=rotary, position_ids=position_ids, attention_mask=None)


def _wanda_group(block, group, x, fraction):
    stat = InputNormSq(x.shape[-1], "cpu")
    stat.update(x)
    for name in group:
        weight = block.get_submodule(name).weight
        weight.data[select_mask(wanda_scores(weight, stat.norm), Unstructured(fraction), "per_row")] = 0


def _group_inputs(block, groups, hidden, kwargs):
    """Input of each group's first layer in one forward of the block (as it is now)."""
    seen = {}
    handles = [block.get_submodule(g[0]).register_forward_pre_hook(lambda m, a, g=g: seen.__setitem__(g, a[0]))
               for g in groups]  # fmt: skip
    with torch.no_grad():
        block(hidden, **kwargs)
    for handle in handles:
        handle.remove()
    return seen


def reference_wanda(model, calibration, fraction, dense_block=False):
    """Textbook Wanda with full block forwards: each group calibrated after its predecessors are
    pruned (one forward per group), or all groups on the dense block (the reference code's order)."""
    adapter = adapter_for(model)
    hidden, kwargs = _llama_stream(model, calibration)
    for block in adapter.block_list(model):
        if dense_block:
            seen = _group_inputs(block, adapter.groups, hidden, kwargs)
        for group in adapter.groups:
            x = seen[group] if dense_block else _group_inputs(block, [group], hidden, kwargs)[group]
            _wanda_group(block, group, x, fraction)
        with torch.no_grad():
            hidden = block(hidden, **kwargs)
    return model


def same_masks(a, b) -> bool:
    pairs = zip(target_layers(a, adapter_for(a)), target_layers(b, adapter_for(b)))
    return all(torch.equal(x.weight == 0, y.weight == 0) for (_, x), (_, y) in pairs)


@pytest.mark.parametrize("batch_size", [0, 3])
def test_single_pass_engine_matches_textbook_sequential_pruning(batch_size):
    calibration = calibration_ids()
    expected = reference_wanda(tiny_model("llama"), calibration, 0.5)
    model = tiny_model("llama")
    sparsify(model, None, PruneConfig(WandaConfig(), Unstructured(0.5)), calibration, batch_size=batch_size)
    assert same_masks(model, expected)


def test_magnitude_needs_no_calibration_and_global_scope_is_exact():
    model = tiny_model("llama")
    report = sparsify(model, None, PruneConfig(MagnitudeConfig(scope="global"), Unstructured(0.3)))
    assert abs(report.sparsity - 0.3) < 1e-4
    sizes = [r.shape[0] * r.shape[1] for r in report.layers]
    assert round(report.sparsity * sum(sizes)) == round(0.3 * sum(sizes))
    assert len({round(r.sparsity, 3) for r in report.layers}) > 1  # global: layers differ


def test_ignored_layers_stay_dense():
    model = tiny_model("llama")
    before = model.model.layers[0].mlp.down_proj.weight.clone()
    config = PruneConfig(WandaConfig(), Unstructured(0.5), ignore=("*.0.mlp.down_proj",))
    report = sparsify(model, None, config, calibration_ids())
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, before)
    assert "model.layers.0.mlp.down_proj" not in {r.name for r in report.layers}


def test_pruning_needs_calibration_for_wanda():
    from secateur import ConfigError

    with pytest.raises(ConfigError, match="needs calibration"):
        sparsify(tiny_model("llama"), None, PruneConfig(WandaConfig(), Unstructured(0.5)))


def test_bfloat16_model_prunes_in_float32_statistics():
    model = tiny_model("llama").to(torch.bfloat16)
    report = sparsify(model, tiny_tokenizer(), PruneConfig(SparseGPTConfig(), Unstructured(0.5)), calibration_ids())
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert abs(report.sparsity - 0.5) < 1e-9


@pytest.mark.parametrize("batch_size", [0, 3])
def test_dense_block_stats_match_the_reference_order(batch_size):
    calibration = calibration_ids()
    expected = reference_wanda(tiny_model("llama"), calibration, 0.5, dense_block=True)
    model = tiny_model("llama")
    sparsify(model, None, PruneConfig(WandaConfig(), Unstructured(0.5), block_stats="dense"), calibration, batch_size=batch_size)
    assert same_masks(model, expected)
    assert not same_masks(model, reference_wanda(tiny_model("llama"), calibration, 0.5))  # the orders differ


@pytest.mark.parametrize("method", [WandaConfig(), RIAConfig()], ids=lambda m: m.name)
def test_score_methods_prune_one_layer_at_a_time_with_the_group_result(method, monkeypatch):
    """Wanda and RIA score each weight alone: the engine hands their handler one layer per job
    (one layer's float32 copy and scores resident), and the weights equal a run given whole groups."""
    import dataclasses

    from secateur.sparsity import methods

    spec = methods.REGISTRY[method.name]
    assert spec.layerwise
    seen: list[int] = []

    def spy(config, job):
        seen.append(len(job.weights))
        return spec.prune_group(config, job)

    ids, config = calibration_ids(), PruneConfig(method, Unstructured(0.5))
    split, whole = tiny_model("llama"), tiny_model("llama")
    monkeypatch.setitem(methods.REGISTRY, method.name, dataclasses.replace(spec, prune_group=spy))
    sparsify(split, None, config, ids)
    assert seen and set(seen) == {1}  # q/k/v and gate/up groups included
    seen.clear()
    monkeypatch.setitem(methods.REGISTRY, method.name, dataclasses.replace(spec, prune_group=spy, layerwise=False))
    sparsify(whole, None, config, ids)
    assert max(seen) == 3  # q, k and v in one job
    for a, b in zip(split.parameters(), whole.parameters()):
        assert torch.equal(a, b)


def test_free_pages_are_handed_back_after_every_group(monkeypatch):
    """Within a large block the heap climbs by gigabytes of freed temporaries, by a varying amount
    from run to run: the engine hands the free pages back once each group is pruned, whatever its size."""
    from secateur.sparsity import engine

    calls: list[int] = []
    monkeypatch.setattr(engine, "release_free_memory", lambda: calls.append(1) or True)
    model = tiny_model("llama")
    report = sparsify(model, None, PruneConfig(WandaConfig(), Unstructured(0.5)), calibration_ids())
    groups = len(adapter_for(model).block_list(model)) * 4  # q/k/v, o, gate/up, down
    assert len(report.layers) == len(adapter_for(model).block_list(model)) * 7
    assert len(calls) == groups
