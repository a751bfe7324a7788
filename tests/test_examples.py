"""Every script in examples/ runs, in this process, for a few steps.

Each script's ``main(argv)`` is called with ``--steps``; the scripts check
their own invariants (no pruned weight left non-zero, no missed mask update)
and return the final ``so.sparsity_summary``.
"""

import importlib.util
import pathlib

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = sorted(EXAMPLES.glob("*.py"))


def _main(path):
  spec = importlib.util.spec_from_file_location(f"example_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.main


# Slow: the linen ResNet (about 6 s) and the transformer, which compiles both
# step variants (about 13 s); the default run has no time to spare, and
# tests/test_flax_linen.py and tests/test_schedule.py check what they show.
SLOW = {"linen_resnet_bn", "host_scheduled_transformer"}
CASES = [
    pytest.param(p, marks=pytest.mark.slow, id=p.stem)
    if p.stem in SLOW
    else pytest.param(p, id=p.stem)
    for p in SCRIPTS
]


@pytest.mark.parametrize("path", CASES)
def test_example_runs(path):
  pytest.importorskip("flax")
  # 3 steps: the transformer's schedule updates the masks at step 2.
  summary = _main(path)(["--steps", "3"])
  assert summary["pruned_nonzero"] == 0
  assert 0.5 < summary["sparsity"] < 1


def test_there_are_examples():
  assert len(SCRIPTS) >= 3
