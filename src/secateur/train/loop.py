"""The recovery loop, on `accelerate`: one process or many (`accelerate launch`: DDP, FSDP) with no
distributed code of our own.

An optimizer step reads one global batch of `micro_batch x accumulate x processes` windows, in an
order fixed by the seed and the step alone (so a resumed run reads what an uninterrupted one would):
each epoch is a seeded permutation of the training windows, cut into global batches; a process reads
its own `micro_batch` rows of each micro-step. The learning rate is set from the step number
(`schedule.lr_factor`), so the schedule has no state of its own. Checkpoints (`save_state`: model,
optimizer, random states, the loop's own state) are written to a temporary directory and renamed into
place; `resume` loads the latest one and goes on from its step.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from secateur.errors import OutputError, SecateurError
from secateur.evaluate import perplexity
from secateur.models import adapter_for
from secateur.output import disk_error
from secateur.config import NM
from secateur.sparsity.prune import target_layers
from secateur.train.config import TrainConfig
from secateur.train.gradual import GradualPlan, GradualPruner
from secateur.train.loss import (kl_distillation, layerwise_distillation, next_token_cross_entropy, top_k,
                                 topk_distillation)
from secateur.train.masks import MaskHolder, weight_masks
from secateur.train.modes import merge_lora, select_trainable
from secateur.train.schedule import lr_factor
from secateur.train.width import STATISTICS_WINDOWS, IncrementalWidth, reshape, shape_record, slice_optimizer

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint"
SHAPE = "shape.json"  # incremental width: the shapes of the checkpoint's weights
METRICS = "metrics.jsonl"
BEST = "best.pt"


class TrainError(SecateurError):
    """Training cannot start as asked (too few windows, a checkpoint in the way, ...)."""


@dataclass
class LoopState:
    """What the loop itself must carry across a resume (saved with the checkpoint)."""

    step: int = 0
    best: float = math.inf
    best_step: int = -1
    since_best: int = 0
    first_loss: float | None = None
    validations: list[dict[str, Any]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


def bf16_native(device: torch.device) -> bool:
    """Whether the device computes bfloat16 natively (CUDA with bf16, CPUs with AVX512-BF16 or AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = torch.cpu
        return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                    or getattr(cpu, "_is_amx_tile_supported", lambda: False)())  # fmt: skip
    return False


def precision_for(config: TrainConfig, device: torch.device) -> str:
    if config.precision != "auto":
        return config.precision
    return "bfloat16" if bf16_native(device) else "float32"


def check_layerwise(teacher: Any, student: Any) -> None:
    """Layer-wise distillation pairs block l of the student with block l of the teacher: both configs
    must have the same number of blocks and hidden size."""
    shapes = [(c.num_hidden_layers, c.hidden_size) for c in (teacher, student)]
    if shapes[0] != shapes[1]:
        raise TrainError(f"--hidden-weight pairs the student's blocks with the teacher's, but the teacher has "
                         f"{shapes[0][0]} blocks of width {shapes[0][1]} and the student {shapes[1][0]} of width "
                         f"{shapes[1][1]} (depth- or hidden-pruned): distil from the logits only (--hidden-weight 0)")


def batch_rows(step: int, micro: int, config: TrainConfig, windows: int, processes: int, rank: int) -> Tensor:
    """Indices of the training windows that process `rank` reads at micro-step `micro` of optimizer
    step `step` (0-based, counted over all epochs)."""
    per_step = config.micro_batch * config.accumulate * processes
    steps_per_epoch = windows // per_step
    epoch, within = divmod(step, steps_per_epoch)
    order = torch.randperm(windows, generator=torch.Generator().manual_seed(config.seed + epoch))
    start = within * per_step + (micro * processes + rank) * config.micro_batch
    return order[start : start + config.micro_batch]


