#!/usr/bin/env bash
# Download, where pip works, the wheels scripts/gpu_check.sh needs on a GPU machine that has torch,
# transformers and CUDA but no network: the project's other dependencies, for CPython 3.12 on x86-64, into
# .whl/ (git-ignored through .git/info/exclude). Pass other NAME==VERSION pins to add or replace some.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
# huggingface_hub and tokenizers are left to the machine (datasets and transformers accept its 1.x hub).
PINS=(datasets==5.2.0 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 pydantic==2.14.4 pydantic_core==2.50.5
      annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0 tenacity==9.2.1 dill==0.4.1
      multiprocess==0.70.19 fsspec==2026.9.0 transformers==5.24.0 "$@")
mkdir -p .whl
for pin in "${PINS[@]}"; do
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$pin"
done
du -sh .whl
