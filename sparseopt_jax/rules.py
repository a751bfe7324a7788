"""Drop and grow: RigL and SET as two calls of one exact selection.

On a ``[rows, n]`` view of a leaf's mask (one row when unstructured; see
:mod:`sparseopt_jax.structure`), with per-row counts ``k_i``:

    dropped = the k_i active weights of smallest |w|          (select_rows)
    grown   = the k_i weights inactive after the drop of largest
              |g| (RigL, Evci et al. 2020) or of a random key (SET,
              Mocanu et al. 2018)                             (select_rows)
    mask'   = (mask & ~dropped) | grown

Both selections take ``min(k_i, kmax)`` (:func:`~sparseopt_jax.selection.select_rows`),
and the grow step has at least ``k_i`` candidates (the inactive weights plus
those just dropped), so every row keeps its count exactly. A weight just
dropped may be regrown.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sparseopt_jax import selection
from sparseopt_jax.structure import row_multiplier


def row_kmax(row_len: int, in_row: int, n_active: int, alpha: float) -> int:
  """The static bound on one row's drop count.

  A row of ``row_len`` weights with ``in_row`` active ones, in a leaf of
  ``n_active``, drops at most its inactive weights (``row_len - in_row``: a
  drop the grow step could not refill elsewhere in the row), at most
  ``floor(alpha * n_active)`` (the leaf's count at step 0) and at most its
  share of that, ``floor(alpha * in_row) + 1``.
  """
  return max(
      0,
      min(
          row_len - in_row,
          in_row,
          math.floor(alpha * in_row) + 1,
          math.floor(alpha * n_active),
      ),
  )


def row_counts(k: jax.Array, rows: int, seed: jax.Array) -> jax.Array:
  """Split a leaf's count ``k`` over ``rows``: ``k // rows`` each, one more in ``k % rows`` rows.

  The rows taking one more are picked by a seeded permutation
  ``i -> (a i + b) mod rows`` (``a`` coprime with ``rows``), scattered across
  the leaf rather than a contiguous block. One row takes ``k``.
  """
  if rows == 1:
    return jnp.reshape(k, (1,)).astype(jnp.int32)
  order = (
      jnp.arange(rows, dtype=jnp.uint32) * np.uint32(row_multiplier(rows))
      + selection.mix32(seed ^ np.uint32(0x5EED)) % np.uint32(rows)
  ) % np.uint32(rows)
  extra = (order < (k % rows).astype(jnp.uint32)).astype(jnp.int32)
  return k // rows + extra


def drop_and_grow_leaves(
    active: Sequence[jax.Array],
    weight: Sequence[jax.Array],
    grow_score: Sequence[jax.Array],
    count: Sequence[jax.Array],
    kmax: Sequence[int],
    drop_keys: Sequence[jax.Array],
    grow_keys: Sequence[jax.Array],
) -> list[jax.Array]:
  """:func:`drop_and_grow` of several leaves, as two selections over all of them.

  The drops of every leaf are one :func:`~sparseopt_jax.selection.select_leaves`,
  the growths another: the program's size does not grow with the leaves.
  """
  dropped = selection.select_leaves(
      [-jnp.abs(w) for w in weight], active, count, kmax, drop_keys
  )
  kept = [a & ~d for a, d in zip(active, dropped, strict=True)]
  grown = selection.select_leaves(
      grow_score, [~k for k in kept], count, kmax, grow_keys
  )
  return [k | g for k, g in zip(kept, grown, strict=True)]


def drop_and_grow(
    active: jax.Array,
    weight: jax.Array,
    grow_score: jax.Array,
    count: jax.Array,
    kmax: int,
    drop_keys: jax.Array,
    grow_keys: jax.Array,
) -> jax.Array:
  """The new [rows, n] mask: each row drops and regrows ``min(count_i, kmax)``.

  ``weight`` ranks the drop (smallest |w| first) and ``grow_score`` the
  growth (largest first); ``drop_keys`` and ``grow_keys`` order exact ties.
  ``kmax`` must not exceed any row's active or inactive weights
  (:func:`row_kmax` sees to it): then both selections find their count.
  """
  (new,) = drop_and_grow_leaves(
      [active],
      [weight],
      [grow_score],
      [count],
      [kmax],
      [drop_keys],
      [grow_keys],
  )
  return new
