"""Flax NNX: SparseOptimizer / remask keep the zero invariant under nnx.jit."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sparseopt_jax as so

BN_PAIRS = {"conv1/kernel": "bn1", "conv2/kernel": "bn2", "head/kernel": None}


class Net(nnx.Module):
  """conv -> BN -> relu -> conv -> BN -> relu -> pool -> linear."""

  def __init__(self, rngs, features=16, num_classes=10):
    self.conv1 = nnx.Conv(3, features, (3, 3), use_bias=False, rngs=rngs)
    self.bn1 = nnx.BatchNorm(features, momentum=0.9, epsilon=1e-5, rngs=rngs)
    self.conv2 = nnx.Conv(features, features, (3, 3), use_bias=False, rngs=rngs)
    self.bn2 = nnx.BatchNorm(features, momentum=0.9, epsilon=1e-5, rngs=rngs)
    self.head = nnx.Linear(features, num_classes, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = nnx.relu(self.bn2(self.conv2(x)))
    return self.head(jnp.mean(x, axis=(1, 2)))


@pytest.fixture(scope="module")
def batch():
  x = jax.random.normal(jax.random.PRNGKey(1), (32, 8, 8, 3))
  y = jax.random.randint(jax.random.PRNGKey(2), (32,), 0, 10)
  return x, y


def _tx(skew):
  return optax.chain(
      so.sparseopt(
          0.8,
          distribution="uniform",
          topology="rigl",
          update_every=2,
          drop_fraction=0.3,
          end_step=100,
          skew=skew,
          bn_pairs=BN_PAIRS if skew == "bn" else None,
      ),
      optax.sgd(0.1, momentum=0.9),
  )


def _loss(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def _make_step(trace_count, remask_after=False):
  @nnx.jit
  def step(model, optimizer, x, y):
    trace_count[0] += 1
    loss, grads = nnx.value_and_grad(_loss)(model, x, y)
    optimizer.update(model, grads, batch_stats=so.nnx_batch_stats(model))
    if remask_after:
      so.remask(model, optimizer)
    return loss

  return step


def _flat(tree):
  return {
      so.tree.path_str(p): x
      for p, x in jax.tree_util.tree_leaves_with_path(tree)
  }


def _check_invariant(model, optimizer):
  """Pruned params and pruned momentum entries are exactly 0; returns the masks."""
  masks = _flat(so.get_masks(nnx.as_pure(optimizer.opt_state)))
  params = _flat(nnx.as_pure(nnx.state(model, nnx.Param)))
  trace = _flat(nnx.as_pure(optimizer.opt_state)[1][0].trace)
  assert set(masks) == {"conv1/kernel", "conv2/kernel", "head/kernel"}
  for path, m in masks.items():
    m = np.asarray(m)
    assert not np.any(np.asarray(params[path])[~m]), path
    assert not np.any(np.asarray(trace[path])[~m]), path
  return masks


def _train(model, optimizer, step, batch, n_steps=20):
  masks0 = _check_invariant(model, optimizer)
  counts0 = {k: int(m.sum()) for k, m in masks0.items()}
  losses, changed, prev = [], 0, masks0
  for _ in range(n_steps):
    losses.append(float(step(model, optimizer, *batch)))
    masks = _check_invariant(model, optimizer)
    assert {k: int(m.sum()) for k, m in masks.items()} == counts0
    changed += any(not np.array_equal(masks[k], prev[k]) for k in masks)
    prev = masks
  return losses, changed


@pytest.mark.parametrize("skew", ["density", "bn"])
def test_sparse_optimizer_keeps_pruned_weights_zero(batch, skew):
  model = Net(nnx.Rngs(0))
  optimizer = so.SparseOptimizer(model, _tx(skew), wrt=nnx.Param)
  traces = [0]
  losses, changed = _train(model, optimizer, _make_step(traces), batch)
  assert traces[0] == 1  # no retrace
  assert changed >= 5  # rigl every 2 steps
  assert int(optimizer.step[...]) == 20
  assert losses[-1] < 0.9 * losses[0]
  # The invariant is non-trivial: the pruned positions held nonzero values at init.
  dense = _flat(nnx.as_pure(nnx.state(Net(nnx.Rngs(0)), nnx.Param)))
  assert np.all(np.asarray(dense["conv1/kernel"]) != 0)


def test_remask_with_plain_nnx_optimizer(batch):
  model = Net(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, _tx("density"), wrt=nnx.Param)
  so.remask(model, optimizer)
  traces = [0]
  losses, changed = _train(
      model, optimizer, _make_step(traces, remask_after=True), batch, n_steps=6
  )
  assert traces[0] == 1 and changed >= 2 and losses[-1] < losses[0]


def test_plain_nnx_optimizer_without_remask_breaks_invariant(batch):
  model = Net(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, _tx("density"), wrt=nnx.Param)
  step = _make_step([0])
  for _ in range(
      3
  ):  # step 2 is a mask update: dropped weights keep their values
    step(model, optimizer, *batch)
  with pytest.raises(AssertionError):
    _check_invariant(model, optimizer)


@pytest.mark.parametrize("skew", ["density", "bn"])
def test_nnx_path_matches_pure_pytree_path(batch, skew):
  x, y = batch
  tx = _tx(skew)
  model = Net(nnx.Rngs(0))
  optimizer = so.SparseOptimizer(model, tx, wrt=nnx.Param)
  step = _make_step([0])

  ref = Net(nnx.Rngs(0))
  graphdef, params, rest = nnx.split(ref, nnx.Param, ...)
  params, rest = nnx.as_pure(params), nnx.as_pure(rest)
  opt_state = tx.init(params)
  params = so.apply_masks(params, opt_state)

  @jax.jit
  def pure_step(params, rest, opt_state):
    def loss_fn(params):
      m = nnx.merge(graphdef, params, rest)
      return _loss(m, x, y), (
          nnx.as_pure(nnx.state(m, nnx.Not(nnx.Param))),
          so.nnx_batch_stats(m),
      )

    (loss, (new_rest, stats)), grads = jax.value_and_grad(
        loss_fn, has_aux=True
    )(params)
    updates, opt_state = tx.update(grads, opt_state, params, batch_stats=stats)
    params, opt_state = so.apply_updates(params, updates, opt_state)
    return params, new_rest, opt_state, loss

  for _ in range(5):
    loss_nnx = step(model, optimizer, x, y)
    params, rest, opt_state, loss_pure = pure_step(params, rest, opt_state)
    np.testing.assert_allclose(loss_nnx, loss_pure, rtol=1e-6)
    got = _flat(nnx.as_pure(nnx.state(model, nnx.Param)))
    want = _flat(params)
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_allclose(
          got[k], want[k], rtol=1e-6, atol=1e-8, err_msg=k
      )
    masks_nnx = _flat(so.get_masks(nnx.as_pure(optimizer.opt_state)))
    masks_pure = _flat(so.get_masks(opt_state))
    for k in masks_pure:
      np.testing.assert_array_equal(masks_nnx[k], masks_pure[k], err_msg=k)
