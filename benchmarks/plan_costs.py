"""How well can a linear cost model fit llama.cpp's timings? Leave-one-out errors over the shapes
`secateur plan` has timed on this machine (its cache, `~/.cache/secateur/plan/costs-*.jsonl`), for
the planner's features and the alternatives tried, per hidden size and metric.

    python benchmarks/plan_costs.py [--hidden 576] [--cache PATH]

Feature sets (t: seconds per decoded token, or for the prompt; L blocks; P a block's weights):
  params    t = a + L (b + c P)                      (the planner's model)
  heads     the same + L d (query heads x head size)  (attention's work over the prompt)
  split     t = a + L (b + c P_attention + e P_mlp)
and `relative`: the planner's features fitted on relative rather than absolute errors.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))


def load(paths: list[Path]) -> dict[str, dict]:
    """shape key -> its row, with the fastest decode and prefill over its passes."""
    shapes: dict[str, dict] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            best = shapes.setdefault(row["shape"], {**row})
            best["decode"], best["prefill"] = min(best["decode"], row["decode"]), min(best["prefill"], row["prefill"])
    return shapes


def features(row: dict, kind: str) -> list[float]:
    layers, hidden, size = row["layers"], row["hidden"], row["head_dim"]
    attention = hidden * size * (2 * row["heads"] + 2 * row["kv_heads"]) / 1e6
    mlp = 3 * hidden * row["channels"] / 1e6
    if kind == "split":
        return [1.0, layers, layers * attention, layers * mlp]
    base = [1.0, layers, layers * (attention + mlp)]
    return base + [layers * row["heads"] * size / 1e3] if kind == "heads" else base


def leave_one_out(rows: list[dict], metric: str, kind: str) -> list[tuple[float, str]]:
    errors = []
    for held in rows:
        rest = [r for r in rows if r is not held]
        x = np.array([features(r, "params" if kind == "relative" else kind) for r in rest])
        y = np.array([r[metric] for r in rest])
        weight = 1 / y if kind == "relative" else np.ones_like(y)
        coef = np.linalg.lstsq(x * weight[:, None], y * weight, rcond=None)[0]
        guess = float(np.array(features(held, "params" if kind == "relative" else kind)) @ coef)
        errors.append((guess / held[metric] - 1, held["shape"]))
    return sorted(errors, key=lambda e: -abs(e[0]))


def main() -> None:
    from secateur.data.enwiki import cache_dir

    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--cache", type=Path, nargs="*", default=None)
    args = parser.parse_args()
    paths = args.cache or sorted((cache_dir() / "plan").glob("costs-*.jsonl"))
    rows = [r for r in load(paths).values() if r["hidden"] == args.hidden]
    print(f"{len(rows)} shapes of hidden size {args.hidden} from {', '.join(str(p) for p in paths)}")
    print("| features | metric | largest error | its shape | mean absolute error |")
    print("|---|---|---|---|---|")
    for kind in ("params", "heads", "split", "relative"):
        for metric in ("decode", "prefill"):
            errors = leave_one_out(rows, metric, kind)
            mean = float(np.mean([abs(e) for e, _ in errors]))
            print(f"| {kind} | {metric} | {errors[0][0]:+.1%} | {errors[0][1]} | {mean:.1%} |")
    print("\nfastest timings, by blocks and width (seconds per token / for the prompt):")
    for row in sorted(rows, key=lambda r: (r["layers"], r["heads"], r["channels"])):
        print(f"  {row['shape']}: decode {row['decode'] * 1e3:.2f} ms, prefill {row['prefill'] * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
