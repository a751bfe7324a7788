"""Does SparseOpt make dynamic sparse training converge faster?

    python benchmarks/convergence.py                 # default sweep, about an hour on 2 CPU cores
    python benchmarks/convergence.py --smoke --out /tmp/c
    python benchmarks/convergence.py --full --dataset cifar100   # the paper's set-up, for a GPU/TPU

Arms (every one with the same seeds, data order, initial weights and initial masks):
dense SGD; RigL and SET with skew=None (the baseline), "density" (the paper) and
"bn"; RigL with grow_with="corrected" at the first sparsity; at 95%, RigL with
HAM (``--ham``) alone and with the density correction; constant fan-in RigL
(``--structure fan_in``) without and with the correction. Each arm trains with
the training program (``sparseopt_jax.training.train.run``) into its own workdir, which is
reused if complete, so an interrupted sweep resumes where it stopped.

Default scale (2 CPU cores): ResNet-20 at half the paper's width (channels
8/16/32, ``--width``), Fashion-MNIST, batch 128, a budget of
``--steps`` steps (cosine lr 0.1, RigL every ``--update-every`` steps until 75%).
``--full`` uses the presets' paper-scale settings (full width, ``--epochs``).
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import functools
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
# benchmarks/ is not a package: common.py is imported from this directory.
import common  # noqa: E402
import sweep  # noqa: E402

PRESET = {
    "fashion_mnist": "fashion_mnist_resnet20",
    "cifar100": "cifar100_resnet20",
}


@dataclasses.dataclass(frozen=True)
class Arm:
  name: str
  overrides: dict
  pair: str | None = None  # a second arm its final accuracy is paired with

  @property
  def key(self) -> tuple:
    o = self.overrides
    return (o.get("sparsity"), o.get("topology"))


def default_arms(sparsities, ham_alphas=(200.0,)) -> list[Arm]:
  arms = [Arm("dense", {"dense": True})]
  for s in sparsities:
    for topo in ("rigl", "set"):
      for skew in (None, "density", "bn"):
        arms.append(
            Arm(
                f"{topo}{round(s * 100)}_{skew or 'base'}",
                {"sparsity": s, "topology": topo, "skew": skew},
            )
        )
  s = sparsities[0]
  arms.append(
      Arm(
          f"rigl{round(s * 100)}_density_growcorr",
          {
              "sparsity": s,
              "topology": "rigl",
              "skew": "density",
              "grow_with": "corrected",
          },
      )
  )
  # HAM (so.ham, --ham) alone and with the density correction, paired with
  # HAM alone: the paper's Table 3 (95% RigL). alpha 200 is the public code's.
  for alpha in ham_alphas if 0.95 in sparsities else ():
    tag = "" if alpha == 200.0 else f"_a{alpha:g}"
    ham = dict(sparsity=0.95, topology="rigl", ham=True, ham_alpha=alpha)
    arms.append(Arm(f"rigl95_ham{tag}", {**ham, "skew": None}))
    arms.append(
        Arm(
            f"rigl95_density_ham{tag}",
            {**ham, "skew": "density"},
            pair=f"rigl95_ham{tag}",
        )
    )
  # Constant fan-in RigL (structure="fan_in"), uncorrected and corrected: removes
  # the per-neuron density skew by construction (the correction is the identity).
  for s in sparsities:
    for skew in (None, "density"):
      arms.append(
          Arm(
              f"rigl{round(s * 100)}_fanin_{skew or 'base'}",
              {
                  "sparsity": s,
                  "topology": "rigl",
                  "skew": skew,
                  "structure": "fan_in",
              },
          )
      )
  return arms


def run_config(args, arm: Arm, seed: int):
  from sparseopt_jax.training import presets

  common = dict(
      seed=seed, batch_size=args.batch_size, update_every=args.update_every
  )
  if args.full:
    common.update(epochs=args.epochs, steps=None)
  else:
    common.update(
        width=args.width,
        steps=args.steps,
        train_subset=args.train_subset,
        eval_every=max(1, args.steps // args.evals),
        checkpoint_every=args.steps,
    )
  return presets.get_preset(PRESET[args.dataset], **{**common, **arm.overrides})


def budget_tag(args) -> str:
  """Names a sweep by data set and budget, so different budgets never share runs."""
  budget = f"epochs{args.epochs:g}" if args.full else f"steps{args.steps}"
  return f"{args.dataset}_{budget}"


def workdir(args, arm: Arm, seed: int) -> str:
  return os.path.join(
      args.out, "convergence_runs", budget_tag(args), f"{arm.name}_seed{seed}"
  )


def base_name(arm: Arm) -> str | None:
  """The uncorrected arm with the same sparsity and topology (None for the dense arm)."""
  if arm.overrides.get("dense"):
    return None
  return (
      f"{arm.overrides['topology']}{round(arm.overrides['sparsity'] * 100)}_base"
  )


def jobs(args) -> list[tuple[Arm, int]]:
  return [
      (arm, seed) for arm in selected_arms(args) for seed in range(args.seeds)
  ]


def selected_arms(args) -> list[Arm]:
  arms = default_arms(args.sparsities, args.ham_alphas)
  if args.arms:
    arms = [
        a
        for a in arms
        if any(fnmatch.fnmatchcase(a.name, p) for p in args.arms)
    ]
  return arms


def work(args, worker: int, num_workers: int) -> None:
  """Run this worker's share of the jobs, skipping complete ones."""
  from sparseopt_jax.training import train

  sweep.use_compilation_cache(args.out)
  for arm, seed in sweep.share(jobs(args), worker, num_workers):
    path = workdir(args, arm, seed)
    done = os.path.join(path, "done.json")
    if os.path.exists(done):
      continue
    t = time.time()
    # A workdir without done.json is an interrupted run: resume from its checkpoint.
    _, row = train.run(
        run_config(args, arm, seed),
        path,
        resume=os.path.exists(path),
        num_devices=1,
        progress=False,
    )
    with open(done, "w") as f:
      json.dump(row, f)
    print(
        f"[worker {worker}] {arm.name} seed {seed}: {time.time() - t:.0f} s",
        flush=True,
    )


