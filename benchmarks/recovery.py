"""Recovery by training on SmolLM2-135M (CPU): one-shot pruned models, then B training tokens.

Start models (one-shot, the README's recommended recipes): width 50% and 20% (fluctuation, uniform),
SparseGPT 2:4 (permute + reconstruct), SparseGPT 70%, depth 20% (angular, compensated). Each is then
trained with `secateur train` on B tokens of the enwiki sample outside the evaluation region (the
same windows and order for every recipe: seed 0), and evaluated with protocol v1 (64 x 512 windows).

Recipes: `default` (secateur's defaults: distillation, full fine-tune, lr 1e-3), `ce-full`
(cross-entropy, full, the same learning rate), `llm-pruner` (LoRA r = 8 on every projection, lr 1e-4,
cross-entropy), `perp` (norms and biases, distillation), `squarehead` (the default plus layer-wise
distillation of every block's output, Kurtic et al. 2023). The issue's "distillation, full fine-tune"
is the default.

Large-sparse against small-dense (Zhu & Gupta's question): gradual magnitude pruning to 50% and 75%
during distillation from the dense model, against width-pruned models with the same non-zero block
parameters (width 50% and 75%) and one-shot SparseGPT 50% and 75% trained the same way.

Resumable: every finished run is a line of benchmarks/results/recovery.jsonl and is skipped next
time; an interrupted run goes on from its checkpoints (--resume).

Held-out domains (--domains): the default recipe on width 20%, depth 20%, width 50% and 2:4, trained
on B tokens of the enwiki sample alone or of the offline mixture (`--calib offline-mix`: enwiki,
newsgroups, code, docs), each model before and after scored on every corpus's evaluation region
(32 x 512 windows each; news-sample and legal-sample are in no training set) and on the WordNet probe
(200 items) and the Google analogies (secateur_analogy, 200 items). Rows in
benchmarks/results/recovery-domains.jsonl, per-model scores cached in
bench-out/recovery/quality/.

    python benchmarks/recovery.py [--tokens 131072] [--only width50:default,24:default] [--table]
    python benchmarks/recovery.py --domains [--only width20:mix]
    python benchmarks/recovery.py --domains --tokens 32768 --only width20:mix:lr3e-4   # a recipe sweep row
    python benchmarks/recovery.py --domains --only width20:mix:self50   # half the windows written by the teacher
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "recovery.jsonl"
WORK = ROOT / "bench-out" / "recovery"
sys.path.insert(0, str(ROOT / "src"))
B = 131072  # the training budget

STARTS = {
    "width50": ["--method", "width", "--remove-fraction", "0.5"],
    "24": ["--method", "sparsegpt", "--pattern", "2:4", "--permute", "--refine", "reconstruct"],
    "width20": ["--method", "width", "--remove-fraction", "0.2"],
    # width 50% with one key/value group of three removed (the default rounds 1.5 up to two) and
    # narrower MLPs making up the parameters: the split the Adapt-Pruner route ended with
    "width50-a33": ["--method", "width", "--remove-fraction", "0.5", "--attention-fraction", "0.34"],
    # width 50% with every key/value group kept: the MLP alone gives the parameters (two thirds of it)
    "width50-a0": ["--method", "width", "--remove-fraction", "0.5", "--attention-fraction", "0"],
    # width 20% with every key/value group kept (the default rounds 0.6 groups up to one removed)
    "width20-a0": ["--method", "width", "--remove-fraction", "0.2", "--attention-fraction", "0"],
    "depth20": ["--method", "angular", "--remove-fraction", "0.2"],
    "sparse70": ["--method", "sparsegpt", "--sparsity", "0.7", "--steps", "4", "--refine", "reconstruct"],
    # large-sparse against small-dense (the same non-zero block parameters, the same training tokens)
    "sparse50": ["--method", "sparsegpt", "--sparsity", "0.5", "--steps", "4", "--refine", "reconstruct"],
    "width75": ["--method", "width", "--remove-fraction", "0.75"],
    "sparse75": ["--method", "sparsegpt", "--sparsity", "0.75", "--steps", "4", "--refine", "reconstruct"],
}
RECIPES = {
    "default": [],
    "ce-full": ["--kd-weight", "0"],
    "llm-pruner": ["--mode", "lora", "--lora-rank", "8", "--lr", "1e-4", "--kd-weight", "0"],
    "perp": ["--mode", "perp"],
    "gradual50": ["--prune-to", "0.5"],  # from the dense model: gradual magnitude during distillation
    "gradual75": ["--prune-to", "0.75"],
    "top64": ["--top-k", "64"],  # the default with cached top-64 teacher logits: what caching costs
    "float32": ["--precision", "float32"],  # the default in float32: what bfloat16 autocast costs
    # from the dense model: width 50% removed a few percent at a time while distilling (Adapt-Pruner)
    "incremental50": ["--prune-width", "0.5"],
    # the same with Adapt-Pruner's per-block shares (input-output cosine similarity, A = 0.03)
    "incremental50-ap": ["--prune-width", "0.5", "--width-allocation", "adapt-pruner"],
    # the same shares in every block (A = 0): what the cosine allocation adds beyond its rounding of heads
    # the same in another window order (the same tokens): how much of its result is the data order
    "incremental50-ap-s1": ["--prune-width", "0.5", "--width-allocation", "adapt-pruner", "--train-seed", "1"],
    "incremental20-ap": ["--prune-width", "0.2", "--width-allocation", "adapt-pruner"],
    "incremental50-ap0": ["--prune-width", "0.5", "--width-allocation", "adapt-pruner", "--width-amplitude", "0"],
    # the default at a third of its peak learning rate: for starts that pruning damaged less
    "lr3e-4": ["--lr", "3e-4"],
    # the mode's fixed rate, which the default was before the rate was chosen by the start's distance from
    # its teacher (rows run before 2026-12-08 under "default" trained at it)
    "lr1e-3": ["--lr", "1e-3"],
    "lr1e-4": ["--lr", "1e-4"],
    "t2": ["--temperature", "2"],  # distillation temperature 2 (the loss scaled by T^2)
    # the default plus SquareHead's layer-wise distillation of every block's output, weight 1
    "squarehead": ["--hidden-weight", "1"],
    # the default once more: a row whose start was pruned again (on another machine) since its first run
    "default2": [],
    # the default with half the windows per step: twice the optimizer steps on the same tokens
    "mb2": ["--micro-batch", "2"],
    # the default in another window order of the same tokens: how much of a result is the data order
    "s1": ["--train-seed", "1"],
    # the same, each position's squared error divided by the teacher's squared norm there
    "layerwise": ["--hidden-weight", "1", "--hidden-norm", "position"],
    # self-data distillation: half (all) of the training windows continued by the teacher after their first
    # 32 tokens of corpus text
    "self50": ["--self-data", "0.5"],
    "self100": ["--self-data", "1"],
}
# the order runs are taken in: the headline rows first
PLAN = ["width50:default", "24:default", "width20:default", "depth20:default", "sparse70:default",
        "width50:ce-full", "width50:llm-pruner", "width50:perp", "24:ce-full", "24:llm-pruner", "24:perp",
        "dense:gradual50", "sparse50:default", "dense:gradual75", "width75:default", "width50:top64",
        "width50:float32", "dense:incremental50",
        "24:lr3e-4", "depth20:lr3e-4", "width20:lr3e-4", "sparse70:lr3e-4",
        "24:squarehead", "24:layerwise", "sparse70:layerwise", "width50:layerwise", "dense:incremental50-ap", "sparse70:default2",
        "width50:mb2", "24:mb2", "sparse75:default", "dense:incremental50-ap0",
        "dense:incremental20-ap", "dense:incremental50-ap-s1", "width50-a33:default",
        "width20-a0:default", "width50-a33:ce-full", "width50-a33:s1",
        "width50-a0:default"]  # fmt: skip


def dense_model() -> Path:
    from secateur.demo import default_model_dir

    return default_model_dir()


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "secateur.cli", *map(str, args)], check=True)


def done() -> dict[str, dict]:
    if not RESULTS.exists():
        return {}
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    return {row["run"]: row for row in rows}


def start_model(name: str) -> Path:
    if name == "dense":
        return dense_model()
    out = WORK / f"start-{name}"
    if not (out / "secateur.json").exists():
        cli("prune", dense_model(), *STARTS[name], "--eval", "enwiki-sample", "--out", out)
    return out


def dense_eval() -> dict:
    cache = WORK / "dense-eval.json"
    if not cache.exists():
        out = subprocess.run([sys.executable, "-m", "secateur.cli", "eval", str(dense_model()), "--json"],
                             check=True, capture_output=True, text=True).stdout  # fmt: skip
        cache.write_text(out)
    return json.loads(cache.read_text())


def run_key(key: str, tokens: int) -> str:
    """The results' key of a run: START:RECIPE, with @TOKENS where the budget is not B."""
    return key if tokens == B else f"{key}@{tokens}"


