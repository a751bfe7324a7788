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
(:func:`_row_kth`), not by sorting, and
:func:`select_leaves` runs the selections of many leaves as one.
Clamping at ``kmax`` here, once, is what lets a drop and the grow that follows
take the same count (RigL's drop/grow pairing, Evci et al. 2020).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

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


def _row_kth(
    keys: Sequence[jax.Array],
    candidates: Sequence[jax.Array],
    k: Sequence[jax.Array],
) -> tuple[jax.Array, ...]:
  """Per leaf and row, the k-th largest of ``keys`` among ``candidates``: [rows, 1] uint32.

  A bisection over the key's 32 bits, highest first: t is the largest value
  with at least k candidates at or above it. 32 passes of a compare and a
  row sum, whatever k: no sort and no ``top_k`` (whose cost grows with k on
  GPU and TPU). Rows with fewer than k candidates get 0. One loop serves
  every leaf given, so that the program holds one loop, not one per leaf.
  """

  def bit(i, ts):
    step = np.uint32(1) << (31 - i).astype(jnp.uint32)
    out = []
    for key, cand, kk, t in zip(keys, candidates, k, ts, strict=True):
      trial = t | step
      enough = jnp.sum(cand & (key >= trial), axis=1, dtype=jnp.int32)
      out.append(jnp.where((enough >= kk)[:, None], trial, t))
    return tuple(out)

  start = tuple(jnp.zeros((key.shape[0], 1), jnp.uint32) for key in keys)
  return jax.lax.fori_loop(0, 32, bit, start)


# Rows at least this long are selected in a packed form: cut into chunks of
# CHUNK weights (the last one padded), all rows of all leaves in one array.
# Below 256, so that a chunk's count fits a uint8 (see _row_sums).
CHUNK = 128


class _Packing(NamedTuple):
  """How leaves' [rows, n] views sit in one [chunks, CHUNK] array; static."""

  shapes: tuple[tuple[int, int], ...]  # (rows, n) of each leaf
  per_row: tuple[int, ...]  # chunks per row of each leaf

  @property
  def segments(self) -> int:
    return sum(rows for rows, _ in self.shapes)


def _packing(xs: Sequence[jax.Array]) -> _Packing:
  shapes = tuple((int(x.shape[0]), int(x.shape[1])) for x in xs)
  return _Packing(shapes, tuple(-(-n // CHUNK) for _, n in shapes))


def _pack(xs: Sequence[jax.Array], fill: Any, packing: _Packing) -> jax.Array:
  """The leaves' rows, each padded with ``fill`` to whole chunks, as [chunks, CHUNK]."""
  parts = []
  for x, (rows, n), c in zip(xs, packing.shapes, packing.per_row, strict=True):
    if c * CHUNK > n:
      x = jnp.pad(x, ((0, 0), (0, c * CHUNK - n)), constant_values=fill)
    parts.append(x.reshape(rows * c, CHUNK))
  return jnp.concatenate(parts)


def _unpack(y: jax.Array, packing: _Packing) -> list[jax.Array]:
  """Inverse of :func:`_pack`: the [rows, n] view of each leaf."""
  out, start = [], 0
  for (rows, n), c in zip(packing.shapes, packing.per_row, strict=True):
    out.append(y[start : start + rows * c].reshape(rows, c * CHUNK)[:, :n])
    start += rows * c
  return out


def _chunk_rows(packing: _Packing) -> jax.Array:
  """[chunks] int32: the row (segment) each chunk belongs to, in packed order."""
  parts, offset = [], 0
  for (rows, _), c in zip(packing.shapes, packing.per_row, strict=True):
    row = jax.lax.broadcasted_iota(jnp.int32, (rows, c), 0) + offset
    parts.append(row.reshape(-1))
    offset += rows
  return jnp.concatenate(parts)


def _row_sums(x: jax.Array, chunk_row: jax.Array, segments: int) -> jax.Array:
  """Per row (segment), how many of the packed bools ``x`` are set: [segments] int32.

  A chunk's count fits a byte (CHUNK < 256); summed in uint8 the pass over
  the weights vectorises several times better on a CPU than in int32.
  """
  per_chunk = jnp.sum(x, axis=1, dtype=jnp.uint8).astype(jnp.int32)
  return jax.ops.segment_sum(
      per_chunk, chunk_row, segments, indices_are_sorted=True
  )


def _packed_kth(keys, candidates, k, chunk_row, segments) -> jax.Array:
  """:func:`_row_kth` of packed rows: per row (segment) the k-th largest key, [segments].

  Each pass counts per chunk (a row sum) and adds the chunks of a row (a
  sorted segment sum), so the loop holds the same few ops for any number of
  leaves.
  """

  def bit(i, t):
    trial = t | (np.uint32(1) << (31 - i).astype(jnp.uint32))
    hits = candidates & (keys >= trial[chunk_row][:, None])
    enough = _row_sums(hits, chunk_row, segments)
    return jnp.where(enough >= k, trial, t)

  return jax.lax.fori_loop(0, 32, bit, jnp.zeros((segments,), jnp.uint32))


def _select_packed(score, candidates, count, tie_keys) -> list[jax.Array]:
  """:func:`select_leaves` of leaves with long rows, in the packed form."""
  packing = _packing(score)
  chunk_row = _chunk_rows(packing)
  segments = packing.segments
  keys = _pack([order_key(x) for x in score], 0, packing)
  cand = _pack(candidates, False, packing)
  ties = _pack(tie_keys, 0, packing)
  k = jnp.concatenate(count)
  per_row = lambda x: _row_sums(x, chunk_row, segments)
  threshold = _packed_kth(keys, cand, k, chunk_row, segments)[chunk_row]
  above = cand & (keys > threshold[:, None])
  tied = cand & (keys == threshold[:, None])
  r = k - per_row(above)

  def break_ties():
    kth = _packed_kth(ties, tied, r, chunk_row, segments)
    return tied & (ties >= kth[chunk_row][:, None])

  taken = jax.lax.cond(jnp.any(per_row(tied) > r), break_ties, lambda: tied)
  chosen = (above | taken) & (k > 0)[chunk_row][:, None]
  return _unpack(chosen, packing)


def _select_by_leaf(score, candidates, count, tie_keys) -> list[jax.Array]:
  """:func:`select_leaves` of leaves with short rows, each on its own [rows, n]."""
  keys = [order_key(x) for x in score]
  threshold = _row_kth(keys, candidates, count)
  above, tied, r = [], [], []
  for key, cand, t, c in zip(keys, candidates, threshold, count, strict=True):
    above.append(cand & (key > t))
    tied.append(cand & (key == t))
    r.append(c - jnp.sum(above[-1], axis=1, dtype=jnp.int32))
  needs_ties = jnp.any(
      jnp.stack([
          jnp.any(jnp.sum(t, axis=1, dtype=jnp.int32) > ri)
          for t, ri in zip(tied, r, strict=True)
      ])
  )

  def break_ties():
    kth = _row_kth(tie_keys, tied, r)
    return tuple(
        t & (tk >= th) for t, tk, th in zip(tied, tie_keys, kth, strict=True)
    )

  taken = jax.lax.cond(needs_ties, break_ties, lambda: tuple(tied))
  return [
      (a | b) & (c > 0)[:, None]
      for a, b, c in zip(above, taken, count, strict=True)
  ]


def select_leaves(
    score: Sequence[jax.Array],
    candidates: Sequence[jax.Array],
    count: Sequence[jax.Array],
    kmax: Sequence[int],
    tie_keys: Sequence[jax.Array],
) -> list[jax.Array]:
  """:func:`select_rows` of several leaves at once, each on its own rows.

  The same selection, leaf by leaf, in one program of a size that does not
  grow with the leaves: rows of at least ``CHUNK`` weights (every
  unstructured leaf but the smallest, and long fan-in rows) are packed into
  one array and ranked by one bisection loop (and one more for exact ties,
  run only when some row needs it); shorter rows (N:M groups, small fan-ins)
  share another loop, a row sum per leaf.
  """
  count = [
      jnp.clip(c.astype(jnp.int32), 0, km)
      for c, km in zip(count, kmax, strict=True)
  ]
  fields = list(zip(score, candidates, count, tie_keys, strict=True))
  long = [i for i, x in enumerate(score) if x.shape[1] >= CHUNK]
  short = [i for i, x in enumerate(score) if x.shape[1] < CHUNK]
  out = [None] * len(fields)
  for which, select in ((long, _select_packed), (short, _select_by_leaf)):
    if which:
      chosen = select(*(list(f) for f in zip(*(fields[i] for i in which))))
      for i, c in zip(which, chosen, strict=True):
        out[i] = c
  return out


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
  (chosen,) = select_leaves([score], [candidates], [count], [kmax], [tie_keys])
  return chosen
