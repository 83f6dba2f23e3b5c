"""Perplexity over non-overlapping token windows.

Protocol: the first `windows` non-overlapping windows of `seq_len` tokens from the start of the text
(BOS first in every window when the family uses it). Each window is scored on its own, with no
context carried over; every token after the first is predicted, so a window contributes
seq_len - 1 predictions. Perplexity = exp(mean negative log-likelihood over all predictions).
Bits per byte = the summed negative log-likelihood in bits over the UTF-8 bytes of the predicted
tokens' text: the figure that compares models whose tokenizers differ (a pruned vocabulary).
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from secateur.data.bytes import token_bytes as bytes_of_tokens
from secateur.data import load_text
from secateur.data.calibration import bos_token, evaluation_data
from secateur.data.windows import tokenize
from secateur.models.head import chunk_positions, hidden_out, splittable

LARGEST_NLL = math.log(sys.float_info.max)  # exp of more overflows a float
PROTOCOL = (
    "first N non-overlapping windows of seq_len tokens from the start of the text; each window scored "
    "independently; perplexity = exp(mean NLL of the seq_len-1 next-token predictions per window)"
)


@torch.no_grad()
def perplexity(model: nn.Module, windows: Tensor, batch_size: int = 4, device: str | torch.device = "cpu",
               token_bytes: Tensor | None = None) -> dict[str, Any]:  # fmt: skip
    """Perplexity of `model` on `windows` (n, seq_len); returns the figure with its protocol, and with
    `token_bytes` (bytes of text per id) the bytes predicted and the bits per byte."""
    model.eval()
    start = time.perf_counter()
    total_nll, total_tokens = 0.0, 0
    predicted_bytes = int(token_bytes[windows[:, 1:]].sum()) if token_bytes is not None else None
    chunk = chunk_positions(model) if splittable(model) else 0
    with hidden_out(model) if chunk else nullcontext() as head:
        for batch in windows.split(batch_size):
            batch = batch.to(device)
            out = model(input_ids=batch, use_cache=False).logits  # (b, seq, hidden), or (b, seq, vocab) whole
            total_nll += _nll(out[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), head, chunk)
            total_tokens += batch[:, 1:].numel()
    mean_nll = total_nll / total_tokens
    per_byte = {"bytes": predicted_bytes, "bits_per_byte": total_nll / math.log(2) / predicted_bytes} if predicted_bytes else {}
    return {
        "perplexity": math.exp(mean_nll) if mean_nll < LARGEST_NLL else math.inf,  # a wrecked model: inf, not a crash
        "mean_nll": mean_nll,
        **per_byte,
        "windows": len(windows),
        "seq_len": windows.shape[1],
        "predicted_tokens": total_tokens,
        "seconds": time.perf_counter() - start,
        "protocol": PROTOCOL,
    }


def _nll(outputs: Tensor, targets: Tensor, head: Any, chunk: int) -> float:
    """Summed negative log-likelihood of `targets` (n,) from logits (n, vocab), or from hidden states
    (n, hidden) through `head`, `chunk` positions at a time."""
    if head is None:
        return float(F.cross_entropy(outputs.float(), targets, reduction="sum"))
    return sum(float(F.cross_entropy(logits.float(), targets[a : a + len(logits)], reduction="sum"))
               for a, logits in head.chunks(outputs, chunk))  # fmt: skip


def evaluate_model(model: nn.Module, tokenizer: Any, source: str, seq_len: int, windows: int, *,
                   field: str = "text", batch_size: int = 4, device: torch.device | str = "cpu") -> dict[str, Any]:
    data = evaluation_data(model, tokenizer, source, seq_len, windows, field)
    return evaluation_record(model, tokenizer, source, data, batch_size, device)


def split_sources(data: str) -> list[str]:
    """The text sources of an evaluation: one path, or names and paths separated by commas, every
    mixture replaced by its corpora."""
    from secateur.data.mixture import expand

    return expand([data] if Path(data).exists() else [part.strip() for part in data.split(",") if part.strip()])


def evaluate_sources(model: nn.Module, tokenizer: Any, sources: list[str], seq_len: int, windows: int, *,
                     field: str = "text", batch_size: int = 4, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Perplexity on each source (`evaluate_model`), combined by `combine`."""
    return combine({source: evaluate_model(model, tokenizer, source, seq_len, windows, field=field,
                                           batch_size=batch_size, device=device) for source in sources})  # fmt: skip


def combine(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One source's result as it is; several under `domains` with their mean at the top: mean_nll the
    mean of the domains' (each domain weighs the same), perplexity its exponential (the geometric mean
    of the domains' perplexities), bits per byte the mean of theirs; `source` names them all."""
    if len(results) == 1:
        return next(iter(results.values()))
    first = next(iter(results.values()))
    nll = sum(r["mean_nll"] for r in results.values()) / len(results)
    per_byte = ({"bits_per_byte": sum(r["bits_per_byte"] for r in results.values()) / len(results)}
                if all("bits_per_byte" in r for r in results.values()) else {})  # fmt: skip
    return {"source": ",".join(results), "sources": list(results), "perplexity": math.exp(nll), "mean_nll": nll,
            **per_byte, "mean": "each domain weighs the same: exp(mean over domains of their mean NLL)",
            "windows": first["windows"], "seq_len": first["seq_len"],
            "seconds": sum(r["seconds"] for r in results.values()), "domains": results, "protocol": PROTOCOL}  # fmt: skip


def evaluation_sets(model: nn.Module, tokenizer: Any, source: str, seq_len: int, windows: int) -> dict[str, Tensor]:
    """The evaluation windows of each source `source` names (`split_sources`)."""
    return {name: evaluation_data(model, tokenizer, name, seq_len, windows) for name in split_sources(source)}


def evaluation_records(model: nn.Module, tokenizer: Any, sets: dict[str, Tensor], batch_size: int,
                       device: torch.device | str) -> dict[str, Any]:  # fmt: skip
    """Perplexity on windows already cut from each source, combined, as the manifest records it."""
    return combine({name: evaluation_record(model, tokenizer, name, data, batch_size, device)
                    for name, data in sets.items()})  # fmt: skip


def evaluation_record(model: nn.Module, tokenizer: Any, source: str, data: Tensor, batch_size: int,
                device: torch.device | str) -> dict[str, Any]:  # fmt: skip
    """Perplexity on windows already cut from `source`, as the manifest records it."""
    result = perplexity(model, data, batch_size=batch_size, device=device,
                        token_bytes=bytes_of_tokens(tokenizer, model.get_input_embeddings().num_embeddings))
    return {"source": source, "bos": bos_token(model, tokenizer) is not None, **result}


def changed_tokens(original: Any, tokenizer: Any, source: str, seq_len: int, windows: int, field: str = "text") -> float:
    """The share of `original`'s tokens over the evaluation windows' text (its first windows x seq_len
    tokens) that `tokenizer` lacks: how much of the text a pruned vocabulary splits differently."""
    ids = tokenize(original, load_text(source, "evaluation", field))[: windows * seq_len]
    vocabulary = tokenizer.get_vocab()
    return sum(t not in vocabulary for t in original.convert_ids_to_tokens(ids.tolist())) / max(len(ids), 1)
