"""What `secateur plan` writes: the recipe (plan.toml, runnable by `secateur prune --recipe`), the
Pareto front as a table (front.md) and a plot (pareto.png), and every figure (plan.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from secateur.output import Output

PLAN_FILE = "plan.json"  # what marks a directory as a plan (--overwrite replaces only such a one)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def recipe_toml(record: dict[str, Any]) -> str:
    """The chosen candidate as [[stage]] tables, with what the plan predicted in comments."""
    chosen = record["chosen"]
    lines = [f"# secateur plan: --target {record['target']} for {record['model']}",
             f"# chosen {chosen['key']} ({chosen['kind']}): {chosen['params'] / 1e6:.1f}M parameters, "
             f"file {chosen['file_bytes'] / 1e6:.1f} MB, KL to dense {chosen['kl']:.4f} on {chosen['windows']} windows"]  # fmt: skip
    if record["metric"] == "draft":
        check = chosen["check"]
        lines.append(f"# as the speculative draft of the model in {record['costs']['engine']['engine']}: measured "
                     f"{check['speedup']:.2f}x with {check['draft_tokens']} proposals per round (acceptance "
                     f"{check['acceptance']:.3f}, output {'identical' if check['identical'] else 'NOT identical'}); "
                     f"predicted {chosen['draft_speedup']:.2f}x with {chosen['draft_tokens']}")
    elif chosen["decode_speedup"] is not None:
        how = "timed against dense" if chosen["measured"] else "predicted"
        lines.append(f"# {how} in {record['costs']['engine']['engine']}: decode {chosen['decode_speedup']:.2f}x, "
                     f"prefill {chosen['prefill_speedup']:.2f}x")
    stages = [*record["stages"], *([{"method": "recovery", "tokens": record["recover_tokens"]}]
                                   if record["recover_tokens"] else [])]  # fmt: skip
    for stage in stages:
        lines += ["", "[[stage]]", *(f"{k} = {_toml_value(v)}" for k, v in stage.items())]
    return "\n".join(lines) + "\n"


def front_table(record: dict[str, Any]) -> str:
    if record["metric"] == "draft":
        return draft_table(record)
    rows = {r["key"]: r for r in record["candidates"]}
    speed = record["costs"].get("engine") is not None
    head = "| candidate | kind | KL to dense | windows | parameters | file MB |" + (" decode x | prefill x |" if speed else "")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for key in record["front"]:
        r = rows[key]
        mark = " (chosen)" if key == record["chosen"]["key"] else ("" if r["feasible"] else " (misses the target)")
        line = (f"| {key}{mark} | {r['kind']} | {r['kl']:.4f} | {r['windows']} | {r['params'] / 1e6:.1f}M | "
                f"{r['file_bytes'] / 1e6:.1f} |")  # fmt: skip
        if speed:
            star = "" if r["measured"] else "*"
            line += f" {r['decode_speedup']:.2f}{star} | {r['prefill_speedup']:.2f}{star} |"
        lines.append(line)
    if speed:
        lines.append("\n\\* predicted by the cost model (the others were timed on their own shape against the dense model)")
    if any(r.get("vocabulary") for r in record["candidates"]):
        lines.append("\nWith fewer tokens (-v: tokens kept) the KL column adds the cross-entropy the vocabulary adds on "
                     "the windows' text re-tokenized, per token of the dense tokenization (negative where the text "
                     "keeps its tokens: the removed tokens' probability goes to the kept ones)")
    return "\n".join(lines) + "\n"


def draft_table(record: dict[str, Any]) -> str:
    """--target draft: the front of agreement against cost per token, then the drafts run for real."""
    rows = {r["key"]: r for r in record["candidates"]}
    head = ("| candidate | kind | agreement | windows | parameters | draft cost (decode steps) | k | "
            "predicted speculative x | measured x | acceptance | identical |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    keys = list(dict.fromkeys([*record["front"], *(c["key"] for c in record["costs"]["checks"])]))
    for key in sorted(keys, key=lambda k: -rows[k]["draft_speedup"]):
        r, check = rows[key], rows[key].get("check") or {}
        mark = " (chosen)" if key == record["chosen"]["key"] else ""
        measured = (f"{check['speedup']:.2f} | {check['acceptance']:.3f} | {check['identical']} |" if check
                    else "| | |")  # fmt: skip
        lines.append(f"| {key}{mark} | {r['kind']} | {r['agree']:.3f} | {r['windows']} | {r['params'] / 1e6:.1f}M | "
                     f"{1 / r['decode_speedup']:.3f}{'' if r['measured'] else '*'} | {r['draft_tokens']} | "
                     f"{r['draft_speedup']:.2f} | {measured}")  # fmt: skip
    lines.append("\n\\* the draft's cost per token predicted by the cost model; the front: no other candidate both agrees "
                 "more often and costs less; measured: run as the draft of the model")
    return "\n".join(lines) + "\n"


def pareto_plot(record: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = record["metric"]
    draft = metric == "draft"
    rows = [r for r in record["candidates"] if r["kl"] is not None and (r.get("agree") is not None or not draft)]

    def cost(r: dict[str, Any]) -> float:
        if draft:
            return 1 / r["decode_speedup"]
        if metric in ("decode-speedup", "prefill-speedup"):
            return r[metric.replace("-", "_")]
        return r["params"] / 1e6 if metric == "params" else r["file_bytes"] / 1e6

    def quality(r: dict[str, Any]) -> float:
        return 1 - r["agree"] if draft else r["kl"]

    label = {"decode-speedup": "decode speedup", "prefill-speedup": "prefill speedup", "params": "parameters (M)",
             "file": "file (MB)", "draft": "draft cost per token (dense decode steps)"}[metric]  # fmt: skip
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, colour in (("depth", "tab:blue"), ("width", "tab:orange"), ("width+hidden", "tab:purple"),
                         ("experts", "tab:brown"), ("vocabulary", "tab:gray")):  # fmt: skip
        pts = [r for r in rows if r["kind"] == kind]
        if pts:
            ax.scatter([cost(r) for r in pts], [quality(r) for r in pts], s=18, c=colour, label=f"{kind} only")
    mixed = [r for r in rows if " + " in r["kind"]]
    ax.scatter([cost(r) for r in mixed], [quality(r) for r in mixed], s=18, c="tab:green", label="mixed")
    front = [next(r for r in rows if r["key"] == k) for k in record["front"]]
    ax.plot([cost(r) for r in front], [quality(r) for r in front], "k-", lw=1, label="Pareto front")
    chosen = record["chosen"]
    ax.scatter([cost(chosen)], [quality(chosen)], s=90, facecolors="none", edgecolors="red", label="chosen")
    if not draft:
        target = record["value"] / (1e6 if metric in ("params", "file") else 1)
        ax.axvline(target, color="red", ls="--", lw=1, label=f"target {record['target']}")
    ax.set_xlabel(label)
    ax.set_ylabel("disagreement with the dense model's argmax" if draft else "KL to the dense model (proxy)")
    if not draft and all(quality(r) > 0 for r in rows):
        ax.set_yscale("log")
    elif not draft:  # a smaller vocabulary can score below zero (see front_table)
        ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_title(f"secateur plan: {Path(record['model']).name}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_plan(output: Output, record: dict[str, Any]) -> Path:
    """All four files into the claimed output, atomically (a hidden sibling renamed at the end)."""
    with output.write() as work:
        (work / "plan.toml").write_text(recipe_toml(record))
        (work / "front.md").write_text(front_table(record))
        (work / PLAN_FILE).write_text(json.dumps(record, indent=2, default=str))
        pareto_plot(record, work / "pareto.png")
    return output.path
