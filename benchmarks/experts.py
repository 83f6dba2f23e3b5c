"""Expert pruning on a real-weight mixture of experts: SmolLM2-135M MoEfied into 8 experts per block.

The model (no pretrained MoE is available offline): SmolLM2-135M-Instruct (the project's default
model) rewritten by `secateur.experts.moefy` as a stock Mixtral checkpoint: every block's 1,536 MLP
channels split into 8 experts of 192 by balanced k-means on their co-activation over 16,384
calibration tokens (enwiki sample, calibration region), a linear router fitted per block to the log
of each expert's output norm, top-2 routing, attention, norms and embeddings unchanged. Built once
into ~/.cache/secateur/models/smollm2-moefied-8x192-top2. Quality figures are this proxy's, not a
pretrained MoE's.

Rows: the dense model, the proxy, then 25% and 50% of each block's experts removed by every
criterion (`secateur prune --method experts --criterion C`), default calibration (64 x 512 enwiki
windows). Quality on text no stage saw: protocol v1 perplexity (the first 64 windows of 512 tokens
of the enwiki sample's evaluation region), legal English (64 windows of Debian's license texts) and
the WordNet probe (200 items, chance 25%); prune wall time and the prune process's peak memory.

Resumable: every finished row is a line of benchmarks/results/experts.jsonl.

    python benchmarks/experts.py [--only proxy,reap50] [--probe-items 200]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "experts.jsonl"
WORK = ROOT / "bench-out" / "experts"
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(HERE))
from measure import cache, cli_timed, quality  # noqa: E402

EVAL = ["--windows", "64", "--seq-len", "512"]
EXPERTS, TOP_K, TEMPERATURE = 8, 2, 1.0
CRITERIA = ("reap", "frequency", "naee", "random")
ROWS: dict[str, tuple[str | None, list[str] | None]] = {  # name: (input row, `secateur` arguments)
    "dense": (None, None),
    "proxy": (None, None),
    **{f"{c}{int(f * 100)}": ("proxy", ["prune", "--method", "experts", "--criterion", c, "--remove-fraction", str(f)])
       for f in (0.25, 0.5) for c in CRITERIA},
    "reap50+recovery": ("reap50", ["train"]),
}


def dense_dir() -> Path:
    from secateur.demo import default_model_dir

    return default_model_dir()


def proxy_dir() -> Path:
    """The MoEfied SmolLM2, built once."""
    target = cache() / "models" / f"smollm2-moefied-{EXPERTS}x192-top{TOP_K}"
    if (target / "config.json").is_file():
        return target
    from secateur.config import CalibConfig
    from secateur.data.calibration import calibration_data
    from secateur.experts.moefy import moefy
    from secateur.io import load_model, save

    model, tokenizer = load_model(dense_dir())
    windows = calibration_data(model, tokenizer, CalibConfig(samples=32))
    clock = time.perf_counter()
    moe = moefy(model, windows, experts=EXPERTS, top_k=TOP_K, temperature=TEMPERATURE)
    how = {"moefied_from": str(dense_dir()), "experts": EXPERTS, "top_k": TOP_K, "temperature": TEMPERATURE,
           "calibration": "enwiki-sample, 32 x 512, seed 0", "seconds": time.perf_counter() - clock}  # fmt: skip
    save(moe, tokenizer, target, {"moefication": how})
    return target


def path_of(name: str) -> Path:
    return {"dense": dense_dir, "proxy": proxy_dir}[name]() if ROWS[name][0] is None else WORK / name


def build(name: str) -> dict:
    """Prune (or train) the row's model unless it is there: its stage record, time and peak memory."""
    source, args = ROWS[name]
    if args is None:
        return {}
    out, timing = path_of(name), {}
    if not (out / "secateur.json").exists():
        printed, seconds, peak = cli_timed(args[0], path_of(source), *args[1:], "--out", out)
        print(printed, flush=True)
        timing = {"wall_seconds_command": seconds, "peak_rss_mib": peak}
    record = json.loads((out / "secateur.json").read_text())["history"][-1]
    result = record["result"]
    return {**timing, "seconds_stage": record["seconds"], "parameters": result.get("parameters_after"),
            "removed": [b["removed"] for b in result.get("blocks", [])] or None}  # fmt: skip


def measure(name: str, probe_items: int) -> dict:
    clock = time.perf_counter()
    row = {"row": name, "args": ROWS[name][1], **build(name)}
    if row.get("parameters") is None:
        from transformers import AutoConfig, AutoModelForCausalLM

        with __import__("torch").device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path_of(name)))
        row["parameters"] = sum(p.numel() for p in model.parameters())
    row.update(quality(path_of(name), EVAL, probe_items))
    row["wall_seconds"] = time.perf_counter() - clock
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated rows (default: all)")
    parser.add_argument("--probe-items", type=int, default=200)
    args = parser.parse_args()
    done = {json.loads(line)["row"] for line in RESULTS.read_text().splitlines()} if RESULTS.exists() else set()
    for name in (args.only.split(",") if args.only else ROWS):
        if name in done:
            continue
        row = measure(name, args.probe_items)
        print(json.dumps(row), flush=True)
        with RESULTS.open("a") as f:
            f.write(json.dumps(row) + "\n")
    table()


def table() -> None:
    rows = {r["row"]: r for r in map(json.loads, RESULTS.read_text().splitlines())}
    base = rows.get("proxy")
    print("| row | parameters | enwiki ppl | x proxy | legal ppl | x proxy | probe acc | prune s | peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        ratio = lambda k: f"{r[k] / base[k]:.2f}" if base else ""  # noqa: E731
        print(f"| {name} | {r['parameters']:,} | {r['ppl_enwiki']:.2f} | {ratio('ppl_enwiki')} | {r['ppl_legal']:.2f} | "
              f"{ratio('ppl_legal')} | {r['probe_acc']:.3f} | {r.get('seconds_stage') or 0:.1f} | "
              f"{r.get('peak_rss_mib') or 0:.0f} |")


if __name__ == "__main__":
    main()