def run(key: str, tokens: int) -> dict:
    start_name, recipe = key.split(":")
    start = start_model(start_name)
    out = WORK / f"{start_name}-{recipe}-{tokens}"
    resume = ["--resume"] if (out.parent / (out.name + ".checkpoints")).exists() else []
    clock = time.perf_counter()
    if not (out / "secateur.json").exists():
        cli("train", start, "--out", out, "--tokens", tokens, "--eval", "enwiki-sample", *RECIPES[recipe], *resume)
    wall = time.perf_counter() - clock
    manifest = json.loads((out / "secateur.json").read_text())
    begin = json.loads((start / "secateur.json").read_text()) if start_name != "dense" else {"evaluation": dense_eval()}
    record = manifest["history"][-1]["result"]
    metrics = [json.loads(line) for line in (out / record["metrics"]).read_text().splitlines()]
    return {
        "run": run_key(key, tokens), "tokens": tokens, "start": start_name, "recipe": recipe, "flags": RECIPES[recipe],
        "before": begin["evaluation"]["perplexity"], "after": manifest["evaluation"]["perplexity"],
        "parameters": manifest["structure"]["parameters"], "sparsity": manifest["structure"]["target_sparsity"],
        "steps": record["steps"], "trained_tokens": record["tokens"], "precision": record["precision"],
        "train_seconds": record["seconds"], "tokens_per_s": record["tokens_per_s"], "wall_seconds": wall,
        "best": record["best"], "masks": record["masks"], "mode": record["mode"], "peak_lr": record["schedule"]["peak_lr"],
        "curve": [{"tokens": m["tokens"], "val_perplexity": m["val_perplexity"]} for m in metrics if "val_perplexity" in m],
    }  # fmt: skip


