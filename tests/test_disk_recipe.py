"""Models larger than memory, recipes: a recipe of streamed stages goes from disk to disk stage by
stage (intermediates in the checkpoints directory) and writes what the recipe run in memory writes,
bit for bit; an input with per-block shapes (an earlier width run) streams; a run killed in its
second stage resumes without redoing the first."""

from __future__ import annotations

import json

import torch
from conftest import calibration_ids
from test_disk_depth import both_ways, cli, deep, interrupted, same

import secateur
from secateur.calibrate.disk import DiskBlocks

SMALL = ["--calib-samples", "6", "--calib-seq-len", "16", "--eval-windows", "4", "--eval-seq-len", "32",
         "--check-windows", "0"]  # fmt: skip
THREE = ('[[stage]]\nmethod = "width"\nremove_fraction = 0.4\nallocation = "adaptive"\nimportance = "activation"\nround_to = 8\n'
         'reconstruct = true\n'
         '[[stage]]\nmethod = "angular"\nremove_blocks = 1\n'
         '[[stage]]\nmethod = "sparsegpt"\npattern = "2:4"\n')  # fmt: skip


def untimed(value):
    """A record's value without the seconds its layers took."""
    if isinstance(value, list):
        return [untimed(v) for v in value]
    return {k: v for k, v in value.items() if k != "seconds"} if isinstance(value, dict) else value


def recipe(tmp_path, text_file):
    file = tmp_path / "three.toml"
    file.write_text(f'calib = "{text_file}"\n' + THREE)
    return file


def test_a_three_stage_recipe_streamed_equals_the_recipe_in_memory_bit_for_bit(tmp_path, text_file, capsys):
    path = deep(tmp_path, "llama", blocks=5)
    args = ["prune", path, "--recipe", recipe(tmp_path, text_file), *SMALL]
    memory, disk, _ = both_ways(args, tmp_path, capsys)
    assert [h["kind"] for h in disk["history"]] == ["width", "depth", "sparsity"] and disk["offload"] == "disk"
    for a, b in zip(memory["history"], disk["history"]):
        assert a["settings"] == b["settings"] and a["calibration"] == b["calibration"], a["kind"]
        for key in ("layers", "removed_blocks", "parameters_after", "reconstruction"):
            assert untimed(a["result"].get(key)) == untimed(b["result"].get(key)), (a["kind"], key)
    assert memory["structure"]["widths"] == disk["structure"]["widths"]
    assert not disk["structure"]["uniform_widths"]  # per-block widths, built by the next stages from the intermediate
    assert memory["structure"]["target_sparsity"] == disk["structure"]["target_sparsity"]
    model, _ = secateur.load(tmp_path / "disk")
    reference, _ = secateur.load(tmp_path / "memory")
    ids = calibration_ids(2, 16, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=0)
    assert not (tmp_path / "disk.checkpoints").exists()


def test_an_input_with_per_block_widths_streams_its_next_stage(tmp_path, text_file, capsys):
    path = deep(tmp_path, "llama", blocks=4)
    code, _, err = cli(["prune", path, "--method", "width", "--remove-fraction", "0.3", "--allocation", "adaptive",
                        "--calib", text_file, *SMALL, "--out", tmp_path / "width"], capsys)  # fmt: skip
    assert code == 0, err
    args = ["prune", tmp_path / "width", "--method", "angular", "--remove-blocks", "1", "--calib", text_file, *SMALL]
    memory, disk, _ = both_ways(args, tmp_path, capsys)
    assert memory["structure"] == disk["structure"]
    assert (tmp_path / "disk" / "modeling_secateur.py").read_text() == (tmp_path / "memory" / "modeling_secateur.py").read_text()


def test_a_streamed_recipe_killed_in_its_second_stage_resumes_without_redoing_the_first(tmp_path, text_file, capsys,
                                                                                         monkeypatch):  # fmt: skip
    import secateur.calibrate.disk as disk

    path = deep(tmp_path, "llama", blocks=5)
    args = ["prune", path, "--recipe", recipe(tmp_path, text_file), "--offload", "disk", *SMALL]
    assert cli([*args, "--out", tmp_path / "whole"], capsys)[0] == 0
    monkeypatch.setattr(disk, "SAVE_EVERY", 0.0)
    write = DiskBlocks.write_blocks

    def killed(self, order, patches=None):  # the depth stage: two blocks written, then the kill
        write(self, order[:2], patches)
        raise KeyboardInterrupt

    out = tmp_path / "resumed"
    interrupted(args, out, capsys, monkeypatch, "write_blocks", killed)
    work = tmp_path / "resumed.checkpoints" / "stream"
    assert (work / "stage-0" / "secateur.json").is_file() and not (work / "stage-0.work").exists()
    assert (work / "stage-1.work" / "depth.pt").is_file()
    opened = []
    open_ = DiskBlocks.open.__func__
    monkeypatch.setattr(DiskBlocks, "open", classmethod(lambda cls, p, *a, **k: opened.append(p) or open_(cls, p, *a, **k)))
    code, _, err = cli([*args, "--out", out, "--resume"], capsys)
    assert code == 0, err
    assert [p.name for p in opened] == ["stage-0", "stage-1"]  # the width stage is not run again
    same(tmp_path / "whole", out)
    assert json.loads((out / "secateur.json").read_text())["structure"] == \
        json.loads((tmp_path / "whole" / "secateur.json").read_text())["structure"]  # fmt: skip
    assert not (tmp_path / "resumed.checkpoints").exists()
