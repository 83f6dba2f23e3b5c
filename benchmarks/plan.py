"""`secateur plan` on SmolLM2-135M-Instruct: for decode targets 1.3x, 1.6x and 2x in llama.cpp and for
80M parameters, the planner's recipe (depth x width x attention split x hidden) against the best single-kind recipes
(depth only, width only) chosen by the same rule (each winner of a speed target timed against the
dense model in pairs before it is accepted), each pruned for real, evaluated
(perplexity, protocol v1: 64 x 512 enwiki windows) and timed in llama.cpp (GGUF f16, llama-bench,
2 threads, interleaved rounds). Also: the proxy's rank correlation with perplexity over every
pruned recipe, and planning time against one prune.

Steps are resumable: each finished one is a line of benchmarks/results/plan.jsonl (run 8: run 7
with two more searches whose width stages refit the output projections, `--reconstruct`; run 7: the
attention/MLP split searched; run 6, the default split only, is kept in plan-v6.jsonl; run 5, whose
depth levels ran their removed blocks, in plan-v5.jsonl; run 4, with a 2% margin and checks of
three rounds, in plan-v4.jsonl, run 3 in plan-v3.jsonl, run 2, on a Xeon, in plan-v2.jsonl and run
1 in plan-v1.jsonl).

The first phase times the grids' shapes once for the machine (a plan stopped by a tiny
--budget-minutes right after its cost model), as a user's first plan would; the plans after it find
them in the cache, so their times are those of plans on a calibrated machine.

    python benchmarks/plan.py [--phase shapes|plan|prune|speed|proxy|table|all] [--rounds 3] [--targets decode1.3,params80M]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "plan.jsonl"
WORK = ROOT / "bench-out" / "plan"
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(HERE))

from llamacpp_build import build  # noqa: E402

TARGETS = {"decode1.3": "decode-speedup=1.3", "decode1.6": "decode-speedup=1.6", "decode2": "decode-speedup=2",
           "params80M": "params=80M"}  # fmt: skip
# the planner's grid, and the single-kind grids it contains (width only: finer, and further); the width
# grids search the attention split too (of SmolLM2's 3 key/value groups every block keeps all 3, 2, 1,
# or the width stage's rounding; run 6 searched the default split only, as `secateur plan` does unless
# told otherwise)
SPLITS = ["--attention", "default,0:0.75:0.25"]
SEARCHES = {  # runs 6 and 7 sliced without refitting (`--no-reconstruct`, the default before run 8)
    "planner": ["--depth", "0:0.8", "--width", "0:0.7:0.05", *SPLITS, "--hidden", "0,0.125", "--no-reconstruct"],
    "depth only": ["--depth", "0:0.8", "--width", "0", "--hidden", "0"],
    "width only": ["--depth", "0", "--width", "0:0.85:0.05", *SPLITS, "--hidden", "0", "--no-reconstruct"],
    # run 8: width stages refit their output projections (`--reconstruct`, `secateur plan`'s default
    # since), on run 6's grids (the default split: the split grid's candidate count times a refit
    # each would multiply planning time)
    "planner refit": ["--depth", "0:0.8", "--width", "0:0.7:0.05", "--hidden", "0,0.125", "--reconstruct"],
    "width only refit": ["--depth", "0", "--width", "0:0.85:0.05", "--hidden", "0", "--reconstruct"],
}


def recipe_key(chosen: dict) -> str:
    """A chosen candidate's key, marked when its width stage refits (the candidate key leaves it out)."""
    return chosen["key"] + ("-refit" if chosen.get("reconstruct") else "")


def dense() -> Path:
    from secateur.demo import default_model_dir

    return default_model_dir()


def done() -> dict[str, dict]:
    if not RESULTS.exists():
        return {}
    return {r["step"]: r for r in (json.loads(l) for l in RESULTS.read_text().splitlines() if l.strip())}


def append(row: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k not in ("candidates", "bench")})[:400], flush=True)


def cli(*args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "secateur.cli", *map(str, args)], capture_output=True, text=True,
                          check=check, env=env)  # fmt: skip


def fresh_cache(name: str) -> dict:
    """An environment whose secateur cache has the machine's shape timings (measured once per machine
    and engine, as a user's would be) but no proxy scores or paired checks of earlier plans, so each
    plan's time is that of a first plan of the model on a calibrated machine."""
    from secateur.data.enwiki import cache_dir

    real, root = cache_dir(), WORK / "cache" / name
    if root.exists():
        shutil.rmtree(root)
    (root / "plan").mkdir(parents=True)
    for entry in ("enwiki-sample.txt", "models"):
        (root / entry).symlink_to(real / entry)
    for costs in (real / "plan").glob("costs-*.jsonl"):
        (root / "plan" / costs.name).symlink_to(costs)  # shapes timed by one plan serve the next
    return {**os.environ, "SECATEUR_CACHE": str(root)}


