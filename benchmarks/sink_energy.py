"""Where the residual stream's energy sits in SmolLM2-135M: for every decoder block's output, the share
of Σ h² over a window that belongs to its largest position and to its largest channel.

This is what decides how SquareHead's per-block normalisation (`--hidden-norm block`) weighs the
positions of a window against each other (see `--hidden-norm position`).

    python benchmarks/sink_energy.py [--windows 4] [--seq-len 512]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()

    import secateur
    from secateur.data import calibration_windows, load_text, tokenize
    from secateur.demo import default_model_dir

    model, tokenizer = secateur.load(default_model_dir())
    tokens = tokenize(tokenizer, load_text("enwiki-sample", "calibration", "text"))
    # windows drawn after protocol v1's evaluation region (64 x 512 tokens), as training draws them
    ids = calibration_windows(tokens, args.seq_len, args.windows, seed=0, skip=64 * 512)
    with torch.no_grad():
        states = model(input_ids=ids, output_hidden_states=True).hidden_states[1:]
    print(f"{len(ids)} windows of {ids.shape[1]} tokens (enwiki-sample calibration region, seed 0)")
    print("| block | mean h² | top position's share | which position | top channel's share |")
    print("|---|---|---|---|---|")
    for index, h in enumerate(states, 1):
        energy = h.float().pow(2)  # (windows, seq, hidden)
        per_window = energy.sum((1, 2))
        position = energy.sum(2).max(1)  # the largest position of each window
        channel = energy.sum(1).max(1).values
        print(f"| {index} | {energy.mean():.2f} | {(position.values / per_window).mean():.3f} | "
              f"{torch.mode(position.indices).values.item()} | {(channel / per_window).mean():.3f} |")
    print("(the last block's output is after the final norm, as transformers returns it)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
