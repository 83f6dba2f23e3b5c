"""Models larger than memory, mixtures of experts: the fused experts are read from (and written back
to) the per-expert matrices a checkpoint stores, so an experts stage (and any streamed stage) runs
from disk to disk on a mixture of experts and writes what the stage run in memory writes, bit for
bit, in the layout `save_pretrained` writes; a run killed at a block resumes to the same output."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import MOE_CONFIGS, MOE_FAMILIES, calibration_ids, stored, tiny_model, tiny_tokenizer
from test_disk_depth import cli, interrupted, resumed
from test_disk_width import both as both_stages
from transformers import AutoModelForCausalLM

import secateur
from secateur.config import NM, PruneConfig, SparseGPTConfig, Unstructured
from secateur.calibrate.disk import DiskBlocks
from secateur.experts import ExpertsConfig, prune_experts

SMALL = ["--calib-samples", "6", "--calib-seq-len", "16", "--eval-windows", "4", "--eval-seq-len", "32", "--check-windows", "0"]


def deep_moe(tmp_path, family: str, blocks: int = 4, **overrides):
    path = tmp_path / f"{family}-deep"
    if getattr(MOE_CONFIGS[family](), "layer_types", None):  # one entry per block
        overrides["layer_types"] = [MOE_CONFIGS[family]().layer_types[0]] * blocks
    tiny_model(family, num_hidden_layers=blocks, **overrides).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def both(tmp_path, path, config, calibration):
    """The experts stage in memory (saved) and streamed (`test_disk_width.both`)."""
    return both_stages(tmp_path, path, config, calibration, stage=prune_experts)


def identical(a, b) -> None:
    """The same tensors under the same names, bit for bit."""
    memory, disk = stored(a), stored(b)
    assert sorted(memory) == sorted(disk)
    for name, tensor in memory.items():
        assert torch.equal(disk[name], tensor), name


def same_logits(path, model) -> None:
    reloaded = secateur.load(path)[0].eval()
    ids = calibration_ids(2, 16, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_streamed_experts_equal_the_in_memory_stage_in_the_stored_layout(tmp_path, family):
    """REAP removal on every family: the output stores one matrix per kept expert and projection under
    the names save_pretrained gives them (Mixtral's block_sparse_moe and w1/w3/w2), bit for bit."""
    path = deep_moe(tmp_path, family)
    model, report, record = both(tmp_path, path, ExpertsConfig(fraction=0.25), calibration_ids(6, 16))
    identical(tmp_path / "memory", tmp_path / "disk")
    names = set(stored(tmp_path / "disk"))
    assert not any(name.endswith("gate_up_proj") for name in names)
    assert any(".experts.5." in name for name in names) and not any(".experts.6." in name for name in names)
    result = record["result"]
    assert result["blocks"] == report.to_dict()["blocks"] and result["experts_after"] == 6
    assert result["parameters_after"] == sum(p.numel() for p in model.parameters())
    same_logits(tmp_path / "disk", model)


@pytest.mark.parametrize("settings", [
    {"allocation": "global", "fraction": 0.3},  # per-block counts: the module that builds them
    {"merge": True, "fraction": 0.25},
    {"criterion": "naee", "count": 2},
    {"criterion": "stun", "count": 2},  # router weights only: no calibration pass
    {"width": True, "fraction": 0.25, "shared_expert": True},  # expert width, the shared expert too
])  # fmt: skip
def test_every_method_streams_to_the_in_memory_result(tmp_path, settings):
    path = deep_moe(tmp_path, "qwen2_moe", blocks=3)
    model, report, record = both(tmp_path, path, ExpertsConfig(**settings), calibration_ids(6, 16))
    identical(tmp_path / "memory", tmp_path / "disk")
    assert record["result"]["blocks"] == report.to_dict()["blocks"]
    for name in ("config.json", "modeling_secateur.py"):
        memory, disk = tmp_path / "memory" / name, tmp_path / "disk" / name
        assert memory.is_file() == disk.is_file()
    memory_config = json.loads((tmp_path / "memory" / "config.json").read_text())
    disk_config = json.loads((tmp_path / "disk" / "config.json").read_text())
    assert {k: v for k, v in disk_config.items() if k != "transformers_version"} == \
        {k: v for k, v in memory_config.items() if k != "transformers_version"}  # fmt: skip
    same_logits(tmp_path / "disk", model)


@pytest.mark.parametrize("family,target", [("qwen2_moe", Unstructured(0.5)), ("mixtral", NM(2, 4))])
def test_sparsity_inside_the_experts_streams_to_the_in_memory_result(tmp_path, family, target):
    """SparseGPT inside every expert (each calibrated on the tokens routed to it) and in attention."""
    from secateur.offload import prune_on_disk
    from secateur.sparsity.prune import sparsify

    path = deep_moe(tmp_path, family, blocks=3)
    calibration, config = calibration_ids(6, 16), PruneConfig(SparseGPTConfig(), target)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    report = sparsify(model, None, config, calibration, batch_size=4)
    secateur.save(model, None, tmp_path / "memory", {"history": []})
    record = prune_on_disk(path, tmp_path / "disk", config, calibration, batch_size=4)
    identical(tmp_path / "memory", tmp_path / "disk")
    layers = lambda records: [(r["name"], r["shape"], r["sparsity"], r["magnitude_fallback"]) for r in records]  # noqa: E731
    assert layers(record["result"]["layers"]) == layers(report.to_dict()["layers"])
    assert any(".experts.7." in layer["name"] for layer in record["result"]["layers"])


def test_stun_recipe_streamed_on_the_command_line_equals_the_in_memory_run(text_file, tmp_path, capsys):
    """Experts removed, then Wanda inside the kept experts: two stages from disk to disk."""
    from test_disk_depth import both_ways

    recipe = tmp_path / "stun.toml"
    recipe.write_text('[[stage]]\nmethod = "experts"\ncriterion = "reap"\nremove_fraction = 0.5\n'
                      '[[stage]]\nmethod = "wanda"\nsparsity = 0.4\n')
    path = deep_moe(tmp_path, "qwen3_moe", blocks=3)
    memory, disk, _ = both_ways(["prune", path, "--recipe", recipe, "--calib", text_file, *SMALL], tmp_path, capsys)
    assert sorted(stored(tmp_path / "memory")) == sorted(stored(tmp_path / "disk"))
    assert [r["kind"] for r in disk["history"]] == ["experts", "sparsity"] and disk["offload"] == "disk"
    assert disk["structure"] == memory["structure"]  # the sparsity table counts every kept expert's layers
    assert disk["history"][0]["result"]["blocks"] == memory["history"][0]["result"]["blocks"]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "disk").config.num_experts == 4


