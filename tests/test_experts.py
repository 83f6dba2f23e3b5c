"""Mixture-of-experts models: adapters, per-expert statistics by hand, expert removal, reload, and
what the other kinds do on them."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import MOE_FAMILIES, calibration_ids, reloads_the_same, tiny_model
from secateur.cli import main
from secateur.errors import ConfigError
from secateur.experts import ExpertsConfig, prune_experts
from secateur.experts import criteria
from secateur.experts.engine import _Recorder
from secateur.experts.prune import ExpertsError, keep_experts
from secateur.experts.stats import ExpertStats
from secateur.models import adapter_for
from secateur.recipe import build_stage, prune

SMALL = ["--calib-samples", "4", "--calib-seq-len", "32", "--eval-windows", "4", "--eval-seq-len", "32"]


def run(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def count_of(model):
    return getattr(model.config, adapter_for(model).experts.count_key)


# --- statistics and scores by hand ------------------------------------------------------------------------


def hand_stats() -> ExpertStats:
    """3 experts of width 1 on a 2-d hidden state, identity activation: f_j(x) = d_j (g_j.x)(u_j.x).
    f_0(x) = [x0^2, 0]; f_1(x) = [0, 2 x1^2]; f_2(x) = (x0 + x1)^2 [1, 1]."""
    gate_up = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 2.0]], [[1.0, 1.0], [1.0, 1.0]]])
    down = torch.tensor([[[1.0], [0.0]], [[0.0], [1.0]], [[1.0], [1.0]]])
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    indices = torch.tensor([[0, 2], [1, 0], [2, 0]])  # token 0 -> experts 0, 2; token 1 -> 1, 0; token 2 -> 2, 0
    weights = torch.tensor([[0.75, 0.25], [0.6, 0.4], [0.5, 0.5]])
    logits = torch.tensor([[1.0, 0.0, 0.5], [0.0, 2.0, 0.0], [0.3, 0.0, 1.0]])
    stats = ExpertStats(3, "cpu")
    stats.update(x, logits, indices, weights, gate_up, down, lambda t: t)
    return stats


def test_expert_statistics_by_hand():
    stats = hand_stats()
    assert stats.count.tolist() == [3, 1, 2]
    assert stats.gate.tolist() == pytest.approx([0.75 + 0.4 + 0.5, 0.6, 0.25 + 0.5])
    # norms on the routed tokens only: expert 0 sees tokens 0, 1, 2 (1, 0, 1), expert 1 token 1 (2),
    # expert 2 tokens 0 and 2 (sqrt 2, 4 sqrt 2)
    assert stats.norm.tolist() == pytest.approx([2.0, 2.0, 5 * math.sqrt(2)])
    assert stats.probability.tolist() == pytest.approx(
        torch.tensor([[1.0, 0.0, 0.5], [0.0, 2.0, 0.0], [0.3, 0.0, 1.0]]).softmax(-1).sum(0).tolist())


def test_reap_is_the_mean_over_routed_tokens_of_gate_times_output_norm():
    stats = hand_stats()
    reap = criteria.CRITERIA["reap"].score(stats, 0)
    expected = [(0.75 * 1 + 0.4 * 0 + 0.5 * 1) / 3, 0.6 * 2 / 1, (0.25 * math.sqrt(2) + 0.5 * 4 * math.sqrt(2)) / 2]
    assert reap.tolist() == pytest.approx(expected)
    # REAP drops expert 0 (0.417); frequency drops expert 1 (1 token); summing instead of averaging
    # (1.25, 1.2, 3.18) would drop expert 1 as well
    assert criteria.lowest(reap, 1) == [0]
    assert criteria.lowest(criteria.CRITERIA["frequency"].score(stats, 0), 1) == [1]


def test_the_search_is_exhaustive_when_it_can_be_and_greedy_otherwise(monkeypatch):
    # keep 2 of 4: the best pair is {0, 1}, but greedy first drops 0 (the cheapest single removal)
    errors = {(0, 1): 0.0, (0, 2): 5.0, (0, 3): 5.0, (1, 2): 3.0, (1, 3): 4.0, (2, 3): 6.0,
              (1, 2, 3): 1.0, (0, 2, 3): 2.0, (0, 1, 3): 2.0, (0, 1, 2): 2.0}  # fmt: skip
    error = lambda kept: errors[tuple(sorted(kept))]  # noqa: E731
    assert criteria.search_removal(4, 2, error) == [2, 3]
    monkeypatch.setattr(criteria, "EXHAUSTIVE", 0)
    assert criteria.search_removal(4, 2, error) == [0, 3]


def crafted_router(block, rows: dict[int, int], scale: float = 10.0) -> None:
    """Router logit of expert j = scale x hidden[rows[j]] (every other weight zero)."""
    router = block.get_submodule("mlp.gate")
    router.weight.data.zero_()
    for expert, dim in rows.items():
        router.weight.data[expert, dim] = scale


def test_the_router_decides_which_tokens_each_expert_is_measured_on():
    model = tiny_model("mixtral")
    block = model.model.layers[0]
    crafted_router(block, {j: j for j in range(8)})
    pairs = [(0, 1), (0, 2), (3, 0), (1, 0)]  # each token: its first expert at logit 10, its second at 5
    x = torch.zeros(len(pairs), 64)
    for t, (a, b) in enumerate(pairs):
        x[t, a], x[t, b] = 1.0, 0.5
    stats = ExpertStats(8, "cpu")
    recorder = _Recorder(block, adapter_for(model), stats, 0)
    with torch.no_grad():
        plain = block.mlp(x[None])
        with recorder.attached():
            measured = block.mlp(x[None])  # each expert runs once, for the statistics and the output
    torch.testing.assert_close(measured, plain)
    assert stats.count.tolist() == [4, 2, 1, 1, 0, 0, 0, 0]
    high = 1 / (1 + math.exp(-5))  # the renormalised top-2 weight of logit 10 against 5
    assert stats.gate.tolist() == pytest.approx([2.0, 1.0, 1 - high, high, 0, 0, 0, 0])
    experts = block.mlp.experts
    with torch.no_grad():
        out = [experts.act_fn(x @ experts.gate_up_proj[j][:32].T) * (x @ experts.gate_up_proj[j][32:].T)
               for j in range(8)]  # fmt: skip
        norms = [(o @ experts.down_proj[j].T).norm(dim=-1) for j, o in enumerate(out)]
    expected_reap_1 = high * norms[1][3] + (1 - high) * norms[1][0]  # expert 1: first of token 3, second of token 0
    assert float(stats.reap[1]) == pytest.approx(float(expected_reap_1), rel=1e-5)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_a_pruned_block_reruns_only_its_moe_branch_and_gets_the_whole_block_outputs(family):
    from secateur.calibrate.stream import stream_blocks
    from secateur.experts.engine import _outputs, _prune_block

    model = tiny_model(family)
    adapter = adapter_for(model)
    with torch.no_grad():
        index, block, inputs = next(stream_blocks(model, adapter, calibration_ids(), 2, torch.device("cpu"), "t"))
        done, outputs = _prune_block(block, adapter, ExpertsConfig(count=4, criterion="frequency"), inputs, index, 8,
                                     4)  # fmt: skip
        whole = _outputs(block, adapter, None, inputs, index, recomputable=False)  # the whole pruned block
    assert len(done["removed"]) == 4 and len(outputs) == len(whole) == len(inputs.hidden) > 1
    assert all(torch.equal(a, b) for a, b in zip(outputs, whole))


# --- removal -----------------------------------------------------------------------------------------------


def test_removing_experts_no_token_reaches_keeps_the_logits_bit_identical():
    model = tiny_model("mixtral", num_experts_per_tok=1)
    u = torch.randn(64)
    for block in model.model.layers:  # expert 0 wins when u.x > 0, expert 1 otherwise; 2..7 never
        weight = block.mlp.gate.weight.data
        weight[0], weight[1] = u, -u
        weight[2:] = 0.5 * u
    ids = calibration_ids()
    with torch.no_grad():
        before = model(ids).logits
    report = prune_experts(model, ExpertsConfig(criterion="frequency", count=6), ids)
    assert [b["removed"] for b in report.blocks] == [[2, 3, 4, 5, 6, 7]] * 2
    assert [b["tokens_routed"][2:] for b in report.blocks] == [[0.0] * 6] * 2
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    assert count_of(model) == 2


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("criterion", ["reap", "frequency", "naee", "random", "stun"])
def test_every_criterion_prunes_every_family_and_stock_from_pretrained_reloads_it(family, criterion, tmp_path):
    model = tiny_model(family)
    ids = calibration_ids()
    report = prune(model, build_stage({"method": "experts", "criterion": criterion, "remove_fraction": 0.25}), ids,
                   progress=False)  # fmt: skip
    result = report.stages[0]["result"]
    assert result["experts_before"] == 8 and result["experts_after"] == 6 and result["top_k"] == 2
    assert all(len(b["removed"]) == 2 for b in result["blocks"]) and len(result["blocks"]) == 2
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.shape[0] == experts.down_proj.shape[0] == experts.num_experts == 6
    assert model.model.layers[0].mlp.gate.weight.shape[0] == 6 and count_of(model) == 6
    assert reloads_the_same(model, tmp_path, ids)


def test_kept_rows_are_the_original_experts():
    model = tiny_model("qwen3_moe")
    block = model.model.layers[1]
    gate_up, down, router = (block.mlp.experts.gate_up_proj.clone(), block.mlp.experts.down_proj.clone(),
                             block.mlp.gate.weight.clone())  # fmt: skip
    keep_experts(block, adapter_for(model), [6, 1, 3])
    assert torch.equal(block.mlp.experts.gate_up_proj, gate_up[[1, 3, 6]])
    assert torch.equal(block.mlp.experts.down_proj, down[[1, 3, 6]])
    assert torch.equal(block.mlp.gate.weight, router[[1, 3, 6]])
    with pytest.raises(ExpertsError, match="cannot keep only 1"):
        keep_experts(block, adapter_for(model), [0])


def test_top_k_is_never_more_than_what_is_kept():
    with pytest.raises(ConfigError, match="leaves 1, fewer than the 2 every token is routed to: remove at most 6"):
        prune_experts(tiny_model("olmoe"), ExpertsConfig(count=7), calibration_ids())
    with pytest.raises(ConfigError, match="exactly one of --remove-fraction"):
        ExpertsConfig(criterion="reap")
    with pytest.raises(ConfigError, match="--draw-seed applies only with --criterion random"):
        ExpertsConfig(fraction=0.5, draw_seed=3)


def test_experts_that_see_few_tokens_are_reported():
    model = tiny_model("qwen3_moe")
    report = prune(model, build_stage({"method": "experts", "remove_fraction": 0.5, "min_tokens": 1000}),
                   calibration_ids(2, 16), progress=False)  # fmt: skip
    [record] = report.stages
    assert all(len(b["few_tokens"]) == 8 for b in record["result"]["blocks"])  # 32 tokens x 2 slots < 1000 each
    from secateur.experts.stage import _summary

    assert "16 experts (in 2 blocks) were routed fewer than the --min-tokens" in _summary(record)


def test_a_dense_model_has_no_experts_to_remove():
    with pytest.raises(ExpertsError, match="llama is not a mixture of experts"):
        prune_experts(tiny_model("llama"), ExpertsConfig(fraction=0.5), calibration_ids())


# --- the other kinds on mixtures of experts ------------------------------------------------------------------


def test_depth_rewrites_which_blocks_are_dense(tmp_path):
    model = tiny_model("qwen3_moe", num_hidden_layers=3, mlp_only_layers=[2])
    assert [hasattr(b.mlp, "experts") for b in model.model.layers] == [True, True, False]
    prune(model, build_stage({"method": "angular", "remove_blocks": 1, "remove_last": False, "compensate": False}),
          calibration_ids(), progress=False)  # fmt: skip
    assert model.config.mlp_only_layers == [1] and model.config.num_hidden_layers == 2
    assert reloads_the_same(model, tmp_path, calibration_ids())


@pytest.mark.parametrize("method,args", [
    ("width", ["--remove-fraction", "0.2"]),
])  # fmt: skip
def test_kinds_that_would_miss_the_experts_refuse_in_one_line(method, args, model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run(["prune", model_dir("qwen3_moe"), "--method", method, *args, "--calib", text_file, *SMALL,
                        "--out", out], capsys)  # fmt: skip
    assert code == 2 and not out.exists()
    [line] = [ln for ln in err.splitlines() if ln.startswith("secateur: error")]
    assert "fused 3-D expert weights of qwen3_moe" in line and "--method experts" in line


def test_cli_experts_then_depth_with_a_manifest_and_report_section(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[[stage]]\nmethod = "experts"\ncriterion = "reap"\nremove_fraction = 0.5\n'
                      '[[stage]]\nmethod = "block-influence"\nremove_blocks = 1\nremove_last = true\n')
    code, stdout, err = run(["prune", model_dir("qwen2_moe"), "--recipe", recipe, "--calib", text_file, *SMALL,
                             "--out", out], capsys)  # fmt: skip
    assert code == 0, err
    assert "experts (reap): 8 -> 4 routed experts in each of 2 MoE blocks (top-2 routing kept)" in stdout
    manifest = json.loads((out / "secateur.json").read_text())
    first, second = manifest["history"]
    assert first["kind"] == "experts" and len(first["result"]["blocks"]) == 2
    assert second["kind"] == "depth" and second["result"]["blocks_after"] == 1
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_experts == 4 and reloaded.config.num_hidden_layers == 1
    from secateur.recipe import KINDS

    section = KINDS["experts"].report(first)
    assert section.title == "Experts (reap)" and len(section.rows) == 2


# --- the MoEfied proxy ----------------------------------------------------------------------------------------


def test_moefication_with_every_expert_routed_is_the_dense_model(tmp_path):
    from secateur.experts.moefy import balanced_kmeans, moefy

    dense = tiny_model("llama")
    ids = calibration_ids()
    moe = moefy(dense, ids, experts=8, top_k=8, temperature=0.0)
    assert moe.config.model_type == "mixtral" and moe.config.intermediate_size == 16
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)
    labels = balanced_kmeans(torch.randn(40, 5), 4)
    assert torch.bincount(labels).tolist() == [10] * 4
    # two clear clusters of rows are found as they are
    rows = torch.cat([torch.tensor([[1.0, 0.0]]).repeat(3, 1), torch.tensor([[0.0, 1.0]]).repeat(3, 1)])
    labels = balanced_kmeans(rows + 0.01 * torch.randn(6, 2), 2)
    assert len(set(labels[:3].tolist())) == 1 and len(set(labels[3:].tolist())) == 1 and labels[0] != labels[3]
    shared = moefy(dense, ids, experts=8, top_k=8, temperature=0.0, shared=64)  # 64 shared + 8 x 8 routed
    assert shared.config.model_type == "qwen2_moe" and shared.config.moe_intermediate_size == 8
    with torch.no_grad():
        torch.testing.assert_close(shared(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)
    routed = moefy(dense, ids, experts=8, top_k=2, shared=32)
    routed.save_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path)(ids).logits, routed(ids).logits)


# --- expert width and merging ----------------------------------------------------------------------------------


def test_expert_width_channel_scores_by_hand():
    gate_up = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]]])  # 1 expert, width 2: gate rows, up rows
    down = torch.tensor([[[1.0, 0.0], [0.0, 3.0]]])
    x = torch.tensor([[2.0, 1.0], [1.0, -1.0]])
    stats = ExpertStats(1, "cpu", width=2)
    stats.update(x, torch.zeros(2, 1), torch.tensor([[0], [0]]), torch.tensor([[0.5], [1.0]]), gate_up, down,
                 lambda t: t)  # fmt: skip
    # a = (gate x) * (up x): token 0: [2*2, 1*3] = [4, 3]; token 1: [1*1, -1*0] = [1, 0]
    assert stats.channels[0].tolist() == pytest.approx([0.5 * 4 + 1.0 * 1, 0.5 * 3 + 1.0 * 0])


@pytest.mark.parametrize("family", [f for f in MOE_FAMILIES if f != "deepseek_v3"])  # tied shared width: refused
def test_expert_width_keeps_the_best_channels_of_every_expert_and_reloads(family, tmp_path):
    model = tiny_model(family)
    before = model.model.layers[0].mlp.experts.gate_up_proj.clone()
    ids = calibration_ids()
    report = prune(model, build_stage({"method": "expert-width", "remove_fraction": 0.5}), ids, progress=False)
    result = report.stages[0]["result"]
    assert (result["width_before"], result["width_after"]) == (32, 16)
    assert getattr(model.config, adapter_for(model).experts.width_key) == 16
    experts = model.model.layers[0].mlp.experts
    assert experts.gate_up_proj.shape == (8, 32, 64) and experts.down_proj.shape == (8, 64, 16)
    rows = {tuple(r.tolist()) for r in before[0]}  # every kept gate and up row is one of the expert's own
    assert all(tuple(r.tolist()) in rows for r in experts.gate_up_proj[0])
    assert reloads_the_same(model, tmp_path, ids)


def test_the_shared_expert_s_channel_scores_are_its_gate_times_activation_by_hand():
    model = tiny_model("qwen2_moe")
    block = model.model.layers[0]
    x = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(3))
    recorder = _Recorder(block, adapter_for(model), ExpertStats(8, "cpu", width=32), 0, shared=True)
    with torch.no_grad():
        with recorder.attached():
            block.mlp(x)
        shared, flat = block.mlp.shared_expert, x[0]
        activation = shared.act_fn(shared.gate_proj(flat)) * shared.up_proj(flat)  # (5, 64)
        gate = torch.sigmoid(block.mlp.shared_expert_gate(flat))  # (5, 1): what the block scales it by
    expected = (gate * activation.abs()).sum(dim=0)
    torch.testing.assert_close(recorder.shared_channels.float(), expected, rtol=1e-5, atol=1e-6)


def test_expert_width_slims_the_shared_expert_too_and_reloads(tmp_path):
    model = tiny_model("qwen2_moe")
    shared = model.model.layers[1].mlp.shared_expert
    down = shared.down_proj.weight.detach().clone()
    ids = calibration_ids()
    report = prune(model, build_stage({"method": "expert-width", "remove_fraction": 0.5, "shared_expert": True}), ids,
                   progress=False)  # fmt: skip
    result = report.stages[0]["result"]
    assert (result["shared_width_before"], result["shared_width_after"]) == (64, 32)
    assert model.config.shared_expert_intermediate_size == 32 and model.config.moe_intermediate_size == 16
    assert shared.gate_proj.weight.shape == (32, 64) and shared.down_proj.weight.shape == (64, 32)
    columns = {tuple(c.tolist()) for c in down.T}  # every kept down column is one of the shared expert's own
    assert all(tuple(c.tolist()) in columns for c in shared.down_proj.weight.T)
    assert reloads_the_same(model, tmp_path, ids)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_a_family_without_a_shared_expert_refuses_to_slim_one(family):
    with pytest.raises(ExpertsError, match=f"--shared-expert: {family} has no shared expert"):
        prune_experts(tiny_model(family), ExpertsConfig(fraction=0.5, width=True, shared_expert=True), calibration_ids())
    with pytest.raises(ConfigError, match="--shared-expert applies only with --method expert-width"):
        ExpertsConfig(fraction=0.5, shared_expert=True)


def test_each_method_takes_its_own_keys():
    with pytest.raises(ConfigError, match="--round-to belongs to width and experts \\(expert-width\\), not to experts,"):
        build_stage({"method": "experts", "remove_fraction": 0.5, "round_to": 4})
    with pytest.raises(ConfigError, match="--criterion belongs to experts \\(experts\\)"):
        build_stage({"method": "expert-width", "remove_fraction": 0.5, "criterion": "frequency"})
    with pytest.raises(ConfigError, match="--criterion applies only with --method experts without --merge"):
        build_stage({"method": "experts", "remove_fraction": 0.5, "merge": True, "criterion": "frequency"})


def test_clustering_by_hand():
    similarity = torch.tensor([[1.0, 0.9, 0.1, 0.2], [0.9, 1.0, 0.3, 0.0], [0.1, 0.3, 1.0, 0.8], [0.2, 0.0, 0.8, 1.0]])
    assert criteria.cluster(similarity, 2) == [[0, 1], [2, 3]]
    assert criteria.cluster(similarity, 3) == [[0, 1], [2], [3]]


def test_single_linkage_follows_a_chain_where_average_linkage_does_not():
    points = torch.tensor([[0.0], [1.0], [2.1], [3.3]])
    distance = torch.cdist(points, points)
    assert criteria.single_linkage(distance, 2) == [[0, 1, 2], [3]]  # 0-1 (1.0), then 1-2 (1.1)
    assert criteria.cluster(-distance, 2) == [[0, 1], [2, 3]]  # average: {0, 1} to 2 is 1.6, 2 to 3 is 1.2


def test_stun_keeps_the_member_closest_to_its_cluster_mean_by_hand():
    weights = torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 0.0], [9.0, 9.0]])
    assert criteria.closest_to_mean([[0, 1, 2], [3]], weights) == [1, 3]  # mean (2, 0): expert 1 is 1 away
    assert criteria.closest_to_mean([[0, 1]], weights) == [0]  # equidistant: the lower index
    router = torch.tensor([[0.0, 0.0], [0.1, 0.0], [3.0, 3.0], [3.0, 3.2], [-4.0, 1.0]])  # {0, 1}, {2, 3}, {4}
    flat = torch.tensor([[1.0], [0.0], [2.0], [2.0], [7.0]])
    assert criteria.stun_removal(router, flat, 2) == [1, 3]
    assert not criteria.CRITERIA["stun"].calibrated and criteria.CRITERIA["reap"].calibrated


def test_stun_needs_no_calibration():
    model = tiny_model("mixtral")
    report = prune_experts(model, ExpertsConfig(count=2, criterion="stun"), None)
    assert report.criterion == "stun" and all(len(b["removed"]) == 2 for b in report.blocks)


def test_merging_identical_experts_is_exact_and_weights_by_routed_tokens():
    from secateur.experts.prune import merge_experts

    model = tiny_model("mixtral")
    block = model.model.layers[0]
    experts = block.mlp.experts
    experts.gate_up_proj.data[1] = experts.gate_up_proj.data[0]
    experts.down_proj.data[1] = experts.down_proj.data[0]
    gate_up, down, router = experts.gate_up_proj.clone(), experts.down_proj.clone(), block.mlp.gate.weight.clone()
    weights = torch.tensor([3.0, 5.0, 1.0, 3.0, 1.0, 1.0, 1.0, 1.0])
    merge_experts(block, adapter_for(model), [[0, 1], [2, 3], [4], [5], [6], [7]], weights)
    assert torch.equal(experts.gate_up_proj[0], gate_up[0]) and torch.equal(experts.down_proj[0], down[0])
    torch.testing.assert_close(experts.gate_up_proj[1], 0.25 * gate_up[2] + 0.75 * gate_up[3])
    assert torch.equal(block.mlp.gate.weight[:2], router[[1, 3]])  # the heavier member's row (5 > 3; 3 > 1)
    assert experts.num_experts == block.mlp.gate.weight.shape[0] == 6


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_merging_reloads_with_stock_from_pretrained(family, tmp_path):
    model = tiny_model(family)
    ids = calibration_ids()
    report = prune(model, build_stage({"method": "experts", "merge": True, "remove_fraction": 0.5}), ids,
                   progress=False)  # fmt: skip
    blocks = report.stages[0]["result"]["blocks"]
    assert all(sorted(j for c in b["clusters"] for j in c) == list(range(8)) and len(b["clusters"]) == 4
               for b in blocks)  # fmt: skip
    assert reloads_the_same(model, tmp_path, ids)


def test_info_says_what_the_mixture_holds(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run(["prune", model_dir("mixtral"), "--method", "expert-width", "--remove-fraction", "0.5",
                        "--calib", text_file, *SMALL, "--out", out], capsys)  # fmt: skip
    assert code == 0, err
    code, stdout, _ = run(["info", out], capsys)
    assert "mixture of experts: 8 routed experts of 16 channels in 2 of 2 blocks, top-2 routing" in stdout


def test_recovery_adds_the_family_load_balancing_loss(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from secateur.train import TrainConfig, train
    from secateur.train.objective import router_weight, step_loss

    config = TrainConfig(tokens=64, train_seq_len=16, micro_batch=2, kd_weight=0.0)
    ids = calibration_ids(2, 16)
    out = SimpleNamespace(logits=torch.randn(2, 16, 128), aux_loss=torch.tensor(2.0))
    plain, *_ = step_loss(out, ids, torch.arange(2), config, None, None)
    with_aux, *_ = step_loss(out, ids, torch.arange(2), config, None, None, aux_weight=0.01)
    assert float(with_aux - plain) == pytest.approx(0.02)
    model = tiny_model("qwen2_moe")  # router_aux_loss_coef 0.01
    dense = tiny_model("llama")
    assert router_weight(model, adapter_for(model)) == 0.01 and router_weight(dense, adapter_for(dense)) == 0
    with torch.no_grad():
        assert model(input_ids=ids, output_router_logits=True).aux_loss > 0
    from secateur.train import loop

    seen = []

    def spy(out, *args, **kwargs):
        seen.append((args[5], getattr(out, "aux_loss", None) is not None))  # args: ids, rows, config, teacher, cache, aux
        return step_loss(out, *args, **kwargs)

    monkeypatch.setattr(loop, "step_loss", spy)
    train(model, config, calibration_ids(8, 16), calibration_ids(2, 16, seed=1), device="cpu", progress=False)
    assert seen and all(seen_ == (0.01, True) for seen_ in seen)


# --- DeepSeek-V3: group-limited routing, leading dense blocks -------------------------------------------


def grouped_deepseek(**overrides):
    """4 groups of 4 experts, a token's 2 experts from the best 2 groups, one leading dense block."""
    return tiny_model("deepseek_v3", n_routed_experts=16, n_group=4, topk_group=2, first_k_dense_replace=1,
                      num_hidden_layers=3, **overrides)  # fmt: skip


