"""Sphinx configuration: Markdown pages (MyST) and an API reference from the docstrings."""

import os
import re
import sys

# autodoc imports the package from this checkout, not from an installed copy.
sys.path.insert(0, os.path.abspath(".."))

project = "sparseopt_jax"
author = "sparseopt_jax authors"
copyright = "the sparseopt_jax authors"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# Google-style docstrings (the repository's style).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
# Inherited Flax and Optax docstrings are not ours to document.
autodoc_inherit_docstrings = False

# Headings get anchors, so pages can link to `page.md#section`.
myst_heading_anchors = 3

html_theme = "furo"
html_title = "sparseopt_jax"

# The docstrings write absolute values as |w| (plain text, read in the source
# too); in reStructuredText |w| would be a substitution reference.
_ABS = re.compile(r"(?<![\w|\\])\|([^|\s`][^|`]*?)\|(?![\w|])")


def _escape_abs(app, what, name, obj, options, lines):
  """Escapes |x| outside literals (a literal block follows a line ending in ::)."""
  del app, what, name, obj, options
  literal_indent = None
  in_inline = False  # an inline literal ``...`` may span lines
  for i, line in enumerate(lines):
    indent = len(line) - len(line.lstrip())
    if literal_indent is not None:
      if line.strip() and indent <= literal_indent:
        literal_indent = None
      else:
        continue
    if line.rstrip().endswith("::"):
      literal_indent = indent
    pieces = line.split("``")
    start = 1 if in_inline else 0
    pieces[start::2] = [_ABS.sub(r"\\|\1\\|", p) for p in pieces[start::2]]
    lines[i] = "``".join(pieces)
    in_inline = in_inline != (len(pieces) % 2 == 0)


def setup(app):
  app.connect("autodoc-process-docstring", _escape_abs)
