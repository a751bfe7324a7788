"""LayerNorm's gradient skew in a sparse ViT, per layer and per neuron, at init and after RigL.

    python benchmarks/layernorm_skew.py                       # 10 min on 2 shared cores (load 4-8)
    python benchmarks/layernorm_skew.py --smoke --out /tmp/ln  # tiny: one variant, width 16

The derivation is in docs/layernorm_skew.md. A LayerNorm divides all the
features it normalises by one RMS, so a kernel whose output it takes
directly has its gradient scaled by 1/sqrt(D_g), D_g the density of the group
(a layer; a head under QK-norm), and by nothing per neuron. Four ViT variants
(``sparseopt_jax.training.models.ViT``, Fashion-MNIST 28x28, 7x7 patches)
place the norms differently:

* ``pre``: pre-LN blocks (ViT): the norms precede the kernels;
* ``post``: post-LN blocks: a norm takes ``x + branch(x)``;
* ``sandwich``: pre-LN plus a norm on each branch's output (CogView; Swin v2's
  res-post-norm): ``attn/out`` and ``mlp/fc2`` feed a LayerNorm directly;
* ``qknorm``: pre-LN plus QK-norm (ViT-22B): ``attn/query`` and ``attn/key``
  feed a LayerNorm per head.

Measured, on one batch of ``--batch`` training images, the log RMS gradient
per surviving weight of each sparse kernel:

1. **per layer, own density**: every sparse kernel gets its own density,
   log-uniform in [0.02, 0.5] and drawn independently (ERK gives this ViT's
   kernels equal densities within 3%, too little spread to fit), at init and
   after ``--steps`` RigL steps with AdamW (RigL keeps each kernel's count,
   so the densities stay); the slope on log D_l is fitted within each role
   (query, key, value, out, fc1, fc2: one intercept per role, pooled over
   blocks), raw and after each correction;
2. **per layer, one common density** (appendix D's uniform sparsity s): every
   kernel at density 1 - s for s in 0 ... 0.98; slope per role on log(1 - s);
3. **per head** (``qknorm``): each head of the query and key kernels gets its
   own density, log-uniform in [0.02, 0.5], in each of the ``--draws`` draws;
   slope of the head's log RMS on log D_h within each kernel, pooled;
4. **per neuron**: within each kernel, the slope on log d_i, fitted on
   density bins (neurons grouped into ``--bins`` quantile bins of d_i, the
   bin's squared gradients pooled): ``so.skew_slope``'s per-neuron log reads
   +0.1 to +0.5 on a density-independent gradient at this ViT's 5-60 weights
   per neuron (the log of a small-sample mean square is biased low), so it is
   not used here.

Writes ``<out>/layernorm_skew.json`` and ``.png`` and prints the slope tables.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sparseopt_jax as so
from sparseopt_jax.training import input as data
from sparseopt_jax.training import models

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402  (benchmarks/ is not a package)

VARIANTS = {
    "pre": dict(norm_position="pre"),
    "post": dict(norm_position="post"),
    "sandwich": dict(norm_position="sandwich"),
    "qknorm": dict(norm_position="pre", qk_norm=True),
}
ROLES = ("query", "key", "value", "out", "fc1", "fc2")


def role_of(path: str) -> str:
  return path.split("/")[-2]


def pooled_slope(groups: dict) -> float:
  """Least-squares slope with one intercept per group: ``{group: (x, y)}``."""
  xs, ys = [], []
  for x, y in groups.values():
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) > 1:
      xs.append(x - x.mean())
      ys.append(y - y.mean())
  if not xs:
    return float("nan")
  x, y = np.concatenate(xs), np.concatenate(ys)
  return (
      float((x * y).sum() / (x * x).sum())
      if (x * x).sum() > 1e-12
      else (float("nan"))
  )


def designed_distribution(shapes, rng, low=0.02, high=0.5) -> dict:
  """Per sparse kernel, a sparsity with density log-uniform in [low, high]."""
  return {
      re.escape(p)
      + "$": float(1.0 - np.exp(rng.uniform(np.log(low), np.log(high))))
      for p in shapes
  }


def per_head_masks(params, masks, rng, low=0.02, high=0.5):
  """``masks`` with each head of every query/key kernel at its own density."""
  flat = common.by_path(masks)
  out = {}
  for path, m in flat.items():
    if m is None or role_of(path) not in ("query", "key"):
      out[path] = m
      continue
    c, h, dh = m.shape
    d = np.exp(rng.uniform(np.log(low), np.log(high), h))
    scores = rng.random((c * dh, h))
    keep = np.maximum(1, np.round(d * c * dh)).astype(int)
    ranks = scores.argsort(0).argsort(0)
    new = (ranks < keep[None]).reshape(c, dh, h).transpose(0, 2, 1)
    out[path] = jnp.asarray(new)
  # ``out`` holds the leaves in ``masks``' own order (that of ``by_path``).
  treedef = jax.tree.structure(masks, is_leaf=so.tree.is_none)
  return jax.tree.unflatten(treedef, list(out.values()))


class Probe:
  """The model, a batch, and a jitted gradient of the loss for given masks."""

  def __init__(self, variant, args, batch):
    self.model = models.ViT(
        num_classes=10,
        width=args.width,
        depth=args.depth,
        num_heads=args.heads,
        patch_size=7,
        **VARIANTS[variant],
    )
    self.batch = batch
    key = jax.random.key(args.seed, impl="rbg")
    self.params = jax.jit(self.model.init)(key, batch["image"][:1])["params"]
    self.ln = so.ln_leaves(self.model, batch["image"][:1])
    self.filter = so.tree.make_sparse_filter(models.VIT_SPARSE_FILTER)
    self.shapes = so.tree.sparse_shapes(self.params, self.filter)

    def loss(params, batch):
      logits = self.model.apply({"params": params}, batch["image"])
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, batch["label"]
      ).mean()

    self.loss = loss
    self.grad = jax.jit(jax.grad(loss))

  def random_masks(self, sparsity, distribution, seed):
    """Random masks of the sparse kernels (``models.VIT_SPARSE_FILTER``)."""
    return so.random_masks(
        self.params,
        sparsity,
        distribution=distribution,
        sparse_filter=models.VIT_SPARSE_FILTER,
        seed=seed,
    )

  def grads(self, params, masks):
    return self.grad(so.apply_masks(params, masks), self.batch)

  def corrected(self, grads, masks, mode):
    """``grads`` after the skew stage named ``mode`` (``"none"``: raw)."""
    if mode == "none":
      return grads
    ln = {"layernorm": self.ln, "layernorm_branch": branch_leaves(self.ln)}
    tx = so.skew_correct(
        "density" if mode == "density" else "layernorm", ln_leaves=ln.get(mode)
    )
    out, _ = tx.update(grads, tx.init(grads), masks=masks)
    return out


def branch_leaves(ln: dict) -> dict:
  """``ln`` plus the kernels upstream on the same homogeneous branch into the norm.

  A norm at the end of a branch divides by the branch output's RMS, which scales
  as the product of sqrt(D) over every kernel on a positively homogeneous path
  into it (the attention's value path is linear in the values; GELU is close to
  homogeneous), so each of them carries its own 1/sqrt(D_l)
  (docs/layernorm_skew.md): for this ViT, ``attn/value`` before ``attn/out`` and
  ``mlp/fc1`` before ``mlp/fc2``.
  """
  out = dict(ln)
  for path, k in ln.items():
    for tail, up in (
        ("attn/out/kernel", "attn/value/kernel"),
        ("mlp/fc2/kernel", "mlp/fc1/kernel"),
    ):
      if path.endswith(tail):
        out[path[: -len(tail)] + up] = None if k == 1 else k
  return out


def corrections(probe) -> tuple:
  """The corrections that apply: the layernorm ones only where a norm follows a kernel."""
  modes = ("none", "density")
  if probe.ln:
    modes += ("layernorm",)
    if branch_leaves(probe.ln) != probe.ln:
      modes += ("layernorm_branch",)
  return modes


def layer_table(grads, masks):
  """Per sparse kernel: (role, log D_l, log RMS gradient per surviving weight)."""
  g, out = common.by_path(grads), {}
  for path, m in common.by_path(masks).items():
    if m is None:
      continue
    m = np.asarray(m, bool)
    x = np.asarray(g[path], np.float64)
    out[path] = (
        role_of(path),
        float(np.log(m.mean())),
        float(0.5 * np.log((x[m] ** 2).mean())),
    )
  return out


def neuron_bins(grad, mask, path, bins):
  """Quantile bins of d_i within one kernel: (log relative density, log RMS) per bin."""
  axes = so.tree.neuron_axes(path, mask.ndim)
  red = so.tree.reduce_axes(mask.ndim, axes)
  m = np.asarray(mask, bool)
  g2 = np.asarray(grad, np.float64) ** 2 * m
  kept = m.sum(red).reshape(-1).astype(float)
  ss = g2.sum(red).reshape(-1)
  fan_in = m.size / kept.size
  ok = kept > 0
  kept, ss = kept[ok], ss[ok]
  order = np.argsort(kept, kind="stable")
  xs, ys = [], []
  for idx in np.array_split(order, bins):
    if len(idx) == 0 or kept[idx].sum() == 0 or ss[idx].sum() == 0:
      continue
    xs.append(np.log(kept[idx].mean() / fan_in))
    ys.append(0.5 * np.log(ss[idx].sum() / kept[idx].sum()))
  mean_d = np.log(kept.mean() / fan_in)
  return np.array(xs) - mean_d, np.array(ys)


def head_groups(grads, masks) -> dict:
  """QK-norm's groups: per query/key kernel, (log D_h, log RMS over head h)."""
  g, groups = common.by_path(grads), {}
  for path, m in common.by_path(masks).items():
    if m is None or role_of(path) not in ("query", "key"):
      continue
    m = np.asarray(m, bool)
    x = (np.asarray(g[path], np.float64) ** 2 * m).sum(axis=(0, 2))
    kept = m.sum(axis=(0, 2))
    ok = (kept > 0) & (
        x > 0
    )  # an empty head, or one with no gradient, has no log
    d = kept[ok] / (m.shape[0] * m.shape[2])
    groups[path] = (np.log(d), 0.5 * np.log(x[ok] / kept[ok]))
  return groups


