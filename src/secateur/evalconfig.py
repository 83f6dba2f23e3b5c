"""The typed config of `secateur eval`; its flags are generated from these fields, and which mode an
option belongs to (perplexity, --tasks, --generate) is its `requires`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from secateur.data.sources import has_fields
from secateur.errors import ConfigError
from secateur.io import Dtype
from secateur.schema import Requires, option, refuse_inapplicable

PERPLEXITY = Requires(lambda c: c.mode == "perplexity", "perplexity (neither --tasks nor --generate)")
FIELDS = Requires(lambda c: c.mode == "perplexity" and has_fields(c.data),
                  "perplexity on a .jsonl file or a `datasets` directory")
TASKS = Requires(lambda c: c.mode == "tasks", "--tasks")
GENERATE = Requires(lambda c: c.mode == "generate", "--generate")
PRUNED = Requires(lambda c: c.mode != "generate" and c.filter_layer is not None, "--filter-layer (token pruning)")
SCORED = Requires(lambda c: c.mode == "perplexity" and c.filter_layer is not None,
                  "--filter-layer (token pruning) on perplexity")
PERPLEXITY_OR_TASKS = Requires(lambda c: c.mode != "generate", "perplexity or --tasks")
STREAMED = Requires(lambda c: c.mode == "perplexity" and c.filter_layer is None, "perplexity without --filter-layer")


@dataclass(frozen=True)
class EvalConfig:
    """Perplexity over the first windows of a text (the default), lm-eval tasks (`tasks`), or greedy
    continuations of fixed prompts beside a reference model's (`generate`)."""

    data: str = option("enwiki-sample", "perplexity: text source", requires=PERPLEXITY)
    text_field: str = option("text", "perplexity: the field of a dataset's rows", requires=FIELDS)
    seq_len: int = option(512, "perplexity: tokens per window (a default longer than the model's positions "
                               "becomes its positions)", requires=PERPLEXITY)
    windows: int = option(64, "perplexity: number of windows from the start", requires=PERPLEXITY)
    filter_layer: int | None = option(None, "GemFilter token pruning by this block's attention: perplexity of the "
                                            "last --score-tokens tokens of every window after the window's prompt "
                                            "cut to --budget tokens, beside the same after the whole prompt; "
                                            "tasks: every context longer than --budget cut to it",
                                      requires=PERPLEXITY_OR_TASKS)
    budget: int | None = option(None, "token pruning: prompt tokens the whole model reads (default 1024)",
                                requires=PRUNED)
    pool: int | None = option(None, "token pruning: width of the moving average over the scores (default 5)",
                              requires=PRUNED)
    score_tokens: int = option(64, "token pruning: the tokens at the end of every window that are scored (the "
                                   "rest is the prompt)", requires=SCORED)
    tasks: str | None = option(None, "lm-eval task names, comma-separated (offline: secateur_wordnet, the "
                                     "knowledge probe; secateur_analogy, the Google analogies); replaces perplexity")
    limit: int | None = option(None, "tasks: at most N documents per task", requires=TASKS)
    num_fewshot: int | None = option(None, "tasks: examples in the prompt (default: each task's own)", requires=TASKS)
    include_path: tuple[str, ...] = option((), "tasks: a directory of local lm-eval task files (repeatable; works "
                                               "offline)", requires=TASKS)
    results: str | None = option(None, "tasks: also write the results to this new JSON file", requires=TASKS)
    generate: bool = option(False, "print greedy continuations of fixed prompts, next to the original model's; "
                                   "replaces perplexity")
    reference: str | None = option(None, "generate: the model to compare with (default: the manifest's origin, the "
                                         "model before any secateur run)", requires=GENERATE)
    new_tokens: int = option(32, "generate: tokens per continuation", requires=GENERATE)
    offload: Literal["auto", "none", "disk"] = option(
        "auto", "perplexity: none (the model loaded), disk (its blocks read from the safetensors one at a time: "
        "models larger than memory) or auto (disk where the weights exceed 0.8 of the memory available)",
        requires=STREAMED)
    batch_size: int = option(4, "windows or documents per forward call")
    dtype: Dtype = option("float32", "load and work precision")
    device: str = option("auto", "auto (cuda when present), cpu or cuda[:N]")

    def __post_init__(self) -> None:
        if self.tasks is not None and self.generate:
            raise ConfigError("give --tasks or --generate, not both")
        refuse_inapplicable(self)
        least = {"batch_size": 1, "seq_len": 2, "windows": 1, "limit": 1, "num_fewshot": 0, "new_tokens": 1}
        for name, low in least.items():
            value = getattr(self, name)
            if value is not None and value < low:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least {low}, got {value}")

    @property
    def mode(self) -> Literal["perplexity", "tasks", "generate"]:
        return "tasks" if self.tasks is not None else "generate" if self.generate else "perplexity"
