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
remainder going one weight each to rows picked by a seeded permutation. Per-row
``lax.top_k`` on a [rows, row_len] view of the leaf.

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

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparseopt_jax import budgets, masking
from sparseopt_jax import skew as skew_lib
from sparseopt_jax import structure as structure_lib
from sparseopt_jax import tree as tree_lib
from sparseopt_jax.checks import check_choice, check_fraction, check_int

TOPOLOGIES = ("rigl", "set", "static")


class TopologyState(NamedTuple):
  """State of :func:`topology_update`; it owns the masks of the chain.

  Attributes:
    step: number of updates this stage has seen (int32); the update that sees
      step t changes the masks iff :func:`is_mask_update_step` (t) holds.
    key: PRNG key of the tie-breaking keys and of SET's random growth.
    masks: bool array per sparse leaf (True = active), None at dense leaves.
    ever_active: per sparse leaf, a packed bit per weight (``jnp.packbits``,
      1/8 byte per weight) marking weights active at any step since init; the
      exploration (ITOP) rate is its mean.
    density_factors: per sparse leaf, the float32 vector c_i = sqrt(d_i / mean_j
      d_j) of the current masks (``skew.mask_density_factors``), recomputed only when
      the masks change, so that an ordinary step never reduces over the masks.
    changed: whether the last update changed the masks (bool scalar); it tells
      :func:`~sparseopt_jax.apply_updates` when the optimizer state needs
      re-masking.
  """

  step: jax.Array
  key: jax.Array
  masks: Any
  ever_active: Any
  density_factors: Any
  changed: jax.Array


def is_mask_update_step(step, *, update_every: int, end_step: int):
  """Whether the update that sees ``step`` (0-based) changes the masks.

  ``step > 0 and step % update_every == 0 and step < end_step``. Works on Python
  ints (returns a bool: for choosing a compiled step variant on the host) and
  on traced integers (returns a bool array: the in-graph schedule).
  """
  due = (step > 0) & (step % update_every == 0) & (step < end_step)
  return bool(due) if isinstance(step, (int, np.integer)) else due


_MIX = (np.uint32(0x7FEB352D), np.uint32(0x846CA68B))


def _mix32(x: jax.Array) -> jax.Array:
  """A bijection of uint32 that scatters neighbours (Wellons' ``lowbias32``)."""
  x = x ^ (x >> 16)
  x = x * _MIX[0]
  x = x ^ (x >> 15)
  x = x * _MIX[1]
  return x ^ (x >> 16)


def _random_keys(n: int, seed: jax.Array) -> jax.Array:
  """n distinct pseudo-random uint32 keys, one per position, from a uint32 seed.

  A counter-based hash rather than ``jax.random``: a few integer ops per weight
  instead of Threefry's unrolled rounds (which made the mask-update branch ten
  times larger to compile), and distinct by construction, since ``_mix32`` is a
  bijection.
  """
  return _mix32(jnp.arange(n, dtype=jnp.uint32) + seed)


def _as_int_key(keys: jax.Array) -> jax.Array:
  """uint32 -> int32 preserving order (``lax.top_k`` ranks signed values)."""
  return jax.lax.bitcast_convert_type(keys ^ np.uint32(0x80000000), jnp.int32)


def _kth_largest(x: jax.Array, k: jax.Array, kmax: int) -> jax.Array:
  values, _ = jax.lax.top_k(x, kmax)
  return values[jnp.maximum(k, 1) - 1]


def _select(
    score: jax.Array,
    candidates: jax.Array,
    k: jax.Array,
    kmax: int,
    tie_keys: jax.Array,
) -> jax.Array:
  """Bool vector marking the ``k`` candidates first in (score, tie key) order.

  ``k <= kmax`` (static) and ``k`` <= the number of candidates. Every candidate
  above the k-th score is taken; the ``r`` still needed come from those equal to
  it, by largest tie key. Tie keys are distinct, so exactly ``k`` are taken.
  """
  low = (
      -jnp.inf
      if jnp.issubdtype(score.dtype, jnp.floating)
      else jnp.iinfo(score.dtype).min
  )
  s = jnp.where(candidates, score, low)
  threshold = _kth_largest(s, k, kmax)
  above = s > threshold
  tied = candidates & (s == threshold)
  r = k - jnp.sum(above, dtype=jnp.int32)

  def break_ties():
    ties = jnp.where(tied, _as_int_key(tie_keys), jnp.iinfo(jnp.int32).min)
    return tied & (ties >= _kth_largest(ties, r, kmax)) & (r > 0)

  # Continuous scores rarely tie at the threshold: rank the ties only when some must lose.
  return above | jax.lax.cond(
      jnp.sum(tied, dtype=jnp.int32) > r, break_ties, lambda: tied
  )


