"""A run's working directory: its lock, its stored config, and its metrics log.

A workdir holds one run: ``config.json`` (written when the run starts, read
back on ``--resume``), ``metrics.jsonl`` (one row per evaluation), the orbax
``checkpoints/`` and, while a process trains in it, ``.lock``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from typing import Any

from sparseopt_jax.training import presets


class UserError(ValueError):
  """A problem with what the user asked for (flags, workdir, data), not a bug: the
  command line prints its message on one line and exits with status 2."""


class WriteError(RuntimeError):
  """The run's files could not be written (a full disk, a lost mount): a fault of
  the machine; the command line prints one line and exits with status 1."""


# Fields a resumed run may change: they lengthen or re-pace the run, or say where the
# data lives, without changing what the checkpoint's state means.
SAFE_ON_RESUME = (
    "steps",
    "epochs",
    "eval_every",
    "checkpoint_every",
    "log_every",
    "data_dir",
    "test_subset",
)

CONFIG, METRICS, LOCK = "config.json", "metrics.jsonl", ".lock"


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, someone else's
    return True
  return True


@contextlib.contextmanager
def lock(workdir: str):
  """Hold ``workdir/.lock`` (our pid) while training; a second process is refused.

  A lock left by a process that no longer exists (killed) is taken over.
  """
  path = os.path.join(workdir, LOCK)
  for _ in range(2):
    try:
      os.makedirs(workdir, exist_ok=True)
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
      break
    except FileExistsError:
      try:
        with open(path) as f:
          pid = int(f.read().strip() or 0)
      except (OSError, ValueError):
        pid = 0
      if pid and pid != os.getpid() and _pid_alive(pid):
        raise UserError(
            f"{workdir!r} is in use by process {pid} (lock file {path}); wait"
            " for it to finish or choose another --workdir"
        ) from None
      os.remove(path)  # stale: its process is gone
    except OSError as e:  # read-only, no permission, disk full
      raise UserError(
          f"cannot write in the workdir {workdir!r}: {e.strerror or e}"
      ) from None
  else:  # pragma: no cover - lost a race twice
    raise UserError(f"could not take the lock {path}")
  with os.fdopen(fd, "w") as f:
    f.write(str(os.getpid()))
  try:
    yield path
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)


def stored_config(workdir: str) -> dict | None:
  """The run's stored ``config.json`` as a dict; None if there is none.

  Raises:
    UserError: naming the file, if it is not a JSON object of config fields.
  """
  path = os.path.join(workdir, CONFIG)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      stored = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f"cannot read the run's config {path}: {e}") from None
  fields = {f.name for f in dataclasses.fields(presets.TrainConfig)}
  if not isinstance(stored, dict) or not set(stored) <= fields:
    unknown = sorted(set(stored) - fields) if isinstance(stored, dict) else []
    raise UserError(
        f"{path} is not a run's config"
        + (f" (unknown fields {unknown})" if unknown else "")
    )
  return stored


def stored_train_config(workdir: str, **overrides) -> presets.TrainConfig:
  """The stored config as a TrainConfig, with ``overrides``; UserError naming the file."""
  stored = stored_config(workdir)
  try:
    return dataclasses.replace(presets.TrainConfig(**stored), **overrides)
  except (TypeError, ValueError) as e:
    raise UserError(
        f"{os.path.join(workdir, CONFIG)} holds an invalid config: {e}"
    ) from None


def write_config(workdir: str, cfg: presets.TrainConfig) -> None:
  path = os.path.join(workdir, CONFIG)
  try:
    with open(path, "w") as f:
      json.dump(dataclasses.asdict(cfg), f, indent=2)
  except OSError as e:
    raise WriteError(f"cannot write {path}: {e.strerror or e}") from None


def config_for_resume(
    workdir: str, overrides: dict[str, Any]
) -> presets.TrainConfig | None:
  """The stored config of ``workdir`` with the safe ``overrides`` (flags given on the
  command line) applied; None if the workdir holds no config.

  Raises:
    UserError: if an override changes a field that a resumed run must keep.
  """
  stored = stored_config(workdir)
  if stored is None:
    return None
  check_resume_overrides(stored, overrides)
  return stored_train_config(workdir, **overrides)


def check_resume_overrides(stored: dict, overrides: dict[str, Any]) -> None:
  conflicts = {
      k: (stored.get(k), v)
      for k, v in overrides.items()
      if k not in SAFE_ON_RESUME and stored.get(k) != v
  }
  if conflicts:
    listed = ", ".join(
        f"--{k.replace('_', '-')} {new!r} (the run has {old!r})"
        for k, (old, new) in conflicts.items()
    )
    raise UserError(
        "--resume continues the stored run, which these flags would change:"
        f" {listed}. Only"
        f" {', '.join('--' + k.replace('_', '-') for k in SAFE_ON_RESUME)} may"
        " change on resume; start a new --workdir for another configuration"
    )


class MetricsLog:
  """``metrics.jsonl`` of a run that (re)starts at ``start_step``.

  Rows past ``start_step`` (written after the checkpoint the run resumes from)
  are dropped, so no step appears twice, and wall time carries on from the last
  kept row rather than restarting at zero.
  """

  def __init__(
      self, workdir: str, start_step: int, *, write: bool = True, log=print
  ):
    self.path = os.path.join(workdir, METRICS)
    self.write = write
    rows, torn = read_rows(self.path) if os.path.exists(self.path) else ([], 0)
    if torn:
      log(
          f"{self.path}: dropped its last line, cut short (an append that was"
          " interrupted)"
      )
    self.rows = [r for r in rows if r.get("step", 0) <= start_step]
    if write and (torn or len(self.rows) != len(rows)):
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in self.rows)
      os.replace(tmp, self.path)
    self.wall_time_offset = (
        float(self.rows[-1].get("wall_time", 0.0)) if self.rows else 0.0
    )

  @property
  def last(self) -> dict:
    return self.rows[-1] if self.rows else {}

  def append(self, row: dict) -> None:
    row = {k: _json_number(v) for k, v in row.items()}
    self.rows.append(row)
    if self.write:
      try:
        with open(self.path, "a") as f:
          f.write(json.dumps(row, allow_nan=False) + "\n")
      except OSError as e:
        raise WriteError(
            f"cannot append to {self.path}: {e.strerror or e}"
        ) from None


def _json_number(value: Any) -> Any:
  """``value``, or None (JSON null) for a NaN or an infinity, which JSON lacks."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def read_rows(path: str) -> tuple[list[dict], int]:
  """The rows of a ``metrics.jsonl`` and how many torn last lines were left out (0 or 1).

  Only the last line may be cut short (an interrupted append); any other line
  that is not JSON is a UserError naming the file and line.
  """
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  rows = []
  for i, line in enumerate(lines):
    try:
      rows.append(json.loads(line))
    except ValueError:
      if i == len(lines) - 1 and not line.endswith("\n"):
        return rows, 1
      raise UserError(
          f"{path}, line {i + 1}, is not JSON: {line[:60]!r}"
      ) from None
  return rows, 0
