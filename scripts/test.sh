#!/usr/bin/env bash
# Installs what the tests need (scripts/setup.sh, Fashion-MNIST, pytest) and runs them.
#   bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/data.sh  # the end-to-end trainer test runs on the real data set
# shellcheck disable=SC1091
source .venv/bin/activate
python -m pip install --quiet pytest hypothesis
# Run from tests/ so the installed package, not the source tree, is imported.
cd tests && python -m pytest -q -p no:cacheprovider "$@"
