"""Two JAX processes on loopback as one run: they agree, or all refuse alike.

Each process is a fresh interpreter with one CPU device (several simulated
devices per process deadlock gloo's collectives here), started under a timeout
that ends in SIGKILL, since JAX's preemption notifier takes SIGTERM.
"""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

for _module in ("flax", "grain", "orbax.checkpoint", "tqdm", "matplotlib"):
  pytest.importorskip(_module)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = [
    *(
        "--model",
        "resnet8",
        "--width",
        "4",
        "--train-subset",
        "512",
        "--test-subset",
        "128",
    ),
    *("--batch-size", "32", "--topology", "static", "--steps", "2"),
    *("--eval-every", "2", "--checkpoint-every", "2", "--no-progress"),
]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(argvs: list[list[str]], timeout: float = 180) -> list[tuple]:
  """``sparseopt-train argv`` as process i of len(argvs); (status, out, err) each."""
  port = _free_port()
  env = {
      **os.environ,
      "PYTHONPATH": ROOT,
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": "",
      # Compiling costs more than running these few steps (see conftest.py).
      "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
  }
  procs = [
      subprocess.Popen(
          [
              sys.executable,
              "-m",
              "sparseopt_jax.training.train",
              *argv,
              *("--coordinator-address", f"127.0.0.1:{port}"),
              *("--num-processes", str(len(argvs)), "--process-id", str(i)),
          ],
          cwd=ROOT,
          env=env,
          stdout=subprocess.PIPE,
          stderr=subprocess.PIPE,
          text=True,
      )
      for i, argv in enumerate(argvs)
  ]
  deadline = time.monotonic() + timeout
  out = []
  for p in procs:
    try:
      o, e = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()  # SIGKILL
      pytest.fail(f"the processes ran past {timeout} s")
    out.append((p.returncode, o, e))
  return out


def _errors(results) -> list[str]:
  """Each process's stderr lines that are the program's own errors."""
  return [
      [ln for ln in e.splitlines() if ln.startswith("sparseopt-train: error:")]
      for _, _, e in results
  ]


def test_every_process_refuses_alike_what_one_process_finds_wrong(tmp_path):
  # A config that differs on one process.
  w = str(tmp_path / "a")
  results = _launch([
      ["--workdir", w, *FLAGS],
      ["--workdir", w, *FLAGS, "--seed", "1"],
  ])
  assert [r[0] for r in results] == [2, 2], results
  errors = _errors(results)
  assert errors[0] == errors[1] and len(errors[0]) == 1, results
  assert "do not run the same config and workdir: processes [1]" in errors[0][0]

  # A busy workdir: only process 0 sees the lock, both refuse with its message.
  w = tmp_path / "b"
  w.mkdir()
  holder = subprocess.Popen(
      [sys.executable, "-c", "import time; time.sleep(300)"]
  )
  try:
    (w / ".lock").write_text(str(holder.pid))
    results = _launch([["--workdir", str(w), *FLAGS]] * 2)
  finally:
    holder.kill()
  assert [r[0] for r in results] == [2, 2], results
  errors = _errors(results)
  assert errors[0] == errors[1] and len(errors[0]) == 1, results
  assert f"in use by process {holder.pid}" in errors[0][0]

  # A model axis that would span the processes.
  w = str(tmp_path / "c")
  results = _launch([["--workdir", w, *FLAGS, "--model-parallel", "2"]] * 2)
  assert [r[0] for r in results] == [2, 2], results
  assert all(
      len(e) == 1 and "--model-parallel 2 would span processes" in e[0]
      for e in _errors(results)
  ), results
  assert not os.path.exists(w)


def test_two_processes_train_one_run_and_write_it_once(tmp_path):
  w = str(tmp_path / "run")
  results = _launch([["--workdir", w, *FLAGS]] * 2)
  assert [r[0] for r in results] == [0, 0], results
  rows = [json.loads(line) for line in open(os.path.join(w, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == [0, 2]
  # Both processes end with the same evaluation: one run, not two.
  last = [json.loads(o.strip().splitlines()[-1]) for _, o, _ in results]
  for key in ("step", "test_loss", "test_accuracy", "train_loss"):
    assert last[0][key] == last[1][key] == rows[-1][key], key
