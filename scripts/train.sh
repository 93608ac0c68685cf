#!/usr/bin/env bash
# Installs everything (scripts/setup.sh, Fashion-MNIST from Debian's package) and trains d2l's
# softmax regression with the fused loss.   bash scripts/train.sh [trainer options]
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=train bash scripts/setup.sh
bash scripts/data.sh
# shellcheck disable=SC1091
source .venv/bin/activate
# The installed command, not `python -m fused_softmax.train`: from this directory that would import the
# source tree, which has no built extension (pip installed it into .venv), and train on the slow fallback.
fused-softmax-train "$@"
