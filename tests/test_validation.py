"""Bad input: a ValueError naming the problem, at construction or init, not deep in a trace."""

import jax
import jax.numpy as jnp
import optax
import pytest

import sparseopt_jax as so

PARAMS = {"conv": {"kernel": jnp.ones((3, 3, 4, 8)), "bias": jnp.zeros(8)}}


@pytest.mark.parametrize("kwargs, match", [
    (dict(sparsity=-0.1), "sparsity"),
    (dict(sparsity=1.0), "sparsity"),
    (dict(sparsity="0.9"), "sparsity"),
    (dict(sparsity=0.9, distribution="erdos"), "distribution 'erdos'"),
    (dict(sparsity=0.9, distribution={"conv": 1.5}), r"distribution\['conv'\]"),
    (dict(sparsity=0.9, distribution={"(": 0.5}), "regex"),
    (dict(sparsity=0.9, topology="gradual"), "topology 'gradual'"),
    (dict(sparsity=0.9, skew="norm"), "skew 'norm'"),
    (dict(sparsity=0.9, grow_with="both"), "grow_with 'both'"),
    (dict(sparsity=0.9, update_every=0), "update_every"),
    (dict(sparsity=0.9, update_every=2.5), "update_every"),
    (dict(sparsity=0.9, end_step=-1), "end_step"),
    (dict(sparsity=0.9, topology="rigl", end_step=None), "end_step"),
    (dict(sparsity=0.9, drop_fraction=1.5), "drop_fraction"),
    (dict(sparsity=0.9, skew="bn"), "bn_pairs"),
    (dict(sparsity=0.9, sparse_filter=3), "sparse_filter"),
    (dict(sparsity=0.9, sparse_filter="("), "sparse_filter"),
])
def test_bad_hyperparameters_raise_at_construction(kwargs, match):
  kwargs = {"end_step": 100, **kwargs}
  with pytest.raises(ValueError, match=match):
    so.sparseopt(**kwargs)


def test_masks_with_wrong_structure_fail_at_init_naming_the_problem():
  tx = so.sparseopt(0.9, masks={"conv": {"kernel": jnp.ones((3, 3, 4, 8), bool)}}, end_step=10)
  with pytest.raises(ValueError, match="structure of the params"):
    tx.init(PARAMS)


def test_masks_with_wrong_shape_fail_at_init_naming_the_leaf():
  masks = {"conv": {"kernel": jnp.ones((3, 3, 4, 7), bool), "bias": None}}
  with pytest.raises(ValueError, match=r"'conv/kernel'.*\(3, 3, 4, 7\)"):
    so.sparseopt(0.9, masks=masks, end_step=10).init(PARAMS)
  with pytest.raises(ValueError, match="conv/kernel"):
    so.mask(masks).init(PARAMS)


def test_bn_mode_without_batch_stats_says_what_to_pass():
  tx = optax.chain(so.sparseopt(0.9, skew="bn", bn_pairs={"conv/kernel": "bn"}, end_step=10),
                   optax.sgd(0.1))
  state = tx.init(PARAMS)
  with pytest.raises(ValueError, match="batch_stats="):
    jax.jit(tx.update)(PARAMS, state, PARAMS)


def test_bn_pairs_naming_missing_batchnorm_or_kernel():
  tx = so.sparseopt(0.9, skew="bn", bn_pairs={"conv/kernel": "bn_missing"}, end_step=10)
  state = tx.init(PARAMS)
  with pytest.raises(ValueError, match="bn_missing"):
    tx.update(PARAMS, state, PARAMS, batch_stats={"bn": {"var": jnp.ones(8)}})
  with pytest.raises(ValueError, match="not params"):
    so.sparseopt(0.9, skew="bn", bn_pairs={"Conv_9/kernel": "bn"}, end_step=10).init(PARAMS)


def test_stages_without_masks_say_so():
  with pytest.raises(ValueError, match="masks="):
    so.mask().update(PARAMS, so.mask().init(PARAMS), PARAMS)
  with pytest.raises(ValueError, match="masks="):
    so.skew_correct().update(PARAMS, so.skew_correct().init(PARAMS), PARAMS)


def test_get_masks_without_an_owner():
  with pytest.raises(ValueError, match="mask-owning"):
    so.get_masks(optax.sgd(0.1).init(PARAMS))
