"""Typed configuration of `secateur plan`; its flags are generated from these fields."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from secateur.errors import ConfigError
from secateur.plan.targets import parse_target
from secateur.schema import REQUIRED, Requires, option, refuse_inapplicable

# the targets and engines some options belong to (set for another, they are refused, from the schema)
SPEED = Requires(lambda c: parse_target(c.target).speed, "a speed target (decode-speedup, prefill-speedup)")
SPEED_OR_FILE = Requires(lambda c: parse_target(c.target).metric != "params",
                         "a speed, file or draft target (params counts parameters)")
TIMED = Requires(lambda c: parse_target(c.target).timed, "a speed target (decode-speedup, prefill-speedup) or draft")
LLAMA_CPP = Requires(lambda c: parse_target(c.target).timed and c.engine in (None, "llama.cpp"),
                     "a speed or draft target timed in llama.cpp (--engine llama.cpp, the default)")
DRAFT = Requires(lambda c: parse_target(c.target).draft, "--target draft")
SHARED_IDS = Requires(lambda c: not parse_target(c.target).draft,
                      "a params=, file= or speed target (a draft must read and write the model's own ids)")
VOCABULARY = Requires(lambda c: bool(c.vocabulary.strip()), "--vocabulary")
NOT_DRAFT = Requires(lambda c: not parse_target(c.target).draft,
                     "a target to meet (--target draft searches every candidate)")


@dataclass(frozen=True)
class PlanConfig:
    """Search depth x width x attention split x hidden (for a mixture of experts: depth x expert
    count) for the candidate that meets `target` with the least KL to the dense model, or (`draft`)
    for the fastest speculative draft of the dense model. Grids are fractions: `a,b,c` or `start:stop:step` (stop included)."""

    target: str = option(REQUIRED, "decode-speedup=X or prefill-speedup=X (in --engine), params=N (80M), "
                                   "file=SIZE (200MB; the GGUF f16 file for llama.cpp, float32 safetensors for hf), "
                                   "or draft (the fastest speculative draft of the model in --engine, lossless)")
    engine: Literal["llama.cpp", "hf"] | None = option(None, "speed, file and draft targets: llama.cpp (llama-bench "
                                                             "on GGUF f16) or hf (transformers here); default llama.cpp",
                                                       requires=SPEED_OR_FILE)
    llama_cpp: str | None = option(None, "llama.cpp's binaries (default: $SECATEUR_LLAMA_CPP, then PATH)",
                                   requires=LLAMA_CPP)
    threads: int | None = option(None, "llama.cpp threads (default: torch's thread count)", requires=LLAMA_CPP)
    depth: str = option("0:0.5", "fractions of the decoder blocks to remove (angular span, compensated); "
                                 "start:stop is every block count in between")
    width: str = option("0:0.6:0.1", "fractions of the remaining blocks' parameters to remove as heads and MLP "
                                     "channels (uniform widths), hidden channels included")
    round_to: int | None = option(None, "MLP widths and the hidden size are multiples of this (default: the step of "
                                        "llama.cpp's f16 kernels on this CPU, 32, 64 with AVX512F, 128 with "
                                        "AVX512-FP16, since it runs misaligned sizes far slower; 8 with --engine hf)")
    attention: str = option("default", "attention splits to search, one more axis: the share of every block's "
                                       "key/value groups that goes with the width (the width stage's "
                                       "--attention-fraction; the MLP makes up the rest): default (that stage's "
                                       "rounding of the width fraction) and/or fractions, e.g. default,0:0.75:0.25 "
                                       "(more candidates: longer plans)")
    reconstruct: bool = option(True, "width stages refit the output projections by least squares (the width "
                                     "stage's --reconstruct), in the candidates the proxy scores and in the recipe; "
                                     "--no-reconstruct: plain slicing (about half the planning time, worse recipes)")
    experts: str = option("0:0.5:0.125", "mixtures of experts: fractions of every MoE block's routed experts to "
                                         "remove (the experts stage, REAP), searched with --depth instead of the "
                                         "width axes")
    vocabulary: str = option("", "token counts to keep in the embedding and LM head, one more axis (the vocabulary "
                                 "stage's --keep-tokens, counted on --calib, applied last), e.g. 32768,49152; "
                                 "scored as KL plus the excess cross-entropy of the re-tokenized text per token "
                                 "(default: the whole vocabulary only)", requires=SHARED_IDS)
    vocabulary_samples: int = option(256, "--vocabulary: windows of --calib whose tokens are counted (the "
                                          "vocabulary stage's default)", requires=VOCABULARY)
    vocabulary_seq_len: int = option(2048, "--vocabulary: tokens per counted window", requires=VOCABULARY)
    hidden: str = option("0,0.125", "fractions of the hidden channels to remove (counted in the width fraction)")
    calib: str = option("enwiki-sample", "text for statistics, spans and proxy windows (drawn after the "
                                         "evaluation region)")
    calib_samples: int = option(8, "windows for the planner's statistics and compensation (the recipe it writes "
                                   "calibrates with each kind's defaults)")
    calib_seq_len: int = option(512, "tokens per window (statistics and proxy)")
    seed: int = option(0, "seed for drawing the windows")
    eval_windows: int = option(64, "the evaluation region (windows from the start of the text) the planner's "
                                   "windows stay out of, as prune --eval-windows")
    eval_seq_len: int = option(512, "tokens per evaluation window (of that region)")
    proxy_windows: int = option(4, "windows the KL proxy reads at the last rung (rung r reads 2^r)")
    keep: float = option(0.5, "successive halving: the share of candidates meeting the target kept at each rung")
    holdout: int = option(3, "measured shapes per hidden size held out to report the cost model's error")
    margin: float | None = option(None, "speed targets: the chosen shape's speedup, timed against the dense model "
                                        "in pairs, must beat the target by this relative margin (default 0.05: on a shared "
                                        "2-core machine the same pair measured minutes apart moved by up to 6.5%)",
                                  requires=SPEED)
    tolerance: float | None = option(None, "speed targets: candidates predicted within this relative distance "
                                           "below the target (with --margin) stay in the search until timed "
                                           "(default, per hidden size: its fit's largest held-out error, at least 0.05; after "
                                           "a check, the largest error of the corrected predictions on the checked "
                                           "shapes)", requires=SPEED)
    timing_rounds: int | None = option(None, "speed and draft targets: passes over the shapes the cost model is "
                                             "fitted and tested on, each shape's timing the fastest of its passes "
                                             "(cached per pass; default 3)", requires=TIMED)
    rounds: int | None = option(None, "speed targets: rounds of the paired timing that checks a chosen shape "
                                      "(default 3)", requires=SPEED)
    exhaustive: bool = option(False, "score every candidate, not only those that meet the target and remove "
                                     "no more than needed (a fuller Pareto front, slower)", requires=NOT_DRAFT)
    draft_tokens: str = option("1:6", "--target draft: proposals per round (k) to consider, e.g. 1:6 or 2,4; each "
                                      "candidate gets the fastest predicted", requires=DRAFT)
    checks: int = option(2, "--target draft: the best predicted drafts run for real with the model (speed, "
                            "acceptance, identical output); the fastest measured is chosen", requires=DRAFT)
    budget_minutes: float | None = option(None, "stop evaluating candidates after this many minutes (the plan "
                                                "is chosen among those evaluated; a rerun goes on from the cache)")
    recover_tokens: int = option(0, "append a recovery stage (distillation from the dense model) of this many "
                                    "tokens to the recipe (0: none)")
    device: str = option("auto", "auto (cuda when present), cpu or cuda[:N]")
    prompt: int | None = option(None, "timing: prompt tokens (default: llama.cpp 512, hf 128)", requires=TIMED)
    new_tokens: int | None = option(None, "timing: decoded tokens (default: llama.cpp 128, hf 32)", requires=TIMED)
    repeats: int | None = option(None, "timing: runs per shape, the fastest counting (default: llama.cpp 5, hf 3); "
                                       "a draft's check: its median of runs", requires=TIMED)

    def __post_init__(self) -> None:
        refuse_inapplicable(self)
        if not 0 < self.keep < 1:
            raise ConfigError(f"--keep must be in (0, 1), got {self.keep}")
        for name in ("calib_samples", "proxy_windows", "eval_windows", "eval_seq_len", "vocabulary_samples",
                     "vocabulary_seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.calib_seq_len < 2:
            raise ConfigError(f"--calib-seq-len must be at least 2, got {self.calib_seq_len}")
        if self.target.strip().lower() == "draft":  # (other targets are parsed where they are used)
            from secateur.plan.draft import parse_tokens

            parse_tokens(self.draft_tokens)
            if self.checks < 1:
                raise ConfigError(f"--checks must be at least 1, got {self.checks}")
        if self.holdout < 0 or self.recover_tokens < 0:
            raise ConfigError("--holdout and --recover-tokens must be >= 0")
        if self.margin is not None and not 0 <= self.margin < 1:
            raise ConfigError(f"--margin must be in [0, 1), got {self.margin}")
        if self.tolerance is not None and not 0 <= self.tolerance < 1:
            raise ConfigError(f"--tolerance must be in [0, 1), got {self.tolerance}")
        if self.round_to is not None and self.round_to < 1:
            raise ConfigError(f"--round-to must be at least 1, got {self.round_to}")
        if self.timing_rounds is not None and self.timing_rounds < 1:
            raise ConfigError(f"--timing-rounds must be at least 1, got {self.timing_rounds}")
        if self.rounds is not None and self.rounds < 1:
            raise ConfigError(f"--rounds must be at least 1, got {self.rounds}")
        if self.budget_minutes is not None and self.budget_minutes <= 0:
            raise ConfigError(f"--budget-minutes must be positive, got {self.budget_minutes}")
        for name in ("prompt", "new_tokens", "threads", "repeats"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
