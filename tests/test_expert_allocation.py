"""Global expert allocation: one ranking of every MoE block's experts, per-block expert counts, and
everything downstream of them (reload through secateur.load and trust_remote_code, sparsity inside,
recovery's load-balancing loss, export refusal)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import MOE_FAMILIES, calibration_ids, tiny_model
from secateur import io
from secateur.cli import main
from secateur.errors import ConfigError
from secateur.experts import ExpertsConfig, prune_experts
from secateur.experts.allocation import global_counts, shares
from secateur.experts.prune import ExpertsError
from secateur.models import adapter_for
from secateur.recipe import build_stage, prune

SMALL = ["--calib-samples", "4", "--calib-seq-len", "32", "--eval-windows", "4", "--eval-seq-len", "32"]


def counts_of(model) -> list[int]:
    return [block.mlp.gate.weight.shape[0] for block in model.model.layers]


# --- the ranking by hand ------------------------------------------------------------------------------


def test_blocks_are_ranked_by_each_experts_share_of_its_block_not_by_raw_scores():
    # raw scores would take block 0's experts (1 < 10); as shares, block 1's 0.1s are the lowest
    block_0, block_1 = torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.tensor([10.0, 10.0, 10.0, 70.0])
    assert shares(block_1).tolist() == pytest.approx([0.1, 0.1, 0.1, 0.7])
    assert global_counts([block_0, block_1], 2, [2, 2]) == [0, 2]
    # block 1 stops at its floor (keeps 2); the next lowest share is block 0's 0.25
    assert global_counts([block_0, block_1], 3, [2, 2]) == [1, 2]
    assert global_counts([block_0, block_1], 3, [2, 3]) == [2, 1]
    with pytest.raises(ValueError, match="cannot go"):
        global_counts([block_0, block_1], 5, [2, 2])


def test_a_block_without_evidence_has_equal_shares():
    assert shares(torch.zeros(4)).tolist() == [0.25] * 4


def test_the_block_floor_is_the_top_k_and_the_largest_removal_share():
    config = ExpertsConfig(fraction=0.5, allocation="global")  # at most 0.5 + 0.5 / 2 = 75% of a block goes
    assert config.block_floor(8, 1) == 2 and config.block_floor(8, 4) == 4 and config.block_floor(64, 8) == 16
    assert ExpertsConfig(fraction=0.5, allocation="global", max_block_fraction=0.25).block_floor(8, 1) == 6
    assert ExpertsConfig(count=2, allocation="global").total_removed([8, 8, 6], 2) == 6
    assert ExpertsConfig(fraction=0.25, allocation="global").total_removed([8, 8, 6], 2) == 6  # round(5.5)


@pytest.mark.parametrize("settings,match", [
    ({"criterion": "naee"}, "ranks experts by a score: use --criterion reap, frequency or random"),
    ({"criterion": "stun"}, "ranks experts by a score"),
    ({"merge": True}, "--allocation applies only with --method experts without --merge"),
    ({"allocation": "uniform", "max_block_fraction": 0.5}, "--max-block-fraction applies only with --allocation global"),
    ({"max_block_fraction": 1.0}, r"--max-block-fraction must be in \(0, 1\)"),
])  # fmt: skip
def test_what_global_allocation_cannot_do_is_refused(settings, match):
    with pytest.raises(ConfigError, match=match):
        ExpertsConfig(**{"fraction": 0.5, "allocation": "global", **settings})


# --- the engine -------------------------------------------------------------------------------------


def test_a_block_that_routes_to_two_experts_gives_up_the_others_and_the_rest_comes_from_the_lowest_shares():
    """Top-1 routing; block 0's router can only pick expert 0 or 1 (logits +-10 h_d, 0 for the rest),
    so its other six experts have a zero share and go first (up to the 75% cap: 6 of 8); the other two
    of the 8 removed are block 1's two least-routed experts."""
    model = tiny_model("mixtral", num_experts_per_tok=1)
    router = model.model.layers[0].mlp.gate.weight.data
    router.zero_()
    router[0, 5], router[1, 5] = 10.0, -10.0
    ids = calibration_ids()
    report = prune_experts(model, ExpertsConfig(criterion="frequency", fraction=0.5, allocation="global"), ids)
    first, second = report.blocks
    assert first["removed"] == [2, 3, 4, 5, 6, 7] and first["tokens_routed"][2:] == [0.0] * 6
    routed = second["tokens_routed"]  # block 1's inputs are as in the scoring pass: nothing routed changed before it
    assert second["removed"] == sorted(sorted(range(8), key=lambda j: (routed[j], j))[:2])
    assert counts_of(model) == [2, 6] and report.experts_after is None and report.allocation == "global"
    assert [(b["experts_before"], b["experts_after"]) for b in report.blocks] == [(8, 2), (8, 6)]
    assert model.config.num_local_experts == 6  # the largest count; the module declares the others


