"""Sharded params and optimizer state on 8 simulated CPU devices (a child process of
conftest's runs these tests)."""

import contextlib
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import entries_differing, leaf_max_abs, linen_nets
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sparseopt_jax as so

pytestmark = pytest.mark.multi_device

AUTO = jax.sharding.AxisType.Auto
STEPS, UPDATE_EVERY, END_STEP = 20, 8, 18  # mask updates at steps 8 and 16
# Before the first mask update, how far a sharded run's param may land from the
# unsharded one, as a fraction of the param leaf's own change over those steps.
REORDERED_SUM_TOLERANCE = 1e-3
# How many of the mask entries the updates moved may come out otherwise.
NEAR_TIE_FRACTION = 0.02


def _tx():
  return optax.chain(
      so.sparseopt(
          0.8,
          distribution="erk",
          update_every=UPDATE_EVERY,
          end_step=END_STEP,
          seed=5,
      ),
      optax.sgd(0.05, momentum=0.9),
  )


def _setup():
  model = linen_nets().SmallConvNet(features=16)
  x = jax.random.normal(jax.random.PRNGKey(1), (16, 8, 8, 3))
  y = jax.random.randint(jax.random.PRNGKey(2), (16,), 0, 10)
  variables = model.init(jax.random.PRNGKey(0), x)
  return model, variables, (x, y)


def _kernel_spec(path, leaf):
  """Every conv kernel's output axis over 'model'; everything else replicated."""
  return (
      P(None, None, None, "model")
      if path.startswith("Conv") and leaf.ndim == 4
      else P()
  )


def _make_step(model, tx):
  def loss_fn(params, batch_stats, x, y):
    logits, new_vars = model.apply(
        {"params": params, "batch_stats": batch_stats},
        x,
        train=True,
        mutable=["batch_stats"],
    )
    return (
        optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(),
        new_vars,
    )

  def step(params, batch_stats, opt_state, batch, mask_update):
    (_, new_vars), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch_stats, *batch
    )
    updates, opt_state = tx.update(
        grads, opt_state, params, mask_update=mask_update
    )
    params, opt_state = so.apply_updates(
        params, updates, opt_state, mask_update=mask_update
    )
    return params, new_vars["batch_stats"], opt_state

  return step


def _train(step, params, stats, opt_state, batch):
  """(params, opt_state) after STEPS steps, and the params before the first mask update."""
  for i in range(STEPS):
    flag = so.is_mask_update_step(
        i, update_every=UPDATE_EVERY, end_step=END_STEP
    )
    if i == UPDATE_EVERY:
      assert flag
      before_update = jax.device_get(params)
    params, stats, opt_state = step(params, stats, opt_state, batch, flag)
  return params, opt_state, before_update


def test_tree_map_params_derives_state_shardings_of_a_sparseopt_chain():
  """The pod-scale pattern from optax's docs, on a chain holding SparseOpt."""
  mesh = jax.make_mesh((8,), ("model",), axis_types=(AUTO,))
  _, variables, _ = _setup()
  params = variables["params"]
  replicated = NamedSharding(mesh, P())
  param_shardings = jax.tree_util.tree_map_with_path(
      lambda p, x: NamedSharding(mesh, _kernel_spec(so.tree.path_str(p), x)),
      params,
  )
  tx = _tx()
  shapes = jax.eval_shape(tx.init, params)
  ssh = optax.tree_utils.tree_map_params(
      tx,
      lambda p, s: s,
      shapes,
      param_shardings,
      transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, NamedSharding),
  )
  state = jax.jit(tx.init, out_shardings=ssh)(params)
  # The momentum follows the params; the packed exploration bits are not taken for params.
  assert (
      state[1][0].trace["Conv_1"]["kernel"].sharding
      == param_shardings["Conv_1"]["kernel"]
  )
  for bits in jax.tree.leaves(state[0].topology.ever_active):
    assert bits.sharding.is_fully_replicated
  chex.assert_trees_all_equal(
      so.get_masks(state), so.get_masks(tx.init(params))
  )


