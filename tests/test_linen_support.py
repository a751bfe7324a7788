"""Flax linen: SparseTrainState keeps pruned weights at zero where TrainState does not."""

import jax
import jax.numpy as jnp
import optax
import pytest
from flax.training import train_state

import sparseopt_jax as so
from conftest import BN_PAIRS


def _loss(model, params, batch_stats, batch):
  x, y = batch
  logits, new_vars = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                 mutable=["batch_stats"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new_vars


def _run(model, variables, batch, state_cls, skew="density", steps=6):
  tx = optax.chain(so.sparseopt(0.9, distribution="uniform", update_every=2, end_step=20,
                                skew=skew, bn_pairs=BN_PAIRS if skew == "bn" else None),
                   optax.sgd(0.1, momentum=0.9))
  state = state_cls.create(apply_fn=model.apply, params=variables["params"], tx=tx)
  stats = variables["batch_stats"]

  @jax.jit
  def step(state, stats):
    grads, new_vars = jax.grad(lambda p: _loss(model, p, stats, batch), has_aux=True)(state.params)
    new_stats = new_vars["batch_stats"]
    if state_cls is so.SparseTrainState:
      return state.apply_gradients(grads=grads, batch_stats=new_stats), new_stats
    return state.apply_gradients(grads=grads), new_stats

  for _ in range(steps):
    state, stats = step(state, stats)
  return state


def test_plain_train_state_drifts_and_check_sparsity_catches_it(small_net):
  model, variables, batch = small_net
  state = _run(model, variables, batch, train_state.TrainState)
  summary = so.sparsity_summary(state.opt_state, params=state.params)
  assert summary["pruned_nonzero"] > 0
  assert summary["params_sparsity"] < summary["sparsity"] - 0.01
  with pytest.raises(ValueError, match=r"pruned weights are not 0\.0.*'Conv_\d/kernel' \("):
    so.check_sparsity(state.params, state.opt_state)


@pytest.mark.parametrize("skew", ["density", "bn"])
def test_sparse_train_state_keeps_pruned_weights_zero(small_net, skew):
  model, variables, batch = small_net
  state = _run(model, variables, batch, so.SparseTrainState, skew=skew)
  assert int(state.step) == 6
  so.check_sparsity(state.params, state.opt_state)  # raises on any drift
  summary = so.sparsity_summary(state.opt_state, params=state.params)
  assert summary["pruned_nonzero"] == 0
  assert summary["params_sparsity"] >= summary["sparsity"]
  masks = so.get_masks(state.opt_state)
  initial = so.get_masks(state.tx.init(variables["params"]))
  assert not jax.tree.all(jax.tree.map(jnp.array_equal, masks, initial))
