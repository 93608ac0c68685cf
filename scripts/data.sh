#!/usr/bin/env bash
# Installs Fashion-MNIST from Debian's package dataset-fashion-mnist when it is not there yet
# (its files land in /usr/share/datasets/fashion-mnist, where the trainer looks).
set -euo pipefail
if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
if command -v apt-get > /dev/null; then
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq dataset-fashion-mnist > /dev/null
else
  echo "no apt-get here: get the data with 'fused-softmax-train --download' instead"
fi
