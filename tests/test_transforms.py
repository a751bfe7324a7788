"""The composite and its stages: equivalences, the zero invariant, counts, jit."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import make_train_step

import sparseopt_jax as so


def _tree_equal(a, b):
  return all(
      jax.tree.leaves(
          jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, b)
      )
  )


def _random_like(tree, seed):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(
      treedef,
      [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)],
  )


@pytest.mark.parametrize("topology", ["rigl", "set", "static"])
@pytest.mark.parametrize("skew", ["density", None])
def test_zero_sparsity_equals_plain_sgd(small_net, topology, skew):
  model, variables, batch = small_net
  sgd = optax.sgd(0.1, momentum=0.9, nesterov=True)
  tx = optax.chain(
      so.sparseopt(
          0.0, topology=topology, skew=skew, update_every=5, end_step=15
      ),
      sgd,
  )
  dense_step = make_train_step(model, sgd, sparse=False)
  sparse_step = make_train_step(model, tx)
  p1 = p2 = variables["params"]
  b1 = b2 = variables["batch_stats"]
  s1, s2 = sgd.init(p1), tx.init(p2)
  for _ in range(20):
    p1, b1, s1, _, _ = dense_step(p1, b1, s1, batch)
    p2, b2, s2, _, _ = sparse_step(p2, b2, s2, batch)
  chex.assert_trees_all_close(p1, p2, rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(b1, b2, rtol=1e-6, atol=1e-7)


def test_first_update_is_density_corrected_masked_sgd():
  lr = 0.05
  w = jnp.ones((3, 3, 4, 6))
  params = {"conv": {"kernel": w, "bias": jnp.zeros(6)}}
  # Neuron i keeps the first k_i of its 36 incoming weights: densities 1/36 .. 36/36.
  keep = np.array([1, 4, 9, 18, 27, 36])
  fan_in = np.arange(36).reshape(3, 3, 4, 1)
  m = jnp.asarray(fan_in < keep[None, None, None, :])
  masks = {"conv": {"kernel": m, "bias": None}}
  tx = optax.chain(
      so.sparseopt(0.9, masks=masks, topology="static"),
      optax.sgd(lr, momentum=0.9),
  )
  state = tx.init(params)
  grads = _random_like(params, 3)
  updates, _ = tx.update(grads, state, params)
  d = keep / 36
  c = np.sqrt(d / d.mean())
  expected = -lr * np.asarray(grads["conv"]["kernel"]) * np.asarray(m) * c
  np.testing.assert_allclose(
      updates["conv"]["kernel"], expected, rtol=1e-6, atol=1e-8
  )
  np.testing.assert_allclose(
      updates["conv"]["bias"], -lr * grads["conv"]["bias"], rtol=1e-6
  )


def _assert_state_zero_where_pruned(state):
  """Check every float state leaf at a sparse param's path; return how many were checked."""
  masks = {
      so.tree.path_str(p): m
      for p, m in jax.tree_util.tree_leaves_with_path(so.get_masks(state))
  }
  checked = 0
  for p, x in jax.tree_util.tree_leaves_with_path(state):
    path = so.tree.path_str(p)
    for suffix, m in masks.items():
      if (
          path.endswith(suffix)
          and x.shape == m.shape
          and jnp.issubdtype(x.dtype, jnp.floating)
      ):
        assert not jnp.any((x != 0) & ~m), path
        checked += 1
  return checked


def _counts(masks):
  return [int(jnp.sum(m)) for m in jax.tree.leaves(masks)]


