"""Memory at scale (CPU): pruning streamed from disk to disk against in memory, and recovery's peak
resident memory and speed before and after the chunked loss.

Streaming rows: Wanda 50% (the default 64 x 512 calibration tokens unless said) by `secateur prune`
with `--offload none` (in memory) and `--offload disk` (blocks streamed from the input's safetensors
to the output); `*-depth-*` rows: angular depth removing a quarter of the blocks, compensated (the
default 16 x 512 calibration tokens for SmolLM2); `*-width-*` rows: width 20% with `--reconstruct` (the
default 64 x 512 calibration tokens for SmolLM2); `*-hidden-*` rows: width 30% of which a tenth of the
hidden channels, with `--reconstruct`. `smollm2-*`: SmolLM2-135M in float32. `llama8b-*`: a random-weight model with
Llama-3.1-8B shapes (32 blocks of hidden 4,096, MLP 14,336, 32 query / 8 key-value heads, a
128,256-token vocabulary, untied head: 8.03B parameters, bfloat16 safetensors, 16.1 GB on disk, one
shard per block), written here by `llama8b_model()` (normal(0, 0.02) weights, SmolLM2's tokenizer for
the calibration text), pruned in bfloat16 with 16 x 512 calibration tokens;
`llama8b2-memory` / `llama8b2-disk` are the same with 2 blocks, the per-block cost in memory and
streamed on the same block shape; `llama8b16-*` has 16 of those blocks (8 GB: in memory too on
this 24 GiB machine). `prune s` is the pass over the blocks (a streamed run's reading and
writing of blocks included; its copying of what lies outside the blocks is `write s`). Rows written
since 2026-12-07 also record the child's resident memory read every 50 ms from outside: its median,
99th percentile and the share of readings above 4 GiB (the peak alone spreads from run to run).

Recovery rows: SmolLM2-135M width 50% (`secateur prune --method width --remove-fraction 0.5`, 81.7M
parameters) trained by `secateur train` with the dense model as teacher at the default batch
(4 x 512 tokens), 16,384 tokens (8 optimizer steps, one validation at the end), float32 weights
with the default precision. Peak RSS is the child's own (`wait4`); tokens/s is the run's training
rate as its manifest records it (validation and checkpoints excluded).

    recovery-full-logits   --loss-chunk 0: the model's own batch x sequence x vocabulary logits
    recovery-chunked       the default: logits 2^24 at a time, gradients worked out per chunk
    recovery-chunked-ac    the default plus --activation-checkpointing
    recovery-fused(-ac)    the same after AdamW became fused, on the default data of the day (the offline mix)

Evaluation rows (`*-eval-*`): `secateur eval` perplexity on enwiki-sample (512-token windows), the model loaded
(`--offload none`) against its blocks read from disk one at a time (`--offload disk`).

Resumable: every finished row is a line of benchmarks/results/scale.jsonl and is skipped next time.

    python benchmarks/scale.py [--only recovery-chunked,...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(HERE))
RESULTS = HERE / "results" / "scale.jsonl"
WORK = ROOT / "bench-out" / "scale"

from measure import cache, cli_timed, run_rows  # noqa: E402

TOKENS = 16384
RECOVERY = {
    "recovery-full-logits": ["--loss-chunk", "0"],
    "recovery-chunked": [],
    "recovery-chunked-ac": ["--activation-checkpointing"],
    # fused AdamW (2026-12-07); the default data is the offline mix since issue 38 (the rows above: enwiki)
    "recovery-fused": [],
    "recovery-fused-ac": ["--activation-checkpointing"],
    # the teacher held for autocast (block linear layers in bfloat16) and the best weights kept on disk only
    # (2026-12-07); `-before-` rows: the code just before (commit f21c766), run with PYTHONPATH=its src, the same day
    "recovery-held": [],
    "recovery-held-ac": ["--activation-checkpointing"],
    "recovery-before-held": [],
    "recovery-before-held-ac": ["--activation-checkpointing"],
}


WANDA = ["--method", "wanda", "--sparsity", "0.5"]
DEPTH = ["--method", "angular", "--remove-fraction", "0.25"]  # compensated: the default where the family allows
WIDTH = ["--method", "width", "--remove-fraction", "0.2", "--reconstruct"]  # the README's width recipe
STREAM = {
    "smollm2-memory": ("smollm2", ["--offload", "none", *WANDA]),
    "smollm2-disk": ("smollm2", ["--offload", "disk", *WANDA]),
    "llama8b2-memory": ("llama8b2", ["--offload", "none", *WANDA]),
    "llama8b2-disk": ("llama8b2", ["--offload", "disk", *WANDA]),
    "llama8b-disk": ("llama8b", ["--offload", "disk", *WANDA]),
    "smollm2-depth-memory": ("smollm2", ["--offload", "none", *DEPTH]),
    "smollm2-depth-disk": ("smollm2", ["--offload", "disk", *DEPTH]),
    "llama8b16-depth-memory": ("llama8b16", ["--offload", "none", *DEPTH]),
    "llama8b16-depth-disk": ("llama8b16", ["--offload", "disk", *DEPTH]),
    "llama8b16-depth-plain-disk": ("llama8b16", ["--offload", "disk", *DEPTH, "--no-compensate"]),
    "smollm2-width-memory": ("smollm2", ["--offload", "none", *WIDTH]),
    "smollm2-width-disk": ("smollm2", ["--offload", "disk", *WIDTH]),
    "llama8b2-width-memory": ("llama8b2", ["--offload", "none", *WIDTH]),
    "llama8b2-width-disk": ("llama8b2", ["--offload", "disk", *WIDTH]),
    "llama8b16-width-disk": ("llama8b16", ["--offload", "disk", *WIDTH]),
    # after the refit's Gram matrix is handed over and indexed once (Hessian.take): the same weights
    "llama8b2-width-disk-handover": ("llama8b2", ["--offload", "disk", *WIDTH]),
    # after the depth fit's sums are solved in place (NormalEquations.update in place, Cholesky in place)
    "llama8b16-depth-disk-consuming": ("llama8b16", ["--offload", "disk", *DEPTH]),
    # after score methods prune one layer of a group at a time and large groups hand free pages back
    "smollm2-memory-layerwise": ("smollm2", ["--offload", "none", *WANDA]),
    "smollm2-disk-layerwise": ("smollm2", ["--offload", "disk", *WANDA]),
    "llama8b2-disk-layerwise": ("llama8b2", ["--offload", "disk", *WANDA]),
    "llama8b-disk-layerwise": ("llama8b", ["--offload", "disk", *WANDA]),
    # the free pages handed back after groups of 2^26 weights or more (gate and up) instead of 2^24 (every group)
    "llama8b2-disk-trim26": ("llama8b2", ["--offload", "disk", *WANDA]),
    "llama8b-disk-trim26": ("llama8b", ["--offload", "disk", *WANDA]),
    # one layer at a time, no free pages handed back inside a block (what was kept)
    "llama8b2-disk-notrim": ("llama8b2", ["--offload", "disk", *WANDA]),
    "llama8b-disk-notrim": ("llama8b", ["--offload", "disk", *WANDA]),
    # the code before layer-at-a-time (commit 4ba40a9, run with PYTHONPATH=its src), again, the same day
    "llama8b-disk-4ba40a9": ("llama8b", ["--offload", "disk", *WANDA]),
    # the same command as llama8b-disk, run again with the child's resident memory read every 50 ms
    "llama8b-disk-profiled": ("llama8b", ["--offload", "disk", *WANDA]),
    # free pages handed back after every group (what was kept), profiled the same way
    "llama8b-disk-trim-every-group": ("llama8b", ["--offload", "disk", *WANDA]),
    "llama8b-disk-trim-every-group-2": ("llama8b", ["--offload", "disk", *WANDA]),  # the same, again
}
# width 30% of which a tenth of the hidden channels (--hidden-fraction 0.1), with the refit: since 2026-12-07 the
# hidden cut streams as well
HIDDEN = ["--method", "width", "--remove-fraction", "0.3", "--hidden-fraction", "0.1", "--reconstruct"]
STREAM.update({
    "smollm2-hidden-memory": ("smollm2", ["--offload", "none", *HIDDEN]),
    "smollm2-hidden-disk": ("smollm2", ["--offload", "disk", *HIDDEN]),
    "llama8b2-hidden-disk": ("llama8b2", ["--offload", "disk", *HIDDEN]),
})
EXPERTS = ["--method", "experts", "--remove-fraction", "0.5"]  # REAP, uniform: 64 of every block's 128 experts
STREAM.update({
    "qwen3moe2-experts-memory": ("qwen3moe2", ["--offload", "none", *EXPERTS]),
    "qwen3moe2-experts-disk": ("qwen3moe2", ["--offload", "disk", *EXPERTS]),
    "qwen3moe12-experts-disk": ("qwen3moe12", ["--offload", "disk", *EXPERTS]),
})
# perplexity by `secateur eval` (enwiki-sample, 512-token windows), the model loaded against its blocks read from
# disk one at a time: SmolLM2 in float32 on the default 64 windows, the 8B-shaped model in bfloat16 on 4 windows
EVAL = {
    "smollm2-eval-memory": ("smollm2", ["--offload", "none"]),
    "smollm2-eval-disk": ("smollm2", ["--offload", "disk"]),
    "llama8b2-eval-memory": ("llama8b2", ["--offload", "none", "--dtype", "bfloat16", "--windows", "4"]),
    "llama8b2-eval-disk": ("llama8b2", ["--offload", "disk", "--dtype", "bfloat16", "--windows", "4"]),
    "llama8b-eval-disk": ("llama8b", ["--offload", "disk", "--dtype", "bfloat16", "--windows", "4"]),
}
BLOCKS = {"llama8b": 32, "llama8b2": 2, "llama8b16": 16, "qwen3moe2": 2, "qwen3moe12": 12}
LLAMA8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
               vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=False,
               bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5)  # fmt: skip
# Qwen3-30B-A3B's block: 128 routed experts of width 768 (top-8, renormalised), 32 query / 4 key-value
# heads of 128, hidden 2,048, a 151,936-token vocabulary, untied head (the real model has 48 blocks)
QWEN3MOE = dict(hidden_size=2048, moe_intermediate_size=768, intermediate_size=6144, num_experts=128,
                num_experts_per_tok=8, norm_topk_prob=True, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                vocab_size=151936, rope_theta=1000000.0, max_position_embeddings=40960, tie_word_embeddings=False,
                bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-6)  # fmt: skip


def llama8b_model(blocks: int) -> Path:
    """A random-weight bfloat16 checkpoint with Llama-3.1-8B shapes and `blocks` blocks."""
    from transformers import LlamaConfig

    return random_model(f"random-llama8b-shape-{blocks}", LlamaConfig(**LLAMA8B, num_hidden_layers=blocks,
                                                                      dtype="bfloat16"))  # fmt: skip


def qwen3moe_model(blocks: int) -> Path:
    """A random-weight bfloat16 checkpoint with Qwen3-30B-A3B's block shapes and `blocks` blocks, its
    experts stored one matrix per expert and projection as published checkpoints store them."""
    from transformers import Qwen3MoeConfig

    return random_model(f"random-qwen3moe-shape-{blocks}", Qwen3MoeConfig(**QWEN3MOE, num_hidden_layers=blocks,
                                                                          dtype="bfloat16"))  # fmt: skip


def random_model(name: str, config) -> Path:
    """A random-weight bfloat16 checkpoint of `config` (normal(0, 0.02) weights, norms at one), written
    one shard per block (never whole in memory), fused experts in the stored layout
    (`calibrate.layout`); SmolLM2's tokenizer for the calibration text."""
    import shutil

    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from secateur.calibrate.layout import layout_of
    from secateur.models import adapter_for

    path = cache() / "models" / name
    if (path / "model.safetensors.index.json").is_file():
        return path
    staging = path.with_name(path.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    layout = layout_of(adapter_for(model), set())  # fused experts stored per expert
    generator = torch.Generator().manual_seed(0)
    groups: dict[str, list[str]] = {}
    for name, _ in model.named_parameters():
        parts = name.split(".")
        groups.setdefault(f"block-{int(parts[2]):03d}" if parts[1] == "layers" else "rest", []).append(name)
    weight_map, total = {}, 0
    for shard, names in sorted(groups.items()):
        tensors = {}
        for name in names:
            shape = tuple(model.get_parameter(name).shape)
            head, layers, rest = name.partition(".layers.")  # a block's tensor: stored per its layout
            number, _, relative = rest.partition(".") if layers else ("", "", name)
            prefix = f"{head}.layers.{number}." if layers else ""
            for stored, at in layout.pieces(relative, shape):
                piece = shape if at is None else (at[2] - at[1], *shape[2:])
                tensors[prefix + stored] = (torch.ones(piece) if name.endswith("norm.weight") else
                                            torch.randn(piece, generator=generator) * 0.02).to(torch.bfloat16)  # fmt: skip
                total += tensors[prefix + stored].numel() * 2
        save_file(tensors, staging / f"{shard}.safetensors", metadata={"format": "pt"})
        weight_map.update({name: f"{shard}.safetensors" for name in tensors})
    (staging / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": weight_map}))  # fmt: skip
    config.save_pretrained(staging)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(dense() / name, staging / name)
    staging.rename(path)
    return path


def made(model: str) -> Path:
    """The random-weight checkpoint of a row's `model` (`llama8b*`, `qwen3moe*`), written by a child
    process: this one stays small, since a child's peak RSS as wait4 reports it includes its parent's
    at the spawn."""
    import subprocess

    maker = "qwen3moe_model" if model.startswith("qwen3moe") else "llama8b_model"
    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import scale; print(scale.{maker}({BLOCKS[model]}))"
    return Path(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                               text=True).stdout.split()[-1])  # fmt: skip


def stream_row(name: str) -> dict:
    model, flags = STREAM[name]
    path = dense() if model == "smollm2" else made(model)
    extra = [] if model == "smollm2" else ["--dtype", "bfloat16", "--calib-samples", "16"]
    out = WORK / name
    resident: list[float] = []
    _, seconds, peak = cli_timed("prune", path, *flags, *extra, "--check-windows", "0", "--out", out,
                                 "--overwrite", resident=resident)  # fmt: skip
    manifest = json.loads((out / "secateur.json").read_text())
    record = manifest["history"][-1]
    row = {"row": name, "peak_rss_mib": peak, "seconds": seconds, "prune_seconds": record["seconds"],
           "write_seconds": record.get("write_seconds"),
           "blocks": manifest["structure"]["blocks"], "parameters": manifest["structure"]["parameters"],
           "sparsity": manifest["structure"]["target_sparsity"], "calibration_tokens": record["calibration"]["tokens"],
           "offload": manifest.get("offload", "none"), "kind": record["kind"],
           "removed_blocks": record["result"].get("removed_blocks"),
           "input_blocks": record["result"].get("blocks_before", manifest["structure"]["blocks"]),
           **resident_profile(resident)}  # fmt: skip
    if model != "smollm2":
        import shutil

        shutil.rmtree(out)  # 16 GB: the figures are what the row keeps
    return row


def eval_row(name: str) -> dict:
    model, flags = EVAL[name]
    path = dense() if model == "smollm2" else made(model)
    resident: list[float] = []
    out, seconds, peak = cli_timed("eval", path, *flags, "--json", resident=resident)
    result = json.loads(out)
    return {"row": name, "peak_rss_mib": peak, "seconds": seconds, "eval_seconds": result["seconds"],
            "perplexity": result["perplexity"], "mean_nll": result["mean_nll"], "windows": result["windows"],
            "offload": result.get("offload", "none"), **resident_profile(resident)}  # fmt: skip


def resident_profile(resident: list[float]) -> dict:
    """How the child's resident memory spread over its run (read every 50 ms, `measure.RESIDENT_EVERY`): the
    median, the 99th percentile and the share of the readings above 4 GiB."""
    if not resident:
        return {}
    ordered = sorted(resident)
    return {"rss_median_mib": ordered[len(ordered) // 2], "rss_p99_mib": ordered[int(0.99 * (len(ordered) - 1))],
            "rss_over_4gib_share": sum(r > 4096 for r in resident) / len(resident)}


def dense() -> Path:
    from secateur.demo import default_model_dir

    return default_model_dir()


def width50() -> Path:
    path = WORK / "width50"
    if not (path / "secateur.json").is_file():
        cli_timed("prune", dense(), "--method", "width", "--remove-fraction", "0.5", "--out", path, "--overwrite")
    return path


def measure(name: str, _probe_items: int) -> dict:
    if name in STREAM:
        return stream_row(name)
    if name in EVAL:
        return eval_row(name)
    if name in RECOVERY:
        out = WORK / name
        _, seconds, peak = cli_timed("train", width50(), "--teacher", dense(), "--tokens", TOKENS, "--eval-every", 100,
                                     *RECOVERY[name], "--out", out, "--overwrite")  # fmt: skip
        manifest = json.loads((out / "secateur.json").read_text())
        record = manifest["history"][-1]["result"]
        return {"row": name, "peak_rss_mib": peak, "tokens_per_s": record["tokens_per_s"], "seconds": seconds,
                "loss_chunk": record.get("loss_chunk"), "precision": record["precision"],
                "first_loss": record["loss"]["first"], "best_validation": record["best"]["perplexity"],
                "tokens": record["tokens"]}  # fmt: skip
    raise SystemExit(f"unknown row {name}")


def table() -> None:
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines()] if RESULTS.exists() else []
    base = next((r for r in rows if r["row"] == "recovery-full-logits"), None)
    print(f"{'row':24s} {'peak RSS MiB':>12s} {'tokens/s':>9s} {'vs full':>8s} {'first loss':>10s} {'val ppl':>8s}")
    print(f"\n{'row':18s} {'blocks':>6s} {'peak RSS MiB':>12s} {'prune s':>8s} {'s/block':>8s} {'write s':>8s} "
          f"{'wall s':>8s} {'median MiB':>10s} {'p99 MiB':>8s} {'>4 GiB':>7s}")  # fmt: skip
    for r in rows:
        if r["row"] in STREAM:
            blocks = r.get("input_blocks", r["blocks"])  # the passes run over the input's blocks
            print(f"{r['row']:22s} {blocks:6d} {r['peak_rss_mib']:12.0f} {r['prune_seconds']:8.1f} "
                  f"{r['prune_seconds'] / blocks:8.2f} {r.get('write_seconds') or 0:8.1f} {r['seconds']:8.1f}"
                  + (f" {r['rss_median_mib']:10.0f} {r['rss_p99_mib']:8.0f} {r['rss_over_4gib_share']:7.1%}"
                     if "rss_median_mib" in r else ""))  # fmt: skip
    print()
    for r in rows:
        if r["row"].startswith("recovery"):
            ratio = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
            print(f"{r['row']:24s} {r['peak_rss_mib']:12.0f} {r['tokens_per_s']:9.1f} {ratio:8.3f} "
                  f"{r['first_loss']:10.4f} {r['best_validation']:8.2f}")  # fmt: skip
    print(f"\n{'row':22s} {'windows':>7s} {'peak RSS MiB':>12s} {'eval s':>8s} {'wall s':>8s} {'mean NLL':>12s}")
    for r in rows:
        if r["row"] in EVAL:
            print(f"{r['row']:22s} {r['windows']:7d} {r['peak_rss_mib']:12.0f} {r['eval_seconds']:8.1f} "
                  f"{r['seconds']:8.1f} {r['mean_nll']:12.8f}")  # fmt: skip


if __name__ == "__main__":
    run_rows(__doc__, RESULTS, [*RECOVERY, *STREAM, *EVAL], measure, table)
