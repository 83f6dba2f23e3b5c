"""`secateur report`: one HTML page (and the same as Markdown) about one or more models: what was
removed, what it cost, how fast and how big, what they say. Plots are PNG files next to the page.

What the other commands wrote is read: each model's `secateur.json` (history, structure, perplexity),
its weights (per-layer sparsity, read tensor by tensor with safetensors), and, where given,
`secateur eval --tasks --results` files, `secateur bench --json` output and `secateur eval --generate
--json` output. Each stage of a model's history gets the section its kind writes (`StageKind.report`).
Two things are measured here, and marked so: the perplexity of a model whose manifest has none (the
original), on the windows the other models were evaluated on, and, with --measure-speed, the speed
columns.
"""

from __future__ import annotations

import html
import json
import math
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from secateur.errors import SecateurError
from secateur.io import read_manifest, safetensors_shapes
from secateur.output import claim
from secateur.schema import Requires, option, refuse_inapplicable

REPORT_FILE = "report.md"  # what marks a directory as a report (--overwrite replaces only such a one)

BLOCK = re.compile(r"^(?:model\.|transformer\.|gpt_neox\.)?(?:decoder\.)?(?:layers|h)\.(\d+)\.(.+)\.weight$")


class ReportError(SecateurError):
    """A report input is missing or unreadable."""


@dataclass(frozen=True)
class ReportConfig:
    """What `secateur report` reads besides the models, and what it measures; its flags are generated
    from these fields."""

    tasks_results: tuple[str, ...] = option((), "a `secateur eval --tasks --results` file (repeatable)")
    bench: str | None = option(None, "`secateur bench --json` output for these models (the speed columns)")
    measure_speed: bool = option(False, "time every model now for the speed columns (secateur bench's transformers "
                                        "protocol, one round, on this machine)",
                                 requires=Requires(lambda c: c.bench is None, "no --bench file"))
    samples: tuple[str, ...] = option((), "`secateur eval --generate --json` output (repeatable)")
    fill_perplexity: bool = option(True, "evaluate a model whose manifest holds no perplexity (the original) on the "
                                         "windows the other models were evaluated on")

    def __post_init__(self) -> None:
        refuse_inapplicable(self)


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
    measured_perplexity: float | None = None  # by the report, on the other models' windows

    @property
    def perplexity(self) -> float | None:
        return (self.manifest.get("evaluation") or {}).get("perplexity") or self.measured_perplexity

    @cached_property
    def sections(self) -> list[tuple[int, Any]]:
        """(stage number, section) for each stage of the history whose kind writes one (built once:
        the figures and both renderings read it)."""
        from secateur.recipe import KINDS

        from secateur.recipe import Section

        found = []
        for number, record in enumerate(self.manifest.get("history") or [], 1):
            kind = KINDS.get(record.get("kind"))
            if kind is None:
                found.append((number, Section(str(record.get("kind")), f"settings {record.get('settings')}")))
                continue
            try:
                section = kind.report(record)
            except (KeyError, TypeError):  # a record of an earlier version, without what the section reads
                section = Section(kind.name, kind.describe(record.get("result") or {}))
            found += [(number, section)] if section is not None else []
        return found

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


def fill_perplexity(models: list[ModelFacts]) -> str | None:
    """Evaluate the models whose manifest holds no perplexity (the original, a plain HF directory) on the
    windows the others were evaluated on, when they all were on the same ones; returns what was done
    (for the page) or None."""
    from secateur.data.sources import NAMED
    from secateur.evaluate import evaluate_sources, split_sources
    from secateur.io import load

    protocols = {(e["source"], e["windows"], e["seq_len"]) for m in models
                 if (e := m.manifest.get("evaluation") or {}).get("perplexity")}  # fmt: skip
    missing = [m for m in models if not m.perplexity]
    if not missing or len(protocols) != 1:
        return None
    source, windows, seq_len = protocols.pop()
    sources = split_sources(source)  # several: the names `combine` joined
    gone = [s for s in sources if not Path(s).exists() and s not in NAMED]
    if gone:
        return f"not measured for {', '.join(m.name for m in missing)}: the evaluation text {gone[0]} is gone"
    for m in missing:
        model, tokenizer = load(m.path)
        m.measured_perplexity = evaluate_sources(model, tokenizer, sources, seq_len, windows)["perplexity"]
    return (f"* measured by `secateur report` on the windows the other models were evaluated on ({source}, "
            f"{windows} x {seq_len} tokens)")


