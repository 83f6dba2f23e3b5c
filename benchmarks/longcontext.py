"""Long-context retrieval with GemFilter token pruning, on SmolLM2-135M-Instruct, CPU.

Haystacks are built offline from the enwiki sample's evaluation text (the first half of its tokens;
`secateur filter-layer` reads the second half): 2,048, 4,096 and 8,176 tokens (SmolLM2's context is
8,192; 16 are left for the answer), one planted fact ("The secret number of Oslo is 48213.") at
depths 0.1, 0.3, 0.5, 0.7 and 0.9, two needles per depth, the question at the end, in the chat
template. Each haystack is answered, greedily (16 new tokens), by:

- full: the whole prompt;
- gemfilter-K: GemFilter at the filter layer `secateur filter-layer` recommends (at length 4,096,
  budget 512, 8 haystacks), keeping K = 256, 512 or 1,024 tokens; at 8,176 tokens also at the layer
  it recommends at that length (budget 1,024, 4 haystacks), rows `8176-i@8176`;
- last-K: the naive baseline, the last K tokens of the prompt.

An answer is right when it states the number. Time to first token: the filter pass (GemFilter) and
the prefill of what is kept, up to the first new token; methods run back to back on each haystack,
so machine drift falls on all of them alike; the table shows medians and the median of per-haystack
speedups over the full prompt. One warm-up first. 2 threads.

Resumable: every finished haystack is a line of benchmarks/results/longcontext.jsonl (the filter
layer search is the first line).

    python benchmarks/longcontext.py [--only 2048-0,8176-3] [--table]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "longcontext.jsonl"
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(HERE))
from measure import append_row, finished  # noqa: E402

LENGTHS = (2048, 4096, 8176)
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)
SEEDS = (0, 1)
BUDGETS = (256, 512, 1024)
NEW_TOKENS = 16
SEARCH = dict(length=4096, samples=8, budget=512)
LONG_SEARCH = dict(length=8176, samples=4, budget=1024)  # the layer chosen at the longest length
ROWS = [f"{length}-{i}" for length in LENGTHS for i in range(len(DEPTHS) * len(SEEDS))]
LONG_ROWS = [f"8176-{i}@8176" for i in range(len(DEPTHS) * len(SEEDS))]


def methods(row: str = "") -> list[str]:
    if row.endswith("@8176"):  # the haystacks again, GemFilter at the block chosen at 8,176 tokens
        return ["full", *(f"gemfilter-{k}" for k in BUDGETS)]
    return ["full", *(f"gemfilter-{k}" for k in BUDGETS), *(f"last-{k}" for k in BUDGETS)]


def answer(model, tokenizer, prompt: list[int], haystack, pruning=None) -> dict:
    import torch

    from secateur.data.haystack import answered
    from secateur.generate import greedy
    from secateur.generate.tokens import prune_prompts

    start = time.perf_counter()
    kept = prune_prompts(model, [prompt], pruning)[0] if pruning is not None else prompt
    filtered = time.perf_counter() - start
    decoded = greedy(model, torch.tensor([kept]), NEW_TOKENS)
    text = tokenizer.decode(decoded.tokens, skip_special_tokens=True)
    return {"right": answered(text, haystack), "ttft": filtered + decoded.first_token_seconds, "kept": len(kept),
            "filter_seconds": filtered, "answer": text.strip()[:60]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated rows (default: all)")
    parser.add_argument("--table", action="store_true", help="print the table of the rows measured so far")
    args = parser.parse_args()
    if args.table:
        return table()
    import torch

    from secateur.data import load_text
    from secateur.data.haystack import haystacks
    from secateur.data.windows import tokenize
    from secateur.demo import default_model_dir
    from secateur.generate.filter_layer import FilterSearch, find_filter_layer
    from secateur.generate.tokens import TokenPruning
    from secateur.io import load

    torch.set_num_threads(2)
    model, tokenizer = load(default_model_dir())
    done = finished(RESULTS)
    for key, search in (("search", SEARCH), ("search-8176", LONG_SEARCH)):
        if key not in done:
            clock = time.perf_counter()
            found = find_filter_layer(model, tokenizer, FilterSearch(**search))
            done[key] = {"row": key, **search, "filter_layer": found["filter_layer"], "recall": found["recall"],
                             "seconds": time.perf_counter() - clock}  # fmt: skip
            append_row(RESULTS, done[key])
    ids = tokenize(tokenizer, load_text("enwiki-sample", "evaluation")).tolist()
    ids = ids[: len(ids) // 2]
    stacks = {}
    for length in LENGTHS:
        built = [h for seed in SEEDS for h in haystacks(tokenizer, ids, length, DEPTHS, seed=seed,
                                                         offset=seed * len(DEPTHS) * length)]  # fmt: skip
        stacks.update({f"{length}-{i}": h for i, h in enumerate(built)})
    warm = stacks[ROWS[0]]
    answer(model, tokenizer, warm.ids, warm, TokenPruning(filter_layer=0, budget=256))
    for name in args.only.split(",") if args.only else ROWS + LONG_ROWS:
        if name in done:
            continue
        haystack = stacks[name.split("@")[0]]
        layer = done["search-8176" if name.endswith("@8176") else "search"]["filter_layer"]
        row = {"row": name, "length": len(haystack.ids), "depth": haystack.depth, "filter_layer": layer}
        for method in methods(name):
            kind, _, budget = method.partition("-")
            if kind == "full":
                row[method] = answer(model, tokenizer, haystack.ids, haystack)
            elif kind == "gemfilter":
                row[method] = answer(model, tokenizer, haystack.ids, haystack,
                                     TokenPruning(filter_layer=layer, budget=int(budget)))  # fmt: skip
            else:
                row[method] = answer(model, tokenizer, haystack.ids[-int(budget):], haystack)
        append_row(RESULTS, row)
    table()


def table() -> None:
    rows = finished(RESULTS)
    for key in ("search", "search-8176"):
        search = rows.pop(key, None)
        if search:
            recall = " ".join(f"{r:.2f}" for r in search["recall"])
            print(f"filter layer {search['filter_layer']} (recall of the answer's tokens by block at budget "
                  f"{search['budget']} of {search['length']}: {recall})\n")
    print("| prompt tokens | method | haystacks | retrieval accuracy | kept tokens | time to first token (median) | "
          "speedup (median) |")
    print("|---|---|---|---|---|---|---|")
    for length, suffix in [*((n, "") for n in LENGTHS), (8176, "@8176")]:
        group = [r for r in rows.values() if r["row"].startswith(f"{length}-") and r["row"].endswith(suffix)
                 and ("@" in r["row"]) == bool(suffix)]  # fmt: skip
        if not group:
            continue
        for method in methods(suffix):
            right = sum(r[method]["right"] for r in group)
            ttft = statistics.median(r[method]["ttft"] for r in group)
            speedup = statistics.median(r["full"]["ttft"] / r[method]["ttft"] for r in group)
            kept = statistics.median(r[method]["kept"] for r in group)
            label = method if method == "full" or not method.startswith("gemfilter") else \
                f"{method} (block {group[0]['filter_layer']})"
            print(f"| {length} | {label} | {len(group)} | {right / len(group):.0%} ({right}/{len(group)}) | "
                  f"{kept:.0f} | {ttft:.2f} s | {speedup:.2f}x |")


if __name__ == "__main__":
    main()