def head_slopes(grads, masks) -> tuple[float, dict]:
  """Slope of log RMS per head on log D_h within each query/key kernel, pooled."""
  groups = head_groups(grads, masks)
  return pooled_slope(groups), {
      p: {"log_density": v[0].tolist(), "log_rms": v[1].tolist()}
      for p, v in groups.items()
  }


def train_rigl(probe, distribution, args, seed):
  """``args.steps`` RigL steps (AdamW) from init; returns (params, masks) at the end."""
  tx = optax.chain(
      so.sparseopt(
          0.9,
          distribution=distribution,
          sparse_filter=models.VIT_SPARSE_FILTER,
          topology="rigl",
          update_every=args.update_every,
          end_step=args.steps + 1,
          skew=None,
          seed=seed,
      ),
      optax.adamw(args.lr, weight_decay=0.05),
  )
  state = tx.init(probe.params)
  params = so.apply_masks(probe.params, state)
  ds = data.load("fashion_mnist", train_subset=args.train_subset)

  def step(params, state, batch, mask_update):
    grads = jax.grad(probe.loss)(params, batch)
    updates, state = tx.update(grads, state, params, mask_update=mask_update)
    return so.apply_updates(params, updates, state, mask_update=mask_update)

  step = jax.jit(step, static_argnums=3)
  for i, batch in enumerate(
      ds.train_batches(args.train_batch, seed=args.seed + 1)
  ):
    if i >= args.steps:
      break
    update = so.is_mask_update_step(
        i, update_every=args.update_every, end_step=args.steps + 1
    )
    params, state = step(params, state, batch, update)
  return params, so.get_masks(state)


