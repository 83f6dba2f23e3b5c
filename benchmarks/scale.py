"""Memory at scale (CPU): recovery's peak resident memory and speed before and after the chunked loss.

Recovery rows: SmolLM2-135M width 50% (`secateur prune --method width --remove-fraction 0.5`, 81.7M
parameters) trained by `secateur train` with the dense model as teacher at the default batch
(4 x 512 tokens), 16,384 tokens (8 optimizer steps, one validation at the end), float32 weights
with the default precision. Peak RSS is the child's own (`wait4`); tokens/s is the run's training
rate as its manifest records it (validation and checkpoints excluded).

    recovery-full-logits   --loss-chunk 0: the model's own batch x sequence x vocabulary logits
    recovery-chunked       the default: logits 2^24 at a time, gradients worked out per chunk
    recovery-chunked-ac    the default plus --activation-checkpointing

Resumable: every finished row is a line of benchmarks/results/scale.jsonl and is skipped next time.

    python benchmarks/scale.py [--only recovery-chunked,...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(HERE))
RESULTS = HERE / "results" / "scale.jsonl"
WORK = ROOT / "bench-out" / "scale"

from measure import cache, cli_timed, run_rows  # noqa: E402

TOKENS = 16384
RECOVERY = {
    "recovery-full-logits": ["--loss-chunk", "0"],
    "recovery-chunked": [],
    "recovery-chunked-ac": ["--activation-checkpointing"],
}


def dense() -> Path:
    return cache() / "models" / "SmolLM2-135M-Instruct"


def width50() -> Path:
    path = WORK / "width50"
    if not (path / "secateur.json").is_file():
        cli_timed("prune", dense(), "--method", "width", "--remove-fraction", "0.5", "--out", path, "--overwrite")
    return path


def measure(name: str, _probe_items: int) -> dict:
    if name in RECOVERY:
        out = WORK / name
        _, seconds, peak = cli_timed("train", width50(), "--teacher", dense(), "--tokens", TOKENS, "--eval-every", 100,
                                     *RECOVERY[name], "--out", out, "--overwrite")  # fmt: skip
        manifest = json.loads((out / "secateur.json").read_text())
        record = manifest["history"][-1]["result"]
        return {"row": name, "peak_rss_mib": peak, "tokens_per_s": record["tokens_per_s"], "seconds": seconds,
                "loss_chunk": record.get("loss_chunk"), "precision": record["precision"],
                "first_loss": record["loss"]["first"], "best_validation": record["best"]["perplexity"],
                "tokens": record["tokens"]}  # fmt: skip
    raise SystemExit(f"unknown row {name}")


def table() -> None:
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines()] if RESULTS.exists() else []
    base = next((r for r in rows if r["row"] == "recovery-full-logits"), None)
    print(f"{'row':24s} {'peak RSS MiB':>12s} {'tokens/s':>9s} {'vs full':>8s} {'first loss':>10s} {'val ppl':>8s}")
    for r in rows:
        if r["row"].startswith("recovery"):
            ratio = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
            print(f"{r['row']:24s} {r['peak_rss_mib']:12.0f} {r['tokens_per_s']:9.1f} {ratio:8.3f} "
                  f"{r['first_loss']:10.4f} {r['best_validation']:8.2f}")  # fmt: skip


if __name__ == "__main__":
    run_rows(__doc__, RESULTS, list(RECOVERY), measure, table)
