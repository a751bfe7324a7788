"""Scaling of the SparseOpt train step: data parallel over 1, 2, 4 and 8 devices, and
8 devices with the kernels' output axes sharded over a 'model' axis too.

    python benchmarks/scaling.py                                 # 1/2/4/8 devices and 2x4, 32 per device
    python benchmarks/scaling.py --devices 1 2 --per-device-batch 64
    python benchmarks/scaling.py --smoke --out /tmp/scaling      # tiny, < 1 minute

What is timed is the training program's own jitted step
(``train.jit_steps(setup, train.make_mesh(n))``: ResNet-20 on Fashion-MNIST,
``chain(sparseopt(rigl, skew='density'), add_decayed_weights, sgd)``, batch
sharded on the mesh's ``'data'`` axis, state replicated and donated, BatchNorm
over the global batch, mask updates host-scheduled as in the training loop) at a
fixed per-device batch, so the global batch is
``n * --per-device-batch``. Each step is timed on its own: the batch is built
and sharded (``train.shard_batch``) before the clock starts, and the clock stops
at ``jax.block_until_ready`` of the new state. After ``--warmup`` untimed steps
(the first compiles), ``--rounds`` steps are timed; steps/s is 1 / the median
time of the ordinary steps, images/s = global batch x steps/s. Mask updates run
every ``--update-every`` steps (so the agreement check below covers them); their
median time is reported separately and does not enter the median of the
ordinary steps.

Model parallel (``--model-parallel M``): the largest device count as a (n/M data,
M model) mesh; every conv and dense kernel whose output axis divides by M is
sharded on it (``train.param_spec``), and its masks, moments and density factors
with it (``train.state_shardings``, ``so.state_shardings``); the global batch is
the same as the data-parallel row of that count.

Agreement: for every n > 1, the params, BatchNorm statistics and masks after
each of the first ``--check-steps`` steps on n devices are compared with a
one-device run of the same steps on the same global batches from the same
initial state: max abs difference and ``allclose(rtol=1e-4, atol=1e-5)`` over
every leaf (``agreement`` in the JSON: that check after the first step, for
every n), and the difference relative to the step's own update (largest per-leaf
||params_n - params_1|| / ||params_1 - params before the step||;
``sharding_consistent``: below 0.1 after the first step; rounding gives
< 0.02, per-shard instead of global BatchNorm statistics > 1). Float32 reductions
over a sharded batch add in another order, and this ReLU network amplifies
rounding differences fast (a ReLU input that changes sign moves a weight
gradient by ~1/sqrt(positions)), so after a few steps the runs differ by far
more than 1e-4. To show that this is rounding and not a sharding error, each
step is also compared against a noise floor: the one-device run started from
params one float32 ulp away from the same initial state.

Devices: on a CPU backend, ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
is set at the top of this script unless ``XLA_FLAGS`` already sets a device
count (it must be set before JAX starts, so it has no effect when JAX was
imported earlier, as in the tests, whose conftest sets it itself). Simulated
CPU devices share the machine's cores, so their throughput cannot scale; on a
machine with several accelerators the real devices are used. Counts above the
number of devices are skipped.

Writes ``<out>/scaling<tag>.json`` (machine, date, config, per-count times and
agreement) and ``<out>/scaling<tag>.png``, and prints a markdown table.
"""

from __future__ import annotations

import os

# Must precede the first import of jax (directly or through sparseopt_jax).
if "xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""
):
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "")
      + " --xla_force_host_platform_device_count=8"
  ).strip()

import dataclasses
import statistics
import sys
import time

import jax
import numpy as np

import sparseopt_jax as so
from sparseopt_jax.training import presets, train

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/ is not a package)

PRESET = "fashion_mnist_resnet20"
RTOL, ATOL = 1e-4, 1e-5
# First step, largest per-leaf ||params_N - params_1|| / ||update_1||. Measured on ResNet-20 /
# Fashion-MNIST, 32 images per device: float rounding gives 4e-5..3e-4 (a 1-ulp perturbation of
# the initial params up to 2e-2), per-shard instead of global BatchNorm statistics 1.3..2.1.
UPDATE_REL_TOL = 0.1
SCHEDULE_STEPS = (
    10_000  # the run the schedules (lr, drop fraction, end_step) are built for
)


# ---------------------------------------------------------------------------
# Runs


def snapshot_host(state: train.TrainState) -> dict:
  return {"params": state.params, "batch_stats": state.batch_stats}


