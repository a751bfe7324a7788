"""The training program: real data, TFDS path, data parallelism, resume, errors."""

import dataclasses
import gzip
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import entries_differing, leaf_max_abs

# The training program needs the [train] extra: skip without it (the TFDS test
# skips on its own without tensorflow_datasets).
for _module in ("flax", "grain", "orbax.checkpoint", "tqdm", "matplotlib"):
  pytest.importorskip(_module)

import sparseopt_jax as so  # noqa: E402
from sparseopt_jax.training import input as input_lib  # noqa: E402
from sparseopt_jax.training import presets, train  # noqa: E402

# ResNet-8 (one block a stage): the program's mechanics at a third of ResNet-20's
# trace and compile time; the preset's own ResNet-20 where a test is about it.
TINY = dict(
    model="resnet8",
    width=4,
    steps=40,
    batch_size=64,
    train_subset=4096,
    test_subset=1000,
    eval_every=20,
    checkpoint_every=20,
    update_every=10,
    log_every=10,
)


def tiny(**overrides):
  return presets.get_preset("fashion_mnist_resnet20", **{**TINY, **overrides})


def run(cfg, workdir, **kwargs):
  """One device unless a test asks for more: 8 simulated devices on 2 cores only slow it."""
  return train.run(
      cfg, str(workdir), progress=False, **{"num_devices": 1, **kwargs}
  )


def test_tiny_preset_trains_on_real_fashion_mnist(tmp_path):
  cfg = tiny(model="resnet20", eval_every=20)
  state, row = run(cfg, tmp_path / "run")
  rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [0, 20, 40]  # a point before training too
  assert rows[-1]["train_loss"] < rows[1]["train_loss"]
  assert rows[-1]["test_loss"] < rows[0]["test_loss"]
  assert rows[-1]["test_accuracy"] > 0.15  # chance is 0.1
  for key in (
      "test_loss",
      "sparsity",
      "params_sparsity",
      "density_spread",
      "exploration",
      "skew_slope_raw",
      "skew_slope_corrected",
      "images_per_s",
      "wall_time",
      "epoch",
  ):
    assert np.isfinite(rows[-1][key]), key
  # The params are as sparse as the masks say: no pruned weight drifted from zero.
  assert rows[-1]["pruned_nonzero"] == 0
  assert rows[-1]["params_sparsity"] >= rows[-1]["sparsity"]
  # Sparsity is exact: every sparse leaf holds its budgeted count.
  summary = so.sparsity_summary(state.opt_state)
  shapes = {
      p: tuple(leaf["size"] for _ in [0])
      for p, leaf in summary["leaves"].items()
  }
  params = {
      so.tree.path_str(p): x.shape
      for p, x in jax.tree_util.tree_leaves_with_path(state.params)
  }
  expected = so.active_counts(
      {p: params[p] for p in shapes},
      so.layer_sparsities({p: params[p] for p in shapes}, 0.9, "erk"),
  )
  assert {
      p: leaf["active"] for p, leaf in summary["leaves"].items()
  } == expected
  assert json.load(open(tmp_path / "run" / "config.json"))["sparsity"] == 0.9
  png = tmp_path / "cmp.png"
  assert train.main(["plot", str(tmp_path / "run"), "--out", str(png)]) == 0
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "overrides",
    [
        # Slow (about 80 s), as the other arms: the bn correction is also run end to
        # end by tests/test_skew.py and in the training program by the skew metric
        # test below.
        pytest.param(dict(skew="bn"), marks=pytest.mark.slow),
        pytest.param(dict(dense=True), marks=pytest.mark.slow),
        pytest.param(dict(topology="set", skew=None), marks=pytest.mark.slow),
    ],
)
def test_other_arms_run_end_to_end(tmp_path, overrides):
  _, row = run(tiny(steps=20, **overrides), tmp_path)
  assert np.isfinite(row["test_loss"]) and row["train_loss"] < 2.3


