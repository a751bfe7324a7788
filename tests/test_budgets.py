"""Layer budgets: uniform, ERK and ER against hand-computed values."""

import math

import numpy as np
import pytest

import sparseopt_jax as so

# A ResNet-like list: stem conv, a block conv, a projection, a wider conv, the classifier.
SHAPES = {
    "stem/kernel": (3, 3, 3, 16),  # n = 432
    "block/conv/kernel": (3, 3, 16, 16),  # n = 2304
    "block/proj/kernel": (1, 1, 16, 32),  # n = 512
    "stage2/conv/kernel": (3, 3, 32, 32),  # n = 9216
    "head/kernel": (64, 10),  # n = 640
}
SIZES = {k: math.prod(s) for k, s in SHAPES.items()}
TOTAL = sum(SIZES.values())  # 13104


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.97])
def test_uniform_gives_every_leaf_the_target(sparsity):
  assert so.layer_sparsities(SHAPES, sparsity, "uniform") == {
      k: sparsity for k in SHAPES
  }


def test_erk_matches_hand_computation_at_90_percent():
  # raw_l = sum(shape) / prod(shape); eps = 0.1 * 13104 / sum_l raw_l * n_l.
  raw_times_n = {
      "stem/kernel": 25,
      "block/conv/kernel": 38,
      "block/proj/kernel": 50,
      "stage2/conv/kernel": 70,
      "head/kernel": 74,
  }
  eps = 1310.4 / 257
  expected = {k: 1 - eps * raw_times_n[k] / SIZES[k] for k in SHAPES}
  # By hand: the 1x1 projection gets density 5.0988 * 50 / 512 = 0.498, the head 0.590.
  assert expected["block/proj/kernel"] == pytest.approx(1 - 0.49793, abs=1e-4)
  got = so.layer_sparsities(SHAPES, 0.9, "erk")
  assert got == pytest.approx(expected, abs=1e-12)


def test_erk_makes_overfull_layers_dense_and_redistributes():
  # At 50%: eps = 6552 / 257 = 25.49, so the head (74/640 * eps = 2.95) and the 1x1
  # projection (50/512 * eps = 2.49) would exceed density 1; so would the stem
  # (25/432 * eps = 1.48). All three go dense and eps is solved again for the others:
  # eps' = (6552 - 640 - 512 - 432) / (38 + 70) = 46.0
  got = so.layer_sparsities(SHAPES, 0.5, "erk")
  eps = (6552 - 640 - 512 - 432) / (38 + 70)
  assert got["head/kernel"] == 0.0
  assert got["block/proj/kernel"] == 0.0
  assert got["stem/kernel"] == 0.0
  assert got["block/conv/kernel"] == pytest.approx(
      1 - eps * 38 / 2304, abs=1e-12
  )
  assert got["stage2/conv/kernel"] == pytest.approx(
      1 - eps * 70 / 9216, abs=1e-12
  )


def test_er_uses_input_and_output_channels():
  # raw_l = (n_in + n_out) / (n_in * n_out) over the last two dims.
  raw = {
      "stem/kernel": 19 / 48,
      "block/conv/kernel": 32 / 256,
      "block/proj/kernel": 48 / 512,
      "stage2/conv/kernel": 64 / 1024,
      "head/kernel": 74 / 640,
  }
  eps = 1310.4 / sum(raw[k] * SIZES[k] for k in SHAPES)  # 1310.4 / 1463
  got = so.layer_sparsities(SHAPES, 0.9, "er")
  assert got == pytest.approx({k: 1 - eps * raw[k] for k in SHAPES}, abs=1e-12)


@pytest.mark.parametrize("distribution", ["uniform", "erk", "er"])
@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9, 0.95, 0.97])
def test_realised_sparsity_hits_target_within_one_weight_per_leaf(
    distribution, sparsity
):
  counts = so.active_counts(
      SHAPES, so.layer_sparsities(SHAPES, sparsity, distribution)
  )
  assert abs(sum(counts.values()) - (1 - sparsity) * TOTAL) <= len(SHAPES)
  assert all(0 < counts[k] <= SIZES[k] for k in SHAPES)


def test_mapping_distribution_first_match_wins_and_default_applies():
  got = so.layer_sparsities(
      SHAPES, 0.9, {"stem": 0.0, "conv": 0.5, "block": 0.7}
  )
  assert got["stem/kernel"] == 0.0
  assert got["block/conv/kernel"] == 0.5
  assert got["block/proj/kernel"] == 0.7
  assert got["head/kernel"] == 0.9


def test_random_masks_have_exact_counts_and_varied_neuron_density():
  import jax.numpy as jnp

  params = {}
  for path, shape in SHAPES.items():
    node = params
    for key in path.split("/")[:-1]:
      node = node.setdefault(key, {})
    node.update(kernel=jnp.zeros(shape), bias=jnp.zeros(shape[-1]))
  masks = so.random_masks(params, 0.9, "erk", seed=0)
  expected = so.active_counts(SHAPES, so.layer_sparsities(SHAPES, 0.9, "erk"))
  for path, n in expected.items():
    m = masks
    for key in path.split("/"):
      m = m[key]
    assert int(m.sum()) == n
    assert m.dtype == jnp.bool_
  d = np.asarray(masks["stage2"]["conv"]["kernel"].mean(axis=(0, 1, 2)))
  assert d.std() > 0
  assert masks["head"]["bias"] is None
