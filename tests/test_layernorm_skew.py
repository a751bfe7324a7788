"""skew="layernorm": the group factor c_g = sqrt(D_g / D), identity when dense, the errors,
and the per-head slope of a QK-norm ViT flattened at initialisation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparseopt_jax as so

QUERY = "attn/query/kernel"


def _mask(shape, counts, axis_groups, seed=0):
  """A bool mask of ``shape`` whose slices along ``axis_groups`` keep ``counts`` weights."""
  rng = np.random.default_rng(seed)
  m = np.zeros(shape, bool)
  moved = np.moveaxis(m, axis_groups, 0)
  for g, n in enumerate(counts):
    flat = np.zeros(moved[g].size, bool)
    flat[rng.permutation(flat.size)[:n]] = True
    moved[g] = flat.reshape(moved[g].shape)
  return jnp.asarray(np.moveaxis(moved, 0, axis_groups))


def _tree():
  params = {
      "a": jnp.ones((8, 4)),
      "b": jnp.ones((8, 4)),
      "attn": {"query": {"kernel": jnp.ones((4, 2, 3))}},
      "c": jnp.ones((8, 4)),
      "bias": jnp.ones((4,)),
  }
  masks = {
      "a": _mask((8, 4), [4, 4, 4, 4], 1),  # D = 0.5
      "b": _mask((8, 4), [1, 2, 2, 3], 1),  # D = 0.25, neurons unequal
      # (in, heads, head_dim): head 0 keeps 6 of 12 (0.5), head 1 keeps 3 (0.25).
      "attn": {"query": {"kernel": _mask((4, 2, 3), [6, 3], 1)}},
      "c": _mask((8, 4), [1, 1, 1, 1], 1),
      "bias": None,
  }
  ln = {"a": None, "b": None, QUERY: 1}
  return params, masks, ln


def test_layernorm_factor_is_sqrt_of_group_density_over_mean_density():
  params, masks, ln = _tree()
  grads = jax.tree.map(jnp.ones_like, params)
  mean = (16 + 8 + 9) / (
      32 + 32 + 24
  )  # active fraction of the ln_leaves kernels
  expect = {
      "a": np.sqrt(0.5 / mean),
      "b": np.sqrt(0.25 / mean),  # one factor for the layer, whatever d_i
      "q": np.sqrt(np.array([0.5, 0.25]) / mean)[None, :, None],  # per head
  }
  tx = so.skew_correct("layernorm", ln_leaves=ln)
  fixed = so.skew_correct("layernorm", masks=masks, ln_leaves=ln)
  outs = [
      tx.update(grads, tx.init(params), masks=masks)[0],
      jax.jit(lambda g, s: fixed.update(g, s)[0])(grads, fixed.init(params)),
  ]
  for out in outs:
    np.testing.assert_allclose(
        out["a"], np.full((8, 4), expect["a"]), rtol=1e-6
    )
    np.testing.assert_allclose(
        out["b"], np.full((8, 4), expect["b"]), rtol=1e-6
    )
    np.testing.assert_allclose(
        out["attn"]["query"]["kernel"],
        np.broadcast_to(expect["q"], (4, 2, 3)),
        rtol=1e-6,
    )
    # Not in ln_leaves (a pre-LN kernel) and dense leaves: untouched.
    np.testing.assert_array_equal(out["c"], grads["c"])
    np.testing.assert_array_equal(out["bias"], grads["bias"])


def test_layernorm_mode_is_the_identity_when_dense():
  params, masks, ln = _tree()
  dense = jax.tree.map(
      lambda m: None if m is None else jnp.ones_like(m),
      masks,
      is_leaf=lambda m: m is None,
  )
  grads = jax.tree.map(
      lambda p: jax.random.normal(jax.random.PRNGKey(0), p.shape), params
  )
  tx = so.skew_correct("layernorm", ln_leaves=ln)
  out, _ = tx.update(grads, tx.init(params), masks=dense)
  jax.tree.map(np.testing.assert_array_equal, out, grads)
  # Through sparseopt at sparsity 0 (every mask dense): the chain is plain SGD.
  chain = optax.chain(
      so.sparseopt(
          0.0,
          topology="static",
          skew="layernorm",
          ln_leaves=ln,
          sparse_filter=lambda path, x: x.ndim >= 2,
      ),
      optax.sgd(1.0),
  )
  updates, _ = chain.update(grads, chain.init(params), params)
  jax.tree.map(
      lambda u, g: np.testing.assert_array_equal(u, -g), updates, grads
  )


def test_layernorm_mode_in_sparseopt_scales_by_the_current_masks():
  params, masks, ln = _tree()
  chain = optax.chain(
      so.sparseopt(
          0.5,
          masks=masks,
          skew="layernorm",
          ln_leaves=ln,
          end_step=10,
          update_every=4,
      ),
      optax.sgd(1.0),
  )
  state = chain.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = jax.jit(chain.update)(grads, state, params)
  tx = so.skew_correct("layernorm", ln_leaves=ln)
  expect, _ = tx.update(grads, tx.init(params), masks=masks)
  expect = so.masking.mask_updates(expect, masks)
  jax.tree.map(
      lambda u, e: np.testing.assert_allclose(u, -e, rtol=1e-6), updates, expect
  )


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: so.skew_correct("layernorm"), "needs ln_leaves"),
        (
            lambda: so.skew_correct("layernorm", ln_leaves={}),
            "nothing to correct",
        ),
        (lambda: so.skew_correct("layernorm", ln_leaves={"a": 0}), "int >= 1"),
        (lambda: so.skew_correct("bn", bn_pairs={"a": None}), "no BatchNorm"),
    ],
)
def test_construction_errors_name_what_is_missing(build, match):
  with pytest.raises(ValueError, match=match):
    build()


def test_init_errors_for_ln_leaves_that_name_no_sparse_kernel():
  params, masks, ln = _tree()
  tx = so.sparseopt(
      0.5,
      masks=masks,
      skew="layernorm",
      ln_leaves={"nope": None},
      end_step=10,
      update_every=4,
  )
  with pytest.raises(ValueError, match="not params"):
    tx.init(params)
  dense_only = {"bias": None}  # a param, but a dense one
  tx = so.sparseopt(
      0.5,
      masks=masks,
      skew="layernorm",
      ln_leaves=dense_only,
      end_step=10,
      update_every=4,
  )
  with pytest.raises(ValueError, match="names none of the sparse leaves"):
    tx.init(params)
  tx = so.skew_correct("layernorm", ln_leaves=ln)
  with pytest.raises(ValueError, match="masks"):
    tx.update(params, tx.init(params))


# ---------------------------------------------------------------------------
# On a ViT (Flax): which kernels a LayerNorm normalises, and the slope it causes


def _vit(**kw):
  from sparseopt_jax.training.models import ViT

  return ViT(num_classes=10, width=32, depth=2, num_heads=8, patch_size=7, **kw)


def test_ln_leaves_finds_the_kernels_a_layernorm_takes_directly():
  x = jnp.zeros((1, 28, 28, 1))
  assert so.ln_leaves(_vit(), x) == {}  # pre-LN: the norms precede the kernels
  assert so.ln_leaves(_vit(norm_position="post"), x) == {}  # through x + f(x)
  qk = so.ln_leaves(_vit(qk_norm=True), x)
  assert qk == {
      f"block{i}/attn/{n}/kernel": 1 for i in range(2) for n in ("query", "key")
  }
  sandwich = so.ln_leaves(_vit(norm_position="sandwich"), x)
  assert sandwich == {
      f"block{i}/{n}/kernel": 1
      for i in range(2)
      for n in ("attn/out", "mlp/fc2")
  }


def _per_head_masks(params, seed, low=0.02, high=0.5):
  """Sparse masks for the blocks' kernels; each query/key head at its own density."""
  from sparseopt_jax.training.models import VIT_SPARSE_FILTER

  rng = np.random.default_rng(seed)
  masks = so.random_masks(
      params, 0.8, sparse_filter=VIT_SPARSE_FILTER, seed=seed
  )

  def leaf(path, m):
    name = so.tree.path_str(path)
    if m is None or not name.endswith(("query/kernel", "key/kernel")):
      return m
    c, h, dh = m.shape
    d = np.exp(rng.uniform(np.log(low), np.log(high), h))
    return _mask(
        (c, h, dh),
        np.maximum(1, np.round(d * c * dh)).astype(int),
        1,
        seed=rng.integers(1 << 30),
    )

  return jax.tree_util.tree_map_with_path(
      leaf, masks, is_leaf=lambda m: m is None
  )


