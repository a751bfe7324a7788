"""ResNet models (Flax linen).

Architectures
-------------
* ``CifarResNet``: the CIFAR-10 ResNets of He et al., "Deep Residual Learning
  for Image Recognition", CVPR 2016, Sec. 4.2 (ResNet-20/32/56, depth = 6n+2):
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
    "ResNet20",
    "ResNet32",
    "ResNet56",
    "ResNet18",
    "ResNet50",
    "MODELS",
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
    "resnet20": ResNet20,
    "resnet32": ResNet32,
    "resnet56": ResNet56,
    "resnet18": ResNet18,
    "resnet50": ResNet50,
}


def get_model(name: str, **kwargs) -> nn.Module:
  """Builds a model from ``MODELS`` by name (case-insensitive, '-'/'_' ignored).

  ``kwargs`` override attributes, e.g. ``get_model("resnet20", num_classes=100)``.
  Raises ``ValueError`` naming the unknown model and the known ones.
  """
  key = str(name).lower().replace("-", "").replace("_", "")
  if key not in MODELS:
    raise ValueError(f"Unknown model {name!r}; known models: {sorted(MODELS)}")
  return MODELS[key](**kwargs)
