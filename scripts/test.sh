#!/usr/bin/env bash
# Installs what the tests need (scripts/setup.sh with the test extras, Fashion-MNIST, qemu-user) and
# runs them.   bash scripts/test.sh [pytest args]
# VENV and TORCH_SPEC as in setup.sh: CI also runs the suite on the lowest torch we support.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=test bash scripts/setup.sh
bash scripts/data.sh  # the end-to-end trainer test runs on the real data set
# test_portable_build runs the package on CPUs without AVX-512, emulated by Debian's qemu-user, and
# compiles the CPU sources for aarch64 with Debian's cross compiler.
if ! { command -v qemu-x86_64 && command -v aarch64-linux-gnu-g++; } > /dev/null && command -v apt-get > /dev/null; then
  echo "fused_softmax: installing qemu-user and g++-aarch64-linux-gnu for the portability tests"
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq qemu-user g++-aarch64-linux-gnu > /dev/null
fi
# shellcheck disable=SC1091
source "${VENV:-.venv}/bin/activate"
# Run from tests/ so the installed package, not the source tree, is imported.
cd tests && python -m pytest -q -p no:cacheprovider "$@"
