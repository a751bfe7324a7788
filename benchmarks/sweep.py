"""Sweeps of independent training runs, split over worker processes, resumable.

``convergence.py`` and ``vit.py`` train many runs that share nothing but the
machine (arms x seeds). Each script lists its runs in a fixed order, keeps each
finished run on disk, and hands :func:`run` the function that works through a
share of the list::

  def work(args, worker, num_workers):
    sweep.use_compilation_cache(args.out)
    for job in sweep.share(jobs(args), worker, num_workers):
      if not finished(job):
        ...  # train it and keep its result

  if not sweep.run(__file__, argv, args, functools.partial(work, args)):
    return {}  # a worker process: the parent aggregates
  ...  # every run is on disk: aggregate

With ``--jobs N`` the parent starts N copies of the script with ``--worker i``,
each single-threaded (and, where asked, pinned to its own core), waits for
them and aggregates; with ``--jobs 1`` it works through the list itself. A
sweep that stopped resumes where it stopped: finished runs are skipped.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

Job = TypeVar("Job")
# Which share of the runs a process works through: (worker, num_workers).
Work = Callable[[int, int], None]


def add_options(p: argparse.ArgumentParser, jobs: int = 2) -> None:
  """``--jobs`` (worker processes) and ``--worker`` (internal: this process's index)."""
  p.add_argument(
      "--jobs", type=int, default=jobs, help="parallel worker processes"
  )
  p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)


def settings(args: argparse.Namespace) -> dict[str, Any]:
  """The options that define the sweep, for its result JSON.

  ``--worker`` names a process, not the sweep, and ``--out`` only where the
  files went.
  """
  return {k: v for k, v in vars(args).items() if k not in ("worker", "out")}


def share(jobs: Sequence[Job], worker: int, num_workers: int) -> list[Job]:
  """Worker ``worker``'s runs: every ``num_workers``-th of ``jobs``, from its own index.

  Interleaved rather than in blocks, so that the workers' shares mix cheap
  and expensive arms alike.
  """
  return [job for i, job in enumerate(jobs) if i % num_workers == worker]


def use_compilation_cache(out: str) -> None:
  """Keeps compiled programs in ``<out>/.jax_cache``.

  The runs of a sweep compile the same few programs: the workers, and a
  resumed sweep, reuse them instead of compiling each again.
  """
  import jax

  jax.config.update(
      "jax_compilation_cache_dir", os.path.join(out, ".jax_cache")
  )
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def run(
    script: str,
    argv: Sequence[str] | None,
    args: argparse.Namespace,
    work: Work,
    *,
    pin: bool = False,
) -> bool:
  """Runs this process's part of the sweep; True where the results are to be aggregated.

  Args:
    script: the benchmark script (its ``__file__``), started again per worker.
    argv: the script's arguments, passed on to the workers (None:
      ``sys.argv[1:]``).
    args: the parsed arguments (``--out``, ``--jobs``, ``--worker``).
    work: ``work(worker, num_workers)`` runs that worker's share.
    pin: pin each worker to its own core where there are enough cores.

  Returns:
    False in a worker process (it has done its share); True in the parent,
    once every worker has finished.
  """
  os.makedirs(args.out, exist_ok=True)
  if args.worker is not None:
    work(args.worker, args.jobs)
    return False
  if args.jobs == 1:
    work(0, 1)
  else:
    launch(script, argv, args.jobs, pin=pin)
  return True


def launch(
    script: str,
    argv: Sequence[str] | None,
    jobs: int,
    *,
    pin: bool = False,
) -> None:
  """Runs ``script argv --worker i`` for i < ``jobs`` in parallel; fails if one fails."""
  argv = sys.argv[1:] if argv is None else argv
  ncpu = os.cpu_count() or 1
  pin = pin and ncpu >= jobs and shutil.which("taskset") is not None
  # One thread per worker: the workers, not XLA's thread pool, use the cores.
  env = dict(os.environ)
  env.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")
  procs = []
  for w in range(jobs):
    cmd = [sys.executable, os.path.abspath(script), *argv, "--worker", str(w)]
    if pin:
      cmd = ["taskset", "-c", str(w % ncpu), *cmd]
    procs.append(subprocess.Popen(cmd, env=env))
  codes = [p.wait() for p in procs]
  if any(codes):
    raise SystemExit(f"a worker failed: exit codes {codes}")
