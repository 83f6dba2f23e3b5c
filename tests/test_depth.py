"""Depth pruning: score formulas, selection against brute force, removal that keeps models valid."""

from __future__ import annotations

import dataclasses
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import CONFIGS, calibration_ids, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

import secateur
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
    config = DepthConfig(GreedyLossConfig(), Amount(count=2), remove_last=True)  # every block a candidate
    selection = depth_prune(copy.deepcopy(model), config, ids, batch_size=2)
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
    depth = manifest["history"][-1]["result"]
    assert depth["blocks_before"] == 2 and depth["blocks_after"] == 1 and manifest["structure"]["blocks"] == 1
    assert len(depth["removed"]) == 1 and "block influence" in depth["metric"]
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 1


@pytest.mark.parametrize("flags, message", [
    (["--method", "wanda", "--remove-blocks", "1"], "--remove-blocks belongs to depth (block-influence, angular, greedy"),
    (["--method", "block-influence", "--remove-sublayers", "1"], "--remove-sublayers belongs to depth (finercut)"),
    (["--method", "finercut", "--remove-blocks", "1"], "not to finercut (depth)"),
    (["--method", "block-influence", "--remove-blocks", "2"], "keep at least one"),  # every block of the tiny model
    (["--method", "greedy-loss"], "give exactly one"),  # no amount
    (["--method", "greedy-loss", "--remove-blocks", "1", "--positions", "last"], "--positions belongs to depth (angular)"),
    (["--method", "finercut", "--remove-sublayers", "1", "--compensate"], "not to finercut"),
    (["--method", "angular", "--remove-blocks", "1.7"], "--remove-blocks: invalid int value"),
    (["--method", "angular", "--remove-blocks", "1", "--no-compensate", "--compensate-damp", "0.5"], "--no-compensate turns off"),
    (["--method", "wanda", "--compensate"], "--compensate belongs to depth"),
])  # fmt: skip
def test_cli_depth_bad_requests_exit_2(flags, message, tmp_path, text_file, model_dir, capsys):
    out = tmp_path / "out"
    code = main(["prune", str(model_dir("llama")), "--out", str(out), "--calib", str(text_file),
                 "--calib-seq-len", "16", *HOLDOUT, *flags])  # fmt: skip
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


# --- linear compensation -----------------------------------------------------------------------------


def test_runs_are_maximal_consecutive():
    from secateur.depth.compensate import runs

    assert runs([7, 1, 2, 4, 6]) == [(1, 2), (4, 4), (6, 7)]
    assert runs([]) == []


def test_ridge_towards_prior_hand_cases():
    from secateur.calibrate.ridge import NormalEquations, ridge_towards

    torch.manual_seed(0)
    a, r, prior = torch.randn(50, 4, dtype=torch.float64), torch.randn(50, 3, dtype=torch.float64), torch.randn(4, 3)
    eq = NormalEquations.empty(4, 3, torch.device("cpu"))
    eq.update(a[:20], r[:20])
    eq.update(a[20:], r[20:])  # sums over batches
    lam = 0.5 * float((a.T @ a).diagonal().mean())
    expected = torch.linalg.solve(a.T @ a + lam * torch.eye(4, dtype=torch.float64), a.T @ r + lam * prior.double())
    torch.testing.assert_close(ridge_towards(eq, prior, 0.5), expected)  # pulled towards the prior, not to zero
    lstsq = torch.linalg.lstsq(a, r).solution
    torch.testing.assert_close(ridge_towards(eq, prior, 0.0), lstsq, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ridge_towards(eq, prior, 1e9), prior.double(), rtol=1e-6, atol=1e-6)
    for coef in (prior.double(), expected):
        assert eq.error(coef) == pytest.approx(float(((a @ coef - r) ** 2).sum()), rel=1e-9)


