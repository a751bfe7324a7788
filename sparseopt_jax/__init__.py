"""sparseopt_jax: SparseOpt (Adnan et al., ICML 2026) for JAX and Optax.

Dynamic sparse training (RigL, SET, static masks) with per-neuron correction of
the gradient skew that normalisation layers cause in sparse networks, as
composable Optax gradient transformations.

The names below need jax, optax and numpy only. The Flax bridges
(``SparseOptimizer``, ``remask``, ``nnx_batch_stats``, ``SparseTrainState``,
``bn_pairs``) are loaded from :mod:`sparseopt_jax.flax_support` on first use,
so ``import sparseopt_jax`` never imports Flax.
"""

import importlib

from sparseopt_jax.budgets import active_counts, layer_sparsities
from sparseopt_jax.composite import SparseOptState, sparseopt
from sparseopt_jax.diagnostics import (
    check_sparsity,
    leaf_skew_slope,
    skew_slope,
    sparsity_summary,
)
from sparseopt_jax.ham import HamState, ham
from sparseopt_jax.masking import (
    MaskState,
    apply_masks,
    apply_updates,
    get_masks,
    mask,
    random_masks,
)
from sparseopt_jax.schedule import (
    MaskSchedule,
    is_mask_update_step,
    mask_update_schedule,
)
from sparseopt_jax.sharding import state_shardings
from sparseopt_jax.skew import SkewState, skew_correct
from sparseopt_jax.topology import TopologyState, topology_update

__version__ = "0.1.0"

# Flax bridges: name -> module, imported on first attribute access (PEP 562).
_LAZY = {
    "SparseOptimizer": "sparseopt_jax.flax_support.nnx",
    "nnx_batch_stats": "sparseopt_jax.flax_support.nnx",
    "remask": "sparseopt_jax.flax_support.nnx",
    "SparseTrainState": "sparseopt_jax.flax_support.linen",
    "bn_pairs": "sparseopt_jax.flax_support.linen",
    "ln_leaves": "sparseopt_jax.flax_support.linen",
}


def __getattr__(name):
  if name in _LAZY:
    try:
      module = importlib.import_module(_LAZY[name])
    except ModuleNotFoundError as e:
      if (e.name or "").split(".")[0] != "flax":
        raise
      raise ModuleNotFoundError(
          f"sparseopt_jax.{name} needs Flax: pip install 'sparseopt-jax[flax]'",
          name=e.name,
      ) from e
    return getattr(module, name)
  raise AttributeError(f"module 'sparseopt_jax' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_LAZY))


__all__ = [
    "HamState",
    "MaskSchedule",
    "MaskState",
    "SkewState",
    "SparseOptState",
    "TopologyState",
    "active_counts",
    "apply_masks",
    "apply_updates",
    "check_sparsity",
    "get_masks",
    "ham",
    "is_mask_update_step",
    "layer_sparsities",
    "leaf_skew_slope",
    "mask",
    "mask_update_schedule",
    "random_masks",
    "skew_correct",
    "skew_slope",
    "sparseopt",
    "sparsity_summary",
    "state_shardings",
    "topology_update",
    *_LAZY,
]