DOMAIN_RESULTS = HERE / "results" / "recovery-domains.jsonl"
TRAINED_ON = {"enwiki": "enwiki-sample", "mix": "offline-mix"}
DOMAINS = ["enwiki-sample", "newsgroups-sample", "code-sample", "docs-sample", "news-sample", "legal-sample"]
NEVER_TRAINED = ["news-sample", "legal-sample"]
DOMAIN_PLAN = [f"{start}:{source}" for start in ("width20", "depth20", "width50", "24") for source in TRAINED_ON]


def scores(model: Path, name: str, probe_items: int = 200, tasks: tuple[str, ...] = ("probe", "analogy")) -> dict:
    """Perplexity on every domain's evaluation windows and `tasks` (the WordNet probe, the analogies),
    cached by model name."""
    cache = WORK / "quality" / f"{name}.json"
    row = json.loads(cache.read_text()) if cache.exists() else {}
    if "ppl" not in row:
        out = subprocess.run([sys.executable, "-m", "secateur.cli", "eval", str(model), "--data", ",".join(DOMAINS),
                              "--windows", "32", "--json"], check=True, capture_output=True, text=True).stdout
        row["ppl"] = {source: r["perplexity"] for source, r in json.loads(out)["domains"].items()}
    for key, task in (("probe", "secateur_wordnet"), ("analogy", "secateur_analogy")):
        if key not in row and key in tasks:
            out = subprocess.run([sys.executable, "-m", "secateur.cli", "eval", str(model), "--tasks", task, "--limit",
                                  str(probe_items), "--json"], check=True, capture_output=True, text=True).stdout
            row[key] = json.loads(out)["tasks"][task]["metrics"]["acc"]
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(row))
    return row


