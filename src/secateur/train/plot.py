"""The training curve of a recovery run: loss and validation perplexity against training tokens."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_metrics(metrics: str | Path, png: str | Path, title: str = "recovery") -> Path:
    """Write a PNG with the training loss (left axis) and the validation perplexity (right axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics)
    fig, loss_axis = plt.subplots(figsize=(7, 4), dpi=110)
    loss_axis.plot([r["tokens"] for r in rows], [r["loss"] for r in rows], color="tab:blue", lw=1.2, label="training loss")
    loss_axis.set_xlabel("training tokens")
    loss_axis.set_ylabel("training loss", color="tab:blue")
    validated = [r for r in rows if "val_perplexity" in r]
    if validated:
        ppl_axis = loss_axis.twinx()
        ppl_axis.plot([r["tokens"] for r in validated], [r["val_perplexity"] for r in validated], "o-",
                      color="tab:red", lw=1.2, label="validation perplexity")  # fmt: skip
        ppl_axis.set_ylabel("validation perplexity", color="tab:red")
    loss_axis.set_title(title)
    loss_axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return Path(png)
