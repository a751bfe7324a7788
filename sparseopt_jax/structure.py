"""Structured sparsity: constant fan-in and N:M masks.

``structure="fan_in"`` (SRigL, Lasby et al., ICLR 2024): every neuron of a
sparse leaf keeps the same number of incoming weights,

    k_l = clip(round(fan_in_l * (1 - s_l)), 1, fan_in_l)

with ``s_l`` the leaf's budget sparsity (uniform, ERK, ER or a mapping), so the
leaf holds ``k_l * neurons_l`` active weights, which can differ from the
budget's ``round((1 - s_l) * n_l)`` by up to ``neurons_l / 2``
(:func:`active_counts` gives the real counts).

``structure="N:M"`` (e.g. ``"2:4"``, what NVIDIA's sparse tensor cores run):
exactly N active weights in every group of M consecutive weights along the
leaf's *input axis*, the innermost of its fan-in axes (the reduction dimension
of the layer's matmul): axis 0 of a Dense kernel (in, out), axis -2 (I) of an
HWIO conv kernel, axis 0 of attention's query/key/value kernels (in, heads,
head_dim), and head_dim of its output projection (heads, head_dim, out). Every
group lies inside one neuron's fan-in, so every neuron keeps exactly
``fan_in * N / M`` weights: N:M is a constant fan-in with density N/M, and the
sparsity of every structured leaf is exactly ``1 - N/M``.

Both are handled through a *row view* of a leaf: a ``[rows, row_len]``
rearrangement (one row per neuron for ``fan_in``, one per group for N:M) in
which every row holds the same number of active weights, so that drop and grow
are one selection per row (:func:`~sparseopt_jax.selection.select_rows`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

from sparseopt_jax import tree as tree_lib

STRUCTURES = ("fan_in", "N:M (e.g. '2:4')")
# A budget sparsity equal to 1 - N/M up to float rounding (0.6667 for 1:3 is not).
_TOLERANCE = 1e-6


class Structure(NamedTuple):
  """A parsed ``structure=``: ``kind`` is ``"fan_in"`` or ``"n:m"``."""

  kind: str
  n: int = 0
  m: int = 0

  def __str__(self) -> str:
    return self.kind if self.kind == "fan_in" else f"{self.n}:{self.m}"

  @property
  def sparsity(self) -> float | None:
    """The sparsity the structure implies (N:M), or None (fan_in)."""
    return None if self.kind == "fan_in" else 1.0 - self.n / self.m


def parse(structure: Any) -> Structure | None:
  """``None``, ``"fan_in"`` or ``"N:M"`` with integers 1 <= N < M; ValueError otherwise."""
  if structure is None or isinstance(structure, Structure):
    return structure
  if isinstance(structure, str):
    if structure == "fan_in":
      return Structure("fan_in")
    found = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", structure)
    if found:
      n, m = int(found.group(1)), int(found.group(2))
      if not 1 <= n < m:
        raise ValueError(
            f"structure {structure!r}: N:M needs 1 <= N < M (N active weights"
            f" in every group of M), got N={n}, M={m}"
        )
      return Structure("n:m", n, m)
  raise ValueError(
      f"unknown structure {structure!r}; expected None (unstructured),"
      " 'fan_in' (constant per-neuron fan-in) or 'N:M' with integers"
      " 1 <= N < M (e.g. '2:4')"
  )


def check_budget(spec: Structure | None, sparsity: float, distribution) -> None:
  """At construction: an N:M structure fixes every leaf's sparsity to 1 - N/M."""
  if spec is None or spec.kind != "n:m":
    return
  implied = spec.sparsity
  why = (
      f"structure '{spec}' keeps exactly {spec.n} of every {spec.m} weights,"
      f" so every structured leaf has sparsity 1 - {spec.n}/{spec.m} ="
      f" {implied:g}"
  )
  if abs(sparsity - implied) > _TOLERANCE:
    raise ValueError(f"{why}; got sparsity={sparsity!r}: pass {implied!r}")
  if isinstance(distribution, Mapping):
    for pattern, value in distribution.items():
      if abs(value - implied) > _TOLERANCE:
        raise ValueError(
            f"{why}; got distribution[{pattern!r}] = {value!r}: every leaf"
            f" takes {implied!r}"
        )
  elif distribution != "uniform":
    raise ValueError(
        f"{why}; distribution={distribution!r} gives layers different"
        " sparsities: pass distribution='uniform'"
    )


