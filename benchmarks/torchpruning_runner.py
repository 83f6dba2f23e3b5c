"""Runs inside the peer's own virtual environment (torch-pruning==1.6.1, torch==2.13.0, transformers).

Prunes a HF model directory with Torch-Pruning's LLM settings (its examples/LLMs/prune_llm.py: the
MetaPruner with GroupMagnitudeImportance(p=2, group_reduction="mean"), local (per-layer) ranking,
the same ratio for hidden size and heads, heads pruned whole, head size kept, lm_head ignored,
round_to=4). The ratio is found by bisection so that the decoder blocks lose `--fraction` of their
parameters. Eager attention: Torch-Pruning traces GQA through repeat_kv's expand, which SDPA skips.
Evaluates perplexity here, on the benchmark's token windows with the same formula as
`secateur.evaluate.perplexity` (the pruned config may fail transformers' hidden % heads check on
reload), saves the pruned model when its config validates, and prints one JSON line.
"""

import argparse
import copy
import json
import sys
import time

import torch


def prune(model, ratio: float, heads_too: bool = True):
    import torch_pruning as tp

    heads = {}
    for name, module in model.named_modules():
        if name.endswith("self_attn"):
            heads[module.q_proj] = model.config.num_attention_heads
            heads[module.k_proj] = model.config.num_key_value_heads
            heads[module.v_proj] = model.config.num_key_value_heads
    example = torch.randint(0, model.config.vocab_size, (1, 16))
    pruner = tp.pruner.MetaPruner(
        model, example_inputs=example, importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
        global_pruning=False, pruning_ratio=ratio, ignored_layers=[model.lm_head], num_heads=heads,
        prune_num_heads=heads_too, prune_head_dims=False, head_pruning_ratio=ratio if heads_too else 0.0, round_to=4,
        output_transform=lambda out: out.logits,
    )
    for group in pruner.step(interactive=True):
        group.prune()
    attention = model.model.layers[0].self_attn
    config = model.config
    config.hidden_size = model.lm_head.in_features
    config.num_attention_heads = attention.q_proj.out_features // attention.head_dim
    config.num_key_value_heads = attention.k_proj.out_features // attention.head_dim
    config.intermediate_size = model.model.layers[0].mlp.gate_proj.out_features
    config.tie_word_embeddings = model.lm_head.weight is model.model.embed_tokens.weight
    for layer in model.model.layers:
        layer.self_attn.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
    return model


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4) -> float:
    import math

    import torch.nn.functional as F

    total, count = 0.0, 0
    for batch in windows.split(batch_size):
        logits = model(input_ids=batch, use_cache=False).logits
        total += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1),
                                       reduction="sum"))
        count += batch[:, 1:].numel()
    return math.exp(total / count)


def block_parameters(model) -> int:
    return sum(p.numel() for p in model.model.layers.parameters())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--fraction", type=float, required=True, help="of decoder-block parameters to remove")
    parser.add_argument("--eval", required=True, help="torch file with the (windows, seq_len) evaluation ids")
    parser.add_argument("--out", required=True, help="where to save the pruned model (skipped if its config is invalid)")
    parser.add_argument("--no-heads", action="store_true", help="check: prune hidden and MLP channels only")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="eager").eval()
    dense.config.use_cache = False
    before = block_parameters(dense)
    start = time.perf_counter()
    low, high, best = 0.0, 0.9, None
    for _ in range(10):  # bisection on the ratio
        ratio = (low + high) / 2
        model = prune(copy.deepcopy(dense), ratio, not args.no_heads)
        removed = 1 - block_parameters(model) / before
        if best is None or abs(removed - args.fraction) < abs(best[1] - args.fraction):
            best = (ratio, removed, model)
        if abs(removed - args.fraction) < 0.005:
            break
        low, high = (ratio, high) if removed < args.fraction else (low, ratio)
    seconds = time.perf_counter() - start
    ratio, removed, model = best
    ppl = perplexity(model, torch.load(args.eval))
    model.config.use_cache = True
    try:
        model.save_pretrained(args.out)
        saved = True
    except Exception as exc:  # transformers validates hidden_size % num_attention_heads on save
        saved = f"not saved: {exc}"
    print(json.dumps({"perplexity": ppl, "saved": saved, "ratio": ratio, "removed_fraction": removed, "search_seconds": seconds,
                      "hidden_size": model.config.hidden_size, "heads": model.config.num_attention_heads,
                      "kv_heads": model.config.num_key_value_heads,
                      "intermediate_size": model.config.intermediate_size}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
