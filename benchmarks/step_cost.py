"""Cost of a SparseOpt train step against plain SGD on the dense model.

    python benchmarks/step_cost.py                                  # ResNet-20 and ResNet-50
    python benchmarks/step_cost.py --models resnet20 --rounds 20
    python benchmarks/step_cost.py --smoke --out /tmp/step_cost     # tiny, < 1 minute
    python benchmarks/step_cost.py --models resnet50 --merge        # add a model to the JSON

What is timed is the training program's own jitted step
(``sparseopt_jax.training.train.jit_steps`` over a one-device mesh, state donated,
BatchNorm, weight decay, momentum SGD), compiled ahead of time for one variant,
on random images and labels of the model's input shape, for these arms:

* ``dense_sgd``   -- ``--dense``: ``chain(add_decayed_weights, sgd)`` on the dense model;
* ``static``      -- ``chain(sparseopt(topology="static", skew="density"), ...)``;
* ``rigl``        -- ``chain(sparseopt(topology="rigl", skew="density"), ...)``, the
  host-scheduled ordinary variant (``mask_update=False``: what the training loop
  runs on every step that does not update the masks);
* ``rigl_update`` -- the host-scheduled mask-update variant (``mask_update=True``,
  ``update_every=1``, so every step updates the masks);
* ``rigl_in_graph`` (extra) -- one step for both, a ``lax.cond`` deciding in the graph.

After compiling and warming up every arm, the arms run round-robin, one step of
each per round (the order rotates every round), each step blocked on with
``jax.block_until_ready``; medians are reported. Interleaving makes the ratios
robust to drift in machine load (other processes on a shared CPU), not to
noise within a round. The amortised cost of RigL at Delta-T is
``((Delta-T - 1) * rigl + rigl_update) / Delta-T``. Also reported: compile time
and HLO size of each variant (lines, fusions, conditionals), optimizer-state
leaves, and eager ``tx.init`` against the model's own eager ``model.init``.

Bars: sparse ordinary step <= 1.03x dense SGD, amortised with topology updates at
Delta-T = 100 <= 1.05x, masks <= 1 byte per sparse weight (the exploration
record adds 1 bit, 1/8 byte); on the CPU also ``tx.init`` <= 0.3x ``model.init``,
compile <= 1.5x the dense step's, optimizer part alone <= 1.15x dense SGD's.

Writes ``<out>/step_cost.json`` (machine, date, per-step times, ratios, bytes
per weight) and ``<out>/step_cost.png``, and prints markdown tables.
"""

from __future__ import annotations

import dataclasses
import json
import operator
import os
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sparseopt_jax as so
from sparseopt_jax.topology import TopologyState
from sparseopt_jax.training import input as input_lib
from sparseopt_jax.training import presets, train

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/ is not a package)

DELTA_T = 100
BAR_ORDINARY = 1.03
BAR_AMORTISED = 1.05
BAR_MASK_BYTES = 1.0
BAR_INIT = 0.3  # eager tx.init / eager model.init (CPU)
BAR_COMPILE = 1.5  # train-step compile / dense step's
BAR_OPTIMIZER_ONLY = (
    1.15  # tx.update + apply alone / dense SGD's (CPU, ResNet-20)
)
NUM_STEPS = 10_000_000  # a long run: the LR schedule and end_step never bite


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  preset: str
  image_shape: tuple[int, int, int]
  num_classes: int
  batch_size: int
  width: int | None = None


# Two settings, on the paper's presets (float32 on CPU: bfloat16
# convolutions are emulated there and would time the emulation, not SparseOpt).
MODELS = {
    "resnet20": ModelSpec("cifar100_resnet20", (32, 32, 3), 100, 128),
    "resnet50": ModelSpec("imagenet_resnet50", (224, 224, 3), 1000, 32),
}
# ResNet-50 at a size a CPU steps in under a second: what a new user tries on a laptop.
MODELS["resnet50_64"] = ModelSpec("imagenet_resnet50", (64, 64, 3), 1000, 8)
SMOKE = {
    "resnet20": ModelSpec("cifar100_resnet20", (16, 16, 3), 10, 8, width=4),
    "resnet50": ModelSpec("imagenet_resnet50", (32, 32, 3), 10, 2, width=4),
    "resnet50_64": ModelSpec("imagenet_resnet50", (32, 32, 3), 10, 2, width=4),
}

