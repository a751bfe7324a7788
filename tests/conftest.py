"""Shared fixtures: a small conv + BatchNorm network and its data.

The core tests need jax, optax and numpy only: Flax is imported lazily, by
``linen_nets()`` and the fixtures that call it, which skip their test where
Flax is not installed (the floor check, ``scripts/check_floors.sh``, runs the
core tests so).
"""

import importlib
import importlib.metadata
import os
import re
import tempfile


def _jaxlib_version() -> tuple[int, ...]:
  v = importlib.metadata.version("jaxlib")
  return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


# Several simulated CPU devices for the data-parallel tests; must be set before JAX starts.
# The simulated devices share two cores, so a collective may wait on a starved peer for
# longer than XLA's default 40 s before aborting the process: give it ten minutes.
# An older jaxlib aborts on a flag it does not know, so each timeout is passed only
# from a jaxlib known to have it (checked: 0.8.0 has the first two, not the third).
_XLA_FLAGS = ["--xla_force_host_platform_device_count=8"]
if _jaxlib_version() >= (0, 8, 0):
  _XLA_FLAGS += [
      "--xla_cpu_collective_call_warn_stuck_timeout_seconds=120",
      "--xla_cpu_collective_call_terminate_timeout_seconds=600",
  ]
if _jaxlib_version() >= (0, 10, 2):
  _XLA_FLAGS.append("--xla_cpu_collective_timeout_seconds=600")
os.environ.setdefault("XLA_FLAGS", " ".join(_XLA_FLAGS))

import jax  # noqa: E402  (after XLA_FLAGS)
import optax  # noqa: E402
import pytest  # noqa: E402

# Many tests compile the same programs (a run and its resumed half, one arm per seed):
# a session-wide persistent cache compiles each once.
jax.config.update(
    "jax_compilation_cache_dir", tempfile.mkdtemp(prefix="sparseopt-jax-cache-")
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


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
