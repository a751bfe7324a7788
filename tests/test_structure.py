"""Structured sparsity: constant fan-in and N:M masks, kept exactly by RigL, SET and static."""

import contextlib
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sparseopt_jax as so
from sparseopt_jax import structure as structure_lib

UPDATE_EVERY, END_STEP, STEPS = 5, 250, 300
TOPOLOGIES = ["rigl", "set", "static"]
# The sparsity each structure runs at in these tests (N:M fixes it).
SPARSITY = {"fan_in": 0.8, "2:4": 0.5, "1:4": 0.75}


def _params():
  keys = jax.random.split(jax.random.PRNGKey(0), 2)
  return {
      "conv": {
          "kernel": jax.random.normal(keys[0], (3, 3, 8, 8)),
          "bias": jnp.zeros(8),
      },
      # Attention's query kernel (in, heads, head_dim): neurons are (head, head_dim).
      "query": {"kernel": jax.random.normal(keys[1], (8, 2, 4))},
  }


def _grads(params, i):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(
      jax.random.fold_in(jax.random.PRNGKey(7), i), len(leaves)
  )
  return jax.tree.unflatten(
      treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
  )


def _tx(topology, structure, inner, skew="density", **kw):
  opt = {
      "sgd_momentum": lambda: optax.sgd(0.05, momentum=0.9),
      "adamw": lambda: optax.adamw(1e-2, weight_decay=1e-2),
  }[inner]()
  return optax.chain(
      so.sparseopt(
          SPARSITY[structure],
          distribution="erk" if structure == "fan_in" else "uniform",
          topology=topology,
          update_every=UPDATE_EVERY,
          end_step=END_STEP,
          skew=skew,
          seed=3,
          structure=structure,
          **kw,
      ),
      opt,
  )


def _rows(path, m, structure):
  spec = structure_lib.parse(structure)
  return structure_lib.to_rows(
      m, structure_lib.layout(path, m.shape, spec, None)
  )


def _by_path(tree):
  return {
      so.tree.path_str(p): x
      for p, x in jax.tree_util.tree_leaves_with_path(
          tree, is_leaf=so.tree.is_none
      )
      if not so.tree.is_none(x)
  }


