"""`secateur generate`: greedy continuations of prompt files, with GemFilter token pruning; and
`secateur filter-layer`: the filter layer to use for a model, written as a settings file."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from secateur.commands.flags import generated_flags, nonfinite_argument
from secateur.errors import ConfigError
from secateur.io import resolve_device, split_model_path

SETTINGS_KIND = "secateur filter-layer"  # what a settings file says it is
LOAD = dict(device="auto", dtype="float32")


def add(sub: argparse._SubParsersAction) -> None:
    from secateur.generate.filter_layer import FilterSearch
    from secateur.generate.tokens import TokenPruning

    p = sub.add_parser("generate", help="greedy continuations of prompt files; long prompts cut by GemFilter token "
                                        "pruning with --filter-layer or --settings")
    p.add_argument("model", help="HF model directory, .gguf file or secateur output (never modified)")
    p.add_argument("--prompt-file", action="append", required=True, dest="prompt_files",
                   help="a text file holding one prompt; repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=64, help="new tokens per prompt (default 64)")
    p.add_argument("--no-chat", action="store_true",
                   help="feed the file as it is, without the tokenizer's chat template around it")
    p.add_argument("--settings", help="a file written by secateur filter-layer (flags given here override it)")
    generated_flags(p, TokenPruning)
    _device_flags(p)
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    nonfinite_argument(p)
    p.set_defaults(run=run)

    q = sub.add_parser("filter-layer", help="the block whose attention picks GemFilter's kept tokens best for its "
                                            "cost, measured on needle-in-a-haystack prompts; a settings file for "
                                            "secateur generate --settings")
    q.add_argument("model", help="HF model directory, .gguf file or secateur output (never modified)")
    q.add_argument("--out", required=True, help="the settings file to write (.json)")
    q.add_argument("--overwrite", action="store_true", help="replace an earlier settings file")
    generated_flags(q, FilterSearch)
    _device_flags(q)
    nonfinite_argument(q)
    q.set_defaults(run=run_filter_layer)


def _device_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=LOAD["device"], help="auto (cuda when present), cpu or cuda[:N]")
    p.add_argument("--dtype", default=LOAD["dtype"], choices=("float32", "bfloat16", "float16"),
                   help="load precision (default float32)")


def read_settings(path: str | Path) -> dict[str, Any]:
    """The token-pruning keys of a `secateur filter-layer` settings file."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"--settings {path}: cannot read it as JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("kind") != SETTINGS_KIND or not isinstance(data.get("token_pruning"), dict):
        raise ConfigError(f"--settings {path} is not a file written by secateur filter-layer")
    return data["token_pruning"]


def _pruning(args: argparse.Namespace):
    """The token-pruning settings asked for (a settings file, then flags over it), or None."""
    from secateur.generate.tokens import TokenPruning
    from secateur.schema import fill, flag, options_of

    flags = {k: getattr(args, k) for k in options_of(TokenPruning) if getattr(args, k) is not None}
    settings = {**(read_settings(args.settings) if args.settings else {}), **flags}
    if "filter_layer" not in settings:
        if flags:
            raise ConfigError(f"{flag(next(iter(flags)))} applies only with token pruning; give --filter-layer or "
                              "--settings")
        return None
    return fill(TokenPruning, settings)


def _prompt(tokenizer: Any, text: str, chat: bool, bos: int | None) -> list[int]:
    if chat:
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                             add_generation_prompt=True, return_dict=False)  # fmt: skip
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ([bos] if bos is not None else []) + ids


def run(args: argparse.Namespace) -> int:
    from secateur.data.calibration import bos_token
    from secateur.generate.tokens import check_layers, generate
    from secateur.io import load, load_config, load_tokenizer

    split_model_path(Path(args.model))
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    pruning = _pruning(args)
    if pruning is not None:  # before the model loads
        check_layers([pruning.filter_layer], load_config(args.model).num_hidden_layers)
    texts = []
    for name in args.prompt_files:
        try:
            texts.append(Path(name).read_text())
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--prompt-file {name}: cannot read it as text ({exc})") from None
        if not texts[-1].strip():
            raise ConfigError(f"--prompt-file {name} is empty; give a file with the prompt in it")
    tokenizer = load_tokenizer(args.model)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if args.no_chat and not has_template:
        raise ConfigError("--no-chat applies only to a model whose tokenizer has a chat template; drop it")
    chat = has_template and not args.no_chat
    model, tokenizer = load(args.model, dtype=args.dtype, device=str(resolve_device(args.device)),
                            allow_nonfinite=args.allow_nonfinite)  # fmt: skip
    prompts = [_prompt(tokenizer, text, chat, bos_token(model, tokenizer)) for text in texts]
    eos = tokenizer.eos_token_id
    result = generate(model, prompts, args.max_new_tokens, pruning, pad=tokenizer.pad_token_id or eos,
                      eos=eos)  # fmt: skip
    outputs = [tokenizer.decode(tokens, skip_special_tokens=True) for tokens in result.tokens]
    if args.json:
        print(json.dumps({"outputs": outputs, "prompt_tokens": result.prompt_tokens, "kept_tokens": result.kept,
                          "seconds": result.seconds,
                          "token_pruning": None if pruning is None else vars(pruning)}, indent=2))  # fmt: skip
        return 0
    for name, text, kept, given in zip(args.prompt_files, outputs, result.kept, result.prompt_tokens, strict=True):
        print(f"== {name}: the model read {kept} of {given} prompt tokens")
        print(text)
    where = "" if pruning is None else f", GemFilter at block {pruning.filter_layer}"
    print(f"{len(prompts)} prompt(s) in {result.seconds:.2f} s{where}", file=sys.stderr)
    return 0


def run_filter_layer(args: argparse.Namespace) -> int:
    from secateur.generate.filter_layer import FilterSearch, find_filter_layer
    from secateur.output import claim
    from secateur.schema import flatten, from_flags

    split_model_path(Path(args.model))
    search = from_flags(FilterSearch, vars(args))
    with claim(args.out, inputs=[args.model], overwrite=args.overwrite, shape="file", suffix=".json",
               magic=b'{\n  "kind": "' + SETTINGS_KIND.encode()) as output:  # fmt: skip
        from secateur.data.sources import load_text
        from secateur.io import load

        load_text(search.text, "calibration")  # a bad text source fails before the model loads
        model, tokenizer = load(args.model, dtype=args.dtype, device=str(resolve_device(args.device)),
                                allow_nonfinite=args.allow_nonfinite)  # fmt: skip
        found = find_filter_layer(model, tokenizer, search)
        layer, recall = found["filter_layer"], found["recall"]
        record = {"kind": SETTINGS_KIND, "model": str(args.model),
                  "token_pruning": {"filter_layer": layer, "budget": search.budget, "pool": search.pool},
                  "search": flatten(search), "recall": recall, "prompt_tokens": found["prompt_tokens"]}  # fmt: skip
        with output.write() as staging:
            staging.write_text(json.dumps(record, indent=2) + "\n")
    for block, value in enumerate(recall):
        print(f"block {block:3d}  answer tokens kept {value:6.1%}{'  <- chosen' if block == layer else ''}")
    blocks = len(recall)
    print(f"filter layer {layer}: the filter pass runs {layer + 1} of {blocks} blocks; best block keeps "
          f"{max(recall):.1%} of the answer at budget {search.budget} of {search.length} tokens -> {args.out} "
          f"(secateur generate MODEL --settings {args.out} --prompt-file F)")
    return 0
