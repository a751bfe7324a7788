"""Shared fixtures: a small conv + BatchNorm network and its data.

The core tests need jax, optax and numpy only: Flax is imported lazily, by
``linen_nets()`` and the fixtures that call it, which skip their test where
Flax is not installed (the floor check, ``scripts/check_floors.sh``, runs the
core tests so).
"""

import importlib
import importlib.metadata
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import optax
import pytest

# Tests marked `multi_device` need several devices; every other test runs on one
# CPU device. The main pytest process has one; once the tests are collected it
# starts, in the background, one child pytest process that runs all the selected
# multi-device tests with MULTI_DEVICE_COUNT simulated CPU devices (`_DEVICES_ENV`
# set), and kills it (SIGKILL) if they run past their budget: a stuck XLA:CPU collective fails in minutes instead of
# holding the whole run (a thread blocked inside XLA ignores SIGINT and SIGTERM).
MULTI_DEVICE_COUNT = 8
_DEVICES_ENV = "SPARSEOPT_TEST_DEVICES"
_REPORT_ENV = "SPARSEOPT_TEST_REPORT"
# The child's budget per multi-device test, unless its marker gives another
# (`multi_device(timeout=S)`); a collective stuck for 2 minutes aborts the child
# with the call's name in its output before that.
MULTI_DEVICE_TIMEOUT_S = 240
IN_CHILD = int(os.environ.get(_DEVICES_ENV, "1")) > 1


def _jaxlib_version() -> tuple[int, ...]:
  v = importlib.metadata.version("jaxlib")
  return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def _multi_device_xla_flags(count: int) -> str:
  """XLA flags of a child process: ``count`` CPU devices, stuck collectives abort.

  An older jaxlib aborts on a flag it does not know, so each timeout is passed
  only from a jaxlib known to have it (checked: 0.8.0 has the first two, not the
  third).
  """
  flags = [f"--xla_force_host_platform_device_count={count}"]
  if _jaxlib_version() >= (0, 8, 0):
    flags += [
        "--xla_cpu_collective_call_warn_stuck_timeout_seconds=30",
        "--xla_cpu_collective_call_terminate_timeout_seconds=120",
    ]
  if _jaxlib_version() >= (0, 10, 2):
    flags.append("--xla_cpu_collective_timeout_seconds=120")
  return " ".join(flags)


def pytest_collection_modifyitems(config, items):
  """In the main process, multi-device tests come last, when the child that
  runs them has had the whole run to finish; each one's time limit covers the
  child."""
  del config
  if IN_CHILD:
    return
  group = [i for i in items if i.get_closest_marker("multi_device")]
  items[:] = [i for i in items if not i.get_closest_marker("multi_device")]
  items.extend(group)
  total = sum(map(_budget, group))
  for item in group:
    item.add_marker(pytest.mark.timeout(total + 120))


def _budget(item) -> int:
  """Seconds a multi-device test may take in its child."""
  marker = item.get_closest_marker("multi_device")
  return marker.kwargs.get("timeout", MULTI_DEVICE_TIMEOUT_S)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
  """Runs a multi-device test as its module's child process reported it."""
  if IN_CHILD or not pyfuncitem.get_closest_marker("multi_device"):
    return None
  results, how, output = _child_results(pyfuncitem)
  result = results.get(pyfuncitem.nodeid)
  if result is None:
    pytest.fail(
        f"the {MULTI_DEVICE_COUNT}-device child process {how} before this"
        f" test reported; the end of its output:\n{output[-6000:]}",
        pytrace=False,
    )
  if result["outcome"] == "skipped":
    pytest.skip(result["message"])
  if result["outcome"] == "failed":
    pytest.fail(
        f"in the {MULTI_DEVICE_COUNT}-device child process:\n"
        + result["message"],
        pytrace=False,
    )
  return True


def pytest_collection_finish(session):
  """Starts the multi-device child as soon as the tests are known.

  The main process runs its single-device tests on about one core meanwhile,
  so the child's minute overlaps them instead of adding to the run; the tests
  it reports wait for it (`_child_results`).
  """
  # Under pytest-xdist each worker collects every test: a worker starts the
  # child only if it is given a multi-device test.
  if IN_CHILD or session.config.option.collectonly or _XDIST_WORKER:
    return
  _start_child(session)


_CHILD = []
_XDIST_WORKER = "PYTEST_XDIST_WORKER" in os.environ


def _start_child(session):
  group = [i for i in session.items if i.get_closest_marker("multi_device")]
  if group and not _CHILD:
    _CHILD.append(
        _Child(
            session.config,
            [i.nodeid for i in group],
            sum(map(_budget, group)),
            max(map(_budget, group)),
        )
    )


def _child_results(item):
  """The child's results, waiting for it the first time (`_Child.wait`)."""
  _start_child(item.session)
  return _CHILD[0].wait()


