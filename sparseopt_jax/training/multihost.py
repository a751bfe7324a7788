"""Several JAX processes as one run: starting them, and making them agree.

A multi-host run is one ``sparseopt-train`` process per host, under JAX's
multi-controller runtime (``jax.distributed``). Every process decides on its
own, from its own command line and files, what to run; this module makes sure
they decided the same, and that a refusal on one host (a busy workdir) is a
refusal on all of them, with the same message, rather than a hang in the first
collective.
"""

from __future__ import annotations

import hashlib

import jax
import numpy as np
from jax.experimental import multihost_utils

from sparseopt_jax.training import workdir as workdir_lib

# Room for process 0's message in the broadcast that shares it.
_MESSAGE_BYTES = 2048


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
  """``jax.distributed.initialize``; a UserError that says which flags to pass.

  With no argument JAX detects the cluster (SLURM, a TPU pod slice, ...);
  anywhere else all three are needed.
  """
  given = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in given) and None in given:
    raise workdir_lib.UserError(
        "--coordinator-address, --num-processes and --process-id go together:"
        " pass all three, or none to let JAX detect the cluster"
    )
  if num_processes is not None and not 0 <= process_id < num_processes:
    raise workdir_lib.UserError(
        f"--process-id {process_id} is not in [0, --num-processes"
        f" {num_processes})"
    )
  try:
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )
  except (ValueError, RuntimeError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
    raise workdir_lib.UserError(
        f"jax.distributed.initialize failed: {first}. Outside a cluster JAX"
        " detects (SLURM, a TPU pod slice), pass --coordinator-address"
        " HOST:PORT, --num-processes N and --process-id I"
    ) from None


def process_zeros(message: str) -> str:
  """Process 0's ``message`` on every process ('' stays '')."""
  if jax.process_count() == 1:
    return message
  data = message.encode()[:_MESSAGE_BYTES]
  buf = np.zeros(_MESSAGE_BYTES + 1, np.uint8)
  buf[0] = 1 if data else 0
  buf[1 : 1 + len(data)] = np.frombuffer(data, np.uint8)
  out = np.asarray(multihost_utils.broadcast_one_to_all(buf))
  return bytes(out[1:]).rstrip(b"\0").decode(errors="replace") if out[0] else ""


def check_same(what: str, text: str) -> None:
  """UserError on every process unless every process holds the same ``text``."""
  if jax.process_count() == 1:
    return
  digest = np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint8)
  every = np.asarray(multihost_utils.process_allgather(digest))
  differ = [
      i for i in range(len(every)) if not np.array_equal(every[i], every[0])
  ]
  if differ:
    raise workdir_lib.UserError(
        f"the processes do not run the same {what}: processes {differ} differ"
        " from process 0; start every process with the same flags and files"
    )
