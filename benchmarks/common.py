"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import datetime
import json
import os
import platform
import time

import jax


def machine_info() -> dict:
  """Where and when a benchmark ran: platform, CPUs, JAX devices, load."""
  try:
    affinity = len(os.sched_getaffinity(0))
  except AttributeError:  # pragma: no cover - not Linux
    affinity = None
  info = {
      "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
      "platform": platform.platform(),
      "processor": platform.processor() or platform.machine(),
      "python": platform.python_version(),
      "cpu_count": os.cpu_count(),
      "cpus_usable": affinity,
      "jax": jax.__version__,
      "backend": jax.default_backend(),
      "devices": [str(d) for d in jax.devices()],
      "device_kind": jax.devices()[0].device_kind,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }
  try:
    info["loadavg_1_5_15"] = list(os.getloadavg())
  except OSError:  # pragma: no cover
    pass
  try:
    with open("/proc/cpuinfo") as f:
      names = [
          ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")
      ]
    if names:
      info["cpu_model"] = names[0]
  except OSError:  # pragma: no cover
    pass
  return info


def save_results(
    results: dict, out: str, stem: str, plot, t_start: float
) -> tuple[str, str]:
  """Add wall time and end load to ``results``; write ``<out>/<stem>.json`` and ``.png``."""
  results["wall_s"] = time.perf_counter() - t_start
  try:
    results["machine"]["loadavg_end_1_5_15"] = list(os.getloadavg())
  except OSError:  # pragma: no cover
    pass
  os.makedirs(out, exist_ok=True)
  json_path = os.path.join(out, f"{stem}.json")
  with open(json_path, "w") as f:
    json.dump(results, f, indent=1)
  return json_path, plot(results, os.path.join(out, f"{stem}.png"))


def save_figure(fig, path: str) -> str:
  """Lay out, write at 110 dpi and close a matplotlib figure; returns ``path``."""
  import matplotlib.pyplot as plt

  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
