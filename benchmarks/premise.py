"""SparseOpt's premise (its Figure 3): BatchNorm scales a sparse layer's gradient by 1/sqrt(1-s).

    python benchmarks/premise.py                    # 5 sparsities x 8 seeds, well under a minute
    python benchmarks/premise.py --smoke --out /tmp/premise

Set-up (Fashion-MNIST from the offline IDX files; the paper uses MNIST): a
two-layer MLP ``784 -> H -> 10``, the hidden layer with or without BatchNorm
(train mode, batch statistics, scale 1 and offset 0 as at initialisation)
before its ReLU. The hidden kernel is sparse with uniform sparsity s (a random
mask keeping round((1-s) * 784 * H) weights, so each neuron keeps about 1-s of
its fan-in); the output layer stays dense. The sparse network is the dense
network's initial weights times the mask (no rescaling), on the same batches.

The ratio, per seed::

    ratio = RMS_{batches, surviving weights}(g_sparse) / RMS_{batches, weights}(g_dense)

with g the gradient of the mean cross-entropy with respect to the hidden
kernel, at initialisation; reported as mean ± std over seeds. Why this one:

* per weight (an RMS, not a norm): the sparse layer has (1-s) times fewer
  weights, and the claim is about each weight's step;
* the hidden layer: it is the sparse layer whose outputs BatchNorm normalises,
  where the theory puts the factor: its pre-activation variance is (1-s) times
  the dense one, so BatchNorm divides by sqrt(1-s) times less;
* at initialisation: both networks have the same weights there, so the ratio
  isolates the sparsity; after training the two networks' weights differ and
  the comparison no longer isolates anything.

Also reported, with BatchNorm:

* ``density``: the ratio after ``so.sparseopt(..., skew="density")`` corrects
  the sparse gradient (c_i = sqrt(d_i / mean_j d_j)). Under uniform sparsity
  every d_i is close to the layer mean, so c_i is close to 1 and this ratio
  stays near 1/sqrt(1-s): the correction removes the skew *between* neurons,
  not the layer's common scale (that part a learning rate absorbs).
* ``sqrt_d``: the ratio after multiplying neuron i's gradient by sqrt(d_i)
  itself, the whole factor BatchNorm added; about 1.
* the output layer's ratio, and the within-layer skew slope
  (``so.leaf_skew_slope``) of the raw and density-corrected gradient.

Writes ``<out>/premise.json`` and ``<out>/premise.png`` and prints the table
beside the paper's numbers and 1/sqrt(1-s).
"""

from __future__ import annotations

import argparse
import functools
import gzip
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sparseopt_jax as so

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402  (benchmarks/ is not a package)

SPARSITIES = (0.3, 0.5, 0.7, 0.8, 0.9)
# SparseOpt's Figure 3 (MNIST, two-layer MLP), read from the paper.
PAPER = {
    "bn": (1.23, 1.54, 1.99, 2.40, 3.55),
    "no_bn": (1.05, 1.00, 1.08, 1.08, 1.05),
}
BN_TOLERANCE = 0.15  # |ratio / theory - 1| at every sparsity
NO_BN_RANGE = (0.9, 1.15)


def load_images(
    data_dir: str, count: int, normalise: str = "global"
) -> tuple[np.ndarray, np.ndarray]:
  """The first ``count`` Fashion-MNIST training images (flat) and labels.

  ``normalise``: ``"global"`` standardises with one mean and std over all
  pixels (as torchvision's MNIST recipes do), ``"pixel"`` each pixel apart.
  """

  def read(name, header, shape):
    with gzip.open(os.path.join(data_dir, name)) as f:
      raw = np.frombuffer(f.read(), np.uint8, offset=header)
    return raw.reshape(shape)

  images = read("train-images-idx3-ubyte.gz", 16, (-1, 784))[:count]
  labels = read("train-labels-idx1-ubyte.gz", 8, (-1,))[:count]
  x = images.astype(np.float32) / 255.0
  if normalise == "pixel":
    x = (x - x.mean(0)) / (x.std(0) + 1e-3)
  else:
    x = (x - x.mean()) / x.std()
  return x, labels.astype(np.int32)


def init_params(seed: int, hidden: int) -> dict:
  """LeCun-normal kernels (Flax Dense's default), zero bias; drawn with numpy."""
  rng = np.random.default_rng((seed, 1))
  normal = lambda *shape: rng.standard_normal(shape, np.float32)  # noqa: E731
  return {
      "hidden": {"kernel": normal(784, hidden) / np.float32(28.0)},
      "out": {
          "kernel": normal(hidden, 10) / np.float32(math.sqrt(hidden)),
          "bias": np.zeros(10, np.float32),
      },
  }


