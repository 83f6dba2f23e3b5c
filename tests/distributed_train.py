"""Run by test_train.py under torchrun (and alone): a short recovery on a tiny model, weights saved
by rank 0. argv: accumulate, output file."""

import copy
import os
import sys

import torch
from conftest import calibration_ids, tiny_model

from secateur.train import TrainConfig, train

student = tiny_model("llama")
teacher = copy.deepcopy(student)
with torch.no_grad():
    for p in teacher.parameters():
        p.add_(0.01)
config = TrainConfig(tokens=32 * 16, train_seq_len=16, micro_batch=4, accumulate=int(sys.argv[1]), val_windows=2,
                     lr=1e-2, precision="float32", eval_every=100)
record = train(student, config, calibration_ids(32, 16), calibration_ids(2, 16, seed=1), teacher=teacher, device="cpu",
               progress=False).record
if os.environ.get("RANK", "0") == "0":
    torch.save({"state": student.state_dict(), "processes": record["processes"], "steps": record["steps"]},
               sys.argv[2])
