"""Dynamic depth at decoding time on SmolLM2-135M-Instruct (30 blocks), CPU: CALM-style early exit
against early-exit self-speculation, beside plain greedy decoding.

- early exit (`secateur.generate.early_exit.early_exit`), CALM's two training-free confidences:
  `softmax`, the LM head's top-1 probability, checked after blocks 9, 14, 19 and 24 (0-based; each
  check is a pass through the LM head), thresholds 0.95, 0.9 and 0.8; `saturation`, the cosine of a
  block's output with its input, checked after every block from 9 to 28, thresholds 0.99, 0.985
  and 0.98 (chosen from the cosines' spread on a news-sample prompt, `--spread`, where they let 14%
  to 83% of the tokens exit; not on the benchmark's text). Quality:
  the share of the 64 greedy tokens that equal the model's own and the position of the first that
  differs; perplexity by teacher forcing (the exits decided on the real text) on 2 x 256 tokens of
  the enwiki sample and of the news sample (never used for calibration or recovery), against the
  same loop with a threshold of 1 (no exit: the model's own perplexity).
- self-speculation (`self_speculative`): the first 8, 15 or 22 blocks draft 2 or 4 tokens, the whole
  model verifies; lossless (checked on every row).

Prompts: 3 stretches of 256 tokens of the enwiki sample's evaluation text; 64 new tokens; 1 warm-up,
then every method once per prompt, back to back with plain greedy decoding; speedup = median over
prompts of plain time / method time (prefill included). 2 threads.

Resumable: every finished row is a line of benchmarks/results/early-exit.jsonl.

    python benchmarks/early_exit.py [--only softmax-0.9,spec-15-k4] [--table]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "early-exit.jsonl"
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(HERE))
from measure import append_row, finished  # noqa: E402

EXITS = {"softmax": (9, 14, 19, 24), "saturation": tuple(range(9, 29))}
THRESHOLDS = {"softmax": (0.95, 0.9, 0.8), "saturation": (0.99, 0.985, 0.98)}
DRAFTS = ((8, 2), (8, 4), (15, 2), (15, 4), (22, 2), (22, 4))
PROMPT, NEW_TOKENS, PROMPTS = 256, 64, 3
SCORED = (("enwiki-sample", 2), ("news-sample", 2))  # texts and stretches of 256 + 256 tokens
ROWS = [f"{m}-{t}" for m, ts in THRESHOLDS.items() for t in ts] + [f"spec-{b}-k{k}" for b, k in DRAFTS]


def spread(model, tokenizer) -> None:
    """The cosines of block outputs with their inputs (blocks 9-28) over 64 positions of a news-sample
    prompt: the range the saturation thresholds are picked from."""
    import torch

    from secateur.data import load_text
    from secateur.data.windows import tokenize

    ids = tokenize(tokenizer, load_text("news-sample", "evaluation")).tolist()[:PROMPT + 64]
    with torch.no_grad():
        states = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    cosines = torch.stack([torch.cosine_similarity(states[b + 1][0, -64:], states[b][0, -64:], dim=-1)
                           for b in EXITS["saturation"]])  # (blocks, positions); states[b + 1]: block b's output
    for b, row in zip(EXITS["saturation"], cosines):
        q = row.quantile(torch.tensor([0.1, 0.5, 0.9])).tolist()
        print(f"block {b}: cosine 10% {q[0]:.4f}, median {q[1]:.4f}, 90% {q[2]:.4f}")
    blocks = torch.tensor(EXITS["saturation"])
    for t in (0.995, 0.99, 0.98, 0.97, 0.95, 0.9):
        over = cosines > t
        exit_at = torch.where(over.any(0), blocks[over.float().argmax(0)] + 1, torch.tensor(30))
        print(f"threshold {t}: mean blocks run {exit_at.float().mean():.1f}, tokens exiting {over.any(0).float().mean():.0%}")


def perplexity(model, tokenizer, measure: str, threshold: float) -> dict:
    import torch

    from secateur.data import load_text
    from secateur.data.windows import tokenize
    from secateur.generate.early_exit import early_exit

    out = {}
    for source, stretches in SCORED:
        ids = tokenize(tokenizer, load_text(source, "evaluation")).tolist()
        nll, blocks = [], []
        for i in range(stretches):
            text = ids[i * 2 * PROMPT:(i + 1) * 2 * PROMPT]
            run = early_exit(model, torch.tensor([text[:PROMPT]]), 0, threshold, EXITS[measure], forced=text[PROMPT:],
                             measure=measure)  # fmt: skip
            nll += run.nll[1:]  # the first is the prompt's own (no exit)
            blocks += run.exit_blocks
        out[source] = {"ppl": math.exp(sum(nll) / len(nll)), "mean_blocks": sum(blocks) / len(blocks)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated rows (default: all)")
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--spread", action="store_true", help="print the saturation cosines' spread and stop")
    args = parser.parse_args()
    if args.table:
        return table()
    import torch

    from secateur.data import load_text
    from secateur.data.windows import tokenize
    from secateur.demo import default_model_dir
    from secateur.generate import greedy
    from secateur.generate.early_exit import early_exit, self_speculative
    from secateur.io import load

    torch.set_num_threads(2)
    model, tokenizer = load(default_model_dir())
    if args.spread:
        return spread(model, tokenizer)
    ids = tokenize(tokenizer, load_text("enwiki-sample", "evaluation")).tolist()
    prompts = [torch.tensor([ids[i * 4096:i * 4096 + PROMPT]]) for i in range(PROMPTS)]
    done = finished(RESULTS)
    if "none" not in done:  # the model's own perplexity through the same loop
        append_row(RESULTS, {"row": "none", "perplexity": perplexity(model, tokenizer, "softmax", 1.0)})
    greedy(model, prompts[0], 8)  # warm-up
    for name in args.only.split(",") if args.only else ROWS:
        if name in done:
            continue
        clock = time.perf_counter()
        row = {"row": name, "prompts": []}
        measure, _, threshold = name.partition("-")
        for prompt in prompts:
            plain = greedy(model, prompt, NEW_TOKENS)
            if measure in EXITS:
                run = early_exit(model, prompt, NEW_TOKENS, float(threshold), EXITS[measure], measure=measure)
                extra = {"mean_blocks": statistics.mean(run.exit_blocks)}
            else:
                blocks, k = (int(x) for x in name[len("spec-"):].split("-k"))
                run = self_speculative(model, prompt, NEW_TOKENS, blocks, k)
                extra = {"acceptance": run.acceptance}
            same = [a == b for a, b in zip(run.tokens, plain.tokens)]
            row["prompts"].append({"plain_seconds": plain.seconds, "seconds": run.seconds, "agree": sum(same) / len(same),
                                   "first_difference": same.index(False) if False in same else None, **extra})  # fmt: skip
        if measure in EXITS:
            row["perplexity"] = perplexity(model, tokenizer, measure, float(threshold))
        row["wall_seconds"] = time.perf_counter() - clock
        append_row(RESULTS, row)
    table()


def table() -> None:
    rows = finished(RESULTS)
    none = rows.pop("none", None)
    if none:
        print("no exit: " + ", ".join(f"{s} perplexity {v['ppl']:.2f}" for s, v in none["perplexity"].items()) + "\n")
    print("| method | speedup (median) | tokens equal to greedy | first difference | blocks run per token | "
          "acceptance | enwiki ppl | news ppl |")
    print("|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        prompts = row["prompts"]
        speedup = statistics.median(p["plain_seconds"] / p["seconds"] for p in prompts)
        agree = statistics.mean(p["agree"] for p in prompts)
        first = [p["first_difference"] for p in prompts]
        blocks = f"{statistics.mean(p['mean_blocks'] for p in prompts):.1f}" if "mean_blocks" in prompts[0] else ""
        acceptance = f"{statistics.mean(p['acceptance'] for p in prompts):.1%}" if "acceptance" in prompts[0] else ""
        ppl = row.get("perplexity", {})
        cells = [f"{ppl[s]['ppl']:.2f}" if s in ppl else "" for s, _ in SCORED]
        print(f"| {name} | {speedup:.2f}x | {agree:.1%} | {', '.join('-' if f is None else str(f) for f in first)} | "
              f"{blocks} | {acceptance} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
