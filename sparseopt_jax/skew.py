"""The skew-correction stage: gradient scales that undo a normalisation's skew.

BatchNorm divides neuron i's pre-activation by sigma'_i = sqrt(d_i) * sigma_i,
so the gradient reaching its surviving weights is scaled by 1/sqrt(d_i) (d_i
the fraction of its incoming weights kept). SparseOpt (Adnan et al., ICML 2026,
arXiv 2605.27541) multiplies the gradient of neuron i's incoming weights by

    density:  c_i = sqrt(d_i / mean_j d_j)
    bn:       c_i = max(floor, sqrt((v_i + eps) / mean_j (v_j + eps)))

where v_i is the running variance of the BatchNorm that normalises neuron i's
output (a measured scale rather than the density proxy). Dense leaves, and in
"bn" mode leaves with no BatchNorm mapped to them, keep c_i = 1 and the density
formula respectively. A neuron with d_i = 0 gets c_i = 0, never NaN.

A LayerNorm normalises each token over a *group* of output features (a whole
layer; one head under QK-norm), so it divides every neuron of group g by the
same sqrt(D_g), D_g the group's density (docs/layernorm_skew.md): its skew
varies from layer to layer (or head to head), not from neuron to neuron.
Only kernels whose output the norm takes directly are affected; in a pre-LN
block the norm precedes the kernels and adds no density factor. Hence

    layernorm:  c_g = sqrt(D_g / D)     (kernels in ``ln_leaves``; 1 elsewhere)

with D the fraction of active weights over all the ``ln_leaves`` kernels, so
the mean step over them is kept, and a network that is dense there is left
unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sparseopt_jax import masking
from sparseopt_jax import tree as tree_lib
from sparseopt_jax.checks import check_choice

SKEW_MODES = ("density", "bn", "layernorm")
_UNSET = object()


class SkewState(NamedTuple):
  """State of :func:`skew_correct`.

  Attributes:
    density_factors: per sparse leaf, the float32 factors of the fixed masks
      given at construction, shaped like its neuron axes: c_i = sqrt(d_i /
      mean_j d_j), or in "layernorm" mode c_g (None at every leaf without
      one); None when the masks come from ``update(..., masks=...)`` or the
      factors from ``update(..., density_factors=...)``.
  """

  density_factors: Any


def mask_density_factors(
    masks: Any, neuron_axis: int | None, xp: Any = jnp
) -> Any:
  """Per sparse leaf of ``masks``, c_i of the density rule from its per-neuron counts.

  c_i = sqrt(d_i / mean_j d_j) = sqrt(count_i * n_neurons / n_active) for a
  common fan-in; the same float32 operations in numpy (``xp=np``, at init) and
  in XLA (after a mask update). Shaped like the leaf's neuron axes
  (:func:`~sparseopt_jax.tree.neuron_axes`).
  """

  def leaf(p, m):
    if tree_lib.is_none(m):
      return m
    axes = tree_lib.neuron_axes(tree_lib.path_str(p), m.ndim, neuron_axis)
    counts = xp.sum(m, axis=tree_lib.reduce_axes(m.ndim, axes), dtype=xp.int32)
    total = xp.maximum(xp.sum(counts), 1).astype(xp.float32)
    return xp.sqrt((counts * counts.size).astype(xp.float32) / total).astype(
        xp.float32
    )

  return jax.tree_util.tree_map_with_path(leaf, masks, is_leaf=tree_lib.is_none)


def check_ln_leaves(ln_leaves: Any) -> dict[str, int | None]:
  """``{kernel path: k}`` from a mapping (path -> k or None) or a collection of paths.

  k is how many of the kernel's trailing neuron axes the LayerNorm after it
  normalises over (1 for QK-norm on a (in, heads, head_dim) kernel: one group
  per head); None, or a bare path, means all of them (a feature LayerNorm: one
  group, the layer).
  """
  if isinstance(ln_leaves, str) or ln_leaves is None:
    raise ValueError(
        "skew='layernorm' needs ln_leaves: the kernels whose output a"
        " LayerNorm normalises directly, as a collection of paths or a mapping"
        " {path: trailing neuron axes the norm averages over} (from"
        " so.flax_support.linen.ln_leaves(model, x)); got"
        f" {ln_leaves!r}. A pre-LN network has none: its norms precede the"
        " kernels and add no density factor, so use skew=None there"
    )
  items = (
      ln_leaves.items()
      if isinstance(ln_leaves, Mapping)
      else ((path, None) for path in ln_leaves)
  )
  out = {}
  for path, k in items:
    if not isinstance(path, str) or not (
        k is None or (isinstance(k, int) and not isinstance(k, bool) and k >= 1)
    ):
      raise ValueError(
          f"ln_leaves entries must be str -> int >= 1 | None, got {path!r} ->"
          f" {k!r}"
      )
    out[path] = k
  if not out:
    raise ValueError(
        "skew='layernorm' but ln_leaves is empty: no kernel feeds a LayerNorm"
        " directly (a pre-LN network's norms precede its kernels and add no"
        " density factor), so there is nothing to correct; use skew=None"
    )
  return out


def layernorm_factors(
    masks: Any, ln_leaves: Mapping[str, int | None], neuron_axis: int | None
) -> Any:
  """Per ``ln_leaves`` kernel, c_g = sqrt(D_g / D) broadcast to its neuron axes.

  D_g is the density of the group of output features one LayerNorm
  normalises together (the kernel's neuron axes but the last k); D the
  fraction of active weights over all the ``ln_leaves`` kernels. None at every
  other leaf (no factor). float32; 0 for an empty group, never NaN.
  """
  by_path = {
      tree_lib.path_str(p): m
      for p, m in jax.tree_util.tree_leaves_with_path(
          masks, is_leaf=tree_lib.is_none
      )
  }
  group_density, active, total = {}, 0, 0
  for path, k in ln_leaves.items():
    m = by_path.get(path)
    if m is None or tree_lib.is_none(m):
      continue
    axes = tree_lib.neuron_axes(path, m.ndim, neuron_axis)
    kept = axes[: len(axes) - min(k or len(axes), len(axes))]
    counts = jnp.sum(
        m, axis=tree_lib.reduce_axes(m.ndim, kept), dtype=jnp.int32
    )
    group_density[path] = counts.astype(jnp.float32) / (m.size // counts.size)
    active = active + jnp.sum(counts)
    total += m.size
  mean = jnp.asarray(active, jnp.float32) / max(total, 1)
  safe = jnp.where(mean > 0, mean, 1.0)

  def leaf(p, m):
    path = tree_lib.path_str(p)
    if path not in group_density:
      return None
    axes = tree_lib.neuron_axes(path, m.ndim, neuron_axis)
    d = group_density[path]
    c = jnp.where(mean > 0, jnp.sqrt(d / safe), 0.0)
    # Each group's factor over its normalised neuron axes.
    shape = [m.shape[a] for a in axes]
    c = c.reshape(c.shape + (1,) * (len(axes) - c.ndim))
    return jnp.broadcast_to(c, shape).astype(jnp.float32)

  return jax.tree_util.tree_map_with_path(leaf, masks, is_leaf=tree_lib.is_none)


def bn_factors(variance: jax.Array, epsilon: float, floor: float) -> jax.Array:
  """c_i = max(floor, sqrt((v_i + eps) / mean_j (v_j + eps)))."""
  v = variance.astype(jnp.float32) + epsilon
  return jnp.maximum(floor, jnp.sqrt(v / jnp.mean(v)))


def check_bn_pairs(bn_pairs: Any) -> dict[str, str | None]:
  if not isinstance(bn_pairs, Mapping):
    raise ValueError(
        "skew='bn' needs bn_pairs: a mapping from kernel path (e.g. "
        "'Conv_0/kernel') to the path of its BatchNorm in batch_stats "
        f"(e.g. 'BatchNorm_0'), got {type(bn_pairs).__name__}"
    )
  for k, v in bn_pairs.items():
    if not isinstance(k, str) or not (v is None or isinstance(v, str)):
      raise ValueError(
          f"bn_pairs entries must be str -> str | None, got {k!r} -> {v!r}"
      )
  if not any(v is not None for v in bn_pairs.values()):
    raise ValueError(
        "skew='bn' but bn_pairs maps none of the sparse leaves to a BatchNorm"
        f" ({len(bn_pairs)} entries, all None): the model has no BatchNorm"
        " after a kernel, so there is no running variance to read. Use"
        " skew='layernorm' for kernels a LayerNorm normalises, 'density', or"
        " None"
    )
  return dict(bn_pairs)


def _bn_variances(
    batch_stats: Any, bn_pairs: Mapping[str, str | None]
) -> dict[str, jax.Array]:
  """``{kernel path: running variance}`` for the kernels with a mapped BatchNorm."""
  stats = {
      tree_lib.path_str(p): x
      for p, x in jax.tree_util.tree_leaves_with_path(batch_stats)
  }
  out = {}
  for kernel, bn in bn_pairs.items():
    if bn is None:
      continue
    var = stats.get(f"{bn}/var", stats.get(bn))
    if var is None:
      known = sorted({p.rsplit("/", 1)[0] for p in stats})
      raise ValueError(
          f"bn_pairs maps {kernel!r} to the BatchNorm {bn!r}, which batch_stats"
          f" does not hold (no '{bn}/var'); batch_stats has {known[:10]}. Only"
          " BatchNorm keeps a running variance: a LayerNorm (or any norm"
          " without running statistics) has none to read, so use"
          " skew='density' there"
      )
    out[kernel] = var
  return out


def skew_correct(
    mode: str = "density",
    *,
    masks: Any = None,
    bn_pairs: Mapping[str, str | None] | None = None,
    neuron_axis: int | None = None,
    bn_epsilon: float = 1e-5,
    bn_floor: float = 0.1,
    ln_leaves: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """Scale each neuron's incoming gradient by c_i (see the module docstring).

  On its own, ``optax.chain(so.skew_correct(masks=m), so.mask(m), optax.sgd(...))``
  is skew-corrected static sparse training.

  Args:
    mode: ``"density"`` (the paper), ``"bn"`` (BatchNorm running variance)
      or ``"layernorm"`` (per LayerNorm group, from its density).
    masks: fixed masks; if None, every ``update`` takes the current masks as
      the keyword ``masks=`` (how :func:`~sparseopt_jax.sparseopt` shares them).
    bn_pairs: ``{kernel path: BatchNorm path in batch_stats, or None}``; with
      mode ``"bn"``, ``update`` needs ``batch_stats=``. Unmapped sparse leaves
      use the density formula.
    neuron_axis: the axis of every leaf that indexes neurons; None (default)
      by role: the last axis (Flax HWIO conv and (in, out) dense kernels), and
      each (head, head_dim) pair of attention's query/key/value kernels.
    bn_epsilon: added to the variances, as BatchNorm does.
    bn_floor: the least factor in "bn" mode, so a channel whose weights are all
      newly grown (variance ~ 0) is not frozen.
    ln_leaves: for ``"layernorm"``, the kernels whose output a LayerNorm
      normalises directly: their paths (one group per kernel), or ``{path:
      k}`` with k the trailing neuron axes the norm averages over (1 for
      QK-norm: one group per head); see
      :func:`~sparseopt_jax.flax_support.linen.ln_leaves`. Every other leaf is
      left unscaled. Reads the masks each step (the ``ln_leaves`` kernels only).
  """
  check_choice("skew", mode, SKEW_MODES)
  tree_lib.check_neuron_axis(neuron_axis)
  pairs = check_bn_pairs(bn_pairs) if mode == "bn" else {}
  ln = check_ln_leaves(ln_leaves) if mode == "layernorm" else {}

  def factors_of(masks):
    if mode == "layernorm":
      return layernorm_factors(masks, ln, neuron_axis)
    return mask_density_factors(masks, neuron_axis)

  if not bn_floor >= 0.0:
    raise ValueError(f"bn_floor must be >= 0, got {bn_floor!r}")
  given = None if masks is None else masking.as_bool_masks(masks)

  def init_fn(params):
    if tree_lib.is_params_placeholder(params):
      return SkewState(
          density_factors=None if given is None else tree_lib.NOT_PARAMS
      )
    for name, named in (("bn_pairs", pairs), ("ln_leaves", ln)):
      unknown = sorted(set(named) - set(tree_lib.leaf_paths(params)))
      if unknown:
        raise ValueError(
            f"{name} names kernels that are not params: {unknown[:5]}; params"
            f" paths look like {tree_lib.leaf_paths(params)[:3]}"
        )
    if given is None:
      return SkewState(density_factors=None)
    tree_lib.check_masks_like(given, params)
    tree_lib.check_neuron_axis_fits(
        {
            tree_lib.path_str(p): m.shape
            for p, m in jax.tree_util.tree_leaves_with_path(
                given, is_leaf=tree_lib.is_none
            )
            if not tree_lib.is_none(m)
        },
        neuron_axis,
    )
    return SkewState(density_factors=factors_of(given))

  def update_fn(
      updates,
      state,
      params=None,
      *,
      masks=None,
      density_factors=_UNSET,
      batch_stats=None,
      **extra_args,
  ):
    del params, extra_args
    if mode == "layernorm" and masks is not None:
      factors = factors_of(masks)
    elif mode == "layernorm" and state.density_factors is not None:
      factors = state.density_factors
    elif mode == "layernorm":
      raise ValueError(
          "skew='layernorm' reads the current masks: so.skew_correct() was"
          " built without masks, so update() needs masks=..."
      )
    elif density_factors is not _UNSET:  # None too: every leaf dense
      factors = density_factors
    elif masks is not None:
      factors = factors_of(masks)
    elif state.density_factors is not None:
      factors = state.density_factors
    else:
      raise ValueError(
          "so.skew_correct() was built without masks, so update() needs the"
          " current masks as the keyword masks=... (or their"
          " density_factors=...)"
      )
    variances = {}
    if mode == "bn":
      if batch_stats is None:
        raise ValueError(
            "skew='bn' reads BatchNorm running variances: call tx.update(grads,"
            " state, params, batch_stats=variables['batch_stats'])"
        )
      variances = _bn_variances(batch_stats, pairs)

    def scale(p, c, u):
      if tree_lib.is_none(c):
        return u
      path = tree_lib.path_str(p)
      if path in variances:
        var = variances[path]
        if var.shape != c.shape:
          raise ValueError(
              f"the BatchNorm {pairs[path]!r} has {var.shape} features but "
              f"{path!r} has {c.shape} neurons"
          )
        c = bn_factors(var, bn_epsilon, bn_floor)
      axes = tree_lib.neuron_axes(path, u.ndim, neuron_axis)
      return u * tree_lib.per_neuron(c, u.ndim, axes).astype(u.dtype)

    updates = jax.tree_util.tree_map_with_path(
        scale, factors, updates, is_leaf=tree_lib.is_none
    )
    return updates, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