@pytest.mark.parametrize("method", [
    ["experts", "--merge"],
    ["experts", "--allocation", "global"],  # the scoring pass again, then on from the saved block
    ["expert-width", "--shared-expert"],
])  # fmt: skip
def test_a_streamed_experts_run_killed_at_a_block_resumes_to_the_same_output(text_file, tmp_path, capsys, monkeypatch,
                                                                             method):  # fmt: skip
    import secateur.calibrate.disk as disk

    monkeypatch.setattr(disk, "SAVE_EVERY", 0.0)  # save the state after every block
    path = deep_moe(tmp_path, "qwen2_moe", blocks=4)
    args = ["prune", path, "--method", *method, "--remove-fraction", "0.25", "--calib", text_file, "--offload", "disk",
            *SMALL]  # fmt: skip
    code, _, err = cli([*args, "--out", tmp_path / "whole"], capsys)
    assert code == 0, err
    leave = DiskBlocks.leave

    def killed(self, index):
        leave(self, index)
        if index == 1 and self.work is not None:  # in the pass that writes (not a read-only scoring pass)
            raise KeyboardInterrupt

    out = tmp_path / "resumed"
    interrupted(args, out, capsys, monkeypatch, "leave", killed)
    entered = resumed(args, out, capsys, monkeypatch)
    assert entered[-2:] == [2, 3] and len(entered) == (6 if "global" in method else 2)  # blocks 0 and 1 were saved
    identical(tmp_path / "whole", out)
    whole, again = (json.loads((p / "secateur.json").read_text())["history"][0]["result"] for p in (tmp_path / "whole", out))
    assert again["blocks"] == whole["blocks"] and len(again["blocks"]) == 4


def test_depth_streams_on_a_mixture_of_experts_with_dense_blocks(tmp_path):
    """Block removal renumbers the per-expert matrices; DeepSeek-V3's leading dense block stays dense."""
    from secateur.depth import AngularConfig, DepthConfig, depth_prune
    from secateur.depth.config import Amount
    from secateur.offload import prune_on_disk

    path = deep_moe(tmp_path, "deepseek_v3", blocks=5, first_k_dense_replace=1)
    calibration, config = calibration_ids(6, 16), DepthConfig(AngularConfig(), Amount(count=2))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    selection = depth_prune(model, config, calibration, batch_size=4)
    secateur.save(model, None, tmp_path / "memory", {"history": []})
    record = prune_on_disk(path, tmp_path / "disk", config, calibration, batch_size=4)
    identical(tmp_path / "memory", tmp_path / "disk")
    assert record["result"]["removed_blocks"] == selection.blocks
    same_logits(tmp_path / "disk", model)


