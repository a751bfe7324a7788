"""The mask stage, and keeping pruned weights at exactly zero.

A *mask* is a pytree shaped like the params: a boolean array at every sparse
leaf (True = the weight is active) and ``None`` at every dense leaf. Exactly
one state in an optimizer chain owns the masks (a :class:`MaskState` built with
masks, or a :class:`~sparseopt_jax.topology.TopologyState`): a stage state
says so through the small :class:`MaskOwner` protocol, which this module reads
without knowing the stages. :func:`get_masks` finds the owner and
:func:`apply_updates` uses it to keep the invariant

    every pruned weight, and every optimizer-state entry of a pruned weight, is 0.0

whatever inner optimizer the chain holds.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparseopt_jax import budgets
from sparseopt_jax import structure as structure_lib
from sparseopt_jax import tree as tree_lib


class MaskOwner(Protocol):
  """What :func:`get_masks` and :func:`apply_updates` ask of a stage state.

  A state whose class has these methods takes part; it owns the chain's masks
  when ``owns_masks()`` is true, and exactly one state of a chain may.
  """

  masks: Any

  def owns_masks(self) -> bool:
    """Whether ``masks`` are the chain's masks."""

  def masks_changed(self) -> Any:
    """Whether the last update changed the masks: a bool array, or False."""

  def note_unremasked(self) -> Any:
    """This state after an ``apply_updates`` that skipped re-masking the state."""


def is_stage_state(x: Any) -> bool:
  """Whether ``x`` follows the :class:`MaskOwner` protocol."""
  return callable(getattr(type(x), "owns_masks", None))


class MaskState(NamedTuple):
  """State of :func:`mask`.

  Attributes:
    masks: the fixed masks given at construction (bool at sparse leaves, None at
      dense ones), or None when the masks come from ``update(..., masks=...)``.
  """

  masks: Any

  def owns_masks(self) -> bool:
    return self.masks is not None

  def masks_changed(self) -> bool:
    return False  # fixed masks

  def note_unremasked(self) -> MaskState:
    return self


def as_bool_masks(masks: Any) -> Any:
  """Masks as bool arrays; non-bool masks must hold only 0 and 1 (checked when concrete)."""

  def convert(p, m):
    if tree_lib.is_none(m):
      return m
    m = jnp.asarray(m)
    if m.dtype != jnp.bool_ and not isinstance(m, jax.core.Tracer):
      values = np.unique(np.asarray(m))
      if not np.all((values == 0) | (values == 1)):
        raise ValueError(
            f"mask leaf {tree_lib.path_str(p)!r} has dtype {m.dtype} with"
            " values other than 0 and 1 (e.g."
            f" {values[(values != 0) & (values != 1)][:3]}); masks are boolean:"
            " True keeps a weight"
        )
    return m.astype(bool)

  return jax.tree_util.tree_map_with_path(
      convert, masks, is_leaf=tree_lib.is_none
  )


def mask_updates(updates: Any, masks: Any) -> Any:
  """Zero the entries of ``updates`` where ``masks`` is False."""
  return tree_lib.map_with_masks(
      lambda m, u: jnp.where(m, u, jnp.zeros((), u.dtype)), masks, updates
  )


