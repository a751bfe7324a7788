"""Orbax checkpoints of a whole training state (params, batch_stats, optimizer state
with masks and RNG keys, step); the step is also the data position."""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves every ``every`` steps (and when forced), keeps the last ``keep``.

  Saves are asynchronous unless ``asynchronous=False``: the arrays are copied to
  host before ``save`` returns and written while training goes on.
  """

  def __init__(
      self, directory: str, every: int, keep: int = 2, asynchronous: bool = True
  ):
    self.manager = ocp.CheckpointManager(
        os.path.abspath(directory),
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
    self.manager.save(step, args=ocp.args.StandardSave(state), force=force)

  def restore(self, like: Any) -> Any:
    """The latest checkpoint, laid out (shapes, dtypes, shardings) like ``like``."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    return self.manager.restore(
        self.latest_step(), args=ocp.args.StandardRestore(abstract)
    )

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