@pytest.mark.parametrize("inner", ["sgd_momentum", "adamw"])
def test_rigl_keeps_pruned_weights_zero_and_counts_exact(small_net, inner):
  model, variables, batch = small_net
  opt = {
      "sgd_momentum": optax.sgd(0.05, momentum=0.9),
      "adamw": optax.adamw(1e-3, weight_decay=1e-2),
  }[inner]
  tx = optax.chain(
      so.sparseopt(
          0.8,
          distribution="erk",
          topology="rigl",
          update_every=10,
          end_step=375,
          seed=1,
      ),
      opt,
  )
  step = make_train_step(model, tx)
  params, stats = variables["params"], variables["batch_stats"]
  state = tx.init(params)
  params = so.apply_masks(params, state)
  masks0 = so.get_masks(state)
  target = _counts(masks0)
  shapes = {
      p: x.shape
      for p, x in zip(so.tree.leaf_paths(params), jax.tree.leaves(params))
  }
  expected = so.active_counts(
      {k: s for k, s in shapes.items() if len(s) >= 2},
      so.layer_sparsities(
          {k: s for k, s in shapes.items() if len(s) >= 2}, 0.8, "erk"
      ),
  )
  assert target == list(expected.values())

  @jax.jit
  def violations(params, state):
    masks = so.get_masks(state)
    pruned = [
        jnp.sum((x != 0) & ~m)
        for m, x in zip(
            jax.tree.leaves(masks, is_leaf=so.tree.is_none),
            jax.tree.leaves(params),
        )
        if m is not None
    ]
    counts = jnp.stack([jnp.sum(m) for m in jax.tree.leaves(masks)])
    return sum(pruned), counts

  bad, counts, changed = [], [], 0
  prev = masks0
  for _ in range(500):
    params, stats, state, _, _ = step(params, stats, state, batch)
    b, c = violations(params, state)
    bad.append(b)
    counts.append(c)
    masks = so.get_masks(state)
    changed += int(not _tree_equal(prev, masks))
    prev = masks
  assert int(jnp.sum(jnp.stack(bad))) == 0
  assert np.all(np.asarray(jnp.stack(counts)) == np.asarray(target)[None])
  # Mask updates at 10, 20, ..., 370; a late one may move nothing once k rounds to 0.
  assert changed >= 30
  # Every params-shaped optimizer-state leaf is zero at pruned positions too.
  assert _assert_state_zero_where_pruned(state) >= 3


@pytest.mark.parametrize("grow_with", ["raw", "corrected"])
def test_composite_equals_stages_chained_by_hand(small_net, grow_with):
  model, variables, batch = small_net
  kw = dict(
      sparsity=0.85, distribution="uniform", update_every=5, end_step=40, seed=3
  )
  sgd = optax.sgd(0.05, momentum=0.9)
  composite = optax.chain(
      so.sparseopt(topology="rigl", skew="density", grow_with=grow_with, **kw),
      sgd,
  )
  skew = so.skew_correct("density")
  topo = so.topology_update("rigl", **kw)
  mask = so.mask()

  class Hand:

    @staticmethod
    def init(params):
      return (
          skew.init(params),
          topo.init(params),
          mask.init(params),
          sgd.init(params),
      )

    @staticmethod
    def update(grads, state, params, **extra):
      ss, ts, ms, os = state
      u, ss = skew.update(grads, ss, params, density_factors=ts.density_factors)
      u, ts = topo.update(
          u, ts, params, grow_grads=grads if grow_with == "raw" else None
      )
      u, ms = mask.update(u, ms, params, masks=ts.masks)
      u, os = sgd.update(u, os, params)
      return u, (ss, ts, ms, os)

  step_c = make_train_step(model, composite)
  step_h = make_train_step(model, Hand)
  pc = ph = variables["params"]
  bc = bh = variables["batch_stats"]
  sc, sh = composite.init(pc), Hand.init(ph)
  pc, ph = so.apply_masks(pc, sc), so.apply_masks(ph, sh[1])
  for _ in range(30):
    pc, bc, sc, _, _ = step_c(pc, bc, sc, batch)
    ph, bh, sh, _, _ = step_h(ph, bh, sh, batch)
  chex.assert_trees_all_equal(pc, ph)
  chex.assert_trees_all_equal(so.get_masks(sc), sh[1].masks)
  assert not _tree_equal(
      so.get_masks(sc), so.get_masks(composite.init(variables["params"]))
  )
  # The factors cached in the state are those of the masks after all the updates.
  chex.assert_trees_all_close(
      sc[0].topology.density_factors,
      so.skew.mask_density_factors(so.get_masks(sc), -1),
      rtol=1e-6,
  )