def test_random_global_allocation_needs_no_calibration_and_follows_its_draws():
    model = tiny_model("olmoe")
    report = prune_experts(model, ExpertsConfig(criterion="random", fraction=0.5, allocation="global"), None)
    assert sum(b["experts_after"] for b in report.blocks) == 8 and all(b["experts_after"] >= 2 for b in report.blocks)


def test_uniform_allocation_refuses_blocks_of_different_counts_and_says_what_works():
    model = tiny_model("qwen3_moe")
    prune_experts(model, ExpertsConfig(criterion="random", fraction=0.5, allocation="global"), None)
    assert len(set(counts_of(model))) == 2
    with pytest.raises(ExpertsError, match="--allocation global ranks experts across blocks of any count"):
        prune_experts(model, ExpertsConfig(fraction=0.25), calibration_ids())
    before = sum(counts_of(model))
    prune_experts(model, ExpertsConfig(criterion="frequency", count=1, allocation="global"), calibration_ids())
    assert sum(counts_of(model)) == before - 2


def test_group_limited_routing_refuses_global_allocation():
    model = tiny_model("deepseek_v3", n_routed_experts=16, n_group=4, topk_group=2, first_k_dense_replace=1,
                       num_hidden_layers=3)  # fmt: skip
    with pytest.raises(ExpertsError, match="within 4 groups, which must stay of equal size"):
        prune_experts(model, ExpertsConfig(fraction=0.5, allocation="global"), calibration_ids())


# --- per-block counts downstream ------------------------------------------------------------------


def uneven_model_dir(family: str, path):
    """A tiny `family` model whose first block's experts 2..7 output nothing (REAP score 0), saved."""
    from conftest import tiny_tokenizer

    model = tiny_model(family)
    model.model.layers[0].mlp.experts.down_proj.data[2:] = 0
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_per_block_counts_reload_through_secateur_load_and_trust_remote_code_not_stock_code(family, text_file,
                                                                                             tmp_path, capsys):  # fmt: skip
    out = tmp_path / "out"
    code = main(["prune", str(uneven_model_dir(family, tmp_path / "in")), "--method", "experts", "--criterion", "reap",
                 "--remove-fraction", "0.5", "--allocation", "global", "--calib", str(text_file), *SMALL,
                 "--out", str(out)])  # fmt: skip
    stdout = capsys.readouterr().out
    assert code == 0
    manifest = json.loads((out / "secateur.json").read_text())
    counts = manifest["structure"]["experts_per_block"]
    # block 0's six silent experts go first (up to 75% of a block), then block 1's two of lowest share
    assert counts == [2, 6]
    assert "expert counts differ per block: load with secateur.load(path)" in stdout
    assert "routed experts over the MoE blocks" in stdout
    ids = calibration_ids(2, 16)
    ours, _ = io.load(out)
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert counts_of(ours) == counts_of(remote) == counts
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, remote(ids).logits)
    with pytest.raises(Exception, match="size mismatch|mismatch|shape"):
        AutoModelForCausalLM.from_pretrained(out)  # one count in a stock config: stock code cannot build it
    code = main(["info", str(out)])
    assert code == 0 and f"routed experts per block (load with secateur.load): {counts}" in capsys.readouterr().out


