"""A run's workdir through the command line: resume with the stored config, no duplicate
metrics rows, one process at a time, and user errors as one line with exit status 2.
"""

import errno
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

# The training program needs the [train] extra: skip without it.
for _module in ("flax", "grain", "orbax.checkpoint", "tqdm", "matplotlib"):
  pytest.importorskip(_module)

from sparseopt_jax.training import presets, train  # noqa: E402
from sparseopt_jax.training import workdir as workdir_lib  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Static masks and a tiny model: what is tested here is the workdir, not the optimizer.
FLAGS = [
    "--model",
    "resnet8",
    "--width",
    "4",
    "--train-subset",
    "2048",
    "--test-subset",
    "500",
    "--batch-size",
    "64",
    "--topology",
    "static",
    "--eval-every",
    "2",
    "--checkpoint-every",
    "2",
    "--log-every",
    "1",
    "--no-progress",
]


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_resume_uses_the_stored_run_and_keeps_its_records_clean(
    tmp_path, capsys
):
  w = str(tmp_path / "run")
  assert (
      train.main(["--workdir", w, "--steps", "6", "--stop-at", "4", *FLAGS])
      == 0
  )
  config = open(os.path.join(w, "config.json")).read()
  # A kill between a metrics row and its checkpoint: a row past the last checkpoint.
  with open(os.path.join(w, "metrics.jsonl"), "a") as f:
    f.write(
        json.dumps({"step": 6, "test_accuracy": 0.0, "wall_time": 1e9}) + "\n"
    )
  # A lock left by a process that no longer exists is taken over.
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  with open(os.path.join(w, ".lock"), "w") as f:
    f.write(str(dead.pid))
  capsys.readouterr()

  # Only --resume (and a safe flag): the width and the rest come from config.json.
  assert (
      train.main(
          ["--workdir", w, "--resume", "--no-progress", "--eval-every", "3"]
      )
      == 0
  )
  rows = _rows(w)
  steps = [r["step"] for r in rows]
  assert steps == sorted(set(steps)) and steps[0] == 0 and steps[-1] == 6, steps
  walls = [r["wall_time"] for r in rows]
  assert walls == sorted(walls) and walls[-1] < 1e9
  assert open(os.path.join(w, "config.json")).read() == config
  assert not os.path.exists(os.path.join(w, ".lock"))

  # A finished run says so and gives its last row.
  capsys.readouterr()
  assert train.main(["--workdir", w, "--resume", "--no-progress"]) == 0
  out = capsys.readouterr()
  assert "is finished (step 6 of 6)" in out.out
  assert json.loads(out.out.strip().splitlines()[-1])["step"] == 6

  # A flag that contradicts the stored run is refused, in one line, with status 2.
  assert train.main(["--workdir", w, "--resume", "--width", "8"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "--width 8 (the run has 4)" in err

  # A second process on the same workdir is refused.
  alive = subprocess.Popen(
      [sys.executable, "-c", "import time; time.sleep(60)"]
  )
  try:
    with open(os.path.join(w, ".lock"), "w") as f:
      f.write(str(alive.pid))
    assert train.main(["--workdir", w, "--resume"]) == 2
    assert f"in use by process {alive.pid}" in capsys.readouterr().err
  finally:
    alive.kill()


def test_resume_on_an_empty_workdir_starts_fresh(tmp_path, capsys):
  w = str(tmp_path / "new")
  assert train.main(["--workdir", w, "--resume", "--steps", "2", *FLAGS]) == 0
  assert "no checkpoint" in capsys.readouterr().out
  assert [r["step"] for r in _rows(w)] == [0, 2]


def _status(argv) -> int:
  """The exit status of ``sparseopt-train argv``: main's return value, or argparse's."""
  try:
    return train.main(argv)
  except SystemExit as e:
    return e.code


def _one_line_error(capsys) -> str:
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1, err
  assert err.startswith("sparseopt-train: error:"), err
  return err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data-dir", "/nonexistent", "--steps", "2"], "train-images"),
        pytest.param(
            ["--batch-size", "60", "--steps", "2"],
            "not divisible by the 8 devices",
            marks=pytest.mark.multi_device,
        ),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["--steps", "x"], "invalid int value: 'x'"),
        (["--preset", "mnist_mlp"], "unknown preset 'mnist_mlp'"),
        (["--sparsity", "1.2"], "sparsity must be"),
        (["--dataset", "mnist"], "unknown dataset 'mnist'"),
        (["--model", "resnet21"], "unknown model 'resnet21'"),
        (["--width", "0"], "width must be an integer >= 1"),
        (["--train-subset", "0"], "train_subset must be an integer >= 1"),
        (["--test-subset", "10001"], "test_subset=10001 exceeds the 10000"),
        (
            ["--model-parallel", "3"],
            "--model-parallel 3 does not divide the 1 devices",
        ),
        (["--update-every", "1000"], "--update-every 1000 leaves no mask"),
        (["--num-processes", "2"], "--num-processes and --process-id go"),
        (
            [*("--coordinator-address", "127.0.0.1:1", "--num-processes")]
            + ["2", "--process-id", "2"],
            "--process-id 2 is not in [0, --num-processes 2)",
        ),
        (
            ["--preset", "fashion_mnist_vit", "--steps", "30"],
            "the warm-up, 93 steps",
        ),
        (
            [
                *("--structure", "2:4", "--sparsity", "0.5"),
                *("--distribution", "uniform"),
            ],
            "--dense-stem keeps conv_init/kernel dense",
        ),
    ],
)
def test_user_errors_are_one_line_exit_status_2_and_write_nothing(
    tmp_path, capsys, argv, message
):
  w = tmp_path / "w"
  assert _status(["--workdir", str(w), *argv]) == 2
  assert message in _one_line_error(capsys)
  assert not w.exists()


