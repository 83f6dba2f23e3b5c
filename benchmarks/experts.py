"""Expert pruning on a real-weight mixture of experts: SmolLM2-135M MoEfied into a shared expert and
8 routed experts per block.

The model (no pretrained MoE is available offline): SmolLM2-135M-Instruct (the project's default
model) rewritten by `secateur.experts.moefy` as a stock Qwen2-MoE checkpoint: in every block the 768
of 1,536 MLP channels of highest mean |activation| x down-column norm form an always-on shared
expert; the other 768 are split into 8 routed experts of 96 by balanced k-means on their
co-activation; a linear router is fitted per block to the log of each expert's output norm; top-2
routing (renormalised); attention, norms and embeddings unchanged. Statistics from 16,384 calibration
tokens (enwiki sample, calibration region, 32 windows, seed 0). Built once into
~/.cache/secateur/models/smollm2-moefied-s768-8x96-top2. Active MLP channels per token: 960 of 1,536.
Quality figures are this proxy's, not a pretrained MoE's.

Rows: the dense model, the proxy, then 50% and 25% of each block's routed experts removed by every
criterion (`secateur prune --method experts --criterion C`), merged (`--merge`), and by
llm-compressor 0.14's REAPPruningModifier on the same calibration windows (its own venv), then 25% and
50% of every routed expert's channels (`--method expert-width`), and REAP 50% after the default
recovery; then the STUN rows, and reap / frequency with `--allocation global` (per-block expert
counts, the same total). Calibration: secateur's default (64 x 512 enwiki windows). Quality on text no stage saw:
protocol v1 perplexity (the first 64 windows of 512 tokens of the enwiki sample's evaluation
region), legal English (64 windows of Debian's license texts) and the WordNet probe (200 items,
chance 25%); prune wall time and the prune process's peak memory.

Resumable: every finished row is a line of benchmarks/results/experts.jsonl.

    python benchmarks/experts.py [--only proxy,reap50] [--probe-items 200]
"""

from __future__ import annotations

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
from measure import cache, cli_timed, quality, run_rows  # noqa: E402

EVAL = ["--windows", "64", "--seq-len", "512"]
EXPERTS, TOP_K, TEMPERATURE, SHARED = 8, 2, 1.0, 768
CRITERIA = ("reap", "frequency", "naee", "random", "stun")
pct = lambda fraction: str(round(float(fraction) * 100))  # noqa: E731  "0.25" -> "25"
EXPERTS_ARGS = ["prune", "--method", "experts", "--remove-fraction"]
ROWS: dict[str, tuple[str | None, list[str] | None]] = {  # name: (input row, arguments); 50% first
    "dense": (None, None),
    "proxy": (None, None),
    **{name: row for f in ("0.5", "0.25") for name, row in (
        *((f"{c}{pct(f)}", ("proxy", [*EXPERTS_ARGS, f, "--criterion", c])) for c in CRITERIA),
        (f"merge{pct(f)}", ("proxy", [*EXPERTS_ARGS, f, "--merge"])),
        (f"llmc-reap{pct(f)}", ("proxy", ["llm-compressor", f])),
        (f"expert-width{pct(f)}", ("proxy", ["prune", "--method", "expert-width", "--remove-fraction", f])),
        *(((f"reap{pct(f)}+recovery", (f"reap{pct(f)}", ["train"])),) if f == "0.5" else ()))},
    # STUN: unstructured alone against experts first, then unstructured to the same non-zero count
    **{name: row for method, total in (("wanda", "0.5"), ("wanda", "0.65"), ("sparsegpt", "0.5")) for name, row in (
        (f"{method}{pct(total)}", ("proxy", ["prune", "--method", method, "--sparsity", total])),
        (f"stun-frequency50+{method}{pct(total)}", ("frequency50", ["stun", method, total])))},
    **{f"stun50+wanda{pct(total)}": ("stun50", ["stun", "wanda", total]) for total in ("0.5", "0.65")},
    "stun-frequency50+wanda50+recovery": ("stun-frequency50+wanda50", ["train"]),  # the zeros kept
    # the shared expert slimmed as well: 25% of every expert's channels, routed and shared (about the
    # parameters of half the routed experts removed)
    "expert-width25-shared": ("proxy", ["prune", "--method", "expert-width", "--remove-fraction", "0.25",
                                        "--shared-expert"]),
    # per-block expert counts: one ranking of all blocks' experts by their share of the block's score
    **{f"{c}{pct(f)}-global": ("proxy", [*EXPERTS_ARGS, f, "--criterion", c, "--allocation", "global"])
       for f in ("0.5", "0.25") for c in ("reap", "frequency")},
}