def test_the_consuming_ridge_solves_and_scores_as_the_sums_do():
    """The depth fit's solver spends the sums (Cholesky in place) but gives the same solution, and the
    errors at the prior and at the solution that the intact sums give, by hand from the data."""
    from secateur.calibrate.ridge import NormalEquations, ridge_consuming, ridge_towards

    torch.manual_seed(0)
    a, r, prior = torch.randn(60, 5, dtype=torch.float64), torch.randn(60, 3, dtype=torch.float64), torch.randn(5, 3)
    sums = [NormalEquations.empty(5, 3, torch.device("cpu")) for _ in range(2)]
    for eq in sums:
        eq.update(a[:25], r[:25]), eq.update(a[25:], r[25:])
    for damp in (0.5, 0.0):
        kept, spent = (NormalEquations(e.gram.clone(), e.cross.clone(), e.target_sq) for e in sums)
        coef, before, after = ridge_consuming(spent, prior, damp)
        torch.testing.assert_close(coef, ridge_towards(kept, prior, damp), rtol=1e-8, atol=1e-10)
        assert before == pytest.approx(float(((a @ prior.double() - r) ** 2).sum()), rel=1e-9)
        assert after == pytest.approx(float(((a @ coef - r) ** 2).sum()), rel=1e-7)
        assert spent.gram is None and spent.cross is None


def _identity_forward(hidden_states, *args, **kwargs):
    return hidden_states


def _brute_force_fit(model, ids, skip, first, last, consumer, damp):
    """Capture a, Y (block first-1) and L (leaving block last) with hooks on the stock forward, the
    earlier runs skipped; solve the ridge directly."""
    blocks = adapter_for(model).block_list(model)
    seen = {}
    module = blocks[first - 1].get_submodule(consumer)
    def state(key):
        return lambda _, __, out: seen.update({key: out[0] if isinstance(out, tuple) else out})

    hooks = [module.register_forward_hook(lambda _, args, out: seen.update(a=args[0], m=out)),
             blocks[first - 1].register_forward_hook(state("o")), blocks[last].register_forward_hook(state("l"))]
    for i in skip:
        blocks[i].forward = _identity_forward
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
        for i in skip:
            del blocks[i].forward
    a = seen["a"].reshape(-1, seen["a"].shape[-1]).double()
    r = (seen["l"] - (seen["o"] - seen["m"])).reshape(-1, seen["l"].shape[-1]).double()
    weight = module.weight.data.T if module.weight.shape[0] != r.shape[1] else module.weight.data  # Conv1D
    prior = weight.T.double()
    if getattr(module, "bias", None) is not None:
        a = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1)
        prior = torch.cat([prior, module.bias.data[None].double()])
    gram = a.T @ a
    lam = damp * float(gram.diagonal().mean())
    return torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=gram.dtype), a.T @ r + lam * prior)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_compensation_equals_direct_fit_run_by_run(family):
    """Two runs (1..2 and 4): each fit equals a direct ridge on hooks of the stock forward, the second
    one on the model already compensated for the first; then the runs are removed."""
    from secateur.depth.compensate import compensate

    model = deep_model(family, layers=6)
    adapter = adapter_for(model)
    consumer = adapter.width.mlp.consumer
    ids = calibration_ids(4, 16)
    reference = copy.deepcopy(model)
    expected = {}
    for first, last, skip in ((1, 2, ()), (4, 4, (1, 2))):
        coef = _brute_force_fit(reference, ids, skip, first, last, consumer, 0.1)
        module = adapter.block_list(reference)[first - 1].get_submodule(consumer)
        n_in = coef.shape[0] - (module.bias is not None)
        with torch.no_grad():  # apply, so the next run sees the compensated model
            target = module.weight if module.weight.shape[1] == n_in else module.weight.T
            target.copy_(coef[:n_in].T.float())
            if module.bias is not None:
                module.bias.copy_(coef[-1].float())
        expected[first - 1] = coef
    records = compensate(model, adapter, [1, 2, 4], ids, batch_size=2, device=torch.device("cpu"), damp=0.1)
    assert [r["run"] for r in records] == [[1, 2], [4, 4]]
    for record in records:
        assert record["error_after"] < record["error_before"]
    for index in expected:
        got = adapter.block_list(model)[index].get_submodule(consumer)
        want = adapter.block_list(reference)[index].get_submodule(consumer)
        torch.testing.assert_close(got.weight, want.weight, rtol=1e-4, atol=1e-5)


