"""Command line: `secateur prune | eval | info`. Flags only build the typed configs."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from secateur.config import ALLOCATIONS as SPARSITY_ALLOCATIONS
from secateur.config import SPARSITY_ONLY_KEYS, CalibConfig, ConfigError, build_calib_config, build_prune_config, read_recipe
from secateur.depth import REGISTRY as DEPTH_REGISTRY
from secateur.depth.config import DEPTH_ONLY_KEYS, build_depth_config
from secateur.errors import SecateurError
from secateur.io import load, read_manifest, resolve_device, split_model_path
from secateur.methods import REGISTRY
from secateur.runtime import tune_allocator
from secateur.width import IMPORTANCE, WIDTH_ONLY_KEYS, build_width_config
from secateur.width.config import ALLOCATIONS, HEAD_MODES

USER_ERRORS = (SecateurError,)

PRUNE_DEFAULTS: dict[str, Any] = {"dtype": "float32", "device": "auto", "eval_windows": 64, "eval_seq_len": 512}


def _prune_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="prune a model and save it with a manifest")
    p.add_argument("model", help="HF model directory or .gguf file (never modified)")
    p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--recipe", help="TOML file whose keys mirror these flags; flags given here win")
    p.add_argument("--method", choices=sorted(REGISTRY) + sorted(DEPTH_REGISTRY) + ["width"],
                   help="pruning method (default: wanda); depth methods remove blocks or sublayers; "
                        "width removes attention heads and MLP channels")
    p.add_argument("--sparsity", type=float, help="fraction of weights to remove, in [0, 1) (default 0.5)")
    p.add_argument("--pattern", help="N:M semi-structured sparsity: keep N of every M weights, e.g. 2:4")
    p.add_argument("--scope", choices=["per_row", "per_layer", "global"], help="ranking scope (magnitude, wanda)")
    p.add_argument("--block-size", type=int, help="SparseGPT column block (default 128)")
    p.add_argument("--damp", type=float, help="SparseGPT damping, relative to the mean Hessian diagonal (0.01)")
    p.add_argument("--steps", type=int, help="SparseGPT: reach the target in this many passes, re-fitting between them (1)")
    p.add_argument("--refit-iters", type=int, help="SparseGPT: conjugate-gradient iterations of each re-fit (40)")
    p.add_argument("--block-stats", choices=["sequential", "dense"],
                   help="inside a block, calibrate on pruned predecessors (sequential, one pass, default) "
                        "or on the dense block (two passes, as the reference code)")
    p.add_argument("--remove-blocks", type=int, help="depth: number of decoder blocks to remove")
    p.add_argument("--remove-sublayers", type=int, help="depth (finercut): number of attention / MLP branches to remove")
    p.add_argument("--remove-fraction", type=float,
                   help="depth: fraction of the blocks to remove (finercut: of the blocks' parameters); "
                        "width: fraction of the decoder blocks' parameters")
    p.add_argument("--positions", choices=["all", "last"], help="angular: tokens the distance averages over (all)")
    p.add_argument("--compensate", action="store_true", default=None,
                   help="depth (block methods): re-fit the MLP output projection of the block before each removed "
                        "run to reproduce the state leaving it (linear, no new parameters)")
    p.add_argument("--compensate-damp", type=float,
                   help="--compensate: ridge towards the original weights, times the mean Gram diagonal (0.1)")
    p.add_argument("--importance", choices=list(IMPORTANCE), help="width: unit score (default fluctuation, FLAP)")
    p.add_argument("--allocation", choices=sorted(set(ALLOCATIONS) | set(SPARSITY_ALLOCATIONS)),
                   help="sparsity: uniform (default), owl (outlier-weighted per block) or global (one ranking); "
                        "width: uniform (stock config) or adaptive (per-block widths)")
    p.add_argument("--owl-m", type=float, help="OWL: outlier threshold, times the block's mean Wanda score (5)")
    p.add_argument("--owl-lambda", type=float, help="OWL: per-block sparsity stays within +-lambda of the target (0.08)")
    p.add_argument("--max-layer-sparsity", type=float, help="global allocation: no layer above this (target + (1-target)/2)")
    p.add_argument("--module-sparsity", help="pin module types, e.g. attention=0.4; the other layers make up the total")
    p.add_argument("--refine", help="after each layer's mask, comma list in order: dsnot, reconstruct")
    p.add_argument("--dsnot-cycles", type=int, help="DSnoT: at most this many swaps per row (50)")
    p.add_argument("--dsnot-threshold", type=float, help="DSnoT: stop a row once |expected error| is below this (0.1)")
    p.add_argument("--reconstruct-iters", type=int, help="reconstruct: conjugate-gradient iterations (40)")
    p.add_argument("--reconstruct-damp", type=float, help="reconstruct: damping relative to the mean Hessian diagonal (0.01)")
    p.add_argument("--permute", action="store_true", default=None,
                   help="N:M: permute inner channels (MLP, attention values) to keep more score under the pattern")
    p.add_argument("--alpha", type=float, help="ria: exponent of the input norm (0.5); gblm: weight of the gradient (100)")
    p.add_argument("--gradient-samples", type=int, help="gblm: calibration windows whose loss gradients are used (32)")
    p.add_argument("--heads", choices=list(HEAD_MODES),
                   help="width: remove whole key/value groups (kv-groups, default), query heads per group, or none")
    p.add_argument("--bias-compensation", action=argparse.BooleanOptionalAction,
                   help="width: fold removed channels' mean output into a bias (default: on for fluctuation)")
    p.add_argument("--round-to", type=int, help="width: uniform MLP widths are multiples of this (default 8)")
    p.add_argument("--hidden-fraction", type=float,
                   help="width: also remove this fraction of the hidden (embedding) channels, everywhere (RMSNorm "
                        "families); counts towards --remove-fraction")
    p.add_argument("--ignore", action="append", help="fnmatch pattern of layer names to keep dense (repeatable)")
    p.add_argument("--calib", help="calibration text: enwiki-sample (default), wikitext2, c4, a file or a directory")
    p.add_argument("--calib-samples", type=int, help="calibration windows (default 64)")
    p.add_argument("--calib-seq-len", type=int, help="tokens per calibration window (default 512)")
    p.add_argument("--calib-batch-size", type=int, help="windows per forward call (default 4; 0 = all at once)")
    p.add_argument("--seed", type=int, help="seed for drawing calibration windows (default 0)")
    p.add_argument("--text-field", help="field holding the text in JSONL / datasets sources (default text)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="load precision (default float32)")
    p.add_argument("--device", help="auto (default), cpu or cuda[:N]")
    p.add_argument("--eval", help="evaluate perplexity on this source after pruning; recorded in the manifest")
    p.add_argument("--eval-windows", type=int, help="evaluation windows (default 64); also the calibration hold-out")
    p.add_argument("--eval-seq-len", type=int, help="tokens per evaluation window (default 512)")


def _eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity over non-overlapping windows")
    p.add_argument("model", help="HF model directory or .gguf file")
    p.add_argument("--data", default="enwiki-sample", help="text source (default enwiki-sample)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--windows", type=int, default=64, help="number of windows from the start (default 64)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _info_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="architecture, parameters, per-layer sparsity, manifest summary")
    p.add_argument("model", help="HF model directory or .gguf file")
    p.add_argument("--json", action="store_true", help="print everything as JSON")


def _bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="parameters, file size, prefill latency, decode tokens/s, peak memory")
    p.add_argument("models", nargs="+", help="model directories or .gguf files; ratios are against the first")
    p.add_argument("--device", default="auto", help="auto (default: cuda when present), cpu or cuda[:N]")
    p.add_argument("--prompt", type=int, default=512, help="prefill tokens (default 512)")
    p.add_argument("--new-tokens", type=int, default=128, help="decoded tokens (default 128)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per model and round (default 3)")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds over all models, each model in a fresh process per round, so machine drift falls on "
                        "every model alike; medians over all runs, speedups are medians of per-round ratios (default 3)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--json", action="store_true", help="print the results as JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="secateur", description="Prune Hugging Face causal language models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log diagnostics")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_prune_parser, _eval_parser, _info_parser, _bench_parser):
        add(sub)
    return parser


def cmd_prune(args: argparse.Namespace) -> int:
    from secateur.pipeline import run_prune

    flags = {k: v for k, v in vars(args).items() if v is not None}
    settings = {**PRUNE_DEFAULTS, **(read_recipe(args.recipe) if args.recipe else {}), **flags}
    method = settings.get("method", "wanda")
    if method in DEPTH_REGISTRY:
        _refuse(settings, (*WIDTH_ONLY_KEYS, *SPARSITY_ONLY_KEYS), f"apply to width or sparsity pruning, not to {method}")
        return _depth(args, settings)
    if method == "width":
        _refuse(settings, SPARSITY_ONLY_KEYS, "apply to sparsity methods, not to width pruning")
        return _width(args, settings)
    _refuse(settings, (*DEPTH_ONLY_KEYS, *(k for k in WIDTH_ONLY_KEYS if k != "allocation")),
            f"apply to the depth methods ({', '.join(sorted(DEPTH_REGISTRY))}) or to width, not to {method}")
    config = build_prune_config(settings)
    calib = build_calib_config(settings)
    manifest = run_prune(args.model, config, calib, args.out, _run_options(args, settings))
    result = manifest["result"]
    print(f"pruned {args.model} with {result['method']} {result['target']}: "
          f"sparsity {result['sparsity']:.4f} of the target layers in {result['seconds']:.1f} s -> {args.out}")
    _print_evaluation(manifest)
    return 0


def _refuse(settings: dict[str, Any], foreign: Sequence[str], why: str) -> None:
    """Stop on settings that belong to another kind of pruning (they would be silently ignored)."""
    given = sorted(k for k in foreign if k in settings)
    if given:
        raise ConfigError(f"{given} {why}")


def _run_options(args: argparse.Namespace, settings: dict[str, Any]):
    from secateur.pipeline import RunOptions

    return RunOptions(dtype=settings["dtype"], device=settings["device"], overwrite=args.overwrite,
                      eval_source=settings.get("eval"), eval_seq_len=int(settings["eval_seq_len"]),
                      eval_windows=int(settings["eval_windows"]))  # fmt: skip


def _print_evaluation(manifest: dict[str, Any]) -> None:
    if "evaluation" in manifest:
        ev = manifest["evaluation"]
        print(f"perplexity {ev['perplexity']:.3f} ({ev['source']}, {ev['windows']} x {ev['seq_len']} tokens)")


def _depth(args: argparse.Namespace, settings: dict[str, Any]) -> int:
    from secateur.pipeline import run_depth

    config = build_depth_config(settings)
    spec = DEPTH_REGISTRY[config.method_name]
    calib = build_calib_config(settings, CalibConfig(samples=spec.calib_samples, seq_len=spec.calib_seq_len))
    manifest = run_depth(args.model, config, calib, args.out, _run_options(args, settings))
    depth = manifest["depth"]
    what = f"blocks {depth['removed_blocks']}" + (f", sublayers {depth['removed_sublayers']} (numbered as saved)"
                                                  if depth["removed_sublayers"] else "")
    print(f"{config.method_name}: removed {what}: {depth['blocks_before']} -> {depth['blocks_after']} blocks, "
          f"{depth['parameters_before']:,} -> {depth['parameters_after']:,} parameters in "
          f"{manifest['result']['seconds']:.1f} s -> {args.out}")
    _print_evaluation(manifest)
    return 0


def _width(args: argparse.Namespace, settings: dict[str, Any]) -> int:
    from secateur.pipeline import run_width

    foreign = (*(k for k in DEPTH_ONLY_KEYS if k != "remove_fraction"), "sparsity", "pattern", "scope")
    _refuse(settings, foreign, "do not apply to width pruning; give --remove-fraction (of block parameters)")
    config = build_width_config(settings)
    calib = build_calib_config(settings)
    manifest = run_width(args.model, config, calib, args.out, _run_options(args, settings))
    width = manifest["width"]
    print(f"width ({config.importance}, {config.allocation}, heads {config.heads}): removed "
          f"{width['removed_fraction']:.4f} of block parameters, {width['parameters_before']:,} -> "
          f"{width['parameters_after']:,} parameters in {width['seconds']:.1f} s -> {args.out}")
    if width["hidden_after"] != width["hidden_before"]:
        print(f"hidden size {width['hidden_before']} -> {width['hidden_after']}")
    if not width["uniform"]:
        stock = (" or AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)"
                 if width.get("remote_code") else "")  # fmt: skip
        print(f"per-block widths differ: load it with secateur.load(path){stock}")
    _print_evaluation(manifest)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from secateur.pipeline import evaluate_model

    device = resolve_device(args.device)
    model, tokenizer = load(args.model, dtype=args.dtype, device=str(device))
    result = evaluate_model(model, tokenizer, args.data, args.seq_len, args.windows, field=args.text_field,
                            batch_size=args.batch_size, device=device)  # fmt: skip
    result["model"] = args.model
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.model}: perplexity {result['perplexity']:.3f} on {args.data} "
              f"({result['windows']} windows x {result['seq_len']} tokens, {result['seconds']:.1f} s)")
        print(f"protocol: {result['protocol']}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from secateur.pipeline import sparsity_table

    model, _ = load(args.model)
    layers = sparsity_table(model)
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
        "manifest": read_manifest(args.model) if not str(args.model).endswith(".gguf") else None,
    }
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"{info['architecture']} ({info['model_type']}): {info['blocks']} blocks, hidden {info['hidden_size']}")
    print(f"parameters {total:,} (nonzero {nonzero:,}); prunable {target:,}, sparsity {info['target_sparsity']:.4f}")
    _print_layer_grid(layers)
    manifest = info["manifest"]
    if manifest and "recipe" in manifest:
        source = manifest.get("source", {})
        print(f"manifest: {manifest['recipe'].get('method')} {manifest.get('result', {}).get('target', '')}, "
              f"from {source.get('path', '?')} (sha256 {source.get('sha256', '?')[:12]}), "
              f"secateur {manifest.get('secateur_version', '?')}")
    depth = (manifest or {}).get("depth")
    if depth:
        print(f"depth: removed blocks {depth.get('removed_blocks', [])} of {depth.get('blocks_before', '?')} "
              f"(original numbering); branches skipped as saved: {depth.get('removed_sublayers', [])}")
    width = (manifest or {}).get("width")
    if width:
        layers = width.get("layers", [])
        shapes = sorted({(w["attention_heads"], w["key_value_heads"], w["channels"]) for w in layers}, key=str)
        print(f"width: removed {width.get('removed_fraction', 0):.4f} of block parameters; "
              f"{'uniform' if width.get('uniform') else 'per-block (load with secateur.load)'} widths "
              f"(query heads, key/value heads, MLP channels): {shapes[:6]}{' ...' if len(shapes) > 6 else ''}")
        if width.get("hidden_after") not in (None, width.get("hidden_before")):
            print(f"width: hidden size {width['hidden_before']} -> {width['hidden_after']}")
    return 0


def _print_layer_grid(layers: list[tuple[str, tuple[int, int], float]]) -> None:
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


def cmd_bench(args: argparse.Namespace) -> int:
    from secateur.bench import BENCH_PROTOCOL, bench, table, to_json
    device = str(resolve_device(args.device))
    for path in args.models:
        split_model_path(Path(path))  # a missing or non-model path fails before any timing
    results = bench(args.models, rounds=args.rounds, device=device, prompt=args.prompt, new_tokens=args.new_tokens,
                    repeats=args.repeats, dtype=args.dtype)  # fmt: skip
    if args.json:
        print(to_json(results))
    else:
        print(table(results))
        print(f"device {device}, {results[0].threads} threads; {BENCH_PROTOCOL}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    tune_allocator()
    handler = {"prune": cmd_prune, "eval": cmd_eval, "info": cmd_info, "bench": cmd_bench}[args.command]
    try:
        return handler(args)
    except USER_ERRORS as exc:
        print(f"secateur: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
