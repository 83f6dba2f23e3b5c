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
    if config.engine == "llama.cpp":
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