def _tree_equal(a, b):
  return all(
      bool(jnp.array_equal(x, y))
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


def _violations(params, state, per_row, structure):
  """(rows whose count is off, pruned weights that are not 0.0); jittable."""
  masks = _by_path(so.get_masks(state))
  values = _by_path(params)
  bad_rows = sum(
      jnp.sum(jnp.sum(_rows(p, m, structure), axis=1) != per_row[p])
      for p, m in masks.items()
  )
  pruned = sum(jnp.sum((values[p] != 0) & ~m) for p, m in masks.items())
  return bad_rows, pruned


def _pruned_state_entries(state):
  masks = _by_path(so.get_masks(state))
  bad = checked = 0
  for p, x in jax.tree_util.tree_leaves_with_path(state):
    path = so.tree.path_str(p)
    for suffix, m in masks.items():
      if (
          path.endswith(suffix)
          and x.shape == m.shape
          and jnp.issubdtype(x.dtype, jnp.floating)
      ):
        bad += int(jnp.sum((x != 0) & ~m))
        checked += 1
  return bad, checked


def _expected_per_row(structure, distribution="erk"):
  params = _params()
  shapes = so.tree.sparse_shapes(params, so.tree.default_sparse_filter)
  spec = structure_lib.parse(structure)
  if spec.kind == "n:m":
    return {p: spec.n for p in shapes}
  sparsities = so.layer_sparsities(shapes, SPARSITY[structure], distribution)
  return {
      p: min(
          structure_lib.layout(p, s, spec, None).row_len,
          max(
              1,
              round(
                  (1 - sparsities[p])
                  * structure_lib.layout(p, s, spec, None).row_len
              ),
          ),
      )
      for p, s in shapes.items()
  }


@pytest.mark.parametrize("structure", ["fan_in", "2:4", "1:4"])
def test_initial_masks_hold_the_structure_exactly(structure):
  params = _params()
  state = _tx("rigl", structure, "sgd_momentum").init(params)
  per_row = _expected_per_row(structure)
  masks = _by_path(so.get_masks(state))
  assert set(masks) == {"conv/kernel", "query/kernel"}
  for path, m in masks.items():
    counts = np.asarray(_rows(path, m, structure)).sum(axis=1)
    np.testing.assert_array_equal(counts, per_row[path], err_msg=path)
  # The budgets and the summary report the real (structured) counts.
  shapes = {p: m.shape for p, m in masks.items()}
  dist = "erk" if structure == "fan_in" else "uniform"
  counts = so.active_counts(
      shapes,
      so.layer_sparsities(shapes, SPARSITY[structure], dist),
      structure=structure,
  )
  summary = so.sparsity_summary(state)
  for path, m in masks.items():
    assert counts[path] == int(m.sum()) == summary["leaves"][path]["active"]
  assert summary["density_spread"] == 0.0
  if structure != "fan_in":
    assert summary["sparsity"] == SPARSITY[structure]
  # Drawn on the host: the same masks eagerly and under jit.
  chex.assert_trees_all_equal(
      so.get_masks(state),
      so.get_masks(
          jax.jit(_tx("rigl", structure, "sgd_momentum").init)(params)
      ),
  )


def test_n_m_groups_run_along_the_input_axis():
  """2:4 on a Dense (in, out) kernel groups rows 4i..4i+3 of each column; on an
  HWIO conv, 4 consecutive input channels of each (h, w, out)."""
  masks = so.random_masks(
      {"d": jnp.ones((8, 3)), "c": jnp.ones((2, 2, 8, 3))}, 0.5, structure="2:4"
  )
  d = np.asarray(masks["d"]).reshape(2, 4, 3)
  np.testing.assert_array_equal(d.sum(axis=1), 2)
  c = np.asarray(masks["c"]).reshape(2, 2, 2, 4, 3)
  np.testing.assert_array_equal(c.sum(axis=3), 2)


def _set_topology(state, **fields):
  """The chain's state with fields of its TopologyState replaced."""
  return (
      state[0]._replace(topology=state[0].topology._replace(**fields)),
      *state[1:],
  )


def _factors(state):
  return jax.tree.leaves(state[0].topology.density_factors)


# (topology, structure, inner optimizer, schedule form): the default run covers
# each topology, structure, optimizer and form at least once; -m slow runs the
# whole cross product.
_DEFAULT_RUNS = [
    ("rigl", "fan_in", "sgd_momentum", "in_graph"),
    ("set", "2:4", "adamw", "host"),
    ("static", "fan_in", "adamw", "in_graph"),
]
_RUNS = [
    pytest.param(
        *run,
        marks=() if run in _DEFAULT_RUNS else pytest.mark.slow,
        id="-".join(run),
    )
    for run in (
        (t, s, i, f)
        for t in TOPOLOGIES
        for s in ("fan_in", "2:4")
        for i in ("sgd_momentum", "adamw")
        for f in ("in_graph", "host")
    )
]


def _run_in_graph(tx, params, state, per_row, structure):
  """STEPS steps in one compiled scan; (params, state, mask updates that moved a
  weight, rows off their count, pruned weights not 0.0, factors not 1.0)."""

  def body(carry, i):
    params, state, moved = carry
    before = so.get_masks(state)
    updates, state = tx.update(_grads(params, i), state, params)
    params, state = so.apply_updates(params, updates, state)
    moved += jnp.any(
        jnp.stack([
            jnp.any(a != b)
            for a, b in zip(
                jax.tree.leaves(before), jax.tree.leaves(so.get_masks(state))
            )
        ])
    )
    rows, pruned = _violations(params, state, per_row, structure)
    off = sum(jnp.sum(f != 1.0) for f in _factors(state))
    return (params, state, moved), (rows, pruned, off)

  @jax.jit
  def run(params, state):
    (params, state, moved), counts = jax.lax.scan(
        body, (params, state, jnp.int32(0)), jnp.arange(STEPS)
    )
    return params, state, moved, *(jnp.sum(c) for c in counts)

  params, state, *counts = run(params, state)
  return params, state, [int(c) for c in counts]


def _run_host_scheduled(tx, params, state, per_row, structure):
  @functools.partial(jax.jit, static_argnums=3)
  def step(params, state, i, flag):
    updates, state = tx.update(
        _grads(params, i), state, params, mask_update=flag
    )
    params, state = so.apply_updates(params, updates, state, mask_update=flag)
    off = sum(jnp.sum(f != 1.0) for f in _factors(state))
    return params, state, (*_violations(params, state, per_row, structure), off)

  totals = np.zeros(3, int)
  moved = 0
  for i in range(STEPS):
    flag = so.is_mask_update_step(
        i, update_every=UPDATE_EVERY, end_step=END_STEP
    )
    before = so.get_masks(state)
    params, state, v = step(params, state, i, flag)
    totals += np.asarray(v)
    moved += flag and not _tree_equal(before, so.get_masks(state))
  return params, state, [moved, *totals.tolist()]


@pytest.mark.parametrize("topology, structure, inner, form", _RUNS)
def test_structure_kept_exactly_over_hundreds_of_steps(
    topology, structure, inner, form
):
  """Every row keeps its count at every step, pruned weights and their
  optimizer moments are exactly 0.0, every density factor is exactly 1.0, and
  RigL and SET do move the masks."""
  per_row = _expected_per_row(structure)
  tx = _tx(topology, structure, inner)
  params = _params()
  state = tx.init(params)
  params = so.apply_masks(params, state)
  masks0 = so.get_masks(state)
  run = _run_in_graph if form == "in_graph" else _run_host_scheduled
  params, state, (moved, bad_rows, pruned, off) = run(
      tx, params, state, per_row, structure
  )
  assert (bad_rows, pruned, off) == (0, 0, 0)
  bad, checked = _pruned_state_entries(state)
  assert bad == 0 and checked >= 2
  if topology == "static":
    assert moved == 0
    chex.assert_trees_all_equal(so.get_masks(state), masks0)
  else:
    # Updates at 5, 10, ..., 245; the last few may move nothing once k rounds to 0.
    assert moved >= 35, moved


def test_density_correction_is_exactly_the_identity_under_fan_in():
  """Constant fan-in: every c_i = sqrt(d_i / mean d) is exactly 1.0, on the host
  (init) and in XLA (after a mask update), so the skew stage returns its input
  unchanged, bit for bit."""
  params = _params()
  masks = so.get_masks(_tx("rigl", "fan_in", "sgd_momentum").init(params))
  stage = so.skew_correct("density", masks=masks)
  state = stage.init(params)
  for f in jax.tree.leaves(state.density_factors):
    np.testing.assert_array_equal(np.asarray(f), 1.0)
  grads = _grads(params, 0)
  updates, _ = stage.update(grads, state, params)
  chex.assert_trees_all_equal(updates, grads)
  factors = jax.jit(so.skew.mask_density_factors, static_argnums=1)(masks, None)
  for f in jax.tree.leaves(factors):
    np.testing.assert_array_equal(np.asarray(f), 1.0)


@pytest.mark.parametrize("structure", ["fan_in", "2:4"])
def test_corrected_and_uncorrected_short_runs_are_bit_identical_under_structure(
    structure,
):
  """Every neuron keeps the same count, so the density correction is exactly the
  identity: 20 jitted steps of RigL + SGD momentum with skew="density" and with
  skew=None give the same params and masks bit for bit, across mask updates
  (at steps 2, 4, ..., 14)."""
  results = []
  for skew in ("density", None):
    tx = optax.chain(
        so.sparseopt(
            SPARSITY[structure],
            distribution="uniform",
            update_every=2,
            end_step=16,
            drop_fraction=0.5,
            skew=skew,
            seed=3,
            structure=structure,
        ),
        optax.sgd(0.05, momentum=0.9),
    )
    params = _params()
    state = tx.init(params)
    params = so.apply_masks(params, state)
    masks0 = so.get_masks(state)
    step = jax.jit(
        lambda p, s, g, tx=tx: so.apply_updates(p, *tx.update(g, s, p))
    )
    for i in range(20):
      params, state = step(params, state, _grads(params, i))
    assert not _tree_equal(so.get_masks(state), masks0)  # the masks moved
    results.append((params, so.get_masks(state)))
  chex.assert_trees_all_equal(results[0], results[1])


@pytest.mark.slow  # 300 steps each; the short run above is the default check
@pytest.mark.parametrize("structure", ["fan_in", "2:4"])
def test_corrected_and_uncorrected_runs_are_identical_under_structure(
    structure,
):
  results = []
  for skew in ("density", None):
    tx = _tx("rigl", structure, "sgd_momentum", skew=skew)
    params = _params()
    state = tx.init(params)
    params = so.apply_masks(params, state)
    per_row = _expected_per_row(structure)
    params, state, _ = _run_in_graph(tx, params, state, per_row, structure)
    results.append((params, so.get_masks(state)))
  chex.assert_trees_all_equal(results[0], results[1])


def test_skew_slope_is_undefined_under_constant_fan_in():
  """Every neuron has the same density: the slope on log d_i is NaN, not a fit
  to the rounding noise of the variance of equal values."""
  grads = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 16, 32))
  slope = jax.jit(so.leaf_skew_slope)
  for seed in range(3):
    masks = so.random_masks({"w": grads}, 0.9, structure="fan_in", seed=seed)
    assert np.isnan(float(slope(grads, masks["w"])))
  unstructured = so.random_masks({"w": grads}, 0.9)["w"]
  assert np.isfinite(float(slope(grads, unstructured)))


