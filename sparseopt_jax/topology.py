"""The topology stage: RigL, SET or static masks, and the masks' owner.

Every ``update_every`` steps while ``step < end_step``, for each sparse leaf
with ``n`` active weights (Evci et al. 2020, RigL; Mocanu et al. 2018, SET):

    f_t = alpha / 2 * (1 + cos(pi * t / end_step))       (optax.cosine_decay_schedule)
    k   = floor(f_t * n)
    drop the k active weights of smallest |w|
    grow k weights that are inactive after the drop: largest |g| (RigL) or random (SET)

so every leaf keeps exactly ``n`` active weights. A weight just dropped may be
regrown. Candidates are ranked by (score, a random secondary key): exact ties
in |w| or |g| (zeros, repeated values) fall in an order drawn from the state's
key, the same for one seed and different across seeds, never index order. If
any weight or gradient holds a NaN or an Inf, no mask changes on that step
(what ``optax.apply_if_finite`` would skip), so non-finite values never drive
drop or growth and per-leaf counts stay exact.

Structure (``structure="fan_in"`` or ``"N:M"``): the same rule inside every
row of the leaf (a neuron, or a group of M consecutive inputs), so each row
keeps its count exactly; the leaf's k is split evenly over its rows, the
remainder going one weight each to rows picked by a seeded permutation. An
unstructured leaf is the one-row case: every leaf goes through the same exact
selection (:mod:`sparseopt_jax.selection`) on a [rows, row_len] view.

Mask-update step: the surviving weights take their ordinary update; dropped
weights are zeroed; grown weights start at 0.0 with zero optimizer moments and
take their first step on the next step. (Reference RigL skips the whole weight
update on these steps; inside an optax chain that would still decay momentum,
so survivors keep stepping here.)

Scheduling: by default the stage decides in the graph whether a step updates
the masks (``lax.cond``). On accelerators, where a conditional reads its
predicate back to the host every step, pass ``update(..., mask_update=b)``
with a Python bool from :func:`is_mask_update_step` instead and jit the step
with ``mask_update`` static: the ordinary variant then holds no mask-update
code at all, and the update variant runs without a conditional.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparseopt_jax import budgets, masking, rules, selection
from sparseopt_jax import schedule as schedule_lib
from sparseopt_jax import skew as skew_lib
from sparseopt_jax import structure as structure_lib
from sparseopt_jax import tree as tree_lib
from sparseopt_jax.checks import check_choice, check_fraction, check_int
from sparseopt_jax.schedule import is_mask_update_step  # noqa: F401  (re-exported)

TOPOLOGIES = ("rigl", "set", "static")


class TopologyState(NamedTuple):
  """State of :func:`topology_update`; it owns the masks of the chain.

  Attributes:
    step: number of updates this stage has seen (int32); the update that sees
      step t changes the masks iff the schedule's ``is_due(t)`` holds.
    key: PRNG key of the tie-breaking keys and of SET's random growth.
    masks: bool array per sparse leaf (True = active), None at dense leaves.
    ever_active: per sparse leaf, a packed bit per weight (``jnp.packbits``,
      1/8 byte per weight) marking weights active under any applied mask since
      init; the exploration (ITOP) rate is its mean.
    density_factors: per sparse leaf, the float32 vector c_i = sqrt(d_i / mean_j
      d_j) of the current masks (``skew.mask_density_factors``), recomputed only
      when the masks change, so that an ordinary step never reduces over them.
    changed: whether the last update was due to change the masks (bool
      scalar); it tells :func:`~sparseopt_jax.apply_updates` when the optimizer
      state needs re-masking.
    missed_updates: due steps on which the masks were not updated (int32): the
      ordinary variant (``mask_update=False``) ran on a due step.
    unremasked_updates: mask updates after which the optimizer state was not
      re-masked (int32): ``apply_updates(..., mask_update=False)`` after an
      update that changed the masks.
  """

  step: jax.Array
  key: jax.Array
  masks: Any
  ever_active: Any
  density_factors: Any
  changed: jax.Array
  missed_updates: jax.Array
  unremasked_updates: jax.Array

  def owns_masks(self) -> bool:
    """The topology stage always owns the chain's masks (None when all dense)."""
    return True

  def masks_changed(self) -> jax.Array:
    return self.changed

  def note_unremasked(self) -> TopologyState:
    """This state after an ``apply_updates`` that skipped the state re-mask."""
    return self._replace(
        unremasked_updates=self.unremasked_updates
        + self.changed.astype(jnp.int32)
    )


