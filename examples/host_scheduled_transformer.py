"""A plain JAX loop with host-scheduled mask updates, on a small transformer.

The model is one QK-norm attention block (query and key normalised per head)
and an MLP, so ``skew="layernorm"`` has kernels to correct: ``so.ln_leaves``
finds the query and key kernels by tracing. The loop compiles two variants of
its step and picks one on the host with ``schedule.is_due(step)``, as the
training program does on accelerators: the ordinary variant holds no
mask-update code. The task is to predict each sequence's mean token::

  python examples/host_scheduled_transformer.py --steps 60
"""

import argparse
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import sparseopt_jax as so

HEADS, HEAD_DIM, WIDTH = 4, 8, 32


class Block(nn.Module):
  """x + attention(LN(x)) with QK-norm, then x + MLP(LN(x)): a pre-LN block."""

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm()(x)
    q = nn.DenseGeneral((HEADS, HEAD_DIM), name="query")(h)
    k = nn.DenseGeneral((HEADS, HEAD_DIM), name="key")(h)
    v = nn.DenseGeneral((HEADS, HEAD_DIM), name="value")(h)
    q, k = nn.LayerNorm(name="q_norm")(q), nn.LayerNorm(name="k_norm")(k)
    weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k), axis=-1)
    attended = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    x = x + nn.DenseGeneral(WIDTH, axis=(-2, -1), name="out")(attended)
    h = nn.gelu(nn.Dense(2 * WIDTH, name="fc1")(nn.LayerNorm()(x)))
    return x + nn.Dense(WIDTH, name="fc2")(h)


class Transformer(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(WIDTH, name="embed")(x)
    return nn.Dense(1, name="head")(Block()(x).mean(axis=1))[:, 0]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=60)
  args = parser.parse_args(argv)

  model = Transformer()
  x = jax.random.normal(jax.random.PRNGKey(0), (16, 6, 8))
  params = model.init(jax.random.PRNGKey(1), x)["params"]
  schedule = so.mask_update_schedule(
      update_every=2, end_step=max(args.steps, 3), drop_fraction=0.3
  )
  tx = optax.chain(
      so.sparseopt(
          0.8,
          schedule=schedule,
          skew="layernorm",
          ln_leaves=so.ln_leaves(model, x),  # the query and key kernels
      ),
      optax.adamw(3e-3),
  )
  opt_state = tx.init(params)
  params = so.apply_masks(params, opt_state)

  def loss_fn(params, x):
    return jnp.mean(
        (model.apply({"params": params}, x) - x.mean(axis=(1, 2))) ** 2
    )

  # mask_update is static: one compiled program per value, chosen on the host.
  @functools.partial(jax.jit, static_argnums=3)
  def train_step(params, opt_state, x, mask_update):
    loss, grads = jax.value_and_grad(loss_fn)(params, x)
    updates, opt_state = tx.update(
        grads, opt_state, params, mask_update=mask_update
    )
    params, opt_state = so.apply_updates(
        params, updates, opt_state, mask_update=mask_update
    )
    return params, opt_state, loss

  for step in range(args.steps):  # step == the optimizer's update count
    x = jax.random.normal(jax.random.PRNGKey(100 + step), (16, 6, 8))
    params, opt_state, loss = train_step(
        params, opt_state, x, schedule.is_due(step)
    )
  summary = so.sparsity_summary(opt_state, params=params)
  assert summary["missed_mask_updates"] == 0 and summary["pruned_nonzero"] == 0
  print(
      f"{args.steps} steps: loss {float(loss):.4f}, sparsity"
      f" {summary['sparsity']:.3f}, exploration {summary['exploration']:.3f}"
  )
  return summary


if __name__ == "__main__":
  main()