# arm -> (TrainConfig overrides, mask_update): the training loop's host-scheduled
# variants (mask_update False / True, a static argument of the jitted step), or the
# in-graph schedule (None: a lax.cond inside the step decides).
ARMS: dict[str, tuple[dict[str, Any], bool | None]] = {
    "dense_sgd": ({"dense": True}, False),
    "static": ({"topology": "static", "skew": "density"}, False),
    "rigl": (
        {"topology": "rigl", "skew": "density", "update_every": DELTA_T},
        False,
    ),
    "rigl_update": (
        {"topology": "rigl", "skew": "density", "update_every": 1},
        True,
    ),
}
# Extra arms for looking into where the time goes (``--arms``).
EXTRA_ARMS: dict[str, tuple[dict[str, Any], bool | None]] = {
    "static_noskew": ({"topology": "static", "skew": None}, False),
    "rigl_noskew": (
        {"topology": "rigl", "skew": None, "update_every": DELTA_T},
        False,
    ),
    "rigl_update_noskew": (
        {"topology": "rigl", "skew": None, "update_every": 1},
        True,
    ),
    "set_update": (
        {"topology": "set", "skew": "density", "update_every": 1},
        True,
    ),
    # The simple in-graph form: one jitted step, a lax.cond deciding each step.
    "rigl_in_graph": (
        {"topology": "rigl", "skew": "density", "update_every": DELTA_T},
        None,
    ),
    "rigl_update_in_graph": (
        {"topology": "rigl", "skew": "density", "update_every": 1},
        None,
    ),
}
ALL_ARMS = {**ARMS, **EXTRA_ARMS}


# ---------------------------------------------------------------------------
# Building one arm from the training program's pieces


def make_config(
    spec: ModelSpec, overrides: dict[str, Any], dtype: str
) -> presets.TrainConfig:
  return presets.get_preset(
      spec.preset,
      batch_size=spec.batch_size,
      width=spec.width,
      steps=NUM_STEPS,
      dtype=dtype,
      **overrides,
  )


def _topology_state(opt_state: Any) -> TopologyState | None:
  found = [
      s
      for s in jax.tree.leaves(
          opt_state, is_leaf=lambda x: isinstance(x, TopologyState)
      )
      if isinstance(s, TopologyState)
  ]
  return found[0] if found else None


def tree_bytes(tree: Any) -> int:
  return int(
      sum(
          x.nbytes if hasattr(x, "nbytes") else np.asarray(x).nbytes
          for x in jax.tree.leaves(tree)
      )
  )


def state_bytes(state: train.TrainState) -> dict[str, Any]:
  """Optimizer-state bytes per weight, and masks / exploration bits per sparse weight."""
  n_params = int(sum(x.size for x in jax.tree.leaves(state.params)))
  out = {"params": n_params, "opt_state_bytes": tree_bytes(state.opt_state)}
  out["opt_state_bytes_per_weight"] = out["opt_state_bytes"] / n_params
  topo = _topology_state(state.opt_state)
  if topo is not None:
    masks = jax.tree.leaves(topo.masks)
    n_sparse = int(sum(m.size for m in masks))
    mask_bytes = tree_bytes(topo.masks)
    ever_bytes = tree_bytes(topo.ever_active)
    factor_bytes = tree_bytes(
        topo.density_factors
    )  # float32 per neuron, cached
    out.update(
        sparse_weights=n_sparse,
        sparse_leaves=len(masks),
        mask_dtype=str(masks[0].dtype),
        mask_bytes=mask_bytes,
        exploration_bytes=ever_bytes,
        mask_bytes_per_sparse_weight=mask_bytes / n_sparse,
        exploration_bytes_per_sparse_weight=ever_bytes / n_sparse,
        density_factor_bytes_per_weight=factor_bytes / n_params,
        mask_and_exploration_bytes_per_sparse_weight=(mask_bytes + ever_bytes)
        / n_sparse,
        realised_sparsity=1.0
        - float(sum(int(jnp.sum(m)) for m in masks)) / n_sparse,
    )
  return out


def hlo_stats(compiled: Any) -> dict[str, int]:
  """Size of a compiled program: HLO lines, fusions and conditionals (any backend)."""
  text = compiled.as_text()
  return {
      "hlo_lines": len(text.splitlines()),
      "fusions": text.count(" fusion("),
      "conditionals": text.count(" conditional("),
  }