def mask(masks: Any = None) -> optax.GradientTransformationExtraArgs:
  """Zero the gradient of every pruned weight: ``u <- u * m``.

  On its own (``optax.chain(so.mask(masks), optax.sgd(...))`` with
  :func:`apply_updates`) this is static sparse training with the given masks.

  Args:
    masks: pytree like the params, bool arrays at sparse leaves and None at
      dense ones. If None, every ``update`` must receive the current masks as
      the keyword ``masks=`` (this is how :func:`~sparseopt_jax.sparseopt`
      shares the masks that its topology stage owns).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; unknown keyword arguments to
    ``update`` are ignored.
  """
  given = None if masks is None else as_bool_masks(masks)

  def init_fn(params):
    if given is not None:
      if tree_lib.is_params_placeholder(params):
        return MaskState(masks=tree_lib.NOT_PARAMS)
      tree_lib.check_masks_like(given, params)
    return MaskState(masks=given)

  def update_fn(updates, state, params=None, *, masks=None, **extra_args):
    del params, extra_args
    current = masks if masks is not None else state.masks
    if current is None:
      raise ValueError(
          "so.mask() was built without masks, so update() needs the current "
          "masks as the keyword masks=..."
      )
    return mask_updates(updates, current), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def host_random_masks(
    params: Any,
    sparsity: float,
    distribution: budgets.Distribution = "uniform",
    *,
    sparse_filter: tree_lib.SparseFilter = None,
    seed: int = 0,
    structure: str | None = None,
    neuron_axis: int | None = None,
) -> Any:
  """:func:`random_masks` as numpy arrays, drawn on the host.

  Only the params' shapes are read, so this runs on traced or abstract params
  too. Leaf i draws from ``numpy.random.default_rng((seed, i))``: a stream of
  its own, independent of every other leaf's and of the topology stage's key.
  """
  keep = tree_lib.make_sparse_filter(sparse_filter)
  shapes = tree_lib.sparse_shapes(params, keep)
  spec = structure_lib.parse(structure)
  structure_lib.check_shapes(shapes, spec, neuron_axis)
  sparsities = budgets.layer_sparsities(shapes, sparsity, distribution)
  counts = budgets.active_counts(shapes, sparsities)
  if spec is not None:
    per_row = structure_lib.per_row_counts(
        shapes, sparsities, spec, neuron_axis
    )
  index = {path: i for i, path in enumerate(shapes)}

  def leaf_mask(p, x):
    path = tree_lib.path_str(p)
    if path not in shapes:
      return None
    n = math.prod(shapes[path])
    rng = np.random.default_rng((seed, index[path]))
    if spec is not None:
      lay = structure_lib.layout(path, shapes[path], spec, neuron_axis)
      return structure_lib.host_mask(lay, per_row[path], rng)
    mask = np.zeros(n, bool)
    mask[rng.choice(n, counts[path], replace=False)] = True
    return mask.reshape(shapes[path])

  return jax.tree_util.tree_map_with_path(leaf_mask, params)


def random_masks(
    params: Any,
    sparsity: float,
    distribution: budgets.Distribution = "uniform",
    *,
    sparse_filter: tree_lib.SparseFilter = None,
    seed: int = 0,
    structure: str | None = None,
    neuron_axis: int | None = None,
) -> Any:
  """Random masks with exactly round((1 - s_l) * n_l) active weights per sparse leaf.

  ``s_l`` comes from :func:`~sparseopt_jax.budgets.layer_sparsities`; the active
  positions of each leaf are uniform at random, so per-neuron densities vary
  binomially around ``1 - s_l`` as in RigL and SET. Drawn with numpy on the host
  (:func:`host_random_masks`): no per-shape compilation, and the same masks
  eagerly, under ``jax.jit`` and under ``jax.eval_shape``.

  With ``structure="fan_in"`` every neuron (``neuron_axis``, by role if None)
  keeps clip(round(fan_in (1 - s_l)), 1, fan_in) weights at random; with
  ``"N:M"`` every group of M consecutive inputs keeps N at random (see
  :mod:`sparseopt_jax.structure`).
  """
  host = host_random_masks(
      params,
      sparsity,
      distribution,
      sparse_filter=sparse_filter,
      seed=seed,
      structure=structure,
      neuron_axis=neuron_axis,
  )
  return jax.tree.map(
      lambda m: m if tree_lib.is_none(m) else jnp.asarray(m),
      host,
      is_leaf=tree_lib.is_none,
  )


def _owners(state: Any) -> list[Any]:
  """The stage states in ``state`` that own the chain's masks (:class:`MaskOwner`)."""
  found = jax.tree.leaves(state, is_leaf=is_stage_state)
  return [s for s in found if is_stage_state(s) and s.owns_masks()]


def _owner_masks(state: Any) -> list[Any]:
  return [s.masks for s in _owners(state)]


def get_masks(state: Any) -> Any:
  """The masks owned by an optimizer state (a whole chain's state is fine).

  Raises:
    ValueError: if no stage of the state owns masks, or more than one does.
  """
  found = _owner_masks(state)
  if len(found) != 1:
    raise ValueError(
        "expected exactly one mask-owning state (MaskState with masks, or"
        f" TopologyState) in the optimizer state, found {len(found)}; build the"
        " chain with so.sparseopt(...), so.topology_update(...) or"
        " so.mask(masks)"
    )
  return found[0]


def resolve_masks(masks_or_state: Any) -> Any:
  return (
      get_masks(masks_or_state)
      if _owner_masks(masks_or_state)
      else masks_or_state
  )


def apply_masks(params: Any, masks_or_state: Any) -> Any:
  """Zero the pruned weights: ``params * mask``. Takes masks or an optimizer state."""
  return mask_updates(params, resolve_masks(masks_or_state))