def total_steps(config: TrainConfig, windows: int, processes: int) -> int:
    per_step = config.micro_batch * config.accumulate * processes
    if windows < per_step:
        raise TrainError(f"{windows} training windows do not fill one optimizer step of {per_step} windows "
                         "(--micro-batch x --accumulate x processes): give more --tokens or a smaller batch")
    return config.epochs * (windows // per_step)


def _write_json_line(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _trim_metrics(path: Path, step: int) -> None:
    """Keep the metrics of the steps a resumed run has already done (later lines were lost work)."""
    if path.exists():
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        kept = [line for line in lines if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


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
    cache_seconds: float = 0.0
    pruner: GradualPruner | None = None
    widener: IncrementalWidth | None = None
    workdir: Path | None = None
    metrics: Path | None = None  # the main process's metrics file
    lora_merged: bool = False

    @property
    def checkpoint(self) -> Path | None:
        return self.workdir / CHECKPOINT if self.workdir is not None else None

    @property
    def tokens_per_step(self) -> int:
        return self.config.micro_batch * self.config.accumulate * self.acc.num_processes * self.windows.shape[1]


def train(model: nn.Module, config: TrainConfig, windows: Tensor, validation: Tensor, *,
          teacher: nn.Module | None = None, device: str | torch.device | None = None,
          workdir: str | Path | None = None, resume: bool = False, progress: bool = True) -> TrainResult:  # fmt: skip
    """Train `model` in place on `windows` (n, seq_len) token ids, validating on `validation`, and
    leave it with the best validated weights (LoRA merged). `teacher` gives the distillation targets
    (needed when config.kd_weight > 0). `workdir` holds checkpoints and metrics; with `resume`, the
    run goes on from its latest checkpoint."""
    run = _setup(model, config, windows, validation, teacher, device, workdir, resume)
    state = run.state
    bar = tqdm(total=run.steps, initial=state.step, desc="recovery", unit="step",
               disable=not (progress and run.acc.is_main_process))  # fmt: skip
    start_step, stopped_early, last_loss, best, overhead = state.step, False, None, None, 0.0
    clock = time.perf_counter()
    while state.step < run.steps:
        parts = _step(run)
        overhead += _prune_during(run)
        run.holder.weights()
        last_loss = run.acc.gather(torch.tensor([parts["loss"]], device=run.acc.device)).mean().item()
        if state.first_loss is None:
            state.first_loss = last_loss
        speed = (state.step - start_step) * run.tokens_per_step / max(time.perf_counter() - clock - overhead, 1e-9)
        record = _step_record(run, parts, last_loss, speed)  # training steps only in the speed
        bar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{speed:.0f}")
        bar.update(1)
        pause = time.perf_counter()
        if state.step % run.every == 0 or state.step == run.steps:
            best = _validate(run, record, best)
            stopped_early = bool(config.patience) and state.since_best >= config.patience and state.step < run.steps
        if run.metrics is not None:
            _write_json_line(run.metrics, record)
        if run.checkpoint is not None and (state.step % run.save_every == 0 or stopped_early) and state.step < run.steps:
            shape = shape_record(run.raw, run.adapter) if run.widener is not None else None
            _save_checkpoint(run.acc, run.checkpoint, shape)
        overhead += time.perf_counter() - pause
        if stopped_early:
            log.warning("recovery: no improvement in %d validations: stopped at step %d of %d", config.patience,
                        state.step, run.steps)  # fmt: skip
            break
    bar.close()
    seconds = time.perf_counter() - clock
    _finish(run, best)
    timing = {"start_step": start_step, "seconds": seconds, "overhead": overhead, "stopped_early": stopped_early,
              "last_loss": last_loss, "resumed": resume}  # fmt: skip
    result = TrainResult(_record(run, timing), run.workdir / METRICS if run.workdir is not None else None)
    if run.pruner is not None:
        run.pruner.close()
    _reset_accelerator()
    return result


def _reset_accelerator() -> None:
    """Forget accelerate's global state: a new run may use another precision (keeps the process group)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()


def _setup(model: nn.Module, config: TrainConfig, windows: Tensor, validation: Tensor, teacher: nn.Module | None,
           device: str | torch.device | None, workdir: str | Path | None, resume: bool) -> Run:  # fmt: skip
    """Check the run, build the accelerator, the trainable parameters, masks, pruners and optimizer,
    and load the checkpoint when resuming."""
    from accelerate import Accelerator

    if config.needs_teacher and teacher is None:
        raise TrainError("distillation needs a teacher (or --kd-weight 0 for plain fine-tuning)")
    if config.hidden_weight > 0:
        check_layerwise(teacher.config, model.config)
    workdir = Path(workdir) if workdir is not None else None
    checkpoint = workdir / CHECKPOINT if workdir is not None else None
    if resume and (checkpoint is None or not checkpoint.is_dir()):
        raise TrainError(f"--resume: no checkpoint to resume from{f' in {workdir}' if workdir else ''}")
    wanted = torch.device(device) if device is not None else None
    precision = precision_for(config, wanted or torch.device("cpu"))
    _reset_accelerator()
    on_cpu = wanted.type == "cpu" if wanted is not None else not torch.cuda.is_available()
    acc = Accelerator(gradient_accumulation_steps=config.accumulate, cpu=on_cpu,  # cpu: gloo under torchrun
                      mixed_precision="bf16" if precision == "bfloat16" else "no")  # fmt: skip
    steps = total_steps(config, len(windows), acc.num_processes)
    every = config.eval_every or max(1, steps // 8)
    adapter = adapter_for(model)
    if config.prune_width is not None and acc.num_processes > 1:
        raise TrainError("incremental width pruning changes parameter shapes during training, which DDP and FSDP "
                         "wrappers cannot follow: run it in one process (or prune width before a recovery stage)")
    # built on the input's shapes, resumed or not
    widener = (IncrementalWidth.build(model, adapter, _plan(config, steps, 0.0, config.prune_width),
                                      config.width_config(), config.adapt_amplitude)
               if config.prune_width is not None else None)  # fmt: skip
    if resume and widener is not None and (checkpoint / SHAPE).exists():
        reshape(model, adapter, json.loads((checkpoint / SHAPE).read_text(encoding="utf-8")))
    home = next(model.parameters()).device
    masks = weight_masks(model, adapter) if config.keep_masks or config.gradual else {}
    counts = select_trainable(model, adapter, config.mode, config.rank, config.alpha, masks, config.seed)
    pruner = _gradual(model, adapter, config, steps) if config.gradual else None
    if pruner is not None:  # every target layer is masked from the start
        masks = {name: module.weight != 0 for name, module in pruner.layers}
    holder = MaskHolder(model, masks if config.mode == "full" else {})  # adapters mask their own delta
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.peak_lr, weight_decay=config.weight_decay)
    model.train()
    model, optimizer = acc.prepare(model, optimizer)
    run = Run(config, acc, model, acc.unwrap_model(model), optimizer, params, holder, adapter, windows, validation,
              steps, int(config.warmup * steps), every, config.checkpoint_every or every, counts, masks, precision,
              home, pruner=pruner, widener=widener, workdir=workdir,
              metrics=workdir / METRICS if workdir is not None and acc.is_main_process else None)  # fmt: skip
    for stateful in (run.state, pruner, widener):
        if stateful is not None:
            acc.register_for_checkpointing(stateful)
    if teacher is not None and config.needs_teacher:
        run.teacher = teacher.to(acc.device).eval().requires_grad_(False)
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    if resume:
        _resume(run)
    elif run.metrics is not None and run.metrics.exists():
        run.metrics.unlink()
    clock = time.perf_counter()
    if config.top_k and config.needs_teacher:
        run.cache = _teacher_cache(run.teacher, windows, config, acc)
    run.cache_seconds = time.perf_counter() - clock
    return run


def _resume(run: Run) -> None:
    """Load the checkpoint, then the masks it implies, and keep the metrics of the steps it holds."""
    run.acc.load_state(str(run.checkpoint))
    if run.pruner is not None:  # the masks of the updates done before the checkpoint
        run.holder.replace({name: module.weight != 0 for name, module in run.pruner.layers})
    elif run.widener is not None and run.holder.masks:  # the zeros of the sliced weights just loaded
        run.holder.replace(weight_masks(run.acc.unwrap_model(run.model), run.adapter))
    run.holder.weights()
    if run.metrics is not None:
        _trim_metrics(run.metrics, run.state.step)


def _step(run: Run) -> dict[str, float]:
    """One optimizer step over `accumulate` micro-batches; returns the loss and its parts (means)."""
    config, acc, state = run.config, run.acc, run.state
    for group in run.optimizer.param_groups:
        group["lr"] = config.peak_lr * lr_factor(state.step, run.steps, run.warmup, config.min_lr)
    parts = {"loss": 0.0, "kd": 0.0, "ce": 0.0, "layers": 0.0}
    for micro in range(config.accumulate):
        rows = batch_rows(state.step, micro, config, len(run.windows), acc.num_processes, acc.process_index)
        ids = run.windows[rows].to(acc.device)
        with acc.accumulate(run.model):
            with acc.autocast():
                out = run.model(input_ids=ids, output_hidden_states=config.hidden_weight > 0)
                loss, kd, ce, layers = _loss(out, ids, rows, config, run.teacher, run.cache)
            acc.backward(loss)
            if acc.sync_gradients:
                if run.pruner is not None:
                    run.pruner.accumulate_gradients()
                run.holder.gradients()
                if config.clip:
                    acc.clip_grad_norm_(run.params, config.clip)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
        for name, value in (("loss", float(loss.detach())), ("kd", kd), ("ce", ce), ("layers", layers)):
            parts[name] += value / config.accumulate
    state.step += 1
    return parts


def _prune_during(run: Run) -> float:
    """The pruning updates due after this step (gradual zeros, incremental width); returns the seconds
    the width update took (not training time)."""
    step, pruner, widener = run.state.step, run.pruner, run.widener
    if pruner is not None and pruner.plan.due(step):
        own = pruner.norms
        if pruner.score == "wanda":  # every process saw other tokens: rank on the norms of all of them
            pruner.norms = {k: run.acc.reduce(v.clone(), "sum") for k, v in own.items()}
        run.holder.replace(pruner.update(step, run.holder.masks))
        pruner.norms = own
        run.holder.clear_moments(run.optimizer.optimizer if hasattr(run.optimizer, "optimizer") else run.optimizer)
    if widener is None or not widener.plan.due(step):
        return 0.0
    pause = time.perf_counter()
    run.params = _prune_width(widener, run.raw, run.adapter, step, run.windows, run.config, run.acc, run.optimizer,
                              run.holder)  # fmt: skip
    return time.perf_counter() - pause


def _step_record(run: Run, parts: dict[str, float], loss: float, speed: float) -> dict[str, Any]:
    record = {"step": run.state.step, "tokens": run.state.step * run.tokens_per_step, "loss": loss,
              "kd": parts["kd"], "ce": parts["ce"], "lr": run.optimizer.param_groups[0]["lr"], "tokens_per_s": speed}
    if run.config.hidden_weight:
        record["layerwise"] = parts["layers"]
    return record


def _validate(run: Run, record: dict[str, Any], best: dict[str, Tensor] | None) -> dict[str, Tensor] | None:
    """Validation perplexity into `record` and the history; a new best (once pruning is over) is kept
    in memory and in the work directory. Returns the best trainable weights so far."""
    state = run.state
    ppl = perplexity(run.raw.eval(), run.validation, batch_size=run.config.micro_batch,
                     device=run.acc.device)["perplexity"]  # fmt: skip
    run.raw.train()
    record["val_perplexity"] = ppl
    state.validations.append({"step": state.step, "tokens": record["tokens"], "perplexity": ppl})
    final = all(p is None or state.step >= p.plan.end for p in (run.pruner, run.widener))  # less pruned: no candidate
    if final and ppl < state.best:
        state.best, state.best_step, state.since_best = ppl, state.step, 0
        best = _trainable(run.raw)
        if run.workdir is not None and run.acc.is_main_process:
            _save_best(best, run.workdir / BEST)
    elif final:
        state.since_best += 1
    return best


def _finish(run: Run, best: dict[str, Tensor] | None) -> None:
    """Back to the best validated weights, LoRA merged, model and teacher where they came from."""
    run.acc.wait_for_everyone()
    model = run.acc.unwrap_model(run.model)
    if run.state.best_step != run.state.step:  # the last step did not validate best: go back to the best
        if best is None and run.workdir is not None and (run.workdir / BEST).exists():  # best from before a resume
            best = torch.load(run.workdir / BEST, map_location="cpu", weights_only=True)
        if best is not None:
            _load_trainable(model, best)
    model.eval()
    run.lora_merged = merge_lora(model)
    model.to(run.home)
    if run.teacher is not None:
        run.teacher.to(run.home)
    run.raw = model


def _record(run: Run, timing: dict[str, Any]) -> dict[str, Any]:
    """What the manifest records of the run."""
    config, state, pruner, widener = run.config, run.state, run.pruner, run.widener
    kept_after = weight_masks(run.raw, run.adapter) if run.masks else {}
    seconds, overhead, tokens_per_step = timing["seconds"], timing["overhead"], run.tokens_per_step
    return {
        "mode": config.mode, **run.counts, "lora_merged": run.lora_merged,
        "masks": {"layers": len(run.masks), "kept": sum(int(m.sum()) for m in run.masks.values()),
                  "size": sum(m.numel() for m in run.masks.values()),
                  "kept_after": sum(int(m.sum()) for m in kept_after.values())},
        "precision": run.precision, "processes": run.acc.num_processes,
        "steps": state.step, "total_steps": run.steps, "tokens": state.step * tokens_per_step,
        "schedule": {"peak_lr": config.peak_lr, "warmup_steps": run.warmup, "min_lr": config.min_lr,
                     "global_batch_windows": tokens_per_step // run.windows.shape[1],
                     "window_tokens": run.windows.shape[1]},
        "loss": {"first": state.first_loss, "last": timing["last_loss"]},
        "validation": state.validations, "best": {"step": state.best_step, "perplexity": state.best},
        "stopped_early": timing["stopped_early"], "resumed_at": timing["start_step"] if timing["resumed"] else None,
        "seconds": seconds, "validation_seconds": overhead,  # validations and checkpoints
        "tokens_per_s": (state.step - timing["start_step"]) * tokens_per_step / max(seconds - overhead, 1e-9),
        "teacher_cache": {"top_k": config.top_k, "seconds": run.cache_seconds} if run.cache is not None else None,
        "gradual": ({"score": pruner.score, "pattern": config.prune_pattern, "final": pruner.plan.final,
                     "initial": pruner.plan.initial, "start": pruner.plan.start, "every": pruner.plan.every,
                     "updates": pruner.plan.updates, "events": pruner.events} if pruner is not None else None),
        "width": ({"share": config.prune_width, "importance": widener.width.importance,
                   "allocation": config.width_allocation or widener.width.allocation, "heads": widener.width.heads,
                   "amplitude": widener.amplitude,
                   "bias_compensation": widener.width.compensate, "start": widener.plan.start,
                   "every": widener.plan.every, "updates": widener.plan.updates, "block_parameters_before": widener.original,
                   "events": widener.events} if widener is not None else None),
    }  # fmt: skip


def _plan(config: TrainConfig, steps: int, initial: float, final: float, pattern: NM | None = None) -> GradualPlan:
    """When pruning during training updates (`--prune-start`, `--prune-end`, `--prune-every`) over `steps`."""
    start = int(config.start_fraction * steps)
    end = max(start + 1, int(round(config.end_fraction * steps)))
    every = config.prune_every or max(1, (end - start) // 10)
    updates = max(1, (end - start) // every)
    if start + updates * every > steps:
        raise TrainError(f"the last pruning update (step {start + updates * every}) comes after the run's {steps} "
                         "steps: lower --prune-every or --prune-end, or train longer")
    return GradualPlan(initial, final, start, every, updates, pattern)


def _gradual(model: nn.Module, adapter: Any, config: TrainConfig, steps: int) -> GradualPruner:
    """The pruner of every target layer, with the plan of `config` over `steps` optimizer steps."""
    layers = [(f"{name}.weight", module) for name, module in target_layers(model, adapter)]
    zeros = sum(int((m.weight == 0).sum()) for _, m in layers)
    initial = zeros / max(sum(m.weight.numel() for _, m in layers), 1)
    pattern = NM.parse(config.prune_pattern) if config.prune_pattern else None
    final = 1 - pattern.n / pattern.m if pattern else config.prune_to
    if final <= initial:
        raise TrainError(f"gradual pruning to {final:.3f} from a model already at {initial:.3f} sparsity")
    return GradualPruner(layers, _plan(config, steps, initial, final, pattern), config.prune_score or "magnitude")


def _prune_width(widener: IncrementalWidth, model: nn.Module, adapter: Any, step: int, windows: Tensor,
                 config: TrainConfig, acc: Any, optimizer: Any, holder: MaskHolder) -> list[nn.Parameter]:  # fmt: skip
    """One incremental width update: slice the model, then the optimizer's moments and the masks with
    it. Returns the trainable parameters (for clipping)."""
    names = {p: n for n, p in model.named_parameters()}
    sliced: dict[nn.Parameter, tuple[nn.Parameter, Any]] = {}

    def on_slice(old: nn.Parameter, new: nn.Parameter, take: Any) -> None:
        sliced[old] = (new, take)

    chosen = torch.randperm(len(windows), generator=torch.Generator().manual_seed(config.seed + 1 + step))
    statistics = windows[chosen[:STATISTICS_WINDOWS]]
    event = widener.update(model, adapter, step, statistics, acc.device, config.micro_batch, on_slice)
    inner = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
    slice_optimizer(inner, model, sliced)
    masks = dict(holder.masks)
    for old, (_, take) in sliced.items():
        name = names.get(old)
        if name in masks:
            masks[name] = take(masks[name])
    holder.rebind(model, masks)
    log.info("width: step %d, %.1f%% of the block parameters removed", step, 100 * event["removed"])
    return [p for p in model.parameters() if p.requires_grad]


def _loss(out: Any, ids: Tensor, rows: Tensor, config: TrainConfig, teacher: nn.Module | None,
          cache: tuple[Tensor, Tensor] | None) -> tuple[Tensor, float, float, float]:  # fmt: skip
    """(loss, its distillation, cross-entropy and layer-wise parts) of one micro-batch, from the
    student's outputs `out` (with hidden states when config.hidden_weight > 0)."""
    logits = out.logits
    kd = ce = layers = target = None
    if teacher is not None and cache is None and config.needs_teacher:
        with torch.no_grad():
            target = teacher(input_ids=ids, output_hidden_states=config.hidden_weight > 0)
    if config.kd_weight > 0:
        if cache is not None:
            values, indices = cache[0][rows].to(ids.device), cache[1][rows].to(ids.device)
            kd = topk_distillation(logits, values, indices, config.temperature)
        else:
            kd = kl_distillation(logits, target.logits, config.temperature)
    if config.kd_weight < 1:
        ce = next_token_cross_entropy(logits, ids)
    if config.hidden_weight > 0:  # block outputs: hidden_states[0] is the embeddings
        layers = layerwise_distillation(out.hidden_states[1:], target.hidden_states[1:], config.layerwise_norm)
    loss = sum(w * part for w, part in ((config.kd_weight, kd), (1 - config.kd_weight, ce),
                                        (config.hidden_weight, layers)) if part is not None)  # fmt: skip
    return loss, *(float(p.detach()) if p is not None else 0.0 for p in (kd, ce, layers))


@torch.no_grad()
def _teacher_cache(teacher: nn.Module, windows: Tensor, config: TrainConfig, acc: Any) -> tuple[Tensor, Tensor]:
    """The teacher's top-k logits of every training window, once (float16 values, int32 indices)."""
    values, indices = [], []
    for start in tqdm(range(0, len(windows), config.micro_batch), desc="teacher top-k", unit="batch",
                      disable=not acc.is_main_process):  # fmt: skip
        with acc.autocast():
            logits = teacher(input_ids=windows[start : start + config.micro_batch].to(acc.device)).logits
        v, i = top_k(logits, config.top_k)
        values.append(v.cpu())
        indices.append(i.cpu())
    return torch.cat(values), torch.cat(indices)


def _save_checkpoint(acc: Any, checkpoint: Path, shape: dict[str, Any] | None = None) -> None:
    staging = checkpoint.with_name(checkpoint.name + ".partial")
    if acc.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    acc.wait_for_everyone()
    try:
        acc.save_state(str(staging), safe_serialization=False)
    except (OSError, RuntimeError) as exc:  # torch's writer says only "file write failed"
        shutil.rmtree(staging, ignore_errors=True)
        free = shutil.disk_usage(checkpoint.parent).free
        if disk_error(exc, staging) is None and "write failed" not in str(exc):
            raise
        raise OutputError(f"could not write a checkpoint in {checkpoint.parent} ({free / 2**20:.0f} MiB free): "
                          f"{str(exc).splitlines()[-1][:120]}; free some space, then rerun with --resume (the last "
                          "complete checkpoint is kept)") from None
    acc.wait_for_everyone()
    if acc.is_main_process:
        if shape is not None:
            (staging / SHAPE).write_text(json.dumps(shape), encoding="utf-8")
        old = checkpoint.with_name(checkpoint.name + ".old")
        if checkpoint.exists():
            checkpoint.rename(old)
        staging.rename(checkpoint)
        shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()


def _trainable(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def _save_best(best: dict[str, Tensor], path: Path) -> None:
    staging = path.with_name(path.name + ".partial")
    torch.save(best, staging)
    staging.replace(path)


def _load_trainable(model: nn.Module, values: dict[str, Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in values.items():
            params[name].copy_(value)