def _explicit_spec(x: jax.Array) -> Any:
  """The PartitionSpec of ``x`` if it is sharded over explicit mesh axes, else None."""
  spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
  return spec if spec is not None and any(s is not None for s in spec) else None


def _gathered(x: jax.Array) -> jax.Array:
  """``x``, gathered first if explicitly sharded (a row's selection needs the whole row)."""
  if _explicit_spec(x) is None:
    return x
  return jax.sharding.reshard(x, jax.sharding.PartitionSpec())


class _LeafPlan(NamedTuple):
  """What a mask update needs to know of one sparse leaf; static."""

  lay: structure_lib.RowLayout
  n_active: int
  kmax: int


class _RowInputs(NamedTuple):
  """One leaf's drop-and-grow inputs on its row view (:mod:`sparseopt_jax.rules`)."""

  active: jax.Array
  weight: jax.Array
  grow_score: jax.Array
  count: jax.Array
  kmax: int
  drop_keys: jax.Array
  grow_keys: jax.Array


def _row_inputs(mask, weight, grad, seeds, k, plan, grow_random) -> _RowInputs:
  """The leaf's row view, scores, counts and tie keys for dropping and growing ``k``."""
  lay = plan.lay
  rows = lambda x: structure_lib.to_rows(_gathered(x), lay)
  keys = lambda seed: rows(
      selection.hash_keys(mask.size, seed).reshape(mask.shape)
  )
  if grow_random:
    grow_score = keys(seeds[2])  # uint32: a random order
  else:
    grow_score = jnp.abs(rows(grad).astype(jnp.float32))
  return _RowInputs(
      rows(mask),
      rows(weight).astype(jnp.float32),
      grow_score,
      rules.row_counts(k, lay.rows, seeds[0]),
      plan.kmax,
      keys(seeds[0]),
      keys(seeds[1]),
  )


def _from_row_view(new, mask, plan):
  """The leaf's mask from its row view, laid out (and sharded) as ``mask`` is."""
  out = structure_lib.from_rows(new, plan.lay)
  spec = _explicit_spec(mask)
  return out if spec is None else jax.sharding.reshard(out, spec)


# How many weights one selection takes at most: the leaves of a mask update are
# selected together in groups of about this size, so that its program holds a
# few loops rather than four per leaf, while the keys it holds at once (about
# 13 bytes a weight) stay a bounded working set on a large model.
GROUP_WEIGHTS = 1 << 24


def _groups(sizes: list[int], budget: int = GROUP_WEIGHTS) -> list[list[int]]:
  """Consecutive indices of ``sizes``, split where a group would pass ``budget``."""
  groups, total = [], 0
  for i, n in enumerate(sizes):
    if not groups or total + n > budget:
      groups.append([])
      total = 0
    groups[-1].append(i)
    total += n
  return groups


def _drop_and_grow_all(inputs: list[_RowInputs]) -> list[jax.Array]:
  """:func:`rules.drop_and_grow_leaves` over ``inputs``, a group of leaves at a time."""
  out = []
  for group in _groups([x.active.size for x in inputs]):
    fields = zip(*(inputs[i] for i in group), strict=True)
    out += rules.drop_and_grow_leaves(*map(list, fields))
  return out


def _pack(mask: Any, xp: Any = jnp) -> Any:
  if xp is np:
    return np.packbits(mask.reshape(-1))
  return jnp.packbits(_gathered(mask).reshape(-1))


def _all_finite(*trees: Any) -> jax.Array:
  """Whether every entry of every leaf is finite: one bool scalar.

  The per-leaf counts meet in a square root, which XLA treats as expensive
  and so computes once: a cheap-looking chain of scalar ops over all leaves
  would be copied into every fusion that reads the flag (one or more per
  sparse leaf), and was most of the mask update's program.
  """
  bad = [
      jnp.sum(~jnp.isfinite(x), dtype=jnp.float32)
      for t in trees
      for x in jax.tree.leaves(t)
  ]
  return jnp.sqrt(sum(bad)) == 0


