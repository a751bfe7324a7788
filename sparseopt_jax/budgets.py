"""Per-layer sparsity budgets: uniform, Erdos-Renyi (ER) and ER-kernel (ERK).

ERK (Evci et al. 2020, "Rigging the Lottery", sec. 3) gives layer l the density

    d_l = eps * sum(shape_l) / prod(shape_l)

with eps chosen so that sum_l d_l * n_l = (1 - s) * sum_l n_l over the sparse
leaves. A layer whose d_l would exceed 1 is made dense and eps is solved again
for the rest. ER (Mocanu et al. 2018) uses (n_in + n_out) / (n_in * n_out) with
n_in, n_out the last two dimensions (input and output channels of an HWIO
conv kernel, rows and columns of a dense kernel).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from sparseopt_jax import structure as structure_lib
from sparseopt_jax.checks import check_fraction

DISTRIBUTIONS = ("uniform", "erk", "er")

Distribution = str | Mapping[str, float]


def check_sparsity(sparsity: float, what: str = "sparsity") -> float:
  return check_fraction(what, sparsity, closed=False)


def check_distribution(distribution: Distribution) -> Distribution:
  """Validate eagerly: a known name, or a mapping regex -> sparsity in [0, 1)."""
  if isinstance(distribution, str):
    if distribution not in DISTRIBUTIONS:
      raise ValueError(
          f"unknown distribution {distribution!r}; expected one of"
          f" {DISTRIBUTIONS} or a mapping from leaf-path regex to sparsity"
      )
    return distribution
  if isinstance(distribution, Mapping):
    for pattern, value in distribution.items():
      try:
        re.compile(pattern)
      except (re.error, TypeError) as e:
        raise ValueError(
            f"distribution key {pattern!r} is not a valid regex: {e}"
        ) from e
      check_sparsity(value, what=f"distribution[{pattern!r}]")
    return dict(distribution)
  raise ValueError(
      f"distribution must be one of {DISTRIBUTIONS} or a mapping, "
      f"got {type(distribution).__name__}"
  )


def _raw_density(shape: tuple[int, ...], distribution: str) -> float:
  if distribution == "erk":
    return sum(shape) / math.prod(shape)
  n_in, n_out = (1, shape[-1]) if len(shape) == 1 else shape[-2:]
  return (n_in + n_out) / (n_in * n_out)


def _erk_densities(
    shapes: Mapping[str, tuple[int, ...]], density: float, distribution: str
) -> dict[str, float]:
  sizes = {k: math.prod(s) for k, s in shapes.items()}
  raw = {k: _raw_density(s, distribution) for k, s in shapes.items()}
  dense: set[str] = set()
  while True:
    # Weights the sparse layers must hold once the dense layers are paid for.
    budget = density * sum(sizes.values()) - sum(sizes[k] for k in dense)
    divisor = sum(raw[k] * sizes[k] for k in shapes if k not in dense)
    if divisor == 0:
      return {k: 1.0 for k in shapes}
    eps = budget / divisor
    free = [k for k in shapes if k not in dense]
    top = max(raw[k] for k in free)
    if eps * top <= 1.0:
      return {k: 1.0 if k in dense else eps * raw[k] for k in shapes}
    dense.update(k for k in free if raw[k] == top)


def layer_sparsities(
    shapes: Mapping[str, tuple[int, ...]],
    sparsity: float,
    distribution: Distribution = "uniform",
) -> dict[str, float]:
  """Sparsity of every sparse leaf so that their union has ``sparsity`` zeros.

  Args:
    shapes: ``{path: shape}`` of the sparse leaves.
    sparsity: target fraction of zeros over all of them, in [0, 1).
    distribution: ``"uniform"``, ``"erk"``, ``"er"``, or a mapping from a regex
      (searched in the leaf path, first match wins) to that leaf's sparsity;
      leaves no pattern matches get ``sparsity``.
  """
  sparsity = check_sparsity(sparsity)
  distribution = check_distribution(distribution)
  if isinstance(distribution, Mapping):
    unmatched = [
        pat
        for pat in distribution
        if not any(re.search(pat, p) for p in shapes)
    ]
    if unmatched:
      raise ValueError(
          f"distribution patterns {unmatched} match no sparse leaf; the sparse "
          f"leaves are {list(shapes)[:8]}"
      )
    out = {}
    for path in shapes:
      out[path] = next(
          (float(v) for pat, v in distribution.items() if re.search(pat, path)),
          sparsity,
      )
    return out
  if distribution == "uniform" or not shapes:
    return {k: sparsity for k in shapes}
  densities = _erk_densities(shapes, 1.0 - sparsity, distribution)
  return {k: 1.0 - d for k, d in densities.items()}


def active_counts(
    shapes: Mapping[str, tuple[int, ...]],
    sparsities: Mapping[str, float],
    *,
    structure: str | None = None,
    neuron_axis: int | None = None,
) -> dict[str, int]:
  """Number of kept weights per leaf: round((1 - s_l) * n_l), at least 1.

  With a ``structure`` (``"fan_in"`` or ``"N:M"``, see
  :mod:`sparseopt_jax.structure`) the real counts of the structured masks:
  neurons x clip(round(fan_in (1 - s_l)), 1, fan_in) for ``"fan_in"``, which
  can differ slightly from the budget, and n_l N / M for N:M.
  """
  spec = structure_lib.parse(structure)
  if spec is not None:
    return structure_lib.active_counts(shapes, sparsities, spec, neuron_axis)
  out = {}
  for path, shape in shapes.items():
    n = math.prod(shape)
    out[path] = min(n, max(1, round((1.0 - sparsities[path]) * n)))
  return out
