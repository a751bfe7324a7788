"""Flax linen support: a ``TrainState`` whose ``apply_gradients`` keeps pruned weights at 0.

``flax.training.train_state.TrainState.apply_gradients`` ends with
``optax.apply_updates`` and passes no extra arguments to ``tx.update``: with a
SparseOpt chain, dropped weights would keep their value and momentum, and
``skew="bn"`` could not read the BatchNorm statistics. :class:`SparseTrainState`
is the same class with both fixed::

  state = so.SparseTrainState.create(apply_fn=model.apply, params=variables["params"],
                                     tx=optax.chain(so.sparseopt(0.9, ...), optax.sgd(...)))
  state = state.apply_gradients(grads=grads)                         # in a jitted step
  state = state.apply_gradients(grads=grads, batch_stats=new_stats)  # skew="bn"
"""

from __future__ import annotations

from typing import Any

from flax.training import train_state

from sparseopt_jax import masking


class SparseTrainState(train_state.TrainState):
  """``TrainState`` for SparseOpt chains: every pruned weight stays exactly 0.0.

  ``create`` zeroes the pruned weights once; ``apply_gradients(grads=...,
  mask_update=None, batch_stats=None, **replace)`` calls ``tx.update`` with
  ``mask_update`` and ``batch_stats`` (for ``skew="bn"``) and applies the
  updates with :func:`~sparseopt_jax.apply_updates`; other keyword arguments
  replace fields, as in Flax.
  """

  def apply_gradients(self, *, grads: Any, mask_update: bool | None = None,
                      batch_stats: Any = None, **kwargs) -> "SparseTrainState":
    extra = {} if batch_stats is None else {"batch_stats": batch_stats}
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params,
                                        mask_update=mask_update, **extra)
    params, opt_state = masking.apply_updates(self.params, updates, opt_state,
                                              mask_update=mask_update)
    return self.replace(step=self.step + 1, params=params, opt_state=opt_state, **kwargs)

  @classmethod
  def create(cls, *, apply_fn: Any, params: Any, tx: Any, **kwargs) -> "SparseTrainState":
    state = super().create(apply_fn=apply_fn, params=params, tx=tx, **kwargs)
    return state.replace(params=masking.apply_masks(state.params, state.opt_state))
