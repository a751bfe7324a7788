"""The training program: ``python -m sparseopt_jax.training.train`` / ``sparseopt-train``.

    sparseopt-train --preset fashion_mnist_resnet20 --workdir runs/so --skew density
    sparseopt-train --preset fashion_mnist_resnet20 --workdir runs/so --resume
    sparseopt-train plot runs/base runs/so --out runs/compare.png

Data parallel: one ``jax.jit`` over a Mesh of every device, the batch sharded on
the ``'data'`` axis, params and optimizer state replicated, BatchNorm over the
global batch. The same command runs on one CPU, N GPUs, or (with
``--distributed``) a multi-host TPU slice, where each process reads its own
shard of the data.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import functools
import itertools
import json
import os
import signal
import sys
import threading
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sparseopt_jax as so
from sparseopt_jax.flax_support import linen as linen_bridge
from sparseopt_jax.training import (
    checkpointing,
    models,
    multihost,
    plotting,
    presets,
)
from sparseopt_jax.training import input as input_lib
from sparseopt_jax.training import workdir as workdir_lib

STEM_KERNEL = "conv_init/kernel"


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class Setup:
  """The pieces of a run that do not change while it trains."""

  config: presets.TrainConfig
  model: Any
  tx: optax.GradientTransformation
  num_steps: int
  steps_per_epoch: int
  bn_pairs: dict
  ln_leaves: dict = dataclasses.field(default_factory=dict)

  @property
  def end_step(self) -> int:
    return int(self.config.end_fraction * self.num_steps)

  @property
  def schedule(self) -> so.MaskSchedule | None:
    """The mask-update schedule the optimizer was built with (None if none)."""
    return mask_schedule(self.config, self.num_steps)

  def is_mask_update(self, step: int) -> bool:
    """Whether the train step that starts from ``state.step == step`` updates the masks."""
    schedule = self.schedule
    return schedule is not None and schedule.is_due(step)


# ---------------------------------------------------------------------------
# Model and optimizer


def build_model(cfg: presets.TrainConfig, info: input_lib.DatasetInfo):
  kwargs = {"num_classes": info.num_classes, "dtype": jnp.dtype(cfg.dtype)}
  if cfg.width is not None:
    key = models.model_key(cfg.model)
    kwargs[models.WIDTH_FIELDS.get(key, "num_filters")] = cfg.width
  return models.get_model(cfg.model, **kwargs)


def mask_schedule(
    cfg: presets.TrainConfig, num_steps: int
) -> so.MaskSchedule | None:
  """The one schedule of mask updates, shared by the optimizer and the loop."""
  if cfg.dense or cfg.topology == "static":
    return None
  end_step = int(cfg.end_fraction * num_steps)
  if end_step <= cfg.update_every:
    raise workdir_lib.UserError(
        f"--update-every {cfg.update_every} leaves no mask update: the last"
        f" one comes before step {end_step} (--end-fraction"
        f" {cfg.end_fraction} of {num_steps} steps); lower --update-every,"
        " lengthen the run, or use --topology static"
    )
  return so.mask_update_schedule(
      update_every=cfg.update_every,
      end_step=end_step,
      drop_fraction=cfg.drop_fraction,
  )


def lr_schedule(cfg: presets.TrainConfig, num_steps: int, steps_per_epoch: int):
  warmup = int(cfg.warmup_epochs * steps_per_epoch)
  if warmup >= num_steps:
    raise workdir_lib.UserError(
        f"the warm-up, {warmup} steps (--warmup-epochs {cfg.warmup_epochs} of"
        f" {steps_per_epoch} steps), is not shorter than the run's"
        f" {num_steps} steps; lower --warmup-epochs or lengthen the run"
    )
  if warmup:
    return optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, warmup, num_steps
    )
  return optax.cosine_decay_schedule(cfg.learning_rate, num_steps)


def build_optimizer(
    cfg: presets.TrainConfig,
    num_steps: int,
    steps_per_epoch: int,
    bn_pairs: dict,
    ln_leaves: dict | None = None,
) -> optax.GradientTransformation:
  """``chain(sparseopt(...), add_decayed_weights, sgd)``; no sparseopt for ``--dense``.

  With ``--optimizer adamw`` the optimizer part is ``optax.adamw`` (decoupled
  ``weight_decay`` on the ndim >= 2 leaves only, as for ViTs) instead.

  With ``--ham`` the optimizer part is ``so.ham(chain(add_decayed_weights,
  sgd), lr)``: HAM's hyperbolic step follows each SGD step, driven by the
  gradient SGD received (SparseOpt's corrected one) and the same schedule.
  """
  schedule = lr_schedule(cfg, num_steps, steps_per_epoch)
  inner = [
      optax.add_decayed_weights(cfg.weight_decay),
      optax.sgd(schedule, momentum=cfg.momentum, nesterov=cfg.nesterov),
  ]
  if cfg.optimizer == "adamw":
    inner = [
        optax.adamw(
            schedule,
            weight_decay=cfg.weight_decay,
            mask=lambda p: jax.tree.map(lambda x: jnp.ndim(x) >= 2, p),
        )
    ]
  if cfg.ham:
    inner = [
        so.ham(
            optax.chain(*inner),
            schedule,
            alpha=cfg.ham_alpha,
            beta=cfg.ham_beta,
        )
    ]
  if cfg.dense:
    return optax.chain(*inner)
  sparse_filter = models.SPARSE_FILTERS.get(models.model_key(cfg.model))
  if cfg.dense_stem:
    sparse_filter = (
        lambda path, leaf: jnp.ndim(leaf) >= 2 and path != STEM_KERNEL
    )
  return optax.chain(
      so.sparseopt(
          cfg.sparsity,
          distribution=cfg.distribution,
          topology=cfg.topology,
          schedule=mask_schedule(cfg, num_steps),
          skew=cfg.skew,
          grow_with=cfg.grow_with,
          structure=cfg.structure,
          sparse_filter=sparse_filter,
          seed=cfg.seed,
          bn_pairs=bn_pairs,
          ln_leaves=ln_leaves if cfg.skew == "layernorm" else None,
      ),
      *inner,
  )


def make_setup(
    cfg: presets.TrainConfig, info: input_lib.DatasetInfo, steps_per_epoch: int
) -> Setup:
  """Model, optimizer and schedule of a run on data described by ``info``."""
  model = build_model(cfg, info)
  num_steps = cfg.steps or max(1, round(cfg.epochs * steps_per_epoch))
  sample = jnp.zeros((1, *info.image_shape))
  pairs = linen_bridge.bn_pairs(model, sample, train=True)
  ln = linen_bridge.ln_leaves(model, sample, train=True)
  _check_skew_fits_model(cfg, pairs, ln)
  tx = build_optimizer(cfg, num_steps, steps_per_epoch, pairs, ln)
  return Setup(cfg, model, tx, num_steps, steps_per_epoch, pairs, ln)


def _check_skew_fits_model(cfg, pairs: dict, ln: dict) -> None:
  """A correction with nothing to read in this model is a user error, raised before any work."""
  if cfg.dense or cfg.skew is None:
    return
  if cfg.skew == "bn" and not any(v is not None for v in pairs.values()):
    raise workdir_lib.UserError(
        f"--skew bn reads BatchNorm running variances, but {cfg.model!r} has"
        " no BatchNorm after a kernel; use --skew layernorm (kernels a"
        " LayerNorm normalises), density or none"
    )
  if cfg.skew == "layernorm" and not ln:
    raise workdir_lib.UserError(
        f"--skew layernorm: no kernel of {cfg.model!r} feeds a LayerNorm"
        " directly (pre-LN blocks normalise the kernels' inputs, which adds"
        " no density factor; docs/layernorm_skew.md), so there is nothing to"
        " correct; use --skew none, or a model with QK-norm (--model"
        " vit_qknorm)"
    )


def create_train_state(
    setup: Setup, image_shape: tuple[int, ...]
) -> TrainState:
  # The 'rbg' key compiles far faster than threefry for a whole ResNet init on CPU.
  key = jax.random.key(setup.config.seed, impl="rbg")
  variables = jax.jit(functools.partial(setup.model.init, train=True))(
      key, jnp.zeros((1, *image_shape), jnp.float32)
  )
  params = variables["params"]
  batch_stats = variables.get("batch_stats", {})  # {}: no BatchNorm (a ViT)
  try:
    opt_state = setup.tx.init(params)  # masks drawn on the host: no compile
  except ValueError as e:
    cfg = setup.config
    if cfg.structure and not cfg.dense_stem and repr(STEM_KERNEL) in str(e):
      raise ValueError(f"{e}; --dense-stem keeps {STEM_KERNEL} dense") from e
    raise
  if not setup.config.dense:
    params = so.apply_masks(params, opt_state)
  return TrainState(
      step=jnp.zeros([], jnp.int32),
      params=params,
      batch_stats=batch_stats,
      opt_state=opt_state,
  )


# ---------------------------------------------------------------------------
# Steps: pure functions of (state, batch)


def _loss(model, label_smoothing, params, batch_stats, batch, train):
  out = model.apply(
      {"params": params, "batch_stats": batch_stats},
      batch["image"],
      train=train,
      mutable=["batch_stats"] if train else False,
  )
  logits, new_stats = (
      (out[0], out[1].get("batch_stats", {})) if train else (out, batch_stats)
  )
  targets = jax.nn.one_hot(batch["label"], logits.shape[-1])
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  losses = optax.softmax_cross_entropy(logits, targets)
  correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
  return losses, correct, new_stats


def make_train_step(setup: Setup):
  """``train_step(state, batch, mask_update=None) -> (state, {'loss', 'accuracy'})``.

  ``mask_update``: None lets the optimizer decide in the graph whether this step
  updates the masks; a Python bool (``setup.is_mask_update(state.step)``),
  static under jit, selects one of two compiled variants instead, which is what
  the training loop does (no conditional on the device).
  """
  model, tx, cfg = setup.model, setup.tx, setup.config

  def train_step(
      state: TrainState, batch, mask_update: bool | None = None
  ) -> tuple[TrainState, dict]:
    def loss_fn(params):
      losses, correct, stats = _loss(
          model,
          cfg.label_smoothing,
          params,
          state.batch_stats,
          batch,
          train=True,
      )
      return losses.mean(), (correct.mean(), stats)

    (loss, (acc, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params
    )
    if cfg.dense:
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
    else:
      updates, opt_state = tx.update(
          grads,
          state.opt_state,
          state.params,
          batch_stats=stats,
          mask_update=mask_update,
      )
      params, opt_state = so.apply_updates(
          state.params, updates, opt_state, mask_update=mask_update
      )
    return (
        TrainState(
            step=state.step + 1,
            params=params,
            batch_stats=stats,
            opt_state=opt_state,
        ),
        {"loss": loss, "accuracy": acc},
    )

  return train_step


def make_eval_step(setup: Setup):
  """``eval_step(state, batch) -> {'loss', 'correct', 'count'}`` summed over the batch."""

  def eval_step(state: TrainState, batch) -> dict:
    losses, correct, _ = _loss(
        setup.model, 0.0, state.params, state.batch_stats, batch, train=False
    )
    mask = batch["mask"]
    return {
        "loss": jnp.sum(losses * mask),
        "correct": jnp.sum(correct * mask),
        "count": jnp.sum(mask),
    }

  return eval_step


def make_grad_fn(setup: Setup):
  """``grad_fn(state, batch) -> grads``: the raw gradient a train step sees (no smoothing)."""

  def grad_fn(state: TrainState, batch):
    def loss_fn(params):
      losses, _, _ = _loss(
          setup.model, 0.0, params, state.batch_stats, batch, train=True
      )
      return losses.mean()

    return jax.grad(loss_fn)(state.params)

  return grad_fn


def make_skew_probe(setup: Setup):
  """Mean skew slope over the sparse leaves of the raw gradient, and of the gradient as
  the run's own correction leaves it (``skew_slope_corrected``, absent for ``skew=None``:
  no correction ran): the density factors, or the BatchNorm-variance factors of
  ``skew="bn"`` read from the state's running statistics."""
  cfg = setup.config
  correct = (
      None
      if cfg.skew is None
      else so.skew_correct(
          cfg.skew,
          bn_pairs=setup.bn_pairs if cfg.skew == "bn" else None,
          ln_leaves=setup.ln_leaves if cfg.skew == "layernorm" else None,
      )
  )
  grad_fn = make_grad_fn(setup)

  def probe(state: TrainState, batch) -> dict:
    grads = grad_fn(state, batch)
    masks = so.get_masks(state.opt_state)
    mean = lambda slopes: jnp.nanmean(jnp.stack(list(slopes.values())))
    out = {"skew_slope_raw": mean(so.skew_slope(grads, masks))}
    if correct is not None:
      fixed, _ = correct.update(
          grads,
          correct.init(state.params),
          masks=masks,
          batch_stats=state.batch_stats,
      )
      out["skew_slope_corrected"] = mean(so.skew_slope(fixed, masks))
    return out

  return probe


