"""Packaging: the core stays light, and never reaches into the training program.

``pip install sparseopt_jax`` installs jax, optax and numpy only (the extras
bring Flax and the training program's stack); these tests pin that:

* the optax transform, built and stepped in a fresh interpreter, loads no heavy
  module, and the Flax bridge names load Flax on first use only;
* the core's source imports nothing beyond jax, optax, numpy and the standard
  library, and nothing in the library imports ``sparseopt_jax.training``;
* the core tests import and collect with Flax unavailable, and the training
  program's tests skip without its [train] extra;
* (slow) the declared version floors pass the core tests
  (``scripts/check_floors.sh``).
"""

import ast
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sparseopt_jax"
# Subpackages allowed to import beyond the core's dependencies.
FLAX_SUPPORT, TRAINING = PACKAGE / "flax_support", PACKAGE / "training"
CORE_DEPS = {"jax", "optax", "numpy", "sparseopt_jax"}
HEAVY = {
    "tensorflow",
    "tensorflow_datasets",
    "orbax",
    "matplotlib",
    "flax",
    "grain",
    "tqdm",
    "chex",
}
# The test files of the core: they must import without Flax (the Flax-model
# tests in them skip). The bridge and training tests are not listed.
CORE_TESTS = (
    "test_attention.py",
    "test_budgets.py",
    "test_diagnostics.py",
    "test_optax_battery.py",
    "test_packaging.py",
    "test_schedule.py",
    "test_sharding.py",
    "test_skew.py",
    "test_structure.py",
    "test_transforms.py",
    "test_validation.py",
)


def _run_python(code: str, timeout: float = 240) -> str:
  """Runs ``code`` in a fresh interpreter that imports this checkout."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      [str(ROOT), *filter(None, [env.get("PYTHONPATH")])]
  )
  out = subprocess.run(
      [sys.executable, "-c", textwrap.dedent(code)],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=timeout,
  )
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  return out.stdout


def _optax_requires_chex() -> bool:
  """optax < 0.2.6 itself imports chex: then chex is optax's, not the core's."""
  requires = importlib.metadata.requires("optax") or []
  return any(r.split(";")[0].strip().startswith("chex") for r in requires)


def test_optax_transform_loads_no_heavy_module_and_flax_only_on_a_bridge_name():
  out = _run_python(f"""
      import json, sys
      import jax.numpy as jnp
      import optax
      import sparseopt_jax as so

      heavy = {sorted(HEAVY)!r}
      loaded = lambda: sorted(
          m for m in sys.modules if m.split(".")[0] in heavy)
      tx = optax.chain(so.sparseopt(0.9, end_step=1000), optax.sgd(0.1))
      params = {{"dense": {{"kernel": jnp.ones((8, 16)), "bias": jnp.zeros(16)}}}}
      state = tx.init(params)
      updates, state = tx.update(params, state, params)
      params = so.apply_updates(params, updates, state)[0]
      after_core = loaded()
      try:
        bridge = so.SparseOptimizer.__module__
      except ImportError as e:  # no Flax here: the name says what is missing
        bridge = f"ImportError: {{e}}"
      print(json.dumps(dict(
          after_core=after_core,
          after_bridge=loaded(),
          bridge=bridge,
          masked_zeros=int((params["dense"]["kernel"] == 0).sum()),
          training=sorted(
              m for m in sys.modules if m.startswith("sparseopt_jax.training")),
      )))
  """)
  got = json.loads(out.strip().splitlines()[-1])
  allowed = {"chex"} if _optax_requires_chex() else set()
  assert {m.split(".")[0] for m in got["after_core"]} <= allowed, got[
      "after_core"
  ]
  # The step ran: 90% of the kernel is pruned.
  assert got["masked_zeros"] >= 0.85 * 8 * 16
  if importlib.util.find_spec("flax") is None:
    assert got["bridge"].startswith("ImportError") and "flax" in got["bridge"]
  else:
    # The lazy bridge works: the name resolves and brings Flax with it.
    assert got["bridge"] == "sparseopt_jax.flax_support.nnx"
    assert "flax" in got["after_bridge"]
  assert got["training"] == []


def _imports(
    path: pathlib.Path, root: pathlib.Path = ROOT
) -> list[tuple[int, str]]:
  """(line, absolute module) of every import in ``path``, nested ones too."""
  tree = ast.parse(path.read_text(), str(path))
  package = ".".join(path.relative_to(root).with_suffix("").parts)
  if path.name != "__init__.py":
    package = package.rpartition(".")[0]
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found += [(node.lineno, a.name) for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = package.rsplit(".", node.level - 1)[0]
        module = f"{base}.{node.module}" if node.module else base
      else:
        module = node.module
      found.append((node.lineno, module))
      # `from sparseopt_jax import training` names a submodule.
      found += [(node.lineno, f"{module}.{a.name}") for a in node.names]
  return found


def _library_files():
  return sorted(PACKAGE.rglob("*.py"))


def _is_core(path: pathlib.Path) -> bool:
  return not (
      path.is_relative_to(FLAX_SUPPORT) or path.is_relative_to(TRAINING)
  )


def test_core_source_imports_only_jax_optax_numpy_and_the_standard_library():
  bad = []
  for path in filter(_is_core, _library_files()):
    for line, module in _imports(path):
      top = module.split(".")[0]
      if top not in CORE_DEPS and top not in sys.stdlib_module_names:
        bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
  assert not bad, "\n".join(bad)
  assert any(_is_core(p) for p in _library_files())


def test_no_library_module_imports_the_training_program():
  bad = []
  for path in _library_files():
    if path.is_relative_to(TRAINING):
      continue
    rel = path.relative_to(ROOT)
    for line, module in _imports(path):
      if module.startswith("sparseopt_jax.training"):
        bad.append(f"{rel}:{line} imports {module}")
    if _is_core(path):
      # Lazy imports by name (importlib) too: the core names the bridges only.
      for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
          if node.value.startswith("sparseopt_jax.training"):
            bad.append(f"{rel}:{node.lineno} names {node.value}")
  assert not bad, "\n".join(bad)


def _import_cycle(graph: dict[str, set[str]]) -> list[str]:
  """A cycle of the module graph as a list of modules, or [] if it has none."""
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt) :] + [nxt]
      if nxt not in state and (found := visit(nxt)):
        return found
    state[node] = "done"
    stack.pop()
    return []

  for node in sorted(graph):
    if node not in state and (found := visit(node)):
      return found
  return []


def test_core_modules_import_each_other_without_a_cycle():
  """Nested (function-level) imports count: a lazy import is a cycle hidden."""
  core = {
      ".".join(p.relative_to(ROOT).with_suffix("").parts): p
      for p in filter(_is_core, _library_files())
      if p.name != "__init__.py"
  }
  graph = {
      name: {m for _, m in _imports(path) if m in core and m != name}
      for name, path in core.items()
  }
  assert len(graph) > 10
  assert _import_cycle(graph) == []
  # The check sees a cycle where there is one.
  assert _import_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [
      "a",
      "b",
      "c",
      "a",
  ]


def test_import_scan_sees_relative_and_nested_imports(tmp_path):
  # The scan is only as good as its parser: a relative import of the training
  # program, nested in a function, is found under its absolute name.
  pkg = tmp_path / "sparseopt_jax"
  pkg.mkdir()
  mod = pkg / "mod.py"
  mod.write_text("def f():\n  from .training import train\n  import flax\n")
  assert _imports(mod, tmp_path) == [
      (2, "sparseopt_jax.training"),
      (2, "sparseopt_jax.training.train"),
      (3, "flax"),
  ]


# The test files of the training program: they skip without the [train] extra.
TRAINING_TESTS = ("test_input.py", "test_train.py", "test_workdir.py")

# Runs pytest (argv[2:]) with every import of the comma-separated top-level
# modules of argv[1] failing, as where they are not installed.
_WITHOUT_MODULES = """
import sys
import pytest

