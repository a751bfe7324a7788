"""Skew correction: the -0.5 slope BatchNorm creates, and both correction modes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import linen_nets

import sparseopt_jax as so


def _varied_density_mask(shape, seed, low=0.05, high=1.0):
  """Neuron i keeps a fraction d_i of its fan-in, d_i log-uniform in [low, high]."""
  rng = np.random.default_rng(seed)
  fan_in = int(np.prod(shape[:-1]))
  d = np.exp(rng.uniform(np.log(low), np.log(high), shape[-1]))
  keep = np.maximum(1, np.round(d * fan_in)).astype(int)
  scores = rng.random((fan_in, shape[-1]))
  ranks = scores.argsort(0).argsort(0)
  return jnp.asarray((ranks < keep[None]).reshape(shape))


@pytest.fixture(scope="module")
def conv_bn_grads():
  model = linen_nets().ConvBN()
  x = jax.random.normal(jax.random.PRNGKey(0), (64, 8, 8, 16))
  variables = model.init(jax.random.PRNGKey(1), x)
  params = variables["params"]
  masks = {
      "Conv_0": {
          "kernel": _varied_density_mask(params["Conv_0"]["kernel"].shape, 0)
      },
      "BatchNorm_0": {"scale": None, "bias": None},
  }
  params = so.apply_masks(params, masks)
  target = jax.random.normal(jax.random.PRNGKey(2), (64, 8, 8, 128))

  def loss(p):
    y, _ = model.apply(
        {"params": p, "batch_stats": variables["batch_stats"]},
        x,
        mutable=["batch_stats"],
    )
    return jnp.mean(jnp.square(jax.nn.relu(y) - target))

  return params, masks, jax.jit(jax.grad(loss))(params)


def test_raw_slope_is_minus_half_and_corrected_is_flat(conv_bn_grads):
  params, masks, grads = conv_bn_grads
  raw = float(so.skew_slope(grads, masks)["Conv_0/kernel"])
  tx = so.skew_correct("density")
  corrected_grads, _ = tx.update(grads, tx.init(params), params, masks=masks)
  corrected = float(so.skew_slope(corrected_grads, masks)["Conv_0/kernel"])
  assert -0.6 < raw < -0.4, raw
  assert abs(corrected) < 0.1, corrected


def test_slope_is_flat_without_batchnorm():
  k = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 16, 128))
  mask = _varied_density_mask(k.shape, 1)
  x = jax.random.normal(jax.random.PRNGKey(1), (64, 8, 8, 16))

  def loss(k):
    y = jax.lax.conv_general_dilated(
        x, k * mask, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return jnp.mean(jnp.square(y - 1.0))

  slope = float(so.skew_slope({"k": jax.grad(loss)(k)}, {"k": mask})["k"])
  assert abs(slope) < 0.15, slope


def test_density_factor_is_zero_for_empty_neurons_never_nan():
  d = jnp.array([0.0, 0.25, 0.5, 0.0])
  c = so.skew.density_factors(d)
  assert not jnp.any(jnp.isnan(c))
  np.testing.assert_allclose(
      c, [0, np.sqrt(0.25 / 0.1875), np.sqrt(0.5 / 0.1875), 0], rtol=1e-6
  )
  assert jnp.all(so.skew.density_factors(jnp.zeros(4)) == 0)


def test_bn_mode_reads_running_variance_and_falls_back_to_density():
  model = linen_nets().ConvBNDense()
  x = jax.random.normal(jax.random.PRNGKey(0), (16, 6, 6, 3))
  variables = model.init(jax.random.PRNGKey(1), x)
  params = variables["params"]
  # Make the running variances differ per channel.
  var = jnp.linspace(0.2, 3.0, 8)
  batch_stats = {"BatchNorm_0": {"mean": jnp.zeros(8), "var": var}}
  masks = so.random_masks(params, 0.6, seed=0)
  pairs = {"Conv_0/kernel": "BatchNorm_0", "Dense_0/kernel": None}
  tx = so.skew_correct("bn", masks=masks, bn_pairs=pairs)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  out, _ = jax.jit(lambda g, s, p, b: tx.update(g, s, p, batch_stats=b))(
      grads, state, params, batch_stats
  )
  v = np.asarray(var) + 1e-5
  np.testing.assert_allclose(
      out["Conv_0"]["kernel"][0, 0, 0], np.sqrt(v / v.mean()), rtol=1e-5
  )
  d = np.asarray(masks["Dense_0"]["kernel"].mean(axis=0))
  np.testing.assert_allclose(
      out["Dense_0"]["kernel"][0], np.sqrt(d / d.mean()), rtol=1e-5
  )
  np.testing.assert_array_equal(
      out["Dense_0"]["bias"], grads["Dense_0"]["bias"]
  )


def test_bn_mode_floors_dead_channels():
  params = {"k": jnp.ones((4, 3))}
  tx = so.skew_correct(
      "bn",
      masks={"k": jnp.ones((4, 3), bool)},
      bn_pairs={"k": "bn"},
      bn_floor=0.2,
  )
  out, _ = tx.update(
      {"k": jnp.ones((4, 3))},
      tx.init(params),
      params,
      batch_stats={"bn": {"var": jnp.array([0.0, 1.0, 2.0])}},
  )
  assert float(out["k"][0, 0]) == pytest.approx(0.2)


def test_bn_mode_end_to_end_in_sparseopt(small_net):
  from conftest import BN_PAIRS, make_train_step

  model, variables, batch = small_net
  tx = optax.chain(
      so.sparseopt(
          0.9, skew="bn", bn_pairs=BN_PAIRS, update_every=2, end_step=10
      ),
      optax.sgd(0.1, momentum=0.9),
  )
  step = make_train_step(model, tx)
  p, b = variables["params"], variables["batch_stats"]
  s = tx.init(p)
  p = so.apply_masks(p, s)
  losses = []
  for _ in range(6):
    p, b, s, loss, _ = step(p, b, s, batch)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