def test_cifar100_tfds_path_under_mock_data(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")

  cfg = presets.get_preset(
      "cifar100_resnet20",
      model="resnet8",  # the TFDS path is the subject, not the model
      width=4,
      steps=3,
      batch_size=16,
      eval_every=3,
      checkpoint_every=3,
      log_every=1,
      topology="static",
  )
  # mock_data fakes the file system while tfds builds a pipeline: keep checkpoint
  # writes out of that window by making them synchronous.
  with tfds.testing.mock_data(num_examples=64):
    state, row = run(cfg, tmp_path, async_checkpoints=False)
  assert int(state.step) == 3
  assert state.params["head"]["kernel"].shape[-1] == 100
  assert np.isfinite(row["test_loss"])


# Per leaf, how far 8 devices may land from one device after one step, as a
# fraction of the leaf's own change over it.
REORDERED_SUM_TOLERANCE = 0.05
# How many of the mask entries a RigL update moves may come out otherwise on 8 devices.
NEAR_TIE_FRACTION = 0.2


@pytest.mark.multi_device
def test_eight_devices_match_one_device():
  """8 devices train as one does: the same global batch's mean gradient and BatchNorm
  statistics, only summed in another order.

  Float32 sums in another order differ in their last bits. Where an activation
  lies within those bits of a ReLU's kink, it falls on the other side, and the
  gradient of that example changes by a whole term: a leaf can then differ by
  far more than rounding, by an amount that depends on the CPU's reduction
  order and the seed. Measured on one step (ResNet-8 over 8 seeds, ResNet-20
  over 4): at most 4.2e-3 of a leaf's change, mostly 1e-5; on the second step,
  a RigL update, at most 1.6% of the moved mask entries differ, mostly none. A
  semantic error is far larger: with the gradient of one device's shard (its
  examples repeated over the batch) the params differ by 8.6 times their
  change, the BatchNorm statistics by 1.1, and 86% of the moved entries. The
  bounds sit between, an order of magnitude from each.
  """
  assert jax.device_count() >= 8
  cfg = tiny(steps=10, update_every=1)
  info = input_lib.DatasetInfo("fashion_mnist", (28, 28, 1), 10, 4096, 10000)
  setup = train.make_setup(cfg, info, steps_per_epoch=4096 // 64)
  assert [setup.is_mask_update(s) for s in range(2)] == [False, True]
  rng = np.random.default_rng(0)
  batches = [
      {
          "image": rng.normal(size=(64, 28, 28, 1)).astype(np.float32),
          "label": rng.integers(0, 10, 64).astype(np.int32),
      }
      for _ in range(2)
  ]
  # On the host: each run's first step donates the copy it was given.
  init = jax.device_get(train.create_train_state(setup, info.image_shape))
  runs = {}
  for n in (1, 8):
    mesh = train.make_mesh(n)
    step, _, _ = train.jit_steps(setup, mesh)
    state = jax.device_put(
        init, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    )
    states = []
    for i, b in enumerate(batches):
      state, _ = step(
          state, train.shard_batch(b, mesh), setup.is_mask_update(i)
      )
      states.append(jax.device_get(jax.block_until_ready(state)))
    runs[n] = states
  one, eight = runs[1][0], runs[8][0]  # after the first step
  for part in ("params", "batch_stats"):
    change = leaf_max_abs(getattr(one, part), getattr(init, part))
    diff = leaf_max_abs(getattr(one, part), getattr(eight, part))
    assert all(change.values()), part
    worst = max(diff, key=lambda k: diff[k] / change[k])
    assert diff[worst] <= REORDERED_SUM_TOLERANCE * change[worst], (
        part,
        worst,
        diff[worst],
        change[worst],
    )
  masks = {n: so.get_masks(runs[n][1].opt_state) for n in (1, 8)}
  moved = entries_differing(masks[1], so.get_masks(init.opt_state))
  assert moved > 100  # the update moved weights: the masks say something
  assert entries_differing(masks[1], masks[8]) <= NEAR_TIE_FRACTION * moved


@pytest.mark.multi_device(timeout=900)
# Slow: runs on 2 and 8 simulated devices; tests/test_sharding.py covers the same
# layout in the default run.
@pytest.mark.slow
def test_model_parallel_run_matches_data_parallel(tmp_path):
  """Kernels' output axes sharded over a 'model' mesh axis, masks and moments with them.

  The sharded convolutions sum in another order, so (as in
  test_eight_devices_match_one_device) the params are compared after the first
  step, before any mask update, and the masks after the second step's update.
  """
  cfg = tiny(steps=4, update_every=1, eval_every=2, checkpoint_every=2)
  init = train.create_train_state(*_setup_of(cfg))
  first, finals = {}, {}
  # The same 'data' axis (2 devices) in both runs, so the batch statistics sum alike.
  for m in (1, 4):
    cfg_m = dataclasses.replace(cfg, model_parallel=m)
    workdir = tmp_path / f"m{m}"
    state, _ = run(cfg_m, workdir, num_devices=2 * m, stop_at=1)
    first[m] = jax.device_get(state)
    finals[m], _ = run(
        cfg_m, workdir, num_devices=2 * m, stop_at=2, resume=True
    )
  kernel = finals[4].params["stage3_block0"]["conv1"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(
      None, None, None, "model"
  )
  assert so.get_masks(finals[4].opt_state)["stage3_block0"]["conv1"][
      "kernel"
  ].sharding.spec == (kernel.sharding.spec)
  change = leaf_max_abs(first[1].params, jax.device_get(init.params))
  diff = leaf_max_abs(first[1].params, first[4].params)
  worst = max(diff, key=lambda k: diff[k] / max(change[k], 1e-30))
  assert diff[worst] <= REORDERED_SUM_TOLERANCE * change[worst], (
      worst,
      diff[worst],
      change[worst],
  )
  masks = {m: jax.device_get(so.get_masks(finals[m].opt_state)) for m in (1, 4)}
  moved = entries_differing(masks[1], so.get_masks(init.opt_state))
  assert moved > 0
  assert entries_differing(masks[1], masks[4]) <= NEAR_TIE_FRACTION * moved


def _setup_of(cfg):
  info = input_lib.DatasetInfo("fashion_mnist", (28, 28, 1), 10, 60000, 10000)
  return (
      train.make_setup(cfg, info, steps_per_epoch=60000 // cfg.batch_size),
      info.image_shape,
  )


def test_resume_equals_training_straight(tmp_path):
  # Mask updates at steps 4, 8, 12 and 16: before and after the stop at 9.
  cfg = tiny(steps=20, eval_every=10, checkpoint_every=10, update_every=4)
  straight, _ = run(cfg, tmp_path / "a")
  stopped, _ = run(cfg, tmp_path / "b", stop_at=9)
  assert int(stopped.step) == 9
  resumed, _ = run(cfg, tmp_path / "b", resume=True)
  assert int(resumed.step) == 20
  chex.assert_trees_all_equal(straight.params, resumed.params)
  chex.assert_trees_all_equal(straight.batch_stats, resumed.batch_stats)
  chex.assert_trees_all_equal(straight.opt_state, resumed.opt_state)
  chex.assert_trees_all_equal(
      so.get_masks(straight.opt_state), so.get_masks(resumed.opt_state)
  )


def test_workdir_with_checkpoints_needs_resume(tmp_path):
  # Static masks: one compiled step variant is enough for what this test is about.
  run(tiny(steps=5, checkpoint_every=5, topology="static"), tmp_path)
  with pytest.raises(ValueError, match="--resume"):
    run(tiny(steps=5, checkpoint_every=5, topology="static"), tmp_path)


def test_missing_or_corrupt_data_fails_before_training(tmp_path):
  with pytest.raises(input_lib.DataError, match="train-images"):
    run(tiny(data_dir=str(tmp_path)), tmp_path / "w1")
  src = input_lib.FASHION_MNIST_DIR
  for name in os.listdir(src):
    (tmp_path / name).write_bytes(open(os.path.join(src, name), "rb").read())
  (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(
      gzip.compress(b"\x00\x00\x08\x01garbage")
  )
  with pytest.raises(input_lib.DataError, match="train-labels"):
    run(tiny(data_dir=str(tmp_path)), tmp_path / "w2")
  assert not (tmp_path / "w2" / "checkpoints").exists()


@pytest.mark.multi_device
def test_batch_not_divisible_by_devices_fails_before_training(tmp_path):
  with pytest.raises(ValueError, match="not divisible by the 8 devices"):
    run(tiny(batch_size=60), tmp_path, num_devices=8)
  assert not (tmp_path / "checkpoints").exists()


def test_the_corrected_skew_metric_measures_the_correction_that_ran():
  info = input_lib.DatasetInfo("fashion_mnist", (28, 28, 1), 10, 4096, 10000)
  rng = np.random.default_rng(0)
  batch = {
      "image": rng.normal(size=(32, 28, 28, 1)).astype(np.float32),
      "label": rng.integers(0, 10, 32).astype(np.int32),
  }
  out = {}
  for skew in ("density", "bn", None):
    setup = train.make_setup(tiny(skew=skew), info, steps_per_epoch=64)
    state = train.create_train_state(setup, info.image_shape)
    # Running variances that differ from what the density rule assumes.
    state = state.replace(
        batch_stats=jax.tree_util.tree_map_with_path(
            lambda p, x: x * (1 + jnp.arange(x.shape[-1]) % 3)
            if p[-1].key == "var"
            else x,
            state.batch_stats,
        )
    )
    out[skew] = jax.device_get(
        jax.jit(train.make_skew_probe(setup))(state, batch)
    )
  # The density rule adds exactly 0.5 to every slope; the BatchNorm factors do not.
  assert (
      abs(
          out["density"]["skew_slope_corrected"]
          - out["density"]["skew_slope_raw"]
          - 0.5
      )
      < 1e-3
  )
  assert (
      abs(out["bn"]["skew_slope_corrected"] - out["bn"]["skew_slope_raw"] - 0.5)
      > 1e-2
  )
  assert "skew_slope_corrected" not in out[None]


# ---------------------------------------------------------------------------
# The sparse ViT preset: no BatchNorm, AdamW, skew="layernorm"

TINY_VIT = dict(
    width=8,
    steps=20,
    batch_size=32,
    train_subset=1024,
    eval_every=10,
    checkpoint_every=10,
    update_every=5,
    log_every=5,
)


def tiny_vit(**overrides):
  return presets.get_preset("fashion_mnist_vit", **{**TINY_VIT, **overrides})


@pytest.mark.slow  # compiles a ViT's two train-step variants, eval and probe: > 15 s
def test_vit_preset_gives_the_same_metrics_checkpoints_and_plot(tmp_path):
  cfg = tiny_vit()
  assert (cfg.model, cfg.optimizer, cfg.skew) == (
      "vit_qknorm",
      "adamw",
      "layernorm",
  )
  state, _ = run(cfg, tmp_path / "run")
  assert state.batch_stats == {}
  rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [0, 10, 20]
  assert rows[-1]["test_loss"] < rows[0]["test_loss"]
  for key in (
      "train_loss",
      "test_accuracy",
      "sparsity",
      "params_sparsity",
      "density_spread",
      "exploration",
      "skew_slope_raw",
      "skew_slope_corrected",
      "images_per_s",
      "wall_time",
  ):
    assert np.isfinite(rows[-1][key]), key
  assert rows[-1]["pruned_nonzero"] == 0
  assert rows[-1]["exploration"] > rows[0]["exploration"]  # RigL moved weights
  # Only the blocks' attention and MLP kernels are sparse.
  leaves = so.sparsity_summary(state.opt_state)["leaves"]
  assert leaves and all("/attn/" in p or "/mlp/" in p for p in leaves), sorted(
      leaves
  )
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["10", "20"]
  png = tmp_path / "vit.png"
  assert train.main(["plot", str(tmp_path / "run"), "--out", str(png)]) == 0
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # three short ViT runs
def test_vit_resume_equals_training_straight(tmp_path):
  straight, _ = run(tiny_vit(), tmp_path / "a")
  run(tiny_vit(), tmp_path / "b", stop_at=10)
  resumed, _ = run(tiny_vit(), tmp_path / "b", resume=True)
  chex.assert_trees_all_close(straight.params, resumed.params, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        dict(skew="density"),
        dict(skew=None, optimizer="sgd", learning_rate=0.05),
    ],
)
def test_vit_other_modes_run_end_to_end(tmp_path, overrides):
  _, row = run(tiny_vit(steps=10, **overrides), tmp_path)
  assert np.isfinite(row["test_loss"]) and row["pruned_nonzero"] == 0


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--skew", "bn"], "no BatchNorm"),
        (["--model", "vit", "--skew", "layernorm"], "nothing to correct"),
    ],
)
def test_vit_skew_modes_with_nothing_to_read_fail_before_training(
    tmp_path, capsys, flags, message
):
  workdir = tmp_path / "run"
  argv = ["--preset", "fashion_mnist_vit", "--workdir", str(workdir), "--width"]
  assert train.main([*argv, "8", "--train-subset", "256", *flags]) == 2
  assert message in capsys.readouterr().err
  assert not (workdir / "config.json").exists()


def test_a_loop_whose_flags_miss_the_schedule_stops_with_a_message(
    tmp_path, monkeypatch
):
  """A host flag one step late: the state counts the missed updates, and the
  program stops at the next evaluation rather than train without RigL."""
  late = train.Setup.is_mask_update
  monkeypatch.setattr(
      train.Setup, "is_mask_update", lambda self, step: late(self, step - 1)
  )
  with pytest.raises(RuntimeError, match="out of step with the optimizer"):
    # The updates due at steps 4 and 8 run as ordinary steps; evaluation at 12.
    cfg = tiny(steps=12, update_every=4, eval_every=12, checkpoint_every=12)
    run(cfg, tmp_path / "run")


def test_schedule_check_names_both_counts():
  train.check_schedule_kept(
      {"missed_mask_updates": 0, "unremasked_mask_updates": 0}, 10
  )
  train.check_schedule_kept({"missed_mask_updates": None}, 10)  # no topology
  with pytest.raises(RuntimeError, match="by step 30 the loop ran 2 due.*1"):
    train.check_schedule_kept(
        {"missed_mask_updates": 2, "unremasked_mask_updates": 1}, 30
    )
