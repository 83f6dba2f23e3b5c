"""`secateur plan --target draft`: the candidate that, as the speculative draft of the model it was
pruned from, decodes that model's greedy output the fastest (lossless: the output is the original's).

What a draft buys depends on how many rounds of proposals decoding takes and what a round costs.
Under greedy decoding the text the original verifies is its own greedy output, and a proposal is
accepted when it is the original's next token there, given a prefix that is that same output. So
the proxy windows end in the original's own greedy continuation (`CONTINUATION` tokens generated
from the window's start), and one forward of a draft over such a window gives, at every position
of the continuation, whether its proposal there would be accepted: replaying speculative decoding
over that sequence of agreements (`rounds`) counts exactly the rounds the real loop takes with k
proposals (up to rounding near ties). Acceptance is not independent across positions (easy
stretches come in runs), so the closed form of Leviathan et al. (2023, section 3.4),
(1 - a^(k+1)) / (1 - a) tokens per round, undercounts long rounds; it is kept for reference
(`speculative_speedup`). A round costs k draft steps and one verification of k + 1 tokens: the
draft's cost per token c is the inverse of its predicted decode speedup (the cost model of the
speed targets), the verification's v_k is timed on the original's shape in the same engine, both in
units of the original's decode step, so the predicted speedup over plain decoding is

    tokens / (rounds * (k * c + v_k))

and each candidate gets the k of `--draft-tokens` that maximises it. The search ranks candidates by
this figure; then the best few are built, run as drafts of the original for real (secateur's own
loop in transformers, llama-speculative-simple on f16 GGUF files in llama.cpp), checked to give the
original's greedy output, and the fastest measured is chosen. The real loop costs more per round
than the timed parts (`RoundCosts.overhead`): each run corrects the predictions before the next
draft to run is picked, so later checks (and the k each draft is run with) follow what was
measured."""

from __future__ import annotations

import dataclasses
import shutil
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from secateur.errors import ConfigError


def speculative_speedup(acceptance: float, cost: float, k: int, verify: float = 1.0) -> float:
    """Expected speedup of greedy speculative decoding over plain decoding: `acceptance` per proposal
    (independent), a draft token costing `cost` target decode steps, `k` proposals per round and a
    verification forward of k + 1 tokens costing `verify` decode steps."""
    if not 0 <= acceptance <= 1:
        raise ValueError(f"an acceptance rate is in [0, 1], got {acceptance}")
    if k < 1 or cost < 0 or verify <= 0:
        raise ValueError("k >= 1, cost >= 0 and verify > 0")
    tokens = k + 1 if acceptance == 1 else (1 - acceptance ** (k + 1)) / (1 - acceptance)
    return tokens / (k * cost + verify)


CONTINUATION = 128  # tokens of the original's greedy continuation per proxy window (at most half of it)


def rounds(accepted: str, k: int) -> int:
    """Rounds of greedy speculative decoding with `k` proposals per round over a continuation whose
    position t is accepted ("1") when the draft's argmax there, given the continuation before it, is
    the original's token: each round accepts the run of "1" from where it starts, up to k, and
    adds the original's own next token."""
    position, count = 0, 0
    while position < len(accepted):
        run = 0
        while run < k and position + run < len(accepted) and accepted[position + run] == "1":
            run += 1
        position += run + 1
        count += 1
    return count


def best_round(accepted: list[str], cost: float, verify: dict[int, float]) -> tuple[int, float]:
    """(k, predicted speedup) with the k of `verify` (k -> what a round of k proposals costs besides
    the proposals, in decode steps: the verification of k + 1 tokens and any overhead) that decodes
    the continuations `accepted` fastest with a draft costing `cost` per token; the smaller k on a
    tie."""
    tokens = sum(len(a) for a in accepted)
    figures = {k: tokens / (sum(rounds(a, k) for a in accepted) * (k * cost + v)) for k, v in verify.items()}
    return max(sorted(figures.items()), key=lambda kv: (kv[1], -kv[0]))


def line(points: dict[int, float]) -> dict[int, float]:
    """The least-squares line a + b k through (k, value), b >= 0 (a verification of more tokens never
    costs less), evaluated at each k: one timing per k is noisy, a line through all of them less."""
    ks = sorted(points)
    if len(ks) < 2:
        return dict(points)
    mean_k, mean_v = sum(ks) / len(ks), sum(points.values()) / len(ks)
    slope = sum((k - mean_k) * (points[k] - mean_v) for k in ks) / sum((k - mean_k) ** 2 for k in ks)
    slope = max(slope, 0.0)
    return {k: mean_v + slope * (k - mean_k) if slope else mean_v for k in ks}


