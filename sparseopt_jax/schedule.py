"""The mask-update schedule: one object that the transform and the loop both ask.

A :class:`MaskSchedule` holds ``update_every`` (Delta-T), ``end_step`` and
``drop_fraction`` (alpha). The update that sees optimizer step t (0-based: the
number of updates the topology stage saw before it) changes the masks iff

    due(t) = t > 0  and  t mod update_every == 0  and  t < end_step

and then replaces the fraction (Evci et al. 2020, RigL, eq. 1)

    f_t = alpha / 2 * (1 + cos(pi * t / end_step))      (optax.cosine_decay_schedule)

of every sparse leaf's active weights. Build it once and hand the same object to
the transform (``so.sparseopt(..., schedule=s)``) and to a host-scheduled loop
(``s.is_due(step)``), so that no number is written twice (jaxpruner's
``is_mask_update_iter`` plays the same part).

The topology stage counts, in its state, every due step on which the masks were
not updated (an ordinary compiled variant on a due step: a host flag out of
step) and every mask change whose optimizer state was not re-masked (a flag
given to ``tx.update`` but not to :func:`~sparseopt_jax.apply_updates`);
:func:`~sparseopt_jax.sparsity_summary` reports both, without a host read per
step.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np
import optax

from sparseopt_jax.checks import check_fraction, check_int


class MaskSchedule(NamedTuple):
  """When masks change, and how much: build with :func:`mask_update_schedule`.

  Attributes:
    update_every: Delta-T, steps between mask updates (>= 1).
    end_step: no update at or after this step; > ``update_every``.
    drop_fraction: alpha, the fraction replaced at step 0, in [0, 1].
  """

  update_every: int
  end_step: int
  drop_fraction: float

  def is_due(self, step):
    """Whether the update that sees ``step`` (0-based) changes the masks.

    A Python int gives a Python bool (to pick a compiled variant on the host);
    a traced integer gives a bool array (the in-graph schedule).
    """
    return is_mask_update_step(
        step, update_every=self.update_every, end_step=self.end_step
    )

  def fraction(self, step) -> jax.Array:
    """f_t, the cosine-decayed drop fraction at ``step``."""
    return optax.cosine_decay_schedule(self.drop_fraction, self.end_step)(step)

  def due_steps(self, num_steps: int) -> list[int]:
    """The steps below ``num_steps`` on which the masks change."""
    last = min(num_steps, self.end_step)
    return list(range(self.update_every, last, self.update_every))


def mask_update_schedule(
    *, update_every: int = 100, end_step: int, drop_fraction: float = 0.3
) -> MaskSchedule:
  """A checked :class:`MaskSchedule`; ValueError naming the bad argument.

  Args:
    update_every: Delta-T, steps between mask updates.
    end_step: no mask update at or after this step (typically 0.75 of
      training); must exceed ``update_every``, else no update would ever
      happen.
    drop_fraction: alpha, cosine-decayed to 0 at ``end_step``.
  """
  update_every = check_int("update_every", update_every, 1)
  end_step = check_int("end_step", end_step, 0)
  drop_fraction = check_fraction("drop_fraction", drop_fraction, closed=True)
  if end_step <= update_every:
    raise ValueError(
        f"end_step {end_step} <= update_every {update_every}: the masks would"
        " never update (the first update is at step update_every, the last"
        " before end_step); lower update_every, raise end_step, or use"
        " topology='static'"
    )
  return MaskSchedule(update_every, end_step, drop_fraction)


def is_mask_update_step(step, *, update_every: int, end_step: int):
  """Whether the update that sees ``step`` (0-based) changes the masks.

  ``step > 0 and step % update_every == 0 and step < end_step``. Works on Python
  ints (returns a bool: for choosing a compiled step variant on the host) and
  on traced integers (returns a bool array: the in-graph schedule). Prefer
  :meth:`MaskSchedule.is_due` of the schedule the transform was built with.
  """
  due = (step > 0) & (step % update_every == 0) & (step < end_step)
  return bool(due) if isinstance(step, (int, np.integer)) else due