def _explicit_spec(x: jax.Array) -> Any:
  """The PartitionSpec of ``x`` if it is sharded over explicit mesh axes, else None."""
  spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
  return spec if spec is not None and any(s is not None for s in spec) else None


def _flat(x: jax.Array) -> jax.Array:
  """``x.reshape(-1)``; explicitly sharded leaves are gathered first (top-k needs the whole leaf)."""
  if _explicit_spec(x) is not None:
    x = jax.sharding.reshard(x, jax.sharding.PartitionSpec())
  return x.reshape(-1)


def _new_leaf_mask(mask, weight, grad, seeds, finite, *, k, kmax, grow_random):
  """The leaf's mask after dropping and growing ``k`` weights (same shape, same count)."""
  flat_mask = _flat(mask)
  w = _flat(weight).astype(jnp.float32)
  g = _flat(grad).astype(jnp.float32)
  n = flat_mask.shape[0]
  dropped = _select(-jnp.abs(w), flat_mask, k, kmax, _random_keys(n, seeds[0]))
  kept = flat_mask & ~dropped
  if grow_random:
    grow_score = _as_int_key(_random_keys(n, seeds[2]))
  else:
    grow_score = jnp.abs(g)
  grown = _select(grow_score, ~kept, k, kmax, _random_keys(n, seeds[1]))
  out = jnp.where(finite, kept | grown, flat_mask).reshape(mask.shape)
  spec = _explicit_spec(mask)
  return out if spec is None else jax.sharding.reshard(out, spec)


def _row_pick(values: jax.Array, k: jax.Array, kmax: int) -> jax.Array:
  """Per row of ``values`` [rows, n], its k-th largest (``k`` [rows], 1 <= k <= kmax)."""
  top, _ = jax.lax.top_k(values, kmax)
  return jnp.take_along_axis(top, jnp.clip(k - 1, 0, kmax - 1)[:, None], axis=1)


def _select_rows(
    score: jax.Array,
    candidates: jax.Array,
    k: jax.Array,
    kmax: int,
    tie_keys: jax.Array,
) -> jax.Array:
  """:func:`_select` in every row of a [rows, n] view: row i takes its ``k[i]`` first.

  ``k[i] <= kmax`` (static) and ``k[i] <=`` the candidates of row i; the same
  (score, tie key) order as the unstructured path, so exactly ``k[i]`` per row.
  """
  floating = jnp.issubdtype(score.dtype, jnp.floating)
  low = -jnp.inf if floating else jnp.iinfo(score.dtype).min
  high = jnp.inf if floating else jnp.iinfo(score.dtype).max
  s = jnp.where(candidates, score, low)
  # A row that takes nothing has no ties to break.
  threshold = jnp.where(k[:, None] > 0, _row_pick(s, k, kmax), high)
  above = s > threshold
  tied = candidates & (s == threshold)
  r = k - jnp.sum(above, axis=1, dtype=jnp.int32)

  def break_ties():
    ties = jnp.where(tied, _as_int_key(tie_keys), jnp.iinfo(jnp.int32).min)
    return tied & (ties >= _row_pick(ties, r, kmax)) & (r > 0)[:, None]

  # As in _select: rank the ties only when, in some row, some must lose.
  chosen = above | jax.lax.cond(
      jnp.any(jnp.sum(tied, axis=1, dtype=jnp.int32) > r),
      break_ties,
      lambda: tied,
  )
  return chosen & (k > 0)[:, None]


