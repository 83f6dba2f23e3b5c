"""Recovery by training: distillation from the dense model, LoRA / PERP / full fine-tuning, masks kept."""

from secateur.train.config import TrainConfig
from secateur.errors import TrainError
from secateur.train.loop import TrainResult, train

__all__ = ["TrainConfig", "TrainError", "TrainResult", "train"]
