"""Does llama.cpp compute what secateur exported? For every family `secateur export` writes, a tiny
random model (the test suite's configs and byte-level BPE tokenizer) is exported in f32 and run by
llama.cpp (its Python bindings, built as llamacpp_build.py builds it) on the same token ids as the
HF model; the table gives the largest difference between the two engines' logits (the logits are of
order 1) and whether every position's greedy token is the same.

    python benchmarks/export_logits.py [--families llama,qwen2_moe]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import VOCAB, tiny_model  # noqa: E402
from llamacpp import llama_cpp_module  # noqa: E402
from test_export import saved  # noqa: E402

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3", "qwen2_moe", "qwen3_moe", "mixtral", "olmoe"]


def compare(family: str, work: Path, tokens: int = 32) -> dict:
    from secateur.export import export_gguf

    overrides = {"gemma3_text": {"query_pre_attn_scalar": 16},  # its head size
                 "olmoe": {"num_key_value_heads": 4}}  # llama.cpp's olmoe holds no grouped-query attention
    model = tiny_model(family, **overrides.get(family, {}))
    out = work / family
    export_gguf(saved(model, out), out / "model.gguf", kind="f32")
    ids = torch.randint(4, VOCAB - 8, (tokens,), generator=torch.Generator().manual_seed(0))
    if getattr(model.config, "model_type", "") == "gemma3_text":
        ids[0] = model.config.bos_token_id  # Gemma reads BOS first
    with torch.no_grad():
        ours = model(ids[None]).logits[0].numpy()  # (tokens, vocab)
    llama_cpp = llama_cpp_module()
    llm = llama_cpp.Llama(model_path=str(out / "model.gguf"), n_ctx=64, n_batch=64, n_threads=2, logits_all=True,
                          verbose=False)  # fmt: skip
    llm.eval(ids.tolist())
    theirs = np.asarray(llm.scores[:tokens])[:, : ours.shape[1]]
    del llm
    return {"family": family, "max_abs_diff": float(np.abs(ours - theirs).max()),
            "logit_scale": float(np.abs(ours).max()), "same_greedy": bool((ours.argmax(1) == theirs.argmax(1)).all())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    args = parser.parse_args()
    print("| family | max abs logit difference | largest logit | same greedy tokens |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as work:
        for family in args.families.split(","):
            row = compare(family, Path(work))
            print(f"| {family} | {row['max_abs_diff']:.2e} | {row['logit_scale']:.2f} | {row['same_greedy']} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
