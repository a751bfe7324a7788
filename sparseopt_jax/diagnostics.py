"""Diagnostics: per-leaf sparsity and neuron densities, exploration, and the skew slope."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from sparseopt_jax import masking
from sparseopt_jax import topology as topology_lib
from sparseopt_jax import tree as tree_lib


def _to_host(tree: Any) -> Any:
  """``tree`` as numpy arrays: one read, after which the diagnostics count in numpy.

  An array spread over several processes' devices (not fully addressable, not
  replicated) is gathered first (``process_allgather``), a collective: every
  process calls the diagnostic, as every process runs the step.
  """

  def gather(x):
    if (
        isinstance(x, jax.Array)
        and not x.is_fully_addressable
        and not x.is_fully_replicated
    ):
      return multihost_utils.process_allgather(x, tiled=True)
    return x

  return jax.device_get(jax.tree.map(gather, tree))


def _masks_by_path(masks: Any) -> dict[str, jax.Array]:
  return {
      tree_lib.path_str(p): m
      for p, m in jax.tree_util.tree_leaves_with_path(
          masks, is_leaf=tree_lib.is_none
      )
      if not tree_lib.is_none(m)
  }


def _pruned_nonzero(params: Any, masks: Any) -> dict[str, tuple[int, int]]:
  """Per sparse leaf: (pruned weights that are not 0.0, pruned weights)."""
  by_path = {
      tree_lib.path_str(p): x
      for p, x in jax.tree_util.tree_leaves_with_path(params)
  }
  out = {}
  for path, m in _masks_by_path(masks).items():
    if path not in by_path:
      raise ValueError(f"the masks have a leaf {path!r} that the params do not")
    x = by_path[path]
    out[path] = (int(np.sum((x != 0) & ~m)), int(m.size - np.sum(m)))
  return out


def sparsity_summary(
    state: Any, neuron_axis: int | None = None, *, params: Any = None
) -> dict[str, Any]:
  """Host-side summary of an optimizer state's masks, and of the params if given.

  Returns:
    A dict::

      {"sparsity": fraction of zeros the masks prescribe over all sparse leaves,
       "params_sparsity": fraction of exact zeros of params over the same
                          leaves (None without params): below sparsity
                          when pruned weights drifted from 0,
       "pruned_nonzero": pruned weights of params that are not 0.0 (None
                         without params; see check_sparsity),
       "exploration": fraction of sparse weights ever active since init
                      (None without a topology stage),
       "missed_mask_updates": due steps on which the masks were not updated
                              (the ordinary variant ran on a due step: a host
                              flag out of step with the schedule; None without
                              a topology stage),
       "unremasked_mask_updates": mask updates whose optimizer state was not
                                  re-masked (apply_updates(...,
                                  mask_update=False) after a changing
                                  update; None without a topology stage),
       "density_spread": mean over leaves of std(d_i) / mean(d_i),
       "leaves": {path: {"size", "active", "sparsity", "density_min",
                         "density_median", "density_max"[, "pruned_nonzero"]}}}
  """
  # One read of the masks and params, then numpy: per-leaf eager jax ops
  # would compile a program for every leaf shape, on every call.
  masks = _to_host(masking.get_masks(state))
  params = None if params is None else _to_host(params)
  drift = None if params is None else _pruned_nonzero(params, masks)
  leaves = {}
  total = active = 0
  spreads = []
  for path, m in _masks_by_path(masks).items():
    axes = tree_lib.neuron_axes(path, m.ndim, neuron_axis)
    d = np.mean(
        m, axis=tree_lib.reduce_axes(m.ndim, axes), dtype=np.float32
    ).reshape(-1)
    n_active = int(np.sum(m))
    leaves[path] = {
        "size": int(m.size),
        "active": n_active,
        "sparsity": 1.0 - n_active / m.size,
        "density_min": float(d.min()),
        "density_median": float(np.median(d)),
        "density_max": float(d.max()),
    }
    if drift is not None:
      leaves[path]["pruned_nonzero"] = drift[path][0]
    total += m.size
    active += n_active
    if d.mean() > 0:
      spreads.append(float(d.std() / d.mean()))
  topo = [
      s
      for s in jax.tree.leaves(
          state, is_leaf=lambda x: isinstance(x, topology_lib.TopologyState)
      )
      if isinstance(s, topology_lib.TopologyState)
  ]
  exploration = missed = unremasked = None
  if topo and topo[0].masks is not None:
    ever, n = topology_lib.exploration_counts(topo[0])
    exploration = ever / max(n, 1)
  if topo:
    missed = int(topo[0].missed_updates)
    unremasked = int(topo[0].unremasked_updates)
  pruned_nonzero = None if drift is None else sum(v[0] for v in drift.values())
  params_sparsity = None
  if drift is not None:
    by_path = {
        tree_lib.path_str(p): x
        for p, x in jax.tree_util.tree_leaves_with_path(params)
    }
    zeros = sum(int(np.sum(by_path[path] == 0)) for path in leaves)
    params_sparsity = zeros / max(total, 1)
  return {
      "sparsity": 1.0 - active / max(total, 1),
      "params_sparsity": params_sparsity,
      "pruned_nonzero": pruned_nonzero,
      "exploration": exploration,
      "missed_mask_updates": missed,
      "unremasked_mask_updates": unremasked,
      "density_spread": float(np.mean(spreads)) if spreads else 0.0,
      "leaves": leaves,
  }


def check_sparsity(params: Any, masks_or_state: Any) -> None:
  """Raise ValueError if any pruned weight of ``params`` is not exactly 0.0.

  Pruned weights drift from zero when the params are updated with
  ``optax.apply_updates``, Flax's ``TrainState.apply_gradients`` or a plain
  ``nnx.Optimizer`` instead of :func:`~sparseopt_jax.apply_updates`,
  :class:`~sparseopt_jax.SparseTrainState` or
  :class:`~sparseopt_jax.SparseOptimizer`. The message names every such leaf
  and its count. Host-side (it reads the arrays); call it now and then, e.g.
  at each evaluation.
  """
  drift = _pruned_nonzero(
      *_to_host((params, masking.resolve_masks(masks_or_state)))
  )
  bad = {path: v for path, v in drift.items() if v[0]}
  if bad:
    listed = ", ".join(
        f"{path!r} ({n:,} of {total:,} pruned)"
        for path, (n, total) in list(bad.items())[:8]
    )
    raise ValueError(
        f"{sum(n for n, _ in bad.values()):,} pruned weights are not 0.0 in"
        f" {len(bad)} sparse leaves: {listed}. Apply updates with"
        " so.apply_updates (or so.SparseTrainState / so.SparseOptimizer),"
        " which re-masks the params; optax.apply_updates does not"
    )


def neuron_grad_stats(
    grad: jax.Array, mask: jax.Array, neuron_axis: int | tuple[int, ...] = -1
) -> tuple[jax.Array, jax.Array]:
  """Per neuron: kept incoming weights, and mean square gradient over them (float32)."""
  axes = tree_lib.reduce_axes(grad.ndim, neuron_axis)
  kept = jnp.sum(mask, axis=axes, dtype=jnp.float32)
  ms = jnp.sum(
      jnp.square(grad.astype(jnp.float32)) * mask, axis=axes
  ) / jnp.maximum(kept, 1.0)
  return kept, ms


# Jitted: called eagerly, as from skew_slope, its two dozen small ops would each
# be dispatched (and compiled for each new shape) one by one.
@functools.partial(jax.jit, static_argnames="neuron_axis")
def leaf_skew_slope(
    grad: jax.Array, mask: jax.Array, neuron_axis: int | tuple[int, ...] = -1
) -> jax.Array:
  """Least-squares slope of log rms(g over neuron i's surviving weights) on log d_i.

  About -0.5 when BatchNorm follows a sparse layer, about 0 once corrected
  (SparseOpt sec. 3). Neurons with d_i = 0 or zero gradient are left out; NaN
  when fewer than two distinct densities remain. Jittable.
  """
  kept, ms = neuron_grad_stats(grad, mask, neuron_axis)
  ok = (kept > 0) & (ms > 0)
  x = jnp.where(
      ok, jnp.log(jnp.maximum(kept, 1.0) / (mask.size / kept.size)), 0.0
  )
  y = jnp.where(ok, 0.5 * jnp.log(jnp.where(ok, ms, 1.0)), 0.0)
  w = ok.astype(jnp.float32)
  n = jnp.sum(w)
  mx, my = jnp.sum(w * x) / n, jnp.sum(w * y) / n
  var = jnp.sum(w * (x - mx) ** 2)
  # Equal densities (constant fan-in) leave var at rounding noise, not 0: test
  # for two distinct densities directly.
  distinct = jnp.max(jnp.where(ok, x, -jnp.inf)) > jnp.min(
      jnp.where(ok, x, jnp.inf)
  )
  defined = distinct & (var > 1e-12)
  return jnp.where(
      defined,
      jnp.sum(w * (x - mx) * (y - my)) / jnp.where(defined, var, 1.0),
      jnp.nan,
  )


def skew_slope(
    grads: Any, masks: Any, neuron_axis: int | None = None
) -> dict[str, jax.Array]:
  """Per sparse leaf, :func:`leaf_skew_slope` of ``grads``. Takes masks or a state."""
  masks = masking.resolve_masks(masks)
  tree_lib.check_masks_like(masks, grads, what="masks")
  grads_by_path = {
      tree_lib.path_str(p): g
      for p, g in jax.tree_util.tree_leaves_with_path(grads)
  }
  return {
      path: leaf_skew_slope(
          grads_by_path[path],
          m,
          tree_lib.neuron_axes(path, m.ndim, neuron_axis),
      )
      for path, m in _masks_by_path(masks).items()
  }