BLOCKED = sys.argv[1].split(",")

def blocked(name):
  return name.split(".")[0] in BLOCKED

class Block:
  def find_spec(self, name, path=None, target=None):
    if blocked(name):
      raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    return None

sys.meta_path.insert(0, Block())
for name in [m for m in sys.modules if blocked(m)]:
  del sys.modules[name]
sys.exit(pytest.main(sys.argv[2:]))
"""


def _collect_without(modules, test_files):
  """``pytest --collect-only`` of ``test_files`` with ``modules`` unavailable."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      [str(ROOT), *filter(None, [env.get("PYTHONPATH")])]
  )
  args = [
      "--collect-only",
      "-q",
      "-rs",
      "-p",
      "no:cacheprovider",
      *(str(ROOT / "tests" / f) for f in test_files),
  ]
  return subprocess.run(
      [sys.executable, "-c", _WITHOUT_MODULES, ",".join(modules), *args],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=240,
  )


def test_core_tests_collect_without_flax():
  """The core tests import and collect where Flax is not installed."""
  out = _collect_without(["flax"], CORE_TESTS)
  text = out.stdout + out.stderr
  assert out.returncode == 0, text[-4000:]
  # Only the Flax attention block's module skips as a whole.
  ids = [line for line in out.stdout.splitlines() if "::" in line]
  for name in CORE_TESTS:
    if name != "test_attention.py":
      assert any(i.startswith(f"tests/{name}::") for i in ids), name


def test_training_tests_skip_without_the_train_extra():
  """Without grain (of the [train] extra) the training tests skip, not error."""
  out = _collect_without(["grain"], TRAINING_TESTS)
  text = out.stdout + out.stderr
  # 5: no test collected, which is what three skipped modules leave.
  assert out.returncode == 5, text[-4000:]
  assert "error" not in text.lower(), text[-4000:]
  for name in TRAINING_TESTS:
    assert re.search(
        rf"SKIPPED \[1\] tests/{name}:\d+: could not import 'grain'", text
    ), (name, text[-4000:])


@pytest.mark.slow
def test_declared_floors_pass_the_core_tests():
  """Builds a venv with the floors of pyproject.toml and runs the core tests.

  Downloads jax/jaxlib/optax/numpy at their floors (about 150 MB, cached by
  pip) and takes several minutes: see ``scripts/check_floors.sh``.
  """
  out = subprocess.run(
      ["bash", str(ROOT / "scripts" / "check_floors.sh")],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=3600,
  )
  assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]


_BLOCK = """
import sys

class Block:
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] == sys.argv[1]:
      raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Block())
"""


@pytest.mark.parametrize(
    "module, code, message",
    [
        (
            "flax",
            "import sparseopt_jax as so; so.SparseOptimizer",
            (
                "sparseopt_jax.SparseOptimizer needs Flax: pip install"
                " 'sparseopt-jax[flax]'"
            ),
        ),
        (
            "grain",
            "from sparseopt_jax.training import main; sys.exit(main([]))",
            (
                "sparseopt-train: error: needs the [train] extra (grain is not"
                " installed): pip install 'sparseopt-jax[train]'"
            ),
        ),
    ],
)
def test_a_missing_extra_is_named_with_its_install_command(
    module, code, message
):
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      [str(ROOT), *filter(None, [env.get("PYTHONPATH")])]
  )
  out = subprocess.run(
      [sys.executable, "-c", _BLOCK + code, module],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert out.returncode != 0 and message in out.stderr, out.stderr[-3000:]