def test_help_describes_every_flag_with_its_default(capsys):
  with pytest.raises(SystemExit):
    train.main(["--help"])
  text = " ".join(capsys.readouterr().out.split())
  for flag, default in (
      ("--sparsity", "0.9"),
      ("--update-every", "25"),
      ("--steps", "300"),
      ("--skew", "density"),
      ("--model-parallel", "1"),
  ):
    assert flag in text and f"fashion_mnist_resnet20: {default})" in text, flag
  assert "target fraction of zeros" in text


def test_plot_refuses_bad_labels_and_metrics_and_names_the_file(
    tmp_path, capsys
):
  run = tmp_path / "run"
  run.mkdir()
  (run / "metrics.jsonl").write_text(
      "".join(
          json.dumps({"step": s, "test_accuracy": a}) + "\n"
          for s, a in ((0, 0.1), (5, 0.6))
      )
  )
  (run / "config.json").write_text(
      json.dumps({
          "dataset": "fashion_mnist",
          "model": "resnet20",
          "width": None,
          "sparsity": 0.9,
          "distribution": "erk",
          "topology": "rigl",
          "skew": "density",
          "dense": False,
      })
  )
  assert (
      train.main([
          "plot",
          str(run),
          "--out",
          str(tmp_path / "a.png"),
          "--labels",
          "x",
          "y",
      ])
      == 2
  )
  assert "2 labels for 1 runs" in capsys.readouterr().err
  assert (
      train.main([
          "plot",
          str(run),
          "--out",
          str(tmp_path / "a.png"),
          "--metric",
          "test_acc",
      ])
      == 2
  )
  assert "'test_acc'" in capsys.readouterr().err
  assert train.main(["plot", str(run), "--out", str(tmp_path / "noext")]) == 0
  assert capsys.readouterr().out.strip() == str(tmp_path / "noext.png")
  assert (tmp_path / "noext.png").exists()


def test_a_corrupt_stored_config_is_named_on_resume(tmp_path, capsys):
  w = tmp_path / "run"
  w.mkdir()
  (w / "config.json").write_text('{"dataset": "fashion_mnist", "wid')
  assert _status(["--workdir", str(w), "--resume"]) == 2
  err = _one_line_error(capsys)
  assert f"cannot read the run's config {w / 'config.json'}" in err
  (w / "config.json").write_text(json.dumps({"sparsity": 2.0}))
  assert _status(["--workdir", str(w), "--resume"]) == 2
  err = _one_line_error(capsys)
  assert f"{w / 'config.json'} holds an invalid config" in err, err
  (w / "config.json").write_text(json.dumps({"learning_rte": 0.1}))
  assert _status(["--workdir", str(w), "--resume"]) == 2
  assert "unknown fields ['learning_rte']" in _one_line_error(capsys)