def input_axis(
    path: str, shape: tuple[int, ...], neuron_axis: int | None, spec: Structure
) -> int:
  """The innermost fan-in axis of a leaf; ValueError naming the leaf if it has none."""
  axes = tree_lib.reduce_axes(
      len(shape), tree_lib.neuron_axes(path, len(shape), neuron_axis)
  )
  if not axes:
    raise ValueError(
        f"structure '{spec}' needs an input (fan-in) axis, but the sparse leaf"
        f" {path!r} of shape {tuple(shape)} has none: its only axis indexes"
        " neurons. Keep it dense (sparse_filter) or use structure=None"
    )
  return axes[-1]


def check_shapes(
    shapes: Mapping[str, tuple[int, ...]],
    spec: Structure | None,
    neuron_axis: int | None,
) -> None:
  """At init: ValueError naming the first sparse leaf that cannot hold the structure."""
  if spec is None:
    return
  tree_lib.check_neuron_axis_fits(dict(shapes), neuron_axis)
  for path, shape in shapes.items():
    axis = input_axis(path, shape, neuron_axis, spec)
    if spec.kind == "n:m" and shape[axis] % spec.m:
      raise ValueError(
          f"structure '{spec}' groups {spec.m} consecutive weights along the"
          f" input axis, but the sparse leaf {path!r} of shape {tuple(shape)}"
          f" has {shape[axis]} inputs on axis {axis}, not a multiple of"
          f" {spec.m}. Keep it dense (sparse_filter) or pick another M"
      )


class RowLayout(NamedTuple):
  """How a leaf of ``shape`` maps to a ``[rows, row_len]`` row view.

  ``x.reshape(split).transpose(perm).reshape(rows, row_len)``; for fan_in
  ``split`` is the shape and ``perm`` puts the neuron axes first; for N:M the
  input axis is split into (groups, M) and the M axis goes last.
  """

  shape: tuple[int, ...]
  split: tuple[int, ...]
  perm: tuple[int, ...]
  rows: int
  row_len: int


def flat_layout(shape: tuple[int, ...]) -> RowLayout:
  """The one-row view of an unstructured leaf: ``x.reshape(1, size)``."""
  shape = tuple(int(s) for s in shape)
  size = math.prod(shape)
  return RowLayout(shape, shape, tuple(range(len(shape))), 1, size)


