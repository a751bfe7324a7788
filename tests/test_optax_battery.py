"""optax's generic optimizer checks, run on chain(sparseopt(...), inner) over a table of
inner optimizers, as optax runs them on its own (alias_test, _conditionality_test).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparseopt_jax as so

INNER = {
    "sgd": lambda lr: optax.sgd(lr),
    "sgd_momentum": lambda lr: optax.sgd(lr, momentum=0.9, nesterov=True),
    "adam": lambda lr: optax.adam(lr),
    "adamw": lambda lr: optax.adamw(lr, weight_decay=1e-2),
    "lion": lambda lr: optax.lion(lr * 0.1),
    "rmsprop": lambda lr: optax.rmsprop(lr),
    "adafactor": lambda lr: optax.adafactor(lr),
}


# The default run takes three representative inner optimizers; the whole table is
# marked slow (`pytest -m slow`), to keep the default run near its time budget.
FAST = ("sgd_momentum", "adamw", "lion")
TABLE = [
    name if name in FAST else pytest.param(name, marks=pytest.mark.slow)
    for name in sorted(INNER)
]


def _sparse(inner, lr=0.05):
  return optax.chain(
      so.sparseopt(
          0.5, distribution="uniform", update_every=2, end_step=20, seed=1
      ),
      INNER[inner](lr),
  )


def _params(dtype=jnp.float32):
  return {
      "w": (jnp.arange(48).reshape(8, 6) / 48 - 0.4).astype(dtype),
      "b": jnp.linspace(-1, 1, 6).astype(dtype),
  }


def _grads(params, i):
  return jax.tree.map(
      lambda x: jnp.cos(x * (i + 1) + 0.3).astype(x.dtype), params
  )


def _jit_step(tx, **extra):
  """``(params, state, grads) -> (params, state)``, jitted as a training loop's."""
  return jax.jit(
      lambda p, s, g: so.apply_updates(p, *tx.update(g, s, p, **extra))
  )


def _run(tx, params, steps=5, **extra):
  state = tx.init(params)
  params = so.apply_masks(params, state)
  step = _jit_step(tx, **extra)
  for i in range(steps):
    params, state = step(params, state, _grads(params, i))
  return params, state


def _no_drift(params, state):
  so.check_sparsity(params, state)


@pytest.mark.parametrize("inner", TABLE)
def test_extra_args_are_accepted_and_ignored(inner):
  tx = _sparse(inner)
  p1, _ = _run(tx, _params())
  p2, s2 = _run(tx, _params(), unrelated=jnp.ones(3), batch_stats=None)
  chex.assert_trees_all_equal(p1, p2)
  _no_drift(p2, s2)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32", "float64"])
@pytest.mark.parametrize("inner", TABLE)
def test_updates_and_state_keep_their_dtypes(inner, dtype):
  with jax.enable_x64(dtype == "float64"):
    params = _params(jnp.dtype(dtype))
    tx = _sparse(inner)
    state0 = tx.init(params)
    updates, state1 = jax.jit(tx.update)(_grads(params, 0), state0, params)
    assert all(u.dtype == jnp.dtype(dtype) for u in jax.tree.leaves(updates))
    # The state keeps its tree, shapes and dtypes from init to update (no retrace).
    chex.assert_trees_all_equal_structs(state0, state1)
    chex.assert_trees_all_equal_shapes_and_dtypes(state0, state1)
    p, s = _run(tx, params, steps=3)
    assert all(x.dtype == jnp.dtype(dtype) for x in jax.tree.leaves(p))
    _no_drift(p, s)


@pytest.mark.parametrize("inner", TABLE)
def test_inject_hyperparams_around_the_whole_chain(inner):
  tx = optax.inject_hyperparams(
      lambda learning_rate: _sparse(inner, learning_rate)
  )(learning_rate=0.05)
  p, s = _run(tx, _params())
  _no_drift(p, s)
  p_plain, _ = _run(_sparse(inner), _params())
  chex.assert_trees_all_close(p, p_plain, rtol=1e-5, atol=1e-6)
  s.hyperparams["learning_rate"] = jnp.asarray(
      0.0
  )  # the injected value is the one used
  p_frozen, _ = so.apply_updates(p, *tx.update(_grads(p, 9), s, p))
  chex.assert_trees_all_equal(p_frozen, p)


@pytest.mark.parametrize("inner", TABLE)
def test_gradient_accumulation_equals_the_mean_gradient(inner):
  k = 3
  accumulated = optax.MultiSteps(_sparse(inner), every_k_schedule=k)
  plain = _sparse(inner)
  params = _params()
  s_acc, s_plain = accumulated.init(params), plain.init(params)
  p_acc = p_plain = so.apply_masks(params, s_plain)
  step_acc, step_plain = _jit_step(accumulated), _jit_step(plain)
  for step in range(4):
    micro = [_grads(p_plain, 10 * step + i) for i in range(k)]
    for g in micro:
      p_acc, s_acc = step_acc(p_acc, s_acc, g)
    mean = jax.tree.map(lambda *g: sum(g) / k, *micro)
    p_plain, s_plain = step_plain(p_plain, s_plain, mean)
  chex.assert_trees_all_close(p_acc, p_plain, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_equal(so.get_masks(s_acc), so.get_masks(s_plain))
  _no_drift(p_acc, s_acc)


@pytest.mark.parametrize("inner", TABLE)
def test_apply_if_finite_skips_a_nan_step_whole(inner):
  tx = optax.apply_if_finite(_sparse(inner), max_consecutive_errors=3)
  params, state = _run(
      tx, _params(), steps=3
  )  # the next step (3) is not an update step
  bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan), _grads(params, 7))
  p, s = jax.jit(lambda p, s, g: so.apply_updates(p, *tx.update(g, s, p)))(
      params, state, bad
  )
  chex.assert_trees_all_equal(p, params)
  chex.assert_trees_all_equal(so.get_masks(s), so.get_masks(state))
  assert int(s.notfinite_count) == 1


@pytest.mark.parametrize("inner", TABLE)
def test_a_bare_parabola_minimises_as_with_the_inner_optimizer_alone(inner):
  """optax's parabola problem: one vector of params, so every leaf is dense."""
  target = jnp.array([1.0, -2.0, 0.5])
  loss = lambda x: jnp.sum((x - target) ** 2)
  results = []
  for tx in (_sparse(inner, 0.1), INNER[inner](0.1)):

    def step(x, state, tx=tx):
      updates, state = tx.update(jax.grad(loss)(x), state, x)
      return optax.apply_updates(x, updates), state

    x, state = jnp.zeros(3), tx.init(jnp.zeros(3))
    step = jax.jit(step)
    for _ in range(300):
      x, state = step(x, state)
    results.append(x)
  chex.assert_trees_all_equal(results[0], results[1])
  if inner in (
      "sgd",
      "sgd_momentum",
      "adam",
      "adamw",
  ):  # converge at this rate and budget
    np.testing.assert_allclose(results[0], target, atol=5e-2)
