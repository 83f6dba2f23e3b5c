"""A vocabulary stage from disk to disk (`secateur prune --method vocabulary --offload disk`).

The kept tokens come from the calibration windows and the tokenizer alone; the model's weights are
never all in memory: the blocks are copied to the output one at a time, unchanged, and of what lies
outside them only the embedding and LM head rows of the kept tokens are read and written (the rest
is copied from the input). The config, generation config and tokenizer are the rewritten ones. The
same weights and files as the stage run in memory and saved. With a work directory, the kept ids
are saved once chosen and copied blocks are kept, so a killed run goes on from there (`--resume`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from secateur.calibrate.disk import DiskBlocks, read, write_side_files
from secateur.errors import ConfigError
from secateur.io import load_tokenizer, resolve_dtype
from secateur.manifest import structure_of
from secateur.sparsity.prune import streamed_table
from secateur.vocabulary.config import VocabularyConfig
from secateur.vocabulary.engine import choose_vocabulary
from secateur.vocabulary.model import slice_vocabulary
from secateur.output import save_whole

STATE = "vocabulary.pt"  # in the work directory: the kept ids


def row_tensors(model: Any) -> list[str]:
    """The names of the tensors whose rows are tokens: the embedding, and the LM head (weight, bias)
    where it is not the embedding itself (a tied head is named once, as the embedding)."""
    head = model.get_output_embeddings()
    rows = {id(model.get_input_embeddings().weight), *(id(p) for p in (head.parameters() if head is not None else ()))}
    return [name for name, param in model.named_parameters() if id(param) in rows]


def _keep_state(work: Path, kept: list[int]) -> None:
    """The kept ids, saved once chosen (what a resumed run's copied blocks belong to); a resumed run
    that counts other tokens is refused."""
    saved = work / STATE
    if saved.is_file():
        if torch.load(saved, weights_only=True)["kept"] != kept:
            raise ConfigError("the resumed run keeps other tokens than the interrupted one (another calibration?); "
                              "run it again without --resume")
        return
    work.mkdir(parents=True, exist_ok=True)
    save_whole({"kept": kept}, saved)


def streamed(path: Path, staging: Path, config: VocabularyConfig, calibration: Tensor | None, dtype: str,
             device: torch.device, batch_size: int, work: Path | None) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """The kind's `Streaming.run`: (history record, manifest structure section)."""
    from transformers import GenerationConfig

    from secateur.recipe import stage_settings

    clock = time.perf_counter()
    tokenizer = load_tokenizer(path)
    store = DiskBlocks.open(path, resolve_dtype(dtype), staging, work)
    try:
        model, adapter = store.model, store.adapter
        if (path / "generation_config.json").is_file():  # the special ids it names are kept, as in memory
            model.generation_config = GenerationConfig.from_pretrained(path)
        parameters_before = sum(p.numel() for p in model.parameters())
        kept, new_tokenizer, report = choose_vocabulary(model, tokenizer, config, calibration)
        if work is not None:
            _keep_state(work, kept)
        # the rows of what the store holds already (the embedding) and of what it left on disk (an untied head)
        params = dict(model.named_parameters())
        stored = {store.stored_name(n): n for n in row_tensors(model)}  # the input's name -> the model's
        names = {key: n for key, n in stored.items() if key in store.files}  # a tied head is stored nowhere
        held = {stored: params[n] for stored, n in names.items() if not params[n].is_meta}
        rows = torch.as_tensor(kept, dtype=torch.long)
        full = {**held, **read(store.files, store.headers, [n for n in names if n not in held], store.dtype)}
        sliced = {name: tensor[rows].clone() for name, tensor in full.items()}  # written under the input's names
        del full, held
        chosen = time.perf_counter() - clock
        table = store.write_blocks(list(range(len(adapter.block_list(model)))))
        model.to("meta")
        slice_vocabulary(model, kept)  # on the meta device: the output's config and special ids
        store.finish(sliced)
        written = time.perf_counter() - clock - chosen
    finally:
        store.close()
    write_side_files(path, staging, model, resolve_dtype(dtype), tokenizer=new_tokenizer)
    result = {"parameters_before": parameters_before, "parameters_after": sum(p.numel() for p in model.parameters()),
              **report.to_dict()}  # fmt: skip
    layers = streamed_table(model, table)
    record = {"kind": "vocabulary", "settings": stage_settings(config), "result": result, "seconds": chosen,
              "write_seconds": written, "offload": "disk"}  # fmt: skip
    return record, structure_of(model, layers)
