#!/usr/bin/env bash
# The main job: a short real comparison on the offline default data (Fashion-MNIST,
# ResNet-20, 90% ERK sparsity, RigL), the uncorrected baseline against SparseOpt,
# same seed. Writes runs/{baseline,sparseopt}/metrics.jsonl and runs/compare.png;
# earlier results there move to runs/earlier-<time>/.
# Extra arguments go to both runs, e.g. `bash scripts/compare.sh --steps 600 --seed 1`.
set -euo pipefail
cd "$(dirname "$0")/.."
train=${SPARSEOPT_TRAIN:-.venv/bin/sparseopt-train}
[ -n "${SPARSEOPT_TRAIN:-}" ] || [ -x "$train" ] || bash scripts/setup.sh
out=${RUNS_DIR:-runs}
# Earlier results are kept: moved aside into a folder named for the time they moved.
earlier=()
for f in baseline sparseopt compare.png; do [ -e "$out/$f" ] && earlier+=("$out/$f"); done
if [ ${#earlier[@]} -gt 0 ]; then
  keep="$out/earlier-$(date +%Y%m%d-%H%M%S)"
  mkdir -p "$keep" && mv "${earlier[@]}" "$keep/"
  echo "compare.sh: the earlier results are now in $keep" >&2
fi
for arm in baseline:none sparseopt:density; do
  name=${arm%%:*} skew=${arm##*:}
  "$train" --preset fashion_mnist_resnet20 --workdir "$out/$name" --skew "$skew" "$@"
done
"$train" plot "$out/baseline" "$out/sparseopt" --out "$out/compare.png" \
  --labels "RigL 90% (baseline)" "RigL 90% + SparseOpt (density)"
