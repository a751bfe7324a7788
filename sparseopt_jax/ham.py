"""HAM: Hyperbolic Aware Minimization, a hyperbolic mirror step after any optimizer.

Jacobs, Gadhikar, Rubio-Madrigal, Burkholz, "Hyperbolic Aware Minimization:
Implicit Bias for Sparsity", ICLR 2026 (arXiv 2506.02630); public code
github.com/TomJacobs05/HAM (its ``HamOptimizerWrapper``). Each step, Algorithm 1
of the paper takes an ordinary optimizer step and then a multiplicative
("hyperbolic") step on every weight tensor of ndim >= 2::

    w_half = w_k + u_k                         # u_k: the inner optimizer's update
    w_next = w_half * exp(-lr_k * (alpha * sign(w_half) * g_k + beta))

with ``g_k`` the gradient at ``w_k`` (the one the inner optimizer received) and
``lr_k`` the learning rate of step k. To first order in ``lr`` the hyperbolic step
adds ``-lr * (alpha * |w| * g + beta * w)``: a gradient step whose size grows
with ``|w|`` plus a decay; the paper's Riemannian flow is
``dw/dt = -(1 + alpha |w|) grad f(w) - beta w`` under gradient descent.

Because the step multiplies the weight, a weight at exactly 0 stays at exactly
0 unless the inner optimizer moves it: inside a SparseOpt chain the pruned
weights receive no gradient and no inner update, so they stay 0.0.

Two guards of the public code are kept, with its defaults: the exponent is
clipped to ``[-max_exponent, max_exponent]`` (5), and any parameter tensor whose
norm exceeds ``max_weight_norm`` (1000) after the step is rescaled to that norm.
Neither is in the paper's Algorithm 1; ``None`` turns each off. The public code
also clips gradient norms *after* its step, which does not change the update,
and skips leaves holding NaN; here non-finite steps are
``optax.apply_if_finite``'s job.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sparseopt_jax import tree as tree_lib


class HamState(NamedTuple):
  """State of :func:`ham`.

  Attributes:
    count: int32 scalar, the steps taken; indexes the learning-rate schedule
      (as optax's own ``scale_by_learning_rate`` counts).
    inner_state: the wrapped optimizer's state.
  """

  count: jax.Array
  inner_state: Any


def _number(name: str, value: Any, condition: str) -> float | None:
  """``value`` as a float, None for a tracer (``optax.inject_hyperparams``); raise if not a real number."""
  if isinstance(value, jax.core.Tracer):
    return None
  try:
    ok = not isinstance(value, bool) and jnp.size(value) == 1
    number = float(value) if ok else math.nan
  except (TypeError, ValueError):
    number = math.nan
  if math.isnan(number):
    raise ValueError(f"{name} must be a number {condition}, got {value!r}")
  return number


def _check_nonnegative(name: str, value: Any) -> Any:
  number = _number(name, value, ">= 0")
  if number is not None and not (math.isfinite(number) and number >= 0):
    raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
  return value


def _check_positive_or_none(name: str, value: Any) -> Any:
  if value is None:
    return None
  number = _number(name, value, "> 0 or None")
  if number is not None and not number > 0:
    raise ValueError(f"{name} must be None or a number > 0, got {value!r}")
  return value


def ham(
    inner: optax.GradientTransformation,
    learning_rate: optax.ScalarOrSchedule,
    *,
    alpha: float = 200.0,
    beta: float = 1e-3,
    leaf_filter: tree_lib.SparseFilter = None,
    max_exponent: float | None = 5.0,
    max_weight_norm: float | None = 1000.0,
) -> optax.GradientTransformationExtraArgs:
  """Wrap ``inner`` with HAM's hyperbolic step (Jacobs et al., ICLR 2026).

  The step needs the gradient the inner optimizer received, so HAM wraps the
  optimizer rather than following it in a chain::

    lr = optax.cosine_decay_schedule(0.1, num_steps)
    tx = optax.chain(
        so.sparseopt(0.95, end_step=...),          # masked, corrected gradient
        so.ham(optax.sgd(lr, momentum=0.9), lr),   # alpha=200, beta=1e-3
    )

  For each selected leaf (ndim >= 2 by default) the update becomes
  ``u' = w_half * exp(e) - w`` with ``w_half = w + u`` and
  ``e = clip(-lr * (alpha * sign(w_half) * g + beta), -max_exponent, max_exponent)``;
  other leaves keep the inner update. With ``alpha = beta = 0`` the result is the
  inner optimizer's update, bit for bit.

  Args:
    inner: the optimizer HAM follows (SGD with momentum in the paper; any optax
      transformation). Extra keyword arguments of ``update`` are passed on.
    learning_rate: the step size ``lr_k`` of the hyperbolic step, a float or a
      schedule of the step count; give the inner optimizer's own (the public
      code uses the optimizer's current learning rate).
    alpha: strength of the gradient-sign coupling (public code default 200).
      A weight's relative change per step is about ``lr * alpha * |g|``, so
      alpha depends on the gradients' scale: keep that product well below 1.
      On the CPU benchmark's width-8 ResNet-20 (per-weight gradients up to
      0.4 at initialisation) alpha 200 diverged and alpha 20 trained.
    beta: the constant decay toward zero (public code default 1e-3).
    leaf_filter: which leaves take the hyperbolic step: None (default) is the
      paper's rule, every leaf of ndim >= 2 (in a Flax CNN or MLP these are the
      conv and dense kernels, the same leaves SparseOpt makes sparse); a regex
      on the leaf path (leaves of ndim >= 2 it matches, e.g. ``"kernel"`` to skip
      a transformer's embeddings); or a callable ``(path, leaf) -> bool``.
    max_exponent: clip of the exponent (public code: 5); None: no clip.
    max_weight_norm: per-tensor norm cap applied to every leaf after the step
      (public code: 1000); None: no cap.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`HamState`. ``update`` requires ``params``.
  """
  if not (hasattr(inner, "init") and hasattr(inner, "update")):
    raise ValueError(
        "inner must be an optax GradientTransformation (HAM wraps the"
        f" optimizer it follows), got {type(inner).__name__}"
    )
  if callable(learning_rate):
    schedule = learning_rate
  else:
    _check_nonnegative("learning_rate", learning_rate)
    schedule = lambda count: learning_rate  # noqa: E731
  alpha = _check_nonnegative("alpha", alpha)
  beta = _check_nonnegative("beta", beta)
  max_exponent = _check_positive_or_none("max_exponent", max_exponent)
  max_weight_norm = _check_positive_or_none("max_weight_norm", max_weight_norm)
  selected = tree_lib.make_sparse_filter(leaf_filter)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    if isinstance(leaf_filter, str) and not tree_lib.is_params_placeholder(
        params
    ):
      paths = [
          (tree_lib.path_str(p), x)
          for p, x in jax.tree_util.tree_leaves_with_path(params)
      ]
      if not any(selected(path, x) for path, x in paths):
        raise ValueError(
            f"ham leaf_filter {leaf_filter!r} matches no leaf of ndim >= 2;"
            f" leaf paths: {[path for path, _ in paths][:8]}"
        )
    return HamState(
        count=jnp.zeros([], jnp.int32), inner_state=inner.init(params)
    )

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(
          "so.ham needs the params: call tx.update(grads, state, params)"
      )
    grads = updates
    updates, inner_state = inner.update(
        grads, state.inner_state, params, **extra_args
    )
    lr = schedule(state.count)

    def leaf(path, u, g, w):
      dtype = u.dtype
      if selected(tree_lib.path_str(path), w):
        w_half = w + u
        e = -jnp.asarray(lr, dtype) * (
            jnp.asarray(alpha, dtype) * jnp.sign(w_half) * g.astype(dtype)
            + jnp.asarray(beta, dtype)
        )
        if max_exponent is not None:
          e = jnp.clip(e, -max_exponent, max_exponent)
        # w_half * exp(e) - w, written so that e == 0 returns u exactly.
        u = u + w_half * jnp.expm1(e)
      if max_weight_norm is not None:
        w_next = w + u
        norm = jnp.sqrt(jnp.sum(jnp.square(w_next.astype(jnp.float32))))
        scale = (max_weight_norm / jnp.maximum(norm, 1e-30)).astype(dtype)
        u = jnp.where(norm > max_weight_norm, w_next * scale - w, u)
      return u

    updates = jax.tree_util.tree_map_with_path(leaf, updates, grads, params)
    return updates, HamState(
        count=optax.safe_int32_increment(state.count), inner_state=inner_state
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
