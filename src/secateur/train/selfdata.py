"""Self-data distillation (Thangarasa et al. 2024): part of the training text written by the teacher
itself. Each chosen window keeps its first tokens of corpus text as a prompt and the teacher
continues it by sampling from its own distribution, so the student is distilled on text the teacher
finds likely instead of only on text from another distribution. Done once before the first step; the
windows are kept in the work directory, so a resumed run trains on the same text without sampling
again. Every process samples the same windows from the same seed (the batches are split after)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from secateur.errors import TrainError
from secateur.generate.sampling import sample_continuations, spread
from secateur.train.config import TrainConfig
from secateur.output import save_whole

SELF_DATA = "self-data.pt"
SEED_OFFSET = 7919  # the sampler's seed is the run's seed plus this (not the window order's stream)
# prompts sampled together: on SmolLM2-135M (2-core EPYC, bfloat16 autocast) 16 give 134 new tokens/s,
# 64 give 211 and 128 give 244; 32 keeps the KV cache of a 512-token window under 1 GB for that model
BATCH = 32


def self_written(teacher: nn.Module, windows: Tensor, config: TrainConfig, acc: Any, workdir: Path | None,
                 resume: bool) -> tuple[Tensor, dict[str, Any]]:  # fmt: skip
    """`windows` with the --self-data share of them continued by the teacher after their first
    --self-data-prompt tokens, and what the record says of it."""
    rows = spread(len(windows), config.self_data)
    saved = workdir / SELF_DATA if workdir is not None else None
    length, prompt = windows.shape[1], config.self_data_prompt
    clock = time.perf_counter()
    if resume and saved is not None and saved.is_file():
        written = torch.load(saved, weights_only=True)
        if written.shape != (len(rows), length) or not torch.equal(written[:, :prompt], windows[rows, :prompt]):
            raise TrainError(f"--resume: {saved} holds other windows than this run's; start again without --resume")
        sampled = False
    else:
        generator = torch.Generator(device=acc.device).manual_seed(config.seed + SEED_OFFSET)
        written = sample_continuations(teacher, windows[rows, :prompt], length, generator, batch=BATCH,
                                       autocast=acc.autocast, device=acc.device)  # fmt: skip
        sampled = True
        if saved is not None and acc.is_main_process:
            save_whole(written, saved)
    seconds = time.perf_counter() - clock
    out = windows.clone()
    out[rows] = written
    new_tokens = len(rows) * (length - prompt)
    record = {"share": config.self_data, "windows": len(rows), "prompt_tokens": prompt, "new_tokens": new_tokens,
              "sampled": sampled, "seconds": seconds,
              "tokens_per_s": new_tokens / seconds if sampled and seconds > 0 else None}  # fmt: skip
    return out, record