# ---------------------------------------------------------------------------
# Devices


def make_mesh(
    num_devices: int | None = None, model_parallel: int = 1
) -> jax.sharding.Mesh:
  """A ('data', 'model') mesh: the batch on 'data', kernels' output axes on 'model'."""
  devices = jax.devices()[:num_devices] if num_devices else jax.devices()
  if len(devices) % model_parallel:
    raise workdir_lib.UserError(
        f"--model-parallel {model_parallel} does not divide the"
        f" {len(devices)} devices"
    )
  if jax.process_count() > 1 and jax.local_device_count() % model_parallel:
    # Each process feeds its own examples to the devices it holds: a model
    # group spanning processes would be fed different data by each.
    raise workdir_lib.UserError(
        f"--model-parallel {model_parallel} would span processes, each of"
        f" which holds {jax.local_device_count()} devices: the model axis must"
        " stay within a process (a divisor of its device count)"
    )
  return jax.sharding.Mesh(
      np.asarray(devices).reshape(-1, model_parallel), ("data", "model")
  )


def param_spec(leaf: Any, model_parallel: int) -> P:
  """A kernel's output (neuron) axis on 'model' when it divides; everything else replicated."""
  shape = jnp.shape(leaf)
  if model_parallel > 1 and len(shape) >= 2 and shape[-1] % model_parallel == 0:
    return P(*([None] * (len(shape) - 1)), "model")
  return P()