class Arm:
  """One compiled train step (one variant of it) and its (donated) state."""

  def __init__(
      self,
      name: str,
      spec: ModelSpec,
      arm: tuple[dict, bool | None],
      dtype: str,
      mesh: jax.sharding.Mesh,
      batch: dict,
  ):
    self.name = name
    overrides, self.mask_update = arm
    info = input_lib.DatasetInfo(
        "synthetic",
        spec.image_shape,
        spec.num_classes,
        num_train=50_000,
        num_test=10_000,
    )
    self.setup = train.make_setup(
        make_config(spec, overrides, dtype),
        info,
        max(1, info.num_train // spec.batch_size),
    )
    state, self.build_s, _ = common.timed(
        train.create_train_state, self.setup, spec.image_shape
    )
    self.bytes = state_bytes(state)
    self.bytes["opt_state_leaves"] = len(jax.tree.leaves(state.opt_state))
    if (
        self.mask_update is True
    ):  # a step of the update variant must update the masks
      state = state.replace(opt_state=_with_step(state.opt_state, 1))
    self.state = jax.device_put(state, NamedSharding(mesh, P()))
    jitted, _, _ = train.jit_steps(self.setup, mesh)
    self.step, self.compile_s, _ = common.timed(
        lambda: jitted.lower(self.state, batch, self.mask_update).compile()
    )
    self.hlo = hlo_stats(self.step)
    self.times: list[float] = []  # wall seconds per timed step
    self.cpu_times: list[float] = (
        []
    )  # CPU seconds of this process per timed step
    self.opt_times: list[float] = []
    self.opt_cpu_times: list[float] = []
    self.opt_args = None

  def run(self, batch) -> tuple[float, float]:
    """One train step, blocked on: (wall seconds, CPU seconds of this process)."""
    (self.state, _), wall, cpu = common.timed(self.step, self.state, batch)
    return wall, cpu

  def start_optimizer_only(self, seed: int = 0) -> None:
    """Compile the optimizer part of the step alone: ``tx.update`` + apply, on fixed grads.

    A decomposition for finding where the time goes: the same ``tx``, apply
    function and variant as ``train.make_train_step``, without the model's
    forward and backward pass, on random dense gradients shaped like the params.
    """
    cfg, tx, mu = self.setup.config, self.setup.tx, self.mask_update

    def opt_step(params, opt_state, grads, batch_stats):
      if cfg.dense:
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state
      updates, opt_state = tx.update(
          grads, opt_state, params, batch_stats=batch_stats, mask_update=mu
      )
      return so.apply_updates(params, updates, opt_state, mask_update=mu)

    leaves, treedef = jax.tree.flatten(self.state.params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    grads = jax.tree.unflatten(
        treedef,
        [
            jax.random.normal(k, x.shape, x.dtype) * 1e-2
            for k, x in zip(keys, leaves)
        ],
    )
    copy = lambda t: jax.tree.map(jnp.copy, t)
    self.opt_args = [
        copy(self.state.params),
        copy(self.state.opt_state),
        grads,
        self.state.batch_stats,
    ]
    jitted = jax.jit(opt_step, donate_argnums=(0, 1))
    self.opt_step, self.opt_compile_s, _ = common.timed(
        lambda: jitted.lower(*self.opt_args).compile()
    )
    self.opt_hlo = hlo_stats(self.opt_step)
    self.run_optimizer_only()

  def run_optimizer_only(self) -> tuple[float, float]:
    params, opt_state, grads, stats = self.opt_args
    (params, opt_state), wall, cpu = common.timed(
        self.opt_step, params, opt_state, grads, stats
    )
    self.opt_args = [params, opt_state, grads, stats]
    return wall, cpu

  def stop_optimizer_only(self) -> None:
    self.opt_args = self.opt_step = None

  def updates_done(self) -> int:
    """Mask updates so far (to check that the update arm really updates, the others not)."""
    topo = _topology_state(self.state.opt_state)
    if topo is None or self.mask_update is False:
      return 0
    cfg = self.setup.config
    step = int(topo.step)
    # The step that saw count c updated iff 0 < c < end_step and c % update_every == 0.
    return max(0, min(step - 1, self.setup.end_step - 1)) // cfg.update_every


def _with_step(opt_state: Any, step: int) -> Any:
  """``opt_state`` with its topology stage's step set (past step 0, which never updates)."""
  is_topo = lambda x: isinstance(x, TopologyState)
  return jax.tree.map(
      lambda x: x._replace(step=jnp.full_like(x.step, step))
      if is_topo(x)
      else x,
      opt_state,
      is_leaf=is_topo,
  )


def init_costs(spec: ModelSpec, dtype: str, seed: int = 0) -> dict[str, float]:
  """Eager ``model.init`` vs eager ``tx.init`` of the RigL arm, as a new user calls them."""
  info = input_lib.DatasetInfo(
      "synthetic",
      spec.image_shape,
      spec.num_classes,
      num_train=50_000,
      num_test=10_000,
  )
  setup = train.make_setup(
      make_config(spec, ARMS["rigl"][0], dtype), info, 1000
  )
  x = jnp.zeros((1, *spec.image_shape), jnp.float32)
  variables, model_s, _ = common.timed(
      setup.model.init, jax.random.PRNGKey(seed), x, train=True
  )
  _, tx_s, _ = common.timed(setup.tx.init, variables["params"])
  return {
      "model_init_eager_s": model_s,
      "tx_init_eager_s": tx_s,
      "tx_init_over_model_init": tx_s / model_s,
  }


# ---------------------------------------------------------------------------
# Measuring


def _median(xs):
  return float(statistics.median(xs))


def _paired(f, *series) -> float:
  """Median over rounds of ``f`` of the arms' times in the same round.

  Pairing a step with the dense step of its own round cancels the load drift
  that the two medians apart would keep.
  """
  return _median([f(*times) for times in zip(*series)])


def amortised(ordinary: float, update: float) -> float:
  """The mean step time when one step in ``DELTA_T`` updates the masks."""
  return ((DELTA_T - 1) * ordinary + update) / DELTA_T


def _amortised_ratio(ordinary: float, update: float, dense: float) -> float:
  return amortised(ordinary, update) / dense


def _interleave(
    arms: dict, run, rounds: int, warmup: int, record: str, label: str, log
):
  """Warm-up, then ``rounds`` rounds of one ``run(arm)`` per arm, the order rotating.

  ``run`` returns (wall, cpu) seconds, appended to ``arm.<record>`` and
  ``arm.<cpu record>``.
  """
  cpu_record = record.replace("times", "cpu_times")
  order = list(arms)
  for _ in range(warmup):
    for arm in order:
      run(arms[arm])
  for r in range(rounds):
    k = r % len(order)
    for arm in order[k:] + order[:k]:
      wall, cpu = run(arms[arm])
      getattr(arms[arm], record).append(wall)
      getattr(arms[arm], cpu_record).append(cpu)
    log(
        f"  [{label}] round {r + 1}/{rounds}: "
        + ", ".join(
            f"{a}={getattr(arms[a], record)[-1] * 1e3:.1f}ms" for a in order
        )
    )


def bench_model(
    name: str,
    spec: ModelSpec,
    arm_names: list[str],
    rounds: int,
    warmup: int,
    dtype: str,
    opt_rounds: int = 0,
    seed: int = 0,
    log=print,
) -> dict:
  mesh = train.make_mesh(1)
  rng = np.random.default_rng(seed)
  host = {
      "image": rng.standard_normal(
          (spec.batch_size, *spec.image_shape), np.float32
      ),
      "label": (
          rng.integers(0, spec.num_classes, spec.batch_size).astype(np.int32)
      ),
  }
  batch = train.shard_batch(host, mesh)

  init = init_costs(spec, dtype, seed)
  log(
      f"  [{name}] eager model.init {init['model_init_eager_s']:.2f}s, eager"
      f" tx.init {init['tx_init_eager_s']:.2f}s"
      f" ({init['tx_init_over_model_init']:.3f}x)"
  )
  arms = {}
  for arm in arm_names:
    arms[arm] = a = Arm(arm, spec, ALL_ARMS[arm], dtype, mesh, batch)
    a.run(batch)  # first step
    log(
        f"  [{name}] {arm}: state built in {a.build_s:.1f}s, step compiled in "
        f"{a.compile_s:.1f}s ({a.hlo['hlo_lines']} HLO lines)"
    )
  _interleave(arms, lambda a: a.run(batch), rounds, warmup, "times", name, log)
  if opt_rounds:
    for a in arms.values():
      a.start_optimizer_only(seed)
    _interleave(
        arms,
        lambda a: a.run_optimizer_only(),
        opt_rounds,
        warmup,
        "opt_times",
        f"{name} optimizer only",
        log,
    )
    for a in arms.values():
      a.stop_optimizer_only()

  out: dict[str, Any] = {
      "spec": dataclasses.asdict(spec),
      "dtype": dtype,
      "rounds": rounds,
      "warmup": warmup,
      "init": init,
      "arms": {},
  }
  dense = arms.get("dense_sgd")
  for arm, a in arms.items():
    row = {
        "median_s": _median(a.times),
        "min_s": float(min(a.times)),
        "times_s": a.times,
        "build_state_s": a.build_s,
        "mask_update": a.mask_update,
        "compile_s": a.compile_s,
        "step_hlo": a.hlo,
        "mask_updates_done": a.updates_done(),
        **a.bytes,
    }
    if dense is not None:
      row["compile_ratio_to_dense"] = a.compile_s / dense.compile_s
    if dense is not None:
      row["ratio_to_dense"] = row["median_s"] / _median(dense.times)
      row["ratio_to_dense_per_round_median"] = _paired(
          operator.truediv, a.times, dense.times
      )
    row["cpu_median_s"] = _median(a.cpu_times)
    row["cpu_times_s"] = a.cpu_times
    if dense is not None:
      # CPU seconds of this process: less sensitive than wall time to other processes
      # taking the cores (though not to their cache and memory-bandwidth use).
      row["cpu_ratio_to_dense_per_round_median"] = _paired(
          operator.truediv, a.cpu_times, dense.cpu_times
      )
    if a.opt_times:
      row["optimizer_only_compile_s"] = a.opt_compile_s
      row["optimizer_only_hlo"] = a.opt_hlo
      row["optimizer_only_median_s"] = _median(a.opt_times)
      row["optimizer_only_cpu_median_s"] = _median(a.opt_cpu_times)
      row["optimizer_only_times_s"] = a.opt_times
      if dense is not None:
        # What the optimizer part adds over dense SGD's, as a fraction of a dense step.
        row["optimizer_only_extra_s"] = _paired(
            operator.sub, a.opt_times, dense.opt_times
        )
        row["optimizer_only_ratio_estimate"] = 1 + row[
            "optimizer_only_extra_s"
        ] / _median(dense.times)
        row["optimizer_only_ratio_to_dense"] = _paired(
            operator.truediv, a.opt_times, dense.opt_times
        )
    out["arms"][arm] = row

  summary: dict[str, Any] = {}
  if dense is not None:
    d = _median(dense.times)
    for arm in ("static", "rigl"):
      if arm in arms:
        row = out["arms"][arm]
        summary[f"{arm}_ordinary_ratio"] = row["ratio_to_dense"]
        summary[f"{arm}_ordinary_ratio_paired"] = row[
            "ratio_to_dense_per_round_median"
        ]
        summary[f"{arm}_ordinary_cpu_ratio_paired"] = row[
            "cpu_ratio_to_dense_per_round_median"
        ]
        if "optimizer_only_ratio_estimate" in row:
          summary[f"{arm}_ordinary_ratio_optimizer_only_estimate"] = row[
              "optimizer_only_ratio_estimate"
          ]
    if "static" in arms:  # static never updates its masks
      summary["static_amortised_ratio"] = summary["static_ordinary_ratio"]
      summary["static_amortised_ratio_paired"] = summary[
          "static_ordinary_ratio_paired"
      ]
      summary["static_amortised_cpu_ratio_paired"] = summary[
          "static_ordinary_cpu_ratio_paired"
      ]
      if "static_ordinary_ratio_optimizer_only_estimate" in summary:
        summary["static_amortised_ratio_optimizer_only_estimate"] = summary[
            "static_ordinary_ratio_optimizer_only_estimate"
        ]
    if "rigl" in arms and "rigl_update" in arms:
      ordinary, update = _median(arms["rigl"].times), _median(
          arms["rigl_update"].times
      )
      amortised_s = amortised(ordinary, update)
      summary.update(
          rigl_update_ratio=update / d,
          rigl_update_ratio_paired=out["arms"]["rigl_update"][
              "ratio_to_dense_per_round_median"
          ],
          rigl_update_extra_s=update - ordinary,
          rigl_amortised_s=amortised_s,
          rigl_amortised_ratio=amortised_s / d,
          rigl_amortised_ratio_paired=_paired(
              _amortised_ratio,
              arms["rigl"].times,
              arms["rigl_update"].times,
              dense.times,
          ),
          rigl_amortised_cpu_ratio_paired=_paired(
              _amortised_ratio,
              arms["rigl"].cpu_times,
              arms["rigl_update"].cpu_times,
              dense.cpu_times,
          ),
      )
      if arms["rigl"].opt_times:
        o = out["arms"]["rigl"]["optimizer_only_extra_s"]
        u = out["arms"]["rigl_update"]["optimizer_only_extra_s"]
        summary["rigl_amortised_ratio_optimizer_only_estimate"] = (
            1 + amortised(o, u) / d
        )
    # Pass/fail on the paired ratios (median over rounds of arm / dense in the same round):
    # robust to load drift on a shared machine. Ratios of medians are reported alongside.
    ordinary = [
        v for k, v in summary.items() if k.endswith("_ordinary_ratio_paired")
    ]
    amortised_r = [
        v for k, v in summary.items() if k.endswith("_amortised_ratio_paired")
    ]
    mask_bytes = [
        r["mask_bytes_per_sparse_weight"]
        for r in out["arms"].values()
        if "mask_bytes_per_sparse_weight" in r
    ]
    summary["pass_ordinary"] = bool(ordinary) and max(ordinary) <= BAR_ORDINARY
    summary["pass_amortised"] = (
        bool(amortised_r) and max(amortised_r) <= BAR_AMORTISED
    )
    summary["pass_mask_bytes"] = (
        bool(mask_bytes) and max(mask_bytes) <= BAR_MASK_BYTES
    )
    rows = out["arms"]
    summary["tx_init_over_model_init"] = out["init"]["tx_init_over_model_init"]
    summary["pass_init"] = summary["tx_init_over_model_init"] <= BAR_INIT
    ordinary_compile = [
        rows[a]["compile_ratio_to_dense"]
        for a in ("static", "rigl")
        if a in rows
    ]
    if ordinary_compile:
      summary["compile_ratio_ordinary"] = max(ordinary_compile)
      summary["pass_compile"] = summary["compile_ratio_ordinary"] <= BAR_COMPILE
    if "rigl_update" in rows:
      summary["compile_ratio_update_variant"] = rows["rigl_update"][
          "compile_ratio_to_dense"
      ]
    if "rigl" in rows and "optimizer_only_ratio_to_dense" in rows["rigl"]:
      summary["optimizer_only_ratio"] = rows["rigl"][
          "optimizer_only_ratio_to_dense"
      ]
      summary["pass_optimizer_only"] = (
          summary["optimizer_only_ratio"] <= BAR_OPTIMIZER_ONLY
      )
  out["summary"] = summary
  return out


# ---------------------------------------------------------------------------
# Reporting


def _f3(v) -> str:
  return "-" if v is None else f"{v:.3f}"


def _ms(v) -> str:
  return "-" if v is None else f"{v * 1e3:.1f}"


def _arm_rows(results: dict):
  """(model, arm, row) for every arm of every model."""
  for model, res in results["models"].items():
    for arm, row in res["arms"].items():
      yield model, arm, row


def _time_rows(results: dict):
  """The step-time table: each arm, and RigL amortised at Delta-T after a model's arms."""
  for model, res in results["models"].items():
    for arm, row in res["arms"].items():
      yield [
          model,
          arm,
          "mask update" if "update" in arm else "ordinary",
          _ms(row["median_s"]),
          _ms(row["min_s"]),
          _f3(row.get("ratio_to_dense")),
          _f3(row.get("ratio_to_dense_per_round_median")),
          _f3(row.get("cpu_ratio_to_dense_per_round_median")),
          _ms(row.get("optimizer_only_median_s")),
          _ms(row.get("optimizer_only_extra_s")),
          _f3(row.get("optimizer_only_ratio_estimate")),
      ]
    s = res["summary"]
    if "rigl_amortised_s" in s:
      yield [
          model,
          "rigl",
          f"amortised, Delta-T={DELTA_T}",
          _ms(s["rigl_amortised_s"]),
          "-",
          _f3(s["rigl_amortised_ratio"]),
          _f3(s["rigl_amortised_ratio_paired"]),
          _f3(s["rigl_amortised_cpu_ratio_paired"]),
          "-",
          "-",
          _f3(s.get("rigl_amortised_ratio_optimizer_only_estimate")),
      ]


def _bytes_row(model: str, arm: str, row: dict) -> list:
  sp = row.get("realised_sparsity")
  return [
      model,
      arm,
      f"{row['params']:,}",
      f"{row['opt_state_bytes_per_weight']:.3f}",
      _f3(row.get("mask_bytes_per_sparse_weight")),
      _f3(row.get("exploration_bytes_per_sparse_weight")),
      row.get("sparse_weights", "-"),
      "-" if sp is None else f"{sp:.4f}",
  ]


def _compile_row(model: str, arm: str, row: dict) -> list:
  oh = row.get("optimizer_only_hlo") or {}
  variant = {None: "in-graph cond", False: "ordinary", True: "mask update"}
  return [
      model,
      arm,
      variant[row.get("mask_update")],
      f"{row['compile_s']:.2f}",
      _f3(row.get("compile_ratio_to_dense")),
      row["step_hlo"]["hlo_lines"],
      row["step_hlo"]["conditionals"],
      oh.get("hlo_lines", "-"),
      oh.get("fusions", "-"),
      row["opt_state_leaves"],
      _f3(row.get("optimizer_only_ratio_to_dense")),
  ]


def _init_rows(results: dict):
  """Eager ``model.init`` against eager ``tx.init``, per model that measured them."""
  for model, res in results["models"].items():
    if i := res.get("init"):
      yield [
          model,
          f"{i['model_init_eager_s']:.2f}",
          f"{i['tx_init_eager_s']:.3f}",
          f"{i['tx_init_over_model_init']:.3f}",
      ]


def markdown(results: dict) -> str:
  arm_rows = list(_arm_rows(results))
  tables = (  # (header, alignment, rows)
      (
          (
              "| model | arm | step | median ms | min ms | x dense SGD (ratio"
              " of medians) | x dense SGD (paired) | x dense SGD (CPU time,"
              " paired) | optimizer-only ms | optimizer-only extra ms | x dense"
              " SGD (optimizer-only est.) |"
          ),
          "lllrrrrrrrr",
          _time_rows(results),
      ),
      (
          (
              "| model | arm | params | opt-state bytes / weight | mask bytes /"
              " sparse weight | exploration bytes / sparse weight | sparse"
              " weights | realised sparsity |"
          ),
          "llrrrrrr",
          [_bytes_row(*r) for r in arm_rows],
      ),
      (
          (
              "| model | arm | variant | compile s | x dense | step HLO lines |"
              " conditionals | optimizer-only HLO lines | optimizer-only"
              " fusions | opt-state leaves | optimizer-only x dense (paired) |"
          ),
          "lllrrrrrrrr",
          [_compile_row(*r) for r in arm_rows],
      ),
      (
          (
              "| model | eager model.init s | eager tx.init s (RigL 90% ERK) |"
              " ratio |"
          ),
          "lrrr",
          _init_rows(results),
      ),
  )
  lines = []
  for head, align, rows in tables:
    lines += [*common.markdown_table(head, rows, align), ""]
  lines += [
      (
          "Paired ratio: median over rounds of (arm step / dense step in the"
          " same round). Optimizer-only: tx.update + apply alone on fixed"
          " grads; its extra time over dense SGD's, divided by the dense full"
          " step, gives the estimate."
      ),
      "",
      (
          f"Bars (on the paired ratios): ordinary <= {BAR_ORDINARY}x, amortised"
          f" (Delta-T={DELTA_T}) <= {BAR_AMORTISED}x, masks <= {BAR_MASK_BYTES}"
          " byte per sparse weight."
      ),
  ]
  for model, res in results["models"].items():
    m = res.get("machine") or results["machine"]
    load = m.get("loadavg_1_5_15")
    lines.append(
        f"- {model}: measured {m['date']} on"
        f" {m.get('cpu_model', m['processor'])} ({m['cpus_usable']} CPUs,"
        f" {m['backend']}), load average"
        f" {'-' if load is None else '/'.join(f'{x:.1f}' for x in load)},"
        f" {res['rounds']} rounds; `{res.get('command') or results['command']}`"
    )
  for model, res in results["models"].items():
    s = res["summary"]
    if s:

      def worst(suffix, kind, s=s):
        vals = [v for k, v in s.items() if k.endswith(f"_{kind}_{suffix}")]
        return "-" if not vals else f"{max(vals):.3f}"

      context = lambda kind: (
          f"wall paired {worst('ratio_paired', kind)}, CPU-time paired "
          f"{worst('cpu_ratio_paired', kind)}, optimizer-only est. "
          f"{worst('ratio_optimizer_only_estimate', kind)}"
      )
      lines.append(
          f"- {model}: ordinary {'PASS' if s.get('pass_ordinary') else 'FAIL'}"
          f" ({context('ordinary')}); amortised"
          f" {'PASS' if s.get('pass_amortised') else 'FAIL'}"
          f" ({context('amortised')}); mask bytes"
          f" {'PASS' if s.get('pass_mask_bytes') else 'FAIL'}; tx.init <="
          f" {BAR_INIT}x model.init {'PASS' if s.get('pass_init') else 'FAIL'}"
          f" ({_f3(s.get('tx_init_over_model_init'))}); compile <="
          f" {BAR_COMPILE}x {'PASS' if s.get('pass_compile') else 'FAIL'}"
          f" (ordinary {_f3(s.get('compile_ratio_ordinary'))}, update variant"
          f" {_f3(s.get('compile_ratio_update_variant'))}, compiled in the"
          " background by the training loop); optimizer only <="
          f" {BAR_OPTIMIZER_ONLY}x"
          f" {'PASS' if s.get('pass_optimizer_only') else 'FAIL'}"
          f" ({_f3(s.get('optimizer_only_ratio'))})"
      )
  return "\n".join(lines)


def plot(results: dict, path: str) -> str:
  names = list(results["models"])
  fig, axes = common.panel_grid(2, len(names), 5.5, 3.75)
  for j, model in enumerate(names):
    res = results["models"][model]
    arms = list(res["arms"])
    ms = [res["arms"][a]["median_s"] * 1e3 for a in arms]
    ax = axes[0, j]
    ax.bar(range(len(arms)), ms, color="tab:blue")
    ax.set_xticks(range(len(arms)), arms, rotation=20)
    ax.set_ylabel("median step time (ms)")
    ax.set_title(
        f"{model} (batch {res['spec']['batch_size']}, "
        f"{'x'.join(map(str, res['spec']['image_shape']))})"
    )
    for i, v in enumerate(ms):
      ax.text(i, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
    s = res["summary"]
    labels, ratios = [], []
    for key, label in (
        ("static_ordinary_ratio_paired", "static\nordinary"),
        ("rigl_ordinary_ratio_paired", "rigl\nordinary"),
        ("rigl_amortised_ratio_paired", f"rigl amortised\nDelta-T={DELTA_T}"),
        ("rigl_update_ratio_paired", "rigl\nmask update"),
    ):
      if key in s:
        labels.append(label)
        ratios.append(s[key])
    ax = axes[1, j]
    colors = [
        "tab:green"
        if r <= (BAR_AMORTISED if "amortised" in lab else BAR_ORDINARY)
        else "tab:red"
        for lab, r in zip(labels, ratios)
    ]
    colors = [
        c if "update" not in lab else "tab:gray"
        for c, lab in zip(colors, labels)
    ]
    ax.bar(range(len(ratios)), ratios, color=colors)
    ax.set_xticks(range(len(ratios)), labels, fontsize=8)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(
        BAR_ORDINARY,
        color="tab:orange",
        ls="--",
        lw=1,
        label=f"{BAR_ORDINARY}x",
    )
    ax.axhline(
        BAR_AMORTISED, color="tab:red", ls=":", lw=1, label=f"{BAR_AMORTISED}x"
    )
    ax.set_ylabel("step time / dense SGD step (paired median)")
    if ratios:
      ax.set_ylim(
          min(ratios + [0.95]) - 0.05, max(ratios + [BAR_AMORTISED]) + 0.05
      )
    ax.legend(fontsize=8, loc="lower right")
    for i, v in enumerate(ratios):
      ax.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
  m = results["machine"]
  fig.suptitle(
      "SparseOpt train-step cost vs plain SGD (medians, interleaved)\n"
      f"{m.get('cpu_model', m['processor'])}, {m['cpus_usable']} CPUs, "
      f"jax {m['jax']} {m['backend']}, {m['date'][:10]}",
      fontsize=9,
  )
  return common.save_figure(fig, path)


# ---------------------------------------------------------------------------
# Command line


def parse_args(argv):
  p = common.make_parser(
      __doc__, "step_cost", smoke="tiny widths and batches, 3 rounds"
  )
  p.add_argument(
      "--models",
      nargs="+",
      choices=sorted(MODELS),
      default=None,
      help="default: resnet20 resnet50 (resnet20 with --smoke)",
  )
  p.add_argument(
      "--rounds",
      type=int,
      default=None,
      help=(
          "timed rounds (one step of every arm each); default 15, 3 with"
          " --smoke"
      ),
  )
  p.add_argument(
      "--rounds-resnet50",
      type=int,
      default=None,
      help=(
          "rounds for resnet50 only (its steps take seconds on a CPU);"
          " default 5"
      ),
  )
  p.add_argument(
      "--warmup", type=int, default=None, help="untimed rounds after compiling"
  )
  p.add_argument(
      "--opt-rounds",
      type=int,
      default=None,
      help=(
          "rounds of the optimizer-only decomposition (0: skip); default 30, "
          "0 with --smoke (it compiles every arm a second time)"
      ),
  )
  p.add_argument(
      "--arms", nargs="+", choices=sorted(ALL_ARMS), default=list(ARMS)
  )
  p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  p.add_argument(
      "--merge",
      action="store_true",
      help=(
          "keep the other models already in the output JSON (run models"
          " separately)"
      ),
  )
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
  args = parse_args(argv)  # argparse reads sys.argv for None
  specs = SMOKE if args.smoke else MODELS
  common.fill_defaults(
      args,
      models=(["resnet20", "resnet50"], ["resnet20"]),
      rounds=(15, 3),
      warmup=(2, 1),
      opt_rounds=(30, 0),
  )
  model_names, rounds, warmup = args.models, args.rounds, args.warmup
  arm_names = list(dict.fromkeys(args.arms))
  if "dense_sgd" not in arm_names:
    arm_names.insert(0, "dense_sgd")

  results = {
      "machine": common.machine_info(),
      "smoke": args.smoke,
      "delta_t": DELTA_T,
      "bars": {
          "ordinary": BAR_ORDINARY,
          "amortised": BAR_AMORTISED,
          "mask_bytes_per_weight": BAR_MASK_BYTES,
      },
      "command": common.command("step_cost", argv),
      "models": {},
  }
  t0 = time.perf_counter()
  for name in model_names:
    r = rounds
    if name == "resnet50" and not args.smoke:
      r = args.rounds_resnet50 or min(rounds, 5)
    common.log(f"== {name}: {r} rounds, arms {arm_names}")
    t_model = time.perf_counter()
    res = bench_model(
        name,
        specs[name],
        arm_names,
        r,
        warmup,
        args.dtype,
        opt_rounds=args.opt_rounds,
        log=common.log,
    )
    res["wall_s"] = time.perf_counter() - t_model
    res["machine"], res["command"] = common.machine_info(), results["command"]
    results["models"][name] = res
  results["wall_s"] = time.perf_counter() - t0
  common.record_end_load(results["machine"])

  json_path = os.path.join(args.out, f"step_cost{args.tag}.json")
  if args.merge and os.path.exists(json_path):
    # Keep the other models of an earlier run (each with its own machine, date and command).
    with open(json_path) as f:
      old = json.load(f)
    kept = {}
    if bool(old.get("smoke")) != args.smoke:
      print(
          f"not merging {json_path}: it holds a"
          f" {'smoke' if old.get('smoke') else 'full'} run"
      )
      old = {}
    for name, res in old.get("models", {}).items():
      if name not in results["models"]:
        res.setdefault("machine", old.get("machine"))
        res.setdefault("command", old.get("command"))
        kept[name] = res
    results["models"] = {**kept, **results["models"]}
  common.write_json(results, json_path, indent=2)
  png_path = plot(results, os.path.join(args.out, f"step_cost{args.tag}.png"))
  print(markdown(results))
  print(f"\nwrote {json_path} and {png_path}")
  return results


if __name__ == "__main__":
  main()
