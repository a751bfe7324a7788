"""Small Flax linen networks that the core tests train SparseOpt on.

Only this module (and the bridge tests) import Flax: the core tests reach it
through ``conftest.linen_nets()``, which skips the calling test where Flax is
not installed, so that the core tests run on jax + optax + numpy alone.
"""

import flax.linen as nn
import jax.numpy as jnp


class SmallConvNet(nn.Module):
  """conv -> BN -> relu -> conv -> BN -> relu -> pool -> dense: two sparse convs, a sparse head."""

  features: int = 16
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = True):
    for _ in range(2):
      x = nn.Conv(self.features, (3, 3), use_bias=False)(x)
      x = nn.BatchNorm(
          use_running_average=not train, momentum=0.9, epsilon=1e-5
      )(x)
      x = nn.relu(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


class ConvBN(nn.Module):
  """One wide conv and its BatchNorm in training mode: the skew's test bed."""

  features: int = 128

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.features, (3, 3), use_bias=False)(x)
    return nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)(
        x
    )


class ConvBNDense(nn.Module):
  """conv -> BN -> relu -> pool -> dense: one BN-normalised kernel, one not."""

  @nn.compact
  def __call__(self, x, train=True):
    x = nn.Conv(8, (3, 3), use_bias=False)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.relu(x).mean(axis=(1, 2))
    return nn.Dense(5)(x)
