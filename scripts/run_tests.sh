#!/usr/bin/env bash
# The README's second command: install what is missing, build, run every test (then the unit tests
# once more under AddressSanitizer + UndefinedBehaviorSanitizer).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install_deps.sh
jobs="$(nproc)"
# Sanitizers first: every CPU suite in a Debug build (the attention suite holds the random-program and
# property tests, the nn suite the loader fuzz test: out-of-bounds reads and undefined behaviour show here).
cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=Debug -DFLEXGRAD_SANITIZE=ON -DFLEXGRAD_CUDA=OFF
cmake --build build-asan -j"$jobs" --target test_tensor test_autograd test_ops test_attention test_nn
for t in test_tensor test_autograd test_ops test_attention; do
  ASAN_OPTIONS=detect_leaks=1 OMP_NUM_THREADS=2 "build-asan/$t" --gtest_brief=1
done
# The one size-heavy case is left to the Release run below: NnTaskDev.CopyTaskReaches99Percent trains a GPT for
# up to 600 steps (measured on 2 shared cores: 22 s in Release, 122 s under the sanitizers when idle and over
# 4 minutes under load, as much as all the other sanitized suites together) through the same layers,
# attention and optimizer code the other nn tests run under them.
ASAN_OPTIONS=detect_leaks=1 OMP_NUM_THREADS=2 build-asan/test_nn --gtest_brief=1 \
  --gtest_filter=-*NnTaskDev.CopyTaskReaches99Percent*
# Then every test of the Release build; ctest's summary line closes the output.
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build build -j"$jobs"
ctest --test-dir build --output-on-failure -j"$jobs" --timeout 900