def _accumulate(points: dict, table: dict) -> None:
  """Appends each kernel's (x, y) in ``table`` to its points in ``points``."""
  for path, (role, x, y) in table.items():
    entry = points.setdefault(path, {"role": role, "x": [], "y": []})
    entry["x"].append(x)
    entry["y"].append(y)


def _slopes(points: dict) -> dict:
  """Per role and pooled: slope of y on x with one intercept per kernel."""
  out = {}
  for role in ROLES:
    groups = {
        p: (e["x"], e["y"]) for p, e in points.items() if e["role"] == role
    }
    if groups:
      out[role] = pooled_slope(groups)
  out["pooled"] = pooled_slope({p: (e["x"], e["y"]) for p, e in points.items()})
  fed = {p: (e["x"], e["y"]) for p, e in points.items() if e.get("ln")}
  rest = {p: (e["x"], e["y"]) for p, e in points.items() if not e.get("ln")}
  out["ln_fed"] = pooled_slope(fed) if fed else None
  out["not_ln_fed"] = pooled_slope(rest) if rest else None
  return out


def measure_variant(variant, args, batch, log) -> dict:
  probe = Probe(variant, args, batch)
  rng = np.random.default_rng(args.seed)
  modes = corrections(probe)
  res = {
      "ln_leaves": probe.ln,
      "branch_leaves": branch_leaves(probe.ln),
      "corrections": list(modes),
  }
  dists = [designed_distribution(probe.shapes, rng) for _ in range(args.draws)]

  # 1. Own layer densities: each kernel at several densities (one per draw),
  #    slopes within each kernel; per neuron on the same gradients.
  for when, n_draws in (("init", args.draws), ("rigl", args.rigl_draws)):
    points = {m: {} for m in modes}
    neuron_groups, curves = {}, {}
    for r in range(min(n_draws, len(dists))):
      if when == "rigl":
        params, masks = train_rigl(probe, dists[r], args, seed=args.seed + r)
      else:
        params = probe.params
        masks = probe.random_masks(0.9, dists[r], seed=args.seed + r)
      grads = probe.grads(params, masks)
      for mode in modes:
        _accumulate(
            points[mode],
            layer_table(probe.corrected(grads, masks, mode), masks),
        )
      g = common.by_path(grads)
      for path, m in common.by_path(masks).items():
        if m is None:
          continue
        x, y = neuron_bins(g[path], m, path, args.bins)
        neuron_groups.setdefault(role_of(path), {})[f"{path}#{r}"] = (x, y)
        if r == 0:
          curves[path] = {"log_density": x.tolist(), "log_rms": y.tolist()}
    res[f"layer_{when}"] = {}
    for mode, pts in points.items():
      for path, e in pts.items():
        e["ln"] = path in probe.ln
      res[f"layer_{when}"][mode] = {"slopes": _slopes(pts), "points": pts}
    n_slopes = {
        r: pooled_slope(neuron_groups[r]) for r in ROLES if r in neuron_groups
    }
    n_slopes["pooled"] = pooled_slope(
        {k: v for grp in neuron_groups.values() for k, v in grp.items()}
    )
    res[f"neuron_{when}"] = {"slopes": n_slopes, "curves": curves}
    log(
        f"  {variant} {when}: per layer raw"
        f" {res[f'layer_{when}']['none']['slopes']['pooled']:+.3f}, per neuron"
        f" {n_slopes['pooled']:+.3f}"
    )

  # 2. One common density (uniform sparsity s), appendix D's setting.
  sweep = {}
  for density in args.densities:
    masks = probe.random_masks(max(0.0, 1.0 - density), "uniform", args.seed)
    table = layer_table(probe.grads(probe.params, masks), masks)
    # Against the common density, not each kernel's realised one.
    x = float(np.log(density))
    _accumulate(sweep, {p: (role, x, y) for p, (role, _, y) in table.items()})
  res["uniform_sweep"] = {"slopes": _slopes(sweep), "points": sweep}

  # 3. Per head, for QK-norm: each head of the query/key kernels at its own
  #    density, over the same draws; slopes within each kernel, pooled.
  if variant == "qknorm":
    groups = {m: {} for m in modes}
    for r in range(args.draws):
      masks = per_head_masks(
          probe.params,
          probe.random_masks(0.9, dists[r], seed=args.seed + r),
          rng,
      )
      grads = probe.grads(probe.params, masks)
      for mode in modes:
        for p, v in head_groups(
            probe.corrected(grads, masks, mode), masks
        ).items():
          groups[mode][f"{p}#{r}"] = v
    res["head_init"] = {
        mode: {
            "slope": pooled_slope(groups[mode]),
            "per_draw": [
                pooled_slope({
                    k: v for k, v in groups[mode].items() if k.endswith(f"#{r}")
                })
                for r in range(args.draws)
            ],
            "curves": {
                p: {"log_density": v[0].tolist(), "log_rms": v[1].tolist()}
                for p, v in groups[mode].items()
            },
        }
        for mode in modes
    }
  return res