@pytest.mark.parametrize("structure", ["2:4", "1:4", "3:8"])
def test_n_m_gives_every_neuron_density_n_over_m(structure):
  """Groups run along an input axis, inside one neuron's fan-in: every neuron,
  of a Dense, an HWIO conv, a q/k/v kernel (in, heads, head_dim) or an output
  projection (heads, head_dim, out), keeps exactly N/M, so the density
  correction's factors are all 1 as under fan_in."""
  n, m = (int(v) for v in structure.split(":"))
  params = {
      "dense": {"kernel": jnp.ones((16, 5))},
      "conv": {"kernel": jnp.ones((3, 3, 8, 6))},
      "attn": {
          "query": {"kernel": jnp.ones((16, 2, 3))},
          "out": {"kernel": jnp.ones((2, 8, 5))},
      },
  }
  tx = so.sparseopt(
      1 - n / m, topology="static", structure=structure, skew="density"
  )
  state = tx.init(params)
  for path, mask in _by_path(so.get_masks(state)).items():
    axes = so.tree.neuron_axes(path, mask.ndim)
    density = np.asarray(so.tree.neuron_density(mask, axes))
    np.testing.assert_array_equal(density, np.float32(n / m), err_msg=path)
  for f in jax.tree.leaves(state.topology.density_factors):
    np.testing.assert_array_equal(np.asarray(f), 1.0)
  grads = jax.tree.map(lambda x: jnp.full(x.shape, 0.3), params)
  updates, _ = tx.update(grads, state, params)
  masks = so.get_masks(state)
  chex.assert_trees_all_equal(
      updates, jax.tree.map(lambda g, k: jnp.where(k, g, 0.0), grads, masks)
  )


