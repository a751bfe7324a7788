"""The training program built on the library: models, input pipelines, presets,
the jitted loop (``sparseopt-train``), checkpoints and plots.

Needs the ``[train]`` extra. The core library never imports this package.
"""
