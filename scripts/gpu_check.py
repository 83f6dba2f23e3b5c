"""GPU checks (issue 35), prepared to run in one short call on a lent device machine; results in
OUT/gpu_check.json and a table on stdout. Every section is timed and recorded even when another fails.

  agreement  tiny random models of every family: magnitude, Wanda and SparseGPT 50%, SparseGPT 2:4,
             width 25% and angular depth (1 block), run on the CPU and on the device in float32 with
             the same calibration: the share of weights whose kept / pruned state agrees, the largest
             weight difference, and whether width and depth chose the same units.
  timing     Wanda and SparseGPT 50% (128 x 2,048 calibration tokens) on a random-weight model with
             SmolLM2-135M's shapes, float32, and on 2 blocks with Llama-3.1-8B's shapes, bfloat16
             (32 x 2,048 tokens): seconds per block on the device.
  recovery   `secateur.train` tokens/s on a random-weight student with the shapes of SmolLM2 width 50%
             and a random teacher with SmolLM2's, default batch (4 x 512), chunked logit losses and
             the model's own full logits. (Recovery quality on the real model needs its checkpoint,
             540 MB, which the device call cannot carry: at most 64 MiB travel.)

On the device machine (python3 there holds torch, transformers, accelerate; greenlet, gguf and
mwparserfromhell travel as wheels, see /work/.library/device/README.md):

  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
  PYTHONPATH=$PYTHONPATH:src:tests PYTHONUNBUFFERED=1 python3 scripts/gpu_check.py --out $OUT

Here, as a smoke test of the script itself: .venv/bin/python scripts/gpu_check.py --device cpu --quick --out /tmp/g
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
               num_hidden_layers=30, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192)  # fmt: skip
WIDTH50 = dict(SMOLLM2, intermediate_size=856, num_attention_heads=3, num_key_value_heads=1)
LLAMA8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
               num_hidden_layers=2, vocab_size=128256, tie_word_embeddings=False, max_position_embeddings=8192)  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_model(shape: dict, dtype: torch.dtype, seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(LlamaConfig(**shape), dtype=dtype).eval()


def ids(samples: int, seq_len: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (samples, seq_len), generator=torch.Generator().manual_seed(seed))


def agreement(device: torch.device, quick: bool) -> list[dict]:
    """CPU against the device on the tiny families: masks, weights, chosen units."""
    from conftest import FAMILIES, calibration_ids, tiny_model

    import secateur
    from secateur import NM, MagnitudeConfig, PruneConfig, SparseGPTConfig, Unstructured, WandaConfig
    from secateur.sparsity.prune import sparsify, target_layers
    from secateur.models import adapter_for, read_weight

    methods = {"magnitude-50": lambda: PruneConfig(MagnitudeConfig(), Unstructured(0.5)),
               "wanda-50": lambda: PruneConfig(WandaConfig(), Unstructured(0.5)),
               "sparsegpt-50": lambda: PruneConfig(SparseGPTConfig(), Unstructured(0.5)),
               "sparsegpt-2:4": lambda: PruneConfig(SparseGPTConfig(), NM(2, 4))}  # fmt: skip
    rows, calibration = [], calibration_ids(8, 32)
    for family in FAMILIES[:2] if quick else FAMILIES:
        for name, config in methods.items():
            pruned = {}
            for where in ("cpu", device):
                model = tiny_model(family)
                sparsify(model, None, config(), calibration, device=where, batch_size=4)
                pruned[str(where)] = {n: read_weight(m).detach().cpu().clone()
                                      for n, m in target_layers(model, adapter_for(model))}  # fmt: skip
            cpu, dev = pruned["cpu"], pruned[str(device)]
            same = sum(int(((cpu[n] != 0) == (dev[n] != 0)).sum()) for n in cpu)
            total = sum(cpu[n].numel() for n in cpu)
            rows.append({"family": family, "method": name, "mask_agreement": same / total,
                         "max_weight_difference": max(float((cpu[n] - dev[n]).abs().max()) for n in cpu)})  # fmt: skip
        for name, stage in (("width-25", lambda: secateur.WidthConfig(0.25)),
                            ("angular-1", lambda: secateur.DepthConfig(secateur.AngularConfig(),
                                                                       secateur.Amount(count=1)))):  # fmt: skip
            shapes = {}
            for where in ("cpu", device):
                model = tiny_model(family)
                try:
                    secateur.prune(model, stage(), calibration, device=where, progress=False)
                except Exception as exc:  # a family the kind refuses: recorded, not fatal
                    shapes[str(where)] = f"refused: {str(exc)[:80]}"
                    continue
                shapes[str(where)] = {n: list(p.shape) for n, p in model.named_parameters()}
            rows.append({"family": family, "method": name, "same_units": shapes["cpu"] == shapes[str(device)]})
    return rows


def timing(device: torch.device, quick: bool) -> list[dict]:
    """Seconds per block of Wanda and SparseGPT 50% on the device."""
    from secateur import PruneConfig, SparseGPTConfig, Unstructured, WandaConfig
    from secateur.sparsity.prune import sparsify

    rows = []
    cases = [("smollm2-shape", SMOLLM2, torch.float32, (16, 512) if quick else (128, 2048)),
             ("llama8b-shape-2-blocks", LLAMA8B, torch.bfloat16, (2, 256) if quick else (32, 2048))]  # fmt: skip
    for label, shape, dtype, (samples, seq_len) in cases:
        if quick:
            shape = dict(shape, num_hidden_layers=2)
        for name, config in (("wanda-50", lambda: PruneConfig(WandaConfig(), Unstructured(0.5))),
                             ("sparsegpt-50", lambda: PruneConfig(SparseGPTConfig(), Unstructured(0.5)))):  # fmt: skip
            model = random_model(shape, dtype)
            calibration = ids(samples, seq_len, shape["vocab_size"])
            sync(device)
            clock = time.perf_counter()
            sparsify(model, None, config(), calibration, device=device, batch_size=8)
            sync(device)
            seconds = time.perf_counter() - clock
            rows.append({"model": label, "method": name, "dtype": str(dtype), "tokens": samples * seq_len,
                         "seconds": seconds, "seconds_per_block": seconds / shape["num_hidden_layers"]})  # fmt: skip
            del model
    return rows


def recovery(device: torch.device, quick: bool) -> list[dict]:
    """Training tokens/s on the device, chunked logit losses against the full logits."""
    from secateur.train import TrainConfig, train

    rows = []
    student_shape, teacher_shape = (dict(WIDTH50, num_hidden_layers=2), dict(SMOLLM2, num_hidden_layers=2)) if quick \
        else (WIDTH50, SMOLLM2)  # fmt: skip
    tokens = 8 * 512 if quick else 64 * 4 * 512
    windows, validation = ids(tokens // 512, 512, 49152), ids(8, 512, 49152, seed=1)
    for chunk in (None, 0):
        student, teacher = random_model(student_shape, torch.float32), random_model(teacher_shape, torch.float32, 1)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        config = TrainConfig(tokens=tokens, loss_chunk=chunk, eval_every=10**6)
        record = train(student, config, windows, validation, teacher=teacher, device=device, progress=False).record
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        rows.append({"loss_chunk": record["loss_chunk"], "tokens_per_s": record["tokens_per_s"], "steps": record["steps"],
                     "precision": record["precision"], "peak_gpu_gib": peak})  # fmt: skip
    return rows


SECTIONS = {"agreement": agreement, "timing": timing, "recovery": recovery}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that the script runs")
    parser.add_argument("--only", help="comma-separated sections (default: all)")
    args = parser.parse_args()
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"torch": torch.__version__, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    for name in args.only.split(",") if args.only else SECTIONS:
        clock = time.perf_counter()
        try:
            result[name] = {"rows": SECTIONS[name](device, args.quick)}
        except Exception:  # recorded; the other sections still run
            result[name] = {"error": traceback.format_exc()[-3000:]}
        result[name]["seconds"] = time.perf_counter() - clock
        (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str))
        print(json.dumps({name: result[name]}, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