def test_compensation_from_known_dense_targets_equals_the_streamed_pass():
    """The first run, given the dense states leaving it, is fitted without running its blocks: the
    same weights. The second run's target follows the first fit, so its dense state is not used."""
    from secateur.calibrate.stream import BlockState
    from secateur.depth import compensate as module
    from secateur.depth.search import boundary_states

    model = deep_model("llama", layers=6)
    adapter = adapter_for(model)
    ids = calibration_ids(4, 16)
    states = {i: [h.clone() for h in hidden] for i, hidden in boundary_states(model, adapter, ids, 2, torch.device("cpu"))}
    streamed, known = copy.deepcopy(model), copy.deepcopy(model)
    module.compensate(streamed, adapter, [2, 3, 5], ids, 2, torch.device("cpu"))
    calls, real = [], module.run_block
    module.run_block = lambda *a: calls.append(1) or real(*a)
    try:  # targets: the dense states leaving block 3 (entering 4) and leaving block 5 (a wrong one for run 2)
        module.compensate(known, adapter, [2, 3, 5], ids, 2, torch.device("cpu"), start=BlockState(1, states[1]),
                          targets={3: states[4], 5: states[6]})  # fmt: skip
    finally:
        module.run_block = real
    for a, b in zip(streamed.parameters(), known.parameters()):
        assert torch.equal(a, b)
    # 2 batches: block 1 checked (2 runs of one batch), fitted (2) and run fitted (2); block 4 runs (2),
    # block 4's check (2), block 5 (2), the fit (2) and the fitted block 4 (2); blocks 2 and 3 never run
    assert len(calls) == 16


def test_compensation_lowers_the_output_error_and_saves_stock(tmp_path):
    model = deep_model("llama", layers=6)
    ids = calibration_ids(8, 24)
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    plain, fitted = copy.deepcopy(model), copy.deepcopy(model)
    config = DepthConfig(BlockInfluenceConfig(), Amount(count=2), compensate=False)
    chosen = depth_prune(plain, config, ids, batch_size=4).blocks
    selection = depth_prune(fitted, DepthConfig(BlockInfluenceConfig(), Amount(count=2), compensate=True), ids,
                            batch_size=4)  # fmt: skip
    assert selection.blocks == chosen and selection.compensation
    assert selection.to_dict()["compensation"] == selection.compensation
    with torch.no_grad():
        err_plain = (plain(input_ids=ids).logits - dense).norm()
        err_fitted = (fitted(input_ids=ids).logits - dense).norm()
    assert any(r["fitted"] for r in selection.compensation)  # this seed removes block 0 and block 4
    assert err_fitted < err_plain
    save(fitted, tiny_tokenizer(), tmp_path / "out", {})
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, fitted(input_ids=ids).logits)


