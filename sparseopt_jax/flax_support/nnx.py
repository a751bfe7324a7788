"""Flax NNX support: an ``nnx.Optimizer`` that keeps pruned weights at exactly zero.

``nnx.Optimizer.update`` ends with ``optax.apply_updates``, which is not enough
for sparse training: on a mask-update step the dropped weights keep their value
and their momentum. :class:`SparseOptimizer` is an ``nnx.Optimizer`` whose
``update`` then re-masks the model's params and every params-shaped subtree of
the optimizer state, exactly as :func:`~sparseopt_jax.apply_updates` does for
pytrees::

  optimizer = so.SparseOptimizer(model, optax.chain(so.sparseopt(0.9, ...), optax.sgd(...)),
                                 wrt=nnx.Param)   # also zeroes the pruned weights once

  @nnx.jit
  def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads, batch_stats=so.nnx_batch_stats(model))  # for skew="bn"
    return loss

It also initialises the transform on plain arrays (``nnx.as_pure``) rather than
on ``nnx.Variable``s, so leaf paths are ``'conv/kernel'`` at init as at update
time (``nnx.Optimizer`` inits on Variables, whose paths end in ``'/value'``):
``bn_pairs``, ``sparse_filter`` regexes and ``distribution`` mappings see the
same names in both. With a plain ``nnx.Optimizer``, call :func:`remask` after
every ``update`` instead (fine for ``skew="density"`` or None; ``skew="bn"``
needs :class:`SparseOptimizer`, because ``bn_pairs`` is checked at init).
"""

from __future__ import annotations

from typing import Any

import optax
from flax import nnx

from sparseopt_jax import masking


def nnx_batch_stats(model: Any, filter: Any = nnx.BatchStat) -> nnx.State:
  """The model's BatchNorm statistics as a pure ``State`` for ``batch_stats=``.

  Leaves are plain arrays at paths like ``'bn1/mean'`` and ``'bn1/var'``, so
  ``bn_pairs={'conv1/kernel': 'bn1'}`` (kernel path -> BatchNorm attribute
  path) finds ``'bn1/var'``. ``SparseOptimizer.update`` would also accept
  ``nnx.state(model, nnx.BatchStat)`` directly (``nnx.Optimizer.update`` makes
  its keyword arguments pure); this helper is for the pure-pytree
  ``tx.update(...)`` path too.
  """
  return nnx.as_pure(nnx.state(model, filter))


def remask(
    model: Any, optimizer: nnx.Optimizer, *, mask_update: bool | None = True
) -> None:
  """Zero the pruned weights of ``model`` and their entries in ``optimizer.opt_state``.

  Call it after ``optimizer.update(model, grads)`` of a plain ``nnx.Optimizer``
  whose ``tx`` holds a SparseOpt stage (``so.sparseopt``, ``so.topology_update``
  or ``so.mask(masks)``), and once after building it. :class:`SparseOptimizer`
  calls it for you. Works eagerly and inside ``nnx.jit``; mutates in place.

  ``mask_update``: True re-masks the optimizer state too; None only if the
  masks changed in the last update (as :func:`~sparseopt_jax.apply_updates`);
  False (an ordinary host-scheduled step) re-masks the params alone.
  """
  graph = getattr(optimizer, "graph", None)
  params = nnx.as_pure(nnx.state(model, optimizer.wrt, graph=graph))
  opt_state = nnx.as_pure(optimizer.opt_state)
  masks = masking.get_masks(opt_state)
  nnx.update(model, masking.apply_masks(params, masks))
  if mask_update is not False:
    new_opt_state = masking.remask_state(opt_state, params, masks, mask_update)
    nnx.update(optimizer.opt_state, nnx.state(new_opt_state, graph=graph))


def _init_on_arrays(
    tx: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
  """``tx`` whose ``init`` strips ``nnx.Variable`` wrappers first (update unchanged)."""
  return optax.GradientTransformationExtraArgs(
      lambda params: tx.init(nnx.as_pure(params)), tx.update
  )


class SparseOptimizer(nnx.Optimizer):
  """``nnx.Optimizer`` for SparseOpt chains: every pruned weight stays exactly 0.0.

  Same constructor and ``update(model, grads, **kwargs)`` as ``nnx.Optimizer``
  (``kwargs``, e.g. ``batch_stats=``, go to ``tx.update``). Differences:

  - the transform is initialised on pure arrays, so leaf paths carry no
    ``'/value'`` suffix (what ``bn_pairs`` and path regexes expect);
  - construction zeroes the pruned weights of ``model`` (``so.apply_masks``);
  - ``update`` re-masks the model's params and every params-shaped subtree of
    ``opt_state`` (momentum, Adam moments, ...) after the ordinary update, as
    :func:`~sparseopt_jax.apply_updates` does.

  The masks are ``so.get_masks(nnx.as_pure(optimizer.opt_state))``.
  """

  def __init__(
      self,
      model: Any,
      tx: optax.GradientTransformation,
      *,
      wrt: Any,
      graph: bool | None = None,
  ):
    super().__init__(model, _init_on_arrays(tx), wrt=wrt, graph=graph)
    self.tx = tx
    remask(model, self)

  def update(self, model: Any, grads: Any, /, **kwargs) -> optax.Updates:
    """``nnx.Optimizer.update``, then :func:`remask`; ``mask_update=`` goes to both."""
    updates = super().update(model, grads, **kwargs)
    remask(model, self, mask_update=kwargs.get("mask_update"))
    return updates
