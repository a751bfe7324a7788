"""The training program built on the library: models, input pipelines, presets,
the jitted loop (``sparseopt-train``), checkpoints and plots.

Needs the ``[train]`` extra. The core library never imports this package.
"""

import sys

# What `pip install 'sparseopt-jax[train]'` adds, by import name.
TRAIN_EXTRA_MODULES = ("flax", "grain", "orbax", "tqdm", "matplotlib")


def main(argv: list[str] | None = None) -> int:
  """``sparseopt-train``: the training program, or one line naming the missing extra."""
  try:
    from sparseopt_jax.training import train
  except ModuleNotFoundError as e:
    if (e.name or "").split(".")[0] not in TRAIN_EXTRA_MODULES:
      raise
    print(
        f"sparseopt-train: error: needs the [train] extra ({e.name} is not"
        " installed): pip install 'sparseopt-jax[train]'",
        file=sys.stderr,
    )
    return 2
  return train.main(argv)