def _where(pred: jax.Array, new: Any, old: Any) -> Any:
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), new, old)


def exploration_counts(state: TopologyState) -> tuple[int, int]:
  """(weights ever active, sparse weights in all) over the sparse leaves."""
  ever = total = 0
  for m, bits in zip(
      jax.tree.leaves(state.masks),
      jax.device_get(jax.tree.leaves(state.ever_active)),
  ):
    ever += int(np.sum(np.unpackbits(bits, count=m.size)))
    total += m.size
  return ever, total


def _resolve_schedule(
    topology, schedule, update_every, end_step, drop_fraction
):
  """The stage's :class:`~sparseopt_jax.schedule.MaskSchedule` (None if static)."""
  if schedule is not None:
    if not isinstance(schedule, schedule_lib.MaskSchedule):
      raise ValueError(
          "schedule must be a MaskSchedule from so.mask_update_schedule(...),"
          f" got {schedule!r}"
      )
    given = [
        name
        for name, value in (
            ("update_every", update_every),
            ("end_step", end_step),
            ("drop_fraction", drop_fraction),
        )
        if value is not None
    ]
    if given:
      raise ValueError(
          f"pass either schedule= or {', '.join(given)}, not both: the"
          f" schedule already holds them ({schedule})"
      )
    return schedule
  update_every = check_int(
      "update_every", 100 if update_every is None else update_every, 1
  )
  drop_fraction = check_fraction(
      "drop_fraction",
      0.3 if drop_fraction is None else drop_fraction,
      closed=True,
  )
  if topology == "static":
    return None
  if end_step is None:
    raise ValueError(
        f"topology={topology!r} needs end_step (the step after which masks "
        "stay fixed, typically 0.75 of training) or schedule="
    )
  return schedule_lib.mask_update_schedule(
      update_every=update_every, end_step=end_step, drop_fraction=drop_fraction
  )


class _MaskConfig(NamedTuple):
  """What the stage knows of its masks before it sees params; static."""

  sparsity: float
  distribution: budgets.Distribution
  keep: Any  # the sparse-leaf filter
  sparse_filter: Any  # as given, for the error message
  seed: int
  spec: structure_lib.Structure | None
  neuron_axis: int | None
  given: Any  # the given masks, or None
  given_counts: dict[str, int] | None  # their active weights per leaf
  given_per_row: dict[str, int] | None  # and per row, when structured


def _mask_config(
    sparsity, distribution, masks, sparse_filter, seed, neuron_axis, structure
) -> _MaskConfig:
  """Checks the mask arguments eagerly; ValueError naming the bad one."""
  sparsity = budgets.check_sparsity(sparsity)
  distribution = budgets.check_distribution(distribution)
  tree_lib.check_neuron_axis(neuron_axis)
  spec = structure_lib.parse(structure)
  given = None if masks is None else masking.as_bool_masks(masks)
  given_counts = given_per_row = None
  if given is None:
    structure_lib.check_budget(spec, sparsity, distribution)
  else:
    given_per_row = structure_lib.check_masks(given, spec, neuron_axis)
    given_counts = {
        tree_lib.path_str(p): int(np.sum(np.asarray(m)))
        for p, m in jax.tree_util.tree_leaves_with_path(
            given, is_leaf=tree_lib.is_none
        )
        if not tree_lib.is_none(m)
    }
  return _MaskConfig(
      sparsity,
      distribution,
      tree_lib.make_sparse_filter(sparse_filter),
      sparse_filter,
      check_int("seed", seed, 0),
      spec,
      neuron_axis,
      given,
      given_counts,
      given_per_row,
  )


