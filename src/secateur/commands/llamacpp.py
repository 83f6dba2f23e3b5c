"""`secateur llama-cpp`: build llama.cpp's binaries once into secateur's cache (for `bench --engine
llama.cpp` and `plan`), or say where they are."""

from __future__ import annotations

import argparse


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("llama-cpp", help="build llama.cpp's llama-bench once into secateur's cache (from PyPI's "
                                         "llama-cpp-python sdist; several minutes; needs cmake and a C++ compiler)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from secateur.export.llamacpp import build, built

    ready = built()
    if ready is None:
        print("building llama.cpp (several minutes) ...", flush=True)
    print(f"llama.cpp binaries: {ready or build()}; secateur bench --engine llama.cpp and secateur plan find them")
    return 0
