"""Tests for sparseopt_jax.training.models: ResNets, presets and structural bn_pairs."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from sparseopt_jax.flax_support.linen import bn_pairs
from sparseopt_jax.training.models import (
    MODELS,
    BasicBlock,
    BottleneckBlock,
    CifarResNet,
    ResNet,
    ResNet18,
    ResNet20,
    ResNet50,
    get_model,
)

# Tiny versions keep compile and run times small on CPU.
TINY = {
    "resnet20": functools.partial(ResNet20, num_filters=4),  # 4/8/16 channels
    "resnet18": functools.partial(
        ResNet18, num_filters=4
    ),  # 4/8/16/32 channels
    "resnet50": functools.partial(
        ResNet50, num_filters=4
    ),  # 16/32/64/128 out channels
}
NUM_CLASSES, BATCH = 7, 4


def _key(seed):
  # XLA compiles threefry-based init slowly on CPU (seconds per model); the
  # "rbg" PRNG gives the same init distributions at a fraction of the cost.
  return jax.random.key(seed, impl="rbg")


def _n_params(tree):
  return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))


@functools.cache
def _tiny(name):
  """(model, jitted init, jitted train-mode apply, jitted eval-mode apply).

  Cached so that tests using the same model and input shape share compilations.
  """
  model = TINY[name](num_classes=NUM_CLASSES)
  init = jax.jit(functools.partial(model.init, train=False))
  train = jax.jit(
      functools.partial(model.apply, train=True, mutable=["batch_stats"])
  )
  evaluate = jax.jit(functools.partial(model.apply, train=False))
  return model, init, train, evaluate


@functools.cache
def _tiny_init(name, shape):
  _, init, _, _ = _tiny(name)
  x = jax.random.normal(jax.random.key(1), (BATCH, *shape), jnp.float32)
  return x, init(_key(0), x)


# ---------------------------------------------------------------------------
# 1. init / apply / shapes / parameter count
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, shape",
    [
        ("resnet20", (28, 28, 1)),
        ("resnet20", (32, 32, 3)),
        ("resnet50", (28, 28, 1)),  # spatial size goes down to 1x1 in stage 4
        # resnet20 covers 3-channel input in the default run.
        pytest.param("resnet50", (32, 32, 3), marks=pytest.mark.slow),
        ("resnet18", (28, 28, 1)),
    ],
    ids=lambda v: v if isinstance(v, str) else "x".join(map(str, v)),
)
def test_init_apply_train_and_eval(name, shape):
  _, _, train, evaluate = _tiny(name)
  x, variables = _tiny_init(name, shape)
  assert set(variables) == {"params", "batch_stats"}
  assert variables["params"]["conv_init"]["kernel"].shape[-2] == shape[-1]

  train_out, updates = train(variables, x)
  eval_out = evaluate(variables, x)  # no mutable collection needed in eval mode
  assert train_out.shape == (BATCH, NUM_CLASSES) and eval_out.shape == (
      BATCH,
      NUM_CLASSES,
  )
  assert train_out.dtype == jnp.float32 and eval_out.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(train_out))) and bool(
      jnp.all(jnp.isfinite(eval_out))
  )
  # Train mode updates the running statistics, with the same tree structure.
  new_bs, old_bs = updates["batch_stats"], variables["batch_stats"]
  assert jax.tree.structure(new_bs) == jax.tree.structure(old_bs)
  assert not all(
      bool(jnp.array_equal(a, b))
      for a, b in zip(jax.tree.leaves(new_bs), jax.tree.leaves(old_bs))
  )
  # Train mode normalises with batch statistics, eval mode with running ones.
  assert not bool(jnp.allclose(train_out, eval_out))


def _cifar_resnet_param_count(
    n, widths=(16, 32, 64), in_channels=3, num_classes=10
):
  """Params of the 6n+2 CIFAR ResNet with projection (1x1 conv + BN) shortcuts."""
  w0 = widths[0]
  count = (
      3 * 3 * in_channels * w0 + 2 * w0
  )  # stem conv (no bias) + BN scale/bias
  c_in = w0
  for stage, w in enumerate(widths):
    for block in range(n):
      count += 3 * 3 * c_in * w + 2 * w  # conv1 + bn1
      count += 3 * 3 * w * w + 2 * w  # conv2 + bn2
      if stage > 0 and block == 0:  # stride 2 and channel change -> projection
        count += c_in * w + 2 * w
      c_in = w
  count += c_in * num_classes + num_classes  # dense head with bias
  return count


def test_resnet20_parameter_count():
  expected = _cifar_resnet_param_count(3)
  assert (
      expected == 272_474
  )  # ~0.27M as in He et al. 2016 (+2,752 for projections)
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(
      lambda x: ResNet20(num_classes=10).init(jax.random.key(0), x), x
  )
  assert _n_params(variables["params"]) == expected
  # Running statistics are not parameters: mean + var for every BN channel.
  bn_channels = (
      16 + 6 * 16 + 6 * 32 + 6 * 64 + 32 + 64
  )  # stem, 18 blocks x 2, 2 projections
  assert _n_params(variables["batch_stats"]) == 2 * bn_channels


@pytest.mark.parametrize(
    "model_fn, expected", [(ResNet18, 11_689_512), (ResNet50, 25_557_032)]
)
def test_imagenet_parameter_counts_match_reference(model_fn, expected):
  # Reference counts of torchvision's resnet18 / resnet50 (v1.5), 1000 classes.
  x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model_fn().init(jax.random.key(0), x), x)
  assert _n_params(variables["params"]) == expected


def test_resnet50_v15_stride_on_3x3_and_shapes():
  x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
  variables = jax.eval_shape(
      lambda x: ResNet50(num_filters=8, num_classes=5).init(
          jax.random.key(0), x
      ),
      x,
  )
  p = variables["params"]
  assert p["conv_init"]["kernel"].shape == (7, 7, 3, 8)
  blk = p["stage2_block0"]
  assert blk["conv1"]["kernel"].shape == (1, 1, 32, 16)
  assert blk["conv2"]["kernel"].shape == (3, 3, 16, 16)
  assert blk["conv3"]["kernel"].shape == (1, 1, 16, 64)
  assert blk["proj_conv"]["kernel"].shape == (1, 1, 32, 64)
  assert p["head"]["kernel"].shape == (
      8 * 8 * 4,
      5,
  )  # 8 * 2**3 filters, expansion 4
  # Convs have no bias; only the head and the BNs do.
  biased = {path[-2] for path in flatten_dict(p) if path[-1] == "bias"}
  assert biased == {"head", "bn_init", "bn1", "bn2", "bn3", "proj_bn"}

  # Stride-2 lives on the 3x3 conv: capture intermediate shapes.
  model = ResNet50(num_filters=8, num_classes=5)
  _, state = jax.eval_shape(
      lambda x: model.init_with_output(
          jax.random.key(0),
          x,
          capture_intermediates=lambda m, _: isinstance(m, nn.Conv),
      ),
      x,
  )
  inter = state["intermediates"]["stage2_block0"]
  assert inter["conv1"]["__call__"][0].shape == (2, 16, 16, 16)  # 1x1, stride 1
  assert inter["conv2"]["__call__"][0].shape == (2, 8, 8, 16)  # 3x3, stride 2
  assert inter["proj_conv"]["__call__"][0].shape == (2, 8, 8, 64)


# ---------------------------------------------------------------------------
# 2. bn_pairs on the ResNets, checked structurally
# ---------------------------------------------------------------------------


def _randomize(tree, fn):
  return jax.tree.map(
      lambda leaf: jnp.asarray(fn(np.asarray(leaf)), leaf.dtype), tree
  )


def _zero_batch_bns(old_bs, new_bs):
  """BN paths whose running stats were updated exactly as by an all-zero batch."""
  old, new = flatten_dict(old_bs), flatten_dict(new_bs)
  m = np.float32(0.9)
  hits = set()
  for path in old:
    if path[-1] != "var":
      continue
    bn = path[:-1]
    old_mean, old_var = np.asarray(old[bn + ("mean",)]), np.asarray(
        old[bn + ("var",)]
    )
    new_mean, new_var = np.asarray(new[bn + ("mean",)]), np.asarray(
        new[bn + ("var",)]
    )
    if np.array_equal(new_mean, m * old_mean) and np.array_equal(
        new_var, m * old_var
    ):
      hits.add("/".join(bn))
  return hits


def _set_kernel(params, kernel_path, value_fn):
  flat = flatten_dict(params)
  path = tuple(kernel_path.split("/"))
  flat[path] = value_fn(flat[path])
  return unflatten_dict(flat)


@pytest.mark.parametrize("name", ["resnet20", "resnet50"])
def test_bn_pairs_structural(name):
  # The input shapes of test_init_apply_train_and_eval: it shares their compilations.
  model, _, train, _ = _tiny(name)
  shape = {"resnet20": (32, 32, 3), "resnet50": (28, 28, 1)}[name]
  x, variables = _tiny_init(name, shape)
  params, batch_stats = variables["params"], variables["batch_stats"]

  # Random BN scale/bias and running stats: a zero batch then becomes a
  # (non-zero) constant after the BN, so downstream BNs do not see zeros,
  # and "0.9 * old" is a non-trivial target.
  rng = np.random.default_rng(0)
  params = _randomize(
      params,
      lambda a: a + 0.5 * rng.standard_normal(a.shape) if a.ndim == 1 else a,
  )
  batch_stats = _randomize(
      batch_stats, lambda a: rng.uniform(0.5, 2.0, a.shape)
  )

  pairs = bn_pairs(model, x, train=True)
  flat_params = flatten_dict(params)
  kernels = {"/".join(p) for p in flat_params if p[-1] == "kernel"}
  bns = {"/".join(p[:-1]) for p in flatten_dict(batch_stats) if p[-1] == "var"}
  # Covers every kernel; only the classifier is unpaired; every BN used once.
  assert set(pairs) == kernels
  assert [k for k, v in pairs.items() if v is None] == ["head/kernel"]
  paired_bns = [v for v in pairs.values() if v is not None]
  assert sorted(paired_bns) == sorted(bns)
  flat_bs = flatten_dict(batch_stats)
  for k, b in pairs.items():
    if b is not None:
      n_out = flat_params[tuple(k.split("/"))].shape[-1]
      assert flat_bs[tuple(b.split("/")) + ("var",)].shape == (n_out,)
  # Pairing does not depend on train/eval mode or computation dtype.
  assert bn_pairs(model, x, train=False) == pairs
  assert (
      bn_pairs(
          TINY[name](num_classes=NUM_CLASSES, dtype=jnp.bfloat16), x, train=True
      )
      == pairs
  )

  def updated_stats(params):
    _, upd = train({"params": params, "batch_stats": batch_stats}, x)
    return upd["batch_stats"]

  # Sanity: with the real kernels no BN sees an all-zero batch.
  assert _zero_batch_bns(batch_stats, updated_stats(params)) == set()
  # Zeroing a kernel makes exactly its paired BN (and no other) see a zero batch.
  for kernel in sorted(kernels):
    zeroed = _set_kernel(params, kernel, jnp.zeros_like)
    hits = _zero_batch_bns(batch_stats, updated_stats(zeroed))
    expected = set() if pairs[kernel] is None else {pairs[kernel]}
    assert hits == expected, (kernel, pairs[kernel], hits)


def test_bn_pairs_resnet20_paths():
  pairs = bn_pairs(ResNet20(), jnp.zeros((1, 32, 32, 3)))
  assert len(pairs) == 22  # 19 convs + 2 projections + head
  assert pairs["conv_init/kernel"] == "bn_init"
  assert pairs["stage1_block0/conv1/kernel"] == "stage1_block0/bn1"
  assert pairs["stage3_block0/proj_conv/kernel"] == "stage3_block0/proj_bn"
  assert pairs["head/kernel"] is None
  # Only shapes matter: abstract inputs, other sizes/channels give the same map.
  assert (
      bn_pairs(
          ResNet20(),
          jax.ShapeDtypeStruct((2, 28, 28, 1), jnp.bfloat16),
          train=False,
      )
      == pairs
  )


# ---------------------------------------------------------------------------
# 3. registry
# ---------------------------------------------------------------------------


def test_get_model():
  assert set(MODELS) == {
      "resnet8",
      "resnet20",
      "resnet32",
      "resnet56",
      "resnet18",
      "resnet50",
      "vit",
      "vitqknorm",
  }
  m = get_model("resnet20", num_classes=100, num_filters=4)
  assert (
      isinstance(m, CifarResNet)
      and m.num_classes == 100
      and tuple(m.stage_sizes) == (3, 3, 3)
  )
  assert m.block_cls is BasicBlock
  m = get_model("ResNet-50")
  assert (
      isinstance(m, ResNet)
      and tuple(m.stage_sizes) == (3, 4, 6, 3)
      and m.block_cls is BottleneckBlock
  )
  assert tuple(get_model("resnet56").stage_sizes) == (9, 9, 9)
  assert tuple(get_model("ResNet-8").stage_sizes) == (1, 1, 1)
  with pytest.raises(ValueError, match="resnet_999") as exc:
    get_model("resnet_999")
  assert "resnet20" in str(exc.value)


# ---------------------------------------------------------------------------
# 4. Vision Transformer
# ---------------------------------------------------------------------------


def _tiny_vit(**kw):
  from sparseopt_jax.training.models import ViT

  return ViT(num_classes=NUM_CLASSES, width=16, depth=2, num_heads=2, **kw)


def test_vit_shapes_and_param_roles():
  import sparseopt_jax as so
  from sparseopt_jax.training.models import VIT_SPARSE_FILTER

  model = _tiny_vit()
  x = jax.random.normal(jax.random.key(1), (BATCH, 28, 28, 1), jnp.float32)
  variables = jax.jit(model.init)(_key(0), x)
  assert set(variables) == {"params"}  # no BatchNorm: no batch_stats
  shapes = {
      so.tree.path_str(p): tuple(v.shape)
      for p, v in jax.tree_util.tree_leaves_with_path(variables["params"])
  }
  assert shapes["patch_embed/kernel"] == (7, 7, 1, 16)  # 7x7 patches: 16 tokens
  assert shapes["pos_embedding"] == (1, 16, 16)
  assert shapes["block0/attn/query/kernel"] == (
      16,
      2,
      8,
  )  # (width, heads, head_dim)
  assert shapes["block0/attn/out/kernel"] == (2, 8, 16)
  assert shapes["block1/mlp/fc1/kernel"] == (16, 64)  # mlp_ratio 4
  assert shapes["block1/mlp/fc2/kernel"] == (64, 16)
  assert shapes["head/kernel"] == (16, NUM_CLASSES)
  assert {"block0/ln1/scale", "block0/ln2/scale", "ln_final/scale"} <= set(
      shapes
  )
  out = model.apply(variables, x, train=True)
  assert out.shape == (BATCH, NUM_CLASSES) and out.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(out)))
  np.testing.assert_array_equal(out, model.apply(variables, x, train=False))
  # SparseOpt's sparse leaves: the attention and MLP kernels only; embeddings,
  # norms, biases, pre-logits and head stay dense.
  keep = so.tree.make_sparse_filter(VIT_SPARSE_FILTER)
  sparse = set(so.tree.sparse_shapes(variables["params"], keep))
  assert sparse == {
      f"block{i}/{k}/kernel"
      for i in range(2)
      for k in (
          "attn/query",
          "attn/key",
          "attn/value",
          "attn/out",
          "mlp/fc1",
          "mlp/fc2",
      )
  }
  # The neurons of query/key/value are (head, head_dim) pairs; of out and fc, the last axis.
  assert so.tree.neuron_axes("block0/attn/key/kernel", 3) == (1, 2)
  assert so.tree.neuron_axes("block0/attn/out/kernel", 3) == (2,)


def test_vit_variants_and_registry():
  x = jax.ShapeDtypeStruct((2, 28, 28, 1), jnp.float32)

  def shapes(**kw):
    model = _tiny_vit(**kw)
    variables = jax.eval_shape(model.init, _key(0), x)
    return variables["params"], jax.eval_shape(model.apply, variables, x)

  for kw in (
      dict(norm_position="post"),
      dict(norm_position="sandwich"),
      dict(qk_norm=True),
  ):
    assert shapes(**kw)[1].shape == (2, NUM_CLASSES), kw
  assert "query_ln" in shapes(qk_norm=True)[0]["block0"]["attn"]
  assert {"ln1_post", "ln2_post"} <= set(
      shapes(norm_position="sandwich")[0]["block0"]
  )
  assert "ln_final" not in shapes(norm_position="post")[0]
  assert (
      get_model("vit_qknorm", width=8).qk_norm and not get_model("vit").qk_norm
  )
  with pytest.raises(ValueError, match="divisible"):
    jax.eval_shape(
        _tiny_vit().init,
        _key(0),
        jax.ShapeDtypeStruct((1, 30, 30, 1), jnp.float32),
    )
  with pytest.raises(ValueError, match="norm_position"):
    jax.eval_shape(_tiny_vit(norm_position="middle").init, _key(0), x)
