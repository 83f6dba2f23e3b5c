"""Pruned mixtures of experts in llama.cpp: the MoEfied SmolLM2 proxy of benchmarks/experts.py and
its expert-pruned outputs, exported with `secateur export` (qwen2moe) and run by llama.cpp (built
from the llama-cpp-python sdist, see llamacpp_build.py), CPU, 2 threads.

Models (built by benchmarks/experts.py, which this script runs for a missing one): the proxy (a
shared expert and 8 routed experts of 96 channels per block, top-2), frequency 50% and REAP 50% of
the routed experts removed (4 left, top-2 kept), and every routed expert at half width
(expert-width 50%). Quality figures are the proxy's, not a pretrained MoE's. The proxy renormalises
its top-2 routing weights, which llama.cpp's qwen2moe graph never does (`secateur export` refuses
it), and its shared expert's gate weights are exactly 0, where llama.cpp's sigmoid (silu(g) / g) is
NaN; every model here is therefore a variant, in secateur and in llama.cpp alike: `norm_topk_prob`
false and the gate weights 1e-6 (see `model_dir`): another routing than benchmarks/experts.py's rows
(its perplexities differ from them), the same cost per token.

Phases (resumable; each finished item is a line of benchmarks/results/experts-llamacpp.jsonl):
- `quality`: f16 and q8_0 exports; perplexity inside llama.cpp (its Python bindings, each of
  protocol v1's first 16 windows of 512 tokens from an empty cache) next to secateur's HF
  perplexity on the same windows; the f16 export against llama.cpp's own `convert_hf_to_gguf.py`
  on the same directory (tensor names, shapes, values); the file's size, and the bytes of weights
  one decoded token reads (the routed experts counted at top-k / experts of their bytes).
- `speed`: `llama-bench` prefill (512) and decode (128) tokens/s and the peak resident memory of a
  `llama-bench` run of that file, `--rounds` interleaved rounds, medians of per-round ratios to the
  proxy of the same type. Nothing else may run on the machine meanwhile.

    python benchmarks/experts_llamacpp.py [--phase quality|speed|table|all] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch


HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "experts-llamacpp.jsonl"
WORK = ROOT / "bench-out" / "experts-llamacpp"
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(HERE))

import experts  # noqa: E402
import llamacpp  # noqa: E402
from llamacpp import (WINDOWS, bindings_perplexity, compare_files, convert, export, file_facts,  # noqa: E402
                      hf_perplexity_on, llama_bench, round_medians)
from measure import append_row, finished  # noqa: E402

MODELS = ("proxy", "frequency50", "reap50", "expert-width50")
TYPES = ("f16", "q8_0")


GATE = 1e-6  # every weight of the shared expert's gate in the variants (the proxy's are exactly 0)


def model_dir(name: str) -> Path:
    """The benchmark's model as llama.cpp's qwen2moe can compute it: its top-k routing weights not
    renormalised (`norm_topk_prob` false), and its shared expert's gate weights 1e-6 instead of 0
    (llama.cpp computes that gate's sigmoid as silu(g) / g, NaN at g = 0 exactly; the gate moves
    from 0.5 by about 1e-5). Both engines read the same variant."""
    from safetensors.torch import load_file, save_file

    path = experts.path_of(name)
    if not (path / "config.json").exists():
        subprocess.run([sys.executable, str(HERE / "experts.py"), "--only", name], check=True)
    variant = WORK / f"{name}-variant"
    if not (variant / "config.json").exists():
        variant.mkdir(parents=True, exist_ok=True)
        for file in path.iterdir():
            if file.suffix != ".safetensors" and file.name not in ("config.json", "model.safetensors.index.json"):
                (variant / file.name).symlink_to(file.resolve())
        for file in path.glob("*.safetensors"):
            tensors = load_file(file)
            for key in tensors:
                if key.endswith("shared_expert_gate.weight"):
                    tensors[key] = torch.full_like(tensors[key], GATE)
            save_file(tensors, variant / file.name, metadata={"format": "pt"})
        if (path / "model.safetensors.index.json").exists():
            (variant / "model.safetensors.index.json").symlink_to((path / "model.safetensors.index.json").resolve())
        config = json.loads((path / "config.json").read_text())
        (variant / "config.json").write_text(json.dumps({**config, "norm_topk_prob": False}, indent=2))
    return variant


def exported(name: str, kind: str) -> Path:
    return export(model_dir(name), WORK / f"{name}-{kind}.gguf", kind)


def converted(name: str) -> Path:
    """The same directory through llama.cpp's own converter, f16."""
    return convert(model_dir(name), WORK / f"{name}-f16-convert_hf_to_gguf.gguf")