def test_grow_with_changes_the_grown_weights(small_net):
  model, variables, batch = small_net
  results = {}
  for grow_with in ("raw", "corrected"):
    tx = optax.chain(
        so.sparseopt(
            0.9,
            distribution="uniform",
            update_every=3,
            end_step=30,
            grow_with=grow_with,
            seed=0,
        ),
        optax.sgd(0.1),
    )
    step = make_train_step(model, tx)
    p, b = variables["params"], variables["batch_stats"]
    s = tx.init(p)
    p = so.apply_masks(p, s)
    for _ in range(4):
      p, b, s, _, _ = step(p, b, s, batch)
    results[grow_with] = so.get_masks(s)
  assert not _tree_equal(results["raw"], results["corrected"])


def test_topology_is_deterministic_for_a_seed_and_its_draws_follow_the_seed(
    small_net,
):
  """SET through a jitted train step: one seed gives the same masks every run;
  from the same initial masks, another seed gives other masks after the
  updates (its random growth and tie order are drawn from the seed, not only
  its initial masks)."""
  model, variables, batch = small_net

  def run(seed, masks=None):
    tx = optax.chain(
        so.sparseopt(
            0.9,
            topology="set",
            update_every=2,
            end_step=20,
            seed=seed,
            masks=masks,
        ),
        optax.sgd(0.1),
    )
    step = make_train_step(model, tx)
    p, b = variables["params"], variables["batch_stats"]
    s = tx.init(p)
    p = so.apply_masks(p, s)
    for _ in range(7):
      p, b, s, _, _ = step(p, b, s, batch)
    return so.get_masks(s)

  init = so.get_masks(
      so.sparseopt(0.9, topology="set", update_every=2, end_step=20).init(
          variables["params"]
      )
  )
  first = run(0, init)
  assert not _tree_equal(
      first, init
  )  # the updates at steps 2, 4, 6 moved weights
  assert _tree_equal(first, run(0, init))
  assert _tree_equal(first, run(0))  # seed 0's own initial masks are init
  assert not _tree_equal(first, run(1, init))


def test_grown_weights_start_at_zero_with_zero_moments():
  params = {"w": jax.random.normal(jax.random.PRNGKey(0), (32, 16))}
  tx = optax.chain(
      so.sparseopt(
          0.75,
          distribution="uniform",
          update_every=1,
          end_step=10,
          drop_fraction=0.5,
      ),
      optax.adam(1e-2),
  )
  state = tx.init(params)
  params = so.apply_masks(params, state)
  grads = {"w": jax.random.normal(jax.random.PRNGKey(1), (32, 16))}
  # Step 0 is an ordinary step (momentum builds up), step 1 updates the masks.
  updates, state = tx.update(grads, state, params)
  params, state = so.apply_updates(params, updates, state)
  old = so.get_masks(state)["w"]
  updates, state = tx.update(grads, state, params)
  params, state = so.apply_updates(params, updates, state)
  new = so.get_masks(state)["w"]
  grown, dropped = new & ~old, old & ~new
  assert int(grown.sum()) > 0 and int(grown.sum()) == int(dropped.sum())
  adam_state = state[1][0]
  for tree in (params, adam_state.mu, adam_state.nu):
    assert jnp.all(tree["w"][grown] == 0.0)
    assert jnp.all(tree["w"][dropped] == 0.0)


