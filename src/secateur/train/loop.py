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

import dataclasses
import json
import logging
import math
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from secateur.evaluate import perplexity
from secateur.models.head import chunk_positions, hidden_out, splittable
from secateur.models import adapter_for
from secateur.train.checkpoint import (BEST, CHECKPOINT, METRICS, SHAPE, load_trainable, save_checkpoint,
                                       trainable, trim_metrics, write_json_line)
from secateur.errors import TrainError
from secateur.output import save_whole
from secateur.train.config import TrainConfig, precision_for
from secateur.train.gradual import gradual_pruning, plan_for
from secateur.train.masks import MaskHolder, weight_masks
from secateur.train.modes import merge_lora, select_trainable
from secateur.train.loss import load_balance
from secateur.train.objective import (check_layerwise, router_logits, router_weight, step_loss, teacher_cache,
                                      uneven_routers)
from secateur.train.run import Run, TrainResult, record_of
from secateur.train.schedule import batch_rows, lr_factor, peak_lr_for, total_steps
from secateur.train.selfdata import self_written
from secateur.train.width import IncrementalWidth, prune_width_step, reshape, shape_record

log = logging.getLogger(__name__)










def adamw(params: list[Tensor], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW, fused where torch has the kernel for every parameter's device (CPU, CUDA): one pass per
    step instead of the multi-tensor implementation's several (on SmolLM2 width 50%, 2-core EPYC:
    185-205 tokens/s in six runs against 174-186 in two; the peak RSS within the runs' spread; the
    demo's width 20% recovery was slower in one run each: docs/benchmarks.md)."""
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def train(model: nn.Module, config: TrainConfig, windows: Tensor, validation: Tensor, *,
          teacher: nn.Module | None = None, device: str | torch.device | None = None,
          workdir: str | Path | None = None, resume: bool = False, progress: bool = True,
          validation_domains: list[str] | None = None) -> TrainResult:  # fmt: skip
    """Train `model` in place on `windows` (n, seq_len) token ids, validating on `validation`, and
    leave it with the best validated weights (LoRA merged). `teacher` gives the distillation targets
    (needed when config.kd_weight > 0). `workdir` holds checkpoints and metrics; with `resume`, the
    run goes on from its latest checkpoint. `validation_domains` names the corpus of each validation
    window (a mixture): every validation then records each corpus's perplexity too."""
    if validation_domains is not None and len(validation_domains) != len(validation):
        raise TrainError(f"{len(validation_domains)} domain names for {len(validation)} validation windows")
    config = family_lr(model, config)
    run = _setup(model, config, windows, validation, teacher, device, workdir, resume)
    run.validation_domains = list(validation_domains) if validation_domains is not None else None
    state = run.state
    bar = tqdm(total=run.steps, initial=state.step, desc="recovery", unit="step",
               disable=not (progress and run.acc.is_main_process))  # fmt: skip
    start_step, stopped_early, last_loss, best, overhead = state.step, False, None, None, 0.0
    if state.step == 0 and run.pruner is None and run.widener is None:  # the input is the first candidate
        best = _validate(run, {"step": 0, "tokens": 0}, best)
    run.config = config = distance_lr(run)
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
            write_json_line(run.metrics, record)
        if run.checkpoint is not None and (state.step % run.save_every == 0 or stopped_early) and state.step < run.steps:
            shape = shape_record(run.raw, run.adapter) if run.widener is not None else None
            save_checkpoint(run.acc, run.checkpoint, shape)
        overhead += time.perf_counter() - pause
        if stopped_early:
            log.warning("recovery: no improvement in %d validations: stopped at step %d of %d", config.patience,
                        state.step, run.steps)  # fmt: skip
            break
    bar.close()
    seconds = time.perf_counter() - clock
    if state.best_step == 0 and state.step > 0:
        trained = min(v["perplexity"] for v in state.validations if v["step"] > 0)
        log.warning("recovery: no validated step beat the input (validation perplexity %.4g before training, %.4g at "
                    "best after): the output is the input's weights; a lower --lr (or fewer trainable weights: "
                    "--lora) usually trains", state.best, trained)  # fmt: skip
    _finish(run, best)
    timing = {"start_step": start_step, "seconds": seconds, "overhead": overhead, "stopped_early": stopped_early,
              "last_loss": last_loss, "resumed": resume}  # fmt: skip
    result = TrainResult(record_of(run, timing), run.workdir / METRICS if run.workdir is not None else None)
    if run.pruner is not None:
        run.pruner.close()
    _reset_accelerator()
    return result


def family_lr(model: nn.Module, config: TrainConfig) -> TrainConfig:
    """The config with the family's full fine-tuning learning rate where --lr is left to its default and
    the mode's default is measured to diverge on the family (said)."""
    family = adapter_for(model)
    if config.lr is not None or config.mode != "full" or family.full_lr is None:
        return config
    log.warning("recovery: %s fine-tunes in full at a peak learning rate of %g by default (the mode's %g diverges on "
                "it, measured); --lr sets another", family.family, family.full_lr, config.peak_lr)  # fmt: skip
    return dataclasses.replace(config, lr=family.full_lr)


def distance_lr(run: Run) -> TrainConfig:
    """The run's config with full fine-tuning's peak learning rate chosen by how far the start is from
    its teacher (`schedule.peak_lr_for`), where --lr is left to its default and the start is what
    trains (no pruning during training): the teacher's validation perplexity beside the start's
    (validated before the first step), the choice kept in the loop's state, so a resumed run goes on
    at the rate it started with."""
    config, state = run.config, run.state
    if config.lr is not None or config.mode != "full" or run.teacher is None or run.pruner or run.widener:
        return config
    if not hasattr(run.teacher, "get_output_embeddings"):  # a teacher seen through a pruned vocabulary: not scored
        return config
    if state.lr_choice is None:
        if state.step > 0:  # a checkpoint from before the choice: it ran at the mode's default
            return config
        with run.acc.autocast():  # the teacher as it runs in training (held for bfloat16 autocast or not)
            teacher = _validation_perplexity(run, run.teacher)[0]
        student = state.validations[0]["perplexity"]
        gap = math.log(student) - math.log(teacher)
        state.lr_choice = {"teacher_perplexity": teacher, "start_perplexity": student, "gap": gap,
                           "peak_lr": peak_lr_for(gap)}  # fmt: skip
        log.warning("recovery: the start's validation perplexity is %.4g against the teacher's %.4g (%.2f nats per "
                    "token): peak learning rate %g (--lr sets another)", student, teacher, gap,
                    state.lr_choice["peak_lr"])  # fmt: skip
    return dataclasses.replace(config, lr=state.lr_choice["peak_lr"])


def _reset_accelerator() -> None:
    """Forget accelerate's global state: a new run may use another precision (keeps the process group)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()


def _setup(model: nn.Module, config: TrainConfig, windows: Tensor, validation: Tensor, teacher: nn.Module | None,
           device: str | torch.device | None, workdir: str | Path | None, resume: bool) -> Run:  # fmt: skip
    """Check the run, build the accelerator, the trainable parameters, masks, pruners and optimizer,
    and load the checkpoint when resuming."""
    if config.needs_teacher and teacher is None:
        raise TrainError("distillation needs a teacher (or --kd-weight 0 for plain fine-tuning)")
    if config.hidden_weight > 0:
        check_layerwise(teacher.config, model.config)
    workdir = Path(workdir) if workdir is not None else None
    checkpoint = workdir / CHECKPOINT if workdir is not None else None
    if resume and (checkpoint is None or not checkpoint.is_dir()):
        raise TrainError(f"--resume: no checkpoint to resume from{f' in {workdir}' if workdir else ''}")
    acc, precision = _accelerator(config, device)
    steps = total_steps(config, len(windows), acc.num_processes)
    every = config.eval_every or max(1, steps // 8)
    adapter = adapter_for(model)
    if config.prune_width is not None and acc.num_processes > 1:
        raise TrainError("incremental width pruning changes parameter shapes during training, which DDP and FSDP "
                         "wrappers cannot follow: run it in one process (or prune width before a recovery stage)")
    # built on the input's shapes, resumed or not
    widener = (IncrementalWidth.build(model, adapter, plan_for(steps, config.prune_start, config.prune_end,
                                                               config.prune_every, 0.0, config.prune_width),
                                      config.width_config(), config.adapt_amplitude)
               if config.prune_width is not None else None)  # fmt: skip
    if resume and widener is not None and (checkpoint / SHAPE).exists():
        reshape(model, adapter, json.loads((checkpoint / SHAPE).read_text(encoding="utf-8")))
    home = next(model.parameters()).device
    masks = weight_masks(model, adapter) if config.keep_masks or config.gradual else {}
    counts = select_trainable(model, adapter, config.mode, config.lora_rank, config.lora_alpha, masks, config.seed)
    pruner = gradual_pruning(model, adapter, config, steps) if config.gradual else None
    if pruner is not None:  # every target layer is masked from the start
        masks = {name: module.weight != 0 for name, module in pruner.layers}
    holder = MaskHolder(model, masks if config.mode == "full" else {})  # adapters mask their own delta
    if config.activation_checkpointing:
        _checkpoint_activations(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, config.peak_lr, config.weight_decay)
    model.train()
    model, optimizer = acc.prepare(model, optimizer)
    run = Run(config, acc, model, acc.unwrap_model(model), optimizer, params, holder, adapter, windows, validation,
              steps, int(config.warmup * steps), every, config.checkpoint_every or every, counts, masks, precision,
              home, pruner=pruner, widener=widener, workdir=workdir,
              aux_weight=router_weight(acc.unwrap_model(model), adapter),
              routers=uneven_routers(acc.unwrap_model(model), adapter),
              chunk=_loss_chunk(config, acc, model, teacher if config.needs_teacher else None),
              metrics=workdir / METRICS if workdir is not None and acc.is_main_process else None)  # fmt: skip
    for stateful in (run.state, pruner, widener):
        if stateful is not None:
            acc.register_for_checkpointing(stateful)
    _start(run, teacher, resume)
    return run


def _loss_chunk(config: TrainConfig, acc: Any, model: nn.Module, teacher: nn.Module | None) -> int:
    """Positions per chunk of the logit losses: the config's, else the default; none under FSDP, whose
    sharded head cannot be read outside the model's forward, nor for a head that is not a plain linear
    layer."""
    from accelerate.utils import DistributedType

    raw = acc.unwrap_model(model)
    why = None
    if acc.distributed_type == DistributedType.FSDP:
        why = "FSDP shards the output head, which the chunks read outside the model's forward"
    elif not splittable(raw) or (teacher is not None and not splittable(teacher)):
        who = "student" if not splittable(raw) else "teacher"
        why = f"the {who}'s output head is not a linear layer with its own weights"
    if why is not None:
        if config.loss_chunk:
            raise TrainError(f"--loss-chunk: {why}; give --loss-chunk 0")
        return 0
    return chunk_positions(raw) if config.loss_chunk is None else config.loss_chunk


def _checkpoint_activations(model: nn.Module) -> None:
    """Recompute each block in the backward pass (transformers' own, non-reentrant checkpointing)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise TrainError(f"{type(model).__name__} does not support activation checkpointing: drop "
                         f"--activation-checkpointing")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def _accelerator(config: TrainConfig, device: str | torch.device | None) -> tuple[Any, str]:
    """The accelerator of the run (CPU, one GPU, or each process of `accelerate launch`) and its precision."""
    from accelerate import Accelerator

    wanted = torch.device(device) if device is not None else None
    precision = precision_for(config, wanted or torch.device("cpu"))
    _reset_accelerator()
    on_cpu = wanted.type == "cpu" if wanted is not None else not torch.cuda.is_available()
    acc = Accelerator(gradient_accumulation_steps=config.accumulate, cpu=on_cpu,  # cpu: gloo under torchrun
                      mixed_precision="bf16" if precision == "bfloat16" else "no")  # fmt: skip
    return acc, precision


def _start(run: Run, teacher: nn.Module | None, resume: bool) -> None:
    """The teacher on the device, the work directory, the checkpoint when resuming (else a fresh
    metrics file), and the teacher's top-k cache."""
    config = run.config
    if teacher is not None and config.needs_teacher:
        run.teacher = teacher.to(run.acc.device).eval().requires_grad_(False)
    if run.workdir is not None:
        run.workdir.mkdir(parents=True, exist_ok=True)
    if config.self_data:  # before the top-k cache, which is of the windows trained on
        run.windows, run.self_data = self_written(run.teacher, run.windows, config, run.acc, run.workdir, resume)
    if resume:
        _resume(run)
    elif run.metrics is not None and run.metrics.exists():
        run.metrics.unlink()
    clock = time.perf_counter()
    if config.top_k and config.needs_teacher:
        run.cache = teacher_cache(run.teacher, run.windows, config, run.acc, run.chunk)
    run.cache_seconds = time.perf_counter() - clock


def _resume(run: Run) -> None:
    """Load the checkpoint, then the masks it implies, and keep the metrics of the steps it holds."""
    run.acc.load_state(str(run.checkpoint))
    if run.pruner is not None:  # the masks of the updates done before the checkpoint
        run.holder.replace({name: module.weight != 0 for name, module in run.pruner.layers})
    elif run.widener is not None and run.holder.masks:  # the zeros of the sliced weights just loaded
        run.holder.replace(weight_masks(run.acc.unwrap_model(run.model), run.adapter))
    run.holder.weights()
    if run.metrics is not None:
        trim_metrics(run.metrics, run.state.step)


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
                # MoE: the family's load-balancing loss, or one per router where blocks hold different counts
                routers = run.routers if run.aux_weight else []
                router = {"output_router_logits": True} if run.aux_weight and not routers else {}
                with hidden_out(run.raw) if run.chunk else nullcontext() as head, router_logits(routers) as logits:
                    out = run.model(input_ids=ids, output_hidden_states=config.hidden_weight > 0, **router)
                aux = load_balance(logits, getattr(run.raw.config, run.adapter.experts.top_k_key)) if logits else None
                loss, kd, ce, layers = step_loss(out, ids, rows, config, run.teacher, run.cache, run.aux_weight,
                                                 head, run.chunk, aux)  # fmt: skip
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
        # every process saw other tokens: input statistics are summed over them for the ranking
        run.holder.replace(pruner.update(step, run.holder.masks, reduce=lambda t: run.acc.reduce(t, "sum")))
        run.holder.clear_moments(run.optimizer.optimizer if hasattr(run.optimizer, "optimizer") else run.optimizer)
    if widener is None or not widener.plan.due(step):
        return 0.0
    pause = time.perf_counter()
    run.params = prune_width_step(widener, run.raw, run.adapter, step, run.windows, run.config, run.acc, run.optimizer,
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
    in the work directory (the process that writes it) or else in memory. Returns the best trainable
    weights held in memory (None: in the work directory, or none yet)."""
    state = run.state
    ppl, domains = _validation_perplexity(run)
    run.raw.train()
    record["val_perplexity"] = ppl
    state.validations.append({"step": state.step, "tokens": record["tokens"], "perplexity": ppl})
    if domains:
        record["val_domains"] = state.validations[-1]["domains"] = domains
    final = all(p is None or state.step >= p.plan.end for p in (run.pruner, run.widener))  # less pruned: no candidate
    if final and ppl < state.best:
        state.best, state.best_step, state.since_best = ppl, state.step, 0
        if run.workdir is not None and run.acc.is_main_process:  # not held beside the model: read back at the end
            save_whole(trainable(run.raw, copy=False), run.workdir / BEST)
            best = None
        else:
            best = trainable(run.raw)
    elif final:
        state.since_best += 1
    return best


def _validation_perplexity(run: Run, model: nn.Module | None = None) -> tuple[float, dict[str, float]]:
    """Perplexity of the model trained (or `model`) over all validation windows and, when they come
    from several corpora, each corpus's (one pass over the windows either way)."""
    score = partial(perplexity, (model or run.raw).eval(), batch_size=run.config.micro_batch, device=run.acc.device)
    if not run.validation_domains:
        return score(run.validation)["perplexity"], {}
    names = list(dict.fromkeys(run.validation_domains))
    parts = {name: score(run.validation[[i for i, d in enumerate(run.validation_domains) if d == name]])
             for name in names}  # fmt: skip
    tokens = sum(p["predicted_tokens"] for p in parts.values())
    overall = math.exp(sum(p["mean_nll"] * p["predicted_tokens"] for p in parts.values()) / tokens)
    return overall, {name: p["perplexity"] for name, p in parts.items()}


def _finish(run: Run, best: dict[str, Tensor] | None) -> None:
    """Back to the best validated weights, LoRA merged, model and teacher where they came from."""
    run.acc.wait_for_everyone()
    model = run.acc.unwrap_model(run.model)
    if run.state.best_step != run.state.step:  # the last step did not validate best: go back to the best
        if best is None and run.workdir is not None and (run.workdir / BEST).exists():  # kept in the work directory
            best = torch.load(run.workdir / BEST, map_location="cpu", weights_only=True)
        if best is not None:
            load_trainable(model, best)
    model.eval()
    if run.config.activation_checkpointing:
        model.activation_checkpointing_disable()
    run.lora_merged = merge_lora(model)
    model.to(run.home)
    if run.teacher is not None:
        run.teacher.to(run.home)
    run.raw = model

