"""Build llama.cpp once from the `llama-cpp-python` sdist on PyPI (it vendors llama.cpp, its
`convert_hf_to_gguf.py` and matching Python bindings), cached outside the repository.

The cache (~/.cache/secateur/llamacpp/<version>/) holds the unpacked sdist and a CMake build of the
vendored llama.cpp with shared libraries: `llama-bench`, `llama-perplexity` and `libllama.so`. The sdist's pure-Python `llama_cpp` package is used against that library
(`LLAMA_CPP_LIB_PATH`), so its bindings always match the binaries.

    python benchmarks/llamacpp_build.py        # prints the bin directory
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

VERSION = "0.3.36"  # llama-cpp-python; the llama.cpp it vendors is what is built
CACHE = Path.home() / ".cache" / "secateur" / "llamacpp"
TARGETS = ("llama-bench", "llama-perplexity", "llama")  # the last: libllama.so, for the Python bindings


def source_dir() -> Path:
    root = CACHE / f"llama_cpp_python-{VERSION}"
    if not (root / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        archive = CACHE / f"llama_cpp_python-{VERSION}.tar.gz"
        if not archive.is_file():
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                            f"llama-cpp-python=={VERSION}", "-d", str(CACHE)], check=True)  # fmt: skip
        with tarfile.open(archive) as tar:
            tar.extractall(CACHE, filter="data")
    return root


def build() -> Path:
    """The directory of the built binaries (built on first use: several minutes on 2 cores)."""
    llama = source_dir() / "vendor" / "llama.cpp"
    build_dir = CACHE / f"build-{VERSION}"
    bin_dir = build_dir / "bin"
    if all((bin_dir / t).exists() for t in TARGETS[:2]) and any(bin_dir.glob("libllama.so*")):
        return bin_dir
    subprocess.run(["cmake", "-S", str(llama), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                    "-DBUILD_SHARED_LIBS=ON", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
                    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                    "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF"],
                   check=True)  # fmt: skip
    jobs = str(os.cpu_count() or 2)
    subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs, "--target", *TARGETS], check=True)
    return bin_dir


def converter() -> Path:
    """llama.cpp's own HF -> GGUF converter, from the same source tree."""
    return source_dir() / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"


def bindings() -> Path:
    """The directory to put on sys.path for `import llama_cpp` (set LLAMA_CPP_LIB_PATH to `build()`)."""
    return source_dir()


if __name__ == "__main__":
    print(build())
