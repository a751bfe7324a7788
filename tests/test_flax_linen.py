"""Flax linen bridge: bn_pairs on hand-made models; SparseTrainState keeps pruned weights
at zero where TrainState does not."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from conftest import BN_PAIRS
from flax.training import train_state

import sparseopt_jax as so
from sparseopt_jax.flax_support.linen import bn_pairs


def _loss(model, params, batch_stats, batch):
  x, y = batch
  logits, new_vars = model.apply(
      {"params": params, "batch_stats": batch_stats},
      x,
      train=True,
      mutable=["batch_stats"],
  )
  return (
      optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(),
      new_vars,
  )


def _run(model, variables, batch, state_cls, skew="density", steps=6):
  tx = optax.chain(
      so.sparseopt(
          0.9,
          distribution="uniform",
          update_every=2,
          end_step=20,
          skew=skew,
          bn_pairs=BN_PAIRS if skew == "bn" else None,
      ),
      optax.sgd(0.1, momentum=0.9),
  )
  state = state_cls.create(
      apply_fn=model.apply, params=variables["params"], tx=tx
  )
  stats = variables["batch_stats"]

  @jax.jit
  def step(state, stats):
    grads, new_vars = jax.grad(
        lambda p: _loss(model, p, stats, batch), has_aux=True
    )(state.params)
    new_stats = new_vars["batch_stats"]
    if state_cls is so.SparseTrainState:
      return (
          state.apply_gradients(grads=grads, batch_stats=new_stats),
          new_stats,
      )
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
  with pytest.raises(
      ValueError, match=r"pruned weights are not 0\.0.*'Conv_\d/kernel' \("
  ):
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


# ---------------------------------------------------------------------------
# bn_pairs on hand-made models
# ---------------------------------------------------------------------------


class _ConvBnDense(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Conv(8, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.relu(x)
    x = x.reshape((x.shape[0], -1))
    x = nn.Dense(6)(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    return nn.Dense(3)(x)


def test_bn_pairs_hand_made_model():
  pairs = bn_pairs(_ConvBnDense(), jnp.zeros((2, 5, 5, 2)), train=True)
  assert pairs == {
      "Conv_0/kernel": "BatchNorm_0",
      "Dense_0/kernel": "BatchNorm_1",
      "Dense_1/kernel": None,
  }


class _Crossed(nn.Module):
  """Misleading names, setup-style submodules, crossed wiring."""

  def setup(self):
    self.bn_a = nn.Dense(5)
    self.conv_b = nn.BatchNorm(use_running_average=False)
    self.dense_c = nn.Dense(5)
    self.bn_c = nn.BatchNorm(use_running_average=False)
    self.pre_act = nn.Dense(5)
    self.bn_d = nn.BatchNorm(use_running_average=False)

  def __call__(self, x):
    h1, h2 = self.bn_a(x), self.dense_c(x)
    h3 = self.bn_d(
        nn.relu(self.pre_act(x))
    )  # activation in between -> unpaired
    return self.bn_c(h1) + self.conv_b(h2) + h3


def test_bn_pairs_does_not_use_names():
  pairs = bn_pairs(_Crossed(), jnp.zeros((2, 4)))
  assert pairs == {
      "bn_a/kernel": "bn_c",
      "dense_c/kernel": "conv_b",
      "pre_act/kernel": None,
  }


class _BnOnBatchAxis(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.BatchNorm(use_running_average=False, axis=0)(nn.Dense(5)(x))


class _TwoBns(nn.Module):

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(5)(x)
    return nn.BatchNorm(use_running_average=False)(h) + nn.BatchNorm(
        use_running_average=False
    )(h)


def test_bn_pairs_errors():
  with pytest.raises(ValueError, match="Dense_0/kernel"):
    bn_pairs(
        _BnOnBatchAxis(), jnp.zeros((2, 4))
    )  # BN features (2,) != 5 neurons
  with pytest.raises(ValueError, match="ambiguous"):
    bn_pairs(_TwoBns(), jnp.zeros((2, 4)))
