"""Does a skew correction help a sparse ViT? RigL at 90% and 95%, AdamW and SGD, 3 arms.

    python benchmarks/vit.py                      # 36 runs: 58 min on 2 shared cores (load 6-15)
    python benchmarks/vit.py --smoke --out /tmp/v  # tiny: 4 runs of 8 steps

The model is the training program's ``vit_qknorm`` (pre-LN blocks with
QK-norm, ``sparseopt_jax.training.models.ViT``) at ``--width`` (default 64),
4 blocks, 7x7 patches, on Fashion-MNIST; the attention and MLP kernels are
sparse (ERK), RigL every ``--update-every`` steps until 75% of ``--steps``.
Arms, each with the same seeds, data order, initial weights and initial masks:

* ``none``: no correction (plain RigL);
* ``density``: the paper's per-neuron rule c_i = sqrt(d_i / mean d);
* ``layernorm``: the LayerNorm rule c_g = sqrt(D_g / D) on the kernels a
  LayerNorm normalises (here the query and key kernels, per head; every other
  kernel unscaled; docs/layernorm_skew.md);

under AdamW (lr 1e-3, weight decay 0.05, warm-up 10% then cosine) and SGD with
momentum 0.9 (lr 0.05, weight decay 1e-4, same schedule), the presets
``fashion_mnist_vit`` / ``fashion_mnist_vit_sgd`` at this budget.

Each run uses the training program's own pieces (``train.make_setup``,
``create_train_state``, ``jit_steps``, ``HostScheduledStep``) and records the
training loss of every step, so that the mask-update transient can be read:
for each mask update at step t, the mean loss over the ``--window`` steps after
it minus the mean over the ``--window`` steps before it (positive: the update
cost loss). At the end: test accuracy and loss on the 10,000 test images, and
on one probe batch the skew slopes (per head of the query/key kernels, and per
neuron on density bins, raw and as the run's correction leaves the gradient).
Runs are stored one JSON each under ``<out>/vit_runs/<budget>/`` and reused if
present, so an interrupted sweep resumes.

Writes ``<out>/vit.json`` and ``<out>/vit.png``; prints the tables.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402  (benchmarks/ is not a package)
import sweep  # noqa: E402

ARMS = ("none", "density", "layernorm")
OPTIMIZERS = {
    "adamw": dict(optimizer="adamw", learning_rate=1e-3, weight_decay=0.05),
    "sgd": dict(
        optimizer="sgd", learning_rate=0.05, momentum=0.9, weight_decay=1e-4
    ),
}


def jobs(args) -> list[tuple[float, str, str, int]]:
  return [
      (s, opt, arm, seed)
      for s in args.sparsities
      for opt in args.optimizers
      for seed in range(args.seeds)
      for arm in args.arms
  ]


def run_name(s, opt, arm, seed) -> str:
  return f"{opt}_s{round(s * 100)}_{arm}_seed{seed}"


def budget_tag(args) -> str:
  return f"w{args.width}_b{args.batch_size}_steps{args.steps}"


def run_path(args, job) -> str:
  return os.path.join(
      args.out, "vit_runs", budget_tag(args), run_name(*job) + ".json"
  )


def config(args, s, opt, arm, seed, steps_per_epoch):
  from sparseopt_jax.training import presets

  return presets.get_preset(
      "fashion_mnist_vit",
      **OPTIMIZERS[opt],
      width=args.width,
      steps=args.steps,
      batch_size=args.batch_size,
      train_subset=args.train_subset,
      warmup_epochs=0.1 * args.steps / steps_per_epoch,
      sparsity=s,
      skew=None if arm == "none" else arm,
      update_every=args.update_every,
      seed=seed,
      eval_every=args.steps,
      checkpoint_every=args.steps,
  )


def head_and_neuron_slopes(setup, state, batch, correct) -> dict:
  """Skew slopes of the gradient on ``batch``: per head (query/key) and per neuron (bins)."""
  import jax
  from layernorm_skew import head_slopes, neuron_bins, pooled_slope

  import sparseopt_jax as so
  from sparseopt_jax.training import train

  grads = jax.jit(train.make_grad_fn(setup))(state, batch)
  masks = so.get_masks(state.opt_state)
  out = {}
  for kind, g in (("raw", grads), ("corrected", None)):
    if g is None:
      if correct is None:
        continue
      g, _ = correct.update(grads, correct.init(grads), masks=masks)
    head, _ = head_slopes(g, masks)
    gp, groups = common.by_path(g), {}
    for path, m in common.by_path(masks).items():
      if m is not None:
        groups[path] = neuron_bins(gp[path], m, path, 8)
    out[f"head_{kind}"] = head
    out[f"neuron_{kind}"] = pooled_slope(groups)
  return out


def evaluate(eval_step, state, dataset, args, mesh) -> dict:
  """``train.evaluate``, on the first ``--eval-batches`` test batches if set."""
  import itertools

  import jax

  from sparseopt_jax.training import train

  totals = None
  batches = dataset.eval_batches(args.batch_size)
  if args.eval_batches:
    batches = itertools.islice(batches, args.eval_batches)
  for batch in batches:
    out = eval_step(state, train.shard_batch(batch, mesh))
    totals = (
        out if totals is None else jax.tree.map(lambda a, b: a + b, totals, out)
    )
  totals = jax.device_get(totals)
  return {
      "test_loss": float(totals["loss"] / totals["count"]),
      "test_accuracy": float(totals["correct"] / totals["count"]),
      "test_examples": int(totals["count"]),
  }


def one_run(args, job, dataset) -> dict:
  import jax
  import jax.numpy as jnp

  import sparseopt_jax as so
  from sparseopt_jax.training import train

  s, opt, arm, seed = job
  steps_per_epoch = dataset.steps_per_epoch(args.batch_size)
  cfg = config(args, s, opt, arm, seed, steps_per_epoch)
  setup = train.make_setup(cfg, dataset.info, steps_per_epoch)
  mesh = train.make_mesh(1)
  state = train.create_train_state(setup, dataset.info.image_shape)
  shardings = train.state_shardings(setup, mesh, state)
  state = jax.device_put(state, shardings)
  train_jit, eval_step, _ = train.jit_steps(setup, mesh, shardings)
  step_fn = train.HostScheduledStep(train_jit)
  batches = dataset.train_batches(args.batch_size, seed=seed)
  losses, updates = [], []
  t0 = time.time()
  for step in range(setup.num_steps):
    batch = train.shard_batch(next(batches), mesh)
    update = setup.is_mask_update(step)
    if update:
      updates.append(step)
    state, metrics = step_fn(state, batch, update)
    losses.append(metrics["loss"])
  losses = [float(x) for x in jax.device_get(losses)]
  train_s = time.time() - t0
  result = evaluate(eval_step, state, dataset, args, mesh)
  correct = (
      None
      if cfg.skew is None
      else so.skew_correct(
          cfg.skew,
          ln_leaves=setup.ln_leaves if cfg.skew == "layernorm" else None,
      )
  )
  probe = train.shard_batch(
      next(dataset.train_batches(4 * args.batch_size, seed=10_000)), mesh
  )
  slopes = head_and_neuron_slopes(setup, state, probe, correct)
  summary = so.sparsity_summary(state.opt_state, params=state.params)
  del jnp
  return {
      "sparsity": s,
      "optimizer": opt,
      "arm": arm,
      "seed": seed,
      **result,
      "train_losses": losses,
      "mask_update_steps": updates,
      "train_s": train_s,
      "slopes": slopes,
      "exploration": summary["exploration"],
      "pruned_nonzero": summary["pruned_nonzero"],
  }


def work(args, worker: int, num_workers: int) -> None:
  """Run this worker's share of the runs, skipping those already on disk."""
  from sparseopt_jax.training import input as input_lib

  sweep.use_compilation_cache(args.out)
  dataset = input_lib.load("fashion_mnist", train_subset=args.train_subset)
  for job in sweep.share(jobs(args), worker, num_workers):
    path = run_path(args, job)
    if os.path.exists(path):
      continue
    t = time.time()
    result = one_run(args, job, dataset)
    # Written whole, then renamed: an interrupted write leaves no run behind.
    common.write_json(result, path + ".tmp", indent=None)
    os.replace(path + ".tmp", path)
    print(
        f"[worker {worker}] {run_name(*job)}: acc"
        f" {100 * result['test_accuracy']:.2f}% in {time.time() - t:.0f} s",
        flush=True,
    )


