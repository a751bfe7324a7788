"""sparsity_summary and skew_slope."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparseopt_jax as so


def test_summary_reports_sparsity_densities_and_growing_exploration():
  params = {
      "a": {"kernel": jax.random.normal(jax.random.PRNGKey(0), (64, 32))},
      "b": {
          "kernel": jax.random.normal(jax.random.PRNGKey(1), (3, 3, 8, 16)),
          "bias": jnp.zeros(16),
      },
  }
  tx = optax.chain(
      so.sparseopt(
          0.9,
          distribution="uniform",
          update_every=1,
          end_step=20,
          topology="set",
      ),
      optax.sgd(0.1),
  )
  state = tx.init(params)
  params = so.apply_masks(params, state)
  first = so.sparsity_summary(state)
  assert first["exploration"] == pytest.approx(1 - first["sparsity"])
  for i in range(6):
    grads = jax.tree.map(lambda x, i=i: jnp.ones_like(x) * (i + 1), params)
    params, state = so.apply_updates(params, *tx.update(grads, state, params))
  summary = so.sparsity_summary(state)
  assert set(summary["leaves"]) == {"a/kernel", "b/kernel"}
  a = summary["leaves"]["a/kernel"]
  assert a["size"] == 2048 and a["active"] == round(0.1 * 2048)
  assert a["density_min"] <= a["density_median"] <= a["density_max"]
  m = np.asarray(so.get_masks(state)["a"]["kernel"])
  assert a["density_max"] == pytest.approx(m.mean(0).max())
  assert summary["sparsity"] == pytest.approx(0.9, abs=1e-3)
  assert summary["exploration"] > first["exploration"] + 0.05
  assert summary["density_spread"] > 0


def test_exploration_state_costs_an_eighth_of_a_byte_per_weight():
  params = {"w": jnp.zeros((100, 37))}
  state = so.topology_update(
      "rigl", sparsity=0.9, update_every=5, end_step=10
  ).init(params)
  assert state.masks["w"].dtype == jnp.bool_ and state.masks["w"].nbytes == 3700
  assert state.ever_active["w"].nbytes == -(-3700 // 8)


def test_skew_slope_recovers_a_planted_power_law():
  d = np.array([0.1, 0.2, 0.4, 0.8, 1.0])
  fan_in = 40
  keep = np.round(d * fan_in).astype(int)
  mask = jnp.asarray(np.arange(fan_in)[:, None] < keep[None])
  grads = jnp.ones((fan_in, 5)) * jnp.asarray(d) ** -0.5
  slope = so.leaf_skew_slope(grads, mask)
  assert float(slope) == pytest.approx(-0.5, abs=1e-5)
  assert np.isnan(float(so.leaf_skew_slope(grads, jnp.ones((fan_in, 5), bool))))
  jitted = jax.jit(so.leaf_skew_slope)(grads, mask)
  assert float(jitted) == pytest.approx(-0.5, abs=1e-5)
