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
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "llamacpp-drafts.jsonl"
WORK = ROOT / "bench-out" / "drafts"
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(HERE))
from measure import append_row, finished  # noqa: E402

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


def run(binary: str, *args):
    from secateur.bench import llama_cpp_tool, run_llama_tool
    from secateur.export.llamacpp import build

    return run_llama_tool(llama_cpp_tool(binary, build()), *args)


def measure(name: str) -> dict:
    from secateur.bench import completion_speed, continuation, speculative_stats

    name, kind = name.rsplit("-", 1)
    speeds, accepts, text = [], [], None
    for _ in range(RUNS):
        if name == "plain":
            out = run("llama-completion", "-m", gguf("dense", kind), "-n", NEW_TOKENS, "--temp", 0, "--top-k", 1,
                      "-t", THREADS, "-no-cnv", "-p", prompt())  # fmt: skip
            speeds.append(completion_speed(out.stderr))
        else:
            which, k = name.rsplit("-k", 1)
            out = run("llama-speculative-simple", "-m", gguf("dense", kind), "-md", gguf(which, kind), "--spec-type",
                      "draft-simple", "-n", NEW_TOKENS, "--temp", 0, "--top-k", 1, "--spec-draft-n-max", k, "-t",
                      THREADS, "-td", THREADS, "-p", prompt())  # fmt: skip
            _, speed, drafted, kept = speculative_stats(out.stderr)
            speeds.append(speed)
            accepts.append(kept / drafted)
        text = text if text is not None else continuation(out.stdout, prompt())
    row = {"row": f"{name}-{kind}", "type": kind, "tokens_per_second": statistics.median(speeds), "runs": speeds,
           "text": text}  # fmt: skip
    if accepts:
        which, k = name.rsplit("-k", 1)
        row.update(draft=which, k=int(k), acceptance=statistics.median(accepts))
    return row


def table() -> None:
    from secateur.bench import agree

    rows = finished(RESULTS)
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
            same = agree(a, b)
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
        done = finished(RESULTS)
        for name in args.only.split(",") if args.only else ROWS:
            if name not in done:
                append_row(RESULTS, measure(name))
    table()


if __name__ == "__main__":
    main()
