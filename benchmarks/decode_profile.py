"""Where a decode step's time goes: the CPU profiler over greedy decode steps with the KV cache
(after a 512-token prefill, as `secateur bench` times them), split into the LM head's matmul, the
decoder blocks' matmuls, the KV cache's concatenations, attention, and everything else.

It explains why decode speedups stay below the parameter ratio: the LM head and the per-step work
that does not shrink with the blocks' weights.

    python benchmarks/decode_profile.py MODEL [MODEL ...] [--steps 32] [--reference-shape]

`--reference-shape` adds the issue's reference shape of the first model (half the MLP width, one
key/value group, random weights; see `structured.reference_shape`).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

GROUPS = ("lm head matmul", "block matmuls", "kv cache cat", "attention", "other")


@torch.inference_mode()
def split(path: str, prompt: int, steps: int) -> dict[str, float]:
    """Milliseconds per decode step in each group (self CPU time under the profiler, which adds its
    own per-operator cost, mostly to "other") and per step without the profiler ("total")."""
    from secateur.io import load

    model, _ = load(path)
    head = model.get_output_embeddings()
    head_forward = head.forward
    head.forward = lambda x: _labelled(head_forward, x)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)

    def step():
        nonlocal cache, token
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)

    for _ in range(8):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    total = (time.perf_counter() - start) / steps * 1e3
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    ms = dict.fromkeys(GROUPS, 0.0)
    head_ms = sum(e.cpu_time_total for e in prof.key_averages() if e.key == "lm_head") / 1e3 / steps
    for event in prof.key_averages():
        self_ms = event.self_cpu_time_total / 1e3 / steps
        if event.key in ("aten::mm", "aten::addmm"):
            ms["block matmuls"] += self_ms
        elif event.key == "aten::cat":
            ms["kv cache cat"] += self_ms
        elif "scaled_dot_product" in event.key or event.key in ("aten::bmm", "aten::softmax", "aten::_softmax"):
            ms["attention"] += self_ms
        elif event.key != "lm_head":
            ms["other"] += self_ms
    ms["lm head matmul"] = head_ms
    ms["block matmuls"] -= head_ms
    return {**ms, "profiled": sum(ms.values()), "total": total}


def _labelled(forward, x):
    with record_function("lm_head"):
        return forward(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--reference-shape", action="store_true")
    args = parser.parse_args()
    models = [(path, path) for path in args.models]
    if args.reference_shape:
        from structured import reference_shape

        models.append(("reference shape (random)", reference_shape(args.models[0])))
    rows = [(label, split(path, args.prompt, args.steps)) for label, path in models]
    print("| model | " + " | ".join(GROUPS) + " | profiled step | step without profiler |")
    print("|---|" + "---|" * (len(GROUPS) + 2))
    for label, ms in rows:
        print(f"| {label} | " + " | ".join(f"{ms[g]:.1f}" for g in GROUPS) + f" | {ms['profiled']:.1f} | {ms['total']:.1f} |")


if __name__ == "__main__":
    main()
