"""Host-scheduled mask updates, the state re-mask rule, tie-breaking and non-finite safety."""

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparseopt_jax as so

UPDATE_EVERY, END_STEP = 4, 30


def _params():
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  return {
      "conv": {
          "kernel": jax.random.normal(keys[0], (3, 3, 4, 8)),
          "bias": jnp.zeros(8),
      },
      "dense": {"kernel": jax.random.normal(keys[1], (8, 6))},
  }


def _grads(params, i):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(100 + i), len(leaves))
  return jax.tree.unflatten(
      treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
  )


INNER = {
    "sgd_momentum": lambda: optax.sgd(0.05, momentum=0.9),
    "adamw": lambda: optax.adamw(1e-2, weight_decay=1e-2),
    "lion": lambda: optax.lion(1e-3),
    "inject_hyperparams": lambda: optax.inject_hyperparams(optax.sgd)(
        learning_rate=0.05, momentum=0.9
    ),
}


def _sparseopt(inner, topology="rigl", **kw):
  return optax.chain(
      so.sparseopt(
          0.75,
          distribution="uniform",
          topology=topology,
          update_every=UPDATE_EVERY,
          end_step=END_STEP,
          seed=3,
          **kw,
      ),
      INNER[inner](),
  )


def _step_fn(tx):
  @functools.partial(jax.jit, static_argnums=3)
  def step(params, state, grads, mask_update):
    updates, state = tx.update(grads, state, params, mask_update=mask_update)
    return so.apply_updates(params, updates, state, mask_update=mask_update)

  return step


def _run(tx, steps, host_scheduled):
  params = _params()
  state = tx.init(params)
  params = so.apply_masks(params, state)
  step = _step_fn(tx)
  for i in range(steps):
    flag = (
        so.is_mask_update_step(i, update_every=UPDATE_EVERY, end_step=END_STEP)
        if host_scheduled
        else None
    )
    params, state = step(params, state, _grads(params, i), flag)
  return params, state


def _pruned_state_entries(state):
  """Non-zero optimizer-state entries at pruned positions, over params-shaped float leaves."""
  masks = {
      so.tree.path_str(p): m
      for p, m in jax.tree_util.tree_leaves_with_path(so.get_masks(state))
  }
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