# ---------------------------------------------------------------------------
# Aggregation


def transients(run: dict, window: int) -> list[float]:
  """Per mask update at step t: mean loss over steps t..t+w-1 minus over t-w..t-1.

  ``train_losses[t]`` is the loss of the step that starts from ``state.step ==
  t`` (computed before that step's update), so ``train_losses[t+1:]`` are the
  first losses the updated masks produce.
  """
  loss = np.asarray(run["train_losses"])
  out = []
  for t in run["mask_update_steps"]:
    if t - window < 0 or t + 1 + window > len(loss):
      continue
    out.append(
        float(
            loss[t + 1 : t + 1 + window].mean()
            - loss[t - window + 1 : t + 1].mean()
        )
    )
  return out


def runs_of(runs: dict, s: float, opt: str, arm: str) -> list[dict]:
  """The runs of one arm at one sparsity and optimizer, by seed."""
  return sorted(
      (
          r
          for r in runs.values()
          if (r["sparsity"], r["optimizer"], r["arm"]) == (s, opt, arm)
      ),
      key=lambda r: r["seed"],
  )


def summarize(args, runs: dict) -> list[dict]:
  rows = []
  for s in args.sparsities:
    for opt in args.optimizers:
      base = {r["seed"]: r for r in runs_of(runs, s, opt, "none")}
      for arm in args.arms:
        rs = runs_of(runs, s, opt, arm)
        if not rs:
          continue
        acc = np.array([100 * r["test_accuracy"] for r in rs])
        tr = np.array([np.mean(transients(r, args.window)) for r in rs])
        after = np.array([
            np.mean([
                np.mean(r["train_losses"][t + 1 : t + 1 + args.window])
                for t in r["mask_update_steps"]
                if t + 1 + args.window <= len(r["train_losses"])
            ])
            for r in rs
        ])
        row = {
            "sparsity": s,
            "optimizer": opt,
            "arm": arm,
            "seeds": len(rs),
            "acc_mean": float(acc.mean()),
            "acc_std": common.sample_std(acc),
            "test_loss_mean": float(np.mean([r["test_loss"] for r in rs])),
            "transient_mean": float(tr.mean()),
            "transient_std": common.sample_std(tr),
            "loss_after_update_mean": float(after.mean()),
            "exploration": float(np.mean([r["exploration"] for r in rs])),
            "train_s_mean": float(np.mean([r["train_s"] for r in rs])),
        }
        for key in (
            "head_raw",
            "head_corrected",
            "neuron_raw",
            "neuron_corrected",
        ):
          vals = [
              r["slopes"].get(key)
              for r in rs
              if r["slopes"].get(key) is not None
          ]
          row[f"slope_{key}"] = float(np.nanmean(vals)) if vals else None
        if arm != "none" and base:
          paired = [(r, base[r["seed"]]) for r in rs if r["seed"] in base]
          d = np.array([
              100 * (r["test_accuracy"] - b["test_accuracy"]) for r, b in paired
          ])
          dt = np.array([
              np.mean(transients(r, args.window))
              - np.mean(transients(b, args.window))
              for r, b in paired
          ])
          row["delta_acc_mean"] = float(d.mean())
          row["delta_acc_std"] = common.sample_std(d)
          row["delta_transient_mean"] = float(dt.mean())
          row["delta_transient_std"] = common.sample_std(dt)
        # Undefined figures (a tiny smoke model's empty heads) are null, not NaN.
        rows.append(common.null_if_undefined(row))
  return rows


