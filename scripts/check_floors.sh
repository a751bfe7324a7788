#!/usr/bin/env bash
# The version floors of pyproject.toml, tested: installs each declared floor of
# the core and of the [test] extra ("jax>=0.8" -> jax==0.8 and jaxlib==0.8)
# into a venv of its own and runs the core tests there, without Flax (their
# Flax-model tests skip).
#
#   scripts/check_floors.sh           # the core: jax, optax, numpy
#   scripts/check_floors.sh --flax    # also the [flax] extra's floor: the core
#                                     # and Flax bridge tests, Flax installed
#
# FLOOR_VENV sets where the venvs go (default /tmp/sparseopt-floor, and
# /tmp/sparseopt-floor-flax for --flax); an existing one is reused. The core
# run downloads about 150 MB the first time (pip caches it), the Flax run
# about 100 MB more; each takes several minutes on two cores.
# `pytest -m slow tests/test_packaging.py` runs the core check.
set -euo pipefail
cd "$(dirname "$0")/.."
WITH_FLAX=0
[ "${1:-}" = "--flax" ] && WITH_FLAX=1
PY=${PYTHON:-python3}
VENV=${FLOOR_VENV:-/tmp/sparseopt-floor}
[ "$WITH_FLAX" = 1 ] && VENV="$VENV-flax"

# name==floor for each core dependency (and the [flax] extra with --flax);
# jaxlib is pinned with jax, and Flax's own jax floor wins where it is higher.
pins() {
  "$1" - "$WITH_FLAX" <<'EOF'
import importlib.metadata, re, sys, tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
reqs = project["dependencies"] + project["optional-dependencies"]["test"]
if sys.argv[1] == "1":
  reqs += project["optional-dependencies"]["flax"]
floors = {}
for r in reqs:
  m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9.]+)\s*", r.split(";")[0])
  if not m:
    sys.exit(f"no floor declared for {r!r}: write it as name>=version")
  floors[m[1].lower()] = m[2]
if "flax" in floors:
  try:  # installed (--no-deps) by the caller: read its own jax floor
    for r in importlib.metadata.requires("flax"):
      m = re.fullmatch(r"jax\s*>=\s*([0-9.]+)", r.split(";")[0].strip())
      if m:
        v = lambda s: tuple(map(int, s.split(".")))
        floors["jax"] = max(floors["jax"], m[1], key=v)
  except importlib.metadata.PackageNotFoundError:
    pass
floors["jaxlib"] = floors["jax"]
print(" ".join(f"{n}=={v}" for n, v in sorted(floors.items())))
EOF
}

# The core test files, as listed in tests/test_packaging.py.
core_tests() {
  "$PY" - <<'EOF'
import ast
tree = ast.parse(open("tests/test_packaging.py").read())
for node in tree.body:
  target = node.targets[0] if isinstance(node, ast.Assign) else None
  if isinstance(target, ast.Name) and target.id == "CORE_TESTS":
    print(" ".join(f"tests/{f}" for f in ast.literal_eval(node.value)))
EOF
}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip -q --disable-pip-version-check)
if [ "$WITH_FLAX" = 1 ]; then
  FLAX_PIN=$(pins "$PY" | tr ' ' '\n' | grep '^flax==')
  nice "${PIP[@]}" install --no-deps "$FLAX_PIN"
fi
PINS=$(pins "$VENV/bin/python")
echo "floors: $PINS"
# shellcheck disable=SC2086  # the pins are separate words
nice "${PIP[@]}" install $PINS
"$VENV/bin/python" -m pip list 2>/dev/null \
  | grep -E -i '^(jax|jaxlib|optax|numpy|flax|chex|pytest|ml.dtypes|scipy) '

TESTS=$(core_tests)
if [ "$WITH_FLAX" = 1 ]; then
  TESTS="$TESTS tests/test_flax_linen.py tests/test_flax_nnx.py"
elif "$VENV/bin/python" -c "import flax" 2>/dev/null; then
  echo "error: $VENV has Flax; the core floors are checked without it" >&2
  exit 1
fi
# The checkout itself, not an installed copy: the venv holds only the deps.
# shellcheck disable=SC2086
PYTHONPATH="$PWD" nice "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
  -m "not slow" $TESTS
