"""The results pages and the README's results table match the result files.

``docs/results_tables.py`` writes them from ``benchmarks/results``; a page
edited by hand, or a result file changed without rewriting the pages, fails
here.
"""

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _results_tables():
  path = ROOT / "docs" / "results_tables.py"
  spec = importlib.util.spec_from_file_location("results_tables", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_results_pages_are_current():
  tables = _results_tables()
  pages = tables.pages()
  assert tables.README in pages  # the README holds the table's markers
  stale = [
      str(p.relative_to(ROOT))
      for p, text in pages.items()
      if not p.exists() or p.read_text() != text
  ]
  assert not stale, f"run python docs/results_tables.py: {stale}"


def test_every_results_page_is_generated():
  generated = set(_results_tables().pages())
  for page in (ROOT / "docs" / "results").glob("*.md"):
    assert page in generated, page


def test_readme_is_a_quick_start():
  assert len((ROOT / "README.md").read_text().splitlines()) <= 300
