"""Flax NNX with ``so.SparseOptimizer``: RigL at 90% with the density correction.

``so.SparseOptimizer`` is an ``nnx.Optimizer`` whose ``update`` also re-masks
the model's params and the optimizer state, so pruned weights stay exactly
zero. The task is a random linear regression, so the script needs no data::

  python examples/nnx_mlp.py --steps 100
"""

import argparse

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import sparseopt_jax as so


class Mlp(nnx.Module):

  def __init__(self, rngs: nnx.Rngs, width: int = 64):
    self.fc1 = nnx.Linear(32, width, rngs=rngs)
    self.norm = nnx.LayerNorm(width, rngs=rngs)
    self.fc2 = nnx.Linear(width, 8, rngs=rngs)

  def __call__(self, x):
    return self.fc2(nnx.relu(self.norm(self.fc1(x))))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=100)
  args = parser.parse_args(argv)

  model = Mlp(nnx.Rngs(0))
  tx = optax.chain(
      so.sparseopt(0.9, update_every=10, end_step=max(args.steps, 11)),
      optax.adam(1e-2),
  )
  optimizer = so.SparseOptimizer(model, tx, wrt=nnx.Param)
  target = jax.random.normal(jax.random.PRNGKey(1), (32, 8))

  def loss_fn(model, x):
    return jnp.mean((model(x) - x @ target) ** 2)

  @nnx.jit
  def train_step(model, optimizer, x):
    loss, grads = nnx.value_and_grad(loss_fn)(model, x)
    optimizer.update(model, grads)
    return loss

  for step in range(args.steps):
    x = jax.random.normal(jax.random.PRNGKey(100 + step), (64, 32))
    loss = train_step(model, optimizer, x)
  state = nnx.as_pure(optimizer.opt_state)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  summary = so.sparsity_summary(state, params=params)
  assert summary["pruned_nonzero"] == 0
  print(
      f"{args.steps} steps: loss {float(loss):.3f}, sparsity"
      f" {summary['sparsity']:.3f}"
  )
  return summary


if __name__ == "__main__":
  main()