def _initial_masks(cfg: _MaskConfig, params: Any) -> Any:
  """The initial masks as numpy arrays: the given ones (checked) or random ones."""
  if (
      isinstance(cfg.sparse_filter, str)
      and cfg.given is None
      and not tree_lib.sparse_shapes(params, cfg.keep)
  ):
    raise ValueError(
        f"sparse_filter {cfg.sparse_filter!r} matches no leaf with ndim >= 2;"
        f" leaf paths look like {tree_lib.leaf_paths(params)[:5]}"
    )
  if cfg.given is not None:
    tree_lib.check_masks_like(cfg.given, params)
    host_masks = jax.tree.map(
        lambda m: m if tree_lib.is_none(m) else np.asarray(m),
        cfg.given,
        is_leaf=tree_lib.is_none,
    )
  else:
    host_masks = masking.host_random_masks(
        params,
        cfg.sparsity,
        cfg.distribution,
        sparse_filter=cfg.keep,
        seed=cfg.seed,
        structure=cfg.spec,
        neuron_axis=cfg.neuron_axis,
    )
  tree_lib.check_neuron_axis_fits(_sparse_shapes(host_masks), cfg.neuron_axis)
  return host_masks


def _sparse_shapes(masks: Any) -> dict[str, tuple[int, ...]]:
  return {
      tree_lib.path_str(p): tuple(m.shape)
      for p, m in jax.tree_util.tree_leaves_with_path(
          masks, is_leaf=tree_lib.is_none
      )
      if not tree_lib.is_none(m)
  }


def _init_state(cfg: _MaskConfig, params: Any) -> TopologyState:
  # A fresh array per field: a donated state may not hold one buffer twice.
  zero = lambda: jnp.zeros([], jnp.int32)
  if tree_lib.is_params_placeholder(params):
    placeholder = tree_lib.NOT_PARAMS
    return TopologyState(
        zero(),
        jax.random.PRNGKey(0),
        placeholder,
        placeholder,
        placeholder,
        jnp.zeros([], bool),
        zero(),
        zero(),
    )
  host_masks = _initial_masks(cfg, params)
  to_device = lambda tree: jax.tree.map(
      lambda x: x if tree_lib.is_none(x) else jnp.asarray(x),
      tree,
      is_leaf=tree_lib.is_none,
  )
  return TopologyState(
      step=zero(),
      key=jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 0x70B0),
      masks=to_device(host_masks),
      ever_active=to_device(jax.tree.map(lambda m: _pack(m, np), host_masks)),
      density_factors=to_device(
          skew_lib.mask_density_factors(host_masks, cfg.neuron_axis, np)
      ),
      changed=jnp.zeros([], bool),
      missed_updates=zero(),
      unremasked_updates=zero(),
  )


def _leaf_plans(
    cfg: _MaskConfig, masks: Any, alpha: float
) -> dict[str, _LeafPlan]:
  """Per sparse leaf: its row view, active count and row kmax; static."""
  shapes = _sparse_shapes(masks)
  if cfg.given_counts is not None:
    counts, per_row = cfg.given_counts, cfg.given_per_row
  else:
    sparsities = budgets.layer_sparsities(
        shapes, cfg.sparsity, cfg.distribution
    )
    counts = budgets.active_counts(
        shapes, sparsities, structure=cfg.spec, neuron_axis=cfg.neuron_axis
    )
    if cfg.spec is not None:
      per_row = structure_lib.per_row_counts(
          shapes, sparsities, cfg.spec, cfg.neuron_axis
      )
  plans = {}
  for path, shape in shapes.items():
    n = counts[path]
    if cfg.spec is None:
      lay, in_row = structure_lib.flat_layout(shape), n
    else:
      lay = structure_lib.layout(path, shape, cfg.spec, cfg.neuron_axis)
      in_row = per_row[path]
    plans[path] = _LeafPlan(
        lay, n, rules.row_kmax(lay.row_len, in_row, n, alpha)
    )
  return plans


