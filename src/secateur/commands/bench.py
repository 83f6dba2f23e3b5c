"""`secateur bench`: size and speed in transformers or llama.cpp."""

from __future__ import annotations

import argparse
from pathlib import Path

from secateur.commands.flags import generated_flags, nonfinite_argument
from secateur.errors import SecateurError
from secateur.io import resolve_device, split_model_path


def add(sub: argparse._SubParsersAction) -> None:
    from secateur.bench import BenchConfig

    p = sub.add_parser("bench", help="parameters, file size, prefill latency, decode tokens/s, peak memory")
    p.add_argument("models", nargs="+", help="model directories or .gguf files; ratios are against the first")
    generated_flags(p, BenchConfig)
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    nonfinite_argument(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from secateur.bench import BENCH_PROTOCOL, BenchConfig, bench, llama_bench_binary, measure_llamacpp, table, to_json
    from secateur.schema import from_flags

    for path in args.models:
        split_model_path(Path(path))  # a missing or non-model path fails before any timing
    config = from_flags(BenchConfig, vars(args))
    common = dict(rounds=config.rounds, prompt=config.prompt, new_tokens=config.new_tokens, repeats=config.repeats)
    if config.draft is not None or config.draft_blocks is not None:
        return _draft(args, config)
    if config.engine == "llama.cpp":  # several models timed by llama-bench
        if args.allow_nonfinite:
            raise SecateurError("--allow-nonfinite applies only with --engine hf (llama.cpp reads the GGUF as it is)")
        if not all(str(p).lower().endswith(".gguf") for p in args.models):
            raise SecateurError("--engine llama.cpp times .gguf files; write them first with secateur export MODEL "
                                "--gguf OUT.gguf")
        binary = llama_bench_binary(config.llama_cpp)
        results = bench(args.models, measure_one=measure_llamacpp, binary=binary, threads=config.threads, **common)
        where = f"llama.cpp ({binary}), {results[0].threads} threads"
    else:
        device = str(resolve_device(config.device))
        results = bench(args.models, device=device, dtype=config.dtype, allow_nonfinite=args.allow_nonfinite,
                        **common)  # fmt: skip
        where = f"device {device}, {results[0].threads} threads; {BENCH_PROTOCOL}"
    if args.json:
        print(to_json(results))
    else:
        print(table(results))
        print(where)
    return 0


def _draft(args: argparse.Namespace, config) -> int:
    """`secateur bench MODEL --draft PRUNED` (or `--draft-blocks N`): speculative decoding with a pruned
    draft, or with the model's own first blocks."""
    import json
    from dataclasses import asdict

    from secateur.bench import DRAFT_PROTOCOL, LLAMA_DRAFT_PROTOCOL, measure_draft, measure_draft_llamacpp
    from secateur.io import load_config

    if len(args.models) != 1:
        raise SecateurError(f"--draft times one model with its draft; {len(args.models)} models were given")
    llama = config.engine == "llama.cpp"
    if llama:
        if args.allow_nonfinite:
            raise SecateurError("--allow-nonfinite applies only with --engine hf (llama.cpp reads the GGUF as it is)")
        if not all(str(p).lower().endswith(".gguf") for p in (args.models[0], config.draft)):
            raise SecateurError("--engine llama.cpp --draft times .gguf files, the model and its draft; write them "
                                "first with secateur export MODEL --gguf OUT.gguf")
    if config.draft_blocks is not None:
        blocks = load_config(args.models[0]).num_hidden_layers
        if config.draft_blocks >= blocks:
            raise SecateurError(f"--draft-blocks {config.draft_blocks}: the draft keeps fewer than the model's "
                                f"{blocks} blocks")
    if config.draft is not None:
        split_model_path(Path(config.draft))
        if load_config(config.draft).vocab_size != load_config(args.models[0]).vocab_size:
            raise SecateurError("the draft must share the model's vocabulary (a vocabulary-pruned draft does not)")
    if llama:
        result = measure_draft_llamacpp(args.models[0], config.draft, llama_cpp=config.llama_cpp, prompt=config.prompt,
                                        new_tokens=config.new_tokens, draft_tokens=config.draft_tokens,
                                        repeats=config.repeats, text=config.prompt_text, threads=config.threads)  # fmt: skip
    else:
        result = measure_draft(args.models[0], config.draft, prompt=config.prompt, new_tokens=config.new_tokens,
                               draft_tokens=config.draft_tokens, repeats=config.repeats, text=config.prompt_text,
                               device=str(resolve_device(config.device)), dtype=config.dtype,
                               allow_nonfinite=args.allow_nonfinite, draft_blocks=config.draft_blocks)  # fmt: skip
    protocol = LLAMA_DRAFT_PROTOCOL if llama else DRAFT_PROTOCOL
    if args.json:
        print(json.dumps({"protocol": protocol, "result": asdict(result)}, indent=2))
        return 0
    print(f"{result.model} with draft {result.draft}: acceptance {result.acceptance:.1%} of {result.draft_tokens} "
          f"proposed per round ({result.tokens_per_round:.2f} tokens per target forward); greedy "
          f"{result.plain_tokens_per_second:.1f} -> {result.speculative_tokens_per_second:.1f} tokens/s "
          f"({result.speedup:.2f}x); output {'identical to' if result.identical else 'DIFFERS from'} the model's "
          "greedy output")
    print(protocol)
    return 0 if result.identical else 1