@pytest.mark.parametrize("structure", ["fan_in", "2:4"])
def test_ties_broken_by_seeded_keys_and_non_finite_steps_skipped(structure):
  """All |w| and |g| equal: which weights move is drawn from the state's key (the
  same for one seed, different across seeds), and every row keeps its count. A
  non-finite gradient moves no mask."""
  params = jax.tree.map(jnp.ones_like, _params())
  grads = jax.tree.map(jnp.ones_like, params)
  make = lambda seed: so.sparseopt(
      SPARSITY[structure],
      distribution="uniform",
      update_every=1,
      end_step=10,
      seed=seed,
      skew=None,
      structure=structure,
  )
  tx = make(0)
  start = tx.init(params)
  update = jax.jit(tx.update)
  out = []
  for seed in (0, 0, 1):
    # The same masks for every seed, at an update step: only the tie keys differ.
    state = start._replace(
        topology=start.topology._replace(
            key=make(seed).init(params).topology.key, step=jnp.int32(1)
        )
    )
    _, state = update(grads, state, so.apply_masks(params, start))
    out.append(so.get_masks(state))
  per_row = _expected_per_row(structure, "uniform")
  for masks in out:
    for path, m in _by_path(masks).items():
      np.testing.assert_array_equal(
          np.asarray(_rows(path, m, structure)).sum(axis=1), per_row[path]
      )
  chex.assert_trees_all_equal(out[0], out[1])
  assert not _tree_equal(out[0], out[2])
  assert not _tree_equal(out[0], so.get_masks(start))
  # A NaN anywhere in the gradients: no mask moves on that step.
  grads["query"]["kernel"] = grads["query"]["kernel"].at[0, 0, 0].set(jnp.nan)
  _, after = update(grads, state, so.apply_masks(params, state))
  chex.assert_trees_all_equal(so.get_masks(after), so.get_masks(state))


