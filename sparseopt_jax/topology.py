"""The topology stage: RigL, SET or static masks, and the masks' owner.

Every ``update_every`` steps while ``step < end_step``, for each sparse leaf
with ``n`` active weights (Evci et al. 2020, RigL; Mocanu et al. 2018, SET):

    f_t = alpha / 2 * (1 + cos(pi * t / end_step))       (optax.cosine_decay_schedule)
    k   = floor(f_t * n)
    drop the k active weights of smallest |w|
    grow k weights that are inactive after the drop: largest |g| (RigL) or random (SET)

so every leaf keeps exactly ``n`` active weights. A weight just dropped may be
regrown. Ties are broken by tiny random noise drawn from the state's key, so a
run is deterministic for a given seed.

Mask-update step: the surviving weights take their ordinary update; dropped
weights are zeroed; grown weights start at 0.0 with zero optimizer moments and
take their first step on the next step. (Reference RigL skips the whole weight
update on these steps; inside an optax chain that would still decay momentum,
so survivors keep stepping here.)
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparseopt_jax import budgets
from sparseopt_jax.checks import check_choice, check_fraction, check_int
from sparseopt_jax import masking
from sparseopt_jax import tree as tree_lib

TOPOLOGIES = ("rigl", "set", "static")


class TopologyState(NamedTuple):
  """State of :func:`topology_update`; it owns the masks of the chain.

  Attributes:
    count: number of updates seen so far (int32); a mask update happens when it
      is a positive multiple of ``update_every`` below ``end_step``.
    key: PRNG key for tie-breaking and SET's random growth.
    masks: bool array per sparse leaf (True = active), None at dense leaves.
    ever_active: per sparse leaf, a packed bit per weight (``jnp.packbits``,
      1/8 byte per weight) marking weights active at any step since init; the
      exploration (ITOP) rate is its mean.
  """
  count: jax.Array
  key: jax.Array
  masks: Any
  ever_active: Any


masking.MASK_OWNERS.append(TopologyState)


def _jittered(magnitude: jax.Array, dtype: Any, key: jax.Array) -> jax.Array:
  """``magnitude`` (float32, >= 0) plus noise that reorders only exact ties.

  The noise is below half a unit in the last place of ``dtype``, so distinct
  values keep their order; exact zeros become tiny distinct positives.
  """
  u = jax.random.uniform(key, magnitude.shape, jnp.float32)
  rel = 0.25 * float(jnp.finfo(dtype).eps)
  return jnp.where(magnitude == 0, u * 1e-30, magnitude * (1.0 + u * rel))


def _select(score: jax.Array, candidates: jax.Array, k: jax.Array, kmax: int) -> jax.Array:
  """Bool vector marking the ``k`` best-scoring candidates (``k <= kmax``, static kmax)."""
  _, idx = jax.lax.top_k(jnp.where(candidates, score, -jnp.inf), kmax)
  return jnp.zeros(score.shape, bool).at[idx].set(jnp.arange(kmax) < k)


def _new_leaf_mask(mask, weight, grad, k, kmax, key, grow_random):
  shape = mask.shape
  mask, weight, grad = mask.reshape(-1), weight.reshape(-1), grad.reshape(-1)
  k_drop, k_grow = jax.random.split(key)
  drop_score = -_jittered(jnp.abs(weight).astype(jnp.float32), weight.dtype, k_drop)
  kept = mask & ~_select(drop_score, mask, k, kmax)
  if grow_random:
    grow_score = jax.random.uniform(k_grow, mask.shape)
  else:
    grow_score = _jittered(jnp.abs(grad).astype(jnp.float32), grad.dtype, k_grow)
  grown = _select(grow_score, ~kept, k, kmax)
  return (kept | grown).reshape(shape)


def _pack(mask: jax.Array) -> jax.Array:
  return jnp.packbits(mask.reshape(-1))


def _unpack(bits: jax.Array, n: int) -> jax.Array:
  return jnp.unpackbits(bits, count=n).astype(bool)


def exploration_counts(state: TopologyState) -> tuple[int, int]:
  """(weights ever active, sparse weights in all) over the sparse leaves."""
  ever = total = 0
  for m, bits in zip(jax.tree.leaves(state.masks), jax.tree.leaves(state.ever_active)):
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
    update_every: Delta-T, steps between mask updates.
    drop_fraction: alpha, the fraction of active weights replaced at step 0,
      cosine-decayed to 0 at ``end_step``.
    end_step: no mask update at or after this step (about 0.75 of training);
      required unless ``topology="static"``.
    seed: seed of the initial masks and of the update noise.

  ``update(updates, state, params, *, grow_grads=None, **extra)``: ``params``
  is required (drop ranks |w|); RigL ranks ``grow_grads`` if given, else the
  updates it receives. Both must be dense, which they are when pruned weights
  are stored as exact zeros.
  """
  check_choice("topology", topology, TOPOLOGIES)
  sparsity = budgets.check_sparsity(sparsity)
  distribution = budgets.check_distribution(distribution)
  keep = tree_lib.make_sparse_filter(sparse_filter)
  update_every = check_int("update_every", update_every, 1)
  drop_fraction = check_fraction("drop_fraction", drop_fraction, closed=True)
  if topology != "static":
    if end_step is None:
      raise ValueError(f"topology={topology!r} needs end_step (the step after which masks "
                       "stay fixed, typically 0.75 of training)")
    end_step = check_int("end_step", end_step, 0)
  seed = check_int("seed", seed, 0)
  given = None if masks is None else masking.as_bool_masks(masks)
  given_counts = None
  if given is not None:
    given_counts = {path: int(np.sum(np.asarray(m))) for path, m in zip(
        tree_lib.leaf_paths(jax.tree.map(lambda m: 0, given, is_leaf=tree_lib.is_none)),
        jax.tree.leaves(given, is_leaf=tree_lib.is_none)) if m is not None}
  dynamic = topology != "static"
  schedule = optax.cosine_decay_schedule(drop_fraction, max(end_step or 1, 1))

  def active_counts(params) -> dict[str, int]:
    """Per sparse leaf, its (constant) number of active weights; static."""
    if given_counts is not None:
      return given_counts
    shapes = tree_lib.sparse_shapes(params, keep)
    return budgets.active_counts(shapes, budgets.layer_sparsities(shapes, sparsity, distribution))

  def init_fn(params):
    if given is not None:
      tree_lib.check_masks_like(given, params)
      init_masks = given
    else:
      init_masks = masking.random_masks(params, sparsity, distribution,
                                        sparse_filter=keep, seed=seed)
    return TopologyState(
        count=jnp.zeros([], jnp.int32),
        key=jax.random.fold_in(jax.random.PRNGKey(seed), 1),
        masks=init_masks,
        ever_active=jax.tree.map(_pack, init_masks))

  def next_masks(state, params, grads):
    counts = active_counts(params)
    f_t = schedule(state.count)
    step_key = jax.random.fold_in(state.key, state.count)
    paths = tree_lib.leaf_paths(jax.tree.map(lambda m: 0, state.masks, is_leaf=tree_lib.is_none))
    flat_masks = jax.tree.leaves(state.masks, is_leaf=tree_lib.is_none)
    flat_params = jax.tree.leaves(params)
    flat_grads = jax.tree.leaves(grads)
    new = []
    for i, (path, m, w, g) in enumerate(zip(paths, flat_masks, flat_params, flat_grads)):
      if m is None:
        new.append(None)
        continue
      n_active = counts.get(path, m.size)
      kmax = min(m.size - n_active, math.floor(drop_fraction * n_active))
      if kmax <= 0:  # dense, or nothing to move: the leaf keeps its mask
        new.append(m)
        continue
      k = jnp.floor(f_t * n_active).astype(jnp.int32)
      new.append(_new_leaf_mask(m, w, g, k, kmax, jax.random.fold_in(step_key, i),
                                grow_random=topology == "set"))
    new_masks = jax.tree.unflatten(jax.tree.structure(state.masks, is_leaf=tree_lib.is_none), new)
    ever = jax.tree.map(lambda bits, m: bits | _pack(m), state.ever_active, new_masks)
    return new_masks, ever

  def update_fn(updates, state, params=None, *, grow_grads=None, **extra_args):
    del extra_args
    masks = state.masks
    if dynamic:
      if params is None:
        raise ValueError(f"topology_update({topology!r}) needs params in update() "
                         "(the drop criterion ranks |w|)")
      grads = updates if grow_grads is None else grow_grads
      is_update = ((state.count > 0) & (state.count % update_every == 0)
                   & (state.count < end_step))
      masks, ever = jax.lax.cond(
          is_update, next_masks, lambda s, p, g: (s.masks, s.ever_active), state, params, grads)
      # Survivors only: dropped weights get no step, grown ones start at zero.
      keep_mask = jax.tree.map(jnp.logical_and, state.masks, masks)
      state = state._replace(masks=masks, ever_active=ever)
    else:
      keep_mask = masks
    updates = masking.mask_updates(updates, keep_mask)
    return updates, state._replace(count=optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
