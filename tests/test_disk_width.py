"""Models larger than memory, width: a width stage streamed from disk to disk (one read-only pass that
scores each block while it is resident, then each block cut, refitted where asked, and written)
writes what the stage run in memory writes, bit for bit, loads as the in-memory output loads, and
resumes after a kill."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAMILIES, calibration_ids
from test_disk_depth import both_ways, cli, deep, interrupted, resumed, same
from transformers import AutoModelForCausalLM

import secateur
from secateur.calibrate.disk import DiskBlocks
from secateur.width import WidthConfig, width_prune

SMALL = ["--calib-samples", "6", "--calib-seq-len", "16", "--eval-windows", "4", "--eval-seq-len", "32",
         "--check-windows", "0"]  # fmt: skip


def both(tmp_path, path, config, calibration, stage=width_prune):
    """The stage (`stage(model, config, calibration, batch_size=...)`) in memory (saved) and streamed;
    (in-memory model, its report, the streamed record)."""
    from secateur.offload import prune_on_disk

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    report = stage(model, config, calibration, batch_size=4)
    secateur.save(model, None, tmp_path / "memory", {"history": []})
    record = prune_on_disk(path, tmp_path / "disk", config, calibration, batch_size=4)
    return model, report, record


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_width_with_reconstruction_equals_the_in_memory_stage_bit_for_bit(tmp_path, family):
    """Every family's default heads (key/value groups where it has a head size) and the refit on the
    activations of the model as pruned so far, in both runs (Phi-3's fused qkv: channels only)."""
    path = deep(tmp_path, family, blocks=3)
    calibration = calibration_ids(6, 16)
    config = WidthConfig(fraction=0.3, reconstruct=True, heads="none" if family == "phi3" else None)
    model, report, record = both(tmp_path, path, config, calibration)
    _same_stage(tmp_path, model, report, record)


def _same_stage(tmp_path, model, report, record):
    """The streamed output is the in-memory one: files, record, parameter count, reloaded logits."""
    same(tmp_path / "memory", tmp_path / "disk")
    result = record["result"]
    assert result["layers"] == report.to_dict()["layers"] and result["reconstruction"] == report.reconstruction
    assert result["parameters_after"] == sum(p.numel() for p in model.parameters())
    reloaded = secateur.load(tmp_path / "disk")[0].eval()
    ids = calibration_ids(2, 16, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


HIDDEN_FAMILIES = ["llama", "qwen3", "gemma3_text", "phi3"]  # untied and tied heads, q/k norms, (1 + w) norms, fused qkv


@pytest.mark.parametrize("family", HIDDEN_FAMILIES)
@pytest.mark.parametrize("reconstruct", [True, False])
def test_streamed_hidden_channels_equal_the_in_memory_stage_bit_for_bit(tmp_path, family, reconstruct):
    """--hidden-fraction streamed: the hidden scores summed block by block in the read-only pass, the
    cut applied to every tensor as it is read (embedding, blocks, final norm, an untied head), the
    units re-costed at the new hidden size before the allocation: the in-memory stage's output."""
    path = deep(tmp_path, family, blocks=3)
    config = WidthConfig(fraction=0.4, hidden_fraction=0.25, reconstruct=reconstruct,
                         heads="none" if family == "phi3" else None)  # fmt: skip
    model, report, record = both(tmp_path, path, config, calibration_ids(6, 16))
    _same_stage(tmp_path, model, report, record)
    result = record["result"]
    assert (result["hidden_before"], result["hidden_after"]) == (64, 48) == (report.hidden_before, report.hidden_after)


@pytest.mark.parametrize("settings", [
    {"importance": "fluctuation"},  # bias compensation where the family can hold the bias
    {"importance": "activation", "allocation": "adaptive", "bias_compensation": False},
    {"importance": "magnitude", "bias_compensation": False, "heads": "none"},  # no calibration pass at all
])  # fmt: skip
def test_streamed_width_without_refit_equals_the_in_memory_stage(tmp_path, settings):
    path = deep(tmp_path, "llama", blocks=4)
    config = WidthConfig(fraction=0.35, reconstruct=False, **settings)
    model, report, record = both(tmp_path, path, config, calibration_ids(6, 16))
    same(tmp_path / "memory", tmp_path / "disk")
    assert record["result"]["layers"] == report.to_dict()["layers"]
    assert json.loads((tmp_path / "disk" / "config.json").read_text()).get("mlp_bias") == (
        True if settings["importance"] == "fluctuation" else False)  # fmt: skip
    reloaded = secateur.load(tmp_path / "disk")[0].eval()
    ids = calibration_ids(2, 16, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_adaptive_widths_streamed_load_with_stock_transformers_and_remote_code(tmp_path):
    path = deep(tmp_path, "llama", blocks=4)
    config = WidthConfig(fraction=0.4, importance="activation", allocation="adaptive", reconstruct=True)
    model, report, record = both(tmp_path, path, config, calibration_ids(6, 16))
    assert not report.uniform and record["result"]["remote_code"]
    assert (tmp_path / "disk" / "modeling_secateur.py").read_text() == (tmp_path / "memory" / "modeling_secateur.py").read_text()
    assert json.loads((tmp_path / "disk" / "config.json").read_text())["auto_map"] == \
        json.loads((tmp_path / "memory" / "config.json").read_text())["auto_map"]  # fmt: skip
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "disk", trust_remote_code=True).eval()
    ids = calibration_ids(2, 16, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_offload_disk_width_on_the_command_line_records_what_the_in_memory_run_does(tmp_path, text_file, capsys):
    path = deep(tmp_path, "llama", blocks=4)
    args = ["prune", path, "--method", "width", "--remove-fraction", "0.3", "--reconstruct", "--calib", text_file,
            *SMALL]  # fmt: skip
    memory, disk, stdout = both_ways(args, tmp_path, capsys)
    a, b = memory["history"][-1], disk["history"][-1]
    assert b["offload"] == "disk" and a["settings"] == b["settings"]
    for key in ("layers", "parameters_before", "parameters_after", "removed_fraction", "reconstruction", "variant"):
        assert a["result"][key] == b["result"][key], key
    assert memory["structure"] == disk["structure"]
    assert "width (" in stdout
    assert cli(["info", tmp_path / "disk"], capsys)[0] == 0


def test_a_streamed_width_run_holds_one_block_at_a_time(tmp_path, monkeypatch):
    from secateur.width.disk import stream_width

    path = deep(tmp_path, "llama", blocks=5)
    seen, enter = [], DiskBlocks.enter

    def watch(self, index, device):
        block = enter(self, index, device)
        seen.append((index, [i for i, b in enumerate(self.adapter.block_list(self.model))
                             if not next(b.parameters()).is_meta]))  # fmt: skip
        return block

    monkeypatch.setattr(DiskBlocks, "enter", watch)
    staging = tmp_path / "staging"
    staging.mkdir()
    store = DiskBlocks.open(path, torch.float32)
    try:
        stream_width(store, staging, WidthConfig(fraction=0.3, reconstruct=True), calibration_ids(4, 16),
                     torch.device("cpu"), 4)  # fmt: skip
    finally:
        store.close()
    assert [index for index, _ in seen] == [*range(5), *range(5)]  # the scoring pass, then the cutting pass
    assert all(real == [index] for index, real in seen)


@pytest.mark.parametrize("reconstruct, hidden", [(True, False), (False, False), (True, True)])
def test_a_streamed_width_run_killed_midway_resumes_to_the_same_output(tmp_path, text_file, capsys, monkeypatch,
                                                                        reconstruct, hidden):  # fmt: skip
    """Killed after two blocks of the cutting pass were written (the activations saved after each
    block): --resume skips the scoring pass and the written blocks and ends with the same weights
    (with a hidden cut: the saved cut applied again to the shapes and to what is read)."""
    import secateur.calibrate.disk as disk

    path = deep(tmp_path, "llama", blocks=5)
    args = ["prune", path, "--method", "width", "--remove-fraction", "0.3", "--importance", "fluctuation",
            "--reconstruct" if reconstruct else "--no-reconstruct", "--calib", text_file, "--offload", "disk",
            *(["--hidden-fraction", "0.25"] if hidden else []), *SMALL]  # fmt: skip
    assert cli([*args, "--out", tmp_path / "whole"], capsys)[0] == 0
    monkeypatch.setattr(disk, "SAVE_EVERY", 0.0)
    leave = DiskBlocks.leave

    def killed(self, index):
        leave(self, index)
        if self.staging is not None and index == 1:
            raise KeyboardInterrupt

    out = tmp_path / "resumed"
    interrupted(args, out, capsys, monkeypatch, "leave", killed)
    work = tmp_path / "resumed.checkpoints" / "stream"
    assert (work / "width.pt").is_file() and len(list(work.glob("block-*.safetensors"))) == 2
    # no scoring pass; the cutting pass from the first block not written
    assert resumed(args, out, capsys, monkeypatch) == [2, 3, 4]
    same(tmp_path / "whole", out)
    whole = json.loads((tmp_path / "whole" / "secateur.json").read_text())
    again = json.loads((out / "secateur.json").read_text())
    for key in ("layers", "reconstruction", "parameters_after"):
        assert whole["history"][-1]["result"][key] == again["history"][-1]["result"][key], key
    assert whole["structure"] == again["structure"]
    assert not (tmp_path / "resumed.checkpoints").exists()


def test_width_settings_that_cannot_stream_are_refused_before_work(tmp_path, text_file, capsys):
    path = deep(tmp_path, "llama")
    code, _, err = cli(["prune", path, "--method", "width", "--remove-fraction", "0.3", "--importance", "taylor",
                        "--calib", text_file, "--offload", "disk", "--out", tmp_path / "out"], capsys)  # fmt: skip
    assert code == 2 and "taylor importance takes gradients through the whole model" in err and "--offload disk" in err
    assert not (tmp_path / "out").exists()
