"""Run by test_processes.py under torchrun (and alone): one-shot pruning of a tiny model with the
calibration windows split over the processes. argv: method (wanda | sparsegpt | owl | width), output
file prefix; every process saves its weights as PREFIX-RANK.pt."""

import os
import sys

import torch
import torch.distributed as dist
from conftest import calibration_ids, tiny_model

import secateur
from secateur.calibrate.processes import share
from secateur.config import AllocationConfig
from secateur.width import WidthConfig

if "RANK" in os.environ:
    dist.init_process_group("gloo")
torch.manual_seed(0)
model = tiny_model("llama", num_hidden_layers=3)
configs = {
    "wanda": secateur.PruneConfig(secateur.WandaConfig(), secateur.Unstructured(0.5)),
    "sparsegpt": secateur.PruneConfig(secateur.SparseGPTConfig(), secateur.NM(2, 4)),
    "owl": secateur.PruneConfig(secateur.WandaConfig(), secateur.Unstructured(0.6), allocation=AllocationConfig("owl")),
    "width": WidthConfig(fraction=0.3, importance="fluctuation", reconstruct=True),
}
report = secateur.prune(model, configs[sys.argv[1]], calibration_ids(8, 16), batch_size=2, progress=False)
rank = int(os.environ.get("RANK", "0"))
torch.save({"state": model.state_dict(), "result": report.stages[0]["result"], "share": share(calibration_ids(8, 16))},
           f"{sys.argv[2]}-{rank}.pt")
if dist.is_initialized():
    dist.destroy_process_group()