def snapshot(state: train.TrainState) -> dict:
  """Host copies of what the agreement check compares."""
  masks = so.get_masks(state.opt_state)
  return jax.device_get(
      {"params": state.params, "batch_stats": state.batch_stats, "masks": masks}
  )


def _by_path(tree) -> dict[str, np.ndarray]:
  return {p: np.asarray(x, np.float64) for p, x in common.by_path(tree).items()}


def compare(a: dict, b: dict, before: dict | None = None) -> dict:
  """``a`` against the reference ``b``: max abs differences, entries outside rtol/atol and
  allclose of params / batch_stats, differing mask entries, and (given the reference's state
  ``before`` the step) the largest per-leaf ||a - b|| / ||b - before|| of the params: the
  difference relative to the step's own update."""
  out = {}
  close = True
  for key in ("params", "batch_stats"):
    la, lb = _by_path(a[key]), _by_path(b[key])
    assert la.keys() == lb.keys()
    diffs = {
        k: float(np.max(np.abs(la[k] - lb[k]))) if la[k].size else 0.0
        for k in lb
    }
    over = {
        k: int(np.sum(np.abs(la[k] - lb[k]) > ATOL + RTOL * np.abs(lb[k])))
        for k in lb
    }
    worst = max(diffs, key=diffs.get)
    out[f"{key}_max_abs_diff"] = diffs[worst]
    out[f"{key}_worst_leaf"] = worst
    out[f"{key}_entries_outside_tolerance"] = sum(over.values())
    out[f"{key}_allclose"] = not any(over.values())
    close &= out[f"{key}_allclose"]
  if before is not None:
    la, lb, l0 = (
        _by_path(a["params"]),
        _by_path(b["params"]),
        _by_path(before["params"]),
    )
    rel = {
        k: float(np.linalg.norm(la[k] - lb[k]) / np.linalg.norm(lb[k] - l0[k]))
        for k in lb
        if np.linalg.norm(lb[k] - l0[k]) > 0
    }
    out["params_update_rel_diff"] = max(rel.values())
    out["params_update_rel_diff_leaf"] = max(rel, key=rel.get)
  ma = [m for m in jax.tree.leaves(a["masks"]) if m is not None]
  mb = [m for m in jax.tree.leaves(b["masks"]) if m is not None]
  out["mask_entries_differing"] = int(
      sum(int(np.sum(x != y)) for x, y in zip(ma, mb, strict=True))
  )
  out["allclose"] = bool(close)
  return out


class Layout:
  """A mesh of ``devices`` devices, ``model_parallel`` of them on the 'model' axis, and the
  training program's steps and state shardings on it."""

  def __init__(
      self,
      setup: train.Setup,
      host_state: train.TrainState,
      devices: int,
      model_parallel: int = 1,
  ):
    self.setup, self.devices, self.model_parallel = (
        setup,
        devices,
        model_parallel,
    )
    self.mesh = train.make_mesh(devices, model_parallel)
    self.shardings = train.state_shardings(setup, self.mesh, host_state)
    self.step = train.HostScheduledStep(
        train.jit_steps(setup, self.mesh, self.shardings)[0]
    )

  @property
  def name(self) -> str:
    return (
        str(self.devices)
        if self.model_parallel == 1
        else (
            f"{self.devices} ({self.devices // self.model_parallel} data x "
            f"{self.model_parallel} model)"
        )
    )


def is_mask_update(setup: train.Setup, i: int) -> bool:
  """Whether the i-th call (1-based) of the train step updates the masks."""
  return setup.is_mask_update(i - 1)


def _new_state(step, state, batch, flag):
  """The state after ``step``: the clock stops when it is ready, not the metrics."""
  return step(state, batch, flag)[0]


