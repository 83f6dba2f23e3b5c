"""Pruned SmolLM2-135M where users run it: exported with `secateur export`, timed and scored inside
llama.cpp (built from the llama-cpp-python sdist, see llamacpp_build.py), CPU, 2 threads.

Models: dense, width 20% and 50% (uniform), width 50% adaptive, depth 20% (angular), a two-stage recipe (angular 10% of the blocks, then width 20%) and width 30% with
12.5% of the hidden channels (which shrinks the embedding and LM head too); each is pruned
with `secateur prune ... --eval enwiki-sample` (protocol v1) and exported in f16 and q8_0. The
uniform models are also converted with llama.cpp's own `convert_hf_to_gguf.py` to cross-check.

Phases (resumable; each finished item is a line of benchmarks/results/llamacpp.jsonl):
- `quality`: perplexity inside llama.cpp on the first 16 of protocol v1's token windows (512 tokens,
  each window scored on its own, every next token predicted), through llama.cpp's Python bindings,
  next to secateur's HF perplexity on the same 16 windows (and on all 64); and
  `llama-perplexity` on the windows' text (its own convention: tokenises the text itself and scores
  the second half of each 512-token chunk). The converter cross-check (tensor names, shapes, values).
- `speed`: `llama-bench` prefill (512) and decode (128) tokens/s, 2 threads, `--rounds` interleaved
  rounds (every model once per round, order rotated), medians of per-round ratios to dense of the
  same type. Nothing else may run on the machine meanwhile.
- `table`: the table for docs/benchmarks.md, with each output's ideals: decode = dense bytes of
  weights read per token / pruned bytes; prefill = dense FLOPs / pruned FLOPs at 512 tokens
  (2 x matmul weights + attention scores and values over the causal context).

    python benchmarks/llamacpp.py [--phase quality|speed|table|all] [--rounds 3] [--only dense,width50]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "llamacpp.jsonl"
WORK = ROOT / "bench-out" / "llamacpp"
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(HERE))

from llamacpp_build import bindings, build, converter  # noqa: E402

THREADS = 2
WINDOWS = 16  # of protocol v1's 64 (llama.cpp returns all 512 x 49152 logits per window: ~3 s each here)
RECIPE = """
[[stage]]
method = "angular"
remove_fraction = 0.1

[[stage]]
method = "width"
remove_fraction = 0.2
"""
MODELS = {  # name: `secateur prune` flags (None: the dense model itself)
    "dense": None,
    "width20": ["--method", "width", "--remove-fraction", "0.2"],
    "width50": ["--method", "width", "--remove-fraction", "0.5"],
    "width50-adaptive": ["--method", "width", "--remove-fraction", "0.5", "--allocation", "adaptive"],
    "depth20": ["--method", "angular", "--remove-fraction", "0.2"],
    "angular10+width20": ["--recipe", "RECIPE"],
    # the hidden size shrinks too: the embedding / LM head (a third of the dense bytes) gets smaller
    "width30-hidden12": ["--method", "width", "--remove-fraction", "0.3", "--hidden-fraction", "0.125"],
}
TYPES = ("f16", "q8_0")


# --- results file -----------------------------------------------------------------------------------


def done(phase: str) -> dict[str, dict]:
    if not RESULTS.exists():
        return {}
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    return {row["key"]: row for row in rows if row["phase"] == phase}


def record(phase: str, key: str, **values) -> dict:
    row = {"phase": phase, "key": key, **values}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(row) + "\n")
    return row


# --- models -------------------------------------------------------------------------------------------


def dense_dir() -> Path:
    from secateur.demo import default_model_dir

    return default_model_dir()


def secateur(*args) -> None:
    subprocess.run([sys.executable, "-m", "secateur.cli", *map(str, args)], check=True)


def model_dir(name: str) -> Path:
    if MODELS[name] is None:
        return dense_dir()
    out = WORK / name
    if not (out / "secateur.json").exists():
        flags = list(MODELS[name])
        if "RECIPE" in flags:
            recipe = WORK / "recipe.toml"
            recipe.write_text(RECIPE)
            flags[flags.index("RECIPE")] = str(recipe)
        secateur("prune", dense_dir(), *flags, "--eval", "enwiki-sample", "--out", out)
    return out


def hf_perplexity(name: str) -> float:
    if MODELS[name] is None:
        cache = WORK / "dense-eval.json"
        if not cache.exists():
            out = subprocess.run([sys.executable, "-m", "secateur.cli", "eval", str(dense_dir()), "--json"],
                                 check=True, capture_output=True, text=True).stdout  # fmt: skip
            cache.write_text(out)
        return json.loads(cache.read_text())["perplexity"]
    return json.loads((model_dir(name) / "secateur.json").read_text())["evaluation"]["perplexity"]


def export(directory: Path, out: Path, kind: str) -> Path:
    """`secateur export` of `directory` to `out` at `kind`, unless `out` is there."""
    if not out.exists():
        secateur("export", directory, "--gguf", out, "--type", kind)
    return out


def exported(name: str, kind: str) -> Path:
    return export(model_dir(name), WORK / f"{name}-{kind}.gguf", kind)


def uniform(name: str) -> bool:
    return "adaptive" not in name and "finercut" not in name


def convert(directory: Path, out: Path) -> Path:
    """`directory` through llama.cpp's own converter (its bundled gguf-py) to `out`, f16, unless `out`
    is there."""
    if not out.exists():
        env = {**os.environ, "PYTHONPATH": str(converter().parent / "gguf-py")}
        subprocess.run([sys.executable, str(converter()), str(directory), "--outfile", str(out), "--outtype", "f16"],
                       check=True, env=env)  # fmt: skip
    return out


def converted(name: str) -> Path:
    """The same model through llama.cpp's own converter, f16."""
    return convert(model_dir(name), WORK / f"{name}-f16-convert_hf_to_gguf.gguf")