@pytest.mark.parametrize("structure", ["fan_in", "2:4"])
def test_drop_count_follows_the_schedule_split_over_rows(structure):
  """The rounding rule: the leaf moves k = floor(f_t * n_active) weights, as
  unstructured RigL does; every row moves k // rows, and exactly k % rows rows
  one more. Pinned by a gradient that is 0 on active weights and 1 elsewhere,
  so no dropped weight is regrown and each row's moves are visible."""
  params = {"w": jax.random.normal(jax.random.PRNGKey(0), (24, 10))}
  sparsity = 0.7 if structure == "fan_in" else 0.5
  tx = so.topology_update(
      "rigl",
      sparsity=sparsity,
      update_every=3,
      end_step=30,
      drop_fraction=0.8,
      structure=structure,
  )
  state = tx.init(params)
  mask = so.get_masks(state)["w"]
  grads = {"w": jnp.where(mask, 0.0, 1.0)}
  state = state._replace(step=jnp.int32(3))
  _, new = jax.jit(tx.update)(grads, state, so.apply_masks(params, state))
  grown = np.asarray(so.get_masks(new)["w"] & ~mask)
  n_active = int(mask.sum())
  k = int(np.floor(optax.cosine_decay_schedule(0.8, 30)(3) * n_active))
  per_row = _rows("w", grown, structure).sum(axis=1)
  rows = per_row.size
  assert int(grown.sum()) == k > rows  # some rows move more than one
  assert sorted(set(per_row.tolist())) == [k // rows, k // rows + 1]
  assert int(np.sum(per_row == k // rows + 1)) == k % rows


@pytest.mark.multi_device
@pytest.mark.parametrize(
    "structure", ["fan_in", pytest.param("2:4", marks=pytest.mark.slow)]
)
def test_explicitly_sharded_structured_update_matches_unsharded(structure):
  mesh = jax.make_mesh(
      (8,), ("model",), axis_types=(jax.sharding.AxisType.Explicit,)
  )
  params = {"w": jax.random.normal(jax.random.PRNGKey(0), (16, 16))}
  grads = {"w": jax.random.normal(jax.random.PRNGKey(1), (16, 16))}
  tx = so.topology_update(
      "rigl",
      sparsity=0.5,
      update_every=1,
      end_step=10,
      structure=structure,
  )
  state = tx.init(params)
  params = so.apply_masks(params, state)

  def opt_step(p, s, g):
    updates, s = tx.update(g, s, p, mask_update=True)
    return so.apply_updates(p, updates, s, mask_update=True)

  results = []
  for explicit in (False, True):
    p, g, s = params, grads, state
    with jax.set_mesh(mesh) if explicit else contextlib.nullcontext():
      if explicit:
        sh = NamedSharding(mesh, P(None, "model"))
        p, g = jax.device_put(p, sh), jax.device_put(g, sh)
        s = jax.tree.map(
            lambda x, sh=sh: jax.device_put(x, sh)
            if x.shape == (16, 16)
            else x,
            s,
        )
      step = jax.jit(opt_step)
      for _ in range(3):
        p, s = step(p, s, g)
    results.append(so.get_masks(s)["w"])
  np.testing.assert_array_equal(results[0], results[1])
  assert not jnp.array_equal(results[1], so.get_masks(state)["w"])
  per_row = 8 if structure == "fan_in" else 2
  np.testing.assert_array_equal(
      _rows("w", np.asarray(results[1]), structure).sum(axis=1), per_row
  )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(structure="2-4"), "unknown structure '2-4'"),
        (dict(structure="fan-in"), "unknown structure 'fan-in'"),
        (dict(structure=4), "unknown structure 4"),
        (dict(structure="4:2"), r"1 <= N < M.*N=4, M=2"),
        (dict(structure="2:2"), r"1 <= N < M"),
        (dict(structure="0:4"), r"1 <= N < M"),
        (dict(structure="2:4"), r"'2:4'.*sparsity 1 - 2/4 = 0.5.*0.9"),
        (
            dict(structure="2:4", sparsity=0.5, distribution="erk"),
            "distribution='erk'.*uniform",
        ),
        (
            dict(
                structure="1:4",
                sparsity=0.75,
                distribution={"conv": 0.75, "dense": 0.9},
            ),
            r"distribution\['dense'\] = 0.9",
        ),
        (
            dict(
                structure="fan_in",
                masks={"w": jnp.array([[1, 0], [1, 1]], bool)},
            ),
            r"'w'.*no constant fan-in.*between 1 and 2",
        ),
        (
            dict(
                structure="1:2",
                masks={"w": jnp.array([[1, 0], [1, 1]], bool)},
            ),
            r"'w' is not 1:2",
        ),
        (
            dict(structure="1:4", masks={"w": jnp.ones((6, 2), bool)}),
            r"'w'.*6 inputs on axis 0, not a multiple of 4",
        ),
    ],
)
def test_bad_structures_raise_at_construction(kwargs, match):
  kwargs = {"sparsity": 0.9, "end_step": 1000, **kwargs}
  with pytest.raises(ValueError, match=match):
    so.sparseopt(**kwargs)
  with pytest.raises(ValueError, match=match):
    so.topology_update(**kwargs)


