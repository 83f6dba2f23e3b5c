"""A recovery run's moving parts: what `_setup` builds once and the loop's steps read and update, and
the loop's own state that a checkpoint carries across a resume."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from secateur.train.checkpoint import CHECKPOINT
from secateur.train.config import TrainConfig
from secateur.train.gradual import Sparsifier
from secateur.train.masks import MaskHolder, weight_masks
from secateur.train.width import IncrementalWidth


@dataclass
class LoopState:
    """What the loop itself must carry across a resume (saved with the checkpoint)."""

    step: int = 0
    best: float = math.inf
    best_step: int = -1
    since_best: int = 0
    first_loss: float | None = None
    validations: list[dict[str, Any]] = field(default_factory=list)
    lr_choice: dict[str, float] | None = None  # the default peak learning rate chosen at the start (--lr unset)

    def state_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


@dataclass
class TrainResult:
    record: dict[str, Any]
    metrics: Path | None  # the JSONL file of the run, in its work directory


@dataclass
class Run:
    """A recovery run's moving parts, built once by `_setup`; the loop's steps read and update them."""

    config: TrainConfig
    acc: Any  # accelerate.Accelerator
    model: nn.Module  # as `acc.prepare` wrapped it
    raw: nn.Module  # the model itself (validation, slicing, the best weights)
    optimizer: Any
    params: list[nn.Parameter]  # what is trained (clipped); changes when width pruning slices the model
    holder: MaskHolder
    adapter: Any
    windows: Tensor
    validation: Tensor
    steps: int
    warmup: int
    every: int  # optimizer steps between validations
    save_every: int  # optimizer steps between checkpoints
    counts: dict[str, Any]  # what trains (select_trainable's record)
    masks: dict[str, Tensor]  # the zeros kept, as the run started
    precision: str
    home: torch.device  # where the model (and the teacher) go back to
    state: LoopState = field(default_factory=LoopState)
    teacher: nn.Module | None = None
    cache: tuple[Tensor, Tensor] | None = None  # the teacher's top-k logits (--top-k)
    aux_weight: float = 0.0  # a mixture of experts' load-balancing loss, as its family weights it
    routers: list[nn.Module] = field(default_factory=list)  # per-block expert counts: the loss per router
    chunk: int = 0  # positions per chunk of the logit losses (0: the model's own full logits)
    cache_seconds: float = 0.0
    self_data: dict[str, Any] | None = None  # what the teacher wrote (--self-data)
    pruner: Sparsifier | None = None
    widener: IncrementalWidth | None = None
    workdir: Path | None = None
    metrics: Path | None = None  # the main process's metrics file
    validation_domains: list[str] | None = None  # the corpus of each validation window (a mixture)
    lora_merged: bool = False

    @property
    def checkpoint(self) -> Path | None:
        return self.workdir / CHECKPOINT if self.workdir is not None else None

    @property
    def tokens_per_step(self) -> int:
        return self.config.micro_batch * self.config.accumulate * self.acc.num_processes * self.windows.shape[1]


def record_of(run: Run, timing: dict[str, Any]) -> dict[str, Any]:
    """What the manifest records of the run."""
    config, state, pruner, widener = run.config, run.state, run.pruner, run.widener
    kept_after = weight_masks(run.raw, run.adapter) if run.masks else {}
    seconds, overhead, tokens_per_step = timing["seconds"], timing["overhead"], run.tokens_per_step
    return {
        "mode": config.mode, **run.counts, "lora_merged": run.lora_merged,
        "masks": {"layers": len(run.masks), "kept": sum(int(m.sum()) for m in run.masks.values()),
                  "size": sum(m.numel() for m in run.masks.values()),
                  "kept_after": sum(int(m.sum()) for m in kept_after.values())},
        "precision": run.precision, "processes": run.acc.num_processes, "loss_chunk": run.chunk,
        "activation_checkpointing": config.activation_checkpointing,
        "steps": state.step, "total_steps": run.steps, "tokens": state.step * tokens_per_step,
        "schedule": {"peak_lr": config.peak_lr, "warmup_steps": run.warmup, "min_lr": config.min_lr,
                     "global_batch_windows": tokens_per_step // run.windows.shape[1],
                     "window_tokens": run.windows.shape[1]},
        "lr_choice": state.lr_choice,
        "loss": {"first": state.first_loss, "last": timing["last_loss"]},
        "validation": state.validations, "best": {"step": state.best_step, "perplexity": state.best},
        "stopped_early": timing["stopped_early"], "resumed_at": timing["start_step"] if timing["resumed"] else None,
        "seconds": seconds, "validation_seconds": overhead,  # validations and checkpoints
        "tokens_per_s": (state.step - timing["start_step"]) * tokens_per_step / max(seconds - overhead, 1e-9),
        "self_data": run.self_data,
        "teacher_cache": {"top_k": config.top_k, "seconds": run.cache_seconds} if run.cache is not None else None,
        "gradual": ({"score": pruner.score, "pattern": config.prune_pattern, "final": pruner.plan.final,
                     "initial": pruner.plan.initial, "start": pruner.plan.start, "every": pruner.plan.every,
                     "updates": pruner.plan.updates, "events": pruner.events} if pruner is not None else None),
        "width": ({"share": config.prune_width, "importance": widener.width.importance,
                   "allocation": config.width_allocation, "heads": widener.width.heads,
                   "amplitude": widener.amplitude,
                   "bias_compensation": widener.width.compensate, "start": widener.plan.start,
                   "every": widener.plan.every, "updates": widener.plan.updates, "block_parameters_before": widener.original,
                   "events": widener.events} if widener is not None else None),
    }  # fmt: skip