def state_shardings(
    setup: Setup, mesh: jax.sharding.Mesh, state: TrainState
) -> TrainState:
  """Shardings of a TrainState on ``mesh``: params by :func:`param_spec`, the optimizer
  state like its params (masks and density factors too: ``so.state_shardings``), the
  rest replicated."""
  replicated = NamedSharding(mesh, P())
  m = mesh.shape["model"]
  params = jax.tree.map(
      lambda x: NamedSharding(mesh, param_spec(x, m)), state.params
  )
  return TrainState(
      step=replicated,
      params=params,
      batch_stats=jax.tree.map(lambda _: replicated, state.batch_stats),
      opt_state=so.state_shardings(setup.tx, state.params, params, replicated),
  )


def check_batch_size(batch_size: int, mesh: jax.sharding.Mesh) -> None:
  n = mesh.shape["data"]
  if batch_size % n or batch_size % jax.process_count():
    raise workdir_lib.UserError(
        f"batch_size {batch_size} is not divisible by the {n} devices of the"
        f" mesh's 'data' axis ({jax.process_count()} processes) it is sharded"
        " over"
    )


def jit_steps(
    setup: Setup, mesh: jax.sharding.Mesh, shardings: TrainState | None = None
):
  """The jitted train, eval and probe steps for ``mesh``: batch on 'data', the state laid
  out by ``shardings`` (from :func:`state_shardings`; default: replicated)."""
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P("data"))
  state = replicated if shardings is None else shardings
  train = jax.jit(
      make_train_step(setup),
      in_shardings=(state, batch_sharding),
      out_shardings=(state, replicated),
      donate_argnums=0,
      static_argnums=2,
  )
  evaluate = jax.jit(
      make_eval_step(setup),
      in_shardings=(state, batch_sharding),
      out_shardings=replicated,
  )
  probe = (
      None
      if setup.config.dense
      else jax.jit(
          make_skew_probe(setup),
          in_shardings=(state, batch_sharding),
          out_shardings=replicated,
      )
  )
  return train, evaluate, probe


