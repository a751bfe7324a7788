"""Shared fixtures: a small conv + BatchNorm network and its data."""

import os

# Several simulated CPU devices for the data-parallel tests; must be set before JAX starts.
# The simulated devices share two cores, so a collective may wait on a starved peer for
# longer than XLA's default 40 s before aborting the process: give it ten minutes.
os.environ.setdefault(
    "XLA_FLAGS",
    " ".join([
        "--xla_force_host_platform_device_count=8",
        "--xla_cpu_collective_call_warn_stuck_timeout_seconds=120",
        "--xla_cpu_collective_call_terminate_timeout_seconds=600",
        "--xla_cpu_collective_timeout_seconds=600",
    ]),
)

import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest

# Many tests compile the same programs (a run and its resumed half, one arm per seed):
# a session-wide persistent cache compiles each once.
jax.config.update(
    "jax_compilation_cache_dir", tempfile.mkdtemp(prefix="sparseopt-jax-cache-")
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


class SmallConvNet(nn.Module):
  """conv -> BN -> relu -> conv -> BN -> relu -> pool -> dense: two sparse convs, a sparse head."""

  features: int = 16
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = True):
    for _ in range(2):
      x = nn.Conv(self.features, (3, 3), use_bias=False)(x)
      x = nn.BatchNorm(
          use_running_average=not train, momentum=0.9, epsilon=1e-5
      )(x)
      x = nn.relu(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


BN_PAIRS = {
    "Conv_0/kernel": "BatchNorm_0",
    "Conv_1/kernel": "BatchNorm_1",
    "Dense_0/kernel": None,
}


@pytest.fixture(scope="session")
def small_net():
  model = SmallConvNet()
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
