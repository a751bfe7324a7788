"""Per-layer gradient skew of a sparse ResNet-20 on Fashion-MNIST, at init and after RigL.

    python benchmarks/skew.py                                # 300 RigL steps, uncorrected baseline
    python benchmarks/skew.py --skew density --tag _density  # train with SparseOpt instead
    python benchmarks/skew.py --smoke --out /tmp/skew        # tiny, < 1 minute

The skew slope of a sparse layer (``so.skew_slope``) is the least-squares slope
of log(rms gradient per surviving weight of neuron i) on log(d_i) over the
layer's neurons (SparseOpt sec. 3): about -0.5 when BatchNorm follows a sparse
layer, 0 when nothing skews the gradient.

Set-up: ``presets.get_preset('fashion_mnist_resnet20')`` (ResNet-20, 90% ERK,
RigL every 25 steps, momentum SGD, batch 128) with ``skew=None`` (the
uncorrected baseline; ``--skew`` to train with a correction), built with the
training program's own ``train.make_setup`` / ``create_train_state`` /
``jit_steps`` / ``shard_batch`` and ``input_lib.load``. The slopes are measured at
initialisation and after ``--steps`` training steps, on the same
``--probe-batches`` training batches (a stream seeded apart from the training
one), for

* the raw gradient of the loss (train-mode BatchNorm, as in a train step), and
* the corrected gradient: the run's own correction applied to it with the
  masks (and, for ``--skew bn``, the BatchNorm statistics) of that moment, or
  for the uncorrected baseline the density rule as a what-if;

each slope is the mean over the probe batches (std in the JSON). The mean slope
over the sparse layers is also traced every ``--trace-every`` steps on the first
probe batch, to show what the mask updates do to it.

Note: the density correction multiplies neuron i's gradient by
sqrt(d_i / mean d), which adds exactly 0.5 * log d_i + const to the log rms, so
with the density rule the corrected slope is the raw slope + 0.5 by
construction (the JSON records the largest deviation from that identity as a
check); only ``--skew bn`` measures a correction that is not fixed by the masks.

Writes ``<out>/skew<tag>.json`` (machine, date, config, per-layer slopes,
per-stage pooled slopes, trace, per-neuron data) and ``<out>/skew<tag>.png``
(one panel per ResNet stage with sparse layers: neurons' log rms gradient
against log density, init vs trained; top row raw, bottom row corrected), and
prints a markdown table.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sparseopt_jax as so
from sparseopt_jax.training import presets, train

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/ is not a package)

PRESET = "fashion_mnist_resnet20"
PROBE_SEED_OFFSET = (
    7919  # the probe batches come from a stream seeded apart from training
)


# ---------------------------------------------------------------------------
# The probe: per-neuron gradient statistics of the raw and corrected gradient


def stage_of(path: str) -> str:
  """'stem' | 'stage1' | ... | 'head' for a ResNet param path."""
  top = path.split("/", 1)[0]
  if top.startswith("conv_init") or top.startswith("bn_init"):
    return "stem"
  if top.startswith("stage"):
    return top.split("_", 1)[0]
  if top.startswith("head"):
    return "head"
  return top


def correction_of(cfg: presets.TrainConfig) -> str:
  """The correction the probe applies: the run's own, or for an uncorrected run the
  density rule as a what-if (whose slope is the raw one + 0.5 by construction).
  """
  return cfg.skew or "density"


def correction_of_name(results: dict) -> str:
  return results.get("correction", "density")


def make_neuron_probe(setup: train.Setup):
  """``probe(state, batch)`` -> per masked leaf: kept weights, mean square gradient per
  surviving weight (raw and corrected) per neuron, and the two skew slopes.

  The gradient is the one a train step sees (train-mode BatchNorm, no label
  smoothing), as in ``train.make_skew_probe``, which reports only the mean slope.
  "Corrected" applies the run's own correction (:func:`correction_of`): with
  ``--skew bn`` the BatchNorm-variance factors from the state's running statistics.
  """
  grad_fn = train.make_grad_fn(setup)
  per_neuron_ms = so.diagnostics.neuron_grad_stats
  mode = correction_of(setup.config)
  correct = so.skew_correct(
      mode, bn_pairs=setup.bn_pairs if mode == "bn" else None
  )

  def probe(state: train.TrainState, batch) -> dict:
    grads = grad_fn(state, batch)
    masks = so.get_masks(state.opt_state)
    fixed, _ = correct.update(
        grads,
        correct.init(state.params),
        masks=masks,
        batch_stats=state.batch_stats,
    )
    out = {
        "slope_raw": so.skew_slope(grads, masks),
        "slope_corrected": so.skew_slope(fixed, masks),
        "kept": {},
        "fan_in": {},
        "ms_raw": {},
        "ms_corrected": {},
    }
    g_by, c_by = common.by_path(grads), common.by_path(fixed)
    for path, m in common.by_path(masks).items():
      if m is None:  # a dense leaf
        continue
      kept, ms = per_neuron_ms(g_by[path], m)
      _, ms_c = per_neuron_ms(c_by[path], m)
      out["kept"][path] = kept
      out["fan_in"][path] = jnp.float32(m.size // m.shape[-1])
      out["ms_raw"][path] = ms
      out["ms_corrected"][path] = ms_c
    return out

  return probe


# ---------------------------------------------------------------------------
# Host-side statistics


def fit_slope(x: np.ndarray, y: np.ndarray) -> float:
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  var = np.sum((x - x.mean()) ** 2)
  if len(x) < 2 or var <= 1e-12:
    return float("nan")
  return float(np.sum((x - x.mean()) * (y - y.mean())) / var)


def measure(
    probe_fn, state, probe_batches: list[dict], sparse_paths: list[str]
) -> dict:
  """Slopes (mean/std over the batches) and batch-averaged per-neuron data per sparse leaf."""
  outs = [jax.device_get(probe_fn(state, b)) for b in probe_batches]
  layers = {}
  for path in sparse_paths:
    raw = np.array([float(o["slope_raw"][path]) for o in outs])
    cor = np.array([float(o["slope_corrected"][path]) for o in outs])
    kept = np.asarray(outs[0]["kept"][path], np.float64)
    density = kept / float(outs[0]["fan_in"][path])
    ms_raw = np.mean(
        [np.asarray(o["ms_raw"][path], np.float64) for o in outs], axis=0
    )
    ms_cor = np.mean(
        [np.asarray(o["ms_corrected"][path], np.float64) for o in outs], axis=0
    )
    ok = (kept > 0) & (ms_raw > 0)
    layers[path] = {
        "raw": float(np.mean(raw)),
        "raw_std": float(np.std(raw)),
        "corrected": float(np.mean(cor)),
        "corrected_std": float(np.std(cor)),
        "raw_per_batch": raw.tolist(),
        "corrected_per_batch": cor.tolist(),
        "neurons": int(kept.size),
        "density_mean": float(density.mean()),
        "density_spread": (
            float(density.std() / density.mean()) if density.mean() > 0 else 0.0
        ),
        # Per-neuron data (neurons with d_i > 0 and a nonzero gradient), batch-averaged.
        "log_density": np.log(density[ok]).tolist(),
        "log_rms_raw": (0.5 * np.log(ms_raw[ok])).tolist(),
        "log_rms_corrected": (
            (0.5 * np.log(np.maximum(ms_cor[ok], 1e-300))).tolist()
        ),
    }
  return layers


def pooled_within_layer(
    layers: dict, paths: list[str], key: str
) -> tuple[list, list, float]:
  """Per-layer centred (log d, log rms) points of ``paths`` and their pooled slope
  (sum_l Sxy_l / sum_l Sxx_l: a weighted mean of the layers' own slopes)."""
  xs, ys = [], []
  for p in paths:
    x = np.asarray(layers[p]["log_density"])
    y = np.asarray(layers[p][key])
    if len(x) < 2:
      continue
    xs.append(x - x.mean())
    ys.append(y - y.mean())
  if not xs:
    return [], [], float("nan")
  x, y = np.concatenate(xs), np.concatenate(ys)
  return x.tolist(), y.tolist(), fit_slope(x, y)


def nanmean(values) -> float:
  values = [v for v in values if v is not None and math.isfinite(v)]
  return float(np.mean(values)) if values else float("nan")


# ---------------------------------------------------------------------------
# Reporting


def _fmt(v: float, std: float | None = None) -> str:
  if v is None or not math.isfinite(v):
    return "-"
  return f"{v:+.3f}" if std is None else f"{v:+.3f} ± {std:.2f}"


def markdown(results: dict) -> str:
  steps = results["config"]["steps"]
  lines = [
      (
          f"| layer | sparsity | d spread init → {steps} | raw init | corrected"
          f" init | raw @{steps} | corrected @{steps} |"
      ),
      "|---|---:|---:|---:|---:|---:|---:|",
  ]
  for path, row in results["layers"].items():
    i, t = row["init"], row["trained"]
    lines.append(
        f"| {path.removesuffix('/kernel')} | {row['sparsity']:.3f} |"
        f" {i['density_spread']:.2f} → {t['density_spread']:.2f} |"
        f" {_fmt(i['raw'], i['raw_std'])} | {_fmt(i['corrected'])} |"
        f" {_fmt(t['raw'], t['raw_std'])} | {_fmt(t['corrected'])} |"
    )
  m = results["mean"]
  lines.append(
      f"| **mean over {len(results['layers'])} sparse layers** | | | "
      f"**{_fmt(m['init_raw'])}** | **{_fmt(m['init_corrected'])}** | "
      f"**{_fmt(m['trained_raw'])}** | **{_fmt(m['trained_corrected'])}** |"
  )
  notes = [
      "",
      (
          "Skew slope = slope of log rms grad per surviving weight on log"
          f" neuron density, mean ± std over {results['args']['probe_batches']}"
          f" probe batches of {results['config']['batch_size']} (same batches"
          " at init and after training). Trained with"
          f" topology={results['config']['topology']},"
          f" skew={results['config']['skew']}, {steps} steps, mask updates"
          f" every {results['config']['update_every']} steps until step"
          f" {results['end_step']}; train loss"
          f" {results['train']['final_loss']:.3f}, accuracy"
          f" {results['train']['final_accuracy']:.3f} (mean of the last"
          f" {results['train']['last_k']} steps); exploration"
          f" {results['exploration']:.3f}."
      ),
      (
          "Corrected = the gradient after"
          f" skew_correct({results['correction']!r}), the run's own correction;"
          " with 'bn' the factors come from the BatchNorm running variances."
          if results["correction"] == "bn"
          else (
              "Corrected = density-corrected gradient"
              " (so.skew_correct('density', masks=...)"
              f"{', the run' + chr(39) + 's own correction' if results['config']['skew'] else ', a what-if for this uncorrected run'}); "
              "by construction it is raw + 0.5 (largest deviation measured: "
              f"{results['checks']['corrected_minus_raw_minus_half_max_abs']:.1e})."
          )
      ),
      (
          "Dense leaves (ERK gives them density 1, slope undefined): "
          f"{', '.join(p.removesuffix('/kernel') for p in results['dense_leaves']) or 'none'}."
      ),
  ]
  if results["stages"]:
    lines_s = [
        "",
        (
            "| stage | layers | raw init | corrected init | raw trained |"
            " corrected trained |"
        ),
        "|---|---:|---:|---:|---:|---:|",
    ]
    for stage, s in results["stages"].items():
      lines_s.append(
          f"| {stage} | {s['layers']} | {_fmt(s['init_raw'])} | "
          f"{_fmt(s['init_corrected'])} | {_fmt(s['trained_raw'])} | "
          f"{_fmt(s['trained_corrected'])} |"
      )
    lines_s.append("")
    lines_s.append(
        "Stage rows: pooled within-layer slope of the batch-averaged per-neuron"
        " points (what the figure shows)."
    )
    return "\n".join(lines + notes + lines_s)
  return "\n".join(lines + notes)


def plot(results: dict, path: str) -> str:
  plt = common.pyplot()
  stages = list(results["stages"])
  if not stages:
    return ""
  trace = results["trace"]
  ncols = len(stages) + bool(trace)
  fig = plt.figure(figsize=(3.6 * ncols, 6.6))
  grid = fig.add_gridspec(2, ncols)
  axes = np.array([
      [fig.add_subplot(grid[r, c]) for c in range(len(stages))]
      for r in range(2)
  ])
  axes = axes.reshape(2, len(stages))
  colours = {"init": "tab:blue", "trained": "tab:orange"}
  steps = results["config"]["steps"]
  for col, stage in enumerate(stages):
    s = results["stages"][stage]
    for row, kind in enumerate(("raw", "corrected")):
      ax = axes[row, col]
      for when in ("init", "trained"):
        pts = s[f"{when}_{kind}_points"]
        x, y = np.asarray(pts["x"]), np.asarray(pts["y"])
        slope = s[f"{when}_{kind}"]
        label = (
            f"{'init' if when == 'init' else f'step {steps}'}: slope"
            f" {slope:+.2f}"
        )
        ax.scatter(
            x,
            y,
            s=6,
            alpha=0.45,
            color=colours[when],
            label=label,
            linewidths=0,
        )
        if len(x) >= 2 and math.isfinite(slope):
          xx = np.linspace(x.min(), x.max(), 2)
          ax.plot(xx, slope * xx, color=colours[when], lw=1.5)
      ax.axhline(0, color="grey", lw=0.5)
      ax.set_title(
          f"{stage} ({s['layers']} sparse layer{'s' * (s['layers'] > 1)}),"
          f" {kind}",
          fontsize=9,
      )
      ax.legend(fontsize=7, loc="best", markerscale=2)
      ax.grid(alpha=0.3)
      if row == 1:
        ax.set_xlabel("log neuron density (centred per layer)", fontsize=8)
      if col == 0:
        ax.set_ylabel(
            "log rms grad / surviving weight\n(centred per layer)", fontsize=8
        )
  if trace:
    ax = fig.add_subplot(grid[:, -1])
    steps_t = [t["step"] for t in trace]
    ax.plot(steps_t, [t["raw"] for t in trace], marker=".", label="raw")
    ax.plot(
        steps_t,
        [t["corrected"] for t in trace],
        marker=".",
        label=f"corrected ({correction_of_name(results)})",
    )
    for i, t in enumerate(results["mask_update_steps"]):
      ax.axvline(
          t,
          color="grey",
          lw=0.5,
          ls=":",
          label="mask update" if i == 0 else None,
      )
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylabel(
        "mean skew slope over sparse layers (probe batch 0)", fontsize=8
    )
    ax.set_title("skew slope during training", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
  cfg = results["config"]
  fig.suptitle(
      f"ResNet-20 {cfg['sparsity']:.0%} {cfg['distribution'].upper()},"
      f" {cfg['topology']} skew={cfg['skew']}, Fashion-MNIST: raw (top) and"
      f" {correction_of_name(results)}-corrected (bottom) gradient, init vs"
      f" step {steps}",
      fontsize=10,
  )
  return common.save_figure(fig, path, rect=(0, 0, 1, 0.96))


# ---------------------------------------------------------------------------
# Main


def parse_args(argv):
  p = common.make_parser(
      __doc__, "skew", smoke="4 steps of batch 16: a tiny run"
  )
  p.add_argument(
      "--steps",
      type=int,
      default=None,
      help="training steps (default 300; smoke 4)",
  )
  common.add_sparse_options(
      p,
      skew="none",
      skew_help="the correction used for training (default none: the baseline)",
      skew_modes=common.BN_SKEW_MODES,
  )
  p.add_argument("--sparsity", type=float, default=0.9)
  p.add_argument(
      "--distribution", default=None, help="erk (preset) | uniform | er"
  )
  p.add_argument(
      "--update-every", type=int, default=None, help="Delta-T (preset: 25)"
  )
  p.add_argument(
      "--batch-size", type=int, default=None, help="preset: 128; smoke: 16"
  )
  p.add_argument(
      "--probe-batches",
      type=int,
      default=None,
      help="batches the slopes are averaged over (default 4; smoke 2)",
  )
  p.add_argument(
      "--trace-every",
      type=int,
      default=None,
      help="steps between traced mean slopes, 0 for none (default 5; smoke 2)",
  )
  p.add_argument(
      "--devices", type=int, default=1, help="devices of the data-parallel mesh"
  )
  common.add_seed_and_data(p)
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
  args = parse_args(argv)  # argparse reads sys.argv for None
  smoke = args.smoke
  common.fill_defaults(
      args, steps=(300, 4), probe_batches=(4, 2), trace_every=(5, 2)
  )
  steps = args.steps
  overrides = dict(
      steps=steps,
      skew=common.skew_value(args.skew),
      topology=args.topology,
      sparsity=args.sparsity,
      seed=args.seed,
      data_dir=args.data_dir,
  )
  if args.distribution:
    overrides["distribution"] = args.distribution
  if args.update_every or smoke:
    overrides["update_every"] = args.update_every or 2
  if args.batch_size or smoke:
    overrides["batch_size"] = args.batch_size or 16
  if smoke:
    overrides["train_subset"] = 2048
  cfg = presets.get_preset(PRESET, **overrides)

  machine = common.machine_info()  # load average and date at the start
  t_start = time.perf_counter()
  mesh = train.make_mesh(args.devices)
  train.check_batch_size(cfg.batch_size, mesh)
  dataset, setup = common.data_and_setup(cfg)
  end_step = setup.end_step
  replicated = NamedSharding(mesh, P())
  state = jax.device_put(
      train.create_train_state(setup, dataset.info.image_shape), replicated
  )
  train_step, _, _ = train.jit_steps(setup, mesh)
  probe = jax.jit(
      make_neuron_probe(setup),
      in_shardings=(replicated, NamedSharding(mesh, P("data"))),
      out_shardings=replicated,
  )

  local = cfg.batch_size // jax.process_count()
  probe_stream = dataset.train_batches(local, seed=cfg.seed + PROBE_SEED_OFFSET)
  probe_batches = [
      train.shard_batch(next(probe_stream), mesh)
      for _ in range(args.probe_batches)
  ]

  summary0 = so.sparsity_summary(state.opt_state)
  sparse_paths = [
      p for p, leaf in summary0["leaves"].items() if leaf["sparsity"] > 0
  ]
  dense_paths = [
      p for p, leaf in summary0["leaves"].items() if leaf["sparsity"] == 0
  ]

  def trace_point(step):
    out = jax.device_get(probe(state, probe_batches[0]))
    return {
        "step": step,
        "raw": nanmean([float(out["slope_raw"][p]) for p in sparse_paths]),
        "corrected": nanmean(
            [float(out["slope_corrected"][p]) for p in sparse_paths]
        ),
    }

  common.log(
      f"== skew: {cfg.model} {cfg.sparsity:.0%} {cfg.distribution}"
      f" {cfg.topology} skew={cfg.skew}, {steps} steps of batch"
      f" {cfg.batch_size} on {mesh.devices.size} device(s); {len(sparse_paths)}"
      " sparse layers"
  )
  t0 = time.perf_counter()
  at_init = measure(probe, state, probe_batches, sparse_paths)
  trace = [trace_point(0)] if args.trace_every else []
  t_probe = time.perf_counter() - t0

  # Training: the training program's own jitted step, on its own data stream.
  batches = dataset.train_batches(local, seed=cfg.seed)
  losses, accs = [], []
  t0 = time.perf_counter()
  for step in range(1, steps + 1):
    state, metrics = train_step(state, train.shard_batch(next(batches), mesh))
    losses.append(metrics["loss"])
    accs.append(metrics["accuracy"])
    if args.trace_every and (step % args.trace_every == 0 or step == steps):
      trace.append(trace_point(step))
    if step % 50 == 0 or step == steps:
      common.log(
          f"  step {step}: loss"
          f" {float(np.mean(jax.device_get(losses[-10:]))):.3f}"
          f" ({time.perf_counter() - t0:.0f} s)"
      )
  jax.block_until_ready(state)
  t_train = time.perf_counter() - t0
  after = measure(probe, state, probe_batches, sparse_paths)
  summary1 = so.sparsity_summary(state.opt_state)

  # Assemble.
  layers, dev = {}, 0.0
  for p in sparse_paths:
    layers[p] = {
        "stage": stage_of(p),
        "sparsity": summary1["leaves"][p]["sparsity"],
        "init": at_init[p],
        "trained": after[p],
    }
    for when in (at_init[p], after[p]):
      for r, c in zip(when["raw_per_batch"], when["corrected_per_batch"]):
        if math.isfinite(r) and math.isfinite(c):
          dev = max(dev, abs(c - r - 0.5))
  mean = {
      f"{when}_{kind}": nanmean([layers[p][when][kind] for p in sparse_paths])
      for when in ("init", "trained")
      for kind in ("raw", "corrected")
  }
  stages = {}
  for stage in dict.fromkeys(stage_of(p) for p in sparse_paths):
    paths = [p for p in sparse_paths if stage_of(p) == stage]
    s = {"layers": len(paths), "paths": paths}
    for when, src in (("init", at_init), ("trained", after)):
      for kind in ("raw", "corrected"):
        x, y, slope = pooled_within_layer(src, paths, f"log_rms_{kind}")
        s[f"{when}_{kind}"] = slope
        s[f"{when}_{kind}_points"] = {"x": x, "y": y}
    stages[stage] = s
  k = min(10, steps)
  results = {
      **common.results_header("skew", argv, args, machine),
      "preset": PRESET,
      "config": dataclasses.asdict(cfg),
      "end_step": end_step,
      "mask_update_steps": [
          t + 1 for t in range(cfg.update_every, end_step, cfg.update_every)
      ],
      "sparse_layers": sparse_paths,
      "dense_leaves": dense_paths,
      "layers": layers,
      "mean": mean,
      "stages": stages,
      "trace": trace,
      "train": {
          "final_loss": float(np.mean(jax.device_get(losses[-k:]))),
          "final_accuracy": float(np.mean(jax.device_get(accs[-k:]))),
          "last_k": k,
      },
      "sparsity": summary1["sparsity"],
      "exploration": summary1["exploration"],
      "density_spread_init": summary0["density_spread"],
      "density_spread_trained": summary1["density_spread"],
      "correction": correction_of(cfg),
      "checks": {"corrected_minus_raw_minus_half_max_abs": dev},
      "timings_s": {
          "train": t_train,
          "train_per_step": t_train / steps,
          "probe_at_init_incl_compile": t_probe,
      },
  }
  json_path, png_path = common.save_results(
      results, args.out, f"skew{args.tag}", plot, t_start
  )
  print(markdown(results))
  if trace:
    print(
        "\nmean slope over the sparse layers (first probe batch): "
        + ", ".join(
            f"{t['step']}: {t['raw']:+.2f}/{t['corrected']:+.2f}"
            for t in trace[:: max(1, len(trace) // 15)]
        )
    )
  print(f"\nwrote {json_path} and {png_path} in {results['wall_s']:.0f} s")
  return results


if __name__ == "__main__":
  main()
