"""Pruned SmolLM2-135M-Instruct models as speculative-decoding drafts of the original, in transformers
(secateur's own greedy speculative loop, `secateur bench ORIGINAL --draft PRUNED`), CPU.

Drafts: depth 20% and 50% (angular, compensated: 6 and 15 of 30 blocks removed), width 50% (uniform
heads and MLP channels, `--reconstruct`). Each is timed with 4 and 2 draft
tokens per round. The prompt: the first 256 tokens of the enwiki sample's evaluation text; 64 new
tokens; greedy; 1 warm-up, then plain and speculative decoding alternate 3 times; medians. Every row
checks that the output is the original's greedy output token for token.

Resumable: every finished row is a line of benchmarks/results/drafts.jsonl.

    python benchmarks/drafts.py [--only depth20-k4]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "drafts.jsonl"
WORK = ROOT / "bench-out" / "drafts"
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(HERE))
from measure import cli, run_rows  # noqa: E402

DRAFTS = {  # name: `secateur prune` arguments
    "depth20": ["--method", "angular", "--remove-fraction", "0.2"],
    "width50": ["--method", "width", "--remove-fraction", "0.5", "--reconstruct"],
    "depth50": ["--method", "angular", "--remove-fraction", "0.5"],
}
ROWS = [f"{d}-k{k}" for d in DRAFTS for k in (4, 2)]
TIMING = ["--prompt", "256", "--new-tokens", "64", "--repeats", "3"]


def dense() -> Path:
    from secateur.demo import default_model_dir

    return default_model_dir()


def draft(name: str) -> Path:
    out = WORK / name
    if not (out / "secateur.json").exists():
        print(cli("prune", dense(), "--out", out, *DRAFTS[name]), flush=True)
    return out


def measure(name: str, probe_items: int) -> dict:
    clock = time.perf_counter()
    which, k = name.rsplit("-k", 1)
    result = json.loads(cli("bench", dense(), "--draft", draft(which), "--draft-tokens", k, *TIMING, "--json"))
    return {"row": name, **result["result"], "wall_seconds": time.perf_counter() - clock}


def table() -> None:
    print("| draft | k | acceptance | tokens per target forward | greedy tok/s | speculative tok/s | speedup | identical |")
    print("|---|---|---|---|---|---|---|---|")
    for r in map(json.loads, RESULTS.read_text().splitlines()):
        which, k = r["row"].rsplit("-k", 1)
        print(f"| {which} | {k} | {r['acceptance']:.1%} | {r['tokens_per_round']:.2f} | {r['plain_tokens_per_second']:.1f} | "
              f"{r['speculative_tokens_per_second']:.1f} | {r['speedup']:.2f} | {r['identical']} |")


if __name__ == "__main__":
    run_rows(__doc__, RESULTS, ROWS, measure, table)
