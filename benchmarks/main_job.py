"""The main job, recorded: runs ``bash scripts/compare.sh`` and keeps what it measured.

Writes ``<out>/main_job<tag>.json`` (machine, command, wall time, each run's
final evaluation and test-accuracy curve), and copies the two runs'
``metrics.jsonl`` and ``compare.png`` beside it, so that the results pages
are made from a run's own files.

    python benchmarks/main_job.py --tag _amd_epyc
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/ is not a package)

ARMS = ("baseline", "sparseopt")
SMOKE = [
    *("--steps", "4", "--eval-every", "2", "--checkpoint-every", "2"),
    *("--update-every", "1"),
    *("--train-subset", "512", "--test-subset", "256"),
]
FINAL_KEYS = (
    "step",
    "test_accuracy",
    "test_loss",
    "wall_time",
    "images_per_s",
    "sparsity",
    "params_sparsity",
    "exploration",
)


def read_rows(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def main(argv=None) -> None:
  p = common.make_parser(__doc__, "main_job", smoke="4 steps on a subset")
  p.set_defaults(out=os.path.join(common.RESULTS_DIR, "main_job"))
  args = p.parse_args(argv)
  extra = SMOKE if args.smoke else []
  results = common.results_header("main_job", argv, args)
  results["command"] = " ".join(["bash scripts/compare.sh", *extra])
  t_start = time.perf_counter()
  with tempfile.TemporaryDirectory() as runs:
    subprocess.run(
        ["bash", "scripts/compare.sh", *extra],
        cwd=common.ROOT,
        env={**os.environ, "RUNS_DIR": runs},
        check=True,
    )
    rows = {
        arm: read_rows(os.path.join(runs, arm, "metrics.jsonl")) for arm in ARMS
    }
    os.makedirs(args.out, exist_ok=True)
    for arm in ARMS:
      shutil.copy(
          os.path.join(runs, arm, "metrics.jsonl"),
          os.path.join(args.out, f"{arm}_metrics{args.tag}.jsonl"),
      )
    shutil.copy(
        os.path.join(runs, "compare.png"),
        os.path.join(args.out, f"compare{args.tag}.png"),
    )
  results["final"] = {
      arm: {k: r[-1][k] for k in FINAL_KEYS if k in r[-1]}
      for arm, r in rows.items()
  }
  results["curve"] = {
      arm: [[row["step"], row["test_accuracy"]] for row in r]
      for arm, r in rows.items()
  }
  path, _ = common.save_results(
      results, args.out, f"main_job{args.tag}", None, t_start
  )
  print(path)


if __name__ == "__main__":
  main()