def table(rows: list[dict]) -> str:
  lines = [
      (
          "| sparsity | optimizer | arm | test acc % (mean ± std) | Δ acc vs"
          " none (paired, ± std) | loss transient after an update (± std) | Δ"
          " transient vs none (paired) | head slope raw / corr | neuron slope"
          " raw / corr |"
      ),
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
        f"| {r['sparsity']:.0%} | {r['optimizer']} | {r['arm']} |"
        f" {r['acc_mean']:.2f} ± {r['acc_std']:.2f} |"
        f" {common.cell(r.get('delta_acc_mean'), '{:+.2f}')}{common.cell(r.get('delta_acc_std'), ' ± {:.2f}') if 'delta_acc_std' in r else ''}"
        f" | {r['transient_mean']:+.4f} ± {r['transient_std']:.4f} |"
        f" {common.cell(r.get('delta_transient_mean'), '{:+.4f}')}{common.cell(r.get('delta_transient_std'), ' ± {:.4f}') if 'delta_transient_std' in r else ''}"
        f" | {common.cell(r['slope_head_raw'], '{:+.2f}')} /"
        f" {common.cell(r['slope_head_corrected'], '{:+.2f}')} |"
        f" {common.cell(r['slope_neuron_raw'], '{:+.2f}')} /"
        f" {common.cell(r['slope_neuron_corrected'], '{:+.2f}')} |"
    )
  return "\n".join(lines)


