"""One way out for every file secateur writes (prune, train, export, report, plan, eval --results).

An output is *claimed* before any work: it must not be, hold or lie inside any of the run's inputs
(models, teachers, texts, recipes, results files), files and directories alike; an existing one is
replaced only when asked, and only when it is what this command writes; its place must be writable.
The claim takes a lock, so a second run to the same output is refused instead of racing, and it
clears what killed runs left there. Writing goes to a hidden sibling (`.NAME.partial-PID`) that is
renamed into place at the end; a signal, an error or a full disk removes it, and free space is
checked first when the size is known. As git writes refs through one lock-file path.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import signal
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from secateur.errors import OutputError

SPACE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
ACCESS_ERRORS = (errno.EACCES, errno.EPERM, errno.EROFS)
SLACK = 1.02  # free space asked for beyond the estimate (metadata, tokenizer files)


def relation(target: Path, source: Path) -> str | None:
    """How an output path stands to an input path (both resolved): 'is', 'contains', 'lies inside'."""
    if target == source:
        return "is"
    if target in source.parents:
        return "contains"
    if source in target.parents:
        return "lies inside"
    return None


def check_apart(out: Path, inputs: Sequence[str | Path], flag: str = "--out") -> None:
    """Refuse an output that is, contains or lies inside any input (overwriting it would lose it)."""
    target = out.resolve()
    for source in inputs:
        if source is None:
            continue
        how = relation(target, Path(source).resolve())
        if how is not None:
            raise OutputError(f"{flag} {out} {how} the input {source}; choose an output outside the inputs")


def _writable_parent(out: Path, flag: str) -> Path:
    """The nearest existing ancestor of `out`, which must be a writable directory."""
    target = out.resolve()
    parent = next(p for p in (target.parent, *target.parents) if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {out}: {parent} is not a writable directory; choose another {flag}")
    return parent


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def clear_stale(out: Path) -> None:
    """Remove what interrupted writes of `out` left: staging copies, and a retired old output (put back
    in place when the new one never arrived). Called under the output's lock, so no writer is alive."""
    if not out.parent.is_dir():
        return
    for path in out.parent.glob(f".{out.name}.*-*"):
        kind, _, pid = path.name[len(out.name) + 2 :].rpartition("-")
        if kind not in ("partial", "old") or not pid.isdigit():
            continue
        if kind == "old" and not out.exists():
            path.rename(out)  # the crash came between retiring the old output and renaming the new one
        else:
            _remove(path)


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """SIGTERM and SIGHUP raise KeyboardInterrupt as Ctrl-C does, so cleanups run (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _errno(exc: BaseException) -> int | None:
    """The errno of an OSError, or of one a library wrapped in its own error (its text says os error N)."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc.errno
        found = re.search(r"\(os error (\d+)\)", str(exc))
        if found:
            return int(found.group(1))
        exc = exc.__cause__ or exc.__context__
    return None


def disk_error(exc: BaseException, what: Path | str, flag: str | None = "--out") -> OutputError | None:
    """A full disk or a refused write as one line (None for other errors); `flag`: the option that
    names the place, None where the place is not the user's choice (a cache)."""
    code = _errno(exc)
    another = f"choose another {flag}" if flag else ""
    if code in SPACE_ERRORS:
        return OutputError(f"no space left on the device while writing {what} ({os.strerror(code)}); nothing "
                           f"was written: free some space{' or ' + another if another else ''}")
    if code in ACCESS_ERRORS:
        return OutputError(f"cannot write {what}: {os.strerror(code)}; nothing was written{': ' + another if another else ''}")
    return None


