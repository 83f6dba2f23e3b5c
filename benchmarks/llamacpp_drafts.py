"""Pruned SmolLM2-135M-Instruct models as speculative drafts of the original in llama.cpp, CPU.

The GGUF files are `secateur export --type q8_0` and `--type f16` of the original and of the drafts
that `benchmarks/drafts.py` prunes (depth 20% and 50%, angular, compensated). Speculative decoding
is llama.cpp's own `llama-speculative-simple` (`--spec-type draft-simple`, greedy: `--temp 0
--top-k 1`, `--spec-draft-n-max` 2 or 4 tokens per round, 2 threads for both models); plain
decoding is `llama-completion` with the same sampling and threads. The prompt is the first 1,200
characters of the enwiki sample (225 tokens); 64 new tokens; decode speed without the prompt, as
each tool reports it. Three runs each, medians. Output: the speculative continuation against the
plain greedy one, as text (identical when one is a prefix of the other: the speculative loop may
finish a round past 64 tokens).

`secateur llama-cpp` builds the binaries (llama-completion and llama-speculative-simple included).
Resumable: every finished row is a line of benchmarks/results/llamacpp-drafts.jsonl.

    python benchmarks/llamacpp_drafts.py [--only depth20-k4] [--table]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "llamacpp-drafts.jsonl"
WORK = ROOT / "bench-out" / "drafts"
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(HERE))

TYPES = ("q8_0", "f16")
ROWS = [row for t in TYPES for row in (f"plain-{t}", f"depth20-k4-{t}", f"depth20-k2-{t}", f"depth50-k2-{t}")]
NEW_TOKENS, RUNS, THREADS = 64, 3, 2


def gguf(name: str, kind: str) -> Path:
    from drafts import dense, draft
    from measure import cli

    out = WORK / "gguf" / (f"{name}.gguf" if kind == "q8_0" else f"{name}-{kind}.gguf")
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        source = dense() if name == "dense" else draft(name)
        print(cli("export", source, "--gguf", out, "--type", kind), flush=True)
    return out


def prompt() -> str:
    from secateur.data import load_text

    return load_text("enwiki-sample", "evaluation")[:1200]


def run(binary: str, *args) -> subprocess.CompletedProcess:
    from secateur.export.llamacpp import build

    where = build()
    env = {**os.environ, "LD_LIBRARY_PATH": str(where)}
    return subprocess.run([str(where / binary), *map(str, args)], capture_output=True, text=True, env=env,
                          check=True)  # fmt: skip


def continuation(stdout: str) -> str:
    """The generated text after the prompt, without colour codes and surrounding whitespace."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", stdout)
    tail = prompt()[-80:]
    return text[text.index(tail) + len(tail):].strip() if tail in text else text.strip()


def measure(name: str) -> dict:
    name, kind = name.rsplit("-", 1)
    speeds, accepts, texts = [], [], []
    for _ in range(RUNS):
        if name == "plain":
            out = run("llama-completion", "-m", gguf("dense", kind), "-n", NEW_TOKENS, "--temp", 0, "--top-k", 1,
                      "-t", THREADS, "-no-cnv", "-p", prompt())  # fmt: skip
            decode = next(line for line in out.stderr.splitlines() if "eval time" in line and "prompt" not in line)
            speeds.append(float(re.search(r"([\d.]+) tokens per second", decode)[1]))
        else:
            which, k = name.rsplit("-k", 1)
            out = run("llama-speculative-simple", "-m", gguf("dense", kind), "-md", gguf(which, kind), "--spec-type",
                      "draft-simple", "-n", NEW_TOKENS, "--temp", 0, "--top-k", 1, "--spec-draft-n-max", k, "-t",
                      THREADS, "-td", THREADS, "-p", prompt())  # fmt: skip
            speeds.append(float(re.search(r"decoded\s+\d+ tokens in\s+[\d.]+ seconds, speed:\s+([\d.]+)", out.stderr)[1]))
            accepts.append(float(re.search(r"accept\s+=\s+([\d.]+)%", out.stderr)[1]) / 100)
        texts.append(continuation(out.stdout))
    row = {"row": f"{name}-{kind}", "type": kind, "tokens_per_second": statistics.median(speeds), "runs": speeds,
           "text": texts[0]}  # fmt: skip
    if accepts:
        which, k = name.rsplit("-k", 1)
        row.update(draft=which, k=int(k), acceptance=statistics.median(accepts))
    return row


def table() -> None:
    lines = RESULTS.read_text().splitlines() if RESULTS.exists() else []
    rows = {json.loads(line)["row"]: json.loads(line) for line in lines}
    print("| GGUF | draft | k | acceptance | decode tok/s | speedup | output against plain greedy |")
    print("|---|---|---|---|---|---|---|")
    for kind in TYPES:
        plain = rows.get(f"plain-{kind}")
        if plain is None:
            continue
        print(f"| {kind} | none (llama-completion) | | | {plain['tokens_per_second']:.1f} | 1.00x | |")
        for row in rows.values():
            if row["type"] != kind or "draft" not in row:
                continue
            a, b = row["text"], plain["text"]
            same = a.startswith(b) or b.startswith(a)
            shared = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            print(f"| {kind} | {row['draft']} | {row['k']} | {row['acceptance']:.1%} | {row['tokens_per_second']:.1f} | "
                  f"{row['tokens_per_second'] / plain['tokens_per_second']:.2f}x | "
                  f"{'identical' if same else f'differs after {shared} characters'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated rows (default: all)")
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    if not args.table:
        done = {json.loads(line)["row"] for line in RESULTS.read_text().splitlines()} if RESULTS.exists() else set()
        for name in args.only.split(",") if args.only else ROWS:
            if name in done:
                continue
            row = measure(name)
            print(json.dumps(row), flush=True)
            with RESULTS.open("a") as f:
                f.write(json.dumps(row) + "\n")
    table()


if __name__ == "__main__":
    main()
