"""llama.cpp's binaries within one command: `secateur llama-cpp` builds the llama.cpp that PyPI's
`llama-cpp-python` sdist vendors (with its `convert_hf_to_gguf.py` and matching Python bindings) once,
into secateur's cache, so `secateur bench --engine llama.cpp` and `secateur plan` find `llama-bench`
on a fresh machine. Needs cmake, a C++ compiler and PyPI; several minutes on two cores.

The cache (<cache>/llamacpp/) holds the unpacked sdist and a CMake build with shared libraries:
`llama-bench`, `llama-perplexity`, `llama-completion`, `llama-speculative-simple` and `libllama.so`. The sdist's pure-Python `llama_cpp` package is
used against that library (`LLAMA_CPP_LIB_PATH`), so its bindings always match the binaries.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from secateur.errors import SecateurError

VERSION = "0.3.36"  # llama-cpp-python; the llama.cpp it vendors is what is built
# the last: libllama.so, for the Python bindings; llama-completion and llama-speculative-simple: plain
# and speculative decoding with the same sampler code (benchmarks/llamacpp_drafts.py)
TARGETS = ("llama-bench", "llama-perplexity", "llama-completion", "llama-speculative-simple", "llama")
TOOLS = TARGETS[:-1]


def cache() -> Path:
    from secateur.data.enwiki import cache_dir

    return cache_dir() / "llamacpp"


def bin_dir() -> Path:
    return cache() / f"build-{VERSION}" / "bin"


def built(tools: tuple[str, ...] = TOOLS) -> Path | None:
    """The cached build's bin directory when it holds `tools` (default: all) and libllama, else None."""
    where = bin_dir()
    complete = all((where / t).is_file() for t in tools) and any(where.glob("libllama.so*"))
    return where if complete else None


def source_dir() -> Path:
    """The unpacked sdist (downloaded from PyPI on first use)."""
    root = cache() / f"llama_cpp_python-{VERSION}"
    if not (root / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        cache().mkdir(parents=True, exist_ok=True)
        archive = cache() / f"llama_cpp_python-{VERSION}.tar.gz"
        if not archive.is_file():
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                            f"llama-cpp-python=={VERSION}", "-d", str(cache())], check=True)  # fmt: skip
        with tarfile.open(archive) as tar:
            tar.extractall(cache(), filter="data")
    return root


def build() -> Path:
    """The directory of the built binaries (built on first use)."""
    done = built()
    if done is not None:
        return done
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if missing:
        raise SecateurError(f"building llama.cpp needs {' and '.join(missing)} on PATH (e.g. apt install cmake g++)")
    llama = source_dir() / "vendor" / "llama.cpp"
    build_dir = bin_dir().parent
    subprocess.run(["cmake", "-S", str(llama), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                    "-DBUILD_SHARED_LIBS=ON", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
                    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=ON", "-DLLAMA_BUILD_SERVER=OFF",
                    "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF"],
                   check=True)  # fmt: skip
    jobs = str(os.cpu_count() or 2)
    subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs, "--target", *TARGETS], check=True)
    return bin_dir()


def converter() -> Path:
    """llama.cpp's own HF -> GGUF converter, from the same source tree."""
    return source_dir() / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"


def bindings() -> Path:
    """The directory to put on sys.path for `import llama_cpp` (set LLAMA_CPP_LIB_PATH to `build()`)."""
    return source_dir()
