"""Tiny random models of every supported family, a tiny word-level tokenizer, and a text file."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    Gemma3TextConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    OlmoeConfig,
    OPTConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
)

VOCAB = 128
WORDS = [f"w{i}" for i in range(VOCAB - 4)]  # 4 specials: <unk> <s> </s> <pad>
HIDDEN, FFN = 64, 128
ATTN = dict(num_attention_heads=4, num_key_value_heads=2)
COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=2,
              max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=3)  # fmt: skip

CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON, **ATTN),
    "mistral": lambda: MistralConfig(**COMMON, **ATTN, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**COMMON, **ATTN),
    "qwen3": lambda: Qwen3Config(**COMMON, **ATTN, head_dim=16),
    "gemma3_text": lambda: Gemma3TextConfig(
        **COMMON, **ATTN, head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"]
    ),
    "phi3": lambda: Phi3Config(**COMMON, **ATTN),
    "opt": lambda: OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=FFN, num_hidden_layers=2,
                             num_attention_heads=4, word_embed_proj_dim=HIDDEN, max_position_embeddings=256,
                             bos_token_id=1, eos_token_id=2, pad_token_id=3),  # fmt: skip
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_inner=FFN, n_layer=2, n_head=4, n_positions=256,
                               bos_token_id=1, eos_token_id=2),  # fmt: skip
    "gpt_neox": lambda: GPTNeoXConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=256, bos_token_id=1,
                                      eos_token_id=2),  # fmt: skip
}
FAMILIES = list(CONFIGS)

# mixtures of experts: 8 routed experts of width 32, top-2 (Qwen3-MoE renormalises the top-2 weights,
# Qwen2-MoE and OLMoE do not, by their defaults; Mixtral always does)
MOE = dict(num_experts_per_tok=2, router_aux_loss_coef=0.01)
MOE_CONFIGS = {
    "qwen3_moe": lambda: Qwen3MoeConfig(**COMMON, **ATTN, **MOE, head_dim=16, num_experts=8, moe_intermediate_size=32,
                                        norm_topk_prob=True),
    "qwen2_moe": lambda: Qwen2MoeConfig(**COMMON, **ATTN, **MOE, num_experts=8, moe_intermediate_size=32,
                                        shared_expert_intermediate_size=64),
    "mixtral": lambda: MixtralConfig(**{**COMMON, "intermediate_size": 32}, **ATTN, **MOE, num_local_experts=8),
    "olmoe": lambda: OlmoeConfig(**{**COMMON, "intermediate_size": 32}, **ATTN, **MOE, num_experts=8),
    # multi-head latent attention, sigmoid scores with a correction bias, a shared expert; one group
    # of experts here (group-limited routing has its own tests) and no leading dense block
    "deepseek_v3": lambda: DeepseekV3Config(**COMMON, num_attention_heads=4, num_key_value_heads=4, **MOE,
                                            n_routed_experts=8, moe_intermediate_size=32, n_group=1, topk_group=1,
                                            first_k_dense_replace=0, n_shared_experts=1, q_lora_rank=32,
                                            kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16),
}
MOE_FAMILIES = list(MOE_CONFIGS)


def tiny_model(family: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = {**CONFIGS, **MOE_CONFIGS}[family]()
    for key, value in overrides.items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def reloads_the_same(model, path: Path, ids: torch.Tensor) -> bool:
    """Whether `model`, saved to `path`, comes back from stock `from_pretrained` with the same logits
    on `ids`, bit for bit."""
    model.save_pretrained(path)
    reloaded = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return torch.equal(reloaded(ids).logits, model(ids).logits)


def stored(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved checkpoint directory's safetensors files, by name."""
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def tiny_text(words: int = 6000, seed: int = 0) -> str:
    rng = random.Random(seed)
    # a few recurring phrases give the activations some structure
    phrases = [" ".join(rng.choice(WORDS) for _ in range(6)) for _ in range(20)]
    out = []
    while len(out) < words:
        out.extend((rng.choice(phrases) if rng.random() < 0.5 else rng.choice(WORDS)).split())
    return " ".join(out[:words])


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(tiny_text())
    return path


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """Save a tiny model of `family` (with tokenizer) once per session; returns a factory."""
    cache: dict[str, Path] = {}

    def make(family: str = "llama") -> Path:
        if family not in cache:
            path = tmp_path_factory.mktemp(f"model-{family}")
            tiny_model(family).save_pretrained(path)
            tiny_tokenizer().save_pretrained(path)
            cache[family] = path
        return cache[family]

    return make


def calibration_ids(samples: int = 8, seq_len: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(4, VOCAB, (samples, seq_len), generator=generator)


def killed_and_resumed(tmp_path: Path, monkeypatch, model, config, die_at: int):
    """Train copies of `model` three ways with a teacher copy: uninterrupted (workdir a), killed at the
    `die_at`-th mask application (workdir b), then resumed from b's checkpoint in a fresh copy, as a
    new process would load the input again. Returns (uninterrupted model, resumed model, its record)."""
    import copy

    from secateur.train import train
    from secateur.train import loop as train_loop

    windows, validation = calibration_ids(32, 16), calibration_ids(2, 16, seed=1)
    dense, whole = copy.deepcopy(model), copy.deepcopy(model)
    train(whole, config, windows, validation, teacher=dense, device="cpu", workdir=tmp_path / "a", progress=False)
    real, calls = train_loop.MaskHolder.weights, {"n": 0}

    def dies(self):
        calls["n"] += 1
        if calls["n"] == die_at:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(train_loop.MaskHolder, "weights", dies)
    with pytest.raises(KeyboardInterrupt):
        train(copy.deepcopy(model), config, windows, validation, teacher=dense, device="cpu", workdir=tmp_path / "b",
              progress=False)  # fmt: skip
    monkeypatch.setattr(train_loop.MaskHolder, "weights", real)
    resumed = copy.deepcopy(model)
    record = train(resumed, config, windows, validation, teacher=dense, device="cpu", workdir=tmp_path / "b",
                   resume=True, progress=False).record  # fmt: skip
    return whole, resumed, record


def make_kind(name: str, config_type: type, run, **fields):
    """A one-method stage kind for tests: its options, flags and recipe keys from `config_type`'s
    `option(...)` fields, no calibration; `fields` are further `StageKind` fields."""
    from secateur.config import CalibConfig
    from secateur.recipe import StageKind
    from secateur.schema import fill, flatten, options_of

    return StageKind(name, config_type, lambda: (name,), lambda method: options_of(config_type),
                     lambda method, settings: fill(config_type, settings), flatten, run,
                     lambda config: False, lambda config: CalibConfig(), **fields)  # fmt: skip