def layout(
    path: str, shape: tuple[int, ...], spec: Structure, neuron_axis: int | None
) -> RowLayout:
  shape = tuple(int(s) for s in shape)
  size = math.prod(shape)
  if spec.kind == "fan_in":
    neurons = tree_lib.neuron_axes(path, len(shape), neuron_axis)
    fan_in = tree_lib.reduce_axes(len(shape), neurons)
    if not fan_in:
      input_axis(path, shape, neuron_axis, spec)  # raises
    row_len = math.prod(shape[a] for a in fan_in)
    return RowLayout(shape, shape, neurons + fan_in, size // row_len, row_len)
  a = input_axis(path, shape, neuron_axis, spec)
  split = shape[:a] + (shape[a] // spec.m, spec.m) + shape[a + 1 :]
  perm = tuple(i for i in range(len(split)) if i != a + 1) + (a + 1,)
  return RowLayout(shape, split, perm, size // spec.m, spec.m)


def to_rows(x: Any, lay: RowLayout) -> Any:
  """The ``[rows, row_len]`` view of a leaf (numpy or jax)."""
  return x.reshape(lay.split).transpose(lay.perm).reshape(lay.rows, lay.row_len)


def from_rows(y: Any, lay: RowLayout) -> Any:
  """Inverse of :func:`to_rows`."""
  inverse = tuple(int(i) for i in np.argsort(lay.perm))
  return (
      y.reshape(tuple(lay.split[p] for p in lay.perm))
      .transpose(inverse)
      .reshape(lay.shape)
  )


def per_row_counts(
    shapes: Mapping[str, tuple[int, ...]],
    sparsities: Mapping[str, float],
    spec: Structure,
    neuron_axis: int | None,
) -> dict[str, int]:
  """Active weights per row: N for N:M; k = clip(round(fan_in (1 - s_l)), 1, fan_in) for fan_in."""
  out = {}
  for path, shape in shapes.items():
    lay = layout(path, shape, spec, neuron_axis)
    if spec.kind == "n:m":
      out[path] = spec.n
    else:
      k = round((1.0 - sparsities[path]) * lay.row_len)
      out[path] = min(lay.row_len, max(1, k))
  return out


def active_counts(
    shapes: Mapping[str, tuple[int, ...]],
    sparsities: Mapping[str, float],
    spec: Structure,
    neuron_axis: int | None,
) -> dict[str, int]:
  """Active weights per leaf under the structure: rows x active per row."""
  per_row = per_row_counts(shapes, sparsities, spec, neuron_axis)
  return {
      path: layout(path, shape, spec, neuron_axis).rows * per_row[path]
      for path, shape in shapes.items()
  }


def check_masks(masks: Any, spec: Structure | None, neuron_axis: int | None):
  """Given masks must hold the structure exactly; returns ``{path: active per row}``."""
  if spec is None:
    return {}
  host = {
      tree_lib.path_str(p): np.asarray(m)
      for p, m in jax.tree_util.tree_leaves_with_path(
          masks, is_leaf=tree_lib.is_none
      )
      if not tree_lib.is_none(m)
  }
  check_shapes({p: m.shape for p, m in host.items()}, spec, neuron_axis)
  out = {}
  for path, m in host.items():
    counts = to_rows(m, layout(path, m.shape, spec, neuron_axis)).sum(axis=1)
    if spec.kind == "n:m" and np.any(counts != spec.n):
      bad = int(np.sum(counts != spec.n))
      raise ValueError(
          f"the given mask of {path!r} is not {spec}: {bad} of its"
          f" {counts.size} groups of {spec.m} do not keep exactly {spec.n}"
      )
    if counts.min() != counts.max():
      raise ValueError(
          f"the given mask of {path!r} has no constant fan-in: its neurons"
          f" keep between {counts.min()} and {counts.max()} incoming weights"
      )
    out[path] = int(counts[0]) if counts.size else 0
  return out


def host_mask(lay: RowLayout, per_row: int, rng: np.random.Generator):
  """A random mask with ``per_row`` active weights in every row, uniform within each row."""
  if per_row >= lay.row_len:
    return np.ones(lay.shape, bool)
  keys = rng.random((lay.rows, lay.row_len), dtype=np.float32)
  picked = np.argpartition(keys, per_row - 1, axis=1)[:, :per_row]
  rows = np.zeros((lay.rows, lay.row_len), bool)
  np.put_along_axis(rows, picked, True, axis=1)
  return from_rows(rows, lay)


def row_multiplier(rows: int) -> int:
  """A multiplier a, coprime with ``rows``, with ``a * rows < 2**32``.

  ``i -> (a * i + b) mod rows`` is then a permutation of the rows computable in
  uint32: it picks which rows drop one weight more than the others, scattered
  across the leaf rather than a contiguous block.
  """
  if rows <= 2:
    return 1
  a = max(1, min(int(rows * 0.6180339887), (2**32 - 1) // rows - 1))
  while math.gcd(a, rows) != 1:
    a -= 1
  return a