# --- what a file holds --------------------------------------------------------------------------------


def file_facts(path: Path) -> dict:
    """Parameters, bytes of weights read per decoded token, and prefill FLOPs per token at 512."""
    import gguf

    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    arch = reader.fields["general.architecture"].contents()
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    blocks = field(f"{arch}.block_count")
    heads = field(f"{arch}.attention.head_count")
    heads = heads if isinstance(heads, list) else [heads] * blocks
    head_dim = field(f"{arch}.attention.key_length") if f"{arch}.attention.key_length" in reader.fields else (
        field(f"{arch}.embedding_length") // heads[0])
    tied = "output.weight" not in tensors
    parameters = sum(int(np.prod(t.shape)) for t in tensors.values())
    read = sum(int(t.n_bytes) for n, t in tensors.items() if n != "token_embd.weight" or tied)
    matmul = sum(int(np.prod(t.shape)) for n, t in tensors.items() if len(t.shape) == 2 and (n != "token_embd.weight" or tied))
    context = (512 + 1) / 2  # mean causal context over a 512-token prompt
    attention = sum(2 * 2 * h * head_dim * context for h in heads)  # scores and values, per token
    return {"parameters": parameters, "bytes": path.stat().st_size, "read_bytes": read,
            "flops_per_token": 2 * matmul + attention, "arch": arch}  # fmt: skip


# --- quality inside llama.cpp --------------------------------------------------------------------------


def windows():
    from secateur.io import load_model
    from secateur.data.calibration import evaluation_data

    model, tokenizer = load_model(dense_dir())
    return evaluation_data(model, tokenizer, "enwiki-sample", 512, 64), tokenizer


def llama_cpp_module():
    os.environ["LLAMA_CPP_LIB_PATH"] = str(build())
    sys.path.insert(0, str(bindings()))
    import llama_cpp

    return llama_cpp


def bindings_perplexity(path: Path, data) -> dict:
    """Protocol v1 inside llama.cpp: the same token windows, each evaluated from an empty cache."""
    llama_cpp = llama_cpp_module()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_batch=512, n_ubatch=512, n_threads=THREADS,
                          logits_all=True, verbose=False)  # fmt: skip
    clock = time.perf_counter()
    nll, count = 0.0, 0
    for window in data.tolist():
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[: len(window) - 1])  # (seq - 1, vocab) float32
        top = logits.max(axis=1, keepdims=True)
        logz = top[:, 0].astype(np.float64) + np.log(np.exp(logits - top).sum(axis=1, dtype=np.float64))
        nll += float((logz - logits[np.arange(len(window) - 1), window[1:]]).sum())
        count += len(window) - 1
    del llm
    return {"perplexity": math.exp(nll / count), "predicted_tokens": count, "seconds": time.perf_counter() - clock}


