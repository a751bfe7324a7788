"""ResNet and Vision Transformer models (Flax linen).

Architectures
-------------
* ``CifarResNet``: the CIFAR-10 ResNets of He et al., "Deep Residual Learning
  for Image Recognition", CVPR 2016, Sec. 4.2 (ResNet-20/32/56, depth = 6n+2;
  ResNet-8, n = 1, for quick runs and the training program's tests):
  a 3x3 stem conv with 16 filters, three stages of ``n`` basic blocks with
  16/32/64 filters (stride 2 at the first block of stages 2 and 3), global
  average pooling and a dense classifier.  Shortcuts are identities except
  when the shape changes, where a projection (1x1 conv + BN, "option B") is
  used, so parameter counts are slightly above the paper's option-A numbers
  (ResNet-20 with 10 classes: 272,474 parameters vs. 0.27M).
* ``ResNet``: the ImageNet ResNets (He et al. 2016, Table 1).  ``ResNet18``
  uses basic blocks [2, 2, 2, 2]; ``ResNet50`` is "ResNet v1.5" (as in
  torchvision and NVIDIA's reference): the bottleneck block puts the stride on
  the 3x3 conv instead of the first 1x1 conv, blocks [3, 4, 6, 3], expansion 4.
  Stem: 7x7/2 conv (64) + BN + ReLU + 3x3/2 max pool.

Style follows Flax's ``examples/imagenet/models.py``: every conv feeding a
BatchNorm has no bias, BatchNorm uses ``momentum=0.9, epsilon=1e-5`` and no
``axis_name`` (under ``jax.jit`` the statistics are then over the global
batch), and every module takes ``train: bool`` in ``__call__``.  Padding is
explicit and symmetric (as in the PyTorch reference implementations), so any
input size works (e.g. 28x28x1 up to 224x224x3).

Module names are stable (``conv_init``, ``bn_init``, ``stage1_block0/conv1``,
``stage1_block0/bn1``, ..., ``stage2_block0/proj_conv``,
``stage2_block0/proj_bn``, ``head``), but
:func:`sparseopt_jax.flax_support.linen.bn_pairs` does not rely on them: it
finds which BatchNorm normalises which kernel by tracing the model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

__all__ = [
    "BasicBlock",
    "BottleneckBlock",
    "CifarResNet",
    "ResNet",
    "ResNet8",
    "ResNet20",
    "ResNet32",
    "ResNet56",
    "ResNet18",
    "ResNet50",
    "MlpBlock",
    "EncoderBlock",
    "ViT",
    "VIT_SPARSE_FILTER",
    "MODELS",
    "SPARSE_FILTERS",
    "WIDTH_FIELDS",
    "get_model",
]

ModuleDef = Any
Dtype = Any

# He et al. (2015) "delving deep" initialisation, fan-out mode as in the
# PyTorch/torchvision reference implementations.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5


def _pad(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
  p = (kernel_size - 1) // 2
  return ((p, p), (p, p))


class BasicBlock(nn.Module):
  """Two 3x3 convs (He et al. 2016, Fig. 2 left); stride on the first conv.

  A projection shortcut (1x1 conv with the block's stride + BN) is used
  whenever the residual's shape differs from the block output's.
  """

  filters: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable = nn.relu
  strides: tuple[int, int] = (1, 1)
  zero_init_residual: bool = False

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(
        self.filters, (3, 3), self.strides, padding=_pad(3), name="conv1"
    )(x)
    y = self.norm(name="bn1")(y)
    y = self.act(y)
    y = self.conv(self.filters, (3, 3), padding=_pad(3), name="conv2")(y)
    last_bn_kwargs = (
        {"scale_init": nn.initializers.zeros_init()}
        if self.zero_init_residual
        else {}
    )
    y = self.norm(name="bn2", **last_bn_kwargs)(y)
    if residual.shape != y.shape:
      residual = self.conv(
          self.filters, (1, 1), self.strides, padding="VALID", name="proj_conv"
      )(residual)
      residual = self.norm(name="proj_bn")(residual)
    return self.act(residual + y)


class BottleneckBlock(nn.Module):
  """1x1 -> 3x3 -> 1x1 bottleneck (He et al. 2016, Fig. 5 right), ResNet v1.5.

  The stride sits on the 3x3 conv (v1.5); the output has ``4 * filters``
  channels.  Projection shortcut (1x1 conv + BN) whenever the shape changes.
  """

  filters: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable = nn.relu
  strides: tuple[int, int] = (1, 1)
  expansion: int = 4
  zero_init_residual: bool = False

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (1, 1), padding="VALID", name="conv1")(x)
    y = self.norm(name="bn1")(y)
    y = self.act(y)
    y = self.conv(
        self.filters, (3, 3), self.strides, padding=_pad(3), name="conv2"
    )(y)
    y = self.norm(name="bn2")(y)
    y = self.act(y)
    y = self.conv(
        self.filters * self.expansion, (1, 1), padding="VALID", name="conv3"
    )(y)
    last_bn_kwargs = (
        {"scale_init": nn.initializers.zeros_init()}
        if self.zero_init_residual
        else {}
    )
    y = self.norm(name="bn3", **last_bn_kwargs)(y)
    if residual.shape != y.shape:
      residual = self.conv(
          self.filters * self.expansion,
          (1, 1),
          self.strides,
          padding="VALID",
          name="proj_conv",
      )(residual)
      residual = self.norm(name="proj_bn")(residual)
    return self.act(residual + y)


def _conv_and_norm(module, train: bool):
  conv = functools.partial(
      nn.Conv,
      use_bias=False,
      dtype=module.dtype,
      param_dtype=module.param_dtype,
      kernel_init=module.kernel_init,
  )
  norm = functools.partial(
      nn.BatchNorm,
      use_running_average=not train,
      momentum=_BN_MOMENTUM,
      epsilon=_BN_EPSILON,
      dtype=module.dtype,
      param_dtype=module.param_dtype,
  )
  return conv, norm


def _stages(module, x, conv, norm):
  for i, num_blocks in enumerate(module.stage_sizes):
    for j in range(num_blocks):
      strides = (2, 2) if i > 0 and j == 0 else (1, 1)
      x = module.block_cls(
          filters=module.num_filters * 2**i,
          conv=conv,
          norm=norm,
          act=module.act,
          strides=strides,
          zero_init_residual=module.zero_init_residual,
          name=f"stage{i + 1}_block{j}",
      )(x)
  return x


def _head(module, x):
  x = jnp.mean(x, axis=(1, 2))  # global average pool over H, W (NHWC)
  x = nn.Dense(
      module.num_classes,
      dtype=module.dtype,
      param_dtype=module.param_dtype,
      name="head",
  )(x)
  return jnp.asarray(x, jnp.float32)


class CifarResNet(nn.Module):
  """CIFAR ResNet of He et al. 2016 (Sec. 4.2), depth = 6n + 2 for BasicBlock.

  Attributes:
    stage_sizes: blocks per stage, ``(n, n, n)`` for depth ``6n + 2``.
    num_classes: classifier outputs.
    num_filters: channels of the stem and stage 1 (16 in the paper); stage
      ``i`` (1-based) has ``num_filters * 2**(i-1)`` channels.  Use e.g. 4
      for tiny test models (4/8/16 channels).
    block_cls: residual block (``BasicBlock`` in the paper).
    dtype: computation dtype; ``param_dtype``: parameter dtype.
  Input is NHWC; logits are returned in float32.
  """

  stage_sizes: Sequence[int] = (3, 3, 3)
  num_classes: int = 10
  num_filters: int = 16
  block_cls: ModuleDef = BasicBlock
  act: Callable = nn.relu
  zero_init_residual: bool = False
  kernel_init: Callable = conv_kernel_init
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv, norm = _conv_and_norm(self, train)
    x = conv(self.num_filters, (3, 3), padding=_pad(3), name="conv_init")(x)
    x = norm(name="bn_init")(x)
    x = self.act(x)
    x = _stages(self, x, conv, norm)
    return _head(self, x)


class ResNet(nn.Module):
  """ImageNet ResNet (He et al. 2016, Table 1); bottleneck variant is v1.5.

  Stem: 7x7/2 conv (``num_filters``) + BN + ReLU + 3x3/2 max pool, then one
  stage per entry of ``stage_sizes`` with ``num_filters * 2**i`` filters
  (64/128/256/512 by default; x4 output channels for bottlenecks), stride 2
  at the first block of every stage but the first, global average pool and
  a dense classifier.  Input is NHWC; logits are returned in float32.
  """

  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  num_classes: int = 1000
  num_filters: int = 64
  block_cls: ModuleDef = BasicBlock
  act: Callable = nn.relu
  zero_init_residual: bool = False
  kernel_init: Callable = conv_kernel_init
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv, norm = _conv_and_norm(self, train)
    x = conv(
        self.num_filters, (7, 7), (2, 2), padding=_pad(7), name="conv_init"
    )(x)
    x = norm(name="bn_init")(x)
    x = self.act(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=_pad(3))
    x = _stages(self, x, conv, norm)
    return _head(self, x)


class MlpBlock(nn.Module):
  """The Transformer's position-wise MLP: ``fc2(gelu(fc1(x)))``."""

  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    dense = functools.partial(
        nn.Dense,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.normal(1e-6),
    )
    y = nn.gelu(dense(self.mlp_dim, name="fc1")(x))
    return dense(x.shape[-1], name="fc2")(y)


class EncoderBlock(nn.Module):
  """A Transformer encoder block (Vaswani et al. 2017; ViT, Dosovitskiy et al. 2021).

  Pre-LN (ViT's; Xiong et al. 2020): ``x + attn(ln1(x))``, then ``x +
  mlp(ln2(x))``. Post-LN (the original Transformer's): ``ln1(x + attn(x))``,
  then ``ln2(x + mlp(x))``. Sandwich (CogView's, Ding et al. 2021; Swin v2's
  res-post-norm adds the same ``post`` norms): ``x + ln1_post(attn(ln1(x)))``,
  then ``x + ln2_post(mlp(ln2(x)))``. ``qk_norm`` adds a LayerNorm over each
  head's queries and keys (Dehghani et al. 2023, ViT-22B). Its kernels are ``attn/{query,key,value}/kernel``
  (width, heads, head_dim), ``attn/out/kernel`` (heads, head_dim, width),
  ``mlp/fc1/kernel`` (width, mlp_dim) and ``mlp/fc2/kernel`` (mlp_dim, width).
  """

  num_heads: int
  mlp_dim: int
  norm_position: str = "pre"
  qk_norm: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    norm = functools.partial(
        nn.LayerNorm, dtype=self.dtype, param_dtype=self.param_dtype
    )
    attn = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads,
        qkv_features=x.shape[-1],
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        kernel_init=nn.initializers.xavier_uniform(),
        normalize_qk=self.qk_norm,
        name="attn",
    )
    mlp = MlpBlock(self.mlp_dim, self.dtype, self.param_dtype, name="mlp")
    if self.norm_position == "post":
      x = norm(name="ln1")(x + attn(x, x))
      return norm(name="ln2")(x + mlp(x))
    post = (
        (lambda name: norm(name=name))
        if self.norm_position == "sandwich"
        else (lambda name: lambda y: y)
    )
    y = norm(name="ln1")(x)
    x = x + post("ln1_post")(attn(y, y))
    return x + post("ln2_post")(mlp(norm(name="ln2")(x)))