def row_tasks(recipe: str, tokens: int) -> tuple[str, ...]:
    """The tasks a trained model is scored on: a sweep's rows (another budget) the probe only."""
    return ("probe", "analogy") if tokens == B else ("probe",)


def domain_dir(start: str, trained_on: str, recipe: str, tokens: int) -> Path:
    return WORK / f"{start}-{trained_on}{'' if recipe == 'default' else '-' + recipe}-{tokens}"


def run_domains(key: str, tokens: int) -> dict:
    """START:SOURCE[:RECIPE] (a recipe of RECIPES; default: secateur's defaults)."""
    start_name, trained_on, recipe = (key.split(":") + ["default"])[:3]
    start = start_model(start_name)
    out = domain_dir(start_name, trained_on, recipe, tokens)
    resume = ["--resume"] if (out.parent / (out.name + ".checkpoints")).exists() else []
    if not (out / "secateur.json").exists():
        cli("train", start, "--out", out, "--tokens", tokens, "--calib", TRAINED_ON[trained_on], *RECIPES[recipe],
            *resume)
    record = json.loads((out / "secateur.json").read_text())["history"][-1]["result"]
    return {"run": run_key(key, tokens), "start": start_name, "trained_on": trained_on, "recipe": recipe,
            "flags": RECIPES[recipe], "tokens": tokens, "dense": scores(dense_model(), "dense"),
            "before": scores(start, f"start-{start_name}"),
            "after": scores(out, out.name, tasks=row_tasks(recipe, tokens)),
            "train_seconds": record["seconds"], "tokens_per_s": record["tokens_per_s"],
            "validation": record["validation"]}  # fmt: skip


def domain_table(rows: list[dict]) -> str:
    """Per start and training source: perplexity per domain before -> after, the mean log-perplexity
    change on the never-trained corpora, and the probe."""
    import math

    short = {"enwiki-sample": "enwiki", "newsgroups-sample": "newsgr.", "code-sample": "code", "docs-sample": "docs",
             "news-sample": "news*", "legal-sample": "legal*"}  # fmt: skip
    lines = ["| start | trained on | " + " | ".join(short[d] for d in DOMAINS) +
             " | Δ log ppl never trained* | probe | analogies |", "|---|---|" + "---|" * len(DOMAINS) + "---|---|---|"]
    for row in rows:
        b, a = row["before"]["ppl"], row["after"]["ppl"]
        gain = sum(math.log(a[d]) - math.log(b[d]) for d in NEVER_TRAINED) / len(NEVER_TRAINED)
        cells = " | ".join(f"{b[d]:.1f} → {a[d]:.1f}" for d in DOMAINS)
        analogies = (f"{row['before']['analogy']:.3f} → {row['after']['analogy']:.3f}"
                     if "analogy" in row["after"] else "")  # fmt: skip
        recipe = "" if row.get("recipe", "default") == "default" else f" ({row['recipe']})"
        budget = "" if row["tokens"] == B else f" @{row['tokens']:,}"
        lines.append(f"| {row['start']} | {row['trained_on']}{recipe}{budget} | {cells} | {gain:+.3f} | "
                     f"{row['before']['probe']:.3f} → {row['after']['probe']:.3f} | {analogies} |")
    dense = rows[0]["dense"] if rows else None
    if dense:
        lines.append("| dense | | " + " | ".join(f"{dense['ppl'][d]:.1f}" for d in DOMAINS) +
                     f" | | {dense['probe']:.3f} | {dense.get('analogy', float('nan')):.3f} |")
    return "\n".join(lines)