@pytest.mark.parametrize(
    "params, structure, match",
    [
        (
            {"Conv_0": {"kernel": jnp.ones((3, 3, 3, 8))}},
            "2:4",
            r"'Conv_0/kernel'.*\(3, 3, 3, 8\).*3 inputs on axis 2",
        ),
        (
            {"Dense_0": {"kernel": jnp.ones((6, 8))}},
            "1:4",
            r"'Dense_0/kernel'.*6 inputs on axis 0",
        ),
        ({"v": jnp.ones(8)}, "fan_in", r"input \(fan-in\) axis.*'v'.*\(8,\)"),
        ({"v": jnp.ones(8)}, "2:4", r"input \(fan-in\) axis.*'v'"),
    ],
)
def test_shapes_that_cannot_hold_the_structure_raise_at_init(
    params, structure, match
):
  sparsity = 0.5 if structure != "1:4" else 0.75
  tx = so.sparseopt(
      sparsity,
      structure=structure,
      sparse_filter=lambda path, leaf: True,
      end_step=1000,
  )
  with pytest.raises(ValueError, match=match):
    tx.init(params)
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(tx.init, params)
  with pytest.raises(ValueError, match=match):
    so.random_masks(
        params, sparsity, structure=structure, sparse_filter=lambda p, x: True
    )


def test_unstructured_masks_unchanged_by_the_option():
  params = _params()
  a = so.sparseopt(0.8, end_step=1000).init(params)
  b = so.sparseopt(0.8, end_step=1000, structure=None).init(params)
  chex.assert_trees_all_equal(a, b)
  # ERK is still the default distribution without an N:M structure.
  shapes = {p: m.shape for p, m in _by_path(so.get_masks(a)).items()}
  expected = so.active_counts(shapes, so.layer_sparsities(shapes, 0.8, "erk"))
  assert {p: int(m.sum()) for p, m in _by_path(so.get_masks(a)).items()} == (
      expected
  )


def test_training_program_takes_structure():
  for module in ("flax", "grain"):  # the training program's ([train] extra)
    pytest.importorskip(module)
  from sparseopt_jax.training import presets, train

  parse = lambda *flags: train.config_from_args(
      train.train_parser().parse_args(["--workdir", "/nonexistent", *flags])
  )
  cfg = parse(
      "--structure", "2:4", "--sparsity", "0.5", "--distribution", "uniform"
  )
  assert cfg.structure == "2:4"
  assert parse("--structure", "none").structure is None
  with pytest.raises(ValueError, match=r"'2:4'.*0.5"):
    presets.get_preset("fashion_mnist_resnet20", structure="2:4")
  with pytest.raises(ValueError, match="unknown structure"):
    presets.get_preset("fashion_mnist_resnet20", structure="fanin")
  cfg = presets.get_preset("fashion_mnist_resnet20", structure="fan_in")
  tx = train.build_optimizer(cfg, 100, 10, {})
  params = {"Conv_0": {"kernel": jnp.ones((3, 3, 8, 16))}}
  mask = so.get_masks(tx.init(params))["Conv_0"]["kernel"]
  counts = np.asarray(mask).reshape(-1, 16).sum(axis=0)
  assert counts.min() == counts.max() == round(72 * 0.1)
