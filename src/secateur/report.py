"""`secateur report`: one HTML page (and the same as Markdown) about one or more models: what was
removed, what it cost, how fast and how big, what they say. Plots are PNG files next to the page.

Everything is read from what the other commands wrote: each model's `secateur.json` (history,
structure, perplexity), its weights (per-layer sparsity, read tensor by tensor with safetensors),
and, where given, `secateur eval --tasks --results` files, `secateur bench --json` output and
`secateur eval --generate --json` output.
"""

from __future__ import annotations

import html
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secateur.errors import SecateurError
from secateur.io import read_manifest, safetensors_shapes
from secateur.output import claim

REPORT_FILE = "report.md"  # what marks a directory as a report (--overwrite replaces only such a one)

BLOCK = re.compile(r"^(?:model\.|transformer\.|gpt_neox\.)?(?:decoder\.)?(?:layers|h)\.(\d+)\.(.+)\.weight$")


class ReportError(SecateurError):
    """A report input is missing or unreadable."""


@dataclass
class ModelFacts:
    path: Path
    name: str
    manifest: dict[str, Any]
    parameters: int = 0
    nonzero: int = 0
    sparsity: dict[tuple[int, str], float] = field(default_factory=dict)  # (block, layer) -> fraction of zeros
    block_nonzero: dict[int, int] = field(default_factory=dict)
    tasks: dict[str, Any] = field(default_factory=dict)
    speed: dict[str, Any] | None = None
    samples: list[dict[str, str]] = field(default_factory=list)

    @property
    def perplexity(self) -> float | None:
        return (self.manifest.get("evaluation") or {}).get("perplexity")

    @property
    def removed(self) -> str:
        """Each stage of the history in a few words, as its kind says them: what it removed (or trained)."""
        from secateur.recipe import KINDS

        parts = []
        for record in self.manifest.get("history") or []:
            kind = KINDS.get(record.get("kind"))
            words = kind.describe(record.get("result") or {}) if kind is not None else str(record.get("kind"))
            parts += [words] if words else []
        return "; ".join(parts) or "nothing"


