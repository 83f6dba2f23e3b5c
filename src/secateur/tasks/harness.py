"""Zero- and few-shot tasks through lm-eval-harness, on the model object secateur loaded (so every
kind of output evaluates, those that need `secateur.load` included)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

from secateur.errors import ConfigError, SecateurError
from secateur.tasks import analogy
from secateur.tasks.wordnet import TASK as PROBE, write_task

log = logging.getLogger(__name__)
# the built-in offline tasks: name -> (generator version: bump it when the generator changes, and the
# cached items are regenerated; writer of the items and task file into a directory)
BUILTIN = {PROBE: ("v1", write_task), analogy.TASK: ("v1", analogy.write_task)}


class TaskError(SecateurError):
    """A task cannot be found or run."""


def builtin_dir(name: str) -> Path:
    """A built-in task's items and task file, generated on first use."""
    from secateur.data.enwiki import cache_dir

    version, write = BUILTIN[name]
    directory = cache_dir() / "tasks" / f"{name}-{version}"
    if not (directory / f"{name}.yaml").is_file():
        write(directory)
    return directory


def probe_dir() -> Path:
    """The knowledge probe's items and task file."""
    return builtin_dir(PROBE)


def _lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise TaskError("--tasks needs lm-eval: pip install 'secateur[tasks]' (or pip install lm-eval)") from None
    return lm_eval


def _manager(tasks: list[str], include_path: list[Path] = ()):
    """lm-eval's task manager over its own tasks, `include_path` and (when asked) the probe; raises
    for an unknown name."""
    _lm_eval()
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise ConfigError("--tasks is empty; give task names separated by commas")
    paths = [str(p) for p in include_path]
    paths += [str(probe_dir() if name == PROBE else builtin_dir(name)) for name in BUILTIN if name in tasks]
    manager = TaskManager(include_path=paths or None, verbosity="ERROR")
    missing = [t for t in tasks if t not in manager.all_tasks]
    if missing:
        raise TaskError(f"unknown task(s) {', '.join(missing)}; give lm-eval task names (offline: local task files "
                        f"with --include-path DIR, or the built-in {', '.join(BUILTIN)})")
    return manager


CUT_OUTPUTS = ("loglikelihood", "multiple_choice")  # the task outputs whose contexts token pruning cuts


def check_tasks(tasks: list[str], include_path: list[Path] = (), pruned: bool = False) -> None:
    """Fail before any work when lm-eval is missing, a task name is unknown or a task's data cannot be
    had (a hub dataset without the internet): the tasks are built here, their data cached. With
    token pruning (`pruned`), tasks that score no context (rolling perplexity) or generate are refused."""
    from lm_eval.tasks import get_task_dict

    manager = _manager(tasks, include_path)
    with _reachable(tasks):
        built = get_task_dict(tasks, manager)
    if pruned:
        other = {name: task.OUTPUT_TYPE for name, task in built.items() if task.OUTPUT_TYPE not in CUT_OUTPUTS}
        if other:
            raise ConfigError(f"--filter-layer cuts the contexts of loglikelihood and multiple-choice tasks; "
                              f"{', '.join(f'{n} ({t})' for n, t in other.items())} cannot be token-pruned")


def token_pruned(lm_class: type, pruning: Any, counts: dict[str, int]) -> type:
    """`lm_class` (lm-eval's HFLM) whose loglikelihood requests read their contexts cut by GemFilter:
    every context longer than the budget is replaced by its kept tokens (the whole model then reads
    them, and the continuation after them); `counts` tallies the distinct contexts and those cut."""
    from secateur.generate.tokens import prune_prompts

    class TokenPrunedLM(lm_class):
        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            contexts = sorted({tuple(ctx) for _, ctx, _ in requests})
            long = [list(c) for c in contexts if len(c) > pruning.budget]
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            size = self.batch_size if isinstance(self.batch_size, int) else 1  # "auto": one context at a time
            kept = {}
            for start in range(0, len(long), size):
                chunk = long[start : start + size]
                kept.update(zip(map(tuple, chunk), prune_prompts(self.model, chunk, pruning, pad)))
            counts["contexts"] += len(contexts)
            counts["contexts_cut"] += len(long)
            requests = [(key, kept.get(tuple(ctx), ctx), cont) for key, ctx, cont in requests]
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)

    return TokenPrunedLM


NETWORK_MODULES = ("requests", "urllib3", "httpx", "huggingface_hub", "datasets", "aiohttp")


@contextlib.contextmanager
def _reachable(tasks: list[str]) -> Iterator[None]:
    """A task whose dataset cannot be fetched is one line with the offline choices, not a traceback."""
    try:
        yield
    except Exception as exc:
        module = type(exc).__module__.split(".")[0]
        if not isinstance(exc, (ConnectionError, TimeoutError)) and module not in NETWORK_MODULES:
            raise
        raise TaskError(f"the data of {', '.join(tasks)} could not be fetched ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:160]}); lm-eval's tasks download their datasets from the Hugging "
                        f"Face hub, which needs the internet: offline, use local task files (--include-path DIR) or "
                        f"the built-in {', '.join(BUILTIN)}") from None


def run_tasks(model: nn.Module, tokenizer: Any, tasks: list[str], *, limit: int | None = None,
              num_fewshot: int | None = None, batch_size: int = 8, device: str = "cpu",
              include_path: list[Path] = (), seed: int = 0, token_pruning: Any = None) -> dict[str, Any]:  # fmt: skip
    """lm-eval's `simple_evaluate` on `model`; returns {lm_eval_version, tasks: {name: metrics}}. With
    `token_pruning` (GemFilter settings), every context longer than its budget is cut first."""
    lm_eval = _lm_eval()
    from lm_eval.models.huggingface import HFLM

    manager = _manager(tasks, include_path)
    counts = {"contexts": 0, "contexts_cut": 0}
    lm_class = token_pruned(HFLM, token_pruning, counts) if token_pruning is not None else HFLM
    lm = lm_class(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    with _reachable(tasks):
        results = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                          task_manager=manager, bootstrap_iters=0, random_seed=seed,
                                          numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                                          verbosity="ERROR")  # fmt: skip
    out = {}
    for name in tasks:
        metrics = {k.split(",")[0]: v for k, v in results["results"][name].items()
                   if "," in k and not k.split(",")[0].endswith("_stderr")}  # fmt: skip
        out[name] = {"metrics": metrics, "version": results.get("versions", {}).get(name),
                     "samples": results.get("n-samples", {}).get(name, {}).get("effective"),
                     "num_fewshot": results.get("n-shot", {}).get(name)}  # fmt: skip
        if name in BUILTIN:
            out[name]["chance"] = 0.25
    pruned = {"token_pruning": {"settings": vars(token_pruning), **counts}} if token_pruning is not None else {}
    return {"lm_eval_version": lm_eval.__version__, "limit": limit, "tasks": out, **pruned}
