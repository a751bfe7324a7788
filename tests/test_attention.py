"""Transformer-safe defaults: on a Flax attention block only kernels are sparse, and a
query/key/value kernel's neurons are its (head, head_dim) pairs."""

import jax
import numpy as np
import optax
import pytest

import sparseopt_jax as so

# A Flax attention block throughout: without Flax the module skips.
nn = pytest.importorskip("flax.linen")

HEADS, HEAD_DIM, WIDTH, VOCAB, LENGTH = 4, 8, 32, 50, 6


class Block(nn.Module):

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, WIDTH)(tokens)
    x = x + self.param(
        "pos_embedding", nn.initializers.normal(0.02), (1, LENGTH, WIDTH)
    )
    y = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(
        num_heads=HEADS, qkv_features=HEADS * HEAD_DIM
    )(y)
    y = nn.LayerNorm()(x)
    x = x + nn.Dense(WIDTH)(nn.gelu(nn.Dense(4 * WIDTH)(y)))
    return nn.Dense(VOCAB)(x.mean(axis=1))


def _setup():
  tokens = jax.random.randint(jax.random.PRNGKey(1), (8, LENGTH), 0, VOCAB)
  labels = jax.random.randint(jax.random.PRNGKey(2), (8,), 0, VOCAB)
  params = jax.jit(Block().init)(jax.random.PRNGKey(0), tokens)["params"]
  return params, tokens, labels


def test_default_selects_kernels_only_and_attention_neurons_are_head_dim_pairs():
  params, tokens, labels = _setup()
  tx = optax.chain(
      so.sparseopt(0.8, distribution="uniform", update_every=2, end_step=20),
      optax.adamw(1e-3),
  )
  state = tx.init(params)
  masks = {
      so.tree.path_str(p): m
      for p, m in jax.tree_util.tree_leaves_with_path(
          so.get_masks(state), is_leaf=so.tree.is_none
      )
  }
  sparse = {p for p, m in masks.items() if m is not None}
  assert sparse and all(p.endswith("/kernel") for p in sparse)
  attention = "MultiHeadDotProductAttention_0"
  for name in ("query", "key", "value", "out"):
    assert f"{attention}/{name}/kernel" in sparse
    assert (
        masks[f"{attention}/{name}/bias"] is None
    )  # (heads, head_dim) biases stay dense
  assert masks["Embed_0/embedding"] is None and masks["pos_embedding"] is None
  assert masks["LayerNorm_0/scale"] is None
  factors = {
      so.tree.path_str(p): c
      for p, c in jax.tree_util.tree_leaves_with_path(
          state[0].topology.density_factors
      )
  }
  assert factors[f"{attention}/query/kernel"].shape == (HEADS, HEAD_DIM)
  assert factors[f"{attention}/out/kernel"].shape == (WIDTH,)
  # c_i = sqrt(d_i / mean d) over the (head, head_dim) neurons of the query kernel.
  q = np.asarray(masks[f"{attention}/query/kernel"])
  d = q.mean(axis=0)
  np.testing.assert_allclose(
      factors[f"{attention}/query/kernel"], np.sqrt(d / d.mean()), rtol=1e-6
  )

  def loss_fn(p):
    logits = Block().apply({"params": p}, tokens)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, labels
    ).mean()

  step = jax.jit(
      lambda p, s: so.apply_updates(p, *tx.update(jax.grad(loss_fn)(p), s, p))
  )
  params = so.apply_masks(params, state)
  counts = [int(m.sum()) for m in jax.tree.leaves(so.get_masks(state))]
  for _ in range(6):
    params, state = step(params, state)
  so.check_sparsity(params, state)
  assert [int(m.sum()) for m in jax.tree.leaves(so.get_masks(state))] == counts
  slopes = so.skew_slope(jax.jit(jax.grad(loss_fn))(params), state)
  assert set(slopes) == sparse
