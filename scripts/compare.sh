#!/usr/bin/env bash
# The main job: a short real comparison on the offline default data (Fashion-MNIST,
# ResNet-20, 90% ERK sparsity, RigL), the uncorrected baseline against SparseOpt,
# same seed. Writes runs/{baseline,sparseopt}/metrics.jsonl and runs/compare.png.
# Extra arguments go to both runs, e.g. `bash scripts/compare.sh --steps 600 --seed 1`.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/sparseopt-train ] || bash scripts/setup.sh
out=${RUNS_DIR:-runs}
for arm in baseline:none sparseopt:density; do
  name=${arm%%:*} skew=${arm##*:}
  rm -rf "$out/$name"
  .venv/bin/sparseopt-train --preset fashion_mnist_resnet20 --workdir "$out/$name" --skew "$skew" "$@"
done
.venv/bin/sparseopt-train plot "$out/baseline" "$out/sparseopt" --out "$out/compare.png" \
  --labels "RigL 90% (baseline)" "RigL 90% + SparseOpt (density)"