def test_an_unwritable_workdir_is_one_line_and_loses_nothing(
    tmp_path, capsys, monkeypatch
):
  w = str(tmp_path / "run")
  os.makedirs(w)
  cfg = presets.get_preset(
      "fashion_mnist_resnet20", model="resnet8", width=4, train_subset=256
  )
  workdir_lib.write_config(w, cfg)
  with open(os.path.join(w, "metrics.jsonl"), "w") as f:
    f.write(json.dumps({"step": 0, "test_accuracy": 0.1}) + "\n")
  before = {p: open(os.path.join(w, p), "rb").read() for p in os.listdir(w)}
  real_open = os.open

  def read_only(path, flags, *args, **kwargs):
    if str(path).startswith(w) and flags & (os.O_WRONLY | os.O_RDWR):
      raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
    return real_open(path, flags, *args, **kwargs)

  monkeypatch.setattr(os, "open", read_only)
  new_run = ["--model", "resnet8", "--width", "4", "--train-subset", "256"]
  for argv in (new_run, ["--resume"]):
    assert _status(["--workdir", w, *argv]) == 2
    err = _one_line_error(capsys)
    assert f"cannot write in the workdir {w!r}: Read-only file system" in err
  monkeypatch.undo()
  assert {
      p: open(os.path.join(w, p), "rb").read() for p in os.listdir(w)
  } == before
  # A plot that cannot be written names the file.
  blocker = tmp_path / "a-file"
  blocker.write_text("")
  out = str(blocker / "plot.png")
  assert _status(["plot", w, "--out", out]) == 2
  assert f"cannot write the plot {out}" in _one_line_error(capsys)


def test_a_torn_last_metrics_line_is_dropped_on_resume_and_in_plots(
    tmp_path, capsys
):
  path = tmp_path / "metrics.jsonl"
  rows = [{"step": s, "test_accuracy": 0.1 * s} for s in (0, 2)]
  whole = "".join(json.dumps(r) + "\n" for r in rows)
  path.write_text(whole + '{"step": 4, "test_acc')  # killed mid-append
  png = str(tmp_path / "p.png")
  assert _status(["plot", str(tmp_path), "--out", png]) == 0
  notes = []
  log = workdir_lib.MetricsLog(str(tmp_path), 2, log=notes.append)
  assert log.rows == rows and path.read_text() == whole
  assert notes == [
      f"{path}: dropped its last line, cut short (an append that was"
      " interrupted)"
  ]
  # Any other line that is not JSON is named, not skipped.
  path.write_text(
      json.dumps(rows[0]) + "\ngarbage\n" + json.dumps(rows[1]) + "\n"
  )
  capsys.readouterr()
  assert _status(["plot", str(tmp_path), "--out", png]) == 2
  assert f"{path}, line 2, is not JSON" in _one_line_error(capsys)
  with pytest.raises(workdir_lib.UserError, match="line 2, is not JSON"):
    workdir_lib.MetricsLog(str(tmp_path), 2)


def test_undefined_metrics_are_json_null(tmp_path):
  log = workdir_lib.MetricsLog(str(tmp_path), 0)
  log.append({"step": 1, "skew_slope_raw": float("nan"), "x": float("inf")})
  line = open(tmp_path / "metrics.jsonl").read()
  assert json.loads(line, parse_constant=lambda c: pytest.fail(c)) == {
      "step": 1,
      "skew_slope_raw": None,
      "x": None,
  }


def test_compare_script_keeps_earlier_results(tmp_path):
  runs = tmp_path / "runs"
  (runs / "baseline").mkdir(parents=True)
  (runs / "baseline" / "metrics.jsonl").write_text("{}\n")
  (runs / "compare.png").write_text("png")
  env = {**os.environ, "RUNS_DIR": str(runs), "SPARSEOPT_TRAIN": "true"}
  done = subprocess.run(
      ["bash", os.path.join(ROOT, "scripts", "compare.sh")],
      env=env,
      capture_output=True,
      text=True,
      timeout=60,
  )
  assert done.returncode == 0, done.stderr
  (kept,) = [p for p in runs.iterdir() if p.name.startswith("earlier-")]
  assert (kept / "baseline" / "metrics.jsonl").read_text() == "{}\n"
  assert (kept / "compare.png").read_text() == "png"
  assert f"earlier results are now in {kept}" in done.stderr