def keep_timings(name: str) -> None:
    """Move the shape timings a plan measured into the machine's cache, where the next plan finds them."""
    from secateur.data.enwiki import cache_dir

    real = cache_dir() / "plan"
    real.mkdir(parents=True, exist_ok=True)
    for costs in (WORK / "cache" / name / "plan").glob("costs-*.jsonl"):
        if not costs.is_symlink():
            shutil.move(costs, real / costs.name)


def shapes_phase() -> None:
    """Time every grid's shapes into the machine's cache: one decode plan per grid, stopped by the
    budget before any candidate is scored (exit 2), after the cost model is measured."""
    for search, flags in SEARCHES.items():
        step = f"shapes:{search}"
        if step in done():
            continue
        out = WORK / "shapes" / search.replace(" ", "-")
        clock = time.perf_counter()
        result = cli("plan", dense(), "--target", TARGETS["decode2"], "--out", out, "--overwrite", *flags,
                     "--budget-minutes", "0.001", check=False)  # fmt: skip
        if "budget ran out" not in result.stderr:
            raise RuntimeError(f"timing the {search} shapes: {result.stderr.strip()[-500:]}")
        append({"step": step, "wall": time.perf_counter() - clock})


def plan_phase(names: list[str]) -> None:
    rows = done()
    for name, target in TARGETS.items():
        if name not in names:
            continue
        for search, flags in SEARCHES.items():
            step = f"plan:{name}:{search}"
            if step in rows:
                continue
            out = WORK / "plans" / f"{name}-{search.replace(' ', '-')}"
            clock = time.perf_counter()
            result = cli("plan", dense(), "--target", target, "--out", out, "--overwrite", *flags, check=False,
                         env=fresh_cache(f"{name}-{search.replace(' ', '-')}"))  # fmt: skip
            wall = time.perf_counter() - clock
            keep_timings(f"{name}-{search.replace(' ', '-')}")
            if result.returncode != 0:
                append({"step": step, "target": target, "search": search, "wall": wall,
                        "failed": result.stderr.strip().splitlines()[-1]})  # fmt: skip
                continue
            record = json.loads((out / "plan.json").read_text())
            append({"step": step, "target": target, "search": search, "wall": wall, "recipe": str(out / "plan.toml"),
                    "chosen": record["chosen"], "seconds": record["seconds"], "rungs": record["rungs"],
                    "evaluations": record["evaluations"], "candidates": len(record["candidates"]),
                    "searched": record["searched"], "errors": record["costs"].get("errors"),
                    "checks": record["costs"].get("checks"), "margin": record["costs"].get("margin"),
                    "tolerance": record["costs"].get("tolerance"),
                    "measured_shapes": record["costs"].get("measured_shapes")})  # fmt: skip


def _chosen() -> dict[str, str]:
    """candidate key -> recipe, over every successful plan."""
    return {recipe_key(r["chosen"]): r["recipe"] for s, r in done().items() if s.startswith("plan:") and "chosen" in r}


def prune_phase() -> None:
    for key, recipe in _chosen().items():
        step = f"prune:{key}"
        if step in done():
            continue
        out = WORK / "models" / key
        clock = time.perf_counter()
        cli("prune", dense(), "--recipe", recipe, "--eval", "enwiki-sample", "--out", out, "--overwrite")
        wall = time.perf_counter() - clock
        manifest = json.loads((out / "secateur.json").read_text())
        (WORK / "gguf").mkdir(parents=True, exist_ok=True)
        cli("export", out, "--gguf", WORK / "gguf" / f"{key}.gguf", "--overwrite")
        append({"step": step, "key": key, "perplexity": manifest["evaluation"]["perplexity"],
                "parameters": manifest["structure"]["parameters"], "wall": wall,
                "stage_seconds": [h["seconds"] for h in manifest["history"]], "timings": manifest["timings"]})  # fmt: skip


def measured_speeds() -> dict[str, dict]:
    """candidate key -> speeds, over every speed step timed in pairs with the dense model."""
    speed: dict[str, dict] = {}
    if RESULTS.exists():
        for row in (json.loads(l) for l in RESULTS.read_text().splitlines() if l.strip()):
            if row["step"] == "speed" and row.get("paired"):
                speed.update(row["speed"])
    return speed


