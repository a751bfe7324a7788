"""Bridges from the Optax transforms to Flax: one module per Flax API.

* :mod:`sparseopt_jax.flax_support.linen`: ``bn_pairs`` (which BatchNorm
  normalises each kernel), ``ln_leaves`` (which kernels a LayerNorm
  normalises directly) and ``SparseTrainState``.
* :mod:`sparseopt_jax.flax_support.nnx`: ``SparseOptimizer``, ``remask`` and
  ``nnx_batch_stats``.

Only these modules import Flax; the core (``sparseopt_jax`` itself) needs jax,
optax and numpy alone, and loads a bridge on first use of one of its names.
"""
