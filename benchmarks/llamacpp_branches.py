"""Removed attention / MLP branches inside llama.cpp: the deci layout checked on SmolLM2-135M.

Hand-picked removals (a layout check, not a pruning method): the MLP of block 5 and the attention of
block 7 of the dense model, saved, exported to GGUF f16 (`deci`: block 7 has 0 heads, block 5 keeps
its attention and gets a one-channel zero MLP), then perplexity on the first 16 protocol-v1 windows
inside llama.cpp (Python bindings) against secateur's HF engine on the same windows.

    python benchmarks/llamacpp_branches.py [--remove '[[5, "mlp"], [7, "attention"]]']
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import llamacpp as bench  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--remove", default='[[5, "mlp"], [7, "attention"]]')
    args = parser.parse_args()
    from secateur.depth.structure import remove_sublayers
    from secateur.evaluate import perplexity
    from secateur.export import export_gguf
    from secateur.io import load, save
    from secateur.models import adapter_for
    from secateur.manifest import structure_of

    removed = [tuple(u) for u in json.loads(args.remove)]
    model, tokenizer = load(bench.dense_dir())
    remove_sublayers(model, adapter_for(model), removed)
    out = bench.WORK / "branches"
    shutil.rmtree(out, ignore_errors=True)
    save(model, tokenizer, out, {"source": {"path": str(bench.dense_dir())}, "structure": structure_of(model)})
    gguf_file = bench.WORK / "branches-f16.gguf"
    gguf_file.unlink(missing_ok=True)
    record = export_gguf(out, gguf_file, "f16")
    data, _ = bench.windows()
    data = data[: bench.WINDOWS]
    inside = bench.bindings_perplexity(gguf_file, data)["perplexity"]
    hf = perplexity(model, data)["perplexity"]
    row = bench.record("branches", args.remove, removed=removed, arch=record["arch"], stub_mlps=record["stub_mlps"],
                       llama_cpp=inside, hf=hf, windows=bench.WINDOWS)  # fmt: skip
    print(f"removed {removed}: {row['arch']}, stub MLPs {row['stub_mlps']}; perplexity llama.cpp {inside:.3f}, "
          f"secateur {hf:.3f} ({100 * (inside / hf - 1):+.3f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
