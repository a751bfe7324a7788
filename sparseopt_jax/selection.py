"""One exact selection: the top ``count`` candidates of every row, ties broken by key.

Every mask change goes through :func:`select_rows` on a ``[rows, n]`` view of
a leaf: one row for an unstructured leaf, one per neuron for constant fan-in,
one per group for N:M (:mod:`sparseopt_jax.structure`). Its contract, the
invariant every topology rests on:

    row i takes exactly min(count_i, kmax) of its candidates,
    if it has that many (else all of them),

ranked by (score, tie key), both descending. Exact ties in the score (zero
gradients, equal weights) resolve in an order drawn from the keys, never by
index; the keys are distinct within a row, so a row never takes more or fewer,
whatever the values. Both ranks are found by bisection over 32-bit keys
(:func:`_row_kth`), not by sorting.
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


def order_key(score: jax.Array) -> jax.Array:
  """uint32 keys in the order of ``score`` (float, int32 or uint32): larger ranks first.

  Floats map through their bits (negative ones flipped, the sign bit set on
  the others), the standard radix-sort key; -0.0 is made +0.0 first so that
  equal floats get equal keys.
  """
  if score.dtype == jnp.uint32:
    return score
  if jnp.issubdtype(score.dtype, jnp.floating):
    score = score.astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(
        jnp.where(score == 0, jnp.zeros((), jnp.float32), score), jnp.uint32
    )
    return jnp.where(bits >> 31 == 1, ~bits, bits | np.uint32(0x80000000))
  return jax.lax.bitcast_convert_type(
      score.astype(jnp.int32), jnp.uint32
  ) ^ np.uint32(0x80000000)


def _row_kth(keys: jax.Array, candidates: jax.Array, k: jax.Array) -> jax.Array:
  """Per row, the k-th largest of ``keys`` among ``candidates``, as [rows, 1] uint32.

  A bisection over the key's 32 bits, highest first: t is the largest value
  with at least k candidates at or above it. 32 passes of a compare and a
  row sum, whatever k: no sort and no ``top_k`` (whose cost grows with k on
  GPU and TPU). Rows with fewer than k candidates get 0.
  """

  def bit(i, t):
    trial = t | (np.uint32(1) << (31 - i).astype(jnp.uint32))
    enough = jnp.sum(candidates & (keys >= trial), axis=1, dtype=jnp.int32)
    return jnp.where((enough >= k)[:, None], trial, t)

  start = jnp.zeros((keys.shape[0], 1), jnp.uint32)
  return jax.lax.fori_loop(0, 32, bit, start)


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
    kmax: static bound on any row's count, shared by the drop and the grow
      that refills it.
    tie_keys: [rows, n] uint32 (:func:`hash_keys`), distinct within each row:
      the order among ties.

  Every candidate above the row's threshold (its count-th score) is taken;
  the ``r`` still needed come from those equal to it, by largest tie key:
  a second bisection, run only when some row has more ties than it needs.
  """
  count = jnp.clip(count.astype(jnp.int32), 0, kmax)
  keys = order_key(score)
  threshold = _row_kth(keys, candidates, count)
  above = candidates & (keys > threshold)
  tied = candidates & (keys == threshold)
  r = count - jnp.sum(above, axis=1, dtype=jnp.int32)

  def break_ties():
    return tied & (tie_keys >= _row_kth(tie_keys, tied, r))

  chosen = above | jax.lax.cond(
      jnp.any(jnp.sum(tied, axis=1, dtype=jnp.int32) > r),
      break_ties,
      lambda: tied,
  )
  return chosen & (count > 0)[:, None]
