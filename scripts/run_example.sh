#!/usr/bin/env bash
# The README's first command: install what is missing, build, run the main example.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install_deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build build -j"$(nproc)"
./build/train_tiny_gpt "$@"