def active_read_bytes(path: Path) -> int:
    """Bytes of weights one decoded token reads: every tensor but the (untied) input embedding, the
    routed experts' at the share of experts a token is routed to."""
    import gguf

    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    share = reader.fields[f"{arch}.expert_used_count"].contents() / reader.fields[f"{arch}.expert_count"].contents()
    tensors = {t.name: t for t in reader.tensors}
    tied = "output.weight" not in tensors
    return int(sum(int(t.n_bytes) * (share if "_exps." in n else 1.0) for n, t in tensors.items()
                   if n != "token_embd.weight" or tied))  # fmt: skip


def windows():
    """The first WINDOWS of protocol v1's windows (the proxy shares SmolLM2's tokenizer)."""
    return llamacpp.windows()[0][:WINDOWS]


def quality(names: list[str]) -> None:
    done, data = finished(RESULTS), None
    for name in names:
        hf = None
        for kind in (*TYPES, "f16-convert_hf_to_gguf"):
            key = f"quality:{name}:{kind}"
            if key in done:
                continue
            path = converted(name) if kind.endswith("convert_hf_to_gguf") else exported(name, kind)
            data = windows() if data is None else data
            hf = hf_perplexity_on(model_dir(name), data) if hf is None else hf
            row = {"row": key, "model": name, "type": kind, "windows": WINDOWS, "hf_perplexity": hf,
                   **file_facts(path), "active_read_bytes": active_read_bytes(path)}  # fmt: skip
            if kind.endswith("convert_hf_to_gguf"):
                row["versus_ours"] = compare_files(exported(name, "f16"), path)
            try:
                row["llama_cpp"] = bindings_perplexity(path, data)
            except ValueError as error:  # the converter leaves out a tied head, which llama.cpp's qwen2moe requires
                row["llama_cpp"], row["llama_cpp_error"] = {"perplexity": float("nan")}, str(error)
            append_row(RESULTS, row)
            print(f"{key}: llama.cpp {row['llama_cpp']['perplexity']:.3f}, secateur {hf:.3f}", flush=True)


def speed(names: list[str], rounds: int, repetitions: int) -> None:
    files = [(f"{n}:{k}", exported(n, k)) for n in names for k in TYPES]
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    for r in range(rounds):
        for item, path in files[r % len(files):] + files[: r % len(files)]:
            row = {"row": f"speed:{stamp}:{r}:{item}", "run": stamp, "round": r, "item": item, **llama_bench(path, repetitions)}
            append_row(RESULTS, row)
            print(f"round {r} {item}: prefill {row['prefill_tps']:.1f}, decode {row['decode_tps']:.1f} tokens/s, "
                  f"{row['peak_rss_mib']:.0f} MiB", flush=True)  # fmt: skip


def speeds() -> dict[str, dict]:
    """The latest speed run's medians and ratios to the proxy of the same type."""
    rows = [r for r in finished(RESULTS).values() if r["row"].startswith("speed:")]
    if not rows:
        return {}
    latest = max(r["run"] for r in rows)
    return round_medians([r for r in rows if r["run"] == latest], lambda item: "proxy:" + item.split(":", 1)[1])


def table() -> str:
    rows = {r["row"]: r for r in finished(RESULTS).values() if r["row"].startswith("quality:")}
    timed = speeds()
    lines = ["| model | type | parameters | file MiB | peak RSS MiB | read/token MiB | decode t/s | speedup (bytes ideal) | "
             "prefill t/s | speedup | ppl llama.cpp | ppl secateur | converter max diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for key, row in rows.items():
        base = rows.get(f"quality:proxy:{row['type']}")
        s = timed.get(f"{row['model']}:{row['type']}", {})
        ideal = base["active_read_bytes"] / row["active_read_bytes"] if base else float("nan")
        versus = row.get("versus_ours")
        nan = float("nan")
        lines.append(
            f"| {row['model']} | {row['type']} | {row['parameters'] / 1e6:.1f}M | {row['bytes'] / 2**20:.0f} | "
            f"{s.get('peak_rss_mib', nan):.0f} | {row['active_read_bytes'] / 2**20:.0f} | {s.get('decode_tps', nan):.1f} | "
            f"{s.get('decode_speedup', nan):.2f}x ({ideal:.2f}x) | {s.get('prefill_tps', nan):.0f} | "
            f"{s.get('prefill_speedup', nan):.2f}x | {row['llama_cpp']['perplexity']:.3f} | {row['hf_perplexity']:.3f} | "
            f"{'' if versus is None else versus['max_abs_diff']} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", default="all", choices=["quality", "speed", "table", "all"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repetitions", type=int, default=3, help="llama-bench -r per model and round")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    if args.phase in ("quality", "all"):
        quality(list(MODELS))
    if args.phase in ("speed", "all"):
        speed(list(MODELS), args.rounds, args.repetitions)
    print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