def _head_slope(grads, masks):
  """Slope of log RMS gradient per surviving weight of each head on log D_h, per kernel."""
  xs, ys = [], []
  for (p, g), m in zip(
      jax.tree_util.tree_leaves_with_path(grads),
      jax.tree.leaves(masks, is_leaf=lambda m: m is None),
  ):
    if m is None or not so.tree.path_str(p).endswith(
        ("query/kernel", "key/kernel")
    ):
      continue
    m = np.asarray(m)
    d = m.mean(axis=(0, 2))
    y = 0.5 * np.log(
        (np.asarray(g) ** 2 * m).sum(axis=(0, 2)) / m.sum(axis=(0, 2))
    )
    xs.append(np.log(d) - np.log(d).mean())
    ys.append(y - y.mean())
  x, y = np.concatenate(xs), np.concatenate(ys)
  return float((x * y).sum() / (x * x).sum())


def test_qk_norm_skews_each_head_by_its_density_and_the_layernorm_mode_adds_half():
  """QK-norm divides head h's queries by their RMS, which scales as sqrt(D_h): the
  derivation's slope is -0.5 per head. The layernorm stage's output is
  g * sqrt(D_h / D) on each query/key kernel (D the active fraction over all of
  them), so its per-head slope, measured on that output, is raw + 0.5 (about 0).
  """
  model = _vit(qk_norm=True)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(64, 28, 28, 1)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, 64))
  params = model.init(jax.random.PRNGKey(0), images[:1])["params"]
  ln = so.ln_leaves(model, images[:1])

  def loss(p):
    logits = model.apply({"params": p}, images)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, labels
    ).mean()

  grad = jax.jit(jax.grad(loss))
  raw, corrected = [], []
  tx = so.skew_correct("layernorm", ln_leaves=ln)
  correct = jax.jit(lambda g, s, m: tx.update(g, s, masks=m)[0])
  for seed in range(3):
    masks = _per_head_masks(params, seed)
    g = grad(so.apply_masks(params, masks))
    raw.append(_head_slope(g, masks))
    fixed = correct(g, tx.init(params), masks)
    corrected.append(_head_slope(fixed, masks))
    # The factors, computed here from the masks: one per head of each query/key kernel.
    by_path = lambda tree: {
        so.tree.path_str(p): np.asarray(x)
        for p, x in jax.tree_util.tree_leaves_with_path(tree)
    }
    m, g_, out = by_path(masks), by_path(g), by_path(fixed)
    total = sum(m[p].sum() for p in ln) / sum(m[p].size for p in ln)
    for path in out:
      if path in ln:
        c = np.sqrt(m[path].mean(axis=(0, 2)) / total)[None, :, None]
        np.testing.assert_allclose(
            out[path], g_[path] * c, rtol=1e-5, atol=1e-12, err_msg=path
        )
      else:
        np.testing.assert_array_equal(out[path], g_[path], err_msg=path)
  assert -0.75 < np.mean(raw) < -0.3, raw  # the skew QK-norm creates
  np.testing.assert_allclose(corrected, np.asarray(raw) + 0.5, atol=1e-4)