# ---------------------------------------------------------------------------
# Aggregation


def load_runs(args) -> dict[str, list[list[dict]]]:
  out = {}
  for arm, seed in jobs(args):
    path = os.path.join(workdir(args, arm, seed), "metrics.jsonl")
    out.setdefault(arm.name, []).append(
        [json.loads(line) for line in open(path)]
    )
  return out


def curve(
    runs: list[list[dict]], key: str = "test_accuracy"
) -> tuple[np.ndarray, np.ndarray]:
  """Steps and a (seeds, evals) array of ``key``."""
  steps = np.array([r["step"] for r in runs[0]])
  return steps, np.array([[r[key] for r in rows] for rows in runs])


def steps_to_reach(steps: np.ndarray, acc: np.ndarray, target: float) -> float:
  """First step (linearly interpolated between evaluations) where ``acc`` reaches ``target``."""
  hit = np.nonzero(acc >= target)[0]
  if not len(hit):
    return float("nan")
  i = hit[0]
  if i == 0:
    return float(steps[0])
  frac = (target - acc[i - 1]) / (acc[i] - acc[i - 1])
  return float(steps[i - 1] + frac * (steps[i] - steps[i - 1]))


def summarize(args, runs) -> list[dict]:
  arms = {a.name: a for a in selected_arms(args)}
  dense = runs.get("dense")
  dense_final = (
      float(np.mean(curve(dense)[1][:, -1])) if dense else float("nan")
  )
  rows = []
  for name, arm_runs in runs.items():
    arm = arms[name]
    steps, acc = curve(arm_runs)
    final = acc[:, -1]
    row = {
        "arm": name,
        **{k: v for k, v in arm.overrides.items()},
        "seeds": len(arm_runs),
        "acc_mean": 100 * float(final.mean()),
        "acc_std": 100 * common.sample_std(final),
        "final_step": int(steps[-1]),
    }
    for key in (
        "skew_slope_raw",
        "skew_slope_corrected",
        "exploration",
        "density_spread",
    ):
      if key in arm_runs[0][-1]:
        row[key] = float(np.mean([rs[-1][key] for rs in arm_runs]))
    base = base_name(arm)
    if base is not None and base != name and base in runs:
      b_steps, b_acc = curve(runs[base])
      b_final = float(b_acc[:, -1].mean())
      reach = steps_to_reach(steps, acc.mean(0), b_final)
      row["delta_vs_base"] = 100 * (float(final.mean()) - b_final)
      row["steps_to_base_final_ratio"] = reach / float(b_steps[-1])
      gap = dense_final - b_final
      row["gap_closed"] = (
          (float(final.mean()) - b_final) / gap
          if abs(gap) > 1e-9
          else float("nan")
      )
      # Paired per seed: same data order and initial masks.
      diffs = final - b_acc[:, -1]
      row["paired_delta_std"] = 100 * common.sample_std(diffs)
      # Constant fan-in is also paired with the corrected unstructured arm, and
      # its corrected arm with its uncorrected one.
      stem = base[: -len("_base")]
      for other in (f"{stem}_density", f"{stem}_fanin_base"):
        if arm.overrides.get("structure") and other != name and other in runs:
          diffs = final - curve(runs[other])[1][:, -1]
          key = other[len(stem) + 1 :]
          row[f"delta_vs_{key}"] = 100 * float(diffs.mean())
          row[f"paired_delta_vs_{key}_std"] = 100 * common.sample_std(diffs)
    if arm.pair in runs:
      diffs = final - curve(runs[arm.pair])[1][:, -1]
      row["paired_with"] = arm.pair
      row["delta_vs_pair"] = 100 * float(diffs.mean())
      row["paired_delta_vs_pair_std"] = 100 * common.sample_std(diffs)
    # Undefined figures (no dense arm, never reached) are null in the JSON, not NaN.
    rows.append(common.null_if_undefined(row))
  return rows