def _next_masks(cfg, sched, grow_random, state, params, grads, apply):
  """(masks, ever_active, density_factors) after the update at ``state.step``.

  The masks change only where ``apply`` (a due step) holds and every weight
  and gradient is finite; the exploration record takes only applied masks.
  """
  plans = _leaf_plans(cfg, state.masks, sched.drop_fraction)
  f_t = sched.fraction(state.step)
  paths_masks = jax.tree_util.tree_leaves_with_path(
      state.masks, is_leaf=tree_lib.is_none
  )
  seeds = jax.random.bits(
      jax.random.fold_in(state.key, state.step),
      (len(paths_masks), 3),
      jnp.uint32,
  )
  # Flattened like the masks: a MaskedNode (another multi_transform branch's leaf) counts.
  flat = lambda tree: jax.tree.leaves(tree, is_leaf=tree_lib.is_none)
  new = [m for _, m in paths_masks]
  moving, inputs = [], []
  for i, ((p, m), w, g) in enumerate(
      zip(paths_masks, flat(params), flat(grads), strict=True)
  ):
    plan = None if tree_lib.is_none(m) else plans.get(tree_lib.path_str(p))
    if plan is None or plan.kmax <= 0:  # dense, or nothing can move
      continue
    k = jnp.floor(f_t * plan.n_active).astype(jnp.int32)
    moving.append((i, plan))
    inputs.append(_row_inputs(m, w, g, seeds[i], k, plan, grow_random))
  for (i, plan), rows in zip(moving, _drop_and_grow_all(inputs), strict=True):
    new[i] = _from_row_view(rows, new[i], plan)
  treedef = jax.tree.structure(state.masks, is_leaf=tree_lib.is_none)
  apply = apply & _all_finite(params, grads)
  masks = _where(apply, jax.tree.unflatten(treedef, new), state.masks)
  factors = _where(
      apply,
      skew_lib.mask_density_factors(masks, cfg.neuron_axis),
      state.density_factors,
  )
  ever = jax.tree.map(lambda bits, m: bits | _pack(m), state.ever_active, masks)
  return masks, ever, factors


