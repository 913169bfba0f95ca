#!/bin/bash
# Packs what a device call needs, within the device tool's 64 MiB a call: binaries built here for sm_90a
# (portable: -DFLEXGRAD_NATIVE=OFF), the Debian libraries the GPU machine lacks, and PyTorch's conformance and
# gallery data. Writes PACK_DIR (default build-device/pack, ignored by git):
#   bins.tgz         libflexgrad, test_cuda, flexgrad_conformance, bench_flex_cuda (stripped; bins.commit names
#                    the commit, "+dirty" with uncommitted changes)
#   tp.tgz           ../shared/tools/make_device_deps.sh's tarball
#   conformance.tgz  ../shared/conformance        gallery.tgz  ../shared/gallery
# and prints the carry lists for tools/device_flex.sh, which unpacks them on the GPU machine. The data sets do not
# fit one call together with the rest: carry the conformance data with the tests, the gallery's in another call.
#
#   tools/device_pack.sh [BUILD_DIR]     (default build-device)
set -euo pipefail
cd "$(dirname "$0")/.."
B=${1:-build-device}
P=${PACK_DIR:-build-device/pack}
mkdir -p "$P"
cmake -S . -B "$B" -G Ninja -DCMAKE_BUILD_TYPE=Release -DFLEXGRAD_NATIVE=OFF -DCMAKE_CUDA_ARCHITECTURES=90a > "$P/cmake.log"
grep -q "CUDA backend ON" "$P/cmake.log" || { echo "device_pack.sh: no CUDA toolkit found (see $P/cmake.log)" >&2; exit 1; }
ninja -C "$B" flexgrad test_cuda flexgrad_conformance bench_flex_cuda
tmp=$(mktemp -d)
lib=$(readlink -f "$B/libflexgrad.so")
soname=$(basename "$(readlink "$B/libflexgrad.so")")  # the name the binaries ask for (libflexgrad.so.0.1)
cp "$lib" "$tmp/$soname"
cp "$B/test_cuda" "$B/flexgrad_conformance" "$B/bench_flex_cuda" "$tmp/"
strip "$tmp"/*
ln -s "$soname" "$tmp/libflexgrad.so"
tar czf "$P/bins.tgz" -C "$tmp" .
rm -rf "$tmp"
echo "$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . || echo +dirty)" > "$P/bins.commit"
[ -f "$P/tp.tgz" ] || bash ../shared/tools/make_device_deps.sh "$P/tp.tgz"
for d in conformance gallery; do
  [ -f "$P/$d.tgz" ] || tar czf "$P/$d.tgz" -C ../shared "$d"
done
ls -l "$P"
echo "carry, tests + conformance: [\"$P/bins.tgz\", \"$P/bins.commit\", \"$P/tp.tgz\", \"$P/conformance.tgz\"]"
echo "carry, gallery:             [\"$P/bins.tgz\", \"$P/bins.commit\", \"$P/tp.tgz\", \"$P/gallery.tgz\"]"
echo "command: tools/device_flex.sh   (it finds $P; logs under \$OUT)"