def _mask_like_params(
    state: Any, params: Any, masks: Any, changed: Any = True
) -> Any:
  """Zero the pruned entries of every state subtree that is shaped like the params.

  With a traced ``changed``, only where it holds (``where(m | ~changed, x,
  0)``: a select that fuses into the producer of ``x``, no conditional).

  A subtree counts as shaped like the params when it is of the same container
  type and each of its leaves sits at a params path with that param's shape.
  This finds momentum, Adam's moments, Lion's and inject_hyperparams' inner
  states, and ``optax.masked``'s state (whose masked-out leaves are
  ``MaskedNode``s), without knowing any optimizer's state class.
  """
  shapes = {
      tree_lib.path_str(p): jnp.shape(x)
      for p, x in jax.tree_util.tree_leaves_with_path(params)
  }
  by_path = {
      tree_lib.path_str(p): m
      for p, m in jax.tree_util.tree_leaves_with_path(
          masks, is_leaf=tree_lib.is_none
      )
  }

  def like_params(node):
    if type(node) is not type(params):
      return False
    leaves = jax.tree_util.tree_leaves_with_path(node)
    return bool(leaves) and all(
        shapes.get(tree_lib.path_str(p), None) == jnp.shape(x)
        for p, x in leaves
    )

  def remask(p, x):
    m = by_path.get(tree_lib.path_str(p))
    if tree_lib.is_none(m):
      return x
    keep = m if changed is True else m | ~changed
    return jnp.where(keep, x, jnp.zeros((), x.dtype))

  def visit(node):
    if is_stage_state(node) or node is None:
      return node
    if like_params(node):
      return jax.tree_util.tree_map_with_path(remask, node)
    children, treedef = jax.tree_util.tree_flatten(
        node, is_leaf=lambda x: x is not node
    )
    if jax.tree_util.treedef_is_leaf(treedef):
      return node
    return jax.tree_util.tree_unflatten(treedef, [visit(c) for c in children])

  return visit(state)


def _needs_state_remask(state: Any) -> Any:
  """Whether the masks changed in the last update (bool array), or False if they never do."""
  found = _owners(state)
  return found[0].masks_changed() if len(found) == 1 else True


def _note_unremasked(state: Any) -> Any:
  """``state`` with its owner's record of a mask change left unremasked."""
  return jax.tree.map(
      lambda x: x.note_unremasked() if is_stage_state(x) else x,
      state,
      is_leaf=is_stage_state,
  )


def apply_updates(
    params: Any, updates: Any, state: Any, *, mask_update: bool | None = None
) -> tuple[Any, Any]:
  """``optax.apply_updates``, re-masking the params, and the optimizer state after a mask update.

  After it every pruned weight is exactly 0.0, and so is every entry for a
  pruned weight in any optimizer-state subtree shaped like the params (so a
  weight grown later starts from zero moments).

  Why the state needs re-masking only after a mask update: the chain zeroes the
  gradient of every pruned weight, and an element-wise optimizer (SGD momentum,
  Adam, AdamW, Lion, ...; also under ``inject_hyperparams`` or ``MultiSteps``)
  maps a zero gradient with zero state to zero state. Only dropping a weight
  leaves state behind. So on an ordinary step only the params are masked, fused
  with the update.

  Args:
    mask_update: None (the in-graph form) re-masks the state where the
      state's record says the masks changed: a select per entry that fuses
      into the optimizer's pass, cheaper than a conditional that copies the
      state. A Python bool, the same one given to ``tx.update``, decides at
      trace time (the host-scheduled step: False leaves the state as it is).

  Returns:
    ``(new_params, new_state)``.
  """
  masks = get_masks(state)
  params = mask_updates(optax.apply_updates(params, updates), masks)
  return params, remask_state(state, params, masks, mask_update)


def remask_state(
    state: Any, params: Any, masks: Any, mask_update: bool | None = None
) -> Any:
  """Zero the pruned entries of the params-shaped subtrees of ``state`` if the masks changed.

  ``mask_update`` as in :func:`apply_updates`: None re-masks where the state
  says the masks changed (a select, no conditional), True re-masks, False
  leaves the state (and counts a mask change it leaves unmasked).
  """
  if mask_update is False:
    # Counted, not silent: a flag here out of step with tx.update's leaves
    # the dropped weights' moments behind (sparsity_summary reports it).
    return _note_unremasked(state)
  if mask_update:
    return _mask_like_params(state, params, masks)
  changed = _needs_state_remask(state)
  if changed is False:
    return state  # masks that never change
  # No conditional: zeroing the pruned entries where the masks changed is a
  # select per entry that fuses into the optimizer's own pass over its state;
  # a lax.cond would copy the whole state on every step instead.
  return _mask_like_params(state, params, masks, changed)