def test_a_checkpoint_with_fused_experts_streams_and_stays_fused(tmp_path):
    """A checkpoint that stores the experts as the model holds them (3-D) is read and written so."""
    from safetensors.torch import save_file

    from secateur.offload import prune_on_disk

    path = tmp_path / "fused"
    model = tiny_model("olmoe", num_hidden_layers=3)
    model.config.save_pretrained(path), tiny_tokenizer().save_pretrained(path)
    save_file({n: t.contiguous() for n, t in model.state_dict().items() if n != "lm_head.weight"
               or not model.config.tie_word_embeddings}, path / "model.safetensors")  # fmt: skip
    config, calibration = ExpertsConfig(fraction=0.25), calibration_ids(6, 16)
    prune_experts(model, config, calibration, batch_size=4)
    prune_on_disk(path, tmp_path / "disk", config, calibration, batch_size=4)
    written = stored(tmp_path / "disk")
    assert written["model.layers.2.mlp.experts.gate_up_proj"].shape == (6, 64, 64)
    for name, tensor in model.state_dict().items():
        assert torch.equal(written[name], tensor), name
    same_logits(tmp_path / "disk", model)


def test_only_the_entered_block_holds_its_experts(tmp_path, monkeypatch):
    """While block i is measured and pruned, no other block holds real (non-meta) weights: the fused
    experts come and go with their block, and DeepSeek-V3's router bias (a persistent buffer) is
    read from the checkpoint with them."""
    from secateur.offload import prune_on_disk

    model = tiny_model("deepseek_v3", num_hidden_layers=4)
    biases = [torch.randn(8) for _ in range(4)]
    for block, bias in zip(model.model.layers, biases):
        block.mlp.gate.e_score_correction_bias.copy_(bias)
    model.save_pretrained(tmp_path / "model"), tiny_tokenizer().save_pretrained(tmp_path / "model")
    seen, enter = [], DiskBlocks.enter

    def watch(self, index, device):
        block = enter(self, index, device)
        blocks = self.adapter.block_list(self.model)
        seen.append((index, [i for i, b in enumerate(blocks) if any(not p.is_meta for p in b.parameters())],
                     torch.equal(block.mlp.gate.e_score_correction_bias, biases[index])))  # fmt: skip
        return block

    monkeypatch.setattr(DiskBlocks, "enter", watch)
    config, calibration = ExpertsConfig(fraction=0.25), calibration_ids(6, 16)
    prune_on_disk(tmp_path / "model", tmp_path / "disk", config, calibration, batch_size=4)
    assert seen == [(i, [i], True) for i in range(4)]
    prune_experts(model, config, calibration, batch_size=4)
    same_logits(tmp_path / "disk", model)


def test_per_block_expert_counts_stream_into_a_later_stage(text_file, tmp_path, capsys):
    """Global allocation leaves blocks of different expert counts; the next stage streams from that
    intermediate, its shapes rebuilt from the manifest."""
    from test_disk_depth import both_ways

    recipe = tmp_path / "global.toml"
    recipe.write_text('[[stage]]\nmethod = "experts"\nallocation = "global"\nremove_fraction = 0.4\n'
                      '[[stage]]\nmethod = "sparsegpt"\nsparsity = 0.5\n')
    path = deep_moe(tmp_path, "qwen3_moe", blocks=3)
    memory, disk, _ = both_ways(["prune", path, "--recipe", recipe, "--calib", text_file, *SMALL], tmp_path, capsys)
    assert disk["structure"] == memory["structure"]
    counts = disk["structure"]["experts_per_block"]
    assert len(set(counts)) > 1 and sum(counts) == 24 - round(0.4 * 24)


def test_width_on_a_mixture_of_experts_is_refused_when_streamed_too(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = cli(["prune", model_dir("qwen2_moe"), "--method", "width", "--remove-fraction", "0.25",
                        "--offload", "disk", "--calib", text_file, *SMALL, "--out", out], capsys)  # fmt: skip
    assert code == 2 and not out.exists()
    assert "does not reach the fused 3-D expert weights" in err and err.count("secateur: error") == 1
