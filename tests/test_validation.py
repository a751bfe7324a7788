"""Bad input: a ValueError naming the problem, at construction or init, not deep in a trace."""

import jax
import jax.numpy as jnp
import optax
import pytest

import sparseopt_jax as so

PARAMS = {"conv": {"kernel": jnp.ones((3, 3, 4, 8)), "bias": jnp.zeros(8)}}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sparsity=-0.1), "sparsity"),
        (dict(sparsity=1.0), "sparsity"),
        (dict(sparsity="0.9"), "sparsity"),
        (dict(sparsity=0.9, distribution="erdos"), "distribution 'erdos'"),
        (
            dict(sparsity=0.9, distribution={"conv": 1.5}),
            r"distribution\['conv'\]",
        ),
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
        (
            dict(sparsity=0.9, topology="rigl", update_every=100, end_step=100),
            "never update",
        ),
        (
            dict(sparsity=0.9, topology="set", update_every=10, end_step=5),
            "never update",
        ),
        (
            dict(
                sparsity=0.9,
                masks={"w": jnp.array([0.2, 0.7])},
                topology="static",
            ),
            "'w'.*other than 0 and 1",
        ),
    ],
)
def test_bad_hyperparameters_raise_at_construction(kwargs, match):
  kwargs = {"end_step": 1000, **kwargs}
  with pytest.raises(ValueError, match=match):
    so.sparseopt(**kwargs)


def test_masks_with_wrong_structure_fail_at_init_naming_the_problem():
  tx = so.sparseopt(
      0.9,
      masks={"conv": {"kernel": jnp.ones((3, 3, 4, 8), bool)}},
      end_step=1000,
  )
  with pytest.raises(ValueError, match="structure of the params"):
    tx.init(PARAMS)


def test_masks_with_wrong_shape_fail_at_init_naming_the_leaf():
  masks = {"conv": {"kernel": jnp.ones((3, 3, 4, 7), bool), "bias": None}}
  with pytest.raises(ValueError, match=r"'conv/kernel'.*\(3, 3, 4, 7\)"):
    so.sparseopt(0.9, masks=masks, end_step=1000).init(PARAMS)
  with pytest.raises(ValueError, match="conv/kernel"):
    so.mask(masks).init(PARAMS)


def test_bn_mode_without_batch_stats_says_what_to_pass():
  tx = optax.chain(
      so.sparseopt(
          0.9, skew="bn", bn_pairs={"conv/kernel": "bn"}, end_step=1000
      ),
      optax.sgd(0.1),
  )
  state = tx.init(PARAMS)
  with pytest.raises(ValueError, match="batch_stats="):
    jax.jit(tx.update)(PARAMS, state, PARAMS)


def test_bn_pairs_naming_missing_batchnorm_or_kernel():
  tx = so.sparseopt(
      0.9, skew="bn", bn_pairs={"conv/kernel": "bn_missing"}, end_step=1000
  )
  state = tx.init(PARAMS)
  with pytest.raises(ValueError, match="bn_missing"):
    tx.update(PARAMS, state, PARAMS, batch_stats={"bn": {"var": jnp.ones(8)}})
  with pytest.raises(ValueError, match="not params"):
    so.sparseopt(
        0.9, skew="bn", bn_pairs={"Conv_9/kernel": "bn"}, end_step=1000
    ).init(PARAMS)


def test_stages_without_masks_say_so():
  with pytest.raises(ValueError, match="masks="):
    so.mask().update(PARAMS, so.mask().init(PARAMS), PARAMS)
  with pytest.raises(ValueError, match="masks="):
    so.skew_correct().update(PARAMS, so.skew_correct().init(PARAMS), PARAMS)


def test_get_masks_without_an_owner():
  with pytest.raises(ValueError, match="mask-owning"):
    so.get_masks(optax.sgd(0.1).init(PARAMS))


@pytest.mark.parametrize(
    "make, match",
    [
        (
            lambda: so.sparseopt(0.9, neuron_axis=4, end_step=1000),
            r"neuron_axis 4.*'conv/kernel'",
        ),
        (
            lambda: so.sparseopt(0.9, neuron_axis=-5, end_step=1000),
            r"neuron_axis -5.*'conv/kernel'",
        ),
        (
            lambda: so.skew_correct(
                masks={
                    "conv": {
                        "kernel": jnp.ones((3, 3, 4, 8), bool),
                        "bias": None,
                    }
                },
                neuron_axis=7,
            ),
            r"neuron_axis 7.*'conv/kernel'",
        ),
        (
            lambda: so.sparseopt(0.9, sparse_filter="attention", end_step=1000),
            r"sparse_filter 'attention' matches no leaf",
        ),
        (
            lambda: so.sparseopt(
                0.9, distribution={"attn": 0.5}, end_step=1000
            ),
            r"\['attn'\] match no sparse leaf",
        ),
        (
            lambda: so.sparseopt(
                0.9, skew="bn", bn_pairs={"conv/kernel": None}, end_step=1000
            ),
            "maps none of the sparse leaves",
        ),
    ],
)
def test_inputs_that_would_silently_do_nothing_fail_at_init(make, match):
  with pytest.raises(ValueError, match=match):
    make().init(PARAMS)


def test_bn_pairs_naming_a_layernorm_says_it_has_no_running_variance():
  tx = so.sparseopt(
      0.9, skew="bn", bn_pairs={"conv/kernel": "LayerNorm_0"}, end_step=1000
  )
  with pytest.raises(ValueError, match="LayerNorm"):
    tx.update(
        PARAMS,
        tx.init(PARAMS),
        PARAMS,
        batch_stats={"BatchNorm_0": {"var": jnp.ones(8)}},
    )