def test_compensation_of_a_run_at_block_zero_is_recorded_as_impossible():
    from secateur.depth.compensate import compensate

    model = deep_model("llama", layers=4)
    before = copy.deepcopy(model.state_dict())
    records = compensate(model, adapter_for(model), [0, 1], calibration_ids(2, 8), 2, torch.device("cpu"))
    assert records == [{"run": [0, 1], "fitted": None, "why": records[0]["why"]}] and "block 0" in records[0]["why"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_compensation_of_a_normalised_mlp_output_fits_the_norm_scale():
    """Gemma 3 normalises the MLP output before the residual add: the fit is the norm's scale alone or
    the output projection's direction and the scale, whichever leaves the lower calibration error.
    The scale alone is the per-channel ridge computed here on hooks of the stock forward; the record's
    error is the one the compensated model really has (re-measured here) and is at most the scale's;
    only the fitted block's MLP changes; an adapter that forgot the norm is caught by running it."""
    from secateur.depth.compensate import compensate

    model = deep_model("gemma3_text", layers=4)
    adapter = adapter_for(model)
    ids = calibration_ids(4, 8)
    blocks = adapter.block_list(model)
    norm = blocks[1].post_feedforward_layernorm

    def observe() -> tuple[torch.Tensor, ...]:  # (norm input, norm output, block 1 out, L)
        seen, states = {}, {}
        handles = [norm.register_forward_hook(lambda m, a, o: seen.update(x=a[0], n=o)),
                   blocks[1].register_forward_hook(lambda m, a, o: states.update(out1=o[0] if isinstance(o, tuple) else o)),
                   blocks[3].register_forward_pre_hook(lambda m, a, k: states.update(l=(a[0] if a else k["hidden_states"])),
                                                       with_kwargs=True)]  # fmt: skip
        with torch.no_grad():
            model(input_ids=ids)
        for handle in handles:
            handle.remove()
        return seen["x"].float(), seen["n"], states["out1"], states["l"]

    x, n, out1, dense_l = observe()
    u = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)).reshape(-1, x.shape[-1])
    r = (dense_l - (out1 - n)).float().reshape(u.shape)  # L - Y
    prior = norm.weight.detach().float() + 1.0
    lam = 0.1 * float((u * u).sum(0).mean())
    scale_only = ((u * r).sum(0) + lam * prior) / ((u * u).sum(0) + lam)
    scale_error = float((u * scale_only - r).norm() / r.norm())
    before = copy.deepcopy(model.state_dict())
    records = compensate(model, adapter, [2], ids, 2, torch.device("cpu"))
    record = records[0]
    assert record["error_before"] == pytest.approx(float((u * prior - r).norm() / r.norm()), rel=1e-4)
    assert record["error_after"] <= scale_error * (1 + 1e-4) and record["error_after"] < record["error_before"]
    _, _, out1_fitted, _ = observe()  # block 1 compensated, its output now stands for blocks 1..2
    assert float((out1_fitted - dense_l).norm() / r.norm()) == pytest.approx(record["error_after"], rel=1e-3)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(before[k], v)]
    if record["fit"] == "post-norm scale":
        assert record["fitted"] == "model.layers.1.post_feedforward_layernorm"
        torch.testing.assert_close(norm.weight.detach(), scale_only - 1.0, rtol=1e-4, atol=1e-5)
        assert changed == ["model.layers.1.post_feedforward_layernorm.weight"]
    else:
        assert record["fit"] == "output direction and post-norm scale"
        assert record["fitted"] == "model.layers.1.mlp.down_proj, model.layers.1.post_feedforward_layernorm"
        assert sorted(changed) == ["model.layers.1.mlp.down_proj.weight", "model.layers.1.post_feedforward_layernorm.weight"]
    forgetful = dataclasses.replace(adapter, width=dataclasses.replace(
        adapter.width, mlp=dataclasses.replace(adapter.width.mlp, post_norm=None)))
    with pytest.raises(DepthError, match="not added straight to the residual stream"):
        compensate(model, forgetful, [2], calibration_ids(2, 8), 2, torch.device("cpu"))