def test_per_group_removal_takes_the_same_number_from_every_group_by_hand():
    from secateur.experts.engine import per_group

    scores = torch.tensor([5.0, 1.0, 3.0, 2.0, 0.5, 9.0, 8.0, 0.1])  # two groups of four
    choose = lambda members, k: [members[j] for j in criteria.lowest(scores[members], k)]  # noqa: E731
    assert per_group(8, 2, 4, choose) == [1, 3, 4, 7]  # globally lowest four would be 7, 4, 1, 3 too
    assert per_group(8, 2, 2, choose) == [1, 7]  # globally: 7 and 4, both from the second group
    assert per_group(8, 1, 2, choose) == [4, 7]


def test_grouped_routing_loses_experts_evenly_and_reloads_with_stock_transformers(tmp_path):
    model, ids = grouped_deepseek(), calibration_ids()
    report = prune_experts(model, ExpertsConfig(count=8, criterion="frequency"), ids)
    assert [b["block"] for b in report.blocks] == [1, 2]
    for block in report.blocks:
        assert [sum(1 for j in block["removed"] if j // 4 == g) for g in range(4)] == [2, 2, 2, 2]
    router = model.model.layers[1].mlp.gate
    assert router.weight.shape[0] == router.e_score_correction_bias.shape[0] == router.num_experts == 8
    assert model.config.n_routed_experts == 8 and model.config.num_local_experts == 8
    assert reloads_the_same(model, tmp_path, ids)


@pytest.mark.parametrize("config,match", [
    (ExpertsConfig(count=2), "remove a multiple of 4"),
    (ExpertsConfig(count=12), "at least 2"),
    (ExpertsConfig(count=4, criterion="naee"), "not built for group-limited routing"),
    (ExpertsConfig(count=4, merge=True), "not built for group-limited routing"),
    (ExpertsConfig(fraction=0.5, width=True), "shared expert's width"),
])  # fmt: skip
def test_what_deepseek_routing_cannot_hold_is_refused_before_any_pass(config, match):
    with pytest.raises(ExpertsError, match=match):
        prune_experts(grouped_deepseek(), config, calibration_ids())


def test_depth_rewrites_deepseek_leading_dense_blocks(tmp_path):
    from secateur.depth.structure import remove_blocks

    model = grouped_deepseek()
    remove_blocks(model, adapter_for(model), [0])  # the dense block goes: no block is dense now
    assert model.config.first_k_dense_replace == 0 and model.config.num_hidden_layers == 2
    assert reloads_the_same(model, tmp_path, calibration_ids())
