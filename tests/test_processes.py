"""One-shot pruning over several processes (torchrun, gloo on CPU): each process prunes on its share
of the calibration windows with the statistics summed over processes, so every process ends with the
same weights, and those of one process fed every window (up to the order of the sums)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import calibration_ids

from secateur.calibrate.processes import reduce, share, world
from secateur.calibrate.stats import Hessian

HERE = Path(__file__).parent


def run(method: str, prefix: Path, processes: int, port: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    script = [str(HERE / "distributed_prune.py"), method, str(prefix)]
    command = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
                str(port), *script] if processes > 1 else [sys.executable, *script])  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("method, port", [("wanda", 29541), ("sparsegpt", 29542), ("owl", 29543), ("width", 29544)])
def test_two_processes_prune_alike_and_as_one_process_fed_every_window(tmp_path, method, port):
    run(method, tmp_path / "two", 2, port)
    run(method, tmp_path / "one", 1, port)
    first, second, one = (torch.load(tmp_path / f"{name}.pt") for name in ("two-0", "two-1", "one-0"))
    windows = calibration_ids(8, 16)
    assert torch.equal(first["share"], windows[:4]) and torch.equal(second["share"], windows[4:])
    assert torch.equal(one["share"], windows)
    assert first["state"].keys() == one["state"].keys()
    for name, value in first["state"].items():
        assert torch.equal(second["state"][name], value), name  # the same sums: the same weights everywhere
        if value.ndim == 2 and method != "width":
            assert torch.equal(value == 0, one["state"][name] == 0), name  # the same masks
        torch.testing.assert_close(value, one["state"][name], rtol=1e-4, atol=1e-5)
    if method == "width":
        assert first["result"]["layers"] == one["result"]["layers"]


def test_one_process_shares_and_reductions_are_the_identity():
    calibration = torch.arange(12).view(6, 2)
    assert world() == (0, 1) and share(calibration) is calibration
    hessian = Hessian(3, "cpu")
    hessian.update(torch.ones(2, 3))
    reduce(hessian)
    assert hessian.tokens == 2 and torch.equal(hessian.value, torch.full((3, 3), 2.0))


def _cli(args: list, processes: int, port: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", str(port)]
    return subprocess.run([sys.executable, *(launcher if processes > 1 else []), "-m", "secateur.cli", *map(str, args)],
                          env=env, capture_output=True, text=True)  # fmt: skip


def test_the_command_line_under_torchrun_writes_once_what_one_process_writes(model_dir, text_file, tmp_path):
    from safetensors.torch import load_file

    args = ["prune", model_dir("llama"), "--method", "sparsegpt", "--sparsity", "0.5", "--calib", text_file,
            "--calib-samples", "8", "--calib-seq-len", "16", "--eval-windows", "4", "--eval-seq-len", "16"]  # fmt: skip
    two = _cli([*args, "--out", tmp_path / "two"], 2, 29551)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("held-out check") == 1 and two.stdout.count(" blocks, ") == 1  # process 0 reports
    one = _cli([*args, "--out", tmp_path / "one"], 1, 0)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = load_file(tmp_path / "two" / "model.safetensors"), load_file(tmp_path / "one" / "model.safetensors")
    for name, value in b.items():
        if value.ndim == 2 and "layers" in name:
            assert torch.equal(a[name] == 0, value == 0), name  # the same masks from the summed statistics
        torch.testing.assert_close(a[name], value, rtol=1e-4, atol=1e-5)
    manifest = json.loads((tmp_path / "two" / "secateur.json").read_text())
    assert manifest["processes"] == 2 and "processes" not in json.loads((tmp_path / "one" / "secateur.json").read_text())
    # an output that exists stops every process with process 0's line, before any work, and stays as it was
    before = (tmp_path / "one" / "secateur.json").read_text()
    again = _cli([*args, "--out", tmp_path / "one"], 2, 29552)
    assert again.returncode != 0 and again.stderr.count("already exists") == 2
    assert (tmp_path / "one" / "secateur.json").read_text() == before
    streamed = _cli([*args, "--out", tmp_path / "disk", "--offload", "disk"], 2, 29553)
    assert streamed.returncode != 0 and "--offload disk: it runs in one process" in streamed.stderr
    assert not (tmp_path / "disk").exists()


def test_recovery_from_the_command_line_under_torchrun_writes_once(model_dir, text_file, tmp_path):
    args = ["train", model_dir("llama"), "--out", tmp_path / "out", "--tokens", "1024", "--train-seq-len", "16",
            "--calib", text_file, "--val-windows", "2", "--eval-windows", "4", "--eval-seq-len", "16"]  # fmt: skip
    done = _cli(args, 2, 29554)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((tmp_path / "out" / "secateur.json").read_text())
    assert manifest["processes"] == 2 and manifest["history"][-1]["result"]["processes"] == 2
    assert not (tmp_path / "out.checkpoints").exists() and done.stdout.count(" blocks, ") == 1


@pytest.mark.parametrize("command", [
    ["eval", "{model}", "--windows", "2", "--seq-len", "16"],
    ["export", "{model}", "--gguf", "{out}"],
    ["plan", "{model}", "--target", "params=80M", "--out", "{out}"],
    ["info", "{model}"],
])  # fmt: skip
def test_commands_that_do_not_share_their_work_refuse_several_processes(model_dir, tmp_path, capsys, monkeypatch,
                                                                        command):  # fmt: skip
    """Under torchrun every process would do the whole work (and several would claim one output): one
    line, exit 2, nothing written; prune and train join the processes instead."""
    from secateur.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2"), monkeypatch.setenv("RANK", "1")
    out = tmp_path / "out"
    code = main([part.format(model=model_dir("llama"), out=out) for part in command])
    err = capsys.readouterr().err
    assert code == 2 and f"secateur {command[0]} runs in one process" in err and not out.exists()
