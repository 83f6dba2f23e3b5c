"""Depth pruning: score formulas, selection against brute force, removal that keeps models valid."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import CONFIGS, calibration_ids, tiny_tokenizer
from transformers import AutoModelForCausalLM

from secateur import load
from secateur.cli import main
from secateur.config import ConfigError
from secateur.depth import (
    Amount,
    BlockInfluenceConfig,
    DepthConfig,
    DepthError,
    FinerCutConfig,
    GreedyLossConfig,
    depth_prune,
    remove_blocks,
    remove_sublayers,
    removed_sublayers,
)
from secateur.depth.scores import angular_distance, block_influence, js_divergence
from secateur.depth.search import SCORE_STRIDE, _Search, select_angular_span
from secateur.depth.structure import Removed, RemovedAttention
from secateur.io import save
from secateur.models import adapter_for


def deep_model(family: str = "llama", layers: int = 4, seed: int = 0):
    config = CONFIGS[family]()
    config.num_hidden_layers = layers
    if family == "gemma3_text":  # alternate, so removal must keep each block's own type
        config.layer_types = [("sliding_attention" if i % 2 == 0 else "full_attention") for i in range(layers)]
    elif getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[0]] * layers
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def silence(block) -> None:
    """Zero the output projections: the block adds nothing to the residual stream."""
    with torch.no_grad():
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()


# --- formulas ----------------------------------------------------------------------------------------


def test_block_influence_is_one_minus_cosine():
    h_in, h_out = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    assert block_influence(h_in, h_out).item() == pytest.approx(1 - 1 / math.sqrt(2), abs=1e-6)
    assert block_influence(h_in, 3 * h_in).item() == pytest.approx(0.0, abs=1e-6)  # scale does not matter


def test_angular_distance_is_arccos_over_pi():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[1.0, 1.0], [0.0, 1.0], [-2.0, 0.0]])
    assert angular_distance(a, b).tolist() == pytest.approx([0.25, 0.5, 1.0], abs=1e-6)  # not 1 - cos (0.29, 1, 2)


def test_js_divergence_hand_computed():
    p, q = torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.75])
    m = (p + q) / 2
    expected = 0.5 * sum(p[i] * math.log(p[i] / m[i]) for i in range(2)) + 0.5 * sum(q[i] * math.log(q[i] / m[i]) for i in range(2))
    assert float(expected) == pytest.approx(0.0338221, abs=1e-6)
    assert js_divergence(p.log(), q.log()).item() == pytest.approx(float(expected), abs=1e-6)
    assert js_divergence(q.log(), p.log()).item() == pytest.approx(float(expected), abs=1e-6)  # symmetric
    disjoint = js_divergence(torch.tensor([0.0, -1e4]), torch.tensor([-1e4, 0.0])).item()
    assert disjoint == pytest.approx(math.log(2), abs=1e-5)  # bounded by ln 2, unlike KL


def test_amount_needs_exactly_one_measure():
    with pytest.raises(ConfigError):
        Amount()
    with pytest.raises(ConfigError):
        Amount(count=2, fraction=0.2)
    with pytest.raises(ConfigError):
        Amount(fraction=1.0)


# --- selection -------------------------------------------------------------------------------------


def test_silent_block_has_zero_influence_and_its_removal_changes_nothing():
    model = deep_model()
    silence(model.model.layers[2])
    ids = calibration_ids(4, 16)
    before = model(input_ids=ids).logits
    selection = depth_prune(model, DepthConfig(BlockInfluenceConfig(), Amount(count=1)), ids, batch_size=2)
    assert selection.blocks == [2]
    assert selection.steps[0].score == pytest.approx(0.0, abs=1e-6)
    assert model.config.num_hidden_layers == 3
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)


def test_angular_span_finds_the_silent_span():
    model = deep_model(layers=5)
    silence(model.model.layers[1])
    silence(model.model.layers[2])
    selection = select_angular_span(model, adapter_for(model), calibration_ids(4, 16), 2, 2, torch.device("cpu"))
    assert selection.blocks == [1, 2]
    assert selection.steps[0].score == pytest.approx(0.0, abs=1e-3)


def _loss_without(model, ids, drop_blocks=(), drop_sublayers=()):
    """Brute force: physically remove, run the stock forward, score the strided positions."""
    model = copy.deepcopy(model)
    adapter = adapter_for(model)
    remove_sublayers(model, adapter, list(drop_sublayers))
    if drop_blocks:
        remove_blocks(model, adapter, list(drop_blocks))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    positions = torch.arange(0, ids.shape[1] - 1, SCORE_STRIDE)
    return logits[:, positions], ids[:, positions + 1]


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_greedy_loss_equals_brute_force(family):
    model = deep_model(family, layers=4)
    ids = calibration_ids(4, 24)
    selection = depth_prune(copy.deepcopy(model), DepthConfig(GreedyLossConfig(), Amount(count=2)), ids, batch_size=2)
    first, second = selection.steps

    def loss(blocks):
        logits, targets = _loss_without(model, ids, drop_blocks=blocks)
        return float(F.cross_entropy(logits.flatten(0, 1), targets.flatten()).detach())

    losses = [loss([i]) for i in range(4)]
    assert first.unit == min(range(4), key=lambda i: losses[i])
    assert first.score == pytest.approx(losses[first.unit], rel=1e-4)
    rest = [i for i in range(4) if i != first.unit]
    pair = {i: loss([first.unit, i]) for i in rest}
    assert second.unit == min(rest, key=lambda i: pair[i])
    assert second.score == pytest.approx(pair[second.unit], rel=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_finercut_scores_equal_brute_force_js(family):
    model = deep_model(family, layers=3)
    ids = calibration_ids(4, 24)
    reference, _ = _loss_without(model, ids)
    search = _Search(model, adapter_for(model), ids, 2, torch.device("cpu"))
    reference_batches = [model(input_ids=b, logits_to_keep=search.positions).logits for b in search.batches]
    search.metric = lambda logits, b: js_divergence(logits, reference_batches[b])
    search.removed_branches.add((0, "attention"))
    inputs = search.block_inputs()
    for unit in [(1, "attention"), (2, "mlp"), (0, "mlp")]:
        logits, _ = _loss_without(model, ids, drop_sublayers=[(0, "attention"), unit])
        expected = float(js_divergence(logits, reference).mean())
        assert search.score(unit, inputs) == pytest.approx(expected, rel=1e-4, abs=1e-7)


def test_finercut_budget_is_parameters():
    model = deep_model(layers=4)
    block_params = sum(p.numel() for p in model.model.layers[0].parameters())
    selection = depth_prune(model, DepthConfig(FinerCutConfig(), Amount(fraction=0.25)), calibration_ids(4, 16), batch_size=2)
    removed = sum(s.parameters for s in selection.steps)
    assert removed >= block_params  # at least one block's worth of compute is gone...
    assert removed - selection.steps[-1].parameters < block_params  # ...and the last step was needed


# --- removal keeps the model valid ---------------------------------------------------------------------


def _generate(model, ids, cache: bool):
    return model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=cache, pad_token_id=0)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma3_text", "gpt2", "opt"])
def test_block_removal_reloads_with_stock_transformers(family, tmp_path):
    model = deep_model(family, layers=4)
    types = list(getattr(model.config, "layer_types", None) or [])
    remove_blocks(model, adapter_for(model), [0, 2])
    assert model.config.num_hidden_layers == 2
    if types:
        assert list(model.config.layer_types) == [types[1], types[3]]
    attention_indices = [m.layer_idx for m in model.modules() if hasattr(m, "layer_idx") and isinstance(m.layer_idx, int)]
    assert set(attention_indices) == {0, 1}
    ids = calibration_ids(2, 12)
    save(model, tiny_tokenizer(), tmp_path / "out", {})
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert stock.config.num_hidden_layers == 2
    torch.testing.assert_close(stock(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    prompt = ids[:1, :6]
    assert torch.equal(_generate(stock, prompt, True), _generate(stock, prompt, False))


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "phi3", "gpt_neox"])
def test_sublayer_removal_reloads_skipped(family, tmp_path):
    model = deep_model(family, layers=3)
    adapter = adapter_for(model)
    params = sum(p.numel() for p in model.parameters())
    remove_sublayers(model, adapter, [(0, "attention"), (1, "mlp")])  # block 0's attention: the cache must still count
    assert sum(p.numel() for p in model.parameters()) < params
    ids = calibration_ids(2, 12)
    manifest = {"depth": {"removed_sublayers": [list(u) for u in removed_sublayers(model, adapter)]}}
    save(model, tiny_tokenizer(), tmp_path / "out", manifest)
    loaded, _ = load(tmp_path / "out")
    assert removed_sublayers(loaded, adapter) == [(0, "attention"), (1, "mlp")]
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    prompt = ids[:1, :6]
    assert torch.equal(_generate(loaded, prompt, True), _generate(loaded, prompt, False))


def test_removed_branch_runs_no_layer():
    model = deep_model(layers=2)
    remove_sublayers(model, adapter_for(model), [(1, "attention")])
    block = model.model.layers[1]
    assert isinstance(block.self_attn, RemovedAttention) and isinstance(block.input_layernorm, Removed)
    calls = []
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda m, a, o: calls.append(m))
    model(input_ids=calibration_ids(1, 8))
    assert model.model.layers[0].self_attn.q_proj in calls and block.mlp.up_proj in calls
    assert len(calls) == 4 + 3 + 3 + 1  # block 0: q k v o + gate up down; block 1: gate up down; lm_head


def test_branch_removal_equals_a_zeroed_branch():
    model = deep_model(layers=2)
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        zeroed.model.layers[1].mlp.down_proj.weight.zero_()
    remove_sublayers(model, adapter_for(model), [(1, "mlp")])
    ids = calibration_ids(2, 12)
    torch.testing.assert_close(model(input_ids=ids).logits, zeroed(input_ids=ids).logits, rtol=1e-6, atol=1e-6)


def test_removal_errors():
    model = deep_model(layers=2)
    adapter = adapter_for(model)
    with pytest.raises(DepthError):
        remove_blocks(model, adapter, [0, 1])
    with pytest.raises(DepthError):
        remove_blocks(model, adapter, [5])
    with pytest.raises(DepthError):
        remove_sublayers(model, adapter, [(0, "attention"), (1, "attention")])
    opt = deep_model("opt", layers=2)
    opt.model.decoder.layers[0].do_layer_norm_before = False
    with pytest.raises(DepthError, match="remove whole blocks"):
        remove_sublayers(opt, adapter_for(opt), [(0, "mlp")])


# --- command line ------------------------------------------------------------------------------------

HOLDOUT = ["--eval-windows", "2", "--eval-seq-len", "16"]


def test_cli_depth_prune_writes_manifest(tmp_path, text_file, model_dir):
    out = tmp_path / "out"
    code = main(["prune", str(model_dir("llama")), "--out", str(out), "--method", "block-influence",
                 "--remove-blocks", "1", "--calib", str(text_file), "--calib-seq-len", "16", *HOLDOUT])  # fmt: skip
    assert code == 0
    manifest = json.loads((out / "secateur.json").read_text())
    assert manifest["depth"]["blocks_before"] == 2 and manifest["depth"]["blocks_after"] == 1
    assert len(manifest["depth"]["removed"]) == 1 and "block influence" in manifest["depth"]["metric"]
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 1


@pytest.mark.parametrize("flags, message", [
    (["--method", "wanda", "--remove-blocks", "1"], "apply to the depth methods"),
    (["--method", "block-influence", "--remove-sublayers", "1"], "removes whole blocks"),
    (["--method", "finercut", "--remove-blocks", "1"], "removes attention / MLP branches"),
    (["--method", "block-influence", "--remove-blocks", "2"], "keep at least one"),  # every block of the tiny model
    (["--method", "greedy-loss"], "give exactly one"),  # no amount
    (["--method", "greedy-loss", "--remove-blocks", "1", "--positions", "last"], "applies to the angular method"),
])  # fmt: skip
def test_cli_depth_bad_requests_exit_2(flags, message, tmp_path, text_file, model_dir, capsys):
    out = tmp_path / "out"
    code = main(["prune", str(model_dir("llama")), "--out", str(out), "--calib", str(text_file),
                 "--calib-seq-len", "16", *HOLDOUT, *flags])  # fmt: skip
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
