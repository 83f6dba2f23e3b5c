"""`secateur plan --target draft` on SmolLM2-135M-Instruct: the fastest lossless speculative draft
of the model, searched over depth x width in transformers (secateur's own speculative loop) and in
llama.cpp (f16 GGUF files, llama-speculative-simple), CPU.

Grid: depth 0, 20, 40 and 60% of the 30 blocks (angular span, compensated) x width 0, 25 and 50%
(uniform, refitted), no hidden channels: 11 drafts. Each is ranked by its predicted speculative
speedup (the proposals the original accepts on its own greedy continuations of the proxy windows,
replayed; its cost per token from the cost model; the verification timed on the original's shape),
and 3 are run as drafts for real, each run correcting the predictions before the next pick.
transformers: prompt 256 tokens, 64 new, 3 runs (the protocol of benchmarks/drafts.py); llama.cpp:
the planner's defaults (512, 128, 5 runs).

Resumable: each finished engine is a line of benchmarks/results/plan_draft.jsonl.

    python benchmarks/plan_draft.py [--only hf]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "plan_draft.jsonl"
WORK = ROOT / "bench-out" / "plan-draft"
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(HERE))
from drafts import dense  # noqa: E402
from measure import cli_timed, run_rows  # noqa: E402

GRID = ["--depth", "0,0.2,0.4,0.6", "--width", "0,0.25,0.5", "--hidden", "0", "--checks", "3"]
ENGINES = {
    "hf": ["--engine", "hf", "--prompt", "256", "--new-tokens", "64", "--repeats", "3"],
    "llama.cpp": ["--engine", "llama.cpp"],
}


def measure(engine: str, probe_items: int) -> dict:
    out = WORK / engine
    printed, seconds, peak = cli_timed("plan", dense(), "--target", "draft", *GRID, *ENGINES[engine], "--out", out,
                                       "--overwrite")  # fmt: skip
    print(printed, flush=True)
    record = json.loads((out / "plan.json").read_text())
    drafts = [{k: r.get(k) for k in ("key", "kind", "agree", "decode_speedup", "measured", "draft_tokens",
                                      "draft_speedup", "check", "windows")}
              for r in record["candidates"] if r.get("agree") is not None]  # fmt: skip
    return {"row": engine, "chosen": record["chosen"]["key"], "drafts": drafts, "verify": record["costs"]["verify"],
            "wall_seconds": seconds, "peak_rss_mib": peak, "seconds": record["seconds"],
            "evaluations": record["evaluations"], "rungs": record["rungs"]}  # fmt: skip


def table() -> None:
    for r in map(json.loads, RESULTS.read_text().splitlines()):
        verify = ", ".join(f"k={k}: {v:.2f}" for k, v in r["verify"].items())
        print(f"\n{r['row']}: chosen {r['chosen']}; plan {r['wall_seconds']:.0f} s, {r['evaluations']} builds, rungs "
              f"{r['rungs']}; verification cost (decode steps) {verify}")
        print("| draft | agreement | windows | cost per token | k | predicted x | measured x | acceptance | identical |")
        print("|---|---|---|---|---|---|---|---|---|")
        for d in sorted(r["drafts"], key=lambda d: -d["draft_speedup"]):
            c = d["check"] or {}
            measured = f"{c['speedup']:.2f} | {c['acceptance']:.3f} | {c['identical']}" if c else " | | "
            print(f"| {d['key']} | {d['agree']:.3f} | {d['windows']} | {1 / d['decode_speedup']:.3f} | "
                  f"{d['draft_tokens']} | {d['draft_speedup']:.2f} | {measured} |")


if __name__ == "__main__":
    run_rows(__doc__, RESULTS, list(ENGINES), measure, table)
