"""Read runs' ``metrics.jsonl`` and draw them into one PNG."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence


def read_metrics(run_dir: str) -> list[dict]:
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: is {run_dir!r} a training workdir?")
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def run_label(run_dir: str) -> str:
  """A legend label from the run's config.json: dense, or topology / skew / sparsity."""
  try:
    with open(os.path.join(run_dir, "config.json")) as f:
      cfg = json.load(f)
  except FileNotFoundError:
    return os.path.basename(os.path.normpath(run_dir))
  if cfg.get("dense"):
    return "dense SGD"
  return f"{cfg['topology']} {cfg['sparsity']:.0%} skew={cfg['skew']}"


def plot_runs(run_dirs: Sequence[str], out: str, metric: str = "test_accuracy",
              labels: Sequence[str] | None = None) -> str:
  """Draw ``metric`` against step for each run; returns the PNG path."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  for i, run_dir in enumerate(run_dirs):
    rows = [r for r in read_metrics(run_dir) if metric in r]
    label = labels[i] if labels else run_label(run_dir)
    ax.plot([r["step"] for r in rows], [r[metric] for r in rows], marker="o", label=label)
  ax.set_xlabel("step")
  ax.set_ylabel(metric.replace("_", " "))
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=120)
  plt.close(fig)
  return out