def read_weights(path: Path, facts: ModelFacts) -> None:
    """Parameters, non-zeros, per-layer sparsity of the block layers and non-zeros per block."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ReportError(f"{path} holds no safetensors weights; give secateur outputs or HF model directories")
    for file in files:
        safetensors_shapes(file)  # unreadable or truncated: one line, before safetensors reads it
        with safe_open(file, "pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                nonzero = int((tensor != 0).sum())
                facts.parameters += tensor.numel()
                facts.nonzero += nonzero
                match = BLOCK.match(name)
                if match:
                    block = int(match.group(1))
                    facts.block_nonzero[block] = facts.block_nonzero.get(block, 0) + nonzero
                    if tensor.dim() == 2:
                        facts.sparsity[(block, match.group(2))] = 1 - nonzero / tensor.numel()


def gather(path: str | Path, tasks: list[dict], speeds: list[dict], samples: list[dict]) -> ModelFacts:
    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"{path} is not a model directory")
    facts = ModelFacts(path, path.name, read_manifest(path) or {})
    read_weights(path, facts)
    same = lambda other: other and Path(other).resolve() == path.resolve()  # noqa: E731
    for document in tasks:
        if same(document.get("model")):
            facts.tasks.update(_part(document, "tasks", dict, "secateur eval --tasks --results"))
    facts.speed = next((s for s in speeds if same(s.get("model"))), None)
    for document in samples:
        if same(document.get("model")):
            facts.samples = _part(document, "samples", list, "secateur eval --generate --json")
    return facts


def _part(document: dict, key: str, kind: type, writer: str) -> Any:
    value = document.get(key)
    if not isinstance(value, kind):
        raise ReportError(f"a file given for {document.get('model')} has no {key} ({writer} writes them)")
    return value


# --- plots ------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sparsity(facts: ModelFacts, png: Path) -> Path | None:
    """Heat map: blocks (rows) x layers (columns), the fraction of zero weights."""
    if not facts.sparsity:
        return None
    plt = _pyplot()
    blocks = sorted({b for b, _ in facts.sparsity})
    layers = list(dict.fromkeys(name for _, name in sorted(facts.sparsity)))
    grid = [[facts.sparsity.get((b, name), math.nan) for name in layers] for b in blocks]
    fig, ax = plt.subplots(figsize=(1.6 + 0.7 * len(layers), 1.2 + 0.1 * len(blocks)), dpi=100)
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(layers)), [n.split(".")[-1] for n in layers], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(blocks)), [str(b) for b in blocks], fontsize=6)
    ax.set_ylabel("block (as saved)")
    ax.set_title(f"{facts.name}: fraction of zero weights", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png


def plot_blocks(models: list[ModelFacts], png: Path) -> Path:
    """Non-zero weights per block, every model side by side: where depth and width took parameters."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.6), dpi=100)
    width = 0.8 / len(models)
    for i, facts in enumerate(models):
        blocks = sorted(facts.block_nonzero)
        ax.bar([b + i * width for b in blocks], [facts.block_nonzero[b] / 1e6 for b in blocks], width, label=facts.name)
    ax.set_xlabel("block (as saved: removed blocks are gone, later ones renumbered)")
    ax.set_ylabel("non-zero weights (M)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (lower is better on both)."""
    return [i for i, (x, y) in enumerate(points)
            if not any((a <= x and b <= y) and (a < x or b < y) for a, b in points)]  # fmt: skip


def plot_pareto(models: list[ModelFacts], png: Path) -> Path | None:
    scored = [m for m in models if m.perplexity]
    if not scored:
        return None
    plt = _pyplot()
    points = [(m.nonzero / 1e6, m.perplexity) for m in scored]
    front = sorted(pareto(points), key=lambda i: points[i][0])
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.scatter(*zip(*points), color="tab:blue")
    for (x, y), m in zip(points, scored):
        ax.annotate(m.name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "--", color="tab:orange", label="Pareto front")
    ax.set_xlabel("non-zero parameters (M)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png


# --- the page ---------------------------------------------------------------------------------------


def summary_rows(models: list[ModelFacts]) -> tuple[list[str], list[list[str]]]:
    task_names = sorted({t for m in models for t in m.tasks})
    head = ["model", "parameters", "non-zero", "perplexity", "removed", *task_names, "decode tok/s", "prefill ms",
            "file MB"]  # fmt: skip
    rows = []
    for m in models:
        accuracy = [f"{m.tasks[t]['metrics'].get('acc', float('nan')):.3f}" if t in m.tasks else "" for t in task_names]
        speed = m.speed or {}
        rows.append([m.name, f"{m.parameters / 1e6:.1f}M", f"{m.nonzero / 1e6:.1f}M",
                     f"{m.perplexity:.2f}" if m.perplexity else "", m.removed, *accuracy,
                     f"{speed['decode_tokens_per_second']:.1f}" if speed else "",
                     f"{speed['prefill_seconds'] * 1e3:.0f}" if speed else "",
                     f"{speed['file_bytes'] / 1e6:.0f}" if speed else ""])  # fmt: skip
    return head, rows


def write_report(paths: list[str | Path], out: str | Path, *, tasks: list[Path] = (), bench: Path | None = None,
                 samples: list[Path] = (), overwrite: bool = False) -> Path:  # fmt: skip
    """Write `out/index.html`, `out/report.md` and the plots; returns the HTML page."""
    inputs = [*paths, *tasks, *([bench] if bench else []), *samples]
    with claim(out, inputs=inputs, overwrite=overwrite, marker=REPORT_FILE) as output:
        documents = ([_read_json(p) for p in tasks], _bench_results(bench) if bench else [],
                     [_read_json(p) for p in samples])  # fmt: skip
        models = [gather(p, *documents) for p in paths]
        with output.write() as staging:
            figures = [("Non-zero weights per block", plot_blocks(models, staging / "blocks.png")),
                       ("Quality against parameters", plot_pareto(models, staging / "pareto.png"))]
            figures += [(f"{m.name}: sparsity per layer", plot_sparsity(m, staging / f"sparsity-{i}.png"))
                        for i, m in enumerate(models)]  # fmt: skip
            figures = [(title, png.name) for title, png in figures if png is not None]
            head, rows = summary_rows(models)
            (staging / "index.html").write_text(_html(models, head, rows, figures))
            (staging / REPORT_FILE).write_text(_markdown(models, head, rows, figures))
    return output.path / "index.html"


def _bench_results(path: Path) -> list[dict]:
    results = _read_json(path).get("results")
    if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
        raise ReportError(f"{path} is not `secateur bench --json` output (no list of results)")
    return results


def _read_json(path: Path) -> dict:
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ReportError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path}: cannot read it as JSON ({exc})") from None
    if not isinstance(document, dict):
        raise ReportError(f"{path}: not a secateur JSON file (a {type(document).__name__}, not an object)")
    return document


def _samples(models: list[ModelFacts]) -> list[tuple[str, list[tuple[str, str]]]]:
    prompts: dict[str, list[tuple[str, str]]] = {}
    for m in models:
        for s in m.samples:
            entry = prompts.setdefault(s["prompt"], [])
            if "reference" in s and not any(label == "reference" for label, _ in entry):
                entry.append(("reference", s["reference"]))
            entry.append((m.name, s["model"]))
    return list(prompts.items())


def _html(models, head, rows, figures) -> str:
    e = html.escape
    table = "<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>" + "".join(
        "<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows) + "</table>"
    plots = "".join(f'<figure><img src="{e(png)}" alt="{e(t)}"><figcaption>{e(t)}</figcaption></figure>'
                    for t, png in figures)  # fmt: skip
    samples = "".join(f"<h3>{e(prompt)}</h3><ul>" + "".join(f"<li><b>{e(who)}</b>: {e(text)}</li>" for who, text in said)
                      + "</ul>" for prompt, said in _samples(models)) or "<p>No samples given (secateur eval --generate --json).</p>"
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}th{background:#f3f3f3}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>secateur report</title><style>{style}</style>"
            f"</head><body><h1>secateur report</h1><h2 id='summary'>Summary</h2>{table}"
            f"<h2 id='removed'>What was removed, and what it cost</h2>{plots}"
            f"<h2 id='samples'>Samples</h2>{samples}</body></html>")


def _markdown(models, head, rows, figures) -> str:
    lines = ["# secateur report", "", "## Summary", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", "## What was removed, and what it cost", ""] + [f"![{t}]({png})" for t, png in figures]
    lines += ["", "## Samples", ""]
    for prompt, said in _samples(models):
        lines += [f"### {prompt}", ""] + [f"- **{who}**: {text}" for who, text in said] + [""]
    return "\n".join(lines) + "\n"