class _Child:
  """``pytest nodeids`` on MULTI_DEVICE_COUNT devices, started in the background.

  One child for every selected multi-device test: each child pays for starting
  Python, JAX and Flax (about 6 s). ``budget``: seconds from its start to its
  SIGKILL; ``per_test``: the child's own limit of each test (pytest-timeout).
  """

  def __init__(self, config, nodeids, budget, per_test):
    fd, self._report = tempfile.mkstemp(
        prefix="sparseopt-multi-device-", suffix=".jsonl"
    )
    os.close(fd)
    env = dict(os.environ)
    env.update({
        "XLA_FLAGS": _multi_device_xla_flags(MULTI_DEVICE_COUNT),
        _DEVICES_ENV: str(MULTI_DEVICE_COUNT),
        _REPORT_ENV: self._report,
    })
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-o",
        "addopts=",
        "-o",
        f"timeout={per_test}",
        *nodeids,
    ]
    # Output to a file, not a pipe: nobody reads it until the child ends.
    self._output = tempfile.TemporaryFile(mode="w+")
    self._deadline = time.monotonic() + budget
    self._budget = budget
    self._result = None
    # A session of its own: a kill reaches whatever the tests started too.
    self._proc = subprocess.Popen(
        cmd,
        cwd=config.rootpath,
        env=env,
        stdout=self._output,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )

  def wait(self):
    """(results by node id, how the child ended, its output)."""
    if self._result is None:
      self._result = self._finish()
    return self._result

  def _finish(self):
    proc = self._proc
    try:
      proc.wait(timeout=max(1.0, self._deadline - time.monotonic()))
      how = f"exited with status {proc.returncode}"
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
      how = f"was killed (SIGKILL) after its budget of {self._budget} s"
    self._output.seek(0)
    output = self._output.read()
    self._output.close()
    results = {}
    with open(self._report) as f:
      for line in f:
        row = json.loads(line)
        # A failed setup or teardown outranks a passed call.
        if results.get(row["nodeid"], {}).get("outcome") != "failed":
          results[row["nodeid"]] = row
    os.remove(self._report)
    return results, how, output

  def kill(self):
    """Ends a child nobody waited for (the run stopped early)."""
    if self._result is None:
      if self._proc.poll() is None:
        os.killpg(self._proc.pid, signal.SIGKILL)
      self._proc.wait()
      self._output.close()
      os.remove(self._report)


def pytest_sessionfinish(session):
  del session
  for child in _CHILD:
    child.kill()


def pytest_runtest_logreport(report):
  """In a child, appends each test's outcome to the file its parent reads."""
  path = os.environ.get(_REPORT_ENV)
  if not IN_CHILD or not path:
    return
  if report.when != "call" and report.outcome == "passed":
    return
  if report.outcome == "skipped" and isinstance(report.longrepr, tuple):
    message = report.longrepr[2]
  else:
    message = report.longreprtext
  with open(path, "a") as f:
    f.write(
        json.dumps({
            "nodeid": report.nodeid,
            "outcome": report.outcome,
            "message": message,
        })
        + "\n"
    )


# Many tests compile the same programs (a run and its resumed half, one arm per seed):
# a session-wide persistent cache compiles each once.
jax.config.update(
    "jax_compilation_cache_dir", tempfile.mkdtemp(prefix="sparseopt-jax-cache-")
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
# The main process compiles a few hundred small programs (every eager op is one)
# and runs each a few times: LLVM's optimisation of them costs more than it
# saves (measured on 2 cores: the default run took 11:33 with it, 9:28 without).
# JAX's own switch for this; the programs' HLO is unchanged. Not in the
# multi-device child: it compares 8 devices with 1 against spreads measured
# with the optimised code users run.
if not IN_CHILD:
  jax.config.update("jax_disable_most_optimizations", True)


def linen_nets():
  """``tests/linen_nets.py`` (Flax linen models); skips the caller without Flax."""
  pytest.importorskip("flax")
  return importlib.import_module("linen_nets")


def __getattr__(name):
  # `from conftest import SmallConvNet` still works (and skips without Flax).
  if name == "SmallConvNet":
    return linen_nets().SmallConvNet
  raise AttributeError(f"module 'conftest' has no attribute {name!r}")


BN_PAIRS = {
    "Conv_0/kernel": "BatchNorm_0",
    "Conv_1/kernel": "BatchNorm_1",
    "Dense_0/kernel": None,
}


@pytest.fixture(scope="session")
def small_net():
  model = linen_nets().SmallConvNet()
  x = jax.random.normal(jax.random.PRNGKey(1), (32, 8, 8, 3))
  y = jax.random.randint(jax.random.PRNGKey(2), (32,), 0, 10)
  variables = model.init(jax.random.PRNGKey(0), x)
  return model, variables, (x, y)


def make_train_step(model, tx, sparse=True):
  """A jitted step (params, batch_stats, opt_state, batch) -> (..., grads), as a user writes it."""
  import sparseopt_jax as so

  def loss_fn(params, batch_stats, x, y):
    logits, new_vars = model.apply(
        {"params": params, "batch_stats": batch_stats},
        x,
        train=True,
        mutable=["batch_stats"],
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, new_vars["batch_stats"]

  @jax.jit
  def step(params, batch_stats, opt_state, batch):
    x, y = batch
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch_stats, x, y
    )
    updates, opt_state = tx.update(
        grads, opt_state, params, batch_stats=batch_stats
    )
    if sparse:
      params, opt_state = so.apply_updates(params, updates, opt_state)
    else:
      params = optax.apply_updates(params, updates)
    return params, batch_stats, opt_state, loss, grads

  return step


def leaf_max_abs(a, b) -> dict:
  """Per leaf path of ``a``, the largest absolute difference from ``b``."""
  import sparseopt_jax as so

  return {
      so.tree.path_str(p): float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
      for (p, x), y in zip(
          jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)
      )
  }


def entries_differing(a, b) -> int:
  """How many entries of two trees of the same shape differ."""
  return sum(
      int(np.sum(np.asarray(x) != np.asarray(y)))
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )
