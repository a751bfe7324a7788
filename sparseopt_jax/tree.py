"""Pytree helpers shared by the stages: leaf paths, sparse-leaf selection, neuron axes.

Every stage names a leaf by its *path string*: the keys from the root of the
params tree joined with ``/`` (``'stage1_block0/conv1/kernel'`` for a Flax
linen dict, ``'layers/0/kernel'`` for lists, attribute names for dataclasses
and NamedTuples). Masks are pytrees shaped like the params with a boolean array
at every sparse leaf and ``None`` at every dense one.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

SparseFilter = Callable[[str, Any], bool] | str | None


def key_name(key: Any) -> str:
  """The name of one path entry (dict key, attribute, or sequence index)."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_str(path: tuple) -> str:
  return "/".join(key_name(k) for k in path)


def leaf_paths(tree: Any) -> list[str]:
  """Path strings of the leaves of ``tree``, in ``jax.tree`` order."""
  return [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


def is_none(x: Any) -> bool:
  """Whether a masks leaf says "no mask here": None (a dense leaf), or the
  ``optax.MaskedNode`` that ``optax.multi_transform`` / ``optax.masked`` put
  where a leaf belongs to another branch."""
  return x is None or isinstance(x, optax.MaskedNode)


# What a stage's state holds where the real state holds masks or per-neuron factors, when
# ``init`` is called on optax.tree_utils.tree_map_params' stand-in for the params: a leaf,
# so that tree_map_params hands the real subtree to ``transform_non_params`` rather than
# mapping the params' shardings over it (masks have None at dense leaves; the packed
# exploration bits are not params-shaped at all).
NOT_PARAMS = np.zeros((), bool)


def is_params_placeholder(params: Any) -> bool:
  """Whether ``params`` is optax.tree_utils.tree_map_params' stand-in for the params."""
  return type(params).__name__ == "_ParamsPlaceholder"


def map_with_masks(fn: Callable, masks: Any, *trees: Any) -> Any:
  """``jax.tree.map(fn, masks, *trees)`` where ``masks`` has ``None`` leaves.

  ``fn(mask, *leaves)`` is called only where the mask is an array; where it is
  ``None`` (or a ``MaskedNode``) the leaf of the first tree is returned unchanged.
  """
  return jax.tree.map(
      lambda m, x, *rest: x if is_none(m) else fn(m, x, *rest),
      masks,
      *trees,
      is_leaf=is_none,
  )


def default_sparse_filter(path: str, leaf: Any) -> bool:
  """The default: kernels (see :func:`sparse_shapes`); this is its fallback, ndim >= 2."""
  del path
  return jnp.ndim(leaf) >= 2


def role(path: str) -> str:
  """A leaf's name in its layer: the last path entry (before NNX's ``/value``)."""
  parts = path.split("/")
  return parts[-2] if parts[-1] == "value" and len(parts) > 1 else parts[-1]


def kernel_filter(path: str, leaf: Any) -> bool:
  """Conv, dense and attention kernels: leaves named ``kernel`` with ndim >= 2."""
  return role(path) == "kernel" and jnp.ndim(leaf) >= 2


def make_sparse_filter(
    sparse_filter: SparseFilter,
) -> Callable[[str, Any], bool]:
  """A predicate ``(path, leaf) -> bool`` from ``None``, a regex, or a callable."""
  if sparse_filter is None:
    return default_sparse_filter
  if isinstance(sparse_filter, str):
    try:
      pattern = re.compile(sparse_filter)
    except re.error as e:
      raise ValueError(
          f"sparse_filter {sparse_filter!r} is not a valid regex: {e}"
      ) from e
    return lambda path, leaf: bool(pattern.search(path)) and jnp.ndim(leaf) >= 2
  if callable(sparse_filter):
    return sparse_filter
  raise ValueError(
      "sparse_filter must be None, a regex string or a callable (path, leaf)"
      f" -> bool, got {type(sparse_filter).__name__}"
  )


def sparse_shapes(
    params: Any, sparse_filter: Callable[[str, Any], bool]
) -> dict[str, tuple]:
  """``{path: shape}`` of the leaves that ``sparse_filter`` selects, in tree order.

  The default filter selects by role: when any leaf is named ``kernel`` (Flax's
  conv, dense and attention layers), the kernels alone, so that biases of
  shape (heads, head_dim), embedding tables and positional embeddings stay
  dense; in a tree that names no leaf ``kernel``, every leaf with ndim >= 2.
  """
  if sparse_filter is default_sparse_filter and any(
      role(path) == "kernel" for path in leaf_paths(params)
  ):
    sparse_filter = kernel_filter
  shapes = {}
  for p, leaf in jax.tree_util.tree_leaves_with_path(params):
    path = path_str(p)
    if sparse_filter(path, leaf):
      if jnp.ndim(leaf) < 1:
        raise ValueError(
            f"sparse_filter selected the scalar leaf {path!r}; "
            "only arrays with a neuron axis can be sparse"
        )
      shapes[path] = tuple(jnp.shape(leaf))
  return shapes


def check_neuron_axis(neuron_axis: int | None) -> int | None:
  if neuron_axis is not None and (
      not isinstance(neuron_axis, int) or isinstance(neuron_axis, bool)
  ):
    raise ValueError(
        f"neuron_axis must be None (by role) or an int, got {neuron_axis!r}"
    )
  return neuron_axis


def check_neuron_axis_fits(
    shapes: dict[str, tuple], neuron_axis: int | None
) -> None:
  """Raise ValueError naming the first sparse leaf that has no axis ``neuron_axis``."""
  if neuron_axis is None:
    return
  for path, shape in shapes.items():
    if not -len(shape) <= neuron_axis < len(shape):
      raise ValueError(
          f"neuron_axis {neuron_axis} is out of range for the sparse leaf"
          f" {path!r} of shape {tuple(shape)} ({len(shape)} axes)"
      )


# Flax attention's query/key/value kernels: (in_features, heads, head_dim).
_QKV_KERNEL = re.compile(r"(^|/)(query|key|value)/kernel(/value)?$")


def neuron_axes(
    path: str, ndim: int, neuron_axis: int | None = None
) -> tuple[int, ...]:
  """The axes of a leaf that index its neurons (outputs); the others are each one's fan-in.

  With ``neuron_axis`` given, that axis of every leaf. With None (the default),
  by role: the last axis (Flax HWIO conv and (in, out) dense kernels, and
  attention's output projection (heads, head_dim, out)), except for attention's
  query/key/value kernels (in, heads, head_dim), whose neurons are the
  (head, head_dim) pairs: pooling heads would mix unrelated units.
  """
  if neuron_axis is not None:
    return (neuron_axis % ndim,)
  if ndim == 3 and _QKV_KERNEL.search(path):
    return (1, 2)
  return (ndim - 1,)


def _axes(ndim: int, axes: int | tuple[int, ...]) -> tuple[int, ...]:
  return tuple(a % ndim for a in ((axes,) if isinstance(axes, int) else axes))


def reduce_axes(ndim: int, axes: int | tuple[int, ...]) -> tuple[int, ...]:
  """All axes of a leaf but its neuron axes: the fan-in of each neuron."""
  keep = _axes(ndim, axes)
  return tuple(a for a in range(ndim) if a not in keep)


def per_neuron(
    values: jax.Array, ndim: int, axes: int | tuple[int, ...]
) -> jax.Array:
  """Reshape per-neuron values (shaped like the neuron axes) to broadcast against the leaf."""
  shape = [1] * ndim
  for a, n in zip(_axes(ndim, axes), values.shape, strict=True):
    shape[a] = n
  return values.reshape(shape)


def neuron_density(mask: jax.Array, axes: int | tuple[int, ...]) -> jax.Array:
  """d_i: the fraction of neuron i's incoming weights that the mask keeps (float32)."""
  return jnp.mean(mask, axis=reduce_axes(mask.ndim, axes), dtype=jnp.float32)


def check_masks_like(masks: Any, params: Any, what: str = "masks") -> None:
  """Raise ValueError naming the first leaf where ``masks`` does not fit ``params``."""
  mask_def = jax.tree.structure(masks, is_leaf=is_none)
  param_def = jax.tree.structure(params, is_leaf=is_none)
  if mask_def != param_def:
    raise ValueError(
        f"{what} must be a pytree with the structure of the params (None for"
        f" dense leaves); {what} has {mask_def.num_leaves} leaves {mask_def},"
        f" the params have {param_def.num_leaves} leaves {param_def}"
    )
  for (p, x), m in zip(
      jax.tree_util.tree_leaves_with_path(params, is_leaf=is_none),
      jax.tree.leaves(masks, is_leaf=is_none),
  ):
    if is_none(m):
      continue
    if tuple(jnp.shape(m)) != tuple(jnp.shape(x)):
      raise ValueError(
          f"{what} leaf {path_str(p)!r} has shape {tuple(jnp.shape(m))}, "
          f"the param has shape {tuple(jnp.shape(x))}"
      )
