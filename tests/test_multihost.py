"""Two JAX processes on loopback as one run: they agree, or all refuse alike.

Each process is a fresh interpreter with one CPU device (several simulated
devices per process deadlock gloo's collectives here), started under a timeout
that ends in SIGKILL, since JAX's preemption notifier takes SIGTERM.
"""

import json
import os
import re
import signal
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


def _env(**extra) -> dict:
  return {
      **os.environ,
      "PYTHONPATH": ROOT,
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": "",
      # Compiling costs more than running these few steps (see conftest.py).
      "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
      **extra,
  }


def _start(commands: list[list[str]], **env) -> list[subprocess.Popen]:
  """``command + [coordinator, count, index]`` as process i of len(commands)."""
  port = _free_port()
  return [
      subprocess.Popen(
          [*cmd, f"127.0.0.1:{port}", str(len(commands)), str(i)],
          cwd=ROOT,
          env=_env(**env),
          stdout=subprocess.PIPE,
          stderr=subprocess.PIPE,
          text=True,
      )
      for i, cmd in enumerate(commands)
  ]


def _wait(procs, timeout: float = 180) -> list[tuple]:
  """(status, stdout, stderr) of each process; all SIGKILLed past ``timeout``."""
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


# sparseopt-train with the multi-host flags from _start's last three arguments.
_TRAIN = """
import sys
from sparseopt_jax.training import main
*argv, address, count, index = sys.argv[1:]
sys.exit(main([*argv, "--coordinator-address", address, "--num-processes",
               count, "--process-id", index]))
"""


def _launch(argvs: list[list[str]], timeout: float = 180) -> list[tuple]:
  """``sparseopt-train argv`` as process i of len(argvs); (status, out, err) each."""
  return _wait(
      _start([[sys.executable, "-c", _TRAIN, *argv] for argv in argvs]),
      timeout,
  )


def _errors(results) -> list[str]:
  """Each process's stderr lines that are the program's own errors."""
  return [
      [ln for ln in e.splitlines() if ln.startswith("sparseopt-train: error:")]
      for _, _, e in results
  ]


def _cmd(*argv) -> list[str]:
  return [sys.executable, "-c", _TRAIN, *argv]


def test_every_process_refuses_alike_what_one_process_finds_wrong(tmp_path):
  # Three refused runs of two processes each, side by side: a config that
  # differs on one process; a busy workdir, whose lock only process 0 sees; a
  # model axis that would span the processes.
  differ, busy, span = (str(tmp_path / n) for n in "abc")
  os.makedirs(busy)
  holder = subprocess.Popen(
      [sys.executable, "-c", "import time; time.sleep(300)"]
  )
  try:
    with open(os.path.join(busy, ".lock"), "w") as f:
      f.write(str(holder.pid))
    groups = [
        _start([
            _cmd("--workdir", differ, *FLAGS),
            _cmd("--workdir", differ, *FLAGS, "--seed", "1"),
        ]),
        _start([_cmd("--workdir", busy, *FLAGS)] * 2),
        _start([_cmd("--workdir", span, *FLAGS, "--model-parallel", "2")] * 2),
    ]
    results = [_wait(g) for g in groups]
  finally:
    holder.kill()
  expected = [
      "do not run the same config and workdir: processes [1]",
      f"in use by process {holder.pid}",
      "--model-parallel 2 would span processes",
  ]
  for pair, message in zip(results, expected, strict=True):
    assert [r[0] for r in pair] == [2, 2], pair
    errors = _errors(pair)
    assert errors[0] == errors[1] and len(errors[0]) == 1, pair
    assert message in errors[0][0], pair
  assert not os.path.exists(span)


