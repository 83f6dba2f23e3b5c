"""secateur: prune Hugging Face causal language models.

    model, tokenizer = secateur.load_model("path/or/model.gguf")
    config = secateur.PruneConfig(secateur.WandaConfig(), secateur.Unstructured(0.5))
    report = secateur.prune(model, tokenizer, config, calibration_ids)   # (samples, seq_len) tensor
    secateur.save(model, tokenizer, "pruned/", manifest={...})
    model, tokenizer = secateur.load("pruned/")   # any secateur output, sublayer-pruned ones included
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
from secateur.io import load, load_model, save  # noqa: E402
from secateur.prune import PruneReport, prune  # noqa: E402

__all__ = [
    "AllocationConfig", "GBLMConfig", "RIAConfig", "RefineConfig",
    "NM", "CalibConfig", "ConfigError", "MagnitudeConfig", "PruneConfig", "PruneReport", "SparseGPTConfig",
    "Unstructured", "WandaConfig", "load", "load_model", "prune", "save", "__version__",
]  # fmt: skip
