"""The library's exact promises, as properties over generated cases (hypothesis).

For random leaves (dense, conv, attention kernels, biases), per-leaf
sparsities from 0.01 to 0.99 (so a leaf's documented drop count often exceeds
its inactive weights), drop fractions, schedules, exact ties (constant weights,
zero and rounded gradients), NaN steps, every topology and structure, the
in-graph and host-scheduled forms, and SGD-momentum and AdamW, after every
step:

* every sparse leaf keeps exactly its active count, and every row (neuron or
  N:M group) of a structured leaf its per-row count;
* pruned weights, and their optimizer moments, are exactly zero;
* the masks change only on due steps with finite values;
* a RigL update replaces exactly the documented count: ``min(floor(f_t n),
  inactive, floor(alpha n))`` per unstructured leaf, ``min(k_r, kmax_r)`` per
  row of a structured one;
* the exploration record is the union of the masks applied so far;
* no due update is missed.

The examples are drawn with a fixed seed (``derandomize``), so every CI run
checks the same cases; ``HYPOTHESIS_PROFILE=explore`` draws more, at random.
"""

import functools
import math
import os

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import strategies as st

import sparseopt_jax as so
from sparseopt_jax import rules, selection
from sparseopt_jax import structure as structure_lib

hypothesis.settings.register_profile(
    "ci",
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(hypothesis.HealthCheck),
    print_blob=True,
)
hypothesis.settings.register_profile(
    "explore",
    max_examples=300,
    deadline=None,
    suppress_health_check=list(hypothesis.HealthCheck),
    print_blob=True,
)
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

NUM_STEPS = 9


# ---------------------------------------------------------------------------
# The selection itself


@st.composite
def selection_cases(draw):
  rows = draw(st.integers(1, 4))
  # Short rows, and rows of one or more chunks of the packed form (the last
  # one partly padding).
  n = draw(
      st.one_of(
          st.integers(1, 12),
          st.integers(selection.CHUNK - 8, 2 * selection.CHUNK + 8),
      )
  )
  kmax = draw(st.integers(1, n))
  # Few distinct values: exact ties at the threshold are the common case. A
  # long row repeats a drawn pattern (hypothesis draws at most 48 values).
  size = min(rows * n, 48)
  score = draw(
      st.lists(
          st.sampled_from([-1.0, 0.0, 0.5, 2.0]), min_size=size, max_size=size
      )
  )
  cand = draw(st.lists(st.booleans(), min_size=size, max_size=size))
  count = draw(st.lists(st.integers(-1, n + 2), min_size=rows, max_size=rows))
  seed = draw(st.integers(0, 2**32 - 1))
  return (
      np.resize(np.array(score, np.float32), (rows, n)),
      np.resize(np.array(cand), (rows, n)),
      np.array(count, np.int32),
      kmax,
      seed,
  )


def _reference_select(score, cand, count, kmax, keys):
  """The selection's contract in numpy: per row, the first min(count, kmax)
  candidates by (score, tie key), both descending."""
  chosen = np.zeros(score.shape, bool)
  for i in range(score.shape[0]):
    idx = np.flatnonzero(cand[i])
    # np.lexsort sorts by its last key first, ascending: negate both.
    order = idx[np.lexsort((-keys[i][idx].astype(np.int64), -score[i][idx]))]
    chosen[i, order[: max(0, min(int(count[i]), kmax))]] = True
  return chosen


# 25 examples of 1-4 leaves: each compiles a program of its own.
@hypothesis.settings(max_examples=25)
@hypothesis.given(st.lists(selection_cases(), min_size=1, max_size=4))
def test_leaves_selected_together_take_what_each_row_takes_alone(cases):
  """select_leaves packs the long rows of all leaves into one array: each row
  still takes exactly what the contract, applied to it alone, says."""
  score, cand, count, kmax, seeds = map(list, zip(*cases))
  keys = [
      np.asarray(selection.hash_keys(x.size, np.uint32(seed))).reshape(x.shape)
      for x, seed in zip(score, seeds)
  ]
  together = jax.jit(selection.select_leaves, static_argnums=3)(
      score, cand, count, tuple(kmax), keys
  )
  for got, *leaf in zip(together, score, cand, count, kmax, keys, strict=True):
    np.testing.assert_array_equal(got, _reference_select(*leaf))


