"""`secateur eval`: perplexity, lm-eval tasks or samples."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from secateur.commands.flags import generated_flags, nonfinite_argument
from secateur.errors import SecateurError
from secateur.io import load, read_manifest, resolve_device, split_model_path
from secateur.output import claim


def add(sub: argparse._SubParsersAction) -> None:
    from secateur.evalconfig import EvalConfig

    p = sub.add_parser("eval", help="perplexity over non-overlapping windows, lm-eval tasks (--tasks) or samples "
                                    "(--generate)")
    p.add_argument("model", help="HF model directory, .gguf file or secateur output")
    generated_flags(p, EvalConfig)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    nonfinite_argument(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from secateur.evalconfig import EvalConfig
    from secateur.schema import from_flags

    split_model_path(Path(args.model))  # a missing or non-model path fails before anything else
    config = from_flags(EvalConfig, vars(args))
    run = {"tasks": _eval_tasks, "generate": _eval_generate, "perplexity": _eval_perplexity}[config.mode]
    return run(args, config)


def _original_tokenizer(model: str, tokenizer: Any) -> Any:
    """The tokenizer before a stage that renumbered tokens (vocabulary pruning), when the model's history
    has one and its origin is still there; else None."""
    from secateur.io import load_tokenizer
    from secateur.manifest import history_of
    from secateur.recipe import KINDS

    manifest = (read_manifest(model) if Path(model).is_dir() else None) or {}
    renumbered = any(KINDS[r["kind"]].renumbers_tokens for r in history_of(manifest) if r.get("kind") in KINDS)
    origin = (manifest.get("origin") or {}).get("path")
    return load_tokenizer(origin) if renumbered and origin and Path(origin).exists() else None


def _eval_perplexity(args: argparse.Namespace, config: Any) -> int:
    import dataclasses

    from secateur.data import load_text
    from secateur.evaluate import changed_tokens, evaluate_sources, split_sources
    from secateur.io import load_config, model_positions

    positions = model_positions(load_config(args.model))
    if positions and config.seq_len > positions:
        if args.seq_len is not None:
            raise SecateurError(f"--seq-len {config.seq_len} is longer than the model's {positions} positions; lower it")
        print(f"note: --seq-len {positions} (the default {config.seq_len} is longer than the model's {positions} "
              "positions)", file=sys.stderr)
        config = dataclasses.replace(config, seq_len=positions)
    sources = split_sources(config.data)
    for source in sources:
        load_text(source, "evaluation", config.text_field)  # a missing or unreadable source fails before loading
    pruning = _token_pruning(args.model, config)
    device = resolve_device(config.device)
    if pruning is None and _streams(args.model, config):
        from secateur.offload import evaluate_on_disk
        from secateur.io import load_tokenizer

        tokenizer = load_tokenizer(args.model)
        result = evaluate_on_disk(args.model, tokenizer, sources, config.seq_len, config.windows, field=config.text_field,
                                  batch_size=config.batch_size, dtype=config.dtype, device=device)  # fmt: skip
    else:
        model, tokenizer = load(args.model, dtype=config.dtype, device=str(device),
                                allow_nonfinite=args.allow_nonfinite)  # fmt: skip
        if pruning is not None:
            return _eval_token_pruning(args, config, pruning, sources, model, tokenizer)
        result = evaluate_sources(model, tokenizer, sources, config.seq_len, config.windows, field=config.text_field,
                                  batch_size=config.batch_size, device=device)  # fmt: skip
    result["model"] = args.model
    original = _original_tokenizer(args.model, tokenizer)
    domains = result.get("domains", {sources[0]: result})
    for source, one in domains.items():
        if original is not None:
            one["changed_tokens"] = changed_tokens(original, tokenizer, source, config.seq_len, config.windows,
                                                   config.text_field)  # fmt: skip
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for source, one in domains.items():
            per_byte = f", {one['bits_per_byte']:.4f} bits per byte" if "bits_per_byte" in one else ""
            print(f"{args.model}: perplexity {one['perplexity']:.3f}{per_byte} on {source} "
                  f"({one['windows']} windows x {one['seq_len']} tokens, {one['seconds']:.1f} s)")
        if "domains" in result:
            per_byte = f", {result['bits_per_byte']:.4f} bits per byte" if "bits_per_byte" in result else ""
            print(f"mean over {len(sources)} domains: perplexity {result['perplexity']:.3f}{per_byte} "
                  f"({result['mean']})")
        if original is not None:
            gone = ", ".join(f"{one['changed_tokens']:.2%}" for one in domains.values())
            print(f"pruned vocabulary: {gone} of the original tokenizer's tokens of this text are gone (their text is split into kept tokens); "
                  "perplexity per token does not compare with the original's, bits per byte does")
        print(f"protocol: {result['protocol']}")
    return 0


def _streams(model: str, config: Any) -> bool:
    """Whether the perplexity reads the model's blocks from disk one at a time: as asked (a model that
    cannot be read so is refused), or (auto) when its weights do not fit in the memory available."""
    from secateur.offload import AUTO_SHARE, oversized, unreadable

    if config.offload == "none":
        return False
    over = oversized(model, config.dtype)
    if config.offload == "auto" and over is None:
        return False
    why = unreadable(model)
    if config.offload == "disk":
        if why is not None:
            raise SecateurError(f"--offload disk: {why}")
        return True
    size, free = over
    print(f"note: the weights ({size / 2**30:.1f} GiB) exceed {AUTO_SHARE:.0%} of the memory available "
          f"({free / 2**30:.1f} GiB): " + (f"loading them anyway, since {why}" if why else
                                           "reading the blocks from disk one at a time"), file=sys.stderr)  # fmt: skip
    return why is None


def _token_pruning(model: str, config: Any):
    """The GemFilter settings of a token-pruned evaluation (None without --filter-layer), checked
    against the model's blocks (and, for perplexity, the windows) before the model loads."""
    from secateur.generate.tokens import TokenPruning, check_layers
    from secateur.io import load_config
    from secateur.schema import fill

    if config.filter_layer is None:
        return None
    given = {k: v for k in ("filter_layer", "budget", "pool") if (v := getattr(config, k)) is not None}
    pruning = fill(TokenPruning, given)
    check_layers([pruning.filter_layer], load_config(model).num_hidden_layers)
    if config.mode == "tasks":
        return pruning
    prompt = config.seq_len - config.score_tokens
    if not 0 < config.score_tokens < config.seq_len or prompt <= pruning.budget:
        raise SecateurError(f"token pruning cuts the prompt (--seq-len {config.seq_len} - --score-tokens "
                            f"{config.score_tokens} = {prompt} tokens) to --budget {pruning.budget}: give a prompt "
                            "longer than the budget and at least one scored token")
    return pruning


