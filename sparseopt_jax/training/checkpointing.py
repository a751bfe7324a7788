"""Orbax checkpoints of a whole training state (params, batch_stats, optimizer state
with masks and RNG keys, step); the step is also the data position."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

import jax
import orbax.checkpoint as ocp

from sparseopt_jax.training import workdir as workdir_lib


class CheckpointError(workdir_lib.WriteError):
  """A checkpoint could not be written (a full disk, a lost mount): the run stops
  there; the checkpoints already complete stay, and ``--resume`` continues from
  the last of them."""


class Checkpointer:
  """Saves every ``every`` steps (and when forced), keeps the last ``keep``.

  Saves are asynchronous unless ``asynchronous=False``: the arrays are copied to
  host before ``save`` returns and written while training goes on.
  """

  def __init__(
      self, directory: str, every: int, keep: int = 2, asynchronous: bool = True
  ):
    self.directory = os.path.abspath(directory)
    # After a failed write, orbax's writes still in flight complete into event
    # loops it has closed, each printing an "Event loop is closed" traceback.
    if not getattr(sys.unraisablehook, "quiet_closed_loops", False):
      sys.unraisablehook = _quiet_closed_loops(sys.unraisablehook)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=every,
            create=True,
            enable_async_checkpointing=asynchronous,
        ),
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, *, force: bool = False) -> None:
    """Starts writing ``state`` at ``step`` if due; a failed earlier write raises here."""
    with self._failures():
      self.manager.check_for_errors()  # of a background write: stop now
      self.manager.save(step, args=ocp.args.StandardSave(state), force=force)

  def restore(self, like: Any) -> Any:
    """The latest checkpoint, laid out (shapes, dtypes, shardings) like ``like``."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    return self.manager.restore(
        self.latest_step(), args=ocp.args.StandardRestore(abstract)
    )

  def close(self) -> None:
    with self._failures():
      self.manager.wait_until_finished()
    self.manager.close()

  @contextlib.contextmanager
  def _failures(self):
    """An orbax write error (raised by the write, or by the next call when it
    ran in the background) as one CheckpointError naming the directory."""
    try:
      yield
    except Exception as e:  # orbax and tensorstore raise many kinds
      first = next(iter(str(e).strip().splitlines()), "") or type(e).__name__
      last = self.manager.latest_step()
      # Let the manager's background writers end now, not at interpreter exit.
      with contextlib.suppress(Exception):
        self.manager.close()
      raise CheckpointError(
          f"a checkpoint could not be written under {self.directory}:"
          f" {first}; the last complete checkpoint is"
          f" {'none' if last is None else f'step {last}'} (--resume continues"
          " from it once the cause is fixed)"
      ) from e


def _quiet_closed_loops(hook):
  """``hook`` but for the RuntimeError of a callback into a closed event loop."""

  def quiet(unraisable):
    e = unraisable.exc_value
    if not (isinstance(e, RuntimeError) and "Event loop is closed" in str(e)):
      hook(unraisable)

  quiet.quiet_closed_loops = True
  return quiet
