"""Flax linen bridge: which norm follows each kernel, and a sparse ``TrainState``.

:func:`bn_pairs` traces a linen model once to map each kernel to its BatchNorm
(what ``skew="bn"`` reads); :func:`ln_leaves` finds the kernels whose output a
LayerNorm normalises directly (what ``skew="layernorm"`` corrects).

``flax.training.train_state.TrainState.apply_gradients`` ends with
``optax.apply_updates`` and passes no extra arguments to ``tx.update``: with a
SparseOpt chain, dropped weights would keep their value and momentum, and
``skew="bn"`` could not read the BatchNorm statistics. :class:`SparseTrainState`
is the same class with both fixed::

  state = so.SparseTrainState.create(apply_fn=model.apply, params=variables["params"],
                                     tx=optax.chain(so.sparseopt(0.9, ...), optax.sgd(...)))
  state = state.apply_gradients(grads=grads)                         # in a jitted step
  state = state.apply_gradients(grads=grads, batch_stats=new_stats)  # skew="bn"
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax.training import train_state
from flax.traverse_util import flatten_dict

from sparseopt_jax import masking


class SparseTrainState(train_state.TrainState):
  """``TrainState`` for SparseOpt chains: every pruned weight stays exactly 0.0.

  ``create`` zeroes the pruned weights once; ``apply_gradients(grads=...,
  mask_update=None, batch_stats=None, **replace)`` calls ``tx.update`` with
  ``mask_update`` and ``batch_stats`` (for ``skew="bn"``) and applies the
  updates with :func:`~sparseopt_jax.apply_updates`; other keyword arguments
  replace fields, as in Flax.
  """

  def apply_gradients(
      self,
      *,
      grads: Any,
      mask_update: bool | None = None,
      batch_stats: Any = None,
      **kwargs,
  ) -> SparseTrainState:
    extra = {} if batch_stats is None else {"batch_stats": batch_stats}
    updates, opt_state = self.tx.update(
        grads, self.opt_state, self.params, mask_update=mask_update, **extra
    )
    params, opt_state = masking.apply_updates(
        self.params, updates, opt_state, mask_update=mask_update
    )
    return self.replace(
        step=self.step + 1, params=params, opt_state=opt_state, **kwargs
    )

  @classmethod
  def create(
      cls, *, apply_fn: Any, params: Any, tx: Any, **kwargs
  ) -> SparseTrainState:
    state = super().create(apply_fn=apply_fn, params=params, tx=tx, **kwargs)
    return state.replace(
        params=masking.apply_masks(state.params, state.opt_state)
    )


# ---------------------------------------------------------------------------
# Structural kernel -> BatchNorm pairing
# ---------------------------------------------------------------------------


def _own_variable(module: nn.Module, collection: str, name: str) -> bool:
  try:
    return module.scope is not None and module.has_variable(collection, name)
  except Exception:  # pragma: no cover - unbound / exotic modules
    return False


def _first_input(args, kwargs):
  if args:
    return args[0]
  for k in ("x", "inputs"):
    if k in kwargs:
      return kwargs[k]
  return None


def bn_pairs(
    model: nn.Module, sample_input, **call_kwargs
) -> dict[str, str | None]:
  """Maps every kernel in ``params`` to the BatchNorm that normalises its output.

  The model is traced once, abstractly (``jax.eval_shape`` of ``model.init``
  under ``flax.linen.intercept_methods``; no FLOPs, no memory for the
  weights).  During the trace, the output array of every call to a module
  that owns a ``kernel`` parameter (``nn.Conv``, ``nn.Dense``, ...) is
  recorded, and a kernel is paired with a BatchNorm (any module owning a
  ``batch_stats`` ``var``, e.g. ``nn.BatchNorm``) when that very array
  object is the BatchNorm's input.  Module names play no role.  A kernel
  whose output reaches a BatchNorm only after some other op (activation,
  reshape, residual add, ...) or never is mapped to ``None`` (e.g. the
  classifier).

  Args:
    model: any linen module built from modules like nn.Conv / nn.Dense /
    nn.BatchNorm (BatchNorm without ``axis_name``, or trace inside the
    corresponding collective context).
    sample_input: an array, a ``jax.ShapeDtypeStruct`` or a pytree of those
    (only shapes and dtypes are used), passed as the model's first input.
    **call_kwargs: forwarded to ``model.init`` / ``__call__`` (e.g.
    ``train=True``).

  Returns:
    ``{kernel_path: bn_path_or_None}`` with '/'-joined paths relative to the
    collections, e.g. for ResNet-20
    ``{'conv_init/kernel': 'bn_init', 'stage1_block0/conv1/kernel':
    'stage1_block0/bn1', ..., 'stage2_block0/proj_conv/kernel':
    'stage2_block0/proj_bn', 'head/kernel': None}``, so that
    ``batch_stats['stage1_block0']['bn1']['var']`` is the running variance
    of the output neurons (last kernel axis) of that kernel.

  Raises:
    ValueError: if a kernel's output feeds two different BatchNorms, or a
    BatchNorm's feature count differs from ``kernel.shape[-1]``.

  Example::

    model = ResNet20(num_classes=10)
    variables = model.init(key, x, train=False)
    pairs = bn_pairs(model, x, train=False)
    tx = optax.chain(skew_correct(mode="bn", bn_pairs=pairs), optax.sgd(0.1))
    opt_state = tx.init(variables['params'])
    updates, opt_state = tx.update(grads, opt_state, variables['params'],
                                 batch_stats=variables['batch_stats'])
  """
  producers: list[tuple[Any, tuple[str, ...]]] = (
      []
  )  # (output array, kernel-owner path)
  consumers: list[tuple[Any, tuple[str, ...]]] = []  # (input array, BN path)

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "setup":
      return out
    module = context.module
    if _own_variable(module, "batch_stats", "var"):
      x = _first_input(args, kwargs)
      if x is not None:
        consumers.append((x, tuple(module.scope.path)))
    elif _own_variable(module, "params", "kernel") and isinstance(
        out, jax.Array
    ):
      # Keep a reference to `out` so its id() cannot be recycled.
      producers.append((out, tuple(module.scope.path)))
    return out

  def abstract(a):
    if not (hasattr(a, "shape") and hasattr(a, "dtype")):
      a = np.asarray(a)
    return jax.ShapeDtypeStruct(tuple(a.shape), a.dtype)

  sample = jax.tree.map(abstract, sample_input)

  def init(x):
    key = jax.random.key(0)
    rngs = {"params": key, "dropout": key}
    with nn.intercept_methods(interceptor):
      return model.init(rngs, x, **call_kwargs)

  shapes = jax.eval_shape(init, sample)
  params = flatten_dict(dict(shapes.get("params", {})))
  batch_stats = flatten_dict(dict(shapes.get("batch_stats", {})))

  pairs: dict[tuple[str, ...], set[tuple[str, ...]]] = {}
  for out, kpath in producers:
    for x, bpath in consumers:
      if x is out:
        pairs.setdefault(kpath, set()).add(bpath)

  result: dict[str, str | None] = {}
  for path, leaf in params.items():
    if path[-1] != "kernel":
      continue
    kname = "/".join(path)
    bns = pairs.get(path[:-1], set())
    if len(bns) > 1:
      names = sorted("/".join(b) for b in bns)
      raise ValueError(
          f"kernel {kname!r} feeds several BatchNorms {names}; pairing is"
          " ambiguous"
      )
    if not bns:
      result[kname] = None
      continue
    (bpath,) = bns
    bname = "/".join(bpath)
    var = batch_stats.get(bpath + ("var",))
    if var is None:
      raise ValueError(
          f"BatchNorm {bname!r} paired with {kname!r} has no batch_stats 'var'"
      )
    if len(var.shape) == 0 or var.shape[-1] != leaf.shape[-1]:
      raise ValueError(
          f"BatchNorm {bname!r} has running variance of shape"
          f" {tuple(var.shape)}, which does not match the {leaf.shape[-1]}"
          f" output neurons of kernel {kname!r} (shape {tuple(leaf.shape)})"
      )
    result[kname] = bname
  return result


# ---------------------------------------------------------------------------
# Kernels a LayerNorm normalises directly
# ---------------------------------------------------------------------------


def ln_leaves(model: nn.Module, sample_input, **call_kwargs) -> dict[str, int]:
  """Maps every kernel whose output a LayerNorm normalises directly to its group axes.

  What ``skew="layernorm"`` needs (docs/layernorm_skew.md): a LayerNorm
  divides all the features it averages over by one RMS, so a kernel feeding
  it has one skew factor per group of those features. Traced once, abstractly,
  as :func:`bn_pairs` is: a kernel is mapped when its output array itself is
  the input of an ``nn.LayerNorm`` or ``nn.RMSNorm``, to k, the number of the
  output's trailing axes the norm reduces over (1 for a Dense kernel: the
  whole layer is one group; 1 for QK-norm after a (in, heads, head_dim)
  kernel: one group per head). Kernels whose output reaches a norm only
  through a residual add (post-LN blocks) or not at all (pre-LN blocks, whose
  norms precede the kernels) are left out: their norm adds no density factor
  of their own.

  Args:
    model: a linen module.
    sample_input: an array, a ``jax.ShapeDtypeStruct`` or a pytree of those.
    **call_kwargs: forwarded to ``model.init``.

  Returns:
    A dict from kernel path to k, e.g. for a ViT with QK-norm
    ``{'block0/attn/query/kernel': 1, 'block0/attn/key/kernel': 1, ...}``;
    ``{}`` for a plain pre-LN ViT.

  Raises:
    ValueError: if a kernel feeds two norms with different groups, or a norm
    reduces over axes that are not trailing.
  """
  producers: list[tuple[Any, tuple[str, ...]]] = []
  consumers: list[tuple[Any, int]] = []  # (input array, trailing axes reduced)

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "setup":
      return out
    module = context.module
    x = _first_input(args, kwargs)
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)) and x is not None:
      ndim = len(x.shape)
      axes = module.reduction_axes
      axes = (axes,) if isinstance(axes, int) else tuple(axes)
      axes = sorted(a % ndim for a in axes)
      if axes != list(range(ndim - len(axes), ndim)):
        raise ValueError(
            f"the norm {'/'.join(module.scope.path)!r} reduces over axes"
            f" {module.reduction_axes} of a {ndim}-d input, not trailing"
            " ones: its groups are not a kernel's output features"
        )
      consumers.append((x, len(axes)))
    elif _own_variable(module, "params", "kernel") and isinstance(
        out, jax.Array
    ):
      producers.append((out, tuple(module.scope.path)))
    return out

  def abstract(a):
    if not (hasattr(a, "shape") and hasattr(a, "dtype")):
      a = np.asarray(a)
    return jax.ShapeDtypeStruct(tuple(a.shape), a.dtype)

  def init(x):
    key = jax.random.key(0)
    with nn.intercept_methods(interceptor):
      return model.init({"params": key, "dropout": key}, x, **call_kwargs)

  jax.eval_shape(init, jax.tree.map(abstract, sample_input))
  result: dict[str, int] = {}
  for out, kpath in producers:
    for x, k in consumers:
      if x is out:
        name = "/".join(kpath + ("kernel",))
        if result.get(name, k) != k:
          raise ValueError(
              f"kernel {name!r} feeds norms over {result[name]} and {k}"
              " trailing axes; its groups are ambiguous"
          )
        result[name] = k
  return result
