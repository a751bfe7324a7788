"""sparseopt_jax: SparseOpt (Adnan et al., ICML 2026) for JAX and Optax.

Dynamic sparse training (RigL, SET, static masks) with per-neuron correction of
the gradient skew that normalisation layers cause in sparse networks, as
composable Optax gradient transformations.
"""

from sparseopt_jax.budgets import active_counts, layer_sparsities
from sparseopt_jax.composite import SparseOptState, sparseopt
from sparseopt_jax.diagnostics import check_sparsity, leaf_skew_slope, skew_slope, sparsity_summary
from sparseopt_jax.linen_support import SparseTrainState
from sparseopt_jax.masking import (MaskState, apply_masks, apply_updates, get_masks, mask,
                                   random_masks)
from sparseopt_jax.nnx_support import SparseOptimizer, nnx_batch_stats, remask
from sparseopt_jax.sharding import state_shardings
from sparseopt_jax.skew import SkewState, skew_correct
from sparseopt_jax.topology import TopologyState, is_mask_update_step, topology_update

__version__ = "0.1.0"

__all__ = [
    "MaskState", "SkewState", "SparseOptState", "SparseTrainState", "TopologyState",
    "active_counts", "check_sparsity",
    "apply_masks", "apply_updates", "get_masks", "is_mask_update_step", "layer_sparsities", "leaf_skew_slope", "mask",
    "random_masks", "skew_correct", "skew_slope", "sparseopt", "sparsity_summary", "state_shardings",
    "topology_update",
    "SparseOptimizer", "nnx_batch_stats", "remask",
]
