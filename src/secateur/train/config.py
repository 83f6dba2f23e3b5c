"""The recovery stage's typed config: what trains, on how many tokens, with which loss and schedule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from secateur.config import NM
from secateur.errors import ConfigError
from secateur.schema import Requires, option, refuse_inapplicable
from secateur.train.gradual import scores as gradual_scores
from secateur.train.loss import Normalise
from secateur.width.config import WidthConfig
from secateur.width.scores import IMPORTANCE

Mode = Literal["full", "lora", "perp", "perp-lora"]
Precision = Literal["auto", "float32", "bfloat16"]

# peak learning rates by mode (AdamW). full: the best of 5e-5, 2e-4, 1e-3 in a 32,768-token probe on
# SmolLM2-135M width 50% (validation perplexity 205.75, 138.75, 114.41), and where a teacher is given
# for the start itself, chosen by its distance from the teacher (`schedule.peak_lr_for`: 3e-4 close to
# it); lora: LLM-Pruner's; the others are not tuned
DEFAULT_LR = {"full": 1e-3, "lora": 1e-4, "perp": 1e-3, "perp-lora": 2e-4}
ADAPT_AMPLITUDE = 0.03  # Adapt-Pruner's allocation: its code's default layer_prune_distribution_amplitude

# the variants some options belong to (an option set for another variant is refused, from the schema)
DISTILS = Requires(lambda c: c.kd_weight > 0, "distillation (--kd-weight above 0)")
LAYERWISE = Requires(lambda c: c.hidden_weight > 0, "layer-wise distillation (--hidden-weight above 0)")
LORA = Requires(lambda c: c.mode in ("lora", "perp-lora"), "--mode lora or perp-lora")
GRADUAL = Requires(lambda c: c.gradual, "gradual pruning (--prune-to or --prune-pattern; incremental width scores "
                                        "with --width-importance)")
SCHEDULED = Requires(lambda c: c.scheduled, "pruning during training (--prune-to, --prune-pattern or --prune-width)")
WIDTH = Requires(lambda c: c.prune_width is not None, "incremental width pruning (--prune-width)")
SELF_DATA = Requires(lambda c: c.self_data > 0, "text the teacher writes (--self-data above 0)")


@dataclass(frozen=True)
class TrainConfig:
    """Recovery by training: distillation from the teacher's logits (forward KL at `temperature`)
    mixed with cross-entropy, `kd_weight` · KD + (1 − kd_weight) · CE (+ `hidden_weight` · layer-wise
    distillation of the block outputs), for `tokens` training tokens per epoch in windows of
    `train_seq_len`, AdamW with linear warm-up and cosine decay."""

    name: ClassVar[str] = "recovery"

    mode: Mode = option("full", "what trains: full (every weight), lora (adapters on the block projections, merged "
                                "at the end), perp (norms and biases only), perp-lora (both)")
    tokens: int = option(131072, "training tokens per epoch (windows drawn outside the evaluation region)")
    epochs: int = option(1, "passes over the training windows (reshuffled each epoch)")
    train_seq_len: int = option(512, "tokens per training window")
    micro_batch: int = option(4, "windows per forward and backward")
    accumulate: int = option(1, "micro-batches per optimizer step (per process)")
    lr: float | None = option(None, "peak learning rate (default by mode: full 1e-3, or with a teacher and no "
                                    "pruning during training 3e-4 where the start's validation perplexity is "
                                    "within e^3 (about 20x) of the teacher's; lora 1e-4, perp 1e-3, perp-lora "
                                    "2e-4; full on Gemma 3: 1e-4, where 1e-3 diverges)")
    warmup: float = option(0.05, "fraction of the optimizer steps spent warming up linearly")
    min_lr: float = option(0.1, "the cosine decay's floor, as a fraction of the peak learning rate")
    weight_decay: float = option(0.0, "AdamW's decoupled weight decay")
    clip: float = option(1.0, "gradient-norm clipping (0: off)")
    kd_weight: float = option(1.0, "weight of the distillation loss; 1 - kd_weight goes to cross-entropy "
                                   "(0: plain fine-tuning, no teacher)")
    hidden_weight: float = option(0.0, "weight of layer-wise distillation (SquareHead): the sum over decoder blocks "
                                        "of each block output's squared error to the teacher's, normalised by the "
                                        "teacher's mean square (0: off; needs the teacher's blocks and hidden size)")
    hidden_norm: Normalise = option(
        "block", "layer-wise distillation: divide each squared error by the teacher's mean square over the block "
              "(SquareHead) or at each position (every position weighs the same; block)", requires=LAYERWISE)
    temperature: float = option(1.0, "distillation temperature T (the loss is scaled by T^2)", requires=DISTILS)
    top_k: int = option(0, "distil from the teacher's k largest logits, computed once and cached (0: full "
                           "logits, the teacher runs at every step)", requires=DISTILS)
    self_data: float = option(0.0, "share of the training windows the teacher writes (self-data distillation): each "
                                   "keeps its first --self-data-prompt tokens of corpus text and the teacher "
                                   "continues it by sampling from its own next-token distribution (temperature 1), "
                                   "once before training; validation windows stay corpus text (0: none)")
    self_data_prompt: int = option(32, "tokens of corpus text each window the teacher writes starts from",
                                   requires=SELF_DATA)
    lora_rank: int = option(8, "lora: adapter rank r", requires=LORA)
    lora_alpha: float = option(16.0, "lora: scale alpha, the update being alpha / r * B A", requires=LORA)
    keep_masks: bool = option(True, "keep every exact zero of the block layers zero (sparse and N:M models stay so)")
    eval_every: int = option(0, "validate every N optimizer steps (0: about 8 times per run)")
    val_windows: int = option(8, "validation windows (drawn with the training windows, never trained on)")
    patience: int = option(0, "stop after this many validations without improvement (0: never stop early)")
    checkpoint_every: int = option(0, "save a resumable checkpoint every N optimizer steps (0: at each validation)")
    prune_to: float | None = option(None, "gradual pruning during training (Zhu & Gupta): the final unstructured "
                                          "sparsity of the block layers, reached on a cubic schedule")
    prune_pattern: str | None = option(None, "gradual pruning to N:M, e.g. 2:4: N falls step by step at fixed M")
    prune_score: str = option("magnitude", "gradual pruning score: a sparsity method that needs at most input norms "
                                           "(magnitude, the paper's; wanda, ria: on running input norms) or taylor "
                                           "|W g|", choices=gradual_scores, requires=GRADUAL)
    prune_width: float | None = option(None, "incremental width pruning during training (Adapt-Pruner): the share of "
                                             "the decoder blocks' parameters to remove as heads and MLP channels, a "
                                             "few percent at a time on the cubic schedule")
    width_importance: str = option("fluctuation", "incremental width: unit score, as the width stage's --importance",
                                   choices=lambda: tuple(IMPORTANCE), requires=WIDTH)
    width_allocation: Literal["uniform", "adaptive", "adapt-pruner"] = option(
        "uniform", "incremental width: uniform (every block the one-shot uniform widths of each step's share: stock "
              "config), adaptive (units ranked across blocks: per-block widths) or adapt-pruner (per-block shares "
              "moved at each update by the blocks' input-output cosine similarity: per-block widths)", requires=WIDTH)
    width_amplitude: float = option(ADAPT_AMPLITUDE, "adapt-pruner allocation: A, how far one update moves a "
                                                     "block's share from the mean by its importance",
                                           requires=Requires(lambda c: c.width_allocation == "adapt-pruner",
                                                             "--width-allocation adapt-pruner"))
    prune_start: float = option(0.0, "gradual pruning: first update, as a fraction of the steps", requires=SCHEDULED)
    prune_end: float = option(0.75, "gradual pruning: last update (the final sparsity), as a fraction of the steps",
                              requires=SCHEDULED)
    prune_every: int | None = option(None, "gradual pruning: optimizer steps between updates (default: 10 updates)",
                                     requires=SCHEDULED)
    loss_chunk: int | None = option(None, "positions per chunk of the output head and the logit losses: the batch x "
                                          "sequence x vocabulary logits of student and teacher are never held at "
                                          "once (0: all at once, as the model computes them; default: 2^24 logits "
                                          "per chunk, 341 positions of a 49,152-token vocabulary; 0 under FSDP, "
                                          "which shards the head)")
    activation_checkpointing: bool = option(False, "keep only each block's input and recompute the block in the "
                                                   "backward pass (less memory for about one more forward)")
    precision: Precision = option("auto", "compute precision: bfloat16 autocast or float32 (auto: bfloat16 where the "
                                          "device computes it natively)")
    seed: int = option(0, "seed for the window order and the adapters' initialisation", key="train_seed")

    def __post_init__(self) -> None:
        refuse_inapplicable(self)
        checks = [
            (self.tokens >= 1 and self.epochs >= 1, "--tokens and --epochs must be at least 1"),
            (self.train_seq_len >= 2, "--train-seq-len must be at least 2"),
            (self.micro_batch >= 1 and self.accumulate >= 1, "--micro-batch and --accumulate must be at least 1"),
            (self.lr is None or self.lr > 0, "--lr must be positive"),
            (0 <= self.warmup < 1, "--warmup is a fraction of the steps, in [0, 1)"),
            (0 <= self.min_lr <= 1, "--min-lr is a fraction of the peak learning rate, in [0, 1]"),
            (self.weight_decay >= 0 and self.clip >= 0, "--weight-decay and --clip must be >= 0"),
            (0 <= self.kd_weight <= 1, "--kd-weight must be in [0, 1]"),
            (self.temperature > 0, "--temperature must be positive"),
            (self.hidden_weight >= 0, "--hidden-weight must be >= 0"),
            (self.top_k >= 0, "--top-k must be >= 0"),
            (self.lora_rank >= 1 and self.lora_alpha > 0, "--lora-rank must be >= 1 and --lora-alpha positive"),
            (min(self.eval_every, self.patience, self.checkpoint_every) >= 0,
             "--eval-every, --patience and --checkpoint-every must be >= 0"),
            (self.val_windows >= 1, "--val-windows must be at least 1"),
            (self.loss_chunk is None or self.loss_chunk >= 0, "--loss-chunk must be >= 0 (0: no chunks)"),
            (0 <= self.self_data <= 1, "--self-data is a share of the training windows, in [0, 1]"),
            (not self.self_data or 1 <= self.self_data_prompt < self.train_seq_len,
             f"--self-data-prompt must be at least 1 and below --train-seq-len ({self.train_seq_len})"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if not 0 <= self.width_amplitude < 1:
            raise ConfigError(f"--width-amplitude must be in [0, 1), got {self.width_amplitude}")
        if self.prune_width is not None:
            if self.gradual:
                raise ConfigError("give either --prune-width (heads and channels) or --prune-to / --prune-pattern "
                                  "(zeros), not both in one stage: chain two recovery stages")
            if not 0 < self.prune_width < 1:
                raise ConfigError(f"--prune-width must be in (0, 1), got {self.prune_width}")
        if self.prune_to is not None and self.prune_pattern is not None:
            raise ConfigError("give either --prune-to (unstructured) or --prune-pattern N:M, not both")
        if self.prune_to is not None and not 0 < self.prune_to < 1:
            raise ConfigError(f"--prune-to must be in (0, 1), got {self.prune_to}")
        if self.prune_pattern is not None:
            NM.parse(self.prune_pattern)
        if self.scheduled and self.mode != "full":
            raise ConfigError(f"pruning during training changes the weights themselves: use --mode full, not "
                              f"{self.mode}")
        if self.scheduled and not 0 <= self.prune_start < self.prune_end <= 1:
            raise ConfigError("gradual pruning needs 0 <= --prune-start < --prune-end <= 1")
        if self.prune_every is not None and self.prune_every < 1:
            raise ConfigError("--prune-every must be at least 1")
        if self.self_data and not self.needs_teacher:
            raise ConfigError("--self-data: the teacher writes the text, and plain fine-tuning (--kd-weight 0) loads "
                              "none; distil (--kd-weight above 0) or leave --self-data at 0")
        if self.top_k and self.hidden_weight:
            raise ConfigError("--hidden-weight needs the teacher's block outputs at every step, which --top-k's cache "
                              "of logits does not keep: give one or the other")

    @property
    def method_name(self) -> str:
        return self.name

    @property
    def gradual(self) -> bool:
        return self.prune_to is not None or self.prune_pattern is not None

    @property
    def scheduled(self) -> bool:
        """Pruning during training of either kind: zeros (gradual) or heads and channels (width)."""
        return self.gradual or self.prune_width is not None

    def width_config(self) -> WidthConfig:
        """The width stage's settings every incremental update uses (the final share as its fraction)."""
        allocation = "adaptive" if self.width_allocation == "adapt-pruner" else self.width_allocation
        return WidthConfig(self.prune_width, importance=self.width_importance, allocation=allocation,
                           reconstruct=False)  # training refits the weights itself

    @property
    def adapt_amplitude(self) -> float | None:
        """Adapt-Pruner's allocation: its amplitude A (None: another allocation)."""
        return self.width_amplitude if self.width_allocation == "adapt-pruner" else None

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.mode]

    @property
    def windows(self) -> int:
        """Training windows per epoch: enough for `tokens`."""
        return -(-self.tokens // self.train_seq_len)

    @property
    def needs_teacher(self) -> bool:
        return self.kd_weight > 0 or self.hidden_weight > 0


def bf16_native(device: torch.device) -> bool:
    """Whether the device computes bfloat16 natively (CUDA with bf16, CPUs with AVX512-BF16 or AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = torch.cpu
        return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                    or getattr(cpu, "_is_amx_tile_supported", lambda: False)())  # fmt: skip
    return False


def precision_for(config: TrainConfig, device: torch.device) -> str:
    if config.precision != "auto":
        return config.precision
    return "bfloat16" if bf16_native(device) else "float32"
