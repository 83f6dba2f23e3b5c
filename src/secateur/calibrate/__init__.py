"""Shared by every kind of pruning: block streaming, input statistics, calibration-loss gradients."""

from secateur.calibrate.stream import (
    BlockInputs,
    StopForward,
    capture_inputs,
    collect_input_stats,
    move_outside_blocks,
    run_block,
    stream_blocks,
)

__all__ = [
    "BlockInputs", "StopForward", "capture_inputs", "collect_input_stats", "move_outside_blocks", "run_block",
    "stream_blocks",
]  # fmt: skip