def test_sigterm_stops_at_the_next_step_and_resume_ends_as_a_straight_run(
    tmp_path, capsys
):
  w = str(tmp_path / "run")
  # 12 steps, evaluated at the start and the end only.
  argv = [*FLAGS, "--steps", "12", "--eval-every", "12"]
  metrics = os.path.join(w, "metrics.jsonl")

  def preempt():  # a notice once the run has evaluated its first point
    while not os.path.exists(metrics):
      time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGTERM)

  # Should the loop not take the signal, it is ignored here rather than end pytest.
  ignore = lambda *_: None
  previous = signal.signal(signal.SIGTERM, ignore)
  try:
    notice = threading.Thread(target=preempt, daemon=True)
    notice.start()
    assert _status(["--workdir", w, *argv]) == 0
    notice.join()
    assert signal.getsignal(signal.SIGTERM) is ignore  # the loop's handler went
  finally:
    signal.signal(signal.SIGTERM, previous)
  out = capsys.readouterr().out
  (stopped,) = re.findall(r"stopped after step (\d+) with a checkpoint", out)
  stopped = int(stopped)
  assert 0 < stopped < 12
  assert json.loads(out.strip().splitlines()[-1])["step"] <= stopped
  saved = os.listdir(os.path.join(w, "checkpoints"))
  assert max(int(d) for d in saved if d.isdigit()) == stopped
  assert _status(["--workdir", w, "--resume", "--no-progress"]) == 0
  straight = str(tmp_path / "straight")
  assert _status(["--workdir", straight, *argv]) == 0
  (resumed,), (whole,) = _rows(w)[-1:], _rows(straight)[-1:]
  assert resumed["step"] == whole["step"] == 12
  for key in ("test_loss", "test_accuracy", "train_loss", "train_accuracy"):
    assert resumed[key] == whole[key], key


# A process that may not write files over 2 KiB (RLIMIT_FSIZE; SIGXFSZ ignored, so
# a write fails with EFBIG): the run's checkpoint files fail as on a full disk.
_SMALL_FILES = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))
from sparseopt_jax.training import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_failed_checkpoint_stops_the_run_in_one_line_and_resume_recovers(
    tmp_path,
):
  w = str(tmp_path / "run")
  assert (
      _status(["--workdir", w, "--steps", "6", "--stop-at", "2", *FLAGS]) == 0
  )
  env = {
      **os.environ,
      "PYTHONPATH": ROOT,
      "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
  }
  done = subprocess.run(
      [sys.executable, "-c", _SMALL_FILES, "--workdir", w, "--resume"],
      env={**env, "XLA_FLAGS": ""},
      capture_output=True,
      text=True,
      timeout=240,
  )
  # orbax's writers log their own errors (absl, from their threads) around it.
  lines = done.stderr.strip().splitlines()
  errors = [ln for ln in lines if ln.startswith("sparseopt-train: error:")]
  assert done.returncode == 1 and len(errors) == 1, done.stderr[-3000:]
  assert "Event loop is closed" not in done.stderr
  checkpoints = os.path.join(w, "checkpoints")
  assert f"a checkpoint could not be written under {checkpoints}" in errors[0]
  assert "File too large" in errors[0]
  assert "the last complete checkpoint is step 2" in errors[0]
  assert _status(["--workdir", w, "--resume", "--no-progress"]) == 0
  assert [r["step"] for r in _rows(w)] == [0, 2, 4, 6]


def test_distributed_outside_a_cluster_names_the_flags_to_pass(tmp_path):
  # A fresh process: jax.distributed.initialize must come before any computation.
  w = str(tmp_path / "w")
  done = subprocess.run(
      [sys.executable, "-m", "sparseopt_jax.training.train"]
      + ["--workdir", w, "--distributed"],
      env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"},
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert done.returncode == 2, done.stderr[-3000:]
  (line,) = done.stderr.strip().splitlines()
  assert line.startswith("sparseopt-train: error: jax.distributed.initialize")
  assert "pass --coordinator-address HOST:PORT, --num-processes N" in line
  assert not os.path.exists(w)