@dataclass
class RoundCosts:
    """What a round of k proposals costs besides the proposals themselves, in the original's decode
    steps: the verification of k + 1 tokens (timed, and smoothed by `line`) and an overhead per
    round that the real decoding loop adds (the caches cut back, the draft catching up, the draft's
    own prefill spread over the rounds): zero until a draft has run for real, then the median of
    what the runs imply (`correct`)."""

    verify: dict[int, float]  # k -> timed cost of the verification of k + 1 tokens
    overhead: float = 0.0
    implied: list[float] = field(default_factory=list)

    @property
    def per_round(self) -> dict[int, float]:
        return {k: v + self.overhead for k, v in line(self.verify).items()}

    def best(self, accepted: list[str], cost: float) -> tuple[int, float]:
        return best_round(accepted, cost, self.per_round)

    def correct(self, k: int, cost: float, tokens_per_round: float, speedup: float) -> None:
        """A draft of cost `cost` run with `k` proposals gave `tokens_per_round` tokens per round at
        `speedup`: a round took tokens_per_round / speedup decode steps, of which k * cost + the
        smoothed verification are modelled; the rest is overhead (at least 0)."""
        self.implied.append(max(0.0, tokens_per_round / speedup - k * cost - line(self.verify)[k]))
        self.overhead = statistics.median(self.implied)


def parse_tokens(text: str) -> tuple[int, ...]:
    """`--draft-tokens 1,2,4` or `1:8` (every k in between)."""
    try:
        if ":" in text:
            low, high = (int(p) for p in text.split(":"))
            values = tuple(range(low, high + 1))
        else:
            values = tuple(sorted({int(p) for p in text.split(",") if p.strip()}))
    except ValueError:
        raise ConfigError(f"--draft-tokens {text!r}: write k values as 1,2,4 or a range 1:8") from None
    if not values or min(values) < 1:
        raise ConfigError(f"--draft-tokens {text!r}: every k (proposals per round) must be at least 1")
    return values


def verification_costs(engine: Any, base: Any, ks: Sequence[int], decode_seconds: float) -> dict[int, float]:
    """k -> the time of one forward of k + 1 tokens on the original's shape (random weights, timed by
    `engine` as a prefill of k + 1 tokens: from an empty cache, which at short contexts costs what a
    verification at depth does), in units of its decode step (`decode_seconds`)."""
    out: dict[int, float] = {}
    for k in ks:
        probe = dataclasses.replace(engine, prompt=k + 1)
        prepared = probe.prepare(base)
        try:
            out[k] = probe.run(prepared, "prefill").prefill / decode_seconds
        finally:
            probe.release(prepared)
    return out


def accepted(teacher_logprobs: torch.Tensor, student_logits: torch.Tensor) -> str:
    """Per position, "1" where the student's most likely token is the teacher's, else "0"."""
    return "".join("1" if a else "0" for a in (teacher_logprobs.argmax(-1) == student_logits.argmax(-1)).tolist())


@torch.no_grad()
def continued(model: nn.Module, window: torch.Tensor, tokens: int, device: torch.device) -> torch.Tensor:
    """`window` (seq,) with its last `tokens` replaced by `model`'s greedy continuation of the rest."""
    from secateur.generate import greedy

    prompt = window[: len(window) - tokens][None].to(device)
    return torch.cat([window[: len(window) - tokens], torch.tensor(greedy(model, prompt, tokens).tokens)])


def measure_in_engine(engine: Any, original: nn.Module, draft: nn.Module, tokenizer: Any, text: str, k: int,
                      vocabulary: Any = None) -> dict[str, Any]:  # fmt: skip
    """The draft run for real with the original: transformers (secateur's loop, float32 here) or
    llama.cpp (both written as f16 GGUF files in a temporary folder). The prompt is the first
    `engine.prompt` tokens of `text`'s evaluation region (held out from the plan's windows)."""
    from secateur.bench import draft_speed, measure_draft_llamacpp
    from secateur.data import load_text
    from secateur.data.windows import tokenize

    if engine.name == "llama.cpp":
        from secateur.export.gguf import model_shape, write_gguf

        folder = Path(tempfile.mkdtemp(prefix="secateur-plan-draft-"))
        try:
            paths = []
            for name, model in (("original", original), ("draft", draft)):
                path = folder / f"{name}.gguf"
                write_gguf(model, model_shape(model), path, "f16", None, vocabulary, name=name)
                paths.append(path)
            result = measure_draft_llamacpp(paths[0], paths[1], llama_cpp=Path(engine.binary).parent,
                                            prompt=engine.prompt, new_tokens=engine.new_tokens, draft_tokens=k,
                                            repeats=engine.repeats, text=text, threads=engine.threads,
                                            tokenizer=tokenizer)  # fmt: skip
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    elif engine.name == "hf":
        ids = tokenize(tokenizer, load_text(text, "evaluation", "text"))
        if len(ids) < engine.prompt:
            raise ConfigError(f"--calib {text} has {len(ids)} tokens, fewer than --prompt {engine.prompt}")
        device = next(original.parameters()).device
        result = draft_speed(original.eval(), draft.to(device).eval(), ids[: engine.prompt].view(1, -1).to(device),
                             engine.new_tokens, k, engine.repeats)  # fmt: skip
    else:  # a timing table (tests) has no decoding loop
        raise ConfigError(f"the {engine.name} engine cannot run a draft")
    return {"draft_tokens": k, "acceptance": result.acceptance, "tokens_per_round": result.tokens_per_round,
            "plain_tokens_per_second": result.plain_tokens_per_second,
            "speculative_tokens_per_second": result.speculative_tokens_per_second, "speedup": result.speedup,
            "identical": result.identical}  # fmt: skip