def test_post_norm_compensation_folds_a_turned_output_exactly():
    """The dense model's block 1 writes the same MLP output with its channels permuted (P·W) and block 2
    adds nothing: what leaves the run is s ⊙ unit(P·M), which the scale alone cannot reach but P·W
    in the output projection does, exactly (the target direction has M's own length)."""
    from secateur.depth.compensate import compensate

    dense = deep_model("gemma3_text", layers=4)
    adapter = adapter_for(dense)
    blocks = adapter.block_list(dense)
    silence(blocks[2])
    model = copy.deepcopy(dense)
    down = blocks[1].mlp.down_proj.weight
    permutation = torch.roll(torch.arange(down.shape[0]), 1)
    with torch.no_grad():
        norm = blocks[1].post_feedforward_layernorm.weight
        norm.copy_(torch.linspace(-0.5, 0.5, norm.shape[0]))  # a scale that differs per channel
        adapter.block_list(model)[1].post_feedforward_layernorm.weight.copy_(norm)
        down.copy_(down[permutation])
    ids = calibration_ids(16, 16)  # 256 tokens: more than the MLP's width, so the fit is determined
    targets = []
    handle = blocks[2].register_forward_hook(lambda m, a, o: targets.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        for batch in ids.split(4):
            dense(input_ids=batch)
    handle.remove()
    records = compensate(model, adapter_for(model), [2], ids, 4, torch.device("cpu"), damp=1e-9,
                         targets={2: targets})  # fmt: skip
    assert records[0]["fit"] == "output direction and post-norm scale"
    assert records[0]["error_before"] > 0.5 and records[0]["error_after"] < 1e-3
    torch.testing.assert_close(adapter.block_list(model)[1].mlp.down_proj.weight, down, rtol=1e-3, atol=1e-4)


def test_direction_targets_by_hand():
    """M* = rms(M) · g / rms(g), g = r / s with |s| floored at 5% of its mean."""
    from secateur.depth.compensate import direction_targets

    m = torch.tensor([[3.0, 4.0]])  # rms sqrt(12.5)
    scale = torch.tensor([2.0, 0.5])
    r = scale * torch.tensor([[1.0, 1.0]])  # g = [1, 1]: the direction (1, 1) at M's length
    torch.testing.assert_close(direction_targets(m, r, scale), torch.full((1, 2), 12.5**0.5))
    scale = torch.tensor([2.0, -0.01])  # floored to -0.05025 (5% of the mean |s|, 1.005), its sign kept
    r = torch.tensor([[2.0, 0.1005]])  # g = [1, -2]: rms sqrt(2.5)
    expected = 12.5**0.5 * torch.tensor([[1.0, -2.0]]) / 2.5**0.5
    torch.testing.assert_close(direction_targets(m, r, scale), expected)


def test_post_norm_scale_fit_by_hand():
    """s' = (sum u r + lam s) / (sum u^2 + lam), lam = damp * mean sum u^2: exact where r = u * s_true."""
    from secateur.depth.compensate import scale_fit

    u = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    r = u * torch.tensor([0.5, 2.0])
    sums = ((u * u).sum(0), (u * r).sum(0), (r * r).sum(0))  # uu = [10, 5], ur = [5, 10], rr = [2.5, 20]
    scale, before, after = scale_fit(*sums, torch.ones(2), damp=0.0)
    torch.testing.assert_close(scale, torch.tensor([0.5, 2.0]))
    assert before == pytest.approx((0.5 * 1) ** 2 + (0.5 * 3) ** 2 + (1 * 2) ** 2 + (1 * 1) ** 2)  # sum (u - r)^2
    assert after == pytest.approx(0.0, abs=1e-5)
    scale, _, _ = scale_fit(*sums, torch.ones(2), damp=0.5)  # lam = 0.5 * 7.5 = 3.75
    torch.testing.assert_close(scale, torch.tensor([8.75 / 13.75, 13.75 / 8.75]))


def silence_any(block, adapter) -> None:
    """Zero the block's attention and MLP output projections: it adds nothing to the residual stream."""
    with torch.no_grad():
        for name in (adapter.width.attention.o, adapter.width.mlp.consumer):
            block.get_submodule(name).weight.zero_()


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "qwen3"])
@pytest.mark.parametrize("method", [BlockInfluenceConfig(), secateur.AngularConfig(), FinerCutConfig(),
                                    GreedyLossConfig()], ids=lambda m: m.name)
def test_default_depth_selection_never_removes_the_final_block(family, method):
    """The final block adds nothing, so every score ranks it (or its branches) first; by default the
    search leaves it, with --remove-last it may take it."""
    from secateur.depth import select_removals

    model = deep_model(family, layers=4)
    adapter = adapter_for(model)
    silence_any(adapter.block_list(model)[3], adapter)
    ids = calibration_ids(4, 16)
    kept = select_removals(model, DepthConfig(method, Amount(count=1)), ids)
    assert 3 not in kept.blocks and all(u[0] != 3 for u in kept.sublayers) and kept.kept == [3]
    allowed = select_removals(model, DepthConfig(method, Amount(count=1), remove_last=True), ids)
    assert allowed.kept == []
    if not isinstance(method, GreedyLossConfig):  # a random block may lower the loss more than a silent one
        assert allowed.blocks == [3] or allowed.sublayers[0][0] == 3