@dataclass
class Output:
    """A claimed output path: checked, locked and cleared of leftovers; written with `write()`."""

    path: Path
    shape: Literal["dir", "file"] = "dir"
    flag: str = "--out"
    _lock: int | None = field(default=None, repr=False)
    _made: list[Path] = field(default_factory=list, repr=False)  # parent directories the claim created

    @property
    def lock_path(self) -> Path:
        return self.path.parent / f".{self.path.name}.lock"

    def acquire(self) -> None:
        """Create missing parent directories, then take the lock (a running writer of the same output
        makes this fail at once)."""
        missing = [p for p in (self.path.parent, *self.path.parent.parents) if not p.exists()]
        for directory in reversed(missing):
            directory.mkdir(exist_ok=True)
            self._made.append(directory)
        while True:
            handle = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(handle)
                raise OutputError(f"another secateur run is writing {self.path} (it holds {self.lock_path}); wait for "
                                  f"it or choose another {self.flag}") from None
            try:
                same = os.fstat(handle).st_ino == os.stat(self.lock_path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a lock file that its holder removed while this one waited
                self._lock = handle
                return
            os.close(handle)

    def release(self) -> None:
        if self._lock is not None:
            with contextlib.suppress(FileNotFoundError):
                self.lock_path.unlink()
            os.close(self._lock)
            self._lock = None
        for directory in reversed(self._made):
            with contextlib.suppress(OSError):
                directory.rmdir()  # only when still empty: the output was never written
        self._made = []

    def __enter__(self) -> Output:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def check_space(self, size: int) -> None:
        """Refuse before writing when the estimated `size` in bytes does not fit."""
        free = shutil.disk_usage(self.path.parent).free
        if size and free < size * SLACK:
            raise OutputError(f"{self.path} needs about {size / 2**20:.1f} MiB and {self.path.parent} has "
                              f"{free / 2**20:.1f} MiB free; free some space or choose another {self.flag}")

    @contextlib.contextmanager
    def write(self, size: int = 0) -> Iterator[Path]:
        """Yield a hidden staging path (a new directory, or a file path for file outputs); on success
        it replaces the output in one rename, on any error or signal it is removed."""
        if self._lock is None:
            raise RuntimeError(f"{self.path} is written without its claim")
        self.check_space(size)
        staging = self.path.parent / f".{self.path.name}.partial-{os.getpid()}"
        _remove(staging)
        with signals_raise():
            try:
                if self.shape == "dir":
                    staging.mkdir()
                yield staging
                self._replace(staging)
            except BaseException as exc:  # a signal, or an OSError (perhaps a library's own error wrapping one)
                _remove(staging)
                error = disk_error(exc, self.path, self.flag) if isinstance(exc, Exception) else None
                if error is None:
                    raise
                raise error from None
        self._made = []  # the parents now hold the output

    def _replace(self, staging: Path) -> None:
        if self.shape == "file":
            os.replace(staging, self.path)
            return
        if self.path.exists():
            retired = self.path.parent / f".{self.path.name}.old-{os.getpid()}"
            self.path.rename(retired)
            staging.rename(self.path)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(self.path)


def save_whole(state: Any, path: Path) -> None:
    """torch.save `state` to `path` through a sibling `.tmp` renamed into place: a kill never leaves a
    half-written file under its name (the work files a resumed run reads back)."""
    import torch

    partial = path.with_suffix(".tmp")
    torch.save(state, partial)
    os.replace(partial, path)


def claim(out: str | Path, *, inputs: Sequence[str | Path | None] = (), overwrite: bool | None = False,
          shape: Literal["dir", "file"] = "dir", flag: str = "--out", suffix: str | None = None,
          marker: str | None = None, magic: bytes | None = None, also: Sequence[Path] = ()) -> Output:
    """Check `out` and take it, before any work (see the module docstring); use as a context manager.

    `overwrite=None`: the command has no --overwrite, an existing output is always refused. `marker`:
    a file that an output directory of this command holds; --overwrite replaces only such a directory
    (or an empty one), never someone's folder; `magic`: the bytes an output file of this command starts
    with, the same for files. `also`: further paths the run writes beside `out`
    (checkpoints), held to the same rules about inputs."""
    out = Path(out)
    if suffix is not None and out.suffix.lower() != suffix:
        raise OutputError(f"{flag} {out}: the file name must end in {suffix}")
    for path in (out, *also):
        check_apart(path, [p for p in inputs if p is not None], flag)
    _writable_parent(out, flag)
    output = Output(out, shape, flag)
    output.acquire()
    try:
        clear_stale(out)
        _check_existing(output, overwrite, marker, magic)
    except BaseException:
        output.release()
        raise
    return output


def _check_existing(output: Output, overwrite: bool | None, marker: str | None, magic: bytes | None) -> None:
    out, flag = output.path, output.flag
    if not out.exists() and not out.is_symlink():
        return
    if output.shape == "dir" and not out.is_dir():
        raise OutputError(f"{flag} {out} exists and is not a directory; choose another {flag}")
    if output.shape == "file" and out.is_dir():
        raise OutputError(f"{flag} {out} is a directory; give a file name")
    if overwrite is None:
        raise OutputError(f"{out} already exists; choose a new {flag} file")
    if not overwrite:
        raise OutputError(f"output {out} already exists; pass --overwrite to replace it")
    if out.is_symlink():
        raise OutputError(f"{flag} {out} is a symbolic link; give the real path or another {flag}")
    if output.shape == "dir" and marker is not None and any(out.iterdir()) and not (out / marker).is_file():
        raise OutputError(f"--overwrite replaces only an earlier output of this command, and {out} holds no {marker}; "
                          f"remove it yourself or choose another {flag}")
    if output.shape == "file" and magic is not None and out.stat().st_size and _head(out, len(magic)) != magic:
        raise OutputError(f"--overwrite replaces only an earlier output of this command, and {out} is not one (it does "
                          f"not start with {magic!r}); remove it yourself or choose another {flag}")


def _head(path: Path, size: int) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read(size)
    except OSError:
        return b""