@pytest.mark.parametrize(
    "name",
    [
        "adamw",
        "inject_hyperparams_sgd",
        "lion",
        "masked_adam",
        "multi_transform",
    ],
)
def test_apply_updates_remasks_any_inner_state(name):
  params = {
      "a": {"kernel": jnp.ones((8, 12))},
      "b": {"kernel": jnp.ones((6, 4)), "bias": jnp.ones(4)},
  }
  opt = {
      "adamw": optax.adamw(1e-2),
      "inject_hyperparams_sgd": optax.inject_hyperparams(optax.sgd)(
          learning_rate=0.1, momentum=0.9
      ),
      "lion": optax.lion(1e-3),
      "masked_adam": optax.masked(
          optax.adam(1e-2),
          {"a": {"kernel": True}, "b": {"kernel": False, "bias": True}},
      ),
      "multi_transform": optax.multi_transform(
          {"x": optax.sgd(0.1, momentum=0.9), "y": optax.adam(1e-2)},
          {"a": {"kernel": "x"}, "b": {"kernel": "y", "bias": "x"}},
      ),
  }[name]
  tx = optax.chain(
      so.sparseopt(
          0.7,
          distribution="uniform",
          update_every=2,
          end_step=50,
          drop_fraction=0.5,
      ),
      opt,
  )
  state = tx.init(params)
  params = so.apply_masks(params, state)
  step = jax.jit(lambda p, s, g: so.apply_updates(p, *tx.update(g, s, p)))
  for i in range(9):
    grads = _random_like(params, i)
    params, state = step(params, state, grads)
  assert _assert_state_zero_where_pruned(state) >= 2
  assert not jnp.any(
      (params["a"]["kernel"] != 0) & ~so.get_masks(state)["a"]["kernel"]
  )


def test_no_retrace_over_50_steps_and_extra_kwargs_ignored(small_net):
  model, variables, batch = small_net
  tx = optax.chain(
      so.sparseopt(0.9, update_every=5, end_step=40),
      optax.sgd(0.1, momentum=0.9),
  )
  traces = []

  @jax.jit
  def step(params, state, grads):
    traces.append(1)
    updates, state = tx.update(
        grads, state, params, unknown_kwarg=3, batch_stats=None
    )
    return so.apply_updates(params, updates, state)

  params = variables["params"]
  state = tx.init(params)
  params = so.apply_masks(params, state)
  for i in range(50):
    params, state = step(params, state, _random_like(params, i))
  assert len(traces) == 1
  assert int(state[0].topology.step) == 50


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_works_in_the_params_dtype(dtype):
  params = {
      "conv": {
          "kernel": jnp.ones((3, 3, 8, 16), dtype),
          "bias": jnp.zeros(16, dtype),
      }
  }
  tx = optax.chain(
      so.sparseopt(0.9, distribution="uniform", update_every=1, end_step=10),
      optax.sgd(0.1, momentum=0.9),
  )
  state = tx.init(params)
  params = so.apply_masks(params, state)
  step = jax.jit(lambda p, s, g: so.apply_updates(p, *tx.update(g, s, p)))
  for i in range(4):
    grads = _random_like(params, i)
    updates, _ = tx.update(grads, state, params)
    assert updates["conv"]["kernel"].dtype == dtype
    params, state = step(params, state, grads)
  assert params["conv"]["kernel"].dtype == dtype
  m = so.get_masks(state)["conv"]["kernel"]
  assert m.dtype == jnp.bool_
  assert int(m.sum()) == round(0.1 * m.size)
  assert not jnp.any((params["conv"]["kernel"] != 0) & ~m)


def test_nnx_state_params():
  nnx = pytest.importorskip("flax.nnx")

  class Net(nnx.Module):

    def __init__(self, rngs):
      self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
      self.lin = nnx.Linear(8, 4, rngs=rngs)

  params = nnx.state(Net(nnx.Rngs(0)), nnx.Param)
  tx = optax.chain(
      so.sparseopt(0.8, distribution="erk", update_every=2, end_step=20),
      optax.sgd(0.1, momentum=0.9),
  )
  state = tx.init(params)
  params = so.apply_masks(params, state)
  step = jax.jit(lambda p, s, g: so.apply_updates(p, *tx.update(g, s, p)))
  for i in range(5):
    params, state = step(params, state, _random_like(params, i))
  summary = so.sparsity_summary(state)
  assert set(summary["leaves"]) == {"conv/kernel/value", "lin/kernel/value"}
  for p, m in jax.tree_util.tree_leaves_with_path(so.get_masks(state)):
    x = dict(
        (so.tree.path_str(q), v)
        for q, v in jax.tree_util.tree_leaves_with_path(params)
    )[so.tree.path_str(p)]
    assert not jnp.any((x != 0) & ~m)
  assert abs(summary["sparsity"] - 0.8) < 0.01


