"""Every ```python block of README.md and docs/*.md runs.

The blocks of one page run in order in one namespace, so a page can build on
its earlier blocks. They run in this process (no fresh interpreter to start),
on small arrays; a block that needs Flax skips its page where Flax is not
installed. ```bash blocks are not run.
"""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(path: pathlib.Path) -> list[str]:
  return _BLOCK.findall(path.read_text())


# Slow (2-4 s each, about 11 s together): these pages compile RigL's in-graph
# mask update or Flax models, and the default run has no time to spare. The
# default run keeps the README's and the other pages' blocks, which use the
# same transforms; `pytest -m slow` runs these.
SLOW = {"getting_started.md", "transforms.md", "flax.md", "layernorm.md"}
WITH_CODE = [
    pytest.param(p, marks=pytest.mark.slow, id=p.name)
    if p.name in SLOW
    else pytest.param(p, id=p.name)
    for p in PAGES
    if python_blocks(p)
]


@pytest.mark.parametrize("page", WITH_CODE)
def test_page_code_blocks_run(page):
  blocks = python_blocks(page)
  if any("flax" in b for b in blocks):
    pytest.importorskip("flax")
  namespace = {"__name__": f"doc_{page.stem}"}
  for i, code in enumerate(blocks):
    exec(compile(code, f"{page.name}, python block {i + 1}", "exec"), namespace)


def test_blocks_are_found():
  """The extraction sees the blocks: a page's guide has several."""
  assert len(python_blocks(ROOT / "docs" / "getting_started.md")) >= 1