def _metrics(workdir) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_two_processes_train_as_one_process_with_two_devices(tmp_path):
  w, one = str(tmp_path / "two"), str(tmp_path / "one")
  # One process with two devices, beside them: the same global batches, each
  # device the examples one process had; a sum of two terms rounds alike in
  # either order.
  single = subprocess.Popen(
      [sys.executable, "-m", "sparseopt_jax.training.train", "--workdir", one]
      + FLAGS,
      cwd=ROOT,
      env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=2"),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
  )
  pair = _start([[sys.executable, "-c", _TRAIN, "--workdir", w, *FLAGS]] * 2)
  *results, alone = _wait([*pair, single])
  assert [r[0] for r in results] == [0, 0], results
  assert alone[0] == 0, alone[2][-3000:]
  rows = _metrics(w)
  assert [r["step"] for r in rows] == [0, 2]  # written once
  # Both processes end with the same evaluation: one run, not two.
  last = [json.loads(o.strip().splitlines()[-1]) for _, o, _ in results]
  for key in ("step", "test_loss", "test_accuracy", "train_loss"):
    assert last[0][key] == last[1][key] == rows[-1][key], key
  for a, b in zip(rows, _metrics(one), strict=True):
    for key in ("step", "test_loss", "test_accuracy", "train_loss"):
      assert a.get(key) == b.get(key), (key, a, b)


def test_a_preemption_notice_stops_every_process_at_one_step(tmp_path):
  w = str(tmp_path / "run")
  argv = [*FLAGS, "--steps", "60"]  # after FLAGS' --steps: the later one counts
  procs = _start([[sys.executable, "-c", _TRAIN, "--workdir", w, *argv]] * 2)
  metrics = os.path.join(w, "metrics.jsonl")
  deadline = time.monotonic() + 120
  while not os.path.exists(metrics) and time.monotonic() < deadline:
    time.sleep(0.1)
  procs[1].send_signal(signal.SIGTERM)  # one host's notice
  results = _wait(procs)
  assert [r[0] for r in results] == [0, 0], results
  stopped = {
      int(m)
      for _, out, _ in results
      for m in re.findall(r"stopped after step (\d+) with a checkpoint", out)
  }
  assert len(stopped) == 1, results  # the same step on both
  (step,) = stopped
  assert 0 < step < 60
  # One process (this one, one device) resumes the two processes' run.
  from sparseopt_jax.training import train

  resume = ["--resume", "--no-progress", "--steps", str(step + 2)]
  assert train.main(["--workdir", w, *resume]) == 0
  assert _metrics(w)[-1]["step"] == step + 2


# Params and masks sharded over a 'model' axis that spans both processes.
_SPANNING = """
import json, sys
import jax
address, count, index = sys.argv[1:]
jax.distributed.initialize(address, int(count), int(index))
import numpy as np, optax
from jax.sharding import NamedSharding, PartitionSpec as P
import sparseopt_jax as so

mesh = jax.make_mesh((2,), ("model",))
host = {"w": np.arange(1.0, 65.0, dtype=np.float32).reshape(8, 8)}
shardings = {"w": NamedSharding(mesh, P(None, "model"))}
tx = optax.chain(so.sparseopt(0.75, update_every=2, end_step=10), optax.sgd(0.1))
state_sh = so.state_shardings(tx, host, shardings, NamedSharding(mesh, P()))
state = jax.device_put(tx.init(host), state_sh)
params = jax.device_put(so.apply_masks(host, tx.init(host)), shardings)
mask = so.get_masks(state)["w"]
summary = so.sparsity_summary(state, params=params)
so.check_sparsity(params, state)
slope = so.skew_slope(params, state)["w"]  # the params as a gradient
print(json.dumps({
    "slope_finite": bool(np.isfinite(float(slope))),
    "addressable": mask.is_fully_addressable,
    "active": summary["leaves"]["w"]["active"],
    "pruned_nonzero": summary["pruned_nonzero"],
    "sparsity": summary["sparsity"],
}))
"""


def test_diagnostics_read_arrays_spread_over_processes():
  results = _wait(_start([[sys.executable, "-c", _SPANNING]] * 2))
  assert [r[0] for r in results] == [0, 0], results
  out = [json.loads(o.strip().splitlines()[-1]) for _, o, _ in results]
  assert (
      out[0]
      == out[1]
      == {
          "slope_finite": True,
          "addressable": False,
          "active": 16,
          "pruned_nonzero": 0,
          "sparsity": 0.75,
      }
  )
