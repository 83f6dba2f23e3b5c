"""secateur: prune Hugging Face causal language models.

    model, tokenizer = secateur.load("path/or/model.gguf")   # or any secateur output, its structure restored
    recipe = [secateur.DepthConfig(secateur.AngularConfig(), secateur.Amount(fraction=0.1)),
              secateur.WidthConfig(0.2),
              secateur.PruneConfig(secateur.WandaConfig(), secateur.Unstructured(0.5))]
    report = secateur.prune(model, recipe, calibration_ids)   # in place; (samples, seq_len) token ids
    report = secateur.prune(model, secateur.VocabularyConfig(coverage=0.999), calibration_ids,
                            tokenizer=tokenizer)               # the rewritten tokenizer: report.tokenizer
    secateur.train(model, secateur.TrainConfig(), train_ids, validation_ids, teacher=dense)   # recovery
    secateur.save(model, tokenizer, "pruned/", manifest={...})
"""

__version__ = "0.1.0"

from secateur.config import (  # noqa: E402
    NM,
    AllocationConfig,
    CalibConfig,
    ConfigError,
    GBLMConfig,
    MagnitudeConfig,
    PruneConfig,
    RefineConfig,
    RIAConfig,
    SparseGPTConfig,
    Unstructured,
    WandaConfig,
)
from secateur.depth import Amount, AngularConfig, BlockInfluenceConfig, DepthConfig, FinerCutConfig, GreedyLossConfig  # noqa: E402
from secateur.errors import SecateurError  # noqa: E402
from secateur.io import load, load_model, save  # noqa: E402
from secateur.recipe import RecipeReport, build_stage, prune  # noqa: E402
from secateur.sparsity.prune import PruneReport  # noqa: E402
from secateur.train import TrainConfig, train  # noqa: E402
from secateur.vocabulary import VocabularyConfig  # noqa: E402
from secateur.width import WidthConfig  # noqa: E402

__all__ = [
    "AllocationConfig", "Amount", "AngularConfig", "BlockInfluenceConfig", "DepthConfig", "FinerCutConfig",
    "GBLMConfig", "GreedyLossConfig", "RIAConfig", "RecipeReport", "RefineConfig", "SecateurError", "TrainConfig",
    "VocabularyConfig", "WidthConfig", "build_stage", "train",
    "NM", "CalibConfig", "ConfigError", "MagnitudeConfig", "PruneConfig", "PruneReport", "SparseGPTConfig",
    "Unstructured", "WandaConfig", "load", "load_model", "prune", "save", "__version__",
]  # fmt: skip