def test_the_output_is_what_was_pruned_bit_for_bit(tmp_path):
    from conftest import tiny_tokenizer

    model = tiny_model("qwen2_moe")
    prune(model, build_stage({"method": "experts", "criterion": "frequency", "remove_fraction": 0.5,
                              "allocation": "global"}), calibration_ids(), progress=False)  # fmt: skip
    structure = {k: v for s in io.structures() for k, v in s.record(model).items()}
    io.save(model, tiny_tokenizer(), tmp_path / "out", {"history": [], "structure": structure})
    ids = calibration_ids(2, 16)
    reloaded, _ = io.load(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_sparsity_inside_per_block_experts_then_depth_reloads(model_dir, text_file, tmp_path):
    out = tmp_path / "out"
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[[stage]]\nmethod = "experts"\ncriterion = "frequency"\nremove_fraction = 0.5\n'
                      'allocation = "global"\n[[stage]]\nmethod = "wanda"\nsparsity = 0.5\n')
    assert main(["prune", str(model_dir("olmoe")), "--recipe", str(recipe), "--calib", str(text_file), *SMALL,
                 "--out", str(out)]) == 0  # fmt: skip
    model, _ = io.load(out)
    experts = [block.mlp.experts for block in model.model.layers]
    assert len({e.gate_up_proj.shape[0] for e in experts}) == 2
    zeros = sum(int((e.gate_up_proj == 0).sum() + (e.down_proj == 0).sum()) for e in experts)
    assert zeros == pytest.approx(0.5 * sum(e.gate_up_proj.numel() + e.down_proj.numel() for e in experts), rel=0.01)


def test_gguf_export_refuses_per_block_counts_in_one_line(text_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["prune", str(uneven_model_dir("qwen3_moe", tmp_path / "in")), "--method", "experts",
                 "--remove-fraction", "0.5", "--allocation", "global", "--calib", str(text_file), *SMALL,
                 "--out", str(out)]) == 0  # fmt: skip
    capsys.readouterr()
    gguf = tmp_path / "model.gguf"
    assert main(["export", str(out), "--gguf", str(gguf)]) == 2 and not gguf.exists()
    err = capsys.readouterr().err
    [line] = [ln for ln in err.splitlines() if ln.startswith("secateur: error")]
    assert "hold different expert counts (2, 6: global allocation)" in line and "--allocation uniform" in line


# --- recovery: the load-balancing loss per router ---------------------------------------------------------


def test_load_balance_by_hand_and_as_the_family_computes_it_for_one_router():
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    from secateur.train.loss import load_balance

    # two tokens, two experts, top-1: probabilities (0.8, 0.2) and (0.4, 0.6) -> shares f = (0.5, 0.5),
    # mean probabilities P = (0.6, 0.4): 2 x (0.5 x 0.6 + 0.5 x 0.4) = 1.0
    logits = torch.log(torch.tensor([[0.8, 0.2], [0.4, 0.6]]))
    assert float(load_balance([logits], 1)) == pytest.approx(1.0)
    # both tokens on expert 0: f = (1, 0), P = (0.7, 0.3): 2 x 0.7 = 1.4
    logits = torch.log(torch.tensor([[0.8, 0.2], [0.6, 0.4]]))
    assert float(load_balance([logits], 1)) == pytest.approx(1.4)
    layer = torch.randn(64, 8)
    assert float(load_balance([layer], 2)) == pytest.approx(float(load_balancing_loss_func((layer,), 8, 2)), rel=1e-6)
    # routers of different widths: the mean of their own losses
    other = torch.randn(64, 5)
    expected = (load_balance([layer], 2) + load_balance([other], 2)) / 2
    assert float(load_balance([layer, other], 2)) == pytest.approx(float(expected))


def test_recovery_of_per_block_counts_adds_the_loss_of_every_router(monkeypatch):
    from secateur.train import TrainConfig, loop, train

    model = tiny_model("qwen2_moe")  # router_aux_loss_coef 0.01
    prune_experts(model, ExpertsConfig(criterion="random", fraction=0.5, allocation="global"), None)
    seen = []

    def spy(out, *args, **kwargs):
        aux = args[-1]
        seen.append(aux is not None and aux.requires_grad and float(aux.detach()) > 0)
        return loop_step_loss(out, *args, **kwargs)

    loop_step_loss = loop.step_loss
    monkeypatch.setattr(loop, "step_loss", spy)
    config = TrainConfig(tokens=64, train_seq_len=16, micro_batch=2, kd_weight=0.0)
    train(model, config, calibration_ids(8, 16), calibration_ids(2, 16, seed=1), device="cpu", progress=False)
    assert seen and all(seen)
    assert adapter_for(model).experts is not None and len(set(counts_of(model))) == 2