def tool_perplexity(path: Path, text_file: Path) -> float | None:
    out = subprocess.run([str(build() / "llama-perplexity"), "-m", str(path), "-f", str(text_file), "-c", "512",
                          "-b", "512", "-t", str(THREADS), "--chunks", str(WINDOWS)], capture_output=True, text=True)  # fmt: skip
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", out.stdout + out.stderr)
    return float(found.group(1)) if found else None


def compare_files(ours: Path, theirs: Path) -> dict:
    """Tensor names, shapes and values of our export against llama.cpp's converter's (both f16)."""
    import gguf

    a = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    b = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    common = sorted(set(a) & set(b))
    shapes = all(list(a[n].shape) == list(b[n].shape) for n in common)
    diff = max(float(np.abs(gguf.dequantize(a[n].data, a[n].tensor_type).astype(np.float32)
                            - gguf.dequantize(b[n].data, b[n].tensor_type).astype(np.float32)).max())
               for n in common if list(a[n].shape) == list(b[n].shape))  # fmt: skip
    return {"only_ours": sorted(set(a) - set(b)), "only_theirs": sorted(set(b) - set(a)), "same_shapes": shapes,
            "max_abs_diff": diff}  # fmt: skip


def hf_perplexity_on(directory: Path, data) -> float:
    """secateur's own perplexity (HF engine, float32) of the model in `directory` on windows `data`."""
    from secateur.evaluate import perplexity
    from secateur.io import load

    model, _ = load(directory)
    return perplexity(model, data)["perplexity"]


def hf_on_windows(name: str, data) -> float:
    return hf_perplexity_on(model_dir(name), data)


def quality(names: list[str]) -> None:
    finished = done("quality")
    data, tokenizer = None, None
    text_file = WORK / "eval-windows.txt"
    for name in names:
        files = [(kind, exported(name, kind)) for kind in TYPES]
        if uniform(name):
            files.append(("f16-convert_hf_to_gguf", converted(name)))
        hf = None
        for kind, path in files:
            key = f"{name}:{kind}"
            if key in finished:
                continue
            if data is None:
                data, tokenizer = windows()
                data = data[:WINDOWS]
                text_file.write_text(tokenizer.decode(data.flatten().tolist()))
            hf = hf if hf is not None else hf_on_windows(name, data)
            row = {"model": name, "type": kind, "windows": WINDOWS, "hf_perplexity": hf,
                   "hf_perplexity_64": hf_perplexity(name), **file_facts(path),
                   "llama_cpp": bindings_perplexity(path, data),
                   "llama_perplexity_tool": tool_perplexity(path, text_file) if kind.startswith("f16") else None}
            if kind == "f16-convert_hf_to_gguf":
                row["versus_ours"] = compare_files(exported(name, "f16"), path)
            record("quality", key, **row)
            print(f"{key}: llama.cpp {row['llama_cpp']['perplexity']:.3f}, secateur {hf:.3f}", flush=True)


# --- speed --------------------------------------------------------------------------------------------


def llama_bench(path: Path, repetitions: int) -> dict:
    """llama-bench prefill 512 / decode 128 tokens/s, and the run's peak resident memory (MiB)."""
    args = [str(build() / "llama-bench"), "-m", str(path), "-t", str(THREADS), "-p", "512", "-n", "128",
            "-r", str(repetitions), "-o", "json"]  # fmt: skip
    child = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"llama-bench failed on {path}")
    rows = json.loads(out)
    prefill = next(r for r in rows if r["n_prompt"] == 512 and r["n_gen"] == 0)
    decode = next(r for r in rows if r["n_gen"] == 128 and r["n_prompt"] == 0)
    return {"prefill_tps": prefill["avg_ts"], "decode_tps": decode["avg_ts"], "peak_rss_mib": usage.ru_maxrss / 1024}