class HostScheduledStep:
  """The train step as two compiled variants, chosen on the host each step.

  ``step(state, batch, mask_update)`` runs the ordinary variant (no mask-update
  code, no conditional) or the mask-update one. Both are compiled ahead of
  time, per batch shape, from the first call's arguments; the update variant
  compiles in a background thread, so that the first steps do not wait for it.
  """

  def __init__(self, jitted: Any):
    self._jitted = jitted
    self._variants: dict[tuple, Any] = {}
    self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)

  @staticmethod
  def _key(batch: dict, mask_update: bool) -> tuple:
    return bool(mask_update), tuple(
        (x.shape, str(x.dtype)) for x in jax.tree.leaves(batch)
    )

  def compile(
      self, state: TrainState, batch: dict, *, update_variant: bool = True
  ) -> None:
    """Compile the ordinary variant now and (``update_variant``) the other in the background."""
    if self._key(batch, False) not in self._variants:
      self._variants[self._key(batch, False)] = self._jitted.lower(
          state, batch, False
      ).compile()
    if update_variant and self._key(batch, True) not in self._variants:
      lowered = self._jitted.lower(state, batch, True)
      self._variants[self._key(batch, True)] = self._pool.submit(
          lowered.compile
      )

  def __call__(self, state: TrainState, batch: dict, mask_update: bool):
    self.compile(state, batch, update_variant=mask_update)
    key = self._key(batch, mask_update)
    if isinstance(self._variants[key], concurrent.futures.Future):
      self._variants[key] = self._variants[key].result()
    return self._variants[key](state, batch)


def check_schedule_kept(summary: dict, step: int) -> None:
  """RuntimeError if the loop's flags went out of step with the optimizer's schedule.

  The state counts the due steps that ran the ordinary variant and the mask
  changes left without a state re-mask (see :mod:`sparseopt_jax.schedule`);
  either means the masks did not follow the schedule, which no result may hide.
  """
  missed = summary.get("missed_mask_updates") or 0
  unremasked = summary.get("unremasked_mask_updates") or 0
  if missed or unremasked:
    raise RuntimeError(
        f"by step {step} the loop ran {missed} due mask update(s) as ordinary"
        f" steps and skipped {unremasked} optimizer-state re-mask(s): its"
        " mask_update flags are out of step with the optimizer's schedule"
    )


