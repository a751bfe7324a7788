#!/usr/bin/env bash
# Install what the library, its tests and its main job need: a venv in .venv with the
# package and its test, lint and docs extras, and Debian's Fashion-MNIST files (the offline default data).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "note: install Debian's dataset-fashion-mnist (or pass --data-dir) for the offline data" >&2
  fi
fi
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[train,test,lint,docs]'
