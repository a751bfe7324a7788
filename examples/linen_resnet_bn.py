"""A Flax linen ResNet trained with SparseOpt's BatchNorm correction.

``skew="bn"`` scales each neuron's gradient by a factor read from the running
variance of the BatchNorm that normalises it; ``so.bn_pairs`` finds those
BatchNorms by tracing the model, and ``so.SparseTrainState`` passes the
statistics to the optimizer and keeps every pruned weight at exactly zero.
The data are random images with a learnable label (the mean of one channel's
sign), so the script needs no download::

  python examples/linen_resnet_bn.py --steps 50
"""

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import sparseopt_jax as so


class Block(nn.Module):
  """conv-BN-relu-conv-BN plus the input: a basic residual block."""

  features: int

  @nn.compact
  def __call__(self, x, train):
    norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)
    y = nn.relu(norm()(nn.Conv(self.features, (3, 3), use_bias=False)(x)))
    y = norm()(nn.Conv(self.features, (3, 3), use_bias=False)(y))
    return nn.relu(x + y)


class ResNet(nn.Module):
  features: int = 16
  blocks: int = 2
  num_classes: int = 2

  @nn.compact
  def __call__(self, x, train=True):
    x = nn.Conv(self.features, (3, 3), use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    for _ in range(self.blocks):
      x = Block(self.features)(x, train)
    return nn.Dense(self.num_classes)(x.mean(axis=(1, 2)))


def batch(key, size=32):
  x = jax.random.normal(key, (size, 8, 8, 3))
  return x, (x[..., 0].mean(axis=(1, 2)) > 0).astype(jnp.int32)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=50)
  args = parser.parse_args(argv)

  model = ResNet()
  x, _ = batch(jax.random.PRNGKey(0))
  variables = model.init(jax.random.PRNGKey(1), x)
  tx = optax.chain(
      so.sparseopt(
          0.8,
          skew="bn",
          bn_pairs=so.bn_pairs(model, x),  # kernel path -> its BatchNorm
          update_every=10,
          end_step=max(args.steps, 11),
      ),
      optax.sgd(0.05, momentum=0.9),
  )
  state = so.SparseTrainState.create(
      apply_fn=model.apply, params=variables["params"], tx=tx
  )

  @jax.jit
  def train_step(state, batch_stats, x, y):
    def loss_fn(params):
      logits, new_vars = model.apply(
          {"params": params, "batch_stats": batch_stats},
          x,
          mutable=["batch_stats"],
      )
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
      return loss.mean(), new_vars["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params
    )
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    return state, batch_stats, loss

  batch_stats = variables["batch_stats"]
  for step in range(args.steps):
    x, y = batch(jax.random.PRNGKey(100 + step))
    state, batch_stats, loss = train_step(state, batch_stats, x, y)
  so.check_sparsity(state.params, state.opt_state)
  summary = so.sparsity_summary(state.opt_state, params=state.params)
  print(
      f"{args.steps} steps: loss {float(loss):.3f}, sparsity"
      f" {summary['sparsity']:.3f}, exploration {summary['exploration']:.3f}"
  )
  return summary


if __name__ == "__main__":
  main()