def shard_batch(batch: dict, mesh: jax.sharding.Mesh) -> dict:
  """This process's host batch -> one global array per key, sharded on 'data'."""
  sharding = NamedSharding(mesh, P("data"))
  return {
      k: jax.make_array_from_process_local_data(sharding, v)
      for k, v in batch.items()
  }


# ---------------------------------------------------------------------------
# The loop


def one_program_at_a_time(mesh: jax.sharding.Mesh) -> bool:
  """Whether the loop waits for each program on ``mesh`` before the next.

  XLA:CPU runs every device's part of a program, collectives included, on
  thread pools of max(cores, devices) threads. Two programs in flight that no
  data dependency orders (the eval steps over the test batches, which all read
  the same state) can each hold threads in a collective while the peers they
  wait for get none: a deadlock, nearly every time with 8 simulated devices on
  2 cores. A chain of train steps, each reading the last one's state, does not
  do this; on a CPU mesh of several devices the loop waits anyway.
  """
  return mesh.size > 1 and mesh.devices.flat[0].platform == "cpu"


def evaluate(eval_step, state, dataset, batch_size, mesh) -> dict:
  totals = None
  for batch in dataset.eval_batches(batch_size // jax.process_count()):
    out = eval_step(state, shard_batch(batch, mesh))
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    if one_program_at_a_time(mesh):
      jax.block_until_ready(totals)
  totals = jax.device_get(totals)
  return {
      "test_loss": float(totals["loss"] / totals["count"]),
      "test_accuracy": float(totals["correct"] / totals["count"]),
  }


def run(
    cfg: presets.TrainConfig,
    workdir: str,
    *,
    resume: bool = False,
    stop_at: int | None = None,
    num_devices: int | None = None,
    progress: bool = True,
    async_checkpoints: bool = True,
    log=print,
) -> tuple[TrainState, dict]:
  """Train (or resume) a run in ``workdir``; returns the final state and last metrics row.

  ``stop_at`` stops after that step as if interrupted (a checkpoint is written),
  so that a later ``resume=True`` run continues exactly there. One process per
  workdir at a time (``workdir/.lock``). A resumed run must have the stored
  config but for :data:`~sparseopt_jax.training.workdir.SAFE_ON_RESUME` fields.

  Everything the config asks is checked before the workdir is touched: the
  mesh, the data, the model, the optimizer and its schedules, the masks.

  Raises:
    workdir.UserError: for a config the model, data or devices cannot run, a
      busy or unwritable workdir, a conflicting config, checkpoints without
      ``resume``.
    input.DataError: for missing or corrupt data.
  """
  # Every process decides alone what to run: check they decided the same.
  multihost.check_same(
      "config and workdir",
      json.dumps(dataclasses.asdict(cfg), sort_keys=True)
      + os.path.abspath(workdir),
  )
  with user_errors():
    mesh = make_mesh(num_devices, cfg.model_parallel)
    check_batch_size(cfg.batch_size, mesh)
    dataset = input_lib.load(
        cfg.dataset,
        data_dir=cfg.data_dir,
        train_subset=cfg.train_subset,
        test_subset=cfg.test_subset,
    )
    local_batch = cfg.batch_size // jax.process_count()
    setup = make_setup(cfg, dataset.info, dataset.steps_per_epoch(local_batch))
    state = create_train_state(setup, dataset.info.image_shape)
  is_main = jax.process_index() == 0
  with contextlib.ExitStack() as held:
    refused = ""
    if is_main:  # one lock for the run, taken by process 0 for all
      try:
        held.enter_context(workdir_lib.lock(workdir))
      except workdir_lib.UserError as e:
        refused = str(e)
    if refused := multihost.process_zeros(refused):
      raise workdir_lib.UserError(refused)
    return _run_locked(
        setup,
        dataset,
        state,
        workdir,
        mesh,
        resume=resume,
        stop_at=stop_at,
        progress=progress,
        async_checkpoints=async_checkpoints,
        is_main=is_main,
        log=log,
    )


@contextlib.contextmanager
def user_errors():
  """Turns the set-up's ValueErrors into UserErrors (one line, exit status 2).

  The set-up is what the config asks of the library, the data and the devices;
  their eager checks raise ValueError naming the bad value, so a ValueError
  here is a config that cannot run, not a fault of the program.
  """
  try:
    yield
  except (workdir_lib.UserError, input_lib.DataError):
    raise
  except ValueError as e:
    raise workdir_lib.UserError(str(e)) from e


def _run_locked(
    setup,
    dataset,
    state,
    workdir,
    mesh,
    *,
    resume,
    stop_at,
    progress,
    async_checkpoints,
    is_main,
    log,
) -> tuple[TrainState, dict]:
  cfg = setup.config
  ckpt = checkpointing.Checkpointer(
      os.path.join(workdir, "checkpoints"),
      cfg.checkpoint_every,
      asynchronous=async_checkpoints,
  )
  latest = ckpt.latest_step()
  if latest is not None and not resume:
    raise workdir_lib.UserError(
        f"{workdir!r} already holds checkpoints (last step {latest}); pass"
        " --resume to continue it, or choose a new --workdir"
    )
  if latest is None:
    if resume:
      log(f"--resume: no checkpoint in {workdir!r}: starting a new run")
  else:
    stored = workdir_lib.stored_config(workdir)
    if stored is not None:
      workdir_lib.check_resume_overrides(stored, dataclasses.asdict(cfg))
  if latest is None and is_main:
    workdir_lib.write_config(
        workdir, cfg
    )  # a new run only: resume keeps the stored one

  shardings = state_shardings(setup, mesh, state)
  state = jax.device_put(state, shardings)
  if latest is not None:
    state = ckpt.restore(state)
  start = int(state.step)
  metrics_log = workdir_lib.MetricsLog(workdir, start, write=is_main, log=log)
  if start >= setup.num_steps:
    log(
        f"the run in {workdir!r} is finished (step {start} of"
        f" {setup.num_steps}); nothing to do"
    )
    ckpt.close()
    return state, metrics_log.last
  train_jit, eval_step, probe = jit_steps(setup, mesh, shardings)
  train_step = HostScheduledStep(train_jit)
  dynamic = (
      not cfg.dense and cfg.topology != "static" and start < setup.end_step
  )
  local_batch = cfg.batch_size // jax.process_count()
  batches = dataset.train_batches(local_batch, seed=cfg.seed, start_step=start)
  last_step = (
      setup.num_steps if stop_at is None else min(stop_at, setup.num_steps)
  )

  from tqdm.auto import tqdm

  bar = tqdm(
      total=setup.num_steps,
      initial=start,
      disable=not (progress and is_main),
      unit="step",
      dynamic_ncols=True,
  )
  t_start = time.time()

  def record(step, batch, extra):
    """Evaluate and append a metrics row (step 0: before any training)."""
    row = {
        "step": step,
        "epoch": step / setup.steps_per_epoch,
        **extra,
        **evaluate(eval_step, state, dataset, cfg.batch_size, mesh),
        "wall_time": metrics_log.wall_time_offset + time.time() - t_start,
    }
    if probe is not None:
      summary = so.sparsity_summary(state.opt_state, params=state.params)
      check_schedule_kept(summary, step)
      row.update(
          sparsity=summary["sparsity"],
          params_sparsity=summary["params_sparsity"],
          pruned_nonzero=summary["pruned_nonzero"],
          density_spread=summary["density_spread"],
          exploration=summary["exploration"],
          **{
              k: float(v)
              for k, v in jax.device_get(probe(state, batch)).items()
          },
      )
    metrics_log.append(row)
    row = metrics_log.last  # as written: null for an undefined value
    if is_main:
      bar.write(
          " ".join(
              f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
              for k, v in row.items()
          )
      )
    return row

  if start == 0:  # a point before training, probed on the first batch
    first = next(batches)
    batches = itertools.chain([first], batches)
    record(0, shard_batch(first, mesh), {})
  pending, row = [], metrics_log.last
  seen_images, t_mark = 0, time.time()
  try:  # the bar ends its line before any error message
    with Preemption() as preemption:
      for step in range(start + 1, last_step + 1):
        batch = shard_batch(next(batches), mesh)
        train_step.compile(state, batch, update_variant=dynamic)
        state, metrics = train_step(
            state, batch, setup.is_mask_update(step - 1)
        )
        if one_program_at_a_time(mesh):
          jax.block_until_ready(state)
        pending.append(metrics)
        seen_images += cfg.batch_size
        if (
            step % cfg.log_every == 0
            or step % cfg.eval_every == 0
            or step == last_step
        ):
          train = {
              k: float(np.mean([m[k] for m in jax.device_get(pending)]))
              for k in pending[0]
          }
          throughput = seen_images / (time.time() - t_mark)
          bar.set_postfix(
              loss=f"{train['loss']:.3f}",
              acc=f"{train['accuracy']:.3f}",
              img_s=f"{throughput:.0f}",
          )
          bar.update(step - bar.n)
        if step % cfg.eval_every == 0 or step == setup.num_steps:
          row = record(
              step,
              batch,
              {
                  "train_loss": train["loss"],
                  "train_accuracy": train["accuracy"],
                  "images_per_s": throughput,
              },
          )
        if step % cfg.log_every == 0:
          pending, seen_images, t_mark = [], 0, time.time()
        stop = preemption.reached(step)
        ckpt.save(step, state, force=step == last_step or stop)
        if stop:
          log(
              f"preempted (SIGTERM): stopped after step {step} with a"
              " checkpoint; --resume continues the run"
          )
          break
  finally:
    bar.close()
  ckpt.close()
  return state, row


class Preemption:
  """Whether the loop stops for a preemption notice (SIGTERM) after this step.

  Several processes: JAX's preemption service takes the signal and agrees on
  the step at which all of them stop (``reached_preemption_sync_point``, asked
  after every step). One process: a SIGTERM handler, held while the loop runs,
  marks the notice for the next step. Either way the loop writes a checkpoint
  there and returns. A context manager: the handler goes when the loop ends.
  """

  def __init__(self):
    self._noticed = False
    self._previous = None
    # JAX's own notifier holds SIGTERM when processes must agree; a handler in
    # the main thread only, where Python delivers signals.
    if (
        jax.process_count() == 1
        and threading.current_thread() is threading.main_thread()
    ):
      self._previous = signal.signal(signal.SIGTERM, self._notice)

  def _notice(self, signum, frame) -> None:
    del signum, frame
    self._noticed = True

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._noticed

  def __enter__(self) -> Preemption:
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


# ---------------------------------------------------------------------------
# Command line


# One line per TrainConfig field for --help; the preset gives the defaults.
FLAG_HELP = {
    "dataset": (
        "fashion_mnist (offline), cifar10, cifar100 or imagenet2012 (TFDS)"
    ),
    "model": (
        "resnet8/20/32/56 (CIFAR), resnet18/50 (ImageNet), vit or vit_qknorm"
        " (a ViT, pre-LN; with QK-norm)"
    ),
    "width": "channels of the first stage (the model's own if unset)",
    "data_dir": (
        "where the data lives (IDX files for fashion_mnist, a TFDS data_dir)"
    ),
    "train_subset": "train on the first N training examples only",
    "test_subset": "evaluate on the first N test examples only",
    "batch_size": "global batch, over all devices and processes",
    "epochs": "training length in epochs (unless --steps)",
    "steps": "training length in steps (overrides --epochs)",
    "learning_rate": "peak learning rate (cosine decay)",
    "warmup_epochs": "linear warm-up epochs",
    "optimizer": "sgd (with momentum) or adamw",
    "momentum": "SGD momentum",
    "nesterov": "Nesterov momentum",
    "weight_decay": "L2 weight decay (optax.add_decayed_weights)",
    "label_smoothing": "label smoothing of the cross-entropy",
    "dense": "plain SGD on the dense model, no sparseopt",
    "sparsity": "target fraction of zeros over the sparse leaves",
    "distribution": "layer budgets: uniform, erk or er",
    "topology": "rigl, set or static",
    "skew": (
        "skew correction: density (the paper), bn (BatchNorm variance),"
        " layernorm (kernels a LayerNorm normalises) or none"
    ),
    "grow_with": "gradient RigL grows by: raw or corrected",
    "structure": (
        "mask structure: none, fan_in (constant per-neuron fan-in) or N:M"
        " like 2:4 (needs --sparsity 1-N/M --distribution uniform)"
    ),
    "update_every": "Delta-T: steps between mask updates",
    "drop_fraction": (
        "alpha: fraction of active weights replaced at the first update"
    ),
    "end_fraction": "no mask updates after this fraction of training",
    "dense_stem": "keep the first conv dense (RigL's ImageNet recipe)",
    "ham": (
        "HAM: a hyperbolic step after each SGD step (Jacobs et al., ICLR 2026)"
    ),
    "ham_alpha": "HAM's gradient-sign coupling alpha",
    "ham_beta": "HAM's decay beta",
    "dtype": "computation dtype of the model: float32 or bfloat16",
    "model_parallel": (
        "devices on the mesh's 'model' axis (kernels' output axes sharded)"
    ),
    "seed": "seed of the init, the masks, the data order and the topology",
    "eval_every": "steps between evaluations (a metrics.jsonl row each)",
    "checkpoint_every": "steps between checkpoints",
    "log_every": "steps between progress-bar updates",
}


def _config_flags(parser: argparse.ArgumentParser) -> None:
  defaults = presets.PRESETS["fashion_mnist_resnet20"]
  for field in dataclasses.fields(presets.TrainConfig):
    flag = "--" + field.name.replace("_", "-")
    default = getattr(defaults, field.name)
    help_ = (
        f"{FLAG_HELP[field.name]} (default: the preset's; "
        f"fashion_mnist_resnet20: {'none' if default is None else default})"
    )
    if field.type in ("bool", bool):
      parser.add_argument(
          flag, action=argparse.BooleanOptionalAction, default=None, help=help_
      )
    elif field.name == "skew":
      parser.add_argument(
          flag,
          choices=[*so.skew.SKEW_MODES, "none"],
          default=None,
          help=help_,
      )
    else:
      kind = field.type if isinstance(field.type, str) else field.type.__name__
      cast = (
          int
          if kind.startswith("int")
          else float
          if kind.startswith("float")
          else str
      )
      parser.add_argument(flag, type=cast, default=None, help=help_)


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
  """The config fields given on the command line."""
  overrides = {
      f.name: getattr(args, f.name)
      for f in dataclasses.fields(presets.TrainConfig)
      if getattr(args, f.name) is not None
  }
  if overrides.get("structure") == "none":
    overrides["structure"] = None
  if overrides.get("skew") == "none":
    overrides["skew"] = None
  return overrides


def config_from_args(args: argparse.Namespace) -> presets.TrainConfig:
  return presets.get_preset(args.preset, **overrides_from_args(args))


class _Parser(argparse.ArgumentParser):
  """argparse, with errors on one line: the message and where help is, no usage block."""

  def error(self, message: str):
    self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def train_parser() -> argparse.ArgumentParser:
  parser = _Parser(
      prog="sparseopt-train",
      description="Train a (sparse) ResNet with SparseOpt.",
      epilog=(
          "Subcommand: sparseopt-train plot RUN_DIR [RUN_DIR ...] --out"
          " FILE.png"
      ),
  )
  parser.add_argument(
      "--preset",
      default="fashion_mnist_resnet20",
      help=f"one of {sorted(presets.PRESETS)} (default: %(default)s)",
  )
  parser.add_argument(
      "--workdir",
      required=True,
      help="directory of the run: config, metrics, checkpoints",
  )
  parser.add_argument(
      "--resume",
      action="store_true",
      help=(
          "continue the run in --workdir from its last checkpoint, with its "
          f"stored config (only {', '.join(workdir_lib.SAFE_ON_RESUME)} may "
          "change)"
      ),
  )
  parser.add_argument(
      "--stop-at",
      type=int,
      default=None,
      help="stop after this step as if interrupted (then --resume)",
  )
  parser.add_argument(
      "--distributed",
      action="store_true",
      help=(
          "one process of a multi-host run: jax.distributed.initialize()"
          " detects the cluster (SLURM, a TPU pod slice)"
      ),
  )
  parser.add_argument(
      "--coordinator-address",
      default=None,
      help="HOST:PORT of process 0's coordinator (multi-host, no detection)",
  )
  parser.add_argument(
      "--num-processes",
      type=int,
      default=None,
      help="processes of the multi-host run",
  )
  parser.add_argument(
      "--process-id",
      type=int,
      default=None,
      help="this process's index in [0, --num-processes)",
  )
  parser.add_argument(
      "--no-progress", action="store_true", help="no progress bar"
  )
  _config_flags(parser)
  return parser


def plot_parser() -> argparse.ArgumentParser:
  parser = _Parser(
      prog="sparseopt-train plot",
      description="Plot runs' metrics against step into one PNG.",
  )
  parser.add_argument("runs", nargs="+", help="workdirs holding metrics.jsonl")
  parser.add_argument(
      "--out", required=True, help="image file (.png if no extension)"
  )
  parser.add_argument(
      "--metric",
      default="test_accuracy",
      help="a metrics.jsonl field (default: %(default)s)",
  )
  parser.add_argument(
      "--labels", nargs="*", default=None, help="one legend label per run"
  )
  parser.add_argument(
      "--title",
      default=None,
      help="figure title (default: data set, model, sparsity and steps)",
  )
  return parser


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  try:
    if argv[:1] == ["plot"]:
      args = plot_parser().parse_args(argv[1:])
      print(
          plotting.plot_runs(
              args.runs, args.out, args.metric, args.labels, args.title
          )
      )
      return 0
    args = train_parser().parse_args(argv)
    with user_errors():
      cfg = (
          workdir_lib.config_for_resume(args.workdir, overrides_from_args(args))
          if args.resume
          else None
      ) or config_from_args(args)
    multi = (args.coordinator_address, args.num_processes, args.process_id)
    if args.distributed or any(v is not None for v in multi):
      multihost.initialize(*multi)
    _, row = run(
        cfg,
        args.workdir,
        resume=args.resume,
        stop_at=args.stop_at,
        progress=not args.no_progress,
    )
  except (workdir_lib.UserError, input_lib.DataError, plotting.PlotError) as e:
    print(f"sparseopt-train: error: {e}", file=sys.stderr)
    return 2
  except workdir_lib.WriteError as e:
    print(f"sparseopt-train: error: {e}", file=sys.stderr)
    return 1
  print(json.dumps(row))
  return 0


if __name__ == "__main__":
  sys.exit(main())
