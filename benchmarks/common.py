"""Helpers shared by the benchmark scripts, so that each script reads as its experiment.

A benchmark script imports this module after putting ``benchmarks/`` on the
path (``benchmarks/`` is not a package)::

  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import common  # noqa: E402

and is laid out as

* **command line**: :func:`make_parser` (``--smoke``, ``--out``, ``--tag``),
  :func:`add_seed_and_data`, :func:`add_sparse_options` (``--skew``,
  ``--topology``, their choices taken from the library), then
  :func:`fill_defaults` for the options whose default depends on ``--smoke``;
* **the training program**: :func:`data_and_setup` (a preset's data set and
  ``train.Setup``) and :func:`by_path` (a tree's leaves by path);
* **measuring**: :func:`timed` (wall and CPU seconds of one call, blocked on
  its result) and :func:`log`;
* **results**: :func:`results_header` (benchmark, machine, command, smoke,
  args) at the start, :func:`save_results` (wall time, end load, JSON and
  figure) at the end, or :func:`write_json` where a script writes its JSON
  itself;
* **summaries**: :func:`sample_std` (the spread over seeds),
  :func:`null_if_undefined` (a row's undefined figures as JSON nulls) and
  :func:`cell` (a table cell, a dash where undefined);
* **figures**: :func:`pyplot` (matplotlib, headless), :func:`panel_grid` (a
  figure of equal panels) and :func:`save_figure`.

Every result JSON records where and when it ran (:func:`machine_info`) and the
exact command (:func:`command`), so a figure in the README can be traced back
to its run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import numpy as np

from sparseopt_jax import tree as tree_lib
from sparseopt_jax.composite import GROW_WITH
from sparseopt_jax.skew import SKEW_MODES
from sparseopt_jax.topology import TOPOLOGIES

HERE = os.path.dirname(os.path.abspath(__file__))
# The checkout: paths inside it are recorded relative to it (see recorded_args).
ROOT = os.path.dirname(HERE)
# Where the result JSONs and figures the README shows live (``--out`` default).
RESULTS_DIR = os.path.join(HERE, "results")
# ``--skew none`` on the command line is ``skew=None`` (no correction).
NO_SKEW = "none"
# ``--skew``'s choices for a network with BatchNorm after its sparse layers (a
# ResNet): the density rule, and the one that reads the BatchNorm statistics.
BN_SKEW_MODES = ("density", "bn")

# ---------------------------------------------------------------------------
# Machine


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


def record_end_load(machine: dict) -> None:
  """Adds the load average at the end of the run to ``machine`` (in place)."""
  try:
    machine["loadavg_end_1_5_15"] = list(os.getloadavg())
  except OSError:  # pragma: no cover
    pass


# ---------------------------------------------------------------------------
# Command line


def make_parser(
    doc: str, stem: str, *, smoke: str = "a tiny run"
) -> argparse.ArgumentParser:
  """A parser with the options every benchmark has.

  Args:
    doc: the script's docstring; its first paragraph is the description.
    stem: the name of the output files, ``<out>/<stem><tag>.json`` / ``.png``.
    smoke: what ``--smoke`` runs (its help).

  Returns:
    A parser with ``--smoke``, ``--out`` (default ``benchmarks/results``) and
    ``--tag``; the script adds its own options.
  """
  p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
  p.add_argument("--smoke", action="store_true", help=smoke)
  p.add_argument(
      "--out", default=RESULTS_DIR, help=f"directory of {stem}<tag>.json / .png"
  )
  p.add_argument(
      "--tag", default="", help=f"suffix of the output files: {stem}<tag>.json"
  )
  return p


def add_seed_and_data(p: argparse.ArgumentParser, seed: int = 0) -> None:
  """``--seed`` and ``--data-dir`` (the datasets' directory; default: offline Fashion-MNIST)."""
  p.add_argument("--seed", type=int, default=seed)
  p.add_argument("--data-dir", default=None)


def add_sparse_options(
    p: argparse.ArgumentParser,
    *,
    skew: str = "density",
    skew_help: str | None = None,
    skew_modes: Sequence[str] = SKEW_MODES,
    topology: str = "rigl",
    grow_with: bool = False,
) -> None:
  """``--skew`` (``none`` or a library mode) and ``--topology``; ``--grow-with`` too if asked.

  The choices are the library's own (``SKEW_MODES``, ``TOPOLOGIES``,
  ``GROW_WITH``), or for ``--skew`` the ``skew_modes`` that fit the
  benchmark's network. Turn ``args.skew`` into the config's value with
  :func:`skew_value`.
  """
  p.add_argument(
      "--skew",
      choices=[NO_SKEW, *skew_modes],
      default=skew,
      help=skew_help,
  )
  p.add_argument("--topology", choices=list(TOPOLOGIES), default=topology)
  if grow_with:
    p.add_argument("--grow-with", choices=list(GROW_WITH), default="raw")


def skew_value(arg: str) -> str | None:
  """The ``skew`` of a config for a ``--skew`` argument (``none`` -> None)."""
  return None if arg == NO_SKEW else arg


def fill_defaults(
    args: argparse.Namespace, **defaults: tuple[Any, Any]
) -> None:
  """Fills each option left at None with its (full, smoke) default, in place.

  ``fill_defaults(args, steps=(300, 4))`` sets ``args.steps`` to 300, or to 4
  with ``--smoke``, unless it was given. The filled values are what the result
  JSON records as ``args``.
  """
  for name, (full, smoke) in defaults.items():
    if getattr(args, name) is None:
      setattr(args, name, smoke if args.smoke else full)


def command(script: str, argv: Sequence[str] | None) -> str:
  """The command line that ran ``benchmarks/<script>.py`` (recorded in the JSON)."""
  argv = sys.argv[1:] if argv is None else argv
  return f"python benchmarks/{script}.py " + " ".join(argv)


# ---------------------------------------------------------------------------
# The training program


def data_and_setup(cfg):
  """The data set and the training program's ``train.Setup`` for a preset's ``cfg``.

  Built as a training run builds them (``cfg.dataset`` from ``cfg.data_dir``,
  ``cfg.train_subset`` of it; the model, optimizer and schedules for
  ``cfg.batch_size``), so that a benchmark measures what training runs.
  """
  from sparseopt_jax.training import input as input_lib
  from sparseopt_jax.training import train

  dataset = input_lib.load(
      cfg.dataset, data_dir=cfg.data_dir, train_subset=cfg.train_subset
  )
  steps_per_epoch = dataset.steps_per_epoch(cfg.batch_size)
  return dataset, train.make_setup(cfg, dataset.info, steps_per_epoch)


def by_path(tree) -> dict[str, Any]:
  """Each leaf of ``tree`` by its path, ``"stage1_0/conv1/kernel"``.

  None leaves (the mask of a dense leaf) are kept, as None.
  """
  return {
      tree_lib.path_str(p): x
      for p, x in jax.tree_util.tree_leaves_with_path(
          tree, is_leaf=tree_lib.is_none
      )
  }


# ---------------------------------------------------------------------------
# Measuring


def log(message: str) -> None:
  """Prints a progress line at once (benchmarks run for minutes)."""
  print(message, flush=True)


def timed(fn: Callable[..., Any], *args, **kwargs) -> tuple[Any, float, float]:
  """``fn(*args, **kwargs)``, blocked on: (result, wall seconds, CPU seconds of this process).

  Blocking (``jax.block_until_ready`` of the whole result) makes the wall time
  the time of the computation, not of its asynchronous dispatch; the CPU time
  tells a slow step from a machine busy with other work.
  """
  t0, c0 = time.perf_counter(), time.process_time()
  out = jax.block_until_ready(fn(*args, **kwargs))
  return out, time.perf_counter() - t0, time.process_time() - c0


# ---------------------------------------------------------------------------
# Results


def results_header(
    benchmark: str,
    argv: Sequence[str] | None,
    args: argparse.Namespace | None = None,
    machine: dict | None = None,
) -> dict:
  """The first keys of a result JSON: benchmark, machine, command, smoke, args.

  Call it (or :func:`machine_info`) at the start of the run, so that the
  recorded load and date are the start's; :func:`save_results` adds the end's.
  """
  header = {
      "benchmark": benchmark,
      "machine": machine_info() if machine is None else machine,
      "command": command(benchmark, argv),
  }
  if args is not None:
    header["smoke"] = bool(getattr(args, "smoke", False))
    header["args"] = recorded_args(args)
  return header


def recorded_args(args: argparse.Namespace) -> dict:
  """``vars(args)`` with every path inside the checkout made relative to it.

  A result file is read on other machines: ``--out``'s default, an absolute
  path, would say only where one machine keeps its checkout.
  """
  recorded = {}
  for name, value in vars(args).items():
    if isinstance(value, str) and os.path.isabs(value):
      path = os.path.abspath(value)
      if os.path.commonpath([path, ROOT]) == ROOT:
        value = os.path.relpath(path, ROOT)
    recorded[name] = value
  return recorded


def write_json(results: dict, path: str, indent: int = 1) -> str:
  """Writes ``results`` to ``path`` (creating its directory); returns ``path``."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    json.dump(results, f, indent=indent)
  return path


def save_results(
    results: dict,
    out: str,
    stem: str,
    plot: Callable[[dict, str], str] | None,
    t_start: float,
    indent: int = 1,
) -> tuple[str, str]:
  """Add wall time and end load to ``results``; write ``<out>/<stem>.json`` and ``.png``.

  Args:
    results: the result dict (``results["machine"]`` from the start of the run).
    out: the output directory.
    stem: the file name without extension (``<name><tag>``).
    plot: ``plot(results, png_path) -> png_path``, or None for no figure.
    t_start: ``time.perf_counter()`` at the start of the run.
    indent: the JSON's indentation.

  Returns:
    The paths of the JSON and of the figure ("" without one).
  """
  results["wall_s"] = time.perf_counter() - t_start
  if "machine" in results:
    record_end_load(results["machine"])
  json_path = write_json(results, os.path.join(out, f"{stem}.json"), indent)
  if plot is None:
    return json_path, ""
  return json_path, plot(results, os.path.join(out, f"{stem}.png"))


# ---------------------------------------------------------------------------
# Summaries


def sample_std(values) -> float:
  """The sample standard deviation (ddof 1) of ``values``; 0.0 for a single value.

  The spread over seeds of a figure: one seed has no spread to estimate, and
  reads 0 rather than NaN.
  """
  return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def null_if_undefined(row: dict) -> dict:
  """``row`` with its NaN and infinite floats as None (null in the JSON).

  JSON has no NaN: ``json.dump`` would write a token other readers reject.
  """
  return {
      k: None if isinstance(v, float) and not math.isfinite(v) else v
      for k, v in row.items()
  }


def markdown_table(
    head: str, rows: Iterable[Sequence[Any]], align: str = ""
) -> list[str]:
  """The lines of a markdown table: ``head``, its rule, then one line per row.

  Args:
    head: the header line, ``"| model | arm | ms |"``.
    rows: each row's cells (any value; ``str`` of it is written).
    align: one letter per column, ``l`` (``---``) or ``r`` (``---:``); all
      ``l`` if empty.
  """
  rule = {"l": "---|", "r": "---:|"}
  lines = [head]
  lines.append(
      "|" + "".join(rule[a] for a in align or "l" * (head.count("|") - 1))
  )
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return lines


def cell(value, spec: str = "{}") -> str:
  """``spec.format(value)`` for a markdown table; an en dash for None, NaN or inf."""
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return "–"
  return spec.format(value)


# ---------------------------------------------------------------------------
# Figures


def pyplot():
  """``matplotlib.pyplot`` on the headless Agg backend (imported on first use)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def panel_grid(rows: int, cols: int, width: float, height: float):
  """A figure of ``rows`` x ``cols`` panels, each ``width`` x ``height`` inches.

  Returns ``(fig, axes)`` with ``axes[row, col]`` 2-D whatever the counts, so
  that a benchmark with one model or one variant plots as one with several.
  """
  figsize = (width * cols, height * rows)
  return pyplot().subplots(rows, cols, figsize=figsize, squeeze=False)


def save_figure(fig, path: str, rect: Sequence[float] | None = None) -> str:
  """Lay out, write at 110 dpi and close a matplotlib figure; returns ``path``.

  ``rect`` is ``tight_layout``'s (e.g. ``(0, 0, 1, 0.96)`` to leave room for a
  ``suptitle``).
  """
  import matplotlib.pyplot as plt

  if rect is None:
    fig.tight_layout()
  else:
    fig.tight_layout(rect=rect)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
