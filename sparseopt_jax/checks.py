"""Eager hyperparameter checks: each raises ValueError naming the argument and value."""

from __future__ import annotations

from typing import Any

import numpy as np


def check_choice(name: str, value: Any, choices: tuple) -> Any:
  if value not in choices:
    raise ValueError(f"unknown {name} {value!r}; expected one of {choices}")
  return value


def check_int(name: str, value: Any, minimum: int) -> int:
  if (
      isinstance(value, bool)
      or not isinstance(value, (int, np.integer))
      or value < minimum
  ):
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
  return int(value)


def check_fraction(name: str, value: Any, *, closed: bool) -> float:
  """A number in [0, 1] (``closed``) or [0, 1)."""
  ok = (
      not isinstance(value, bool)
      and isinstance(value, (int, float, np.floating))
      and 0.0 <= float(value)
      and (float(value) <= 1.0 if closed else float(value) < 1.0)
  )
  if not ok:
    raise ValueError(
        f"{name} must be a number in [0, 1{']' if closed else ')'}, got"
        f" {value!r}"
    )
  return float(value)
