"""`secateur plan` on a mixture of experts: the MoEfied SmolLM2 of benchmarks/experts.py (a stock
Qwen2-MoE checkpoint, 30 blocks of a shared expert and 8 routed experts, top-2; built from
SmolLM2-135M, not a pretrained MoE), for two parameter budgets, the planner's recipe (depth x share
of routed experts removed) against the best single-kind recipes (depth only, experts only) chosen by
the same rule, each pruned for real by `secateur prune --recipe` and evaluated on text no stage saw:
protocol v1 perplexity (64 x 512 enwiki windows of the evaluation region), legal English (64
windows of Debian's license texts) and the WordNet probe (200 items). Also the planning time
against one prune of the recipe.

Resumable: each finished step is a line of benchmarks/results/plan_experts.jsonl.

    python benchmarks/plan_experts.py [--targets params115M,params105M]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "plan_experts.jsonl"
WORK = ROOT / "bench-out" / "plan-experts"
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(HERE))
from experts import proxy_dir  # noqa: E402
from measure import append_row, cli_timed, quality  # noqa: E402

TARGETS = {"params115M": "params=115M", "params105M": "params=105M"}
SEARCHES = {
    "planner": ["--depth", "0:0.5", "--experts", "0:0.75:0.125"],
    "depth only": ["--depth", "0:0.5", "--experts", "0"],
    "experts only": ["--depth", "0", "--experts", "0:0.75:0.125"],
}
EVAL = ["--windows", "64", "--seq-len", "512"]


def slug(text: str) -> str:
    return text.replace(" ", "-")


def plan_step(target: str, search: str) -> dict:
    out = WORK / f"{target}-{slug(search)}"
    printed, seconds, peak = cli_timed("plan", proxy_dir(), "--target", TARGETS[target], *SEARCHES[search],
                                       "--out", out, "--overwrite")  # fmt: skip
    print(printed, flush=True)
    record = json.loads((out / "plan.json").read_text())
    chosen = record["chosen"]
    return {"step": "plan", "target": target, "search": search, "wall_seconds": seconds, "peak_rss_mib": peak,
            "chosen": chosen["key"], "kind": chosen["kind"], "predicted_params": chosen["params"], "kl": chosen["kl"],
            "evaluations": record["evaluations"], "candidates": len(record["candidates"]),
            "stages": record["stages"]}  # fmt: skip


def prune_step(target: str, search: str) -> dict:
    plan = WORK / f"{target}-{slug(search)}"
    out = WORK / f"{target}-{slug(search)}-pruned"
    clock = time.perf_counter()
    if not (out / "secateur.json").exists():
        printed, seconds, peak = cli_timed("prune", proxy_dir(), "--recipe", plan / "plan.toml", "--out", out)
        print(printed, flush=True)
    else:
        seconds = peak = None
    manifest = json.loads((out / "secateur.json").read_text())
    row = {"step": "prune", "target": target, "search": search, "prune_seconds": seconds, "peak_rss_mib": peak,
           "parameters": manifest["structure"]["parameters"]}  # fmt: skip
    row.update(quality(out, EVAL, 200))
    row["wall_seconds"] = time.perf_counter() - clock
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default=",".join(TARGETS))
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    done = {(r["step"], r["target"], r["search"]) for r in map(json.loads, RESULTS.read_text().splitlines())} \
        if RESULTS.exists() else set()
    for target in args.targets.split(","):
        for search in SEARCHES:
            for step, run in (("plan", plan_step), ("prune", prune_step)):
                if (step, target, search) not in done:
                    append_row(RESULTS, run(target, search))
    table()


def table() -> None:
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines()]
    plans = {(r["target"], r["search"]): r for r in rows if r["step"] == "plan"}
    pruned = {(r["target"], r["search"]): r for r in rows if r["step"] == "prune"}
    print("| target | search | chosen | parameters | KL (proxy) | enwiki ppl | legal ppl | probe | plan s | prune s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for key, plan in plans.items():
        r = pruned.get(key)
        if r is None:
            continue
        print(f"| {key[0]} | {key[1]} | {plan['chosen']} | {r['parameters']:,} | {plan['kl']:.4f} | "
              f"{r['ppl_enwiki']:.2f} | {r['ppl_legal']:.2f} | {r['probe_acc']:.3f} | {plan['wall_seconds']:.0f} | "
              f"{r['prune_seconds'] or 0:.0f} |")


if __name__ == "__main__":
    main()