def test_sharded_rigl_matches_the_unsharded_run():
  """RigL on 2 (data) x 4 (model) devices computes what it does unsharded.

  The sharded sums (BatchNorm statistics, the gradient's mean, convolutions) add
  in another order; each step amplifies the last-bit differences by a
  CPU-dependent amount, and a mask update can turn them into other choices among
  near-tied weights, after which a param may differ by a whole weight. So: before
  the first mask update each param leaf is within REORDERED_SUM_TOLERANCE of its
  own change, and after two updates at most NEAR_TIE_FRACTION of the mask
  entries the updates moved come out otherwise.
  """
  model, variables, batch = _setup()
  params, stats = variables["params"], variables["batch_stats"]
  tx = _tx()
  step = _make_step(model, tx)

  # Unsharded reference.
  state = tx.init(params)
  _, ref_state, ref_before = _train(
      jax.jit(step, static_argnums=4),
      so.apply_masks(params, state),
      stats,
      state,
      batch,
  )

  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AUTO, AUTO))
  replicated = NamedSharding(mesh, P())
  param_sh = jax.tree_util.tree_map_with_path(
      lambda p, x: NamedSharding(mesh, _kernel_spec(so.tree.path_str(p), x)),
      params,
  )
  state_sh = so.state_shardings(tx, params, param_sh, replicated)
  state = jax.jit(tx.init, out_shardings=state_sh)(params)
  masks = so.get_masks(state)
  assert masks["Conv_1"]["kernel"].sharding == param_sh["Conv_1"]["kernel"]
  assert not masks["Conv_1"]["kernel"].sharding.is_fully_replicated
  assert state[0].topology.density_factors["Conv_1"][
      "kernel"
  ].sharding.spec == P("model")
  stats_sh = jax.tree.map(lambda _: replicated, stats)
  batch_sh = (NamedSharding(mesh, P("data")), NamedSharding(mesh, P("data")))
  sharded_step = jax.jit(
      step,
      static_argnums=4,
      in_shardings=(param_sh, stats_sh, state_sh, batch_sh),
      out_shardings=(param_sh, stats_sh, state_sh),
  )
  params_s = jax.device_put(so.apply_masks(params, state), param_sh)
  out_params, out_state, out_before = _train(
      sharded_step,
      params_s,
      jax.device_put(stats, stats_sh),
      state,
      jax.device_put(batch, batch_sh),
  )

  assert out_params["Conv_1"]["kernel"].sharding == param_sh["Conv_1"]["kernel"]
  change = leaf_max_abs(ref_before, so.apply_masks(params, tx.init(params)))
  diff = leaf_max_abs(ref_before, out_before)
  worst = max(diff, key=lambda k: diff[k] / max(change[k], 1e-30))
  assert diff[worst] <= REORDERED_SUM_TOLERANCE * change[worst], (
      worst,
      diff[worst],
      change[worst],
  )
  moved = entries_differing(
      so.get_masks(ref_state), so.get_masks(tx.init(params))
  )
  differing = entries_differing(
      so.get_masks(out_state), so.get_masks(ref_state)
  )
  assert moved > 100  # the updates moved weights: the masks say something
  assert differing <= NEAR_TIE_FRACTION * moved

  # The ordinary step's optimizer part needs no collective at all: every op is
  # element-wise on leaves sharded alike (masks and factors with their params).
  def opt_part(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params, mask_update=False)
    return so.apply_updates(params, updates, opt_state, mask_update=False)

  hlo = (
      jax.jit(
          opt_part,
          in_shardings=(param_sh, state_sh, param_sh),
          out_shardings=(param_sh, state_sh),
      )
      .lower(params_s, out_state, params_s)
      .compile()
      .as_text()
  )
  assert "all-gather" not in hlo and "all-reduce" not in hlo


@pytest.mark.parametrize("topology", ["rigl", "set"])
def test_explicitly_sharded_params_update_their_masks(topology):
  mesh = jax.make_mesh(
      (8,), ("model",), axis_types=(jax.sharding.AxisType.Explicit,)
  )
  params = {"w": jax.random.normal(jax.random.PRNGKey(0), (12, 16))}
  tx = optax.chain(
      so.sparseopt(
          0.75,
          distribution="uniform",
          topology=topology,
          update_every=1,
          end_step=10,
      ),
      optax.sgd(0.1, momentum=0.9),
  )
  state = tx.init(params)
  params = so.apply_masks(params, state)
  grads = {"w": jax.random.normal(jax.random.PRNGKey(1), (12, 16))}
  expected = None
  for explicit in (False, True):
    p, g, s = params, grads, state
    with jax.set_mesh(mesh) if explicit else contextlib.nullcontext():
      if explicit:
        sh = NamedSharding(mesh, P(None, "model"))
        p, g = jax.device_put(p, sh), jax.device_put(g, sh)
        s = jax.tree.map(
            lambda x, sh=sh: jax.device_put(x, sh)
            if x.shape == (12, 16)
            else x,
            s,
        )
      step = jax.jit(functools.partial(_opt_step, tx))
      for _ in range(3):
        p, s = step(p, s, g)
    if expected is None:
      expected = (p, so.get_masks(s))
  assert not jnp.array_equal(so.get_masks(s)["w"], so.get_masks(state)["w"])
  np.testing.assert_array_equal(so.get_masks(s)["w"], expected[1]["w"])
  np.testing.assert_allclose(p["w"], expected[0]["w"], rtol=1e-6)
  assert int(so.get_masks(s)["w"].sum()) == 48


def _opt_step(tx, p, s, g):
  updates, s = tx.update(g, s, p, mask_update=True)
  return so.apply_updates(p, updates, s, mask_update=True)
