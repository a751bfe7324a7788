"""The committed result files read the same on any machine: no checkout path."""

import argparse
import json
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def _strings(tree):
  if isinstance(tree, dict):
    for value in tree.values():
      yield from _strings(value)
  elif isinstance(tree, list):
    for value in tree:
      yield from _strings(value)
  elif isinstance(tree, str):
    yield tree


def test_result_files_record_no_absolute_path_but_system_data():
  """Only a system data directory (Debian's /usr/share/datasets) may be absolute."""
  files = [*RESULTS.rglob("*.json"), *RESULTS.rglob("*.jsonl")]
  assert len(files) > 10
  for path in files:
    text = path.read_text()
    rows = [json.loads(text)] if path.suffix == ".json" else []
    if path.suffix == ".jsonl":
      rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    for value in (s for row in rows for s in _strings(row)):
      if value.startswith("/"):
        assert value.startswith("/usr/share/"), (path.name, value)


def test_benchmarks_record_checkout_paths_relative_to_it(tmp_path):
  sys.path.insert(0, str(ROOT / "benchmarks"))
  try:
    import common  # benchmarks/common.py
  finally:
    sys.path.remove(str(ROOT / "benchmarks"))
  args = argparse.Namespace(
      out=common.RESULTS_DIR,
      data_dir=str(tmp_path),
      tag="",
      steps=3,
  )
  recorded = common.recorded_args(args)
  assert recorded["out"] == os.path.join("benchmarks", "results")
  # A path outside the checkout is what the user gave; steps and tag untouched.
  assert recorded["data_dir"] == str(tmp_path)
  assert recorded["tag"] == "" and recorded["steps"] == 3