class ViT(nn.Module):
  """Vision Transformer (Dosovitskiy et al., ICLR 2021) for small images.

  Non-overlapping ``patch_size`` patches embedded by a strided conv
  (``patch_embed``), a learned positional embedding (``pos_embedding``),
  ``depth`` encoder blocks (``block{i}``, pre-LN by default; see
  :class:`EncoderBlock` for ``norm_position`` and ``qk_norm``), a final
  LayerNorm (``ln_final``; not for post-LN), global average pooling over the
  tokens (no class token), and an MLP head: ``pre_logits`` (width, tanh, as in
  ViT's pre-training head) then ``head``. No BatchNorm, so no
  ``batch_stats``; no dropout. Input NHWC with height and width divisible by
  ``patch_size``; logits are returned in float32.

  SparseOpt's sparse leaves are the attention and MLP kernels of the blocks
  (:data:`VIT_SPARSE_FILTER`); the patch embedding, positional embedding and
  head stay dense.
  """

  num_classes: int = 10
  patch_size: int = 7
  width: int = 128
  depth: int = 4
  num_heads: int = 4
  mlp_ratio: int = 4
  norm_position: str = "pre"
  qk_norm: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    del train  # no dropout or BatchNorm: train and eval are the same function
    if self.norm_position not in ("pre", "post", "sandwich"):
      raise ValueError(
          "norm_position must be 'pre', 'post' or 'sandwich', got"
          f" {self.norm_position!r}"
      )
    p = self.patch_size
    if x.shape[1] % p or x.shape[2] % p:
      raise ValueError(
          f"image {x.shape[1]}x{x.shape[2]} is not divisible into"
          f" {p}x{p} patches"
      )
    x = nn.Conv(
        self.width,
        (p, p),
        strides=(p, p),
        padding="VALID",
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name="patch_embed",
    )(x)
    x = x.reshape(x.shape[0], -1, self.width)
    x = x + self.param(
        "pos_embedding",
        nn.initializers.normal(0.02),
        (1, x.shape[1], self.width),
        self.param_dtype,
    )
    for i in range(self.depth):
      x = EncoderBlock(
          self.num_heads,
          self.mlp_ratio * self.width,
          self.norm_position,
          self.qk_norm,
          self.dtype,
          self.param_dtype,
          name=f"block{i}",
      )(x)
    if self.norm_position != "post":
      x = nn.LayerNorm(
          dtype=self.dtype, param_dtype=self.param_dtype, name="ln_final"
      )(x)
    x = jnp.mean(x, axis=1)
    dense = functools.partial(
        nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype
    )
    x = jnp.tanh(dense(self.width, name="pre_logits")(x))
    x = dense(self.num_classes, name="head")(x)
    return jnp.asarray(x, jnp.float32)