def measure_speeds(models: list[ModelFacts]) -> str:
    """Time every model now (secateur bench's transformers protocol, one round); returns the protocol."""
    from secateur.bench import BENCH_PROTOCOL, BenchConfig, bench
    from secateur.io import resolve_device

    config = BenchConfig()
    device = str(resolve_device(config.device))
    results = bench([m.path for m in models], rounds=1, prompt=config.prompt, new_tokens=config.new_tokens,
                    repeats=config.repeats, device=device, dtype=config.dtype)  # fmt: skip
    for m, result in zip(models, results):
        m.speed = {"decode_tokens_per_second": result.decode_tokens_per_second,
                   "prefill_seconds": result.prefill_seconds, "file_bytes": result.file_bytes}  # fmt: skip
    return f"speed measured by `secateur report` on {device}, {results[0].threads} threads; {BENCH_PROTOCOL}"


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


def plot_curve(curve: tuple[str, str, tuple[tuple[float, float], ...]], title: str, png: Path) -> Path:
    """A stage's curve (a recovery's validation perplexity against training tokens)."""
    plt = _pyplot()
    xlabel, ylabel, points = curve
    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=100)
    ax.plot(*zip(*points), marker="o")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
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
        quality = f"{m.perplexity:.2f}{'*' if m.measured_perplexity else ''}" if m.perplexity else ""
        rows.append([m.name, f"{m.parameters / 1e6:.1f}M", f"{m.nonzero / 1e6:.1f}M", quality, m.removed, *accuracy,
                     f"{speed['decode_tokens_per_second']:.1f}" if speed else "",
                     f"{speed['prefill_seconds'] * 1e3:.0f}" if speed else "",
                     f"{speed['file_bytes'] / 1e6:.0f}" if speed else ""])  # fmt: skip
    return head, rows


def write_report(paths: list[str | Path], out: str | Path, config: ReportConfig = ReportConfig(),
                 overwrite: bool = False) -> Path:  # fmt: skip
    """Write `out/index.html`, `out/report.md` and the plots; returns the HTML page."""
    tasks, samples = [Path(p) for p in config.tasks_results], [Path(p) for p in config.samples]
    bench = Path(config.bench) if config.bench else None
    inputs = [*paths, *tasks, *([bench] if bench else []), *samples]
    with claim(out, inputs=inputs, overwrite=overwrite, marker=REPORT_FILE) as output:
        documents = ([_read_json(p) for p in tasks], _bench_results(bench) if bench else [],
                     [_read_json(p) for p in samples])  # fmt: skip
        models = [gather(p, *documents) for p in paths]
        notes = [fill_perplexity(models) if config.fill_perplexity else None,
                 measure_speeds(models) if config.measure_speed else None]
        with output.write() as staging:
            page = Page(models, *summary_rows(models), [n for n in notes if n], _figures(models, staging))
            (staging / "index.html").write_text(page.html())
            (staging / REPORT_FILE).write_text(page.markdown())
    return output.path / "index.html"


def _figures(models: list[ModelFacts], staging: Path) -> dict[str, str]:
    """Every plot, by key: "blocks", "pareto", "sparsity-I" (model I's heat map, where it has zeros or a
    sparsity section), "curve-I-N" (the curve of stage N of model I)."""
    figures = {"blocks": plot_blocks(models, staging / "blocks.png"),
               "pareto": plot_pareto(models, staging / "pareto.png")}  # fmt: skip
    for i, m in enumerate(models):
        sections = m.sections
        if any(s.heatmap for _, s in sections) or any(z > 0.01 for z in m.sparsity.values()):
            figures[f"sparsity-{i}"] = plot_sparsity(m, staging / f"sparsity-{i}.png")
        for number, section in sections:
            if section.curve is not None:
                figures[f"curve-{i}-{number}"] = plot_curve(section.curve, section.title,
                                                            staging / f"curve-{i}-{number}.png")  # fmt: skip
    return {key: png.name for key, png in figures.items() if png is not None}


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


