"""Recovery by training: distillation from the dense model, LoRA / PERP / full fine-tuning, masks kept."""

from secateur.train.config import TrainConfig
from secateur.train.loop import TrainError, TrainResult, train

__all__ = ["TrainConfig", "TrainError", "TrainResult", "train"]