def _eval_token_pruning(args: argparse.Namespace, config: Any, pruning: Any, sources: list[str], model: Any,
                        tokenizer: Any) -> int:  # fmt: skip
    """The scored tokens' perplexity after the whole prompt and after the GemFilter-cut prompt, per source."""
    from dataclasses import asdict

    from secateur.data.calibration import evaluation_data
    from secateur.generate.tokens import continuation_perplexity

    pad = model.config.pad_token_id or 0
    results = {}
    for source in sources:
        windows = evaluation_data(model, tokenizer, source, config.seq_len, config.windows, config.text_field)
        full = continuation_perplexity(model, windows, config.score_tokens, None, config.batch_size, pad)
        cut = continuation_perplexity(model, windows, config.score_tokens, pruning, config.batch_size, pad)
        results[source] = {"whole_prompt": full, "pruned_prompt": cut, "ratio": cut["perplexity"] / full["perplexity"]}
    record = {"model": args.model, "token_pruning": asdict(pruning), "seq_len": config.seq_len,
              "score_tokens": config.score_tokens, "sources": results}  # fmt: skip
    if args.json:
        print(json.dumps(record, indent=2))
        return 0
    for source, r in results.items():
        full, cut = r["whole_prompt"], r["pruned_prompt"]
        print(f"{args.model} on {source}: the last {config.score_tokens} tokens of {full['windows']} windows of "
              f"{config.seq_len}: perplexity {full['perplexity']:.3f} after the whole prompt ({full['prompt_tokens']} "
              f"tokens, {full['seconds']:.1f} s), {cut['perplexity']:.3f} after GemFilter's {cut['kept_prompt_tokens']:.0f} "
              f"(block {pruning.filter_layer}, {cut['seconds']:.1f} s): {r['ratio']:.3f}x")
    return 0


