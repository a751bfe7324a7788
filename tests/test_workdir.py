"""A run's workdir through the command line: resume with the stored config, no duplicate
metrics rows, one process at a time, and user errors as one line with exit status 2.
"""

import json
import os
import subprocess
import sys

import pytest

# The training program needs the [train] extra: skip without it.
for _module in ("flax", "grain", "orbax.checkpoint", "tqdm", "matplotlib"):
  pytest.importorskip(_module)

from sparseopt_jax.training import train  # noqa: E402

# Static masks and a tiny model: what is tested here is the workdir, not the optimizer.
FLAGS = [
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


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data-dir", "/nonexistent", "--steps", "2"], "train-images"),
        pytest.param(
            ["--batch-size", "60", "--steps", "2"],
            "not divisible by the 8 devices",
            marks=pytest.mark.multi_device,
        ),
    ],
)
def test_user_errors_are_one_line_and_exit_status_2(
    tmp_path, capsys, argv, message
):
  code = train.main(["--workdir", str(tmp_path / "w"), *argv])
  err = capsys.readouterr().err.strip()
  assert code == 2 and len(err.splitlines()) == 1 and message in err, err
  assert err.startswith("sparseopt-train: error:")


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
