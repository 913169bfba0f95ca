#!/usr/bin/env bash
# The test of flexgrad's CMake package (CTest: install_consumer). Installs BUILD_DIR into a temporary prefix,
# moves the prefix elsewhere (the package must be relocatable), checks that nothing installed points back into
# the source or build tree, then configures, builds and runs examples/consumer against the moved prefix with
# CMAKE_PREFIX_PATH, as another project would.
#   scripts/test_install.sh BUILD_DIR [CXX_COMPILER]
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd -P)"
build="$(cd "${1:?usage: test_install.sh BUILD_DIR [CXX_COMPILER]}" && pwd -P)"
cxx="${2:-c++}"
tmp="$(mktemp -d "${TMPDIR:-/tmp}/flexgrad-install.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
fail() { echo "test_install: FAILED: $*" >&2; exit 1; }

cmake --install "$build" --prefix "$tmp/stage" >/dev/null
mv "$tmp/stage" "$tmp/prefix"
prefix="$tmp/prefix"
lib="$(ls "$prefix"/lib*/libflexgrad.so 2>/dev/null | head -1)"
[ -n "$lib" ] || fail "no libflexgrad.so under $prefix/lib*"
[ -f "$prefix/include/flexgrad/flexgrad.h" ] || fail "no include/flexgrad/flexgrad.h under $prefix"
ls "$prefix"/lib*/cmake/flexgrad/flexgrad-config.cmake >/dev/null || fail "no flexgrad-config.cmake"
# Text files (headers, CMake files) must not name the source or build tree, nor the prefix it was installed to.
if grep -rIl -e "$src" -e "$build" -e "$tmp/stage" "$prefix"; then fail "the installed files above refer to $src or $build"; fi
# Nor may the library's run path (RUNPATH/RPATH).
runpath="$(readelf -d "$lib" | grep -E 'RUNPATH|RPATH' || true)"
case "$runpath" in *"$build"*|*"$src"*) fail "libflexgrad.so's run path points into the build tree: $runpath" ;; esac

cmake -S "$src/examples/consumer" -B "$tmp/consumer" -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DCMAKE_CXX_COMPILER="$cxx" -DCMAKE_PREFIX_PATH="$prefix" >/dev/null
cmake --build "$tmp/consumer" >/dev/null
exe="$tmp/consumer/flexgrad_consumer"
# The consumer must load the installed library, not the build tree's.
loaded="$(ldd "$exe" | grep 'libflexgrad\.so' || true)"
case "$loaded" in *"$prefix/"*) ;; *) fail "flexgrad_consumer does not load libflexgrad.so from $prefix: $loaded" ;; esac
"$exe"
echo "test_install: flexgrad installed, relocated to $prefix, found by find_package and used by examples/consumer"
