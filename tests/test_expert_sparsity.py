"""Sparsity inside the fused experts of mixture-of-experts models: each expert calibrated on the tokens
routed to it only, the zeros written into the fused 3-D weights, kept through recovery, and STUN
(experts first, then unstructured) as a recipe."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import MOE_FAMILIES, calibration_ids, reloads_the_same, tiny_model
from secateur.cli import main
from secateur.config import NM, MagnitudeConfig, PruneConfig, SparseGPTConfig, Unstructured, WandaConfig
from secateur.errors import ConfigError
from secateur.models import adapter_for
from secateur.models.linear_experts import linear_experts, rebind
from secateur.sparsity.prune import sparsify, sparsity_table
from secateur.train.masks import MaskHolder, weight_masks

SMALL = ["--calib-samples", "4", "--calib-seq-len", "32", "--eval-windows", "4", "--eval-seq-len", "32"]


def run(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def experts_of(model, block: int = 0):
    return model.model.layers[block].mlp.experts


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_exposed_experts_compute_the_stock_forward_and_leave_a_stock_model(family):
    model = tiny_model(family)
    adapter, ids = adapter_for(model), calibration_ids()
    keys = set(model.state_dict())
    with torch.no_grad():
        reference = model(ids).logits
        with linear_experts(model, adapter):
            experts = experts_of(model)
            assert experts.get_submodule("3.down_proj").weight.data_ptr() == experts.down_proj[3].data_ptr()
            assert torch.equal(model(ids).logits, reference)
        assert set(model.state_dict()) == keys and "forward" not in vars(experts_of(model))
        assert torch.equal(model(ids).logits, reference)


def test_a_block_moved_between_devices_is_bound_to_its_experts_again():
    model = tiny_model("qwen3_moe")
    adapter = adapter_for(model)
    with linear_experts(model, adapter):
        block = model.model.layers[0]
        block.to(torch.float64)  # as a move to another device, every parameter is copied on its own
        experts = experts_of(model)
        assert experts.get_submodule("2.gate_up_proj").weight.data_ptr() != experts.gate_up_proj[2].data_ptr()
        rebind(block, adapter)
        layer = experts.get_submodule("2.gate_up_proj")
        assert layer.weight.data_ptr() == experts.gate_up_proj[2].data_ptr() and layer.weight.dtype == torch.float64
        with torch.no_grad():
            layer.weight.zero_()
        assert not experts.gate_up_proj[2].any() and experts.gate_up_proj[3].any()


def routed_inputs(model, ids):
    """Block 0's experts input (tokens, hidden) and routing (tokens, top-k) on the dense model."""
    seen = {}
    handle = experts_of(model).register_forward_pre_hook(lambda m, args: seen.update(x=args[0], idx=args[1]))
    with torch.no_grad():
        model(ids)
    handle.remove()
    return seen["x"], seen["idx"]