def _new_structured_leaf_mask(
    mask, weight, grad, seeds, finite, *, k, kmax, lay, grow_random
):
  """The leaf's mask after dropping and growing ``k`` weights inside its rows.

  Row i (a neuron for fan_in, a group for N:M) drops ``k // rows`` weights, one
  more for ``k % rows`` rows picked by a seeded permutation (at most ``kmax``),
  and grows as many as it dropped: every row keeps its count.
  """
  spec = _explicit_spec(mask)
  gather = lambda x: (
      x
      if _explicit_spec(x) is None
      else jax.sharding.reshard(x, jax.sharding.PartitionSpec())
  )
  rows = lambda x: structure_lib.to_rows(gather(x), lay)
  keys = lambda seed: structure_lib.to_rows(
      _random_keys(mask.size, seed).reshape(mask.shape), lay
  )
  m = rows(mask)
  w = rows(weight).astype(jnp.float32)
  order = (
      jnp.arange(lay.rows, dtype=jnp.uint32)
      * np.uint32(structure_lib.row_multiplier(lay.rows))
      + _mix32(seeds[0] ^ np.uint32(0x5EED)) % np.uint32(lay.rows)
  ) % np.uint32(lay.rows)
  extra = (order < (k % lay.rows).astype(jnp.uint32)).astype(jnp.int32)
  k_rows = jnp.minimum(k // lay.rows + extra, kmax)
  dropped = _select_rows(-jnp.abs(w), m, k_rows, kmax, keys(seeds[0]))
  kept = m & ~dropped
  if grow_random:
    grow_score = _as_int_key(keys(seeds[2]))
  else:
    grow_score = jnp.abs(rows(grad).astype(jnp.float32))
  grown = _select_rows(grow_score, ~kept, k_rows, kmax, keys(seeds[1]))
  out = structure_lib.from_rows(jnp.where(finite, kept | grown, m), lay)
  return out if spec is None else jax.sharding.reshard(out, spec)


def _pack(mask: Any, xp: Any = jnp) -> Any:
  return xp.packbits(mask.reshape(-1) if xp is np else _flat(mask))


def _unpack(bits: jax.Array, n: int) -> jax.Array:
  return jnp.unpackbits(bits, count=n).astype(bool)


def exploration_counts(state: TopologyState) -> tuple[int, int]:
  """(weights ever active, sparse weights in all) over the sparse leaves."""
  ever = total = 0
  for m, bits in zip(
      jax.tree.leaves(state.masks), jax.tree.leaves(state.ever_active)
  ):
    ever += int(jnp.sum(_unpack(bits, m.size)))
    total += m.size
  return ever, total


def topology_update(
    topology: str = "rigl",
    *,
    sparsity: float = 0.0,
    distribution: budgets.Distribution = "uniform",
    masks: Any = None,
    sparse_filter: tree_lib.SparseFilter = None,
    update_every: int = 100,
    drop_fraction: float = 0.3,
    end_step: int | None = None,
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
    update_every: Delta-T, steps between mask updates. It counts this stage's
      updates: under ``optax.MultiSteps(k)`` one per k micro-steps, so divide
      ``update_every`` and ``end_step`` by k.
    drop_fraction: alpha, the fraction of active weights replaced at step 0,
      cosine-decayed to 0 at ``end_step``.
    end_step: no mask update at or after this step (about 0.75 of training);
      required unless ``topology="static"``.
    seed: seed of the initial masks and of the update's random keys.
    neuron_axis: the neuron axis of every sparse leaf, for the cached
      per-neuron density factors and the structure; None (default) by role
      (:func:`~sparseopt_jax.tree.neuron_axes`).
    structure: None (unstructured), ``"fan_in"`` (every neuron keeps the same
      number of incoming weights) or ``"N:M"`` such as ``"2:4"`` (exactly N
      active in every group of M consecutive weights along the input axis;
      then ``sparsity`` must be 1 - N/M and ``distribution`` uniform). The
      initial masks and every update keep it exactly: drop and grow happen
      inside each neuron or group (see :mod:`sparseopt_jax.structure`). The
      leaf's drop count ``floor(f_t * n)`` is split over its rows (neurons or
      groups): ``floor(k / rows)`` each, one more in ``k mod rows`` rows picked
      by a seeded permutation, never more than the row's inactive weights;
      each row regrows what it dropped.

  ``update(updates, state, params, *, grow_grads=None, mask_update=None,
  **extra)``: ``params`` is required (drop ranks |w|); RigL ranks
  ``grow_grads`` if given, else the updates it receives. Both must be dense,
  which they are when pruned weights are stored as exact zeros.
  ``mask_update``: None decides in the graph; a Python bool (from
  :func:`is_mask_update_step`) fixes the variant at trace time. With True the
  masks still change only if the schedule says so.
  """
  check_choice("topology", topology, TOPOLOGIES)
  sparsity = budgets.check_sparsity(sparsity)
  distribution = budgets.check_distribution(distribution)
  keep = tree_lib.make_sparse_filter(sparse_filter)
  update_every = check_int("update_every", update_every, 1)
  drop_fraction = check_fraction("drop_fraction", drop_fraction, closed=True)
  tree_lib.check_neuron_axis(neuron_axis)
  if topology != "static":
    if end_step is None:
      raise ValueError(
          f"topology={topology!r} needs end_step (the step after which masks "
          "stay fixed, typically 0.75 of training)"
      )
    end_step = check_int("end_step", end_step, 0)
    if end_step <= update_every:
      raise ValueError(
          f"end_step {end_step} <= update_every {update_every}:"
          f" topology={topology!r} would never update the masks (the first"
          " update is at step update_every, the last before end_step); lower"
          " update_every, raise end_step, or use topology='static'"
      )
  seed = check_int("seed", seed, 0)
  spec = structure_lib.parse(structure)
  given = None if masks is None else masking.as_bool_masks(masks)
  if given is None:
    structure_lib.check_budget(spec, sparsity, distribution)
  # Per sparse leaf, the active weights of each row of a given structured mask.
  given_per_row = (
      None
      if given is None
      else structure_lib.check_masks(given, spec, neuron_axis)
  )
  given_counts = None
  if given is not None:
    given_counts = {
        path: int(np.sum(np.asarray(m)))
        for path, m in zip(
            tree_lib.leaf_paths(
                jax.tree.map(lambda m: 0, given, is_leaf=tree_lib.is_none)
            ),
            jax.tree.leaves(given, is_leaf=tree_lib.is_none),
        )
        if not tree_lib.is_none(m)
    }
  dynamic = topology != "static"
  schedule = optax.cosine_decay_schedule(drop_fraction, max(end_step or 1, 1))

  def init_fn(params):
    if tree_lib.is_params_placeholder(params):
      return TopologyState(
          step=jnp.zeros([], jnp.int32),
          key=jax.random.PRNGKey(0),
          masks=tree_lib.NOT_PARAMS,
          ever_active=tree_lib.NOT_PARAMS,
          density_factors=tree_lib.NOT_PARAMS,
          changed=jnp.zeros([], bool),
      )
    if (
        isinstance(sparse_filter, str)
        and given is None
        and not tree_lib.sparse_shapes(params, keep)
    ):
      raise ValueError(
          f"sparse_filter {sparse_filter!r} matches no leaf with ndim >= 2;"
          f" leaf paths look like {tree_lib.leaf_paths(params)[:5]}"
      )
    if given is not None:
      tree_lib.check_masks_like(given, params)
      host_masks = jax.tree.map(
          lambda m: m if tree_lib.is_none(m) else np.asarray(m),
          given,
          is_leaf=tree_lib.is_none,
      )
    else:
      host_masks = masking.host_random_masks(
          params,
          sparsity,
          distribution,
          sparse_filter=keep,
          seed=seed,
          structure=spec,
          neuron_axis=neuron_axis,
      )
    tree_lib.check_neuron_axis_fits(
        {
            tree_lib.path_str(p): m.shape
            for p, m in jax.tree_util.tree_leaves_with_path(
                host_masks, is_leaf=tree_lib.is_none
            )
            if not tree_lib.is_none(m)
        },
        neuron_axis,
    )
    to_device = lambda tree: jax.tree.map(
        lambda x: x if tree_lib.is_none(x) else jnp.asarray(x),
        tree,
        is_leaf=tree_lib.is_none,
    )
    return TopologyState(
        step=jnp.zeros([], jnp.int32),
        key=jax.random.fold_in(jax.random.PRNGKey(seed), 0x70B0),
        masks=to_device(host_masks),
        ever_active=to_device(jax.tree.map(lambda m: _pack(m, np), host_masks)),
        density_factors=to_device(
            skew_lib.mask_density_factors(host_masks, neuron_axis, np)
        ),
        changed=jnp.zeros([], bool),
    )

  def active_counts(params) -> dict[str, int]:
    """Per sparse leaf, its (constant) number of active weights; static."""
    if given_counts is not None:
      return given_counts
    shapes = tree_lib.sparse_shapes(params, keep)
    return budgets.active_counts(
        shapes,
        budgets.layer_sparsities(shapes, sparsity, distribution),
        structure=spec,
        neuron_axis=neuron_axis,
    )

  def per_row_counts(params) -> dict[str, int]:
    """Per structured leaf, the active weights of each of its rows; static."""
    if given_per_row is not None:
      return given_per_row
    shapes = tree_lib.sparse_shapes(params, keep)
    return structure_lib.per_row_counts(
        shapes,
        budgets.layer_sparsities(shapes, sparsity, distribution),
        spec,
        neuron_axis,
    )

  def next_masks(state, params, grads):
    """(masks, ever_active, density_factors) after a mask update at ``state.step``."""
    counts = active_counts(params)
    per_row = {} if spec is None else per_row_counts(params)
    f_t = schedule(state.step)
    masks_flat, treedef = jax.tree.flatten(
        state.masks, is_leaf=tree_lib.is_none
    )
    seeds = jax.random.bits(
        jax.random.fold_in(state.key, state.step),
        (len(masks_flat), 3),
        jnp.uint32,
    )
    finite = jnp.all(
        jnp.stack([
            jnp.all(jnp.isfinite(x))
            for x in jax.tree.leaves(params) + jax.tree.leaves(grads)
        ])
    )
    new = []
    # Flattened like the masks: a MaskedNode (another multi_transform branch's leaf) counts.
    flat = lambda tree: jax.tree.leaves(tree, is_leaf=tree_lib.is_none)
    paths = [
        tree_lib.path_str(p)
        for p, _ in jax.tree_util.tree_leaves_with_path(
            state.masks, is_leaf=tree_lib.is_none
        )
    ]
    for i, (path, m, w, g) in enumerate(
        zip(paths, masks_flat, flat(params), flat(grads), strict=True)
    ):
      if tree_lib.is_none(m):
        new.append(m)
        continue
      n_active = counts.get(path, m.size)
      if spec is not None:
        lay = structure_lib.layout(path, m.shape, spec, neuron_axis)
        in_row = per_row[path]
        # A row drops at most floor(alpha * in_row) + 1 (its share of the leaf's k).
        kmax = min(
            lay.row_len - in_row,
            in_row,
            math.floor(drop_fraction * in_row) + 1,
            math.floor(drop_fraction * n_active),
        )
        if kmax <= 0:
          new.append(m)
          continue
        new.append(
            _new_structured_leaf_mask(
                m,
                w,
                g,
                seeds[i],
                finite,
                k=jnp.floor(f_t * n_active).astype(jnp.int32),
                kmax=kmax,
                lay=lay,
                grow_random=topology == "set",
            )
        )
        continue
      kmax = min(m.size - n_active, math.floor(drop_fraction * n_active))
      if kmax <= 0:  # dense, or nothing to move: the leaf keeps its mask
        new.append(m)
        continue
      k = jnp.floor(f_t * n_active).astype(jnp.int32)
      new.append(
          _new_leaf_mask(
              m,
              w,
              g,
              seeds[i],
              finite,
              k=k,
              kmax=kmax,
              grow_random=topology == "set",
          )
      )
    new_masks = jax.tree.unflatten(treedef, new)
    ever = jax.tree.map(
        lambda bits, m: bits | _pack(m), state.ever_active, new_masks
    )
    factors = skew_lib.mask_density_factors(new_masks, neuron_axis)
    return new_masks, ever, factors

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
    step = optax.safe_increment(state.step)
    if not dynamic or mask_update is False:
      return (
          masking.mask_updates(updates, state.masks),
          state._replace(step=step, changed=jnp.zeros([], bool)),
      )
    if params is None:
      raise ValueError(
          f"topology_update({topology!r}) needs params in update() "
          "(the drop criterion ranks |w|)"
      )
    if mask_update is not None and not isinstance(mask_update, bool):
      raise ValueError(
          "mask_update must be None (decide in the graph) or a Python bool "
          f"(a static choice of the compiled variant), got {mask_update!r}"
      )
    grads = updates if grow_grads is None else grow_grads
    due = is_mask_update_step(
        state.step, update_every=update_every, end_step=end_step
    )

    def change(state, params, grads, updates):
      masks, ever, factors = next_masks(state, params, grads)
      if mask_update:  # the host chose this variant: still follow the schedule
        masks = jax.tree.map(
            lambda new, old: jnp.where(due, new, old), masks, state.masks
        )
        factors = jax.tree.map(
            lambda new, old: jnp.where(due, new, old),
            factors,
            state.density_factors,
        )
      # Survivors only: dropped weights get no step, grown ones start at zero.
      survivors = jax.tree.map(jnp.logical_and, state.masks, masks)
      return masks, ever, factors, masking.mask_updates(updates, survivors)

    def keep_masks(state, params, grads, updates):
      del params, grads
      return (
          state.masks,
          state.ever_active,
          state.density_factors,
          masking.mask_updates(updates, state.masks),
      )

    if mask_update:
      masks, ever, factors, updates = change(state, params, grads, updates)
    else:
      masks, ever, factors, updates = jax.lax.cond(
          due, change, keep_masks, state, params, grads, updates
      )
    return updates, TopologyState(
        step=step,
        key=state.key,
        masks=masks,
        ever_active=ever,
        density_factors=factors,
        changed=due,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