def speed(names: list[str], rounds: int, repetitions: int, types: tuple[str, ...] = TYPES) -> None:
    files = [(f"{n}:{k}", exported(n, k)) for n in names for k in types]
    files += [(f"{n}:f16-convert_hf_to_gguf", converted(n)) for n in names if uniform(n) and "f16" in types]
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    for r in range(rounds):
        order = files[r % len(files):] + files[: r % len(files)]
        for key, path in order:
            row = llama_bench(path, repetitions)
            record("speed", f"{stamp}:{r}:{key}", run=stamp, round=r, item=key, **row)
            print(f"round {r} {key}: prefill {row['prefill_tps']:.1f}, decode {row['decode_tps']:.1f} tokens/s", flush=True)


# --- table ----------------------------------------------------------------------------------------


def round_medians(rows: list[dict], base_of: Callable[[str], str]) -> dict[str, dict]:
    """Per item of one speed run's `rows`: the medians over rounds of its measures, and of its ratios
    to the item `base_of(item)` timed in the same round."""
    by_round: dict[int, dict[str, dict]] = {}
    for r in rows:
        by_round.setdefault(r["round"], {})[r["item"]] = r
    out = {}
    for item in {r["item"] for r in rows}:
        base = base_of(item)
        pairs = [(rs[item], rs[base]) for rs in by_round.values() if item in rs and base in rs]
        mine = [rs[item] for rs in by_round.values() if item in rs]
        out[item] = {k: statistics.median(m[k] for m in mine) for k in ("prefill_tps", "decode_tps", "peak_rss_mib")
                     if all(k in m for m in mine)}  # fmt: skip
        out[item].update({f"{k}_speedup": statistics.median(a[f"{k}_tps"] / b[f"{k}_tps"] for a, b in pairs)
                          for k in ("prefill", "decode")}, rounds=len(pairs))  # fmt: skip
    return out


def speed_ratios(run: str | None = None) -> dict[str, dict]:
    rows = list(done("speed").values())
    if not rows:
        return {}
    latest = run or max(r["run"] for r in rows)
    out = round_medians([r for r in rows if r["run"] == latest],
                        lambda item: "dense:" + item.split(":", 1)[1].replace("-convert_hf_to_gguf", ""))
    return {item: {**values, "run": latest} for item, values in out.items()}


def table(run: str | None = None) -> str:
    """Every quality row, with the speed of speed run `run` (default: the latest)."""
    quality_rows = done("quality")
    speeds = speed_ratios(run)
    lines = ["| model | type | arch | parameters | file MiB | prefill t/s | speedup (FLOP ideal) | decode t/s | "
             "speedup (bytes ideal) | ppl llama.cpp | ppl secateur eval | llama-perplexity |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for key, row in quality_rows.items():
        dense = quality_rows.get("dense:" + row["type"].replace("-convert_hf_to_gguf", ""))
        s = speeds.get(key, {})
        ideal_decode = dense["read_bytes"] / row["read_bytes"] if dense else float("nan")
        ideal_prefill = dense["flops_per_token"] / row["flops_per_token"] if dense else float("nan")
        tool = row["llama_perplexity_tool"]
        lines.append(
            f"| {row['model']} | {row['type']} | {row['arch']} | {row['parameters'] / 1e6:.1f}M | "
            f"{row['bytes'] / 2**20:.0f} | {s.get('prefill_tps', float('nan')):.0f} | "
            f"{s.get('prefill_speedup', float('nan')):.2f}x ({ideal_prefill:.2f}x) | {s.get('decode_tps', float('nan')):.1f} | "
            f"{s.get('decode_speedup', float('nan')):.2f}x ({ideal_decode:.2f}x) | {row['llama_cpp']['perplexity']:.2f} | "
            f"{row['hf_perplexity']:.2f} | {tool if tool is None else f'{tool:.2f}'} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", default="all", choices=["quality", "speed", "table", "all"])
    parser.add_argument("--only", help="comma-separated model names (default: all)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repetitions", type=int, default=3, help="llama-bench -r per model and round")
    parser.add_argument("--types", default=",".join(TYPES), help="speed: the GGUF types to time (default f16,q8_0)")
    parser.add_argument("--speed-run", help="table: the speed run to show (its start stamp; default the latest)")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    names = args.only.split(",") if args.only else list(MODELS)
    if "dense" not in names:
        names = ["dense", *names]
    if args.phase in ("quality", "all"):
        quality(names)
    if args.phase in ("speed", "all"):
        speed(names, args.rounds, args.repetitions, tuple(args.types.split(",")))
    print(table(args.speed_run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