def table(rows: list[dict]) -> str:
  head = (
      "| arm | test acc % (mean ± std) | Δ vs base (pts, paired std) | steps to"
      " base final | gap closed | skew slope raw / corr | exploration |"
  )
  lines = [head, "|" + "---|" * 7]
  for r in rows:
    lines.append(
        f"| {r['arm']} | {r['acc_mean']:.2f} ± {r['acc_std']:.2f} |"
        f" {common.cell(r.get('delta_vs_base'), '{:+.2f}')}{common.cell(r.get('paired_delta_std'), ' ({:.2f})') if 'paired_delta_std' in r else ''}"
        f" | {common.cell(r.get('steps_to_base_final_ratio'), '{:.2f}x')} |"
        f" {common.cell(r.get('gap_closed'), '{:+.0%}')} |"
        f" {common.cell(r.get('skew_slope_raw'), '{:+.2f}')} /"
        f" {common.cell(r.get('skew_slope_corrected'), '{:+.2f}')} |"
        f" {common.cell(r.get('exploration'), '{:.3f}')} |"
    )
  return "\n".join(lines)


def plot(args, runs, path: str) -> None:
  arms = {a.name: a for a in selected_arms(args)}
  panels = sorted({arms[n].key for n in runs if n != "dense"})
  cols = 2
  nrows = max(1, -(-len(panels) // cols))
  fig, axes = common.panel_grid(nrows, cols, 6, 3.6)
  for ax, key in zip(axes.flat, panels):
    names = [n for n in runs if n != "dense" and arms[n].key == key] + (
        ["dense"] if "dense" in runs else []
    )
    for n in names:
      steps, acc = curve(runs[n])
      mean, std = 100 * acc.mean(0), 100 * acc.std(0)
      ax.plot(steps, mean, label=n, ls="--" if n == "dense" else "-")
      ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
    ax.set_title(f"{key[1]} {key[0]:.0%}")
    ax.set_xlabel("step")
    ax.set_ylabel("test accuracy %")
    lo = min(100 * curve(runs[n])[1].mean(0)[-1] for n in names)
    ax.set_ylim(max(0, lo - 15), None)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  for ax in list(axes.flat)[len(panels) :]:
    ax.axis("off")
  fig.suptitle(
      f"Convergence, {args.dataset}: mean ± std over {args.seeds} seeds"
  )
  common.save_figure(fig, path)


def parse(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--dataset", default="fashion_mnist", choices=sorted(PRESET))
  p.add_argument(
      "--sparsities", type=float, nargs="+", default=[0.9, 0.95, 0.97]
  )
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument(
      "--ham-alphas",
      type=float,
      nargs="+",
      default=[200.0],
      help="alpha of the HAM arms (at 95%%; names get _a<alpha> unless 200)",
  )
  p.add_argument(
      "--steps", type=int, default=300, help="the budget (default scale)"
  )
  p.add_argument(
      "--epochs", type=float, default=100, help="the budget with --full"
  )
  p.add_argument("--width", type=int, default=8)
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--train-subset", type=int, default=None)
  p.add_argument("--update-every", type=int, default=25)
  p.add_argument("--evals", type=int, default=6, help="evaluations per run")
  p.add_argument(
      "--arms",
      nargs="*",
      default=None,
      help="names (glob patterns) of the arms to run, e.g. 'rigl90_*' dense",
  )
  sweep.add_options(p)
  p.add_argument(
      "--full", action="store_true", help="paper-scale settings (GPU/TPU)"
  )
  p.add_argument("--smoke", action="store_true", help="a tiny sweep for CI")
  p.add_argument("--out", default=os.path.join(HERE, "results"))
  p.add_argument(
      "--name",
      default=None,
      help="stem of the result files (default: convergence[_<data>_<budget>])",
  )
  args = p.parse_args(argv)
  if args.smoke:
    args.sparsities, args.seeds, args.steps, args.width = [0.9], 2, 6, 2
    args.batch_size, args.train_subset, args.update_every, args.evals = (
        16,
        512,
        2,
        2,
    )
    args.arms = args.arms or ["rigl90_base", "rigl90_density"]
    args.jobs = 1
  if args.full:
    args.update_every = 100
  return args


def main(argv=None) -> dict:
  args = parse(argv)  # argparse reads sys.argv for None
  t = time.time()
  if not sweep.run(
      __file__, argv, args, functools.partial(work, args), pin=True
  ):
    return {}  # a worker: the parent aggregates
  runs = load_runs(args)
  rows = summarize(args, runs)
  result = {
      **common.results_header("convergence", argv),
      "wall_time_s": time.time() - t,
      "settings": sweep.settings(args),
      "rows": rows,
  }
  default = (
      args.dataset == "fashion_mnist" and not args.full and args.steps == 300
  )
  tag = args.name or (
      "convergence" if default else f"convergence_{budget_tag(args)}"
  )
  common.write_json(result, os.path.join(args.out, f"{tag}.json"), indent=2)
  plot(args, runs, os.path.join(args.out, f"{tag}.png"))
  print(table(rows))
  return result


if __name__ == "__main__":
  main()