def table(rows: dict[str, dict]) -> str:
    lines = ["| start | recipe | tokens | before | after | ratio | steps | tokens/s | train s |",
             "|---|---|---|---|---|---|---|---|---|"]
    order = {key: i for i, key in enumerate(PLAN)}
    for row in sorted(rows.values(), key=lambda r: (order.get(r["run"].split("@")[0], len(order)), r["tokens"])):
        lines.append(f"| {row['start']} | {row['recipe']} | {row['tokens']:,} | {row['before']:.2f} | {row['after']:.2f} | "
                     f"{row['after'] / row['before']:.3f} | {row['steps']} | {row['tokens_per_s']:.0f} | "
                     f"{row['train_seconds']:.0f} |")  # fmt: skip
    return "\n".join(lines)


# the curves in the plot: the table (the default on every start, the references on width 50%
# and 2:4) and the default on 2:4 at other budgets; the rest are in the table
PLOTTED = ["width50:default", "width50:ce-full", "width50:llm-pruner", "width50:perp", "24:default", "24:ce-full",
           "24:llm-pruner", "24:perp", "width20:default", "depth20:default", "sparse70:default"]


def plot(rows: dict[str, dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5), dpi=110)
    colors = plt.get_cmap("tab20").colors
    shown = [r for r in rows.values() if r["run"].split("@")[0] in PLOTTED]
    for i, row in enumerate(shown):
        xs = [0] + [c["tokens"] for c in row["curve"]]
        ys = [row["before"]] + [c["val_perplexity"] for c in row["curve"]]
        budget = "" if row["tokens"] == B else f" ({row['tokens']:,} tokens)"
        ax.plot(xs, ys, "o-" if i < 10 else "s--", ms=3, color=colors[i % 20],
                label=f"{row['start']} {row['recipe']}{budget}")
    ax.set_yscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation perplexity (8 x 512, log scale; at 0: protocol v1)")
    ax.set_title("SmolLM2-135M recovery (CPU)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def throughput(steps: int, top: int) -> list[dict]:
    """Tokens/s of training steps on dense SmolLM2-135M, side by side in one process, same batch
    (4 x 512), precision (bfloat16 autocast where native) and optimizer (AdamW): a plain PyTorch
    loop (cross-entropy, no masks), secateur's step with cross-entropy, with distillation (teacher at
    every step), with cached top-k teacher logits, and with distillation plus layer-wise distillation
    of the block outputs. The first step of each is warm-up."""
    import copy

    import torch

    from secateur.io import load_model
    from secateur.data.calibration import calibration_data
    from secateur.config import CalibConfig
    from secateur.train import TrainConfig, train
    from secateur.train.config import precision_for
    from secateur.train.loss import next_token_cross_entropy

    torch.manual_seed(0)
    dense, tokenizer = load_model(dense_model())
    config = TrainConfig(tokens=(steps + 1) * 4 * 512, val_windows=1, eval_every=10**6)
    windows = calibration_data(dense, tokenizer, CalibConfig(samples=config.windows + 1, seq_len=512))
    bf16 = precision_for(config, torch.device("cpu")) == "bfloat16"
    rows = []

    for label, autocast in (("plain PyTorch (CE)", bf16), ("plain PyTorch (CE, float32)", False)):
        model = copy.deepcopy(dense).train()
        opt = torch.optim.AdamW(model.parameters(), lr=5e-5)
        times = []
        for step in range(steps + 1):
            ids = windows[step * 4 : step * 4 + 4]
            clock = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = next_token_cross_entropy(model(input_ids=ids).logits, ids)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - clock)
        rows.append({"loop": label, "tokens_per_s": 2048 * steps / sum(times[1:]), "bfloat16": autocast})
        del model, opt

    for label, extra in (("secateur CE", {"kd_weight": 0.0}), ("secateur KD", {}),
                         (f"secateur KD, cached top-{top}", {"top_k": top}),
                         ("secateur KD + layer-wise", {"hidden_weight": 1.0, "hidden_norm": "position"})):  # fmt: skip
        model = copy.deepcopy(dense)
        cfg = TrainConfig(**{**config.__dict__, **extra})
        record = train(model, cfg, windows[: cfg.windows], windows[cfg.windows :], teacher=dense, device="cpu",
                       progress=False).record  # fmt: skip
        rows.append({"loop": label, "tokens_per_s": record["tokens_per_s"], "steps": record["steps"],
                     "cache_seconds": (record["teacher_cache"] or {}).get("seconds")})  # fmt: skip
        del model
    base = rows[0]["tokens_per_s"]
    for row in rows:
        row["ratio"] = row["tokens_per_s"] / base
        print(f"{row['loop']:<32}{row['tokens_per_s']:>10.1f} tokens/s {row['ratio']:>6.3f}x", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=B, help="training tokens (rows of other budgets are keyed "
                                                                "START:RECIPE@TOKENS)")
    parser.add_argument("--only", help="comma-separated START:RECIPE keys (default: the whole plan, in order)")
    parser.add_argument("--table", action="store_true", help="print the table of finished runs and exit")
    parser.add_argument("--throughput", type=int, metavar="STEPS",
                        help="time STEPS training steps of each loop (plain PyTorch, secateur CE / KD / cached KD)")
    parser.add_argument("--top-k", type=int, default=64, help="k of the cached-logits row of --throughput")
    parser.add_argument("--domains", action="store_true", help="enwiki-only against mixture training, scored on "
                                                               "held-out domains and the probe")
    parser.add_argument("--rescore", action="store_true", help="--domains: fill scores added since a row was written "
                                                               "(the cached ones are kept) and rewrite the rows")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    if args.domains:
        finished = ({json.loads(line)["run"] for line in DOMAIN_RESULTS.read_text().splitlines()}
                    if DOMAIN_RESULTS.exists() else set())  # fmt: skip
        for key in (args.only.split(",") if args.only else DOMAIN_PLAN):
            if args.table or args.rescore or run_key(key, args.tokens) in finished:
                continue
            row = run_domains(key, args.tokens)
            with DOMAIN_RESULTS.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{key}: done in {row['train_seconds']:.0f} s", flush=True)
        rows = [json.loads(line) for line in DOMAIN_RESULTS.read_text().splitlines()] if DOMAIN_RESULTS.exists() else []
        if args.rescore:
            for row in rows:
                start = start_model(row["start"])
                out = domain_dir(row["start"], row["trained_on"], row.get("recipe", "default"), row["tokens"])
                row.update(dense=scores(dense_model(), "dense"), before=scores(start, f"start-{row['start']}"),
                           after=scores(out, out.name, tasks=row_tasks(row.get("recipe", "default"), row["tokens"])))
            partial = DOMAIN_RESULTS.with_suffix(".tmp")
            partial.write_text("".join(json.dumps(row) + "\n" for row in rows))
            partial.replace(DOMAIN_RESULTS)
        print(domain_table(rows))
        return 0
    if args.throughput:
        rows = throughput(args.throughput, args.top_k)
        with (HERE / "results" / "recovery-throughput.jsonl").open("a") as f:
            f.write(json.dumps({"steps": args.throughput, "rows": rows}) + "\n")
        return 0
    keys = args.only.split(",") if args.only else PLAN
    if not args.table:
        for key in keys:
            if run_key(key, args.tokens) in done():
                continue
            row = run(key, args.tokens)
            with RESULTS.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{key}: {row['before']:.2f} -> {row['after']:.2f} in {row['train_seconds']:.0f} s", flush=True)
    rows = done()
    print(table(rows))
    if rows:
        plot(rows, HERE / "results" / "recovery.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
