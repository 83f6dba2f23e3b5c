"""One-shot pruning over several processes (torchrun, gloo on CPU): each process prunes on its share
of the calibration windows with the statistics summed over processes, so every process ends with the
same weights, and those of one process fed every window (up to the order of the sums)."""

from __future__ import annotations

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