@dataclass
class Page:
    """The page as a list of parts (heading, paragraph, table, figure), rendered as HTML and Markdown."""

    models: list[ModelFacts]
    head: list[str]
    rows: list[list[str]]
    notes: list[str]
    figures: dict[str, str]

    def parts(self) -> list[tuple]:
        parts: list[tuple] = [("h1", "secateur report"), ("h2", "Summary", "summary"), ("table", self.head, self.rows)]
        parts += [("p", note) for note in self.notes]
        parts.append(("h2", "What was removed, and what it cost", "removed"))
        parts += [("img", title, self.figures[key]) for key, title in
                  (("blocks", "Non-zero weights per block"), ("pareto", "Quality against parameters"))
                  if key in self.figures]  # fmt: skip
        for i, m in enumerate(self.models):
            parts.append(("h2", m.name, f"model-{i}"))
            heatmap = self.figures.get(f"sparsity-{i}")
            sections = m.sections
            if not sections:
                parts.append(("p", "No secateur stages (the model as given)."))
            for number, section in sections:
                parts += [("h3", f"Stage {number}: {section.title}")] + ([("p", section.text)] if section.text else [])
                parts += [("table", list(section.head), [list(r) for r in section.rows])] if section.rows else []
                if f"curve-{i}-{number}" in self.figures:
                    parts.append(("img", section.title, self.figures[f"curve-{i}-{number}"]))
                if section.heatmap and heatmap:
                    parts.append(("img", f"{m.name}: sparsity per layer", heatmap))
                    heatmap = None
            if heatmap:
                parts.append(("img", f"{m.name}: sparsity per layer", heatmap))
        parts.append(("h2", "Samples", "samples"))
        samples = _samples(self.models)
        for prompt, said in samples:
            parts += [("h3", prompt), ("list", said)]
        if not samples:
            parts.append(("p", "No samples given (secateur eval --generate --json)."))
        return parts

    def html(self) -> str:
        e = html.escape
        out = []
        for part in self.parts():
            kind = part[0]
            if kind in ("h1", "h2", "h3"):
                anchor = f" id='{part[2]}'" if len(part) > 2 else ""
                out.append(f"<{kind}{anchor}>{e(part[1])}</{kind}>")
            elif kind == "p":
                out.append(f"<p>{e(part[1])}</p>")
            elif kind == "table":
                out.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in part[1]) + "</tr>" + "".join(
                    "<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in part[2]) + "</table>")
            elif kind == "img":
                out.append(f'<figure><img src="{e(part[2])}" alt="{e(part[1])}"><figcaption>{e(part[1])}</figcaption>'
                           "</figure>")
            elif kind == "list":
                out.append("<ul>" + "".join(f"<li><b>{e(who)}</b>: {e(text)}</li>" for who, text in part[1]) + "</ul>")
        style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}table{border-collapse:collapse}"
                 "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}th{background:#f3f3f3}img{max-width:100%}")
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>secateur report</title><style>{style}</style>"
                f"</head><body>{''.join(out)}</body></html>")

    def markdown(self) -> str:
        lines: list[str] = []
        for part in self.parts():
            kind = part[0]
            if kind in ("h1", "h2", "h3"):
                lines += ["#" * int(kind[1]) + " " + part[1], ""]
            elif kind == "p":
                lines += [part[1], ""]
            elif kind == "table":
                lines += ["| " + " | ".join(part[1]) + " |", "|" + "---|" * len(part[1])]
                lines += ["| " + " | ".join(row) + " |" for row in part[2]] + [""]
            elif kind == "img":
                lines += [f"![{part[1]}]({part[2]})", ""]
            elif kind == "list":
                lines += [f"- **{who}**: {text}" for who, text in part[1]] + [""]
        return "\n".join(lines).rstrip() + "\n"