def markdown(results: dict) -> str:
  f = functools.partial(common.cell, spec="{:+.2f}")  # a slope, or a dash
  modes = ("none", "density", "layernorm", "layernorm_branch")
  lines = [
      (
          "Per layer, own density: slope of log RMS gradient per surviving"
          " weight on log D_l, within each kernel, pooled over the sparse"
          " kernels (n/a: the mode does not apply, no kernel feeds a norm):"
      ),
      "",
      (
          "| variant | kernels feeding a norm | when | raw | density |"
          " layernorm | layernorm (branch) |"
      ),
      "|---|---|---|---|---|---|---|",
  ]
  for v, r in results["variants"].items():
    fed = sorted({role_of(p) for p in r["ln_leaves"]}) or ["none"]
    for when in ("init", "rigl"):
      cells = [
          f(r[f"layer_{when}"][m]["slopes"]["pooled"])
          if m in r[f"layer_{when}"]
          else "n/a"
          for m in modes
      ]
      lines.append(
          f"| {v} | {', '.join(fed)} |"
          f" {'init' if when == 'init' else 'after RigL'} | "
          + " | ".join(cells)
          + " |"
      )
  lines += [
      "",
      (
          "Per role: own density at init (raw, density, layernorm, layernorm"
          " branch) and after RigL (raw); one common density 1 - s (raw, init);"
          " per neuron within a kernel (raw, init / after RigL):"
      ),
      "",
      (
          "| variant | role | raw | density | layernorm | LN branch | raw after"
          " RigL | common 1-s | per neuron init | per neuron RigL |"
      ),
      "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for v, r in results["variants"].items():
    init = r["layer_init"]
    for role in ROLES:
      cells = [
          f(init[m]["slopes"].get(role)) if m in init else "n/a" for m in modes
      ]
      lines.append(
          f"| {v} | {role} | "
          + " | ".join(cells)
          + f" | {f(r['layer_rigl']['none']['slopes'].get(role))} |"
          f" {f(r['uniform_sweep']['slopes'].get(role))} |"
          f" {f(r['neuron_init']['slopes'].get(role))} |"
          f" {f(r['neuron_rigl']['slopes'].get(role))} |"
      )
  q = results["variants"].get("qknorm", {}).get("head_init")
  if q:
    lines += [
        "",
        (
            "Per head (qknorm; query and key kernels, each head at its own"
            f" density, init): raw {f(q['none']['slope'])}, density"
            f" {f(q['density']['slope'])}, layernorm"
            f" {f(q['layernorm']['slope'])}"
        ),
    ]
  return "\n".join(lines)


def plot(results: dict, path: str) -> str:
  plt = common.pyplot()
  variants = list(results["variants"])
  fig, axes = common.panel_grid(3, len(variants), 4.2, 3.5)
  colors = dict(zip(ROLES, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
  for j, v in enumerate(variants):
    r = results["variants"][v]
    for i, when in enumerate(("init", "rigl")):
      ax = axes[i, j]
      for mode, marker in (("none", "o"), ("layernorm", "x")):
        layer = r[f"layer_{when}"].get(mode)
        if layer is None:
          continue
        for e in layer["points"].values():
          x, y = np.asarray(e["x"]), np.asarray(e["y"])
          if len(x) == 0:
            continue
          ax.scatter(
              x - x.mean(),
              y - y.mean(),
              marker=marker,
              color=colors[e["role"]],
              s=14,
              alpha=1.0 if mode == "none" else 0.5,
          )
      sl = r[f"layer_{when}"]
      title = f"{v}, {'init' if when == 'init' else 'after RigL'}: raw"
      title += f" {sl['none']['slopes']['pooled']:+.2f}"
      if "layernorm" in sl:
        title += f", LN-corr {sl['layernorm']['slopes']['pooled']:+.2f}"
      ax.set_title(title, fontsize=9)
      ax.set_xlabel("log D_l (centred per kernel)")
      ax.set_ylabel("log RMS grad / weight (centred)")
      ax.grid(alpha=0.3)
    ax = axes[2, j]
    for p, c in r["neuron_rigl"]["curves"].items():
      y = np.asarray(c["log_rms"])
      ax.plot(
          c["log_density"],
          y - y.mean(),
          "-",
          color=colors[role_of(p)],
          alpha=0.6,
          lw=1,
      )
    ax.set_title(
        f"{v}, per neuron after RigL: slope"
        f" {r['neuron_rigl']['slopes']['pooled']:+.2f}",
        fontsize=9,
    )
    ax.set_xlabel("log (d_i / mean d), density bins")
    ax.set_ylabel("log RMS grad / weight (centred)")
    ax.grid(alpha=0.3)
  handles = [
      plt.Line2D([], [], color=colors[r], marker="o", ls="", label=r)
      for r in ROLES
  ]
  handles.append(
      plt.Line2D(
          [], [], color="k", marker="x", ls="", label="layernorm-corrected"
      )
  )
  axes[0, 0].legend(handles=handles, fontsize=7)
  fig.suptitle(
      "LayerNorm skew in a sparse ViT (Fashion-MNIST). Rows 1-2: per layer,"
      " each kernel at several densities; row 3: per neuron"
  )
  return common.save_figure(fig, path)


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument(
      "--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS)
  )
  p.add_argument("--width", type=int, default=128)
  p.add_argument("--depth", type=int, default=4)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--batch", type=int, default=256, help="probe batch")
  p.add_argument(
      "--draws", type=int, default=6, help="density draws per kernel at init"
  )
  p.add_argument(
      "--rigl-draws",
      type=int,
      default=2,
      help="density draws (one RigL run each) after RigL",
  )
  p.add_argument("--steps", type=int, default=60, help="RigL steps per run")
  p.add_argument("--update-every", type=int, default=15)
  p.add_argument("--train-batch", type=int, default=128)
  p.add_argument("--train-subset", type=int, default=None)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--bins", type=int, default=8)
  p.add_argument(
      "--densities",
      type=float,
      nargs="+",
      default=[1.0, 0.5, 0.2, 0.1, 0.05, 0.02],
  )
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--smoke", action="store_true", help="tiny widths and steps")
  p.add_argument("--out", default=os.path.join(HERE, "results"))
  args = p.parse_args(argv)
  if args.smoke:
    args.variants = ["qknorm"]
    args.width, args.depth, args.heads, args.batch = 16, 2, 2, 16
    args.steps, args.update_every, args.train_batch = 4, 2, 8
    args.draws, args.rigl_draws = 2, 1
    args.train_subset, args.bins = 256, 3
    args.densities = [1.0, 0.2]
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)  # argparse reads sys.argv for None
  t0 = time.perf_counter()
  ds = data.load("fashion_mnist", train_subset=args.train_subset)
  batch = next(ds.train_batches(args.batch, seed=args.seed + 1000))
  results = {
      **common.results_header("layernorm_skew", argv),
      "config": {k: v for k, v in vars(args).items() if k != "out"},
      "variants": {},
  }
  for v in args.variants:
    results["variants"][v] = measure_variant(v, args, batch, print)
  table = markdown(results)
  results["table"] = table
  json_path, png = common.save_results(
      results, args.out, "layernorm_skew", plot, t0
  )
  print(table)
  print(json_path, png)
  return results


if __name__ == "__main__":
  main()