def topology_update(
    topology: str = "rigl",
    *,
    sparsity: float = 0.0,
    distribution: budgets.Distribution = "uniform",
    masks: Any = None,
    sparse_filter: tree_lib.SparseFilter = None,
    update_every: int | None = None,
    drop_fraction: float | None = None,
    end_step: int | None = None,
    schedule: schedule_lib.MaskSchedule | None = None,
    seed: int = 0,
    neuron_axis: int | None = None,
    structure: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Own the masks, change them with RigL/SET, and zero the pruned gradients.

  On its own, ``optax.chain(so.topology_update("rigl", ...), optax.sgd(...))``
  with :func:`~sparseopt_jax.apply_updates` is RigL (or SET, or static sparse
  training) without skew correction.

  Args:
    topology: ``"rigl"`` (grow by largest |gradient|), ``"set"`` (grow at
      random) or ``"static"`` (never change the masks).
    sparsity: target fraction of zeros over the sparse leaves, in [0, 1).
    distribution: ``"uniform"``, ``"erk"``, ``"er"`` or a mapping from leaf-path
      regex to sparsity (see :func:`~sparseopt_jax.budgets.layer_sparsities`).
    masks: optional initial masks (bool at sparse leaves, None at dense ones);
      they override ``sparsity``, ``distribution`` and ``sparse_filter``.
    sparse_filter: which leaves are sparse: None (every leaf with ndim >= 2), a
      regex searched in the leaf path, or a callable ``(path, leaf) -> bool``.
    update_every: Delta-T, steps between mask updates (default 100). It
      counts this stage's updates: under ``optax.MultiSteps(k)`` one per k
      micro-steps, so divide ``update_every`` and ``end_step`` by k.
    drop_fraction: alpha, the fraction of active weights replaced at step 0,
      cosine-decayed to 0 at ``end_step`` (default 0.3).
    end_step: no mask update at or after this step (about 0.75 of training);
      required unless ``topology="static"`` or ``schedule`` is given.
    schedule: a :class:`~sparseopt_jax.schedule.MaskSchedule` from
      :func:`~sparseopt_jax.mask_update_schedule`, instead of the three
      arguments above; hand the same object to a host-scheduled loop.
    seed: seed of the initial masks and of the update's random keys.
    neuron_axis: the neuron axis of every sparse leaf, for the cached
      per-neuron density factors and the structure; None (default) by role
      (:func:`~sparseopt_jax.tree.neuron_axes`).
    structure: None (unstructured), ``"fan_in"`` (every neuron keeps the same
      number of incoming weights) or ``"N:M"`` such as ``"2:4"`` (exactly N
      active in every group of M consecutive weights along the input axis;
      then ``sparsity`` must be 1 - N/M and ``distribution`` uniform). The
      initial masks and every update keep it exactly: drop and grow happen
      inside each neuron or group (see :mod:`sparseopt_jax.structure`).

  The drop count: a leaf with ``n`` active weights is viewed as rows (one row
  when unstructured; a neuron or a group when structured) holding ``n_r``
  each. At a due step t its count ``k = floor(f_t * n)`` is split over the
  rows, ``floor(k / rows)`` each and one more in ``k mod rows`` rows picked by
  a seeded permutation; each row drops and regrows ``min(k_r, kmax_r)``, with
  ``kmax_r = min(row_len - n_r, n_r, floor(alpha n_r) + 1, floor(alpha n))``
  (:func:`~sparseopt_jax.rules.row_kmax`): unstructured, ``min(floor(f_t n),
  inactive weights, floor(alpha n))``. Every row keeps its count exactly.

  ``update(updates, state, params, *, grow_grads=None, mask_update=None,
  **extra)``: ``params`` is required (drop ranks |w|); RigL ranks
  ``grow_grads`` if given, else the updates it receives. Both must be dense,
  which they are when pruned weights are stored as exact zeros.
  ``mask_update``: None decides in the graph; a Python bool (from the
  schedule's ``is_due``) fixes the variant at trace time. With True the masks
  still change only if the schedule says so; with False on a due step they do
  not change and ``state.missed_updates`` counts the step
  (``so.sparsity_summary(state)["missed_mask_updates"]``).
  """
  check_choice("topology", topology, TOPOLOGIES)
  sched = _resolve_schedule(
      topology, schedule, update_every, end_step, drop_fraction
  )
  cfg = _mask_config(
      sparsity, distribution, masks, sparse_filter, seed, neuron_axis, structure
  )
  next_masks = functools.partial(_next_masks, cfg, sched, topology == "set")

  def init_fn(params):
    return _init_state(cfg, params)

  def update_fn(
      updates,
      state,
      params=None,
      *,
      grow_grads=None,
      mask_update=None,
      **extra_args,
  ):
    del extra_args
    if mask_update is not None and not isinstance(mask_update, bool):
      raise ValueError(
          "mask_update must be None (decide in the graph) or a Python bool "
          f"(a static choice of the compiled variant), got {mask_update!r}"
      )
    step = optax.safe_increment(state.step)
    if sched is None or mask_update is False:
      missed = jnp.zeros([], jnp.int32)
      if sched is not None:  # a due step run by the ordinary variant
        missed = sched.is_due(state.step).astype(jnp.int32)
      return masking.mask_updates(updates, state.masks), state._replace(
          step=step,
          changed=jnp.zeros([], bool),
          missed_updates=state.missed_updates + missed,
      )
    if params is None:
      raise ValueError(
          f"topology_update({topology!r}) needs params in update() "
          "(the drop criterion ranks |w|)"
      )
    grads = updates if grow_grads is None else grow_grads
    due = sched.is_due(state.step)

    def change(apply, state, params, grads):
      return next_masks(state, params, grads, apply)

    def keep(state, params, grads):
      del params, grads
      return state.masks, state.ever_active, state.density_factors

    if mask_update:  # the host chose this variant: still follow the schedule
      masks, ever, factors = change(due, state, params, grads)
    else:
      # Only the mask state passes through the conditional: the updates are
      # masked outside it, so that this fuses into the optimizer's own pass.
      masks, ever, factors = jax.lax.cond(
          due,
          functools.partial(change, jnp.ones([], bool)),
          keep,
          state,
          params,
          grads,
      )
    # Survivors only: dropped weights get no step, grown ones start at zero.
    survivors = jax.tree.map(jnp.logical_and, state.masks, masks)
    return masking.mask_updates(updates, survivors), state._replace(
        step=step,
        masks=masks,
        ever_active=ever,
        density_factors=factors,
        changed=due,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
