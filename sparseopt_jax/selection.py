"""One exact selection: the top ``count`` candidates of every row, ties broken by key.

Every mask change goes through :func:`select_rows` on a ``[rows, n]`` view of
a leaf: one row for an unstructured leaf, one per neuron for constant fan-in,
one per group for N:M (:mod:`sparseopt_jax.structure`). Its contract, the
invariant every topology rests on:

    row i takes exactly min(count_i, kmax) of its candidates,
    if it has that many (else all of them),

ranked by (score, tie key), both descending. Exact ties in the score (zero
gradients, equal weights) resolve in an order drawn from the keys, not by
index, and the tied ones are taken by position in that order, so a row never
takes more or fewer, whatever the values.
Clamping at ``kmax`` here, once, is what lets a drop and the grow that follows
take the same count (RigL's drop/grow pairing, Evci et al. 2020).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_MIX = (np.uint32(0x7FEB352D), np.uint32(0x846CA68B))


def mix32(x: jax.Array) -> jax.Array:
  """A bijection of uint32 that scatters neighbours (Wellons' ``lowbias32``)."""
  x = x ^ (x >> 16)
  x = x * _MIX[0]
  x = x ^ (x >> 15)
  x = x * _MIX[1]
  return x ^ (x >> 16)


def hash_keys(n: int, seed: jax.Array) -> jax.Array:
  """n distinct pseudo-random uint32 keys, one per position, from a uint32 seed.

  A counter-based hash rather than ``jax.random``: a few integer ops per weight
  instead of Threefry's unrolled rounds (which made the mask-update program ten
  times larger to compile), and distinct by construction, since :func:`mix32`
  is a bijection.
  """
  return mix32(jnp.arange(n, dtype=jnp.uint32) + seed)


def as_int_key(keys: jax.Array) -> jax.Array:
  """uint32 -> int32 preserving order (``lax.top_k`` ranks signed values)."""
  return jax.lax.bitcast_convert_type(keys ^ np.uint32(0x80000000), jnp.int32)


def _extremes(dtype) -> tuple:
  if jnp.issubdtype(dtype, jnp.floating):
    return -jnp.inf, jnp.inf
  info = jnp.iinfo(dtype)
  return info.min, info.max


def _row_kth(values: jax.Array, k: jax.Array, kmax: int) -> jax.Array:
  """Per row of ``values`` [rows, n], its k-th largest (``k`` [rows] in [1, kmax]), as [rows, 1]."""
  top, _ = jax.lax.top_k(values, kmax)
  return jnp.take_along_axis(top, jnp.clip(k - 1, 0, kmax - 1)[:, None], axis=1)


def select_rows(
    score: jax.Array,
    candidates: jax.Array,
    count: jax.Array,
    kmax: int,
    tie_keys: jax.Array,
) -> jax.Array:
  """Bool [rows, n]: in row i the ``min(count[i], kmax)`` first candidates.

  Args:
    score: [rows, n], float or integer; larger is taken first.
    candidates: [rows, n] bool; only these can be taken.
    count: [rows] int32, how many to take per row (clamped to [0, kmax]).
    kmax: static bound on any row's count (the size of one ``lax.top_k``);
      at most n.
    tie_keys: [rows, n] uint32 (:func:`hash_keys`), the order among ties.

  Every candidate above the row's threshold (its count-th score) is taken;
  the ``r`` still needed come from those equal to it, by largest tie key.
  """
  count = jnp.clip(count.astype(jnp.int32), 0, kmax)
  low, high = _extremes(score.dtype)
  s = jnp.where(candidates, score, low)
  # A row that takes nothing has no threshold: nothing is above +inf.
  threshold = jnp.where(count[:, None] > 0, _row_kth(s, count, kmax), high)
  above = s > threshold
  tied = candidates & (s == threshold)
  r = count - jnp.sum(above, axis=1, dtype=jnp.int32)

  def break_ties():
    # Take the first r tied positions in tie-key order by index, so the count
    # is exact even where two keys agree; -1 sits below every (31-bit) key.
    ties = jnp.where(tied, (tie_keys >> 1).astype(jnp.int32), -1)
    _, order = jax.lax.top_k(ties, kmax)
    take = jnp.arange(kmax)[None, :] < r[:, None]
    rows = jnp.arange(s.shape[0])[:, None]
    return tied & jnp.zeros(s.shape, bool).at[rows, order].set(take)

  # Continuous scores rarely tie at the threshold: rank the ties only when,
  # in some row, some of them must lose.
  chosen = above | jax.lax.cond(
      jnp.any(jnp.sum(tied, axis=1, dtype=jnp.int32) > r),
      break_ties,
      lambda: tied,
  )
  return chosen & (count > 0)[:, None]