def speed_phase(rounds: int, repeats: int) -> None:
    """Times each pruned recipe no speed step has timed yet against the dense model in pairs: one
    `secateur bench dense key` per recipe (the two in turn, `rounds` times), so each ratio compares
    timings seconds apart. (Run 4 first timed all twelve recipes and the dense model in turn, the
    dense model once per round: a recipe timed a minute after it read up to 7% off its pair.)"""
    keys = sorted(set(_chosen()) - set(measured_speeds()))
    if not keys:
        return
    (WORK / "gguf").mkdir(parents=True, exist_ok=True)
    base = WORK / "gguf" / "dense.gguf"
    if not base.exists():
        cli("export", dense(), "--gguf", base)
    env = {**os.environ, "SECATEUR_LLAMA_CPP": str(build())}
    from secateur.bench import SpeedResult

    for key in keys:
        out = cli("bench", base, WORK / "gguf" / f"{key}.gguf", "--engine", "llama.cpp", "--rounds", rounds,
                  "--repeats", repeats, "--json", env=env).stdout  # fmt: skip
        reference, result = (SpeedResult(**r) for r in json.loads(out)["results"])
        prefill, decode = result.speedup(reference)
        append({"step": "speed", "paired": True, "rounds": rounds, "repeats": repeats,
                "speed": {key: {"decode_speedup": decode, "prefill_speedup": prefill,
                                "decode_tps": result.decode_tokens_per_second, "prefill_ms": result.prefill_seconds * 1e3,
                                "file_bytes": result.file_bytes, "dense_decode_tps": reference.decode_tokens_per_second}}})  # fmt: skip


def proxy_phase() -> None:
    """KL on all four proxy windows for every pruned recipe, with the planner's own machinery (again
    for all of them when a recipe was added)."""
    if set(done().get("proxy", {}).get("kl", {})) == set(_chosen()):
        return
    import torch

    from secateur.io import load
    from secateur.plan.config import PlanConfig
    from secateur.plan.planner import _windows
    from secateur.plan.proxy import Proxy
    from secateur.plan.search import spearman
    from secateur.plan.space import Candidate

    config = PlanConfig(target="params=1")
    model, tokenizer = load(dense())
    calibration, windows = _windows(model, tokenizer, config)
    proxy = Proxy(model, calibration, windows, torch.device("cpu"))
    rows = done()
    kl, ppl = {}, {}
    plans = {recipe_key(r["chosen"]): r["chosen"] for s, r in rows.items() if s.startswith("plan:") and "chosen" in r}
    fields = ("blocks", "width", "hidden", "round_to", "attention", "reconstruct")
    for key in _chosen():
        candidate = Candidate(**{k: plans[key][k] for k in fields if plans[key].get(k) is not None})
        built = proxy.build(candidate)
        scores = proxy.score(built, range(config.proxy_windows))
        kl[key], ppl[key] = sum(scores) / len(scores), rows[f"prune:{key}"]["perplexity"]
        del built
    keys = sorted(kl)
    append({"step": "proxy", "kl": kl, "perplexity": ppl,
            "spearman": spearman([kl[k] for k in keys], [ppl[k] for k in keys]), "n": len(keys)})  # fmt: skip


def table_phase() -> None:
    rows = done()
    speed = measured_speeds()
    print("| target | recipe | candidate | parameters | perplexity | decode (measured) | prefill | met | planning s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, target in TARGETS.items():
        for search in SEARCHES:
            r = rows.get(f"plan:{name}:{search}")
            if r is None:
                continue
            if "failed" in r:
                print(f"| {target} | {search} | none: {r['failed']} | | | | | | {r['wall']:.0f} |")
                continue
            key = recipe_key(r["chosen"])
            p, s = rows.get(f"prune:{key}", {}), speed.get(key, {})
            measured = s.get("decode_speedup")
            if "params" in target:
                met = p.get("parameters", 1e18) <= 80e6
            else:
                met = measured is not None and measured >= float(target.split("=")[1])
            print(f"| {target} | {search} | {key} | {p.get('parameters', 0) / 1e6:.1f}M | {p.get('perplexity', float('nan')):.2f} | "
                  f"{measured or float('nan'):.2f}x (pred. {r['chosen']['decode_speedup'] or float('nan'):.2f}x) | "
                  f"{s.get('prefill_speedup', float('nan')):.2f}x | {'yes' if met else 'NO'} | {r['wall']:.0f} |")
    if "proxy" in rows:
        print(f"\nproxy rank correlation (Spearman, KL vs perplexity, {rows['proxy']['n']} recipes): "
              f"{rows['proxy']['spearman']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase", default="all", choices=["shapes", "plan", "prune", "speed", "proxy", "table", "all"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated, of {', '.join(TARGETS)}")
    args = parser.parse_args()
    os.environ.setdefault("SECATEUR_LLAMA_CPP", str(build()))
    if args.phase in ("shapes", "all"):
        shapes_phase()
    if args.phase in ("plan", "all"):
        plan_phase(args.targets.split(","))
    if args.phase in ("prune", "all"):
        prune_phase()
    if args.phase in ("speed", "all"):
        speed_phase(args.rounds, args.repeats)
    if args.phase in ("proxy", "all"):
        proxy_phase()
    if args.phase in ("table", "all"):
        table_phase()


if __name__ == "__main__":
    main()
