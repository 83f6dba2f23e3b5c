"""Models larger than memory, depth: a depth stage streamed from disk to disk (the search's and the
compensation's passes reading one block at a time, the kept blocks written renumbered) writes what
the stage run in memory writes, bit for bit, loads with stock transformers, and resumes after a kill."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CONFIGS, FAMILIES, calibration_ids, stored, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

from secateur.calibrate.disk import DiskBlocks
from secateur.cli import main

SMALL = ["--calib-samples", "6", "--calib-seq-len", "16", "--eval-windows", "4", "--eval-seq-len", "32",
         "--check-windows", "0"]  # fmt: skip


def deep(tmp_path, family: str, blocks: int = 5):
    path = tmp_path / f"{family}-deep"
    overrides = {"num_hidden_layers": blocks}
    if getattr(CONFIGS[family](), "layer_types", None):  # one entry per block
        overrides["layer_types"] = ["sliding_attention" if i % 3 < 2 else "full_attention" for i in range(blocks)] \
            if family == "gemma3_text" else [CONFIGS[family]().layer_types[0]] * blocks  # fmt: skip
    if family == "gpt2":
        overrides = {"n_layer": blocks}
    tiny_model(family, **overrides).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def cli(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def both_ways(args, tmp_path, capsys) -> tuple[dict, dict, str]:
    """The command in memory (`memory`) and streamed (`disk`): equal weights; (the two manifests, the
    streamed run's console)."""
    code, _, err = cli([*args, "--offload", "none", "--out", tmp_path / "memory"], capsys)
    assert code == 0, err
    code, stdout, err = cli([*args, "--offload", "disk", "--out", tmp_path / "disk"], capsys)
    assert code == 0, err
    same(tmp_path / "memory", tmp_path / "disk")
    manifests = [json.loads((tmp_path / name / "secateur.json").read_text()) for name in ("memory", "disk")]
    return *manifests, stdout


def interrupted(args, out, capsys, monkeypatch, method: str, replacement) -> None:
    """The command killed by `replacement` in place of `DiskBlocks.<method>`: exit 130, no output."""
    original = getattr(DiskBlocks, method)
    monkeypatch.setattr(DiskBlocks, method, replacement)
    code, _, err = cli([*args, "--out", out], capsys)
    assert code == 130 and "--resume" in err and not out.exists()
    monkeypatch.setattr(DiskBlocks, method, original)


def resumed(args, out, capsys, monkeypatch) -> list[int]:
    """The command again with --resume: succeeds; returns the blocks it entered."""
    entered, enter = [], DiskBlocks.enter
    monkeypatch.setattr(DiskBlocks, "enter", lambda self, i, d: entered.append(i) or enter(self, i, d))
    code, _, err = cli([*args, "--out", out, "--resume"], capsys)
    assert code == 0, err
    return entered


def same(a, b) -> None:
    memory, disk = stored(a), stored(b)
    assert set(memory) <= set(disk)  # a tied head: stored once by save_pretrained, as in the input
    for name, tensor in memory.items():
        assert torch.equal(disk[name], tensor), name


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_depth_equals_the_in_memory_stage_bit_for_bit(tmp_path, family):
    from secateur.depth import AngularConfig, DepthConfig, depth_prune
    from secateur.depth.config import Amount
    from secateur.offload import prune_on_disk

    path = deep(tmp_path, family, blocks=6)
    calibration = calibration_ids(6, 16)
    config = DepthConfig(AngularConfig(), Amount(count=2))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    selection = depth_prune(model, config, calibration, batch_size=4)
    model.save_pretrained(tmp_path / "memory")
    record = prune_on_disk(path, tmp_path / "disk", config, calibration, batch_size=4)
    same(tmp_path / "memory", tmp_path / "disk")
    result = record["result"]
    assert result["removed_blocks"] == selection.blocks and result["compensated"] == selection.compensated
    assert result["compensation"] == selection.compensation and result["blocks_after"] == 4
    assert result["parameters_after"] == sum(p.numel() for p in model.parameters())  # a tied head counted once
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "disk").eval()  # stock transformers
    assert reloaded.config.num_hidden_layers == 4
    ids = calibration_ids(2, 16, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_offload_disk_depth_on_the_command_line_records_what_the_in_memory_run_does(tmp_path, text_file, capsys):
    path = deep(tmp_path, "llama")
    args = ["prune", path, "--method", "angular", "--remove-blocks", "2", "--calib", text_file, *SMALL]
    memory, disk, stdout = both_ways(args, tmp_path, capsys)
    a, b = memory["history"][-1], disk["history"][-1]
    assert b["offload"] == "disk" and a["settings"] == b["settings"]  # compensation resolved alike
    for key in ("removed_blocks", "blocks_after", "parameters_after", "compensated", "compensation", "removed"):
        assert a["result"].get(key) == b["result"].get(key), key
    for key in ("blocks", "hidden_size", "parameters", "target_parameters", "target_sparsity"):
        assert memory["structure"][key] == pytest.approx(disk["structure"][key]), key
    assert "angular: removed blocks" in stdout
    assert cli(["info", tmp_path / "disk"], capsys)[0] == 0


def test_block_influence_with_a_compensated_run_in_the_middle_streams_alike(tmp_path, text_file, capsys):
    path = deep(tmp_path, "llama", blocks=6)
    args = ["prune", path, "--method", "block-influence", "--remove-blocks", "3", "--compensate", "--calib",
            text_file, *SMALL]  # fmt: skip
    _, disk, _ = both_ways(args, tmp_path, capsys)
    record = disk["history"][-1]["result"]
    assert record["compensated"] and any(c.get("fitted") for c in record["compensation"])


def test_a_streamed_depth_run_holds_one_block_at_a_time_in_its_passes(tmp_path, monkeypatch):
    """While a pass is at block i, the only blocks with real weights are i (and the block before a
    removed run, which compensation fits when the run ends)."""
    from secateur.depth import AngularConfig, DepthConfig
    from secateur.depth.config import Amount
    from secateur.depth.disk import stream_depth

    path = deep(tmp_path, "llama", blocks=6)
    seen, enter = [], DiskBlocks.enter

    def watch(self, index, device):
        block = enter(self, index, device)
        seen.append((index, [i for i, b in enumerate(self.adapter.block_list(self.model))
                             if not next(b.parameters()).is_meta], set(self.pinned)))  # fmt: skip
        return block

    monkeypatch.setattr(DiskBlocks, "enter", watch)
    staging = tmp_path / "staging"
    staging.mkdir()
    result, _, model, _ = stream_depth(path, staging, DepthConfig(AngularConfig(), Amount(count=2), compensate=True),
                                       calibration_ids(4, 16), torch.float32, torch.device("cpu"), 4)  # fmt: skip
    assert len(seen) > 6  # two passes: the search's and the compensation's
    assert all(set(real) <= {index} | pinned for index, real, pinned in seen)
    assert model.config.num_hidden_layers == 4 and result["blocks_after"] == 4


def test_a_streamed_depth_run_killed_while_writing_resumes_to_the_same_output(tmp_path, text_file, capsys,
                                                                               monkeypatch):  # fmt: skip
    path = deep(tmp_path, "llama", blocks=6)
    args = ["prune", path, "--method", "angular", "--remove-blocks", "2", "--calib", text_file, "--offload", "disk",
            *SMALL]  # fmt: skip
    assert cli([*args, "--out", tmp_path / "whole"], capsys)[0] == 0
    write = DiskBlocks.write_blocks

    def killed(self, order, patches=None):
        write(self, order[:2], patches)  # two blocks written, then the kill
        raise KeyboardInterrupt

    out = tmp_path / "resumed"
    interrupted(args, out, capsys, monkeypatch, "write_blocks", killed)
    work = tmp_path / "resumed.checkpoints" / "stream"
    assert (work / "depth.pt").is_file() and len(list(work.glob("block-*.safetensors"))) == 2
    assert resumed(args, out, capsys, monkeypatch) == []  # the selection and the fit were saved: no pass runs again
    same(tmp_path / "whole", out)
    assert not (tmp_path / "resumed.checkpoints").exists()


@pytest.mark.parametrize("extra, message", [
    (["--method", "finercut", "--remove-sublayers", "1"], "finercut skips attention / MLP branches"),
    (["--method", "greedy-loss", "--remove-blocks", "1"], "runs the whole model once for every candidate block"),
])  # fmt: skip
def test_depth_methods_that_cannot_stream_are_refused_before_work(tmp_path, text_file, capsys, extra, message):
    path = deep(tmp_path, "llama")
    code, _, err = cli(["prune", path, *extra, "--calib", text_file, "--offload", "disk", "--out", tmp_path / "out"],
                       capsys)  # fmt: skip
    assert code == 2 and message in err and "--offload disk" in err
    assert not (tmp_path / "out").exists()
