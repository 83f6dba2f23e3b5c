"""The recovery stage kind: training after pruning (and pruning during training)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn

from secateur.config import CalibConfig
from secateur.errors import ConfigError
from secateur.recipe import Section, StageContext, StageKind, register
from secateur.schema import fill, flatten, options_of
from secateur.io import content_hash
from secateur.train import TrainConfig, train
from secateur.train.config import precision_for
from secateur.train.objective import check_layerwise
from secateur.train.plot import plot_metrics


# recovery's default text: the offline mixture of encyclopedic, discussion, code and documentation
# text. On SmolLM2-135M width 20% (131,072 tokens, docs/benchmarks.md) it lowered the log-perplexity
# of the two corpora in no training set by 0.871 on average against 0.735 for the enwiki sample
# alone, kept the WordNet probe at 0.485 (0.370 after enwiki alone; 0.450 before) and left
# code and documentation 3-4x lower, for +6% on enwiki itself
SOURCE = "offline-mix"


def _calibration(config: TrainConfig) -> CalibConfig:
    """Training and validation windows, drawn together (disjoint, outside the evaluation region)."""
    return CalibConfig(source=SOURCE, samples=config.windows + config.val_windows, seq_len=config.train_seq_len)


def _run(model: nn.Module, config: TrainConfig, data: Tensor | None, ctx: StageContext) -> dict[str, Any]:
    need = config.windows + config.val_windows
    if data is None or len(data) < need or data.shape[1] != config.train_seq_len:
        raise ConfigError(f"recovery needs {need} windows of {config.train_seq_len} tokens (training and validation)")
    parameters = sum(p.numel() for p in model.parameters())
    result = train(model, config, data[: config.windows], data[config.windows : need], teacher=ctx.teacher,
                   device=ctx.device, workdir=ctx.workdir, resume=ctx.resume, progress=ctx.progress,
                   validation_domains=ctx.domains[config.windows : need] if ctx.domains else None)  # fmt: skip
    if config.prune_width is None and sum(p.numel() for p in model.parameters()) != parameters:
        raise RuntimeError("recovery changed the parameter count")  # LoRA must be merged away
    return {**result.record, "metrics": str(result.metrics) if result.metrics else None}


def _summary(record: dict[str, Any]) -> str:
    r = record["result"]
    best = r["best"]
    line = (f"recovery ({r['mode']}, {r['precision']}): {r['tokens']:,} tokens in {r['steps']} steps, loss "
            f"{r['loss']['first']:.4f} -> {r['loss']['last']:.4f}, best validation perplexity {best['perplexity']:.3f} "
            f"at step {best['step']}, {r['tokens_per_s']:.0f} tokens/s, {record['seconds']:.1f} s")
    if r["masks"]["layers"]:
        line += f"\nmasks kept: {r['masks']['kept_after']:,} of {r['masks']['size']:,} weights non-zero (was {r['masks']['kept']:,})"
    chosen = r.get("lr_choice")
    if chosen:
        line += (f"\npeak learning rate {chosen['peak_lr']:g}, chosen: the start's validation perplexity "
                 f"{chosen['start_perplexity']:.3f} is {chosen['gap']:.2f} nats per token above the teacher's "
                 f"{chosen['teacher_perplexity']:.3f}")
    written = r.get("self_data")
    if written:
        how = (f"sampled at {written['tokens_per_s']:.0f} tokens/s" if written["sampled"]
               else "read back from the work directory")  # fmt: skip
        line += (f"\nself-data: the teacher wrote {written['windows']} training windows after their first "
                 f"{written['prompt_tokens']} tokens ({written['new_tokens']:,} tokens, {how})")
    if r.get("curve"):
        line += f"\ncurve: {r['curve']}, metrics: {r['metrics']}"
    return line


def _report(record: dict[str, Any]) -> Section:
    """What the recovery trained, and its validation curve."""
    r = record["result"]
    text = (f"{r['mode']} training, {r['precision']}: {r['tokens']:,} tokens in {r['steps']} steps, training loss "
            f"{r['loss']['first']:.4f} -> {r['loss']['last']:.4f}, best validation perplexity "
            f"{r['best']['perplexity']:.3f} at step {r['best']['step']}"
            + (f"; masks kept ({r['masks']['kept_after']:,} of {r['masks']['size']:,} weights non-zero)"
               if r["masks"]["layers"] else "") + ".")
    validation = r.get("validation", [])
    points = tuple((float(v["tokens"]), float(v["perplexity"])) for v in validation)
    domains = list(dict.fromkeys(d for v in validation for d in v.get("domains", {})))  # a mixture: per corpus too
    rows = tuple((str(v["step"]), f"{v['tokens']:,}", f"{v['perplexity']:.3f}",
                  *(f"{v['domains'][d]:.3f}" if d in v.get("domains", {}) else "" for d in domains))
                 for v in validation)  # fmt: skip
    return Section(f"Recovery ({r['mode']}, {r['tokens']:,} tokens)", text,
                   ("step", "tokens", "validation perplexity", *domains), rows,
                   curve=("training tokens", "validation perplexity", points) if len(points) > 1 else None)


def _check_teacher(config: TrainConfig, teacher: Any, student: Any, reshaped: str | None) -> None:
    """Layer-wise distillation (--hidden-weight) needs the teacher's blocks and hidden size in the
    student it trains: the input's, and no stage before it in this run that reshapes them."""
    if config.hidden_weight > 0:
        if reshaped is not None:
            raise ConfigError(f"--hidden-weight pairs the student's blocks with the teacher's, and the {reshaped} "
                              "stage before it can change them: distil from the logits only (--hidden-weight 0)")
        check_layerwise(teacher, student)


def _outputs(record: dict[str, Any], number: int, teacher: Path) -> dict[str, Path]:
    """The metrics file and its curve, named by the stage's place in the whole history; the record
    names them, and the teacher it distilled from."""
    result = record["result"]
    if record["settings"].get("kd_weight", 1.0) > 0:
        result["teacher"] = {"path": str(Path(teacher).resolve()), "sha256": content_hash(teacher)}
    metrics = result.get("metrics")
    if not metrics or not Path(metrics).exists():
        return {}
    curve = Path(metrics).with_suffix(".png")
    plot_metrics(metrics, curve, f"recovery ({record['settings'].get('mode', 'full')})")
    result["metrics"], result["curve"] = f"train-metrics-{number}.jsonl", f"train-curve-{number}.png"
    return {result["metrics"]: Path(metrics), result["curve"]: curve}


KIND = register(StageKind(
    "recovery", TrainConfig, lambda: ("recovery",), lambda method: options_of(TrainConfig),
    lambda method, settings: fill(TrainConfig, settings), flatten, _run,
    lambda config: True, _calibration, calib_fixed=("calib_samples", "calib_seq_len"),
    summary=_summary,
    describe=lambda result: f"recovery ({result.get('mode')}, {result.get('tokens', 0):,} tokens)",
    report=_report,
    leaves_zeros=lambda settings: bool(settings.get("prune_to") or settings.get("prune_pattern")),
    leaves_nm=lambda settings: bool(settings.get("prune_pattern")),
    removes_columns=lambda settings: settings.get("prune_width") is not None,
    checkpoints=True,
    length_key="train_seq_len",
    check_teacher=_check_teacher,
    teacher_precision=lambda config, device: precision_for(config, device) if config.needs_teacher else None,
    outputs=_outputs,
    command=("train", "recover a pruned model by training (distillation from the original model by default) and "
                      "save it with a manifest"),
))  # fmt: skip
