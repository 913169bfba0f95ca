#!/usr/bin/env bash
# Installs what a fresh Debian 12 machine lacks to build and test flexgrad (no-op when present).
set -euo pipefail
pkgs=(build-essential cmake ninja-build libopenblas-dev libgtest-dev libgmock-dev libbenchmark-dev libfmt-dev
      libcli11-dev nlohmann-json3-dev
      libxml2-utils)  # xmllint: the loss.svg test checks the SVG is well-formed XML
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi
