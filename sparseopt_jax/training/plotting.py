"""Read runs' ``metrics.jsonl`` and draw them into one PNG."""

from __future__ import annotations

import os
from collections.abc import Sequence

from sparseopt_jax.training import workdir as workdir_lib


class PlotError(ValueError):
  """Bad plot arguments (labels, metric, runs): the command line prints it and exits 2."""


def read_metrics(run_dir: str) -> list[dict]:
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.exists(path):
    raise PlotError(
        f"{path} does not exist: is {run_dir!r} a training workdir?"
    )
  # A torn last line (a run killed mid-append) is left out, as a resume drops it.
  return workdir_lib.read_rows(path)[0]


def _config(run_dir: str) -> dict | None:
  try:
    return workdir_lib.stored_config(run_dir)
  except workdir_lib.UserError:  # only labels and the title come from it
    return None


def run_label(run_dir: str) -> str:
  """A legend label from the run's config.json: dense, or topology / skew / sparsity."""
  cfg = _config(run_dir)
  if cfg is None:
    return os.path.basename(os.path.normpath(run_dir))
  if cfg.get("dense"):
    return "dense SGD"
  return f"{cfg['topology']} {cfg['sparsity']:.0%} skew={cfg['skew']}"


def default_title(run_dirs: Sequence[str], rows: Sequence[list[dict]]) -> str:
  """Data set, model, sparsity and steps, from what the runs' configs share."""
  cfgs = [c for c in map(_config, run_dirs) if c is not None]
  steps = max((r[-1]["step"] for r in rows if r), default=0)
  parts = []
  for key, fmt in (("dataset", "{}"), ("model", "{}"), ("width", "width {}")):
    values = {c.get(key) for c in cfgs}
    if len(values) == 1 and None not in values:
      parts.append(fmt.format(values.pop()))
  sparse = {
      (c["sparsity"], c["distribution"]) for c in cfgs if not c.get("dense")
  }
  if len(sparse) == 1:
    sparsity, distribution = sparse.pop()
    parts.append(f"{sparsity:.0%} {distribution.upper()} sparsity")
  parts.append(f"{steps} steps")
  return ", ".join(parts)


STYLES = [("-", "o"), ("--", "s"), ("-.", "^"), (":", "D")]


def plot_runs(
    run_dirs: Sequence[str],
    out: str,
    metric: str = "test_accuracy",
    labels: Sequence[str] | None = None,
    title: str | None = None,
) -> str:
  """Draw ``metric`` against step for each run; returns the path written.

  ``out`` without an extension gets ``.png``. Raises PlotError for labels that do
  not match the runs one to one, or a metric that no run recorded.
  """
  if labels is not None and len(labels) != len(run_dirs):
    raise PlotError(
        f"--labels gives {len(labels)} labels for {len(run_dirs)} runs; give"
        " one per run, in the same order"
    )
  all_rows = [read_metrics(d) for d in run_dirs]
  known = sorted({k for rows in all_rows for r in rows for k in r})
  if not any(metric in r for rows in all_rows for r in rows):
    raise PlotError(
        f"no run recorded the metric {metric!r}; metrics.jsonl has {known}"
    )
  if not os.path.splitext(out)[1]:
    out += ".png"
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  for i, (run_dir, rows) in enumerate(zip(run_dirs, all_rows)):
    rows = [r for r in rows if r.get(metric) is not None]  # null: undefined
    line, marker = STYLES[i % len(STYLES)]
    ax.plot(
        [r["step"] for r in rows],
        [r[metric] for r in rows],
        ls=line,
        marker=marker,
        markersize=5,
        alpha=0.85,
        label=labels[i] if labels else run_label(run_dir),
    )
  ax.set_xlabel("step")
  ax.set_ylabel(metric.replace("_", " "))
  ax.set_title(title or default_title(run_dirs, all_rows), fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  try:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=120)
  except OSError as e:
    raise PlotError(f"cannot write the plot {out}: {e.strerror or e}") from None
  finally:
    plt.close(fig)
  return out