def plot(args, runs: dict, path: str) -> str:
  panels = [(s, o) for s in args.sparsities for o in args.optimizers]
  fig, axes = common.panel_grid(2, len(panels), 4.5, 3.5)
  for j, (s, opt) in enumerate(panels):
    for arm in args.arms:
      rs = runs_of(runs, s, opt, arm)
      if not rs:
        continue
      loss = np.array([r["train_losses"] for r in rs])
      k = max(1, args.steps // 50)
      smooth = np.array(
          [np.convolve(x, np.ones(k) / k, mode="valid") for x in loss]
      )
      axes[0, j].plot(
          np.arange(smooth.shape[1]) + k - 1, smooth.mean(0), label=arm
      )
      # Loss around the mask updates, relative to the step of the update.
      w = args.window
      segs = [
          np.asarray(r["train_losses"][t - w + 1 : t + 1 + w])
          - np.mean(r["train_losses"][t - w + 1 : t + 1])
          for r in rs
          for t in r["mask_update_steps"]
          if t - w + 1 >= 0 and t + 1 + w <= len(r["train_losses"])
      ]
      if segs:
        axes[1, j].plot(
            np.arange(-w + 1, w + 1), np.mean(segs, 0), marker=".", label=arm
        )
    for r in runs.values():
      if (r["sparsity"], r["optimizer"]) == (s, opt):
        for t in r["mask_update_steps"]:
          axes[0, j].axvline(t, color="k", alpha=0.05)
        break
    axes[0, j].set_title(f"{opt}, {s:.0%} sparse: training loss", fontsize=9)
    axes[0, j].set_xlabel("step")
    axes[0, j].legend(fontsize=7)
    axes[0, j].grid(alpha=0.3)
    axes[1, j].axvline(0.5, color="k", alpha=0.3)
    axes[1, j].set_title(
        "loss around a mask update (minus the mean before)", fontsize=9
    )
    axes[1, j].set_xlabel("steps from the update")
    axes[1, j].legend(fontsize=7)
    axes[1, j].grid(alpha=0.3)
  fig.suptitle(
      f"Sparse ViT (QK-norm), Fashion-MNIST, RigL: mean over {args.seeds} seeds"
  )
  return common.save_figure(fig, path)


def parse(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95])
  p.add_argument(
      "--optimizers",
      nargs="+",
      default=list(OPTIMIZERS),
      choices=list(OPTIMIZERS),
  )
  p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--width", type=int, default=64)
  p.add_argument("--steps", type=int, default=200)
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--update-every", type=int, default=25)
  p.add_argument("--train-subset", type=int, default=None)
  p.add_argument(
      "--eval-batches",
      type=int,
      default=None,
      help="test batches (all if unset)",
  )
  p.add_argument(
      "--window", type=int, default=10, help="steps after a mask update"
  )
  sweep.add_options(p)
  p.add_argument("--smoke", action="store_true", help="a tiny sweep for CI")
  p.add_argument("--out", default=os.path.join(HERE, "results"))
  args = p.parse_args(argv)
  if args.smoke:
    args.sparsities, args.optimizers, args.seeds = [0.9], ["adamw"], 2
    args.arms = ["none", "layernorm"]
    args.width, args.steps, args.batch_size, args.update_every = 8, 8, 16, 3
    args.train_subset, args.window, args.jobs = 512, 2, 1
    args.eval_batches = 2
  return args


def main(argv=None) -> dict:
  args = parse(argv)  # argparse reads sys.argv for None
  t = time.time()
  if not sweep.run(__file__, argv, args, functools.partial(work, args)):
    return {}  # a worker: the parent aggregates
  runs = {}
  for job in jobs(args):
    with open(run_path(args, job)) as f:
      runs[run_name(*job)] = json.load(f)
  rows = summarize(args, runs)
  result = {
      **common.results_header("vit", argv),
      "wall_time_s": time.time() - t,
      "settings": sweep.settings(args),
      "rows": rows,
      "table": table(rows),
  }
  common.write_json(result, os.path.join(args.out, "vit.json"))
  plot(args, runs, os.path.join(args.out, "vit.png"))
  print(result["table"])
  return result


if __name__ == "__main__":
  main()