def test_keep_full_attention_protects_the_global_blocks():
    from secateur.depth import select_removals

    model = deep_model("gemma3_text", layers=6)  # sliding, full, sliding, full, ...
    adapter = adapter_for(model)
    for index in (1, 3):
        silence_any(adapter.block_list(model)[index], adapter)
    config = DepthConfig(BlockInfluenceConfig(), Amount(count=2), keep_full_attention=True)
    selection = select_removals(model, config, calibration_ids(4, 16))
    assert set(selection.blocks) <= {0, 2, 4} and selection.kept == [1, 3, 5]
    assert select_removals(model, dataclasses.replace(config, keep_full_attention=False),
                           calibration_ids(4, 16)).blocks == [1, 3]  # fmt: skip
    with pytest.raises(ConfigError, match="does not"):
        select_removals(deep_model("llama", layers=4), config, calibration_ids(2, 8))
    with pytest.raises(ConfigError, match="cannot remove 4 of 6 blocks with blocks"):
        select_removals(model, dataclasses.replace(config, amount=Amount(count=4)), calibration_ids(2, 8))


def test_default_compensation_follows_family_and_history():
    """Left to its default, compensation is on where it can fold in (the MLP output projection, or the
    norm after it on Gemma 3), off with the reason after a sparsity stage (whose zeros a dense re-fit
    would fill); asked for there, it is refused."""
    angular = DepthConfig(secateur.AngularConfig(), Amount(count=1))
    llama, gemma = deep_model("llama", layers=4), deep_model("gemma3_text", layers=4)
    assert secateur.prune(llama, angular, calibration_ids(2, 8)).stages[0]["result"]["compensated"] is True
    result = secateur.prune(gemma, angular, calibration_ids(2, 8)).stages[0]["result"]
    assert result["compensated"] is True and result["variant"] is None
    assert all(r["fitted"] is None or r["fitted"].endswith("post_feedforward_layernorm") for r in result["compensation"])
    sparse = secateur.PruneConfig(secateur.MagnitudeConfig(), secateur.Unstructured(0.5))
    report = secateur.prune(deep_model("llama", layers=4), [sparse, angular], calibration_ids(2, 8))
    assert report.stages[1]["settings"]["compensate"] is False
    assert "earlier sparsity stage" in report.stages[1]["result"]["variant"]
    with pytest.raises(secateur.SecateurError, match="fill the zeros"):
        secateur.prune(deep_model("llama", layers=4), [sparse, dataclasses.replace(angular, compensate=True)],
                       calibration_ids(2, 8))  # fmt: skip


def test_cli_compensate_is_recorded(tmp_path, text_file, model_dir):
    out = tmp_path / "out"
    code = main(["prune", str(model_dir("llama")), "--out", str(out), "--method", "angular", "--remove-blocks", "1",
                 "--compensate", "--compensate-damp", "0.2", "--calib", str(text_file), "--calib-seq-len", "16",
                 *HOLDOUT])  # fmt: skip
    assert code == 0
    manifest = json.loads((out / "secateur.json").read_text())
    stage = manifest["recipe"]["stage"][0]
    assert stage["compensate"] is True and stage["compensate_damp"] == 0.2
    assert len(manifest["history"][-1]["result"]["compensation"]) == 1
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 1


def test_the_additivity_check_holds_in_bfloat16_and_still_catches_a_norm():
    """bfloat16's own rounding of the residual sum (2^-8 of each value) is not a norm after the MLP;
    a norm after it still is, in bfloat16 too."""
    import dataclasses

    from secateur.depth.compensate import compensate
    from secateur.depth.structure import DepthError
    from secateur.models import adapter_for

    model = tiny_model("llama", num_hidden_layers=4).to(torch.bfloat16)
    records = compensate(model, adapter_for(model), [2], calibration_ids(4, 16), 2, torch.device("cpu"))
    assert records[0]["fitted"] == "model.layers.1.mlp.down_proj"
    gemma = tiny_model("gemma3_text", num_hidden_layers=4,
                       layer_types=["sliding_attention"] * 3 + ["full_attention"]).to(torch.bfloat16)  # fmt: skip
    adapter = adapter_for(gemma)
    forgetful = dataclasses.replace(adapter, width=dataclasses.replace(
        adapter.width, mlp=dataclasses.replace(adapter.width.mlp, post_norm=None)))
    with pytest.raises(DepthError, match="not added straight to the residual stream"):
        compensate(gemma, forgetful, [2], calibration_ids(2, 8), 2, torch.device("cpu"))