def dense_dir() -> Path:
    from secateur.demo import default_model_dir

    return default_model_dir()


def proxy_dir() -> Path:
    """The MoEfied SmolLM2, built once."""
    target = cache() / "models" / f"smollm2-moefied-s{SHARED}-{EXPERTS}x{(1536 - SHARED) // EXPERTS}-top{TOP_K}"
    if (target / "config.json").is_file():
        return target
    from secateur.config import CalibConfig
    from secateur.data.calibration import calibration_data
    from secateur.experts.moefy import moefy
    from secateur.io import load_model, save

    model, tokenizer = load_model(dense_dir())
    windows = calibration_data(model, tokenizer, CalibConfig(samples=32))
    clock = time.perf_counter()
    moe = moefy(model, windows, experts=EXPERTS, top_k=TOP_K, temperature=TEMPERATURE, shared=SHARED)
    how = {"moefied_from": str(dense_dir()), "experts": EXPERTS, "top_k": TOP_K, "temperature": TEMPERATURE,
           "shared": SHARED,
           "calibration": "enwiki-sample, 32 x 512, seed 0", "seconds": time.perf_counter() - clock}  # fmt: skip
    save(moe, tokenizer, target, {"moefication": how})
    return target


def path_of(name: str) -> Path:
    return {"dense": dense_dir, "proxy": proxy_dir}[name]() if ROWS[name][0] is None else WORK / name


def calibration_file() -> Path:
    """The windows `secateur prune` calibrates on by default, saved for llm-compressor."""
    target = WORK / "calibration.pt"
    if not target.exists():
        import torch

        from secateur.config import CalibConfig
        from secateur.data.calibration import calibration_data
        from secateur.io import load_model

        model, tokenizer = load_model(proxy_dir())
        WORK.mkdir(parents=True, exist_ok=True)
        torch.save(calibration_data(model, tokenizer, CalibConfig()), target)
    return target


def build_peer(name: str, fraction: str) -> dict:
    """llm-compressor's REAPPruningModifier (oneshot, its own venv) on the proxy with secateur's default
    calibration windows. Its Mixtral output does not reload with stock transformers (its experts are
    saved under names the Mixtral loader does not read), so the experts it kept (its report) are cut
    from the proxy by secateur and saved; the agreement with secateur's REAP is counted per block."""
    import subprocess

    from unstructured import peer_python

    out = path_of(name)
    staging, report, timing_file = WORK / f"{name}.peer", WORK / f"{name}.report.json", WORK / f"{name}.timing.json"
    if not report.exists():
        done = subprocess.run([str(peer_python()), str(HERE / "llmcompressor_runner.py"), proxy_dir(), "--method", "reap",
                               "--sparsity", fraction, "--calib", calibration_file(), "--out", staging,
                               "--report", report], capture_output=True, text=True, check=True)  # fmt: skip
        timing_file.write_text(done.stdout.strip().splitlines()[-1])  # its JSON line: seconds, peak_mib
    timing = json.loads(timing_file.read_text())
    kept = {int(k.split(".")[2]): v for k, v in json.loads(report.read_text()).items()}
    if not (out / "secateur.json").exists():
        from secateur.experts.prune import keep_experts, set_count
        from secateur.io import load_model, save
        from secateur.models import adapter_for

        model, tokenizer = load_model(proxy_dir())
        adapter = adapter_for(model)
        for index, experts in kept.items():
            keep_experts(adapter.block_list(model)[index], adapter, experts)
        set_count(model, adapter, len(next(iter(kept.values()))))
        save(model, tokenizer, out, {"llm-compressor": {"kept": kept, **timing}})
    ours = WORK / name.removeprefix("llmc-") / "secateur.json"
    agree = None
    if ours.exists():
        blocks = json.loads(ours.read_text())["history"][-1]["result"]["blocks"]
        agree = sum(sorted(set(range(8)) - set(b["removed"])) == sorted(kept[b["block"]]) for b in blocks)
    return {"seconds_stage": timing["seconds"], "peak_rss_mib": timing["peak_mib"], "blocks_same_kept_set": agree,
            "removed": [sorted(set(range(8)) - set(kept[i])) for i in sorted(kept)]}  # fmt: skip


