"""Knowledge against perplexity: the offline WordNet probe (`secateur_wordnet`, 500 four-choice
items, chance 25%) next to protocol-v1 perplexity, for dense SmolLM2-135M and one output of each kind.

Do perplexity and knowledge move together? (LLM-KICK: models of equal perplexity can differ widely on
knowledge-intensive questions.) Each model is pruned once with `secateur prune ... --eval
enwiki-sample` into bench-out/knowledge/ (or taken from another benchmark's output where the same
command made it), then `secateur eval --tasks secateur_wordnet --results` runs on it.

Resumable: every finished model is a line of benchmarks/results/knowledge.jsonl.

    python benchmarks/knowledge.py [--only dense,width50]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "knowledge.jsonl"
WORK = ROOT / "bench-out" / "knowledge"
sys.path.insert(0, str(ROOT / "src"))

MODELS = {  # name: `secateur prune` flags (None: dense)
    "dense": None,
    "sparsegpt50": ["--method", "sparsegpt", "--sparsity", "0.5"],
    "sparsegpt-2:4": ["--method", "sparsegpt", "--pattern", "2:4"],
    "sparsegpt70": ["--method", "sparsegpt", "--sparsity", "0.7"],
    "width20": ["--method", "width", "--remove-fraction", "0.2"],
    "width50": ["--method", "width", "--remove-fraction", "0.5"],
    "depth20": ["--method", "angular", "--remove-fraction", "0.2"],
}
REUSE = {"width20": "llamacpp/width20", "width50": "llamacpp/width50", "depth20": "llamacpp/depth20"}  # same flags


def dense_dir() -> Path:
    from secateur.demo import default_model_dir

    return default_model_dir()


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "secateur.cli", *map(str, args)], check=True, capture_output=True,
                          text=True)  # fmt: skip


def model_dir(name: str) -> Path:
    if MODELS[name] is None:
        return dense_dir()
    reused = ROOT / "bench-out" / REUSE.get(name, "-")
    if (reused / "secateur.json").exists():
        return reused
    out = WORK / name
    if not (out / "secateur.json").exists():
        cli("prune", dense_dir(), *MODELS[name], "--eval", "enwiki-sample", "--out", out)
    return out


def perplexity(name: str, path: Path) -> float:
    if MODELS[name] is None:
        return json.loads(cli("eval", path, "--json").stdout)["perplexity"]
    return json.loads((path / "secateur.json").read_text())["evaluation"]["perplexity"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated model names")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    finished = {}
    if RESULTS.exists():
        finished = {json.loads(line)["model"]: json.loads(line) for line in RESULTS.read_text().splitlines() if line}
    for name in args.only.split(",") if args.only else MODELS:
        if name in finished:
            continue
        path = model_dir(name)
        results = WORK / f"{name}-probe.json"
        clock = time.perf_counter()
        if not results.exists():
            cli("eval", path, "--tasks", "secateur_wordnet", "--batch-size", "16", "--device", "cpu", "--results", results)
        probe = json.loads(results.read_text())
        task = probe["tasks"]["secateur_wordnet"]
        row = {"model": name, "path": str(path), "perplexity": perplexity(name, path), "acc": task["metrics"]["acc"],
               "acc_norm": task["metrics"]["acc_norm"], "chance": task["chance"], "items": task["samples"],
               "probe_seconds": probe["seconds"], "wall_seconds": time.perf_counter() - clock,
               "lm_eval": probe["lm_eval_version"]}  # fmt: skip
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with RESULTS.open("a") as f:
            f.write(json.dumps(row) + "\n")
        finished[name] = row
        print(f"{name}: perplexity {row['perplexity']:.2f}, probe acc {row['acc']:.3f} ({row['probe_seconds']:.0f} s)",
              flush=True)  # fmt: skip
    print("| model | perplexity | probe acc | acc_norm | above chance (points) | probe s |\n|---|---|---|---|---|---|")
    for row in finished.values():
        print(f"| {row['model']} | {row['perplexity']:.2f} | {row['acc']:.3f} | {row['acc_norm']:.3f} | "
              f"{100 * (row['acc'] - row['chance']):+.1f} | {row['probe_seconds']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
