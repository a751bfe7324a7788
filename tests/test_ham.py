"""HAM (so.ham): the update formula, its limits, errors, jit, and zeros under SparseOpt."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparseopt_jax as so


def _params():
  w = np.array(
      [
          [0.5, -0.2, 0.01],
          [-0.7, 0.0, 0.3],
          [0.002, 0.9, -0.05],
          [0.0, -0.4, 1.5],
      ],
      np.float32,
  )
  return {
      "dense": {"kernel": jnp.asarray(w), "bias": jnp.array([0.1, -0.2, 0.0])}
  }


def _grads(k):
  rng = np.random.default_rng(k)
  g = rng.normal(0.0, 0.05, (4, 3)).astype(np.float32)
  if k == 0:
    g[0, 2] = (
        0.15  # moves w = 0.01 across zero: sign(w_half) differs from sign(w)
    )
  g[2, 1] = (
      -0.8 if k == 0 else 0.02
  )  # alpha * lr * |g| = 16 > 5: the clip binds
  g[1, 1] = 0.0  # w = 0 with no gradient: stays exactly 0
  g[3, 0] = 0.0
  return {
      "dense": {
          "kernel": jnp.asarray(g),
          "bias": jnp.asarray(rng.normal(0.0, 0.1, 3).astype(np.float32)),
      }
  }


def _numpy_ham_sgd(params, grads_list, lr_fn, momentum, alpha, beta, clip):
  """Algorithm 1 of Jacobs et al. with SGD-momentum as the optimizer step, in float64."""
  w = {k: np.asarray(v, np.float64) for k, v in params["dense"].items()}
  trace = {k: np.zeros_like(v) for k, v in w.items()}
  for step, grads in enumerate(grads_list):
    lr = lr_fn(step)
    for name in w:
      g = np.asarray(grads["dense"][name], np.float64)
      trace[name] = g + momentum * trace[name]
      half = w[name] - lr * trace[name]
      if half.ndim >= 2:
        e = np.clip(-lr * (alpha * np.sign(half) * g + beta), -clip, clip)
        half = half * np.exp(e)
      w[name] = half
  return w


def test_update_matches_a_hand_computation_over_three_steps():
  lr = optax.linear_schedule(0.1, 0.05, 4)
  tx = so.ham(
      optax.sgd(lr, momentum=0.9), lr
  )  # the defaults: alpha 200, beta 1e-3
  params = _params()
  state = tx.init(params)
  grads_list = [_grads(k) for k in range(3)]
  for grads in grads_list:
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  expected = _numpy_ham_sgd(
      _params(),
      grads_list,
      lambda k: 0.1 - 0.0125 * k,
      momentum=0.9,
      alpha=200.0,
      beta=1e-3,
      clip=5.0,
  )
  for name in ("kernel", "bias"):
    np.testing.assert_allclose(
        params["dense"][name], expected[name], rtol=2e-5, atol=1e-7
    )
  kernel = np.asarray(params["dense"]["kernel"])
  assert kernel[1, 1] == 0.0 and kernel[3, 0] == 0.0
  assert int(state.count) == 3
  # The cases the grads were built for really happened: a sign flip and a clip.
  assert np.sign(expected["kernel"][0, 2]) == -1
  first = _numpy_ham_sgd(
      _params(), grads_list[:1], lambda k: 0.1, 0.9, 200, 1e-3, 1e9
  )
  clipped = _numpy_ham_sgd(
      _params(), grads_list[:1], lambda k: 0.1, 0.9, 200, 1e-3, 5
  )
  assert not np.isclose(first["kernel"][2, 1], clipped["kernel"][2, 1])


@pytest.mark.parametrize("inner", ["sgd", "adam"])
def test_alpha_beta_zero_is_the_inner_optimizer_bit_for_bit(inner):
  opt = {"sgd": optax.sgd(0.1, momentum=0.9), "adam": optax.adam(1e-2)}[inner]
  tx = so.ham(opt, 0.1, alpha=0.0, beta=0.0)
  params = _params()
  s1, s2 = opt.init(params), tx.init(params)
  for k in range(3):
    grads = _grads(k)
    u1, s1 = opt.update(grads, s1, params)
    u2, s2 = tx.update(grads, s2, params)
    for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
      assert jnp.array_equal(a, b)
    params = optax.apply_updates(params, u1)


def test_leaves_below_two_dims_take_the_inner_update_and_a_filter_narrows_the_rest():
  params = {
      "embed": {"embedding": jnp.ones((5, 3))},
      "dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)},
  }
  grads = jax.tree.map(lambda x: 0.1 * jnp.ones_like(x), params)
  opt = optax.sgd(0.1)
  plain, _ = opt.update(grads, opt.init(params), params)
  for leaf_filter, hammed in [
      (None, {"embed/embedding", "dense/kernel"}),
      ("kernel", {"dense/kernel"}),
  ]:
    tx = so.ham(opt, 0.1, leaf_filter=leaf_filter)
    updates, _ = tx.update(grads, tx.init(params), params)
    for p, u in jax.tree_util.tree_leaves_with_path(updates):
      path = so.tree.path_str(p)
      expected = plain
      for key in path.split("/"):
        expected = expected[key]
      assert bool(jnp.array_equal(u, expected)) == (path not in hammed), path


def test_small_learning_rate_limit_is_the_papers_riemannian_flow():
  """To first order in lr: dw = -lr * ((1 + alpha |w|) g + beta w) under plain GD."""
  lr, alpha, beta = 1e-5, 200.0, 1e-3
  params = _params()
  grads = _grads(1)
  tx = so.ham(optax.sgd(lr), lr, alpha=alpha, beta=beta)
  updates, _ = tx.update(grads, tx.init(params), params)
  w = np.asarray(params["dense"]["kernel"], np.float64)
  g = np.asarray(grads["dense"]["kernel"], np.float64)
  flow = -lr * ((1 + alpha * np.abs(w)) * g + beta * w)
  np.testing.assert_allclose(
      updates["dense"]["kernel"], flow, rtol=5e-3, atol=1e-11
  )


def test_weight_norm_cap_rescales_a_tensor_that_outgrows_it():
  params = {"w": jnp.full((2, 2), 10.0)}
  tx = so.ham(optax.sgd(1.0), 1.0, alpha=0.0, beta=0.0, max_weight_norm=5.0)
  updates, _ = tx.update({"w": -jnp.ones((2, 2))}, tx.init(params), params)
  new = optax.apply_updates(params, updates)["w"]
  np.testing.assert_allclose(jnp.linalg.norm(new), 5.0, rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(alpha=-1.0), "alpha must be a finite number >= 0"),
        (dict(beta=float("nan")), "beta must be a number >= 0"),
        (dict(alpha="big"), "alpha must be a number"),
        (
            dict(learning_rate=-0.1),
            "learning_rate must be a finite number >= 0",
        ),
        (dict(max_exponent=0.0), "max_exponent must be None or a number > 0"),
        (
            dict(max_weight_norm=-1),
            "max_weight_norm must be None or a number > 0",
        ),
        (
            dict(inner=optax.sgd),
            "inner must be an optax GradientTransformation",
        ),
        (dict(leaf_filter=3), "sparse_filter must be None, a regex"),
    ],
)
def test_bad_hyperparameters_raise_at_construction(kwargs, match):
  args = {"inner": optax.sgd(0.1), "learning_rate": 0.1, **kwargs}
  with pytest.raises(ValueError, match=match):
    so.ham(args.pop("inner"), args.pop("learning_rate"), **args)


def test_unmatched_filter_and_missing_params_raise():
  with pytest.raises(ValueError, match="'conv' matches no leaf"):
    so.ham(optax.sgd(0.1), 0.1, leaf_filter="conv").init(_params())
  tx = so.ham(optax.sgd(0.1), 0.1)
  with pytest.raises(ValueError, match="needs the params"):
    tx.update(_grads(0), tx.init(_params()))


def test_works_in_the_params_dtype():
  params = {"w": jnp.ones((4, 4), jnp.bfloat16)}
  tx = so.ham(optax.sgd(0.1, momentum=0.9), 0.1)
  updates, _ = tx.update(
      {"w": jnp.ones((4, 4), jnp.bfloat16)}, tx.init(params), params
  )
  assert updates["w"].dtype == jnp.bfloat16


def test_pruned_weights_stay_exactly_zero_in_a_sparseopt_chain_jitted(
    small_net,
):
  model, variables, batch = small_net
  lr = optax.cosine_decay_schedule(0.05, 80)
  inner = optax.chain(
      optax.add_decayed_weights(5e-4), optax.sgd(lr, momentum=0.9)
  )
  sparse = so.sparseopt(0.9, update_every=10, end_step=60, seed=2)
  tx = optax.chain(sparse, so.ham(inner, lr))
  base = optax.chain(sparse, inner)
  traces = []

  def loss_fn(params, stats):
    logits, new = model.apply(
        {"params": params, "batch_stats": stats},
        batch[0],
        train=True,
        mutable=["batch_stats"],
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch[1])
    return loss.mean(), new["batch_stats"]

  def pruned(masks, tree):
    """Nonzero entries of ``tree`` where ``masks`` is False."""
    return sum(
        jnp.sum((x != 0) & ~m)
        for m, x in zip(
            jax.tree.leaves(masks, is_leaf=so.tree.is_none),
            jax.tree.leaves(tree),
        )
        if m is not None
    )

  @jax.jit
  def step(params, stats, state):
    traces.append(1)
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, stats
    )
    before = so.get_masks(state)
    updates, state = tx.update(grads, state, params, batch_stats=stats)
    after = so.get_masks(state)
    # HAM's own update is exactly 0 at every weight pruned before and after:
    # the zeros do not rely on apply_updates re-masking the params.
    stayed = jax.tree.map(
        lambda a, b: None if a is None else a | b,
        before,
        after,
        is_leaf=so.tree.is_none,
    )
    moved = pruned(stayed, updates)
    params, state = so.apply_updates(params, updates, state)
    return params, stats, state, loss, moved + pruned(after, params)

  params, stats = variables["params"], variables["batch_stats"]
  state = tx.init(params)
  params = so.apply_masks(params, state)
  counts0 = [int(m.sum()) for m in jax.tree.leaves(so.get_masks(state))]
  bad, masks0 = [], so.get_masks(state)
  for _ in range(80):
    params, stats, state, loss, nonzero = step(params, stats, state)
    bad.append(nonzero)
  assert int(jnp.sum(jnp.stack(bad))) == 0
  assert len(traces) == 1
  assert np.isfinite(float(loss))
  masks = so.get_masks(state)
  assert [int(m.sum()) for m in jax.tree.leaves(masks)] == counts0
  assert not all(
      bool(jnp.array_equal(a, b))
      for a, b in zip(jax.tree.leaves(masks0), jax.tree.leaves(masks))
  )
  ham_state = state[1]
  assert isinstance(ham_state, so.HamState) and int(ham_state.count) == 80
  # Momentum inside HAM's state is re-masked like any inner state.
  trace = ham_state.inner_state[1][0].trace
  for m, t in zip(
      jax.tree.leaves(masks, is_leaf=so.tree.is_none), jax.tree.leaves(trace)
  ):
    if m is not None:
      assert not jnp.any((t != 0) & ~m)
  # And HAM did something: the same chain without it gives another update.
  grads = jax.tree.map(lambda x: jnp.full_like(x, 0.01), params)
  with_ham, _ = tx.update(grads, tx.init(params), params)  # step 0: lr > 0
  without, _ = base.update(grads, base.init(params), params)
  assert not np.allclose(
      with_ham["Conv_0"]["kernel"], without["Conv_0"]["kernel"]
  )


def _cli_config(tmp_path):
  from sparseopt_jax.training import train

  args = train.train_parser().parse_args([
      "--workdir",
      str(tmp_path / "run"),
      "--ham",
      "--ham-alpha",
      "100",
      "--width",
      "4",
      "--steps",
      "20",
      "--batch-size",
      "64",
      "--train-subset",
      "2048",
      "--eval-every",
      "10",
      "--update-every",
      "5",
  ])
  return train.config_from_args(args)


def _ham_states(opt_state):
  return [
      s
      for s in jax.tree.leaves(
          opt_state, is_leaf=lambda x: isinstance(x, so.HamState)
      )
      if isinstance(s, so.HamState)
  ]


def test_ham_flag_wraps_the_sgd_part_of_the_training_chain(tmp_path):
  from sparseopt_jax.training import presets, train

  cfg = _cli_config(tmp_path)
  assert (cfg.ham, cfg.ham_alpha, cfg.ham_beta) == (True, 100.0, 1e-3)
  with pytest.raises(ValueError, match="ham_beta must be >= 0"):
    presets.get_preset("fashion_mnist_resnet20", ham_beta=-1.0)
  params = {
      "conv": {"kernel": jnp.ones((3, 3, 4, 8))},
      "bn": {"scale": jnp.ones(8)},
  }
  for dense in (False, True):
    tx = train.build_optimizer(
        presets.get_preset("fashion_mnist_resnet20", ham=True, dense=dense),
        100,
        10,
        bn_pairs={"conv/kernel": None},
    )
    state = tx.init(params)
    assert len(_ham_states(state)) == 1
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    assert all(jnp.all(jnp.isfinite(u)) for u in jax.tree.leaves(updates))


@pytest.mark.slow
def test_ham_flag_builds_the_chain_and_trains_end_to_end(tmp_path):
  from sparseopt_jax.training import train

  cfg = _cli_config(tmp_path)
  state, row = train.run(
      cfg, str(tmp_path / "run"), progress=False, num_devices=1
  )
  assert np.isfinite(row["test_loss"]) and row["train_loss"] < 2.3
  assert row["pruned_nonzero"] == 0
  hams = _ham_states(state.opt_state)
  assert len(hams) == 1 and int(hams[0].count) == 20