@pytest.mark.parametrize("inner", sorted(INNER))
def test_host_scheduled_variants_match_the_in_graph_schedule(inner):
  tx = _sparseopt(inner)
  p_graph, s_graph = _run(tx, 2 * END_STEP // 3, host_scheduled=False)
  p_host, s_host = _run(tx, 2 * END_STEP // 3, host_scheduled=True)
  chex.assert_trees_all_equal(so.get_masks(s_graph), so.get_masks(s_host))
  chex.assert_trees_all_close(p_graph, p_host, rtol=1e-6, atol=1e-7)
  assert not jax.tree.all(
      jax.tree.map(
          jnp.array_equal,
          so.get_masks(s_host),
          so.get_masks(tx.init(_params())),
      )
  )


@pytest.mark.parametrize("inner", sorted(INNER) + ["multi_steps"])
def test_state_stays_zero_at_pruned_weights_without_remask_on_ordinary_steps(
    inner,
):
  """The rule apply_updates relies on: masked gradients keep pruned moments at exactly 0,
  so the optimizer state needs re-masking only on a mask-update step."""
  if inner == "multi_steps":
    # Two micro-steps per optimizer step: the topology counts optimizer steps.
    tx = optax.MultiSteps(_sparseopt("sgd_momentum"), every_k_schedule=2)
  else:
    tx = _sparseopt(inner)
  params = _params()
  state = tx.init(params)
  params = so.apply_masks(params, state)
  step = _step_fn(tx)
  changed = 0
  for i in range(24):
    masks = so.get_masks(state)
    params, state = step(params, state, _grads(params, i), None)
    changed += not jax.tree.all(
        jax.tree.map(jnp.array_equal, masks, so.get_masks(state))
    )
    # MultiSteps' acc_grads accumulate the raw gradient (RigL's grow criterion reads
    # it at pruned positions): the moments are those of its inner state.
    bad, checked = _pruned_state_entries(
        state.inner_opt_state if inner == "multi_steps" else state
    )
    assert bad == 0 and checked >= 1, (i, bad, checked)
    assert not any(
        bool(jnp.any((x != 0) & ~m))
        for x, m in zip(
            jax.tree.leaves(params),
            jax.tree.leaves(so.get_masks(state), is_leaf=so.tree.is_none),
        )
        if m is not None
    )
  assert changed >= 2


def _computations(hlo_text):
  """{name: body} of the computations in an HLO module's text, and ENTRY's name."""
  comps, entry, name, lines = {}, None, None, []
  for line in hlo_text.splitlines():
    head = re.match(r"(ENTRY )?%([\w.\-]+) ", line)
    if head:
      name, lines = head.group(2), []
      entry = name if head.group(1) else entry
    elif line.startswith("}") and name is not None:
      comps[name], name = "\n".join(lines), None
    elif name is not None:
      lines.append(line)
  return comps, entry


def _unconditional_text(hlo_text):
  """The computations ENTRY runs without passing through a conditional's branch."""
  comps, entry = _computations(hlo_text)
  seen, todo = set(), [entry]
  while todo:
    name = todo.pop()
    if name in seen or name not in comps:
      continue
    seen.add(name)
    body = re.sub(
        r"(branch_computations=\{[^}]*\}|(true|false)_computation=%[\w.\-]+)",
        "",
        comps[name],
    )
    todo += re.findall(r"%([\w.\-]+)", body)
  return "\n".join(comps[n] for n in seen)


def _selection(text):
  """Selection ops: the bisection's loop (a while), or a TopK call or a sort."""
  return (
      "while(" in text or 'custom_call_target="TopK"' in text or "sort(" in text
  )


def test_only_the_in_graph_variant_puts_the_mask_update_behind_a_conditional():
  """mask_update=False compiles no conditional and no selection; True runs the
  selection unconditionally (outside any conditional); None (decide in the
  graph) holds a conditional, and every selection op sits inside one."""
  tx = _sparseopt("sgd_momentum")
  params = _params()
  state = tx.init(params)
  hlo = {
      flag: (
          jax.jit(
              lambda p, s, g, flag=flag: so.apply_updates(
                  p, *tx.update(g, s, p, mask_update=flag), mask_update=flag
              )
          )
          .lower(params, state, params)
          .compile()
          .as_text()
      )
      for flag in (False, True, None)
  }
  assert "conditional(" not in hlo[False] and not _selection(hlo[False])
  assert _selection(_unconditional_text(hlo[True]))
  assert "conditional(" in hlo[None] and _selection(hlo[None])
  assert not _selection(_unconditional_text(hlo[None]))


def test_update_variant_still_follows_the_schedule():
  tx = _sparseopt("sgd_momentum")
  params = _params()
  state = tx.init(params)
  params = so.apply_masks(params, state)
  step = _step_fn(tx)
  before = so.get_masks(state)
  # Step 0 is never an update step: forcing the update variant must not move the masks.
  params, state = step(params, state, _grads(params, 0), True)
  chex.assert_trees_all_equal(before, so.get_masks(state))
  assert not bool(state[0].topology.changed)


def test_mask_update_must_be_a_python_bool():
  tx = _sparseopt("sgd_momentum")
  params = _params()
  with pytest.raises(ValueError, match="mask_update"):
    tx.update(params, tx.init(params), params, mask_update=jnp.bool_(True))


_TIE_MASK = np.zeros((64, 8), bool)
_TIE_MASK.reshape(-1)[np.random.default_rng(5).permutation(512)[:256]] = True


def _tie_update(seed):
  """Masks before and after one jitted RigL update from fixed masks (256 of 512
  active) where every active |w| ties (1.0) and every inactive |g| ties (1.0);
  active weights have g = 0, so none of them is regrown."""
  params = {"w": jnp.ones((64, 8))}
  before = jnp.asarray(_TIE_MASK)
  tx = so.topology_update(
      "rigl",
      masks={"w": before},
      update_every=1,
      end_step=10,
      seed=seed,
      drop_fraction=0.25,
  )
  state = tx.init(params)
  params = so.apply_masks(params, state)
  grads = {"w": jnp.where(before, 0.0, 1.0)}
  _, state = jax.jit(tx.update)(
      grads, state._replace(step=jnp.int32(1)), params
  )
  return np.asarray(before), np.asarray(so.get_masks(state)["w"])


@pytest.mark.parametrize("seed", [0, 1])
def test_ties_are_broken_by_the_seed_not_by_index(seed):
  before, after = _tie_update(seed)
  k = 62  # the count is pinned by test_drop_count_is_floor_of_the_cosine_fraction
  dropped = np.flatnonzero(before & ~after)
  grown = np.flatnonzero(after & ~before)
  active, inactive = np.flatnonzero(before), np.flatnonzero(~before)
  assert len(dropped) == len(grown) == k
  # Neither the first nor the last tied candidates in index order.
  assert not np.array_equal(dropped, active[:k])
  assert not np.array_equal(dropped, active[-k:])
  assert not np.array_equal(grown, inactive[:k])
  assert not np.array_equal(grown, inactive[-k:])
  # The same for one seed, different across seeds (from the same masks): both the
  # dropped and the grown weights.
  np.testing.assert_array_equal(after, _tie_update(seed)[1])
  other = _tie_update(seed + 7)[1]
  assert not np.array_equal(before & ~after, before & ~other)
  assert not np.array_equal(after & ~before, other & ~before)


def test_drop_count_is_floor_of_the_cosine_fraction():
  """At update step t a leaf with n active weights drops k = floor(f_t * n),
  f_t = alpha/2 (1 + cos(pi t / end_step)), and grows k; the count stays n."""
  before, after = _tie_update(0)
  n = int(before.sum())
  f_t = float(optax.cosine_decay_schedule(0.25, 10)(1))
  k = int(np.floor(f_t * n))
  # The cap min(inactive weights, floor(alpha * n)) does not bind here.
  assert k < min(int((~before).sum()), int(np.floor(0.25 * n)))
  kept = before & after
  dropped = before & ~after
  grown = after & ~before
  assert int(dropped.sum()) == k == int(grown.sum())
  assert int(kept.sum()) == n - k
  assert int(after.sum()) == n
  # Active weights had g = 0 and inactive ones g = 1: no dropped weight is regrown,
  # every grown weight was inactive before.
  assert not np.any(grown & before)
  np.testing.assert_array_equal(after, kept | grown)


def _update_step_masks(grads, params=None, wrap=lambda tx: tx):
  """Masks before and after one mask-update step of chain(sparseopt, sgd) on ``grads``."""
  params = _params() if params is None else params
  tx = wrap(
      optax.chain(
          so.sparseopt(
              0.75, distribution="uniform", update_every=1, end_step=10, seed=0
          ),
          optax.sgd(0.1, momentum=0.9),
      )
  )
  state = tx.init(params)
  params = so.apply_masks(params, state)
  before = so.get_masks(state)
  step = jax.jit(lambda p, s, g: so.apply_updates(p, *tx.update(g, s, p)))
  params, state = step(params, state, _grads(params, 0))  # step 0: ordinary
  params, state = step(params, state, grads)  # step 1: mask update
  return before, so.get_masks(state)


def _changed(a, b):
  return sum(
      int(jnp.sum(x != y))
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["sparse_kernel", "dense_bias"])
def test_non_finite_gradients_never_drive_drop_or_growth(bad, where):
  grads = _grads(_params(), 1)
  clean_before, clean_after = _update_step_masks(grads)
  assert (
      _changed(clean_before, clean_after) > 0
  )  # the same step moves masks when finite
  if where == "sparse_kernel":
    grads["conv"]["kernel"] = grads["conv"]["kernel"].at[0, 0, 0, 3].set(bad)
  else:
    grads["conv"]["bias"] = grads["conv"]["bias"].at[2].set(bad)
  before, after = _update_step_masks(grads)
  chex.assert_trees_all_equal(before, after)


@pytest.mark.parametrize("placement", ["around_the_chain", "inside_the_chain"])
def test_a_step_apply_if_finite_skips_leaves_the_masks_untouched(placement):
  grads = _grads(_params(), 1)
  grads["dense"]["kernel"] = grads["dense"]["kernel"].at[1, 1].set(np.nan)
  if placement == "around_the_chain":
    wrap = lambda tx: optax.apply_if_finite(tx, max_consecutive_errors=5)
    before, after = _update_step_masks(grads, wrap=wrap)
  else:
    params = _params()
    tx = optax.chain(
        so.sparseopt(0.75, distribution="uniform", update_every=1, end_step=10),
        optax.apply_if_finite(optax.sgd(0.1, momentum=0.9), 5),
    )
    state = tx.init(params)
    params = so.apply_masks(params, state)
    before = so.get_masks(state)
    for g in (_grads(params, 0), grads):
      params, state = so.apply_updates(params, *tx.update(g, state, params))
    after = so.get_masks(state)
    assert bool(jnp.all(jnp.isfinite(params["dense"]["kernel"])))
  chex.assert_trees_all_equal(before, after)


@pytest.mark.parametrize(
    "params",
    [jnp.ones(5), jnp.ones((4, 6)), {"bias": jnp.zeros(3)}],
    ids=["vector", "matrix", "dict_of_vectors"],
)
@pytest.mark.parametrize("inner", ["adam", "lion", "sgd"])
def test_params_of_any_shape_work_with_all_dense_leaves_where_none_is_sparse(
    params, inner
):
  opt = {
      "adam": optax.adam(0.1),
      "lion": optax.lion(0.01),
      "sgd": optax.sgd(0.1),
  }[inner]
  tx = optax.chain(
      so.sparseopt(0.5, distribution="uniform", update_every=2, end_step=10),
      opt,
  )
  state = tx.init(params)
  params = so.apply_masks(params, state)
  step = jax.jit(
      lambda p, s: so.apply_updates(
          p, *tx.update(jax.tree.map(jnp.ones_like, p), s, p)
      )
  )
  for _ in range(5):
    params, state = step(params, state)
  leaves = jax.tree.leaves(params)
  assert all(bool(jnp.all(x < 1.0)) for x in leaves)  # every leaf moved
  sparse = [
      m
      for m in jax.tree.leaves(so.get_masks(state), is_leaf=so.tree.is_none)
      if m is not None
  ]
  assert len(sparse) == (1 if jnp.ndim(leaves[0]) >= 2 else 0)
  # The topology stage's counter has a name of its own: tree_get finds optax's count alone.
  if inner in ("adam", "lion"):
    assert int(optax.tree_utils.tree_get(state, "count")) == 5


def test_masks_are_the_same_eager_under_jit_and_abstractly():
  tx = _sparseopt("sgd_momentum")
  params = _params()
  eager = tx.init(params)
  jitted = jax.jit(tx.init)(params)
  chex.assert_trees_all_equal(so.get_masks(eager), so.get_masks(jitted))
  chex.assert_trees_all_equal(
      eager[0].topology.density_factors, jitted[0].topology.density_factors
  )
  shapes = jax.eval_shape(tx.init, params)
  chex.assert_trees_all_equal_shapes_and_dtypes(shapes, eager)


def test_float_masks_other_than_zero_and_one_are_refused():
  params = {"w": jnp.ones((4, 4))}
  scores = {"w": jax.random.uniform(jax.random.PRNGKey(0), (4, 4))}
  with pytest.raises(ValueError, match="'w'.*other than 0 and 1"):
    so.sparseopt(0.9, masks=scores, topology="static")
  ok = so.sparseopt(
      0.5,
      masks={"w": (scores["w"] > 0.5).astype(jnp.float32)},
      topology="static",
  )
  assert so.get_masks(ok.init(params))["w"].dtype == jnp.bool_


def test_under_multi_steps_update_every_counts_optimizer_steps():
  """MultiSteps(k) calls the chain once per k micro-steps: the topology counts those calls,
  so a mask update comes every update_every * k micro-steps (see update_every's docs).
  """
  k, update_every = 2, 3
  tx = optax.MultiSteps(
      optax.chain(
          so.sparseopt(
              0.75,
              distribution="uniform",
              update_every=update_every,
              end_step=20,
          ),
          optax.sgd(0.1, momentum=0.9),
      ),
      every_k_schedule=k,
  )
  params = _params()
  state = tx.init(params)
  params = so.apply_masks(params, state)
  step = jax.jit(lambda p, s, g: so.apply_updates(p, *tx.update(g, s, p)))
  changed_at = []
  for micro in range(1, 4 * update_every * k + 1):
    before = so.get_masks(state)
    params, state = step(params, state, _grads(params, micro))
    if not jax.tree.all(
        jax.tree.map(jnp.array_equal, before, so.get_masks(state))
    ):
      changed_at.append(micro)
  # Optimizer step t (0-based) runs at micro-step (t + 1) * k; updates at t = 3, 6, 9.
  assert changed_at == [(t + 1) * k for t in (3, 6, 9)]
