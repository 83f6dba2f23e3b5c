#!/usr/bin/env bash
# GPU checks of issue 35 in one device call (scripts/gpu_check.py says what they measure).
#   here, once:        scripts/gpu_check.sh fetch     # the wheels the device image lacks, into .whl/ (git-ignored)
#   device tool run:   scripts/gpu_check.sh run       # with carry [".whl"], timeout_s about 540
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-run}" in
  fetch)
    grep -qx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
    for spec in greenlet==3.5.6 gguf==0.19.0 mwparserfromhell==0.7.2; do
      python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "$spec"
    done
    ls .whl ;;
  run)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:src:tests PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total --format=csv || true
    python3 scripts/gpu_check.py --out "${OUT:-/tmp/gpu-check}" ;;
  *) echo "usage: $0 fetch|run" >&2; exit 2 ;;
esac