def run_steps(
    layout: Layout,
    host_state,
    dataset,
    global_batch: int,
    seed: int,
    n_steps: int,
    snap_steps: int = 0,
    log=None,
) -> tuple[list[float], list[dict]]:
  """``n_steps`` steps from ``host_state``, as the training loop runs them (host-scheduled
  mask updates): per-step seconds, and snapshots after each of the first ``snap_steps``.
  """
  mesh = layout.mesh
  state = jax.device_put(host_state, layout.shardings)
  stream = dataset.train_batches(global_batch // jax.process_count(), seed=seed)
  times, snaps = [], []
  for i in range(1, n_steps + 1):
    batch = jax.block_until_ready(train.shard_batch(next(stream), mesh))
    flag = is_mask_update(layout.setup, i)
    state, seconds, _ = common.timed(
        _new_state, layout.step, state, batch, flag
    )
    times.append(seconds)
    if i <= snap_steps:
      snaps.append(snapshot(state))
    if log and i == 1:
      log(f"    first step (compiles): {times[0]:.1f} s")
  return times, snaps


def flip_last_bit(host_state: train.TrainState, seed: int) -> train.TrainState:
  """The state with every nonzero param moved by one float32 ulp, up or down at random:
  the rounding-level perturbation the noise floor of the agreement check starts from.
  """
  rng = np.random.default_rng(seed)

  def flip(x):
    x = np.asarray(x)
    if x.dtype != np.float32:
      return x
    bits = x.view(np.int32) + rng.choice(
        np.array([-1, 1], np.int32), size=x.shape
    )
    return np.where(x != 0, bits.view(np.float32), x)

  return host_state.replace(params=jax.tree.map(flip, host_state.params))


# ---------------------------------------------------------------------------
# Reporting


def markdown(results: dict) -> str:
  a = results["args"]
  lines = [
      (
          "| devices | global batch | step ms (median) | steps/s | images/s | x"
          " first row | mask-update step ms | first step (compile) s |"
      ),
      "|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in results["rows"]:
    mu = r["mask_update_step_s_median"]
    lines.append(
        f"| {r.get('layout', r['devices'])} | {r['global_batch']} |"
        f" {1e3 * r['step_s_median']:.1f} | {r['steps_per_s']:.2f} |"
        f" {r['images_per_s']:.0f} | {r['speedup_images_per_s']:.2f} |"
        f" {'-' if mu is None else f'{1e3 * mu:.1f}'} | {r['compile_s']:.1f} |"
    )
  lines += [
      "",
      *[f"- {n}" for n in results["notes"]],
      (
          f"- Per-device batch {a['per_device_batch']}; median over the"
          f" ordinary steps among {a['rounds']} timed steps after {a['warmup']}"
          f" warm-up steps; mask updates every {a['update_every']} steps, timed"
          " apart; the batch is built and sharded before the clock starts."
      ),
  ]
  checked = [r for r in results["rows"] if r.get("agreement")]
  if checked:
    lines += [
        "",
        (
            "Agreement with 1 device on the same global batches. allclose:"
            f" rtol {RTOL:g}, atol {ATOL:g} over every param and BatchNorm"
            " statistic (entries outside it, worst leaf); update rel: largest"
            " per-leaf ||params_N - params_1|| / ||the 1-device step's"
            " update||; floor: the 1-device run from params 1 float32 ulp"
            " away, against the 1-device run."
        ),
        "",
        (
            "| devices | step | params max abs diff | BN stats max abs diff |"
            " outside tol. (worst leaf) | allclose | update rel | masks differ"
            " | floor: params | floor: BN stats | floor: update rel | floor:"
            " masks differ |"
        ),
        "|---:|---:|---:|---:|---|:---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in checked:
      for st in r["agreement"]["per_step"]:
        outside = (
            st["params_entries_outside_tolerance"]
            + st["batch_stats_entries_outside_tolerance"]
        )
        worst = (
            st["params_worst_leaf"]
            if st["params_max_abs_diff"] >= st["batch_stats_max_abs_diff"]
            else st["batch_stats_worst_leaf"]
        )
        lines.append(
            f"| {r.get('layout', r['devices'])} |"
            f" {st['step']}{' (mask update)' if st['mask_update'] else ''} |"
            f" {st['params_max_abs_diff']:.2e} |"
            f" {st['batch_stats_max_abs_diff']:.2e} | {outside}"
            f" ({worst.removesuffix('/kernel')}) |"
            f" {'yes' if st['allclose'] else 'no'} |"
            f" {st['params_update_rel_diff']:.1e} |"
            f" {st['mask_entries_differing']} |"
            f" {st['floor_params_max_abs_diff']:.2e} |"
            f" {st['floor_batch_stats_max_abs_diff']:.2e} |"
            f" {st['floor_params_update_rel_diff']:.1e} |"
            f" {st['floor_mask_entries_differing']} |"
        )
  return "\n".join(lines)


def plot(results: dict, path: str) -> str:
  plt = common.pyplot()
  import matplotlib.ticker

  rows = [r for r in results["rows"] if r.get("model_parallel", 1) == 1]
  n = [r["devices"] for r in rows]
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
  ax1.plot(
      n,
      [r["images_per_s"] for r in rows],
      marker="o",
      label="measured (data parallel)",
  )
  for r in results["rows"]:
    if r.get("model_parallel", 1) > 1:
      ax1.plot(
          [r["devices"]],
          [r["images_per_s"]],
          marker="x",
          ls="",
          markersize=9,
          label=r["layout"],
      )
  base = rows[0]["images_per_s"] / rows[0]["devices"]
  ax1.plot(
      n,
      [base * k for k in n],
      ls="--",
      color="grey",
      label="linear from the first",
  )
  ax1.set_xscale("log", base=2)
  ax1.set_xticks(n, [str(k) for k in n])
  ax1.set_xlabel("devices")
  ax1.set_ylabel("images / s (ordinary steps)")
  ax1.set_title(
      f"{results['machine']['backend']}, {results['args']['per_device_batch']} "
      "images per device",
      fontsize=10,
  )
  ax1.grid(alpha=0.3)
  ax1.legend(fontsize=8)
  checked = [r for r in results["rows"] if r.get("agreement")]
  for i, r in enumerate(checked):
    per = r["agreement"]["per_step"]
    steps = [st["step"] for st in per]
    colour = f"C{i}"
    ax2.plot(
        steps,
        [max(st["params_max_abs_diff"], 1e-12) for st in per],
        marker="o",
        color=colour,
        label=f"{r.get('layout', r['devices'])} devices vs 1",
    )
    ax2.plot(
        steps,
        [max(st["floor_params_max_abs_diff"], 1e-12) for st in per],
        ls=":",
        marker=".",
        color=colour,
        label=f"1 device, params 1 ulp off (batch {r['global_batch']})",
    )
  if checked:
    for st in checked[0]["agreement"]["per_step"]:
      if st["mask_update"]:
        ax2.axvline(st["step"], color="grey", lw=0.6, ls="--")
    ax2.axhline(ATOL, color="black", lw=0.6, label=f"atol {ATOL:g}")
    ax2.set_yscale("log")
    ax2.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax2.legend(fontsize=6)
  ax2.set_xlabel("step (dashed: mask update)")
  ax2.set_ylabel("params: max abs difference to the 1-device run")
  ax2.set_title(
      "agreement with 1 device on the same global batches", fontsize=10
  )
  ax2.grid(alpha=0.3)
  return common.save_figure(fig, path)


# ---------------------------------------------------------------------------
# Main


def parse_args(argv):
  p = common.make_parser(
      __doc__, "scaling", smoke="1 and 2 devices, batch 2 each, 3 steps"
  )
  p.add_argument(
      "--devices",
      type=int,
      nargs="+",
      default=None,
      help="device counts (default 1 2 4 8; smoke 1 2)",
  )
  p.add_argument(
      "--model-parallel",
      type=int,
      nargs="*",
      default=None,
      help=(
          "also run the largest device count with this many devices on the "
          "'model' axis (kernels' output axes sharded); default 4, smoke none"
      ),
  )
  p.add_argument(
      "--per-device-batch", type=int, default=None, help="default 32; smoke 2"
  )
  p.add_argument(
      "--rounds",
      type=int,
      default=None,
      help="timed steps (default 20; smoke 2)",
  )
  p.add_argument(
      "--warmup",
      type=int,
      default=None,
      help="untimed steps (default 2; smoke 1)",
  )
  p.add_argument(
      "--check-steps",
      type=int,
      default=None,
      help="steps before the agreement check (default 6; smoke 3)",
  )
  p.add_argument(
      "--update-every",
      type=int,
      default=None,
      help="Delta-T of the timed runs (default 5; smoke 2)",
  )
  common.add_sparse_options(p, skew="density", skew_modes=common.BN_SKEW_MODES)
  common.add_seed_and_data(p)
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
  args = parse_args(argv)  # argparse reads sys.argv for None
  smoke = args.smoke
  common.fill_defaults(
      args,
      devices=([1, 2, 4, 8], [1, 2]),
      model_parallel=([4], []),
      per_device_batch=(32, 2),
      rounds=(20, 2),
      warmup=(2, 1),
      check_steps=(6, 3),
      update_every=(5, 2),
  )

  available = len(jax.devices())
  counts = sorted(set(args.devices))
  skipped = [n for n in counts if n > available]
  counts = [n for n in counts if n <= available]
  if not counts:
    raise SystemExit(
        f"none of the device counts {args.devices} fits the {available} devices"
    )

  cfg = presets.get_preset(
      PRESET,
      steps=SCHEDULE_STEPS,
      batch_size=args.per_device_batch * max(counts),
      update_every=args.update_every,
      skew=common.skew_value(args.skew),
      topology=args.topology,
      seed=args.seed,
      data_dir=args.data_dir,
      train_subset=4096 if smoke else None,
  )
  machine = common.machine_info()  # load average and date at the start
  t_start = time.perf_counter()
  dataset, setup = common.data_and_setup(cfg)
  end_step = setup.end_step
  host_init = jax.device_get(
      train.create_train_state(setup, dataset.info.image_shape)
  )
  n_steps = max(args.warmup + args.rounds, args.check_steps)

  # Data parallelism over each count, then the largest count with its kernels' output
  # axes sharded over a 'model' axis too (params, masks, moments and density factors).
  layouts = [(n, 1) for n in counts] + [
      (counts[-1], m)
      for m in args.model_parallel
      if 1 < m < counts[-1] and counts[-1] % m == 0
  ]
  rows, snaps, layout_of = [], {}, {}
  for n, m in layouts:
    layout = Layout(setup, host_init, n, m)
    global_batch = args.per_device_batch * n
    train.check_batch_size(global_batch, layout.mesh)
    layout_of[n, m] = layout
    common.log(
        f"== {layout.name} device(s), global batch {global_batch}: {n_steps}"
        " steps"
    )
    times, snaps[n, m] = run_steps(
        layout,
        host_init,
        dataset,
        global_batch,
        cfg.seed,
        n_steps,
        snap_steps=args.check_steps,
        log=common.log,
    )
    timed = list(enumerate(times, start=1))[args.warmup :]
    ordinary = [t for i, t in timed if not is_mask_update(setup, i)]
    updates = [t for i, t in timed if is_mask_update(setup, i)]
    median = statistics.median(ordinary)
    rows.append({
        "devices": n,
        "model_parallel": m,
        "layout": layout.name,
        "global_batch": global_batch,
        "compile_s": times[0],
        "step_s_median": median,
        "step_s_min": min(ordinary),
        "step_s_quartiles": (
            list(np.percentile(ordinary, [25, 75])) if ordinary else None
        ),
        "steps_per_s": 1.0 / median,
        "images_per_s": global_batch / median,
        "mask_update_step_s_median": (
            statistics.median(updates) if updates else None
        ),
        "images_per_s_incl_mask_updates": (
            global_batch * len(timed) / sum(t for _, t in timed)
        ),
        "ordinary_steps_timed": len(ordinary),
        "mask_update_steps_timed": len(updates),
        "step_times_s": times,
    })
    common.log(
        f"    {1e3 * median:.1f} ms/step, {global_batch / median:.0f} images/s"
    )

  # Agreement: each n > 1 against one device on the same global batches, next to the noise
  # floor: the same one-device run started from params one float32 ulp away.
  ref = layout_of.get((1, 1)) or Layout(setup, host_init, 1)
  host_flipped = flip_last_bit(host_init, cfg.seed + 1)
  for row in rows:
    n, m = row["devices"], row["model_parallel"]
    if n == 1:
      row["agreement"] = None
      continue
    common.log(
        f"== reference: 1 device, global batch {row['global_batch']},"
        f" {args.check_steps} steps (and the same from params 1 ulp away)"
    )
    _, ref_snaps = run_steps(
        ref,
        host_init,
        dataset,
        row["global_batch"],
        cfg.seed,
        args.check_steps,
        snap_steps=args.check_steps,
        log=common.log,
    )
    _, floor = run_steps(
        ref,
        host_flipped,
        dataset,
        row["global_batch"],
        cfg.seed,
        args.check_steps,
        snap_steps=args.check_steps,
    )
    per_step = []
    init = snapshot_host(host_init)
    for k in range(args.check_steps):
      before = init if k == 0 else ref_snaps[k - 1]
      c = compare(snaps[n, m][k], ref_snaps[k], before)
      f = compare(floor[k], ref_snaps[k], before)
      per_step.append({
          "step": k + 1,
          "mask_update": is_mask_update(setup, k + 1),
          **c,
          "floor_params_max_abs_diff": f["params_max_abs_diff"],
          "floor_batch_stats_max_abs_diff": f["batch_stats_max_abs_diff"],
          "floor_mask_entries_differing": f["mask_entries_differing"],
          "floor_params_update_rel_diff": f["params_update_rel_diff"],
          "floor_allclose": f["allclose"],
      })
    row["agreement"] = {
        "first_step": per_step[0],
        "final": per_step[-1],
        "per_step": per_step,
    }
    for st in (per_step[0], per_step[-1]):
      common.log(
          f"    step {st['step']}: params {st['params_max_abs_diff']:.2e}"
          f" (1-ulp floor {st['floor_params_max_abs_diff']:.2e}; worst leaf"
          f" {st['params_worst_leaf']},"
          f" {st['params_entries_outside_tolerance']} entries outside"
          f" tolerance), BN stats {st['batch_stats_max_abs_diff']:.2e}, masks"
          f" differ {st['mask_entries_differing']}, update rel diff"
          f" {st['params_update_rel_diff']:.1e}, allclose {st['allclose']}"
      )

  base = rows[0]
  for row in rows:
    row["speedup_images_per_s"] = row["images_per_s"] / base["images_per_s"]
    row["efficiency"] = (
        row["speedup_images_per_s"] * base["devices"] / row["devices"]
    )
  checked = [r["agreement"] for r in rows if r["agreement"] is not None]
  notes = []
  if machine["backend"] == "cpu":
    notes.append(
        f"CPU backend: the {available} devices are simulated"
        " (--xla_force_host_platform_device_count) and share"
        f" {machine['cpus_usable'] or machine['cpu_count']} CPU cores, so"
        " throughput cannot scale with the device count; the numbers measure"
        " the harness and the sharding overhead, not parallel speed-up."
    )
  if skipped:
    notes.append(f"Skipped device counts {skipped}: only {available} devices.")
  if not checked:
    notes.append("No agreement check: fewer than two device counts ran.")
  results = {
      **common.results_header("scaling", argv, args, machine),
      "preset": PRESET,
      "config": dataclasses.asdict(cfg),
      "end_step": end_step,
      "tolerance": {"rtol": RTOL, "atol": ATOL},
      "device_counts": counts,
      "skipped_device_counts": skipped,
      "rows": rows,
      # The strict check: after one step, every n agrees with one device at rtol/atol.
      "agreement": (
          all(a["first_step"]["allclose"] for a in checked) if checked else None
      ),
      "agreement_after_check_steps": (
          all(a["final"]["allclose"] for a in checked) if checked else None
      ),
      # Sharding is consistent when one step differs from one device by a small fraction of
      # the step's own update (see UPDATE_REL_TOL).
      "first_step_update_rel_diff": max(
          (a["first_step"]["params_update_rel_diff"] for a in checked),
          default=None,
      ),
      "sharding_consistent": (
          all(
              a["first_step"]["params_update_rel_diff"] < UPDATE_REL_TOL
              for a in checked
          )
          if checked
          else None
      ),
      "update_rel_tol": UPDATE_REL_TOL,
      "floor_first_step_update_rel_diff": max(
          (a["first_step"]["floor_params_update_rel_diff"] for a in checked),
          default=None,
      ),
      "max_abs_diff": {
          when: {
              pre
              + key: max(
                  (a[when][f"{pre}{key}_max_abs_diff"] for a in checked),
                  default=None,
              )
              for pre, key in (
                  ("", "params"),
                  ("", "batch_stats"),
                  ("floor_", "params"),
                  ("floor_", "batch_stats"),
              )
          }
          for when in ("first_step", "final")
      },
      "notes": notes,
  }
  json_path, png_path = common.save_results(
      results, args.out, f"scaling{args.tag}", plot, t_start
  )
  print(markdown(results))
  if checked:
    d = results["max_abs_diff"]
    print(
        f"\nagreement with 1 device after 1 step: {results['agreement']} (max"
        f" abs diff params {d['first_step']['params']:.2e}, BN stats"
        f" {d['first_step']['batch_stats']:.2e}); after {args.check_steps}"
        f" steps: {results['agreement_after_check_steps']} (params"
        f" {d['final']['params']:.2e}, BN stats"
        f" {d['final']['batch_stats']:.2e}; 1-ulp noise floor params"
        f" {d['final']['floor_params']:.2e}, BN stats"
        f" {d['final']['floor_batch_stats']:.2e})"
    )
    print(
        "first step, difference relative to the step's update (largest leaf): "
        f"{results['first_step_update_rel_diff']:.1e}; sharding consistent "
        f"(< {UPDATE_REL_TOL:g}): {results['sharding_consistent']}"
    )
  print(f"wrote {json_path} and {png_path} in {results['wall_s']:.0f} s")
  return results


if __name__ == "__main__":
  main()
