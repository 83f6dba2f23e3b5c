"""Runs inside the peer's own virtual environment (llmcompressor==0.14.0.1, torch==2.13.0).

Prunes a HF model directory with llm-compressor's oneshot on the given calibration token windows and
writes the pruned weights (dense safetensors) so the benchmark evaluates them with the same code as
secateur's output. Prints one JSON line: prune wall time (the oneshot call) and peak RSS.
Magnitude is not run: llm-compressor 0.14's MagnitudePruningModifier is a training-time modifier
that leaves the weights dense under oneshot (checked on a tiny Llama: 0% zeros) and has no N:M.
"""

import argparse
import json
import sys
import time

import torch

BLOCKS = [r"re:model\.layers\.\d+$"]  # decoder blocks: their linear layers are pruned (lm_head is not)


def modifier(method: str, sparsity: float, structure: str, owl: bool = False, report: str | None = None):
    # OWL: llm-compressor's own defaults for the outlier threshold and the range (owl_m=5, owl_lmbda=0.08)
    extra = {"sparsity_profile": "owl", "owl_m": 5, "owl_lmbda": 0.08} if owl else {}
    if method == "wanda":
        from llmcompressor.modifiers.pruning import WandaPruningModifier

        return WandaPruningModifier(sparsity=sparsity, mask_structure=structure, targets=BLOCKS, **extra)
    if method == "sparsegpt":
        from llmcompressor.modifiers.pruning import SparseGPTModifier

        return SparseGPTModifier(sparsity=sparsity, mask_structure=structure, targets=BLOCKS, **extra)
    if method == "reap":  # removes `sparsity` of every MoE block's experts; structure does not apply
        from llmcompressor.modifiers.pruning import REAPPruningModifier

        return REAPPruningModifier(sparsity=sparsity, report_path=report)
    raise SystemExit(f"unknown method {method}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--method", required=True)
    parser.add_argument("--sparsity", type=float, required=True)
    parser.add_argument("--structure", default="0:0", help='"0:0" (unstructured) or "N:M"')
    parser.add_argument("--calib", required=True, help="torch file with a (samples, seq_len) id tensor")
    parser.add_argument("--owl", action="store_true", help="outlier-weighted layer-wise sparsity")
    parser.add_argument("--out", required=True, help="safetensors file for the pruned state dict (reap: a HF "
                                                     "directory, shapes change)")
    parser.add_argument("--report", help="reap: JSON file of the experts kept per MoE block")
    args = parser.parse_args()

    from datasets import Dataset
    from llmcompressor import oneshot
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    ids = torch.load(args.calib)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    start = time.perf_counter()
    oneshot(
        model=model,
        dataset=data,
        recipe=[modifier(args.method, args.sparsity, args.structure, args.owl, args.report)],
        num_calibration_samples=len(ids),
        max_seq_length=ids.shape[1],
        shuffle_calibration_samples=False,
    )
    seconds = time.perf_counter() - start
    if args.method == "reap":
        model.save_pretrained(args.out)
        print(json.dumps({"seconds": seconds, "peak_mib": peak_rss_mib()}), flush=True)
        return
    state = {k: v.contiguous() for k, v in model.state_dict().items() if "lm_head" not in k}
    save_file(state, args.out)
    print(json.dumps({"seconds": seconds, "peak_mib": peak_rss_mib()}), flush=True)


def peak_rss_mib() -> float:
    """VmHWM: this process's peak RSS since exec (ru_maxrss would include the parent's before exec)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


if __name__ == "__main__":
    sys.exit(main())
