"""Gradual magnitude pruning during training on SmolLM2-135M (CPU): secateur against torch.ao.pruning.

Both prune the decoder blocks' linear layers of the dense model to 50% on the cubic schedule of Zhu &
Gupta (updates every Δt steps from step 0 to 75% of the run) while training on the same B tokens in
the same order with the same loss (cross-entropy), optimizer (AdamW, lr 1e-3 peak, warm-up 5%,
cosine to 0.1x) and precision:

- secateur: `train(..., TrainConfig(prune_to=0.5, kd_weight=0))`: per-layer magnitude, gradients
  masked, pruned weights' Adam moments cleared, weights masked after each step.
- torch.ao: `WeightNormSparsifier(sparse_block_shape=(1, 1))` (per-layer magnitude of single weights)
  with `CubicSL` (the same cubic schedule), in a plain PyTorch loop; the masks live in
  parametrizations and are squashed into the weights at the end.

Evaluation: protocol v1 (64 x 512 enwiki windows). Results are appended to
benchmarks/results/gradual.jsonl; a finished (tool, seed) row is skipped next time (rows without a
seed are seed 0).

`--seeds 1` repeats both with another window order (TrainConfig.seed), to tell a difference between
the tools from the spread of one tool over data orders; each run's final masks are kept in
bench-out/gradual, and for a seed both tools ran, the share of pruned weights they agree on is
appended as a row of its own.

    python benchmarks/gradual.py [--tokens 131072] [--only secateur,torch.ao] [--seeds 0]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
RESULTS = HERE / "results" / "gradual.jsonl"


MASKS = HERE.parent / "bench-out" / "gradual"


def setup(tokens: int, seed: int = 0):
    from secateur.config import CalibConfig
    from secateur.demo import default_model_dir
    from secateur.io import load_model
    from secateur.data.calibration import calibration_data, evaluation_data
    from secateur.train import TrainConfig

    model, tokenizer = load_model(default_model_dir())
    config = TrainConfig(tokens=tokens, prune_to=0.5, kd_weight=0.0, prune_every=4, seed=seed)
    windows = calibration_data(model, tokenizer, CalibConfig(samples=config.windows + config.val_windows, seq_len=512))
    evaluation = evaluation_data(model, tokenizer, "enwiki-sample", 512, 64)
    return model, config, windows, evaluation


def run_secateur(model, config, windows):
    from secateur.train import train

    record = train(model, config, windows[: config.windows], windows[config.windows :], device="cpu").record
    return {"steps": record["steps"], "tokens_per_s": record["tokens_per_s"], "events": record["gradual"]["events"],
            "precision": record["precision"]}  # fmt: skip


def run_torch_ao(model, config, windows):
    """The same data order, loss, optimizer, schedule and precision in a plain loop with torch.ao."""
    from torch.ao.pruning import CubicSL, WeightNormSparsifier

    from secateur.models import adapter_for
    from secateur.sparsity.prune import target_layers
    from secateur.train.config import precision_for
    from secateur.train.schedule import batch_rows, total_steps
    from secateur.train.loss import next_token_cross_entropy
    from secateur.train.schedule import lr_factor

    steps = total_steps(config, config.windows, 1)
    warmup = int(config.warmup * steps)
    end = int(round(config.prune_end * steps))
    updates = end // config.prune_every
    sparsifier = WeightNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 1), zeros_per_block=1)
    sparsifier.prepare(model, [{"tensor_fqn": f"{name}.weight"} for name, _ in target_layers(model, adapter_for(model))])
    scheduler = CubicSL(sparsifier, init_sl=0.0, init_t=0, delta_t=config.prune_every, total_t=updates)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.peak_lr)
    bf16 = precision_for(config, torch.device("cpu")) == "bfloat16"
    model.train()
    train_windows = windows[: config.windows]
    clock = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = config.peak_lr * lr_factor(step, steps, warmup, config.min_lr)
        ids = train_windows[batch_rows(step, 0, config, config.windows, 1, 0)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = next_token_cross_entropy(model(input_ids=ids).logits, ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sparsifier.step()
        scheduler.step()
    seconds = time.perf_counter() - clock
    sparsifier.squash_mask()
    return {"steps": steps, "tokens_per_s": steps * config.micro_batch * 512 / seconds}


def append(row: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(row) + "\n")


def keep_masks(model, path: Path) -> None:
    """The pruned positions of every target layer, bit-packed, in the layers' order."""
    import numpy as np

    from secateur.models import adapter_for
    from secateur.sparsity.prune import target_layers

    zeros = torch.cat([(m.weight == 0).flatten() for _, m in target_layers(model, adapter_for(model))])
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.packbits(zeros.numpy()))


def agreement(a: Path, b: Path) -> float:
    """Share of a's pruned weights that b pruned too (both prune the same count)."""
    import numpy as np

    x, y = np.unpackbits(np.load(a)), np.unpackbits(np.load(b))
    return float((x & y).sum() / x.sum())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=131072)
    parser.add_argument("--only", default="secateur,torch.ao")
    parser.add_argument("--seeds", default="0", help="window orders, comma-separated")
    args = parser.parse_args()
    from secateur.evaluate import perplexity
    from secateur.models import adapter_for
    from secateur.sparsity.prune import target_layers

    def done() -> set[tuple[str, int]]:
        rows = [json.loads(line) for line in RESULTS.read_text().splitlines()] if RESULTS.exists() else []
        return {(r["tool"], r.get("seed", 0)) for r in rows}

    tools = args.only.split(",")
    for seed in map(int, args.seeds.split(",")):
        if all((tool, seed) in done() for tool in tools):
            continue
        dense, config, windows, evaluation = setup(args.tokens, seed)
        for tool in tools:
            if (tool, seed) in done():
                continue
            model = copy.deepcopy(dense)
            clock = time.perf_counter()
            row = (run_secateur if tool == "secateur" else run_torch_ao)(model, config, windows)
            wall = time.perf_counter() - clock
            layers = target_layers(model, adapter_for(model))
            sparsity = sum(int((m.weight == 0).sum()) for _, m in layers) / sum(m.weight.numel() for _, m in layers)
            ppl = perplexity(model, evaluation)["perplexity"]
            keep_masks(model, MASKS / f"{tool}-s{seed}.npy")
            row = {"tool": tool, "seed": seed, "tokens": args.tokens, "perplexity": ppl, "sparsity": sparsity,
                   "wall_seconds": wall, **row}  # fmt: skip
            append(row)
            print(f"{tool} (seed {seed}): perplexity {ppl:.2f}, sparsity {sparsity:.4f}, {row['tokens_per_s']:.0f} tokens/s",
                  flush=True)  # fmt: skip
        pair = [MASKS / f"{tool}-s{seed}.npy" for tool in ("secateur", "torch.ao")]
        if all(p.exists() for p in pair) and ("agreement", seed) not in done():
            share = agreement(*pair)
            append({"tool": "agreement", "seed": seed, "agreement": share})
            print(f"seed {seed}: the tools agree on {share:.4f} of the pruned weights", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