def loss_fn(params, x, y, batch_norm: bool):
  z = x @ params["hidden"]["kernel"]
  if batch_norm:
    z = (z - z.mean(0)) / jnp.sqrt(z.var(0) + 1e-5)
  logits = jax.nn.relu(z) @ params["out"]["kernel"] + params["out"]["bias"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def masked(params, mask):
  return {**params, "hidden": {"kernel": params["hidden"]["kernel"] * mask}}


_DENSITY = so.skew_correct("density")  # reads the masks passed to update()


@functools.partial(jax.jit, static_argnames="batch_norm")
def squared_grads(params, masks, x, y, batch_norm):
  """Per-weight squared gradients averaged over the batches ``x[b], y[b]``."""
  mask = masks["hidden"]["kernel"]
  sparse_params = masked(params, mask)
  density = jnp.mean(mask, axis=0)  # d_i of each hidden neuron

  def one(xb, yb):
    g_dense = jax.grad(loss_fn)(params, xb, yb, batch_norm)
    g_sparse = jax.grad(loss_fn)(sparse_params, xb, yb, batch_norm)
    g_sparse = masked(g_sparse, mask)  # the gradient of the surviving weights
    corrected, _ = _DENSITY.update(
        g_sparse, _DENSITY.init(sparse_params), sparse_params, masks=masks
    )
    return {
        "dense": jnp.square(g_dense["hidden"]["kernel"]),
        "sparse": jnp.square(g_sparse["hidden"]["kernel"]),
        "density": jnp.square(corrected["hidden"]["kernel"]),
        "sqrt_d": jnp.square(g_sparse["hidden"]["kernel"]) * density,
        "out_dense": jnp.square(g_dense["out"]["kernel"]),
        "out_sparse": jnp.square(g_sparse["out"]["kernel"]),
    }

  ms = jax.tree.map(lambda t: t.mean(0), jax.vmap(one)(x, y))
  sums = jax.tree.map(jnp.sum, ms)
  slopes = {
      key: so.leaf_skew_slope(jnp.sqrt(ms[key]), mask)
      for key in ("sparse", "density")
  }
  return sums, slopes, jnp.sum(mask)


def measure(args, x, y, sparsity: float, seed: int, batch_norm: bool) -> dict:
  """One seed: the ratios and the skew slopes."""
  params = init_params(seed, args.hidden)
  masks = so.random_masks(
      params, sparsity, "uniform", sparse_filter="hidden", seed=seed
  )
  rng = np.random.default_rng((seed, 7))
  idx = np.stack([
      rng.choice(len(x), args.batch_size, replace=False)
      for _ in range(args.batches)
  ])
  sums, slopes, active = jax.device_get(
      squared_grads(params, masks, x[idx], y[idx], batch_norm)
  )
  size = {"hidden": 784 * args.hidden, "out": 10 * args.hidden}

  def rms(key, n):
    return math.sqrt(float(sums[key]) / n)

  dense = rms("dense", size["hidden"])
  return {
      "ratio": rms("sparse", active) / dense,
      "ratio_density": rms("density", active) / dense,
      "ratio_sqrt_d": rms("sqrt_d", active) / dense,
      "ratio_out_layer": (
          rms("out_sparse", size["out"]) / rms("out_dense", size["out"])
      ),
      "skew_slope_raw": float(slopes["sparse"]),
      "skew_slope_density": float(slopes["density"]),
  }


def run(args) -> dict:
  x, y = load_images(args.data_dir, args.images, args.normalise)
  rows = []
  for batch_norm in (True, False):
    for s in args.sparsities:
      per_seed = [
          measure(args, x, y, s, seed, batch_norm) for seed in range(args.seeds)
      ]
      row = {"batch_norm": batch_norm, "sparsity": s}
      for key in per_seed[0]:
        values = np.array([p[key] for p in per_seed])
        row[key] = float(values.mean())
        row[f"{key}_std"] = common.sample_std(values)
      row["theory"] = 1.0 / math.sqrt(1.0 - s)
      paper = PAPER["bn" if batch_norm else "no_bn"]
      row["paper"] = paper[SPARSITIES.index(s)] if s in SPARSITIES else None
      row["per_seed_ratio"] = [p["ratio"] for p in per_seed]
      rows.append(row)
  bn = [r for r in rows if r["batch_norm"]]
  no_bn = [r for r in rows if not r["batch_norm"]]
  bars = {
      "bn_max_rel_dev_from_theory": max(
          abs(r["ratio"] / r["theory"] - 1) for r in bn
      ),
      "no_bn_min": min(r["ratio"] for r in no_bn),
      "no_bn_max": max(r["ratio"] for r in no_bn),
  }
  bars["bn_within_15pct"] = bars["bn_max_rel_dev_from_theory"] <= BN_TOLERANCE
  bars["no_bn_within_0.9_1.15"] = (
      NO_BN_RANGE[0] <= bars["no_bn_min"]
      and bars["no_bn_max"] <= NO_BN_RANGE[1]
  )
  return {"rows": rows, "bars": bars}


def table(rows: list[dict]) -> str:
  bn = {r["sparsity"]: r for r in rows if r["batch_norm"]}
  no_bn = {r["sparsity"]: r for r in rows if not r["batch_norm"]}
  lines = [
      (
          "| sparsity | with BN (here) | with BN (paper) | theory 1/sqrt(1-s) |"
          " without BN (here) | without BN (paper) | BN + skew=density |"
          " BN + sqrt(d_i) | skew slope raw / density (BN) |"
      ),
      "|" + "---|" * 9,
  ]
  for s in bn:
    b, n = bn[s], no_bn[s]
    lines.append(
        f"| {s:.1f} | {b['ratio']:.2f} ± {b['ratio_std']:.2f} |"
        f" {common.cell(b['paper'], '{:.2f}')} | {b['theory']:.2f} |"
        f" {n['ratio']:.2f} ± {n['ratio_std']:.2f} |"
        f" {common.cell(n['paper'], '{:.2f}')} | {b['ratio_density']:.2f} |"
        f" {b['ratio_sqrt_d']:.2f} | {b['skew_slope_raw']:+.2f} /"
        f" {b['skew_slope_density']:+.2f} |"
    )
  return "\n".join(lines)


def plot(results: dict, path: str) -> str:
  plt = common.pyplot()
  rows = results["rows"]
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  s_fine = np.linspace(0.0, max(r["sparsity"] for r in rows), 100)
  ax.plot(s_fine, 1 / np.sqrt(1 - s_fine), "k--", lw=1, label="1/sqrt(1-s)")
  for bn, color, name in ((True, "C0", "with BN"), (False, "C1", "without BN")):
    sel = [r for r in rows if r["batch_norm"] == bn]
    s = [r["sparsity"] for r in sel]
    ax.errorbar(
        s,
        [r["ratio"] for r in sel],
        yerr=[r["ratio_std"] for r in sel],
        color=color,
        marker="o",
        capsize=3,
        label=f"{name} (Fashion-MNIST, here)",
    )
    paper = [(r["sparsity"], r["paper"]) for r in sel if r["paper"] is not None]
    ax.plot(
        *zip(*paper),
        color=color,
        marker="x",
        ls=":",
        label=f"{name} (paper, MNIST)",
    )
  # The BatchNorm ratio once corrected: by the density rule, by sqrt(d_i).
  sel = [r for r in rows if r["batch_norm"]]
  density = dict(color="C2", marker="s", ms=7, mfc="none", ls="--")
  sqrt_d = dict(color="C3", marker="^", ms=4)
  for key, style, label in (
      (
          "ratio_density",
          density,
          'with BN, skew="density" (on top of "with BN")',
      ),
      ("ratio_sqrt_d", sqrt_d, "with BN, gradient x sqrt(d_i)"),
  ):
    ax.plot(
        [r["sparsity"] for r in sel],
        [r[key] for r in sel],
        label=label,
        **style,
    )
  cfg = results["config"]
  ax.set_xlabel("sparsity s of the hidden layer")
  ax.set_ylabel("RMS gradient per weight: sparse / dense")
  ax.set_title(
      f"MLP 784-{cfg['hidden']}-10 at init, {cfg['seeds']} seeds x"
      f" {cfg['batches']} batches of {cfg['batch_size']},"
      f" {cfg.get('normalise', 'global')} standardisation",
      fontsize=9,
  )
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  return common.save_figure(fig, path)


def parse(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument(
      "--sparsities", type=float, nargs="+", default=list(SPARSITIES)
  )
  p.add_argument("--seeds", type=int, default=8)
  p.add_argument("--batches", type=int, default=20, help="per seed")
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--hidden", type=int, default=256)
  p.add_argument("--images", type=int, default=60000)
  p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
  p.add_argument(
      "--normalise",
      choices=["global", "pixel"],
      default="global",
      help="input standardisation: one mean/std, or per pixel",
  )
  p.add_argument("--name", default="premise", help="stem of the result files")
  p.add_argument("--smoke", action="store_true", help="tiny, a few seconds")
  p.add_argument("--out", default=os.path.join(HERE, "results"))
  args = p.parse_args(argv)
  if args.smoke:
    args.seeds, args.batches, args.batch_size, args.hidden = 2, 2, 32, 32
    args.images = 2048
  return args


def main(argv=None) -> dict:
  args = parse(argv)  # argparse reads sys.argv for None
  t = time.perf_counter()
  results = {
      **common.results_header("premise", argv),
      "config": {
          k: v for k, v in vars(args).items() if k not in ("out", "name")
      },
      "definition": (
          "per seed: RMS over batches and surviving weights of the sparse"
          " hidden kernel's gradient / RMS over batches and weights of the"
          " dense one, at initialisation (sparse = dense init x mask, same"
          " batches); mean and std over seeds"
      ),
      **run(args),
  }
  common.save_results(results, args.out, args.name, plot, t)
  print(table(results["rows"]))
  print(f"bars: {results['bars']}  ({results['wall_s']:.1f} s)")
  return results


if __name__ == "__main__":
  main()
