"""Shardings of a SparseOpt optimizer state, derived from the params' shardings.

Pod-scale scripts shard the params (FSDP, tensor parallel) and give the
optimizer state the same layout. ``optax.tree_utils.tree_map_params`` does this
for the params-shaped parts of any chain holding SparseOpt (momentum, Adam's
moments), and hands the SparseOpt stages' own fields to
``transform_non_params``. :func:`state_shardings` goes one step further: each
mask takes the sharding of its param, and the per-neuron density factors the
param's sharding of the neuron axis, so that no device holds a whole mask and
the ordinary step needs no collective for the optimizer::

  param_shardings = ...                        # pytree of NamedSharding like params
  ssh = so.state_shardings(tx, params, param_shardings, NamedSharding(mesh, P()))
  opt_state = jax.jit(tx.init, out_shardings=ssh)(params)
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sparseopt_jax import masking
from sparseopt_jax import topology as topology_lib
from sparseopt_jax import tree as tree_lib


def _neuron_sharding(
    sharding: Any, axes: tuple[int, ...], ndim: int, default: Any
) -> Any:
  """The sharding of the per-neuron values of a leaf sharded by ``sharding``."""
  if not isinstance(sharding, NamedSharding):
    return default
  spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
  return NamedSharding(sharding.mesh, P(*(spec[a] for a in axes)))


def state_shardings(
    tx: optax.GradientTransformation,
    params: Any,
    param_shardings: Any,
    default: Any,
    *,
    neuron_axis: int | None = None,
) -> Any:
  """Shardings for ``tx.init(params)``, e.g. ``jax.jit(tx.init, out_shardings=...)``.

  Args:
    tx: a chain holding SparseOpt stages (any optax chain works).
    params: the params, or their shapes (``jax.ShapeDtypeStruct``).
    param_shardings: a sharding per params leaf.
    default: the sharding of everything else (counters, keys, the packed
      exploration record), typically replicated.
    neuron_axis: the neuron axis of the sparse leaves (as given to the stages).

  Returns:
    A pytree of shardings with the structure of the optimizer state (``None``
    where the state holds ``None``, at dense leaves' masks).
  """
  shapes = jax.eval_shape(tx.init, params)
  out = optax.tree_utils.tree_map_params(
      tx,
      lambda _, s: s,
      shapes,
      param_shardings,
      transform_non_params=lambda _: default,
      is_leaf=lambda x: isinstance(x, jax.sharding.Sharding),
  )
  owners = (topology_lib.TopologyState, masking.MaskState)
  is_owner = lambda x: isinstance(x, owners)

  def like_params(masks):
    return jax.tree.map(
        lambda m, s: m if tree_lib.is_none(m) else s,
        masks,
        param_shardings,
        is_leaf=tree_lib.is_none,
    )

  def fix(node, shape):
    if not is_owner(node) or shape.masks is None:
      return node
    if isinstance(shape, masking.MaskState):
      return masking.MaskState(masks=like_params(shape.masks))

    def factor_sharding(p, m, s):
      if tree_lib.is_none(m):
        return m
      axes = tree_lib.neuron_axes(
          tree_lib.path_str(p), len(m.shape), neuron_axis
      )
      return _neuron_sharding(s, axes, len(m.shape), default)

    factors = jax.tree_util.tree_map_with_path(
        factor_sharding, shape.masks, param_shardings, is_leaf=tree_lib.is_none
    )
    return shape._replace(
        step=default,
        key=default,
        changed=default,
        missed_updates=default,
        unremasked_updates=default,
        masks=like_params(shape.masks),
        ever_active=jax.tree.map(lambda _: default, shape.ever_active),
        density_factors=factors,
    )

  return jax.tree.map(fix, out, shapes, is_leaf=is_owner)
