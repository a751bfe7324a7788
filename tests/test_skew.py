"""Skew correction: the -0.5 slope BatchNorm creates, and both correction modes."""

import functools

import chex
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


def test_raw_slope_is_minus_half_and_the_density_correction_adds_exactly_half(
    conv_bn_grads,
):
  """BatchNorm after a sparse conv skews log rms(g_i) by -0.5 log d_i at init;
  the density stage's output, g_ij * sqrt(d_i / mean d), has the slope raw + 0.5
  (so about 0), measured on that output itself."""
  params, masks, grads = conv_bn_grads
  raw = float(so.skew_slope(grads, masks)["Conv_0/kernel"])
  tx = so.skew_correct("density")
  corrected_grads, _ = jax.jit(lambda g, s, p, m: tx.update(g, s, p, masks=m))(
      grads, tx.init(params), params, masks
  )
  # The factors, computed here from the mask: d_i = fraction of neuron i's fan-in kept.
  m = np.asarray(masks["Conv_0"]["kernel"])
  d = m.mean(axis=(0, 1, 2))
  c = np.sqrt(d / d.mean())
  g = np.asarray(grads["Conv_0"]["kernel"])
  np.testing.assert_allclose(
      np.where(m, corrected_grads["Conv_0"]["kernel"], 0.0),
      np.where(m, g * c, 0.0),
      rtol=1e-5,
      atol=1e-12,
  )
  chex.assert_trees_all_equal(
      corrected_grads["BatchNorm_0"], grads["BatchNorm_0"]
  )
  corrected = float(so.skew_slope(corrected_grads, masks)["Conv_0/kernel"])
  assert -0.6 < raw < -0.4, raw  # the skew BatchNorm creates
  assert corrected == pytest.approx(raw + 0.5, abs=1e-4), (raw, corrected)


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
  # Fan-in 4; neurons keep 0, 1, 2 and 0 weights: d = [0, 0.25, 0.5, 0].
  mask = np.zeros((4, 4), bool)
  mask[:1, 1] = mask[:2, 2] = True
  leaf = functools.partial(so.skew.mask_density_factors, neuron_axis=None)
  for xp in (np, jnp):
    c = np.asarray(leaf({"k": mask}, xp=xp)["k"])
    assert not np.any(np.isnan(c))
    np.testing.assert_allclose(
        c, [0, np.sqrt(0.25 / 0.1875), np.sqrt(0.5 / 0.1875), 0], rtol=1e-6
    )
    assert np.all(np.asarray(leaf({"k": mask & False}, xp=xp)["k"]) == 0)


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


def test_bn_mode_in_sparseopt_scales_by_the_running_variances(small_net):
  """End to end through sparseopt and a jitted train step: once training has
  made the BatchNorm running variances differ per channel, the chain's update
  is g_ij * max(0.1, sqrt((v_i + eps) / mean_j (v_j + eps))) on each
  BN-paired kernel (the density factor on the unpaired Dense kernel, g on the
  dense leaves): not the uncorrected chain's update."""
  from conftest import BN_PAIRS, make_train_step

  model, variables, batch = small_net
  sparse = so.sparseopt(
      0.9, skew="bn", bn_pairs=BN_PAIRS, update_every=2, end_step=10
  )
  tx = optax.chain(sparse, optax.sgd(0.1, momentum=0.9))
  step = make_train_step(model, tx)
  p, b = variables["params"], variables["batch_stats"]
  s = tx.init(p)
  p = so.apply_masks(p, s)
  losses = []
  for _ in range(6):
    p, b, s, loss, grads = step(p, b, s, batch)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]

  masks = so.get_masks(s)
  # The ordinary (no mask update) variant of the chain's first stage, as in use.
  update = jax.jit(functools.partial(sparse.update, mask_update=False))

  def expected_update(batch_stats):
    expected = jax.tree.map(np.asarray, grads)
    for conv, bn in (("Conv_0", "BatchNorm_0"), ("Conv_1", "BatchNorm_1")):
      v = np.asarray(batch_stats[bn]["var"], np.float64) + 1e-5
      c = np.maximum(0.1, np.sqrt(v / v.mean()))
      expected[conv]["kernel"] = np.where(
          masks[conv]["kernel"], expected[conv]["kernel"] * c, 0.0
      )
    dense_mask = np.asarray(masks["Dense_0"]["kernel"])
    d = dense_mask.mean(axis=0)
    expected["Dense_0"]["kernel"] = np.where(
        dense_mask, expected["Dense_0"]["kernel"] * np.sqrt(d / d.mean()), 0.0
    )
    return expected

  # The running variances after training (within about 1% of each other), and the
  # same spread over 0.001x..3x, so that the floor binds on the first channels.
  spread = jax.tree.map(lambda x: x, b)
  for bn in ("BatchNorm_0", "BatchNorm_1"):
    spread[bn]["var"] = b[bn]["var"] * jnp.linspace(0.001, 3.0, 16)
  for stats in (b, spread):
    out, _ = update(grads, s[0], p, batch_stats=stats)
    jax.tree.map(
        functools.partial(np.testing.assert_allclose, rtol=2e-5, atol=1e-9),
        jax.tree.map(np.asarray, out),
        expected_update(stats),
    )
  out, _ = update(grads, s[0], p, batch_stats=b)

  # The uncorrected chain on the same masks returns the masked raw gradient.
  plain = so.sparseopt(0.9, skew=None, masks=masks, update_every=2, end_step=10)
  plain_out, _ = plain.update(grads, plain.init(p), p)
  for conv in ("Conv_0", "Conv_1"):
    np.testing.assert_array_equal(
        plain_out[conv]["kernel"],
        np.where(masks[conv]["kernel"], grads[conv]["kernel"], 0.0),
    )
    assert not np.allclose(
        out[conv]["kernel"], plain_out[conv]["kernel"], rtol=1e-3, atol=0
    )