def test_mask_stage_alone_is_static_sparse_training():
  params = {"w": jnp.ones((10, 10)), "b": jnp.ones(10)}
  masks = so.random_masks(params, 0.6, seed=4)
  assert masks["b"] is None and int(masks["w"].sum()) == 40
  tx = optax.chain(so.mask(masks), optax.sgd(0.1, momentum=0.9))
  state = tx.init(params)
  params = so.apply_masks(params, state)
  for i in range(5):
    params, state = so.apply_updates(
        params, *tx.update(_random_like(params, i), state, params)
    )
  assert jnp.all(params["w"][~masks["w"]] == 0)
  assert jnp.all(params["w"][masks["w"]] != 1.0)
  chex.assert_trees_all_equal(so.get_masks(state), masks)


def test_skew_stage_alone_scales_with_fixed_masks():
  params = {"w": jnp.ones((4, 3))}
  m = jnp.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 0, 0]], bool)
  tx = so.skew_correct("density", masks={"w": m})
  state = tx.init(params)
  u, _ = tx.update({"w": jnp.ones((4, 3))}, state, params)
  d = np.array([4, 2, 1]) / 4
  np.testing.assert_allclose(
      u["w"], np.broadcast_to(np.sqrt(d / d.mean()), (4, 3)), rtol=1e-6
  )


def test_topology_stage_alone_is_uncorrected_rigl(small_net):
  model, variables, batch = small_net
  kw = dict(
      sparsity=0.9, distribution="uniform", update_every=4, end_step=30, seed=2
  )
  alone = optax.chain(so.topology_update("rigl", **kw), optax.sgd(0.1))
  composite = optax.chain(
      so.sparseopt(skew=None, topology="rigl", **kw), optax.sgd(0.1)
  )
  outs = []
  for tx in (alone, composite):
    step = make_train_step(model, tx)
    p, b = variables["params"], variables["batch_stats"]
    s = tx.init(p)
    p = so.apply_masks(p, s)
    for _ in range(10):
      p, b, s, _, _ = step(p, b, s, batch)
    outs.append((p, so.get_masks(s)))
  chex.assert_trees_all_equal(outs[0], outs[1])


def test_sparseopt_inside_one_multi_transform_branch():
  """Different optimizers for different leaf groups, SparseOpt in one branch only."""
  params = {
      "convs": {"kernel": jnp.ones((3, 3, 4, 8)), "bias": jnp.zeros(8)},
      "head": {"kernel": jnp.ones((8, 5))},
  }
  labels = {
      "convs": {"kernel": "sparse", "bias": "sparse"},
      "head": {"kernel": "dense"},
  }
  tx = optax.multi_transform(
      {
          "sparse": optax.chain(
              so.sparseopt(
                  0.75, distribution="uniform", update_every=2, end_step=20
              ),
              optax.sgd(0.1, momentum=0.9),
          ),
          "dense": optax.adam(1e-2),
      },
      labels,
  )
  state = tx.init(params)
  params = so.apply_masks(params, state)
  masks = so.get_masks(state)
  assert int(masks["convs"]["kernel"].sum()) == round(0.25 * 3 * 3 * 4 * 8)
  step = jax.jit(lambda p, s, g: so.apply_updates(p, *tx.update(g, s, p)))
  for i in range(7):
    params, state = step(params, state, _random_like(params, i))
  m = so.get_masks(state)["convs"]["kernel"]
  assert not jnp.array_equal(m, masks["convs"]["kernel"])
  assert not jnp.any((params["convs"]["kernel"] != 0) & ~m)
  assert bool(
      jnp.all(params["head"]["kernel"] != 1.0)
  )  # the dense branch trained
  assert _assert_state_zero_where_pruned(state) >= 1
  summary = so.sparsity_summary(state, params=params)
  assert (
      set(summary["leaves"]) == {"convs/kernel"}
      and summary["pruned_nonzero"] == 0
  )