@hypothesis.given(
    st.integers(0, 500), st.integers(1, 40), st.integers(0, 2**32 - 1)
)
def test_row_counts_split_k_evenly_with_the_remainder_one_each(k, rows, seed):
  counts = np.asarray(
      rules.row_counts(jnp.int32(k), rows, jnp.asarray(seed, jnp.uint32))
  )
  assert counts.shape == (rows,) and counts.sum() == k
  assert set(counts.tolist()) <= {k // rows, k // rows + 1}


@hypothesis.given(selection_cases(), st.integers(0, 2**32 - 1))
def test_drop_and_grow_keeps_every_row_count(case, seed):
  weight, active, count, kmax, _ = case
  rows, n = weight.shape
  # The contract (rules.row_kmax): no row drops more than it holds, or more
  # than the grow step could refill from its inactive weights.
  room = int(min(active.sum(1).min(), (~active).sum(1).min()))
  hypothesis.assume(room > 0)
  kmax = min(kmax, room)
  grow = np.round(weight[::-1] * 2)  # few values: ties in the growth too
  keys = selection.hash_keys(weight.size, np.uint32(seed)).reshape(rows, n)
  new = np.asarray(
      jax.jit(rules.drop_and_grow, static_argnums=4)(
          active, weight, grow, count, kmax, keys, keys[::-1]
      )
  )
  np.testing.assert_array_equal(new.sum(1), active.sum(1))
  moved = (active & ~new).sum(1)
  assert np.all(moved <= np.clip(count, 0, kmax))


# ---------------------------------------------------------------------------
# The transform over generated networks and schedules


@st.composite
def networks(draw, structure):
  """Params shapes ``{name: shape}``: 1 to 3 sparse kernels and maybe a bias."""
  m = 0 if structure in (None, "fan_in") else int(structure.split(":")[1])
  dim = st.integers(1, 6)
  fan = st.integers(1, 3).map(lambda g: g * m) if m else st.integers(1, 7)
  shapes = {}
  for i in range(draw(st.integers(1, 3))):
    kind = draw(st.sampled_from(["dense", "conv", "attention"]))
    if kind == "dense":
      shapes[f"l{i}/kernel"] = (draw(fan), draw(dim))
    elif kind == "conv":
      shapes[f"l{i}/kernel"] = (
          draw(st.integers(1, 3)),
          draw(st.integers(1, 3)),
          draw(fan),
          draw(dim),
      )
    else:  # (in, heads, head_dim): neurons are (head, head_dim) pairs
      shapes[f"attn{i}/query/kernel"] = (
          draw(fan),
          draw(st.integers(1, 3)),
          draw(st.integers(1, 4)),
      )
  if draw(st.booleans()):
    shapes["l0/bias"] = (draw(dim),)
  return shapes


@st.composite
def cases(draw):
  structure = draw(st.sampled_from([None, None, "fan_in", "1:2", "2:4"]))
  shapes = draw(networks(structure))
  # One case in three is the corner drawn whole (below): a leaf big enough to
  # have inactive weights at a sparsity of a few percent.
  corner = draw(st.integers(0, 2)) == 0
  if corner and structure is None:
    shapes["big/kernel"] = (draw(st.integers(8, 20)), draw(st.integers(4, 10)))
  kernels = [p for p, s in shapes.items() if len(s) >= 2]
  if structure in (None, "fan_in"):
    # Low sparsities often: there a leaf's floor(f_t n) exceeds its inactive
    # weights, the case where drop and grow could disagree.
    sparsity = st.one_of(
        st.sampled_from([0.01, 0.05, 0.1, 0.2, 0.5, 0.9, 0.99]),
        st.floats(0.01, 0.99),
    )
    distribution = {f"^{p}$": draw(sparsity) for p in kernels}
    total = draw(sparsity)
  else:
    n, m = map(int, structure.split(":"))
    distribution, total = "uniform", 1.0 - n / m
  update_every = draw(st.integers(1, 4))
  case = dict(
      shapes=shapes,
      structure=structure,
      distribution=distribution,
      sparsity=total,
      topology=draw(st.sampled_from(["rigl", "rigl", "set", "static"])),
      alpha=draw(st.floats(0.05, 0.9)),
      update_every=update_every,
      end_step=draw(st.integers(update_every + 1, NUM_STEPS + 2)),
      form=draw(st.sampled_from(["in_graph", "host", "host_always_update"])),
      optimizer=draw(st.sampled_from(["sgd_momentum", "adamw"])),
      skew=draw(st.sampled_from([None, "density"])),
      # Exact ties in |w| and |g| are drawn often: they are where counts slip.
      grads=draw(st.sampled_from(["normal", "zeros", "rounded", "inactive"])),
      weights=draw(st.sampled_from(["normal", "constant", "rounded"])),
      nan_step=draw(st.one_of(st.none(), st.integers(0, NUM_STEPS - 1))),
      nan_at=draw(st.sampled_from(["pruned", "active"])),
      nan_value=draw(st.sampled_from([np.nan, np.inf, -np.inf])),
      seed=draw(st.integers(0, 3)),
  )
  if corner:
    # The corner drawn whole: everything tied, leaves nearly dense, a large
    # alpha, an early first update: floor(f_t n) far above the inactive weights.
    case.update(
        grads="zeros", weights="constant", alpha=draw(st.floats(0.3, 0.9))
    )
    if structure is None:
      case["distribution"] = {
          p: draw(st.sampled_from([0.02, 0.05, 0.1])) for p in distribution
      }
  return case


def _nest(flat: dict) -> dict:
  out = {}
  for path, value in flat.items():
    node = out
    *parents, leaf = path.split("/")
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = value
  return out


def _flat(tree) -> dict:
  return {
      "/".join(str(k.key) for k in p): x
      for p, x in jax.tree_util.tree_leaves_with_path(
          tree, is_leaf=lambda x: x is None
      )
  }


def _build(case):
  schedule = None
  if case["topology"] != "static":
    schedule = so.mask_update_schedule(
        update_every=case["update_every"],
        end_step=case["end_step"],
        drop_fraction=case["alpha"],
    )
  inner = (
      optax.sgd(0.1, momentum=0.9)
      if case["optimizer"] == "sgd_momentum"
      else optax.adamw(0.01, weight_decay=1e-2)
  )
  tx = optax.chain(
      so.sparseopt(
          case["sparsity"],
          distribution=case["distribution"],
          topology=case["topology"],
          schedule=schedule,
          skew=case["skew"],
          structure=case["structure"],
          seed=case["seed"],
      ),
      inner,
  )
  return tx, schedule


def _moments(opt_state) -> list[dict]:
  names = ("trace", "mu", "nu")
  found = []
  for name in names:
    moments = optax.tree_utils.tree_get(opt_state, name)
    if moments is not None:
      found.append(_flat(moments))
  assert found, "no optimizer moments found"
  return found


def _rows(path, mask, structure):
  """Per-row active counts (one row when unstructured), and the row layout."""
  if structure is None:
    lay = structure_lib.flat_layout(mask.shape)
  else:
    lay = structure_lib.layout(
        path, mask.shape, structure_lib.parse(structure), None
    )
  return lay, structure_lib.to_rows(mask, lay)


def _expected_row_drops(case, step, n_active, lay, in_row):
  """The documented per-row drop counts at a due step, as a sorted list."""
  alpha = case["alpha"]
  f_t = optax.cosine_decay_schedule(alpha, case["end_step"])(step)
  k = int(np.floor(np.float32(f_t) * np.float32(n_active)))
  kmax = max(
      0,
      min(
          lay.row_len - in_row,
          in_row,
          math.floor(alpha * in_row) + 1,
          math.floor(alpha * n_active),
      ),
  )
  base, extra = divmod(k, lay.rows)
  return sorted(
      [min(base + 1, kmax)] * extra + [min(base, kmax)] * (lay.rows - extra)
  )


def _grads(case, rng, params, masks):
  out = {}
  for path, w in params.items():
    shape = w.shape
    kind = case["grads"]
    if kind == "zeros":
      g = np.zeros(shape, np.float32)
    elif kind == "rounded":
      g = np.round(rng.normal(size=shape)).astype(np.float32)
    elif kind == "inactive" and masks.get(path) is not None:
      # Large only where inactive: RigL then regrows none of what it drops.
      g = np.where(masks[path], 0.0, 1.0 + rng.random(shape)).astype(np.float32)
    else:
      g = rng.normal(size=shape).astype(np.float32)
    out[path] = g
  return out


def _inject_nan(case, grads, masks):
  for path, m in masks.items():
    if m is None:
      continue
    where = ~m if case["nan_at"] == "pruned" else m
    if where.any():
      g = grads[path].copy()
      g[np.unravel_index(np.argmax(where), m.shape)] = case["nan_value"]
      grads[path] = g
      return True
  return False


def _host_masks(state) -> dict:
  return {
      p: None if m is None else np.asarray(m)
      for p, m in _flat(so.get_masks(state)).items()
  }


def _topology_state(state) -> so.TopologyState:
  (topo,) = [
      s
      for s in jax.tree.leaves(
          state, is_leaf=lambda x: isinstance(x, so.TopologyState)
      )
      if isinstance(s, so.TopologyState)
  ]
  return topo


def _check_case(case):
  tx, schedule = _build(case)
  rng = np.random.default_rng(case["seed"])
  flat_params = {
      p: {
          "constant": lambda s: np.full(s, 0.5, np.float32),
          "rounded": lambda s: np.round(rng.normal(size=s)).astype(np.float32),
          "normal": lambda s: rng.normal(size=s).astype(np.float32),
      }[case["weights"]](s)
      for p, s in case["shapes"].items()
  }
  params = jax.tree.map(jnp.asarray, _nest(flat_params))
  state = tx.init(params)
  params = so.apply_masks(params, state)

  @functools.partial(jax.jit, static_argnums=3)
  def step(params, state, grads, flag):
    updates, state = tx.update(grads, state, params, mask_update=flag)
    return so.apply_updates(params, updates, state, mask_update=flag)

  masks = _host_masks(state)
  sparse = {p: m for p, m in masks.items() if m is not None}
  counts = {p: int(m.sum()) for p, m in sparse.items()}
  row_counts = {
      p: _rows(p, m, case["structure"])[1].sum(1) for p, m in sparse.items()
  }
  ever = {p: m.copy() for p, m in sparse.items()}
  finite_params = True
  for t in range(NUM_STEPS):
    grads = _grads(case, rng, _flat(params), masks)
    nan_now = t == case["nan_step"] and _inject_nan(case, grads, masks)
    due = schedule is not None and schedule.is_due(t)
    flag = {
        "in_graph": None,
        "host": due,
        "host_always_update": True,
    }[case["form"]]
    params, state = step(params, state, _nest(grads), flag)
    new = _host_masks(state)
    applied = due and finite_params and not nan_now
    for p in sparse:
      m = masks[p]
      lay, rows = _rows(p, new[p], case["structure"])
      # Exact counts, per leaf and per row.
      assert new[p].sum() == counts[p], (t, p)
      np.testing.assert_array_equal(
          rows.sum(1), row_counts[p], err_msg=f"{t} {p}"
      )
      if not applied:
        np.testing.assert_array_equal(new[p], m, err_msg=f"{t} {p} not due")
        continue
      _, old_rows = _rows(p, m, case["structure"])
      drops = sorted((old_rows & ~rows).sum(1).tolist())
      want = _expected_row_drops(case, t, counts[p], lay, int(row_counts[p][0]))
      if case["topology"] == "rigl" and case["grads"] == "inactive":
        assert drops == want, (t, p, drops, want)
      else:  # a dropped weight may be regrown
        assert all(d <= w for d, w in zip(drops, want)), (t, p, drops, want)
      ever[p] |= new[p]
    # Pruned weights and their moments exactly zero.
    host_params = {p: np.asarray(x) for p, x in _flat(params).items()}
    for p in sparse:
      assert np.all(host_params[p][~new[p]] == 0), (t, p)
      for moments in _moments(state):
        assert np.all(np.asarray(moments[p])[~new[p]] == 0), (t, p)
    finite_params = all(np.all(np.isfinite(x)) for x in host_params.values())
    masks = new
  summary = so.sparsity_summary(state)
  total = sum(m.size for m in sparse.values())
  if sparse:
    assert summary["exploration"] == sum(e.sum() for e in ever.values()) / total
  assert summary["missed_mask_updates"] == 0
  assert summary["unremasked_mask_updates"] == 0
  assert int(_topology_state(state).step) == NUM_STEPS


def _measured_case(topology):
  """A (20, 10) leaf at s = 0.1, all-equal weights, zero gradients: 180 -> 200 once."""
  return dict(
      shapes={"l0/kernel": (20, 10)},
      structure=None,
      distribution={"^l0/kernel$": 0.1},
      sparsity=0.1,
      topology=topology,
      alpha=0.3,
      update_every=1,
      end_step=NUM_STEPS + 1,
      form="in_graph",
      optimizer="sgd_momentum",
      skew=None,
      grads="zeros",
      weights="constant",
      nan_step=None,
      nan_at="pruned",
      nan_value=np.nan,
      seed=0,
  )


@hypothesis.example(_measured_case("rigl"))
@hypothesis.example(_measured_case("set"))
@hypothesis.given(cases())
def test_counts_zeros_schedule_and_exploration_hold_on_every_step(case):
  _check_case(case)


# ---------------------------------------------------------------------------
# A host flag out of step is counted, never silent


@pytest.mark.parametrize("offset", [1, -1])
def test_flags_out_of_step_are_counted_as_missed_updates(offset):
  schedule = so.mask_update_schedule(update_every=3, end_step=20)
  params = {"w": jax.random.normal(jax.random.PRNGKey(0), (16, 8))}
  tx = optax.chain(
      so.sparseopt(0.8, distribution="uniform", schedule=schedule, skew=None),
      optax.sgd(0.1),
  )
  state = tx.init(params)
  params = so.apply_masks(params, state)
  first = np.asarray(so.get_masks(state)["w"])

  @functools.partial(jax.jit, static_argnums=3)
  def step(params, state, grads, flag):
    updates, state = tx.update(grads, state, params, mask_update=flag)
    return so.apply_updates(params, updates, state, mask_update=flag)

  num_steps = 15
  for t in range(num_steps):
    grads = {"w": jax.random.normal(jax.random.PRNGKey(t + 1), (16, 8))}
    params, state = step(params, state, grads, schedule.is_due(t + offset))
  due = [t for t in range(num_steps) if schedule.is_due(t)]
  summary = so.sparsity_summary(state)
  assert summary["missed_mask_updates"] == len(due) == 4
  # Every flag missed its step: the masks never changed, and it shows.
  np.testing.assert_array_equal(so.get_masks(state)["w"], first)
  assert summary["unremasked_mask_updates"] == 0


def test_update_and_apply_flags_that_disagree_are_counted():
  schedule = so.mask_update_schedule(update_every=2, end_step=10)
  params = {"w": jax.random.normal(jax.random.PRNGKey(0), (16, 8))}
  tx = optax.chain(
      so.topology_update("rigl", sparsity=0.8, schedule=schedule),
      optax.sgd(0.1, momentum=0.9),
  )
  state = tx.init(params)
  params = so.apply_masks(params, state)
  for t in range(6):
    grads = {"w": jax.random.normal(jax.random.PRNGKey(t + 1), (16, 8))}
    flag = schedule.is_due(t)
    updates, state = tx.update(grads, state, params, mask_update=flag)
    params, state = so.apply_updates(params, updates, state, mask_update=False)
  summary = so.sparsity_summary(state)
  assert summary["unremasked_mask_updates"] == 2  # steps 2 and 4
  assert summary["missed_mask_updates"] == 0


def test_schedule_and_its_numbers_are_given_once():
  schedule = so.mask_update_schedule(update_every=5, end_step=23)
  assert schedule.due_steps(30) == [5, 10, 15, 20]
  assert [t for t in range(30) if schedule.is_due(t)] == [5, 10, 15, 20]
  assert bool(schedule.is_due(jnp.int32(10))) and not schedule.is_due(10 + 1)
  with pytest.raises(ValueError, match="either schedule= or end_step"):
    so.sparseopt(0.9, schedule=schedule, end_step=100)
  with pytest.raises(ValueError, match="MaskSchedule"):
    so.topology_update("rigl", schedule=(5, 23, 0.3))
  with pytest.raises(ValueError, match="never update"):
    so.mask_update_schedule(update_every=5, end_step=5)


@pytest.mark.parametrize("topology", ["rigl", "static"])
def test_the_whole_state_can_be_donated(topology):
  """No two fields share a buffer: a donated state would be refused."""
  params = {"w": jax.random.normal(jax.random.PRNGKey(0), (16, 8))}
  tx = optax.chain(
      so.sparseopt(0.8, topology=topology, end_step=10, update_every=2),
      optax.sgd(0.1, momentum=0.9),
  )

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return so.apply_updates(params, updates, state)

  state = tx.init(params)
  params = so.apply_masks(params, state)
  for t in range(3):
    params, state = step(params, state, {"w": jnp.full((16, 8), t + 1.0)})
  assert int(_topology_state(state).step) == 3