# The ViT's sparse leaves: the blocks' attention and MLP kernels.
VIT_SPARSE_FILTER = r"^block\d+/(attn/(query|key|value|out)|mlp/fc[12])/kernel$"


ResNet8 = functools.partial(
    CifarResNet, stage_sizes=(1, 1, 1), block_cls=BasicBlock
)
ResNet20 = functools.partial(
    CifarResNet, stage_sizes=(3, 3, 3), block_cls=BasicBlock
)
ResNet32 = functools.partial(
    CifarResNet, stage_sizes=(5, 5, 5), block_cls=BasicBlock
)
ResNet56 = functools.partial(
    CifarResNet, stage_sizes=(9, 9, 9), block_cls=BasicBlock
)
ResNet18 = functools.partial(
    ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock
)
ResNet50 = functools.partial(
    ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BottleneckBlock
)

MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet8": ResNet8,
    "resnet20": ResNet20,
    "resnet32": ResNet32,
    "resnet56": ResNet56,
    "resnet18": ResNet18,
    "resnet50": ResNet50,
    "vit": ViT,
    "vitqknorm": functools.partial(ViT, qk_norm=True),
}

# Per model, the leaves SparseOpt makes sparse when the run does not say (None:
# the library's default, every kernel).
SPARSE_FILTERS: dict[str, str | None] = {
    "vit": VIT_SPARSE_FILTER,
    "vitqknorm": VIT_SPARSE_FILTER,
}

# Per model, the attribute ``--width`` sets (default ``num_filters``).
WIDTH_FIELDS: dict[str, str] = {"vit": "width", "vitqknorm": "width"}


def model_key(name: str) -> str:
  """The ``MODELS`` key of ``name``: lower case, '-' and '_' ignored."""
  return str(name).lower().replace("-", "").replace("_", "")


def get_model(name: str, **kwargs) -> nn.Module:
  """Builds a model from ``MODELS`` by name (case-insensitive, '-'/'_' ignored).

  ``kwargs`` override attributes, e.g. ``get_model("resnet20", num_classes=100)``.
  Raises ``ValueError`` naming the unknown model and the known ones.
  """
  key = model_key(name)
  if key not in MODELS:
    raise ValueError(f"Unknown model {name!r}; known models: {sorted(MODELS)}")
  return MODELS[key](**kwargs)
