#!/usr/bin/env bash
# The README's second command: install what is missing, build, run every test (then the unit tests
# once more under AddressSanitizer + UndefinedBehaviorSanitizer).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install_deps.sh
jobs="$(nproc)"
# Sanitizers first: the core suites (tensor, autograd, ops) in a Debug build.
cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=Debug -DFLEXGRAD_SANITIZE=ON -DFLEXGRAD_CUDA=OFF
cmake --build build-asan -j"$jobs" --target test_tensor test_autograd test_ops
for t in test_tensor test_autograd test_ops; do
  ASAN_OPTIONS=detect_leaks=1 OMP_NUM_THREADS=2 "build-asan/$t" --gtest_brief=1
done
# Then every test of the Release build; ctest's summary line closes the output.
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build build -j"$jobs"
ctest --test-dir build --output-on-failure -j"$jobs" --timeout 900
