"""`secateur info`: architecture, parameters, per-layer sparsity, the manifest's history and structure."""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

from secateur.commands.job import print_structure, summary
from secateur.io import load, read_manifest, structure_section


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="architecture, parameters, per-layer sparsity, manifest summary")
    p.add_argument("model", help="HF model directory or .gguf file")
    p.add_argument("--json", action="store_true", help="print everything as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from secateur.manifest import history_of
    from secateur.sparsity.prune import sparsity_table

    from secateur.io import nonfinite

    model, _ = load(args.model, allow_nonfinite=True)  # info describes the weights, NaN included
    layers = sparsity_table(model)
    bad = nonfinite(model)
    total = sum(p.numel() for p in model.parameters())
    nonzero = sum(int((p != 0).sum()) for p in model.parameters())
    target = sum(r * c for _, (r, c), _ in layers)
    zeros = sum(r * c * s for _, (r, c), s in layers)
    config = model.config
    info = {
        "architecture": config.architectures[0] if config.architectures else type(model).__name__,
        "model_type": config.model_type,
        "blocks": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "parameters": total,
        "nonzero_parameters": nonzero,
        "target_parameters": target,
        "target_sparsity": zeros / max(target, 1),
        "layers": [{"name": n, "shape": list(s), "sparsity": z} for n, s, z in layers],
        "nonfinite": {name: count for name, count in bad},
        "manifest": read_manifest(args.model) if not str(args.model).endswith(".gguf") else None,
        "experts": experts_of(model),
    }
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"{info['architecture']} ({info['model_type']}): {info['blocks']} blocks, hidden {info['hidden_size']}")
    print(f"parameters {total:,} (nonzero {nonzero:,}); prunable {target:,}, sparsity {info['target_sparsity']:.4f}")
    if info["experts"]:
        e = info["experts"]
        print(f"mixture of experts: {e['routed_experts']} routed experts of {e['expert_width']} channels in "
              f"{e['moe_blocks']} of {info['blocks']} blocks, top-{e['top_k']} routing")
    if bad:
        print(f"WARNING: {sum(c for _, c in bad):,} NaN/Inf values in {len(bad)} tensors, first {bad[0][0]}")
    print_layer_grid(layers)
    manifest = info["manifest"] or {}
    if manifest.get("source"):
        source = manifest["source"]
        print(f"from {source.get('path', '?')} (sha256 {source.get('sha256', '?')[:12]}), "
              f"secateur {manifest.get('secateur_version', '?')}")
    for number, stage in enumerate(history_of(manifest), 1):
        print(f"stage {number}: {summary(stage)}")
    print_structure(structure_section(manifest))
    return 0


def experts_of(model) -> dict | None:
    """A mixture of experts' counts, as its config holds them (None for a dense model)."""
    from secateur.models import UnsupportedModelError, adapter_for

    try:
        adapter = adapter_for(model)
    except UnsupportedModelError:
        return None
    spec, config = adapter.experts, model.config
    if spec is None:
        return None
    return {"routed_experts": getattr(config, spec.count_key), "top_k": getattr(config, spec.top_k_key),
            "expert_width": getattr(config, spec.width_key), "moe_blocks": len(spec.sparse_blocks(adapter.block_list(model)))}


def print_layer_grid(layers: list[tuple[str, tuple[int, int], float]]) -> None:
    """One row per block, one column per layer kind: the fraction of zero weights."""
    grid: dict[str, dict[str, float]] = defaultdict(dict)
    for name, _, sparsity in layers:
        parts = name.split(".")
        index = next(i for i, part in enumerate(parts) if part.isdigit())
        block, kind = ".".join(parts[: index + 1]), ".".join(parts[index + 1 :])
        grid[block][kind] = sparsity
    kinds = list(dict.fromkeys(k for row in grid.values() for k in row))
    short = [k.split(".")[-1] for k in kinds]
    print("block  " + " ".join(f"{k:>10}" for k in short))
    for block, row in grid.items():
        print(f"{block.split('.')[-1]:>5}  " + " ".join(f"{row[k]:>10.4f}" if k in row else f"{'removed':>10}" for k in kinds))
