"""``sparseopt``: skew correction + topology update + mask, as one Optax transform.

How the stages share the mask: the masks live in exactly one place, the
:class:`~sparseopt_jax.topology.TopologyState` of the topology stage. Each step

1. :func:`~sparseopt_jax.skew_correct` scales the raw gradient per neuron,
   reading the current masks, which ``sparseopt`` passes to it as the keyword
   ``masks=``;
2. :func:`~sparseopt_jax.topology_update` updates the masks on schedule, RigL
   ranking the raw gradient (``grow_with="raw"``) or the corrected one;
3. the mask stage (:func:`~sparseopt_jax.mask`, which the topology stage
   applies with the masks it owns) zeroes the pruned entries.

:func:`~sparseopt_jax.apply_updates` and :func:`~sparseopt_jax.get_masks` find
the same masks in the state, so nothing is stored twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import optax

from sparseopt_jax import budgets
from sparseopt_jax import schedule as schedule_lib
from sparseopt_jax import skew as skew_lib
from sparseopt_jax import topology as topology_lib
from sparseopt_jax import tree as tree_lib
from sparseopt_jax.checks import check_choice

GROW_WITH = ("raw", "corrected")


class SparseOptState(NamedTuple):
  """State of :func:`sparseopt`.

  Attributes:
    skew: the skew stage's state (``optax.EmptyState`` when ``skew=None``).
    topology: the topology stage's state, which owns the masks.
  """

  skew: Any
  topology: topology_lib.TopologyState


def sparseopt(
    sparsity: float,
    *,
    distribution: budgets.Distribution | None = None,
    topology: str = "rigl",
    update_every: int | None = None,
    drop_fraction: float | None = None,
    end_step: int | None = None,
    schedule: schedule_lib.MaskSchedule | None = None,
    skew: str | None = "density",
    grow_with: str = "raw",
    sparse_filter: tree_lib.SparseFilter = None,
    masks: Any = None,
    seed: int = 0,
    bn_pairs: Mapping[str, str | None] | None = None,
    neuron_axis: int | None = None,
    bn_floor: float = 0.1,
    structure: str | None = None,
    ln_leaves: Any = None,
) -> optax.GradientTransformationExtraArgs:
  """SparseOpt: dynamic sparse training with normalisation-aware skew correction.

  Use before any optimizer::

    tx = optax.chain(so.sparseopt(0.9, end_step=75_000), optax.sgd(0.1, momentum=0.9))
    state = tx.init(params)
    params = so.apply_masks(params, state)
    updates, state = tx.update(grads, state, params)
    params, state = so.apply_updates(params, updates, state)

  Args:
    sparsity: target fraction of zeros over the sparse leaves, in [0, 1).
    distribution: layer budgets, ``"uniform"``, ``"erk"``, ``"er"`` or a mapping
      from leaf-path regex to sparsity; None (default): ``"erk"``, or
      ``"uniform"`` under an N:M ``structure``.
    topology: ``"rigl"``, ``"set"`` or ``"static"``.
    update_every: Delta-T, steps between mask updates (default 100).
    drop_fraction: alpha, cosine-decayed to 0 at ``end_step`` (default 0.3).
    end_step: no mask update at or after this step; required unless static
      or ``schedule`` is given.
    schedule: a :class:`~sparseopt_jax.schedule.MaskSchedule`
      (:func:`~sparseopt_jax.mask_update_schedule`) instead of the three
      arguments above; a host-scheduled loop asks the same object
      (``schedule.is_due(step)``), so no number is written twice.
    skew: ``"density"`` (c_i = sqrt(d_i / d_avg), the paper), ``"bn"`` (from
      the BatchNorm running variance; ``update`` takes ``batch_stats=``),
      ``"layernorm"`` (c_g = sqrt(D_g / D) per LayerNorm group of the
      ``ln_leaves`` kernels) or None (plain dynamic sparse training).
    grow_with: the gradient RigL's grow criterion ranks: ``"raw"`` (the paper's
      best exploration) or ``"corrected"``.
    sparse_filter: which leaves are sparse (default: ndim >= 2).
    masks: optional initial masks, overriding ``sparsity`` and ``distribution``.
    seed: seed of the initial masks and of the topology noise.
    bn_pairs: kernel path -> BatchNorm path, for ``skew="bn"``.
    neuron_axis: the neuron axis of every sparse leaf; None (default) by role:
      the last axis, and (head, head_dim) of attention's query/key/value kernels.
    bn_floor: least factor in ``"bn"`` mode.
    ln_leaves: for ``skew="layernorm"``, the kernels whose output a LayerNorm
      normalises directly (paths, or ``{path: trailing neuron axes the norm
      averages over}``; :func:`~sparseopt_jax.flax_support.linen.ln_leaves`
      finds them). Each group of such a kernel gets c_g = sqrt(D_g / D); every
      other leaf is left unscaled (docs/layernorm_skew.md).
    structure: None (unstructured), ``"fan_in"`` (every neuron keeps the same
      number of incoming weights, so every density factor is exactly 1 and
      ``skew="density"`` is the identity) or ``"N:M"`` like ``"2:4"`` (N active
      in every group of M consecutive inputs; ``sparsity`` must be 1 - N/M);
      kept exactly by the initial masks and every RigL/SET update (see
      :func:`~sparseopt_jax.topology_update`).
  """
  check_choice("grow_with", grow_with, GROW_WITH)
  if distribution is None:
    n_m = structure not in (None, "fan_in")
    distribution = "uniform" if n_m else "erk"
  if skew is not None:
    check_choice("skew", skew, skew_lib.SKEW_MODES)
  topo = topology_lib.topology_update(
      topology,
      sparsity=sparsity,
      distribution=distribution,
      masks=masks,
      sparse_filter=sparse_filter,
      update_every=update_every,
      drop_fraction=drop_fraction,
      end_step=end_step,
      schedule=schedule,
      seed=seed,
      neuron_axis=neuron_axis,
      structure=structure,
  )
  correct = (
      None
      if skew is None
      else skew_lib.skew_correct(
          skew,
          bn_pairs=bn_pairs,
          neuron_axis=neuron_axis,
          bn_floor=bn_floor,
          ln_leaves=ln_leaves,
      )
  )

  def init_fn(params):
    state = SparseOptState(
        skew=optax.EmptyState() if correct is None else correct.init(params),
        topology=topo.init(params),
    )
    if skew == "bn" and not tree_lib.is_params_placeholder(params):
      sparse = {
          tree_lib.path_str(p)
          for p, m in jax.tree_util.tree_leaves_with_path(
              state.topology.masks, is_leaf=tree_lib.is_none
          )
          if not tree_lib.is_none(m)
      }
      mapped = {k for k, v in (bn_pairs or {}).items() if v is not None}
      if sparse and not sparse & mapped:
        raise ValueError(
            "skew='bn' but bn_pairs maps none of the sparse leaves"
            f" {sorted(sparse)[:5]} to a BatchNorm (it maps"
            f" {sorted(mapped)[:5]}): every factor would come from the density"
            " formula; map each kernel to the BatchNorm after it, or use"
            " skew='density'"
        )
    if skew == "layernorm" and not tree_lib.is_params_placeholder(params):
      sparse = {
          tree_lib.path_str(p)
          for p, m in jax.tree_util.tree_leaves_with_path(
              state.topology.masks, is_leaf=tree_lib.is_none
          )
          if not tree_lib.is_none(m)
      }
      named = set(skew_lib.check_ln_leaves(ln_leaves))
      if sparse and not sparse & named:
        raise ValueError(
            "skew='layernorm' but ln_leaves names none of the sparse leaves"
            f" {sorted(sparse)[:5]} (it names {sorted(named)[:5]}): every"
            " factor would be 1; name the kernels whose output a LayerNorm"
            " normalises, or use skew=None"
        )
    return state

  def update_fn(updates, state, params=None, **extra_args):
    for name in (
        "masks",
        "grow_grads",
        "density_factors",
    ):  # set here, not by the caller
      extra_args.pop(name, None)
    grads = updates
    skew_state = state.skew
    if correct is not None:
      updates, skew_state = correct.update(
          updates,
          skew_state,
          params,
          **(
              {"masks": state.topology.masks}
              if skew == "layernorm"
              else {"density_factors": state.topology.density_factors}
          ),
          **extra_args,
      )
    updates, topo_state = topo.update(
        updates,
        state.topology,
        params,
        grow_grads=grads if grow_with == "raw" else None,
        **extra_args,
    )
    return updates, SparseOptState(skew=skew_state, topology=topo_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
