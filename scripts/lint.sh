#!/usr/bin/env bash
# The style checks CI runs first: ruff (lint and format) on the Python, clang-format (.clang-format) on
# the C++ and CUDA. Installs both (PyPI) into the environment of scripts/setup.sh, or into $VENV.
#   bash scripts/lint.sh          # check
#   bash scripts/lint.sh --fix    # rewrite the files instead
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet "ruff==0.17.6" "clang-format==23.1.5"
cpp=$(git ls-files 'csrc/*.cpp' 'csrc/*.h' 'csrc/*.cu' 'csrc/*.cuh' 'tests/*.cpp' 'tests/*.h')
if [ "${1:-}" = --fix ]; then
  "$venv/bin/ruff" check --fix .
  "$venv/bin/ruff" format .
  "$venv/bin/clang-format" -i $cpp
else
  "$venv/bin/ruff" check .  # one command per line: set -e does not stop inside an && list
  "$venv/bin/ruff" format --check .
  "$venv/bin/clang-format" --dry-run --Werror $cpp
  echo "fused_softmax: lint clean (ruff, clang-format)"
fi