def _eval_generate(args: argparse.Namespace, config: Any) -> int:
    from secateur.tasks.generate import PROMPTS, continuations

    new_tokens = config.new_tokens
    reference = config.reference
    if reference is None and Path(args.model).is_dir():
        origin = ((read_manifest(args.model) or {}).get("origin") or {}).get("path")
        reference = origin if origin and Path(origin).exists() and Path(origin).resolve() != Path(args.model).resolve() else None
    if reference is not None:
        split_model_path(Path(reference))
    device = resolve_device(config.device)
    rows: dict[str, list[str]] = {}
    for label, path in (("reference", reference), ("model", args.model)):
        if path is not None:
            model, tokenizer = load(path, dtype=config.dtype, device=str(device), allow_nonfinite=args.allow_nonfinite)
            rows[label] = continuations(model, tokenizer, PROMPTS, new_tokens, device)
            del model
    samples = [{"prompt": p, **{label: texts[i] for label, texts in rows.items()}} for i, p in enumerate(PROMPTS)]
    if args.json:
        print(json.dumps({"model": args.model, "reference": reference, "new_tokens": new_tokens, "samples": samples},
                         indent=2))  # fmt: skip
        return 0
    names = {"reference": f"{reference}", "model": f"{args.model}"}
    for sample in samples:
        print(f"## {sample['prompt']}")
        for label in rows:
            print(f"  [{names[label]}] {sample[label]}")
    print(f"greedy, {new_tokens} new tokens, chat template where the tokenizer has one")
    return 0


def _eval_tasks(args: argparse.Namespace, config: Any) -> int:
    import contextlib
    import time

    from secateur.tasks.harness import check_tasks, run_tasks

    tasks = [t.strip() for t in config.tasks.split(",") if t.strip()]
    include = [Path(d) for d in config.include_path]
    for directory in include:
        if not directory.is_dir():
            raise SecateurError(f"--include-path {directory} is not a directory of task files")
    results = (claim(config.results, inputs=[args.model, *include], overwrite=None, shape="file", flag="--results",
                     suffix=".json") if config.results else contextlib.nullcontext())  # fmt: skip
    pruning = _token_pruning(args.model, config)
    with results as output:
        check_tasks(tasks, include, pruned=pruning is not None)
        device = resolve_device(config.device)
        model, tokenizer = load(args.model, dtype=config.dtype, device=str(device), allow_nonfinite=args.allow_nonfinite)
        clock = time.perf_counter()
        result = run_tasks(model, tokenizer, tasks, limit=config.limit, num_fewshot=config.num_fewshot,
                           batch_size=config.batch_size, device=str(device), include_path=include,
                           token_pruning=pruning)  # fmt: skip
        result.update(model=args.model, seconds=time.perf_counter() - clock)
        if output is not None:
            with output.write() as staging:
                staging.write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for name, task in result["tasks"].items():
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in task["metrics"].items() if isinstance(v, float))
        chance = f" (chance {task['chance']:.2f})" if "chance" in task else ""
        print(f"{args.model}: {name} v{task['version']}: {metrics}{chance}, {task['samples']} documents, "
              f"{task['num_fewshot']}-shot")
    if result.get("token_pruning"):
        tp = result["token_pruning"]
        print(f"token pruning: {tp['contexts_cut']} of {tp['contexts']} contexts longer than --budget "
              f"{tp['settings']['budget']} cut by block {tp['settings']['filter_layer']}'s attention")
    print(f"lm-eval {result['lm_eval_version']}, {result['seconds']:.1f} s")
    return 0