def weights_in_blocks(path: Path) -> tuple[int, int]:
    """(non-zero, all) weights of the layers sparsity prunes: every matrix of the decoder blocks (the
    fused experts included) but the routers, read from the safetensors."""
    from safetensors import safe_open

    nonzero = total = 0
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as tensors:
            for key in tensors.keys():
                if ".layers." in key and not key.endswith("mlp.gate.weight"):
                    tensor = tensors.get_tensor(key)
                    if tensor.ndim >= 2:
                        nonzero, total = nonzero + int(tensor.count_nonzero()), total + tensor.numel()
    return nonzero, total


def stun_args(source: str, method: str, total: str) -> list[str]:
    """STUN's second stage: unstructured sparsity inside what expert removal kept, to the non-zero count
    that `total` sparsity leaves in the unpruned proxy."""
    _, proxy = weights_in_blocks(path_of("proxy"))
    _, kept = weights_in_blocks(path_of(source))
    inside = 1 - (1 - float(total)) * proxy / kept
    return ["prune", "--method", method, "--sparsity", f"{inside:.6f}"]


def build(name: str) -> dict:
    """Prune (or train) the row's model unless it is there: its stage record, time and peak memory."""
    source, args = ROWS[name]
    if args is None:
        return {}
    if args[0] == "llm-compressor":
        return build_peer(name, args[1])
    if args[0] == "stun":
        args = stun_args(source, *args[1:])
    out, timing = path_of(name), {}
    if not (out / "secateur.json").exists():
        printed, seconds, peak = cli_timed(args[0], path_of(source), *args[1:], "--out", out)
        print(printed, flush=True)
        timing = {"wall_seconds_command": seconds, "peak_rss_mib": peak}
    record = json.loads((out / "secateur.json").read_text())["history"][-1]
    result = record["result"]
    row = {**timing, "seconds_stage": record["seconds"], "parameters": result.get("parameters_after"),
           "removed": [b["removed"] for b in result.get("blocks", []) if "removed" in b] or None,
           "experts_kept": [b["experts_after"] for b in result.get("blocks", []) if "experts_after" in b] or None}  # fmt: skip
    if record["kind"] == "sparsity":
        row["sparsity_stage"], row["stage_args"] = result["sparsity"], args
    if "wanda" in name or "sparsegpt" in name:
        row["nonzero_in_blocks"] = weights_in_blocks(out)[0]
    return row


def measure(name: str, probe_items: int) -> dict:
    clock = time.perf_counter()
    row = {"row": name, "args": ROWS[name][1], **build(name)}
    if row.get("parameters") is None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(path_of(name))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        row["parameters"] = sum(p.numel() for p in model.parameters())
    row.update(quality(path_of(name), EVAL, probe_items))
    row["wall_seconds"] = time.perf_counter() - clock
    return row


def main() -> None:
    run_rows(__doc__, RESULTS, list(ROWS), measure, table)


def table() -> None:
    rows = {r["row"]: r for r in map(json.loads, RESULTS.read_text().splitlines())}
    base = rows.get("proxy")
    print("| row | parameters | non-zero in blocks | enwiki ppl | × proxy | legal ppl | × proxy | probe acc | prune s | "
          "peak MiB | same kept set |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        ratio = lambda k: f"{r[k] / base[k]:.2f}" if base else ""  # noqa: E731
        same = r.get("blocks_same_kept_set")
        nonzero = f"{r['nonzero_in_blocks']:,}" if "nonzero_in_blocks" in r else ""
        print(f"| {name} | {r['parameters'] or 0:,} | {nonzero} | {r['ppl_enwiki']:.2f} | {ratio('ppl_enwiki')} | {r['ppl_legal']:.2f} | "
              f"{ratio('ppl_legal')} | {r['probe_acc']:.3f} | {r.get('seconds_stage') or 0:.1f} | "
              f"{r.get('peak_rss_mib') or 0:.0f} | {'' if same is None else f'{same} of 30 blocks'} |")


if __name__ == "__main__":
    main()
