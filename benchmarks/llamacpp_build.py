"""The benchmarks' llama.cpp: the one `secateur llama-cpp` builds (see secateur/export/llamacpp.py),
cached outside the repository.

    python benchmarks/llamacpp_build.py        # prints the bin directory
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from secateur.export.llamacpp import bindings, build, converter  # noqa: E402, F401

if __name__ == "__main__":
    print(build())