def wanda_pruned(weight, x):
    """Wanda by hand: per output row, the half of |W_ij| * ||x_j||_2 that scores lowest."""
    scores = weight.abs() * x.square().sum(dim=0).sqrt()
    pruned = torch.zeros_like(weight, dtype=torch.bool)
    return pruned.scatter_(1, scores.argsort(dim=1)[:, : weight.shape[1] // 2], True)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_each_expert_is_calibrated_on_the_tokens_routed_to_it_only(family):
    model, ids = tiny_model(family), calibration_ids()
    x, idx = routed_inputs(model, ids)
    experts = experts_of(model)
    dense_gate_up = experts.gate_up_proj.detach().clone()
    sparsify(model, None, PruneConfig(WandaConfig(), Unstructured(0.5), block_stats="dense"), ids, batch_size=0)
    told_apart = 0
    for j in range(dense_gate_up.shape[0]):
        routed = x[(idx == j).any(dim=-1)]  # the tokens that reach expert j
        assert len(routed) > 0
        assert torch.equal(experts.gate_up_proj[j] == 0, wanda_pruned(dense_gate_up[j], routed))
        told_apart += not torch.equal(experts.gate_up_proj[j] == 0, wanda_pruned(dense_gate_up[j], x))  # all tokens
    assert told_apart > 0  # calibrating on every token would have chosen other weights


def test_down_projection_mask_by_hand():
    """The down projection's Wanda mask from the routed tokens' channels, on the dense weights."""
    model, ids = tiny_model("qwen2_moe"), calibration_ids()
    x, idx = routed_inputs(model, ids)
    experts = experts_of(model)
    dense_gate_up, dense_down = experts.gate_up_proj.detach().clone(), experts.down_proj.detach().clone()
    sparsify(model, None, PruneConfig(WandaConfig(), Unstructured(0.5), block_stats="dense"), ids, batch_size=0)
    for j in range(dense_down.shape[0]):
        routed = x[(idx == j).any(dim=-1)]
        gate, up = (routed @ dense_gate_up[j].T).chunk(2, dim=-1)
        channels = experts.act_fn(gate) * up  # (n, width)
        assert torch.equal(experts.down_proj[j] == 0, wanda_pruned(dense_down[j], channels))


def test_experts_routed_too_few_tokens_fall_back_to_magnitude_and_are_listed():
    model, ids = tiny_model("olmoe"), calibration_ids()
    dense = experts_of(model).gate_up_proj.detach().clone()
    report = sparsify(model, None, PruneConfig(WandaConfig(), Unstructured(0.5), expert_min_tokens=10**9), ids)
    fallback = {r.name for r in report.layers if r.magnitude_fallback}
    assert fallback == {r.name for r in report.layers if ".mlp.experts." in r.name} and len(fallback) == 2 * 2 * 8
    assert "model.layers.0.self_attn.q_proj" not in fallback
    assert report.to_dict()["magnitude_fallback"] == sorted(fallback, key=[r.name for r in report.layers].index)
    for j in range(dense.shape[0]):  # unit input norms: Wanda's score is |W|
        ones = torch.ones(1, dense.shape[2])
        assert torch.equal(experts_of(model).gate_up_proj[j] == 0, wanda_pruned(dense[j], ones))


def test_sparsegpt_leaves_an_under_calibrated_expert_by_magnitude_without_updates():
    model, ids = tiny_model("qwen3_moe"), calibration_ids()
    dense = experts_of(model).gate_up_proj.detach().clone()
    sparsify(model, None, PruneConfig(SparseGPTConfig(), Unstructured(0.5), expert_min_tokens=10**9), ids)
    pruned = experts_of(model).gate_up_proj
    kept = pruned != 0
    assert torch.equal(pruned[kept], dense[kept])  # H = I: OBS updates nothing
    magnitude = dense[0].abs()  # SparseGPT ranks w^2 / [H^-1]_jj^2 over a whole column block (all 64 here)
    assert torch.equal(~kept[0], magnitude <= magnitude.flatten().kthvalue(magnitude.numel() // 2).values)


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("method,target", [(WandaConfig(), Unstructured(0.5)), (SparseGPTConfig(), NM(2, 4)),
                                           (MagnitudeConfig(), Unstructured(0.6))])  # fmt: skip
def test_the_fused_experts_are_pruned_exactly_and_reload_with_stock_transformers(family, method, target, tmp_path):
    model, ids = tiny_model(family), calibration_ids()
    report = sparsify(model, None, PruneConfig(method, target), ids)
    assert abs(report.sparsity - target.fraction) < 1e-3
    experts = experts_of(model, 1)
    for weight in (experts.gate_up_proj, experts.down_proj):
        if isinstance(target, NM):  # 2 of every 4 consecutive inputs, in every row of every expert
            assert torch.equal((weight.reshape(*weight.shape[:2], -1, 4) != 0).sum(-1),
                               torch.full(weight.shape[:2] + (weight.shape[2] // 4,), 2))
        else:
            assert abs(float((weight == 0).float().mean()) - target.fraction) <= 1 / weight[0].numel()  # rounding
    names = [name for name, _, _ in sparsity_table(model)]
    assert "model.layers.1.mlp.experts.7.down_proj" in names
    assert reloads_the_same(model, tmp_path, ids)


def test_recovery_masks_hold_the_zeros_of_the_fused_experts():
    model = tiny_model("qwen2_moe")
    sparsify(model, None, PruneConfig(MagnitudeConfig(), Unstructured(0.5)))
    masks = weight_masks(model, adapter_for(model))
    assert "model.layers.0.mlp.experts.gate_up_proj" in masks and "model.layers.1.mlp.experts.down_proj" in masks
    holder = MaskHolder(model, masks)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    holder.weights()
    assert float((experts_of(model).down_proj == 0).float().mean()) == 0.5


def test_the_min_tokens_option_is_refused_on_a_dense_model():
    with pytest.raises(ConfigError, match="applies to mixtures of experts"):
        sparsify(tiny_model("llama"), None, PruneConfig(WandaConfig(), Unstructured(0.5), expert_min_tokens=4),
                 calibration_ids())


def test_cli_stun_experts_then_unstructured_inside_the_kept_experts(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    recipe = tmp_path / "stun.toml"
    recipe.write_text('[[stage]]\nmethod = "experts"\ncriterion = "reap"\nremove_fraction = 0.5\n'
                      '[[stage]]\nmethod = "wanda"\nsparsity = 0.4\n')
    code, stdout, err = run(["prune", model_dir("qwen3_moe"), "--recipe", recipe, "--calib", text_file, *SMALL,
                             "--out", out], capsys)  # fmt: skip
    assert code == 0, err
    manifest = json.loads((out / "secateur.json").read_text())
    first, second = manifest["history"]
    assert first["kind"] == "experts" and second["kind"] == "sparsity"
    assert {layer["name"].split(".mlp.experts.")[1].split(".")[0] for layer in second["result"]["layers"]
            if ".mlp.experts." in layer["name"]} == {"0", "1", "2", "3"}  # fmt: skip
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_experts == 4
    down = reloaded.model.layers[0].mlp.experts.down_proj
    assert down.shape[0] == 4 and abs(float((down == 0).float().mean()) - 0.4) < 0.01


@pytest.mark.parametrize("family,flags,message", [
    ("llama", ["--expert-min-tokens", "4"], "--expert-min-tokens applies to mixtures of experts"),
])  # fmt: skip
def test_cli_refuses_what_does_not_apply_before_writing(family, flags, message, model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run(["prune", model_dir(family), "--method", "wanda", *flags, "--calib", text_file, *SMALL,
                        "--out", out], capsys)  # fmt: skip
    assert code == 2 and not out.exists()
    assert message in err
