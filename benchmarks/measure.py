"""What the model benchmarks share: running the CLI (timed, with the child's peak memory), the second
domain's text, and a model's quality on text no stage saw (perplexity on two domains and the WordNet
probe)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable


def cache() -> Path:
    from secateur.data.enwiki import cache_dir

    return cache_dir()


def legal_text() -> Path:
    """Another domain: the license texts Debian ships (legal English), joined."""
    target = cache() / "legal-english.txt"
    if not target.is_file():
        licenses = Path("/usr/share/common-licenses")
        files = sorted(p for p in licenses.iterdir() if p.is_file() and not p.is_symlink())
        target.write_text("\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files))
    return target


def cli(*args) -> str:
    return cli_timed(*args)[0]


def cli_timed(*args, resident: list[float] | None = None) -> tuple[str, float, float]:
    """`secateur ARGS`: its stdout, wall seconds and peak resident memory in MiB (that child's alone, with a
    floor: Linux folds the parent's peak at the spawn into it, so the calling process must stay small).
    `resident`: filled with the child's resident memory in MiB, read every RESIDENT_EVERY seconds."""
    clock = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen([sys.executable, "-m", "secateur.cli", *map(str, args)], stdout=out, stderr=err)
        if resident is not None:
            threading.Thread(target=_watch, args=(child, resident), daemon=True).start()
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - clock
        out.seek(0), err.seek(0)
        if child.returncode != 0:
            raise SystemExit(f"secateur {' '.join(map(str, args))} failed:\n{err.read()[-3000:]}")
        return out.read(), seconds, usage.ru_maxrss / 1024


RESIDENT_EVERY = 0.05  # seconds between two readings of a child's resident memory


def _watch(child: subprocess.Popen, resident: list[float]) -> None:
    """Append the child's VmRSS (MiB) every RESIDENT_EVERY seconds until it exits (read from /proc: no
    thread of the child's own, which would change its allocator's arenas)."""
    status = Path(f"/proc/{child.pid}/status")
    while True:
        try:
            line = next(line for line in status.read_text().splitlines() if line.startswith("VmRSS:"))
        except (OSError, StopIteration):  # gone, or a zombie (no VmRSS): done
            return
        resident.append(int(line.split()[1]) / 1024)
        time.sleep(RESIDENT_EVERY)


def finished(results: Path) -> dict[str, dict]:
    """The rows a resumable benchmark has written so far, by name."""
    lines = results.read_text().splitlines() if results.exists() else []
    return {row["row"]: row for row in map(json.loads, lines)}


def append_row(results: Path, row: dict) -> None:
    """Print a finished row and append it to `results` (one JSON line)."""
    print(json.dumps(row), flush=True)
    with results.open("a") as f:
        f.write(json.dumps(row) + "\n")


def run_rows(doc: str, results: Path, rows: list[str], measure: Callable[[str, int], dict],
             table: Callable[[], None]) -> None:
    """A model benchmark's command line: measure every row (or those of `--only`) not yet a line of
    `results`, appending each as it finishes (resumable), then print the table."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--only", help="comma-separated rows (default: all)")
    parser.add_argument("--probe-items", type=int, default=200)
    args = parser.parse_args()
    done = finished(results)
    for name in args.only.split(",") if args.only else rows:
        if name not in done:
            append_row(results, measure(name, args.probe_items))
    table()


def quality(path: Path, eval_args: list[str], probe_items: int) -> dict:
    """Perplexity and bits per byte on the enwiki evaluation windows and on legal English (with, for a
    pruned vocabulary, the share of the original's tokens that are gone), and the WordNet probe."""
    row = {}
    for label, data in (("enwiki", "enwiki-sample"), ("legal", legal_text())):
        result = json.loads(cli("eval", path, "--data", data, *eval_args, "--json"))
        row[f"ppl_{label}"] = result["perplexity"]
        for key, name in (("bits_per_byte", "bpb"), ("bytes", "bytes"), ("changed_tokens", "changed")):
            if key in result:
                row[f"{name}_{label}"] = result[key]
    probe = json.loads(cli("eval", path, "--tasks", "secateur_wordnet", "--limit", probe_items, "--json"))
    task = probe["tasks"]["secateur_wordnet"]
    row.update(probe_acc=task["metrics"].get("acc"), probe_items=task["samples"])
    return row
